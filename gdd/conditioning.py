"""What the network is conditioned on: the `cond` pytree and its rules.

A `cond` is a dict of arrays that share a leading batch axis:
{'label': int32[B]} for class-conditional models, {'tokens': int32[B, L]}
(a caption's token ids, which the network's text encoder reads) for
text-conditional ones. The network, guidance, losses, samplers, grids, CLI
and evaluation pass `cond` through as a pytree; only a conditioning kind
(`ClassConditioning`, `TextConditioning`) knows its keys: its
null value for classifier-free guidance, the dropout to null in teacher
training, what a user's request must look like, and which conditions sample
grids and evaluation draw.

An inpainting model (`config.model.inpainting`) also sees the known region:
cond gains 'mask' (float32 [B, h, w, 1], 1 kept) and 'masked' (the data
times the mask in the diffusion space, [B, h, w, C]; for Stable Diffusion's
inpainting U-Net the latents of the masked image, `INPAINTING_INPUTS`), added by
`with_known_region` (in training from random masks, `masks.random`; in
sampling from the request's init and mask). A kind passes them through
from a batch and keeps them in its null ∅: CFG drops only the class or
caption, so x̂(z, c) and x̂(z, ∅) both see the known region, as in Stable
Diffusion's inpainting pipeline (whose unconditional branch gets the same
mask and masked latents). Requests, grids and evaluation draws hold the
class or caption alone; the sampler adds the known region.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

Cond = dict[str, Any]


class CondError(ValueError):
  """A condition a model cannot take; the message says what it can."""


def batch_size(cond: Cond) -> int:
  """The leading (batch) size shared by the leaves of `cond`."""
  return jax.tree.leaves(cond)[0].shape[0]


def concat(first: Cond, second: Cond) -> Cond:
  """`first` then `second` along the batch axis (e.g. cond and null as 2B)."""
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, second)


def select(keep: jnp.ndarray, cond: Cond, other: Cond) -> Cond:
  """Per example: `cond` where keep [B] is true, `other` elsewhere."""

  def pick(a, b):
    mask = jnp.reshape(keep, keep.shape + (1,) * (a.ndim - 1))
    return jnp.where(mask, a, b)

  return jax.tree.map(pick, cond, other)


def pad_to_multiple(cond: Cond, multiple: int) -> Cond:
  """Host `cond` padded along the batch by repeating its last example."""

  def pad(x):
    widths = [(0, -len(x) % multiple)] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, widths, mode='edge')

  return jax.tree.map(pad, cond)


def take(cond: Cond, begin: int, end: int) -> Cond:
  """Examples begin..end−1 of `cond`."""
  return jax.tree.map(lambda x: x[begin:end], cond)


# The keys of an inpainting model's known region (module docstring).
KNOWN_REGION = ('mask', 'masked')
# What an inpainting network's 'masked' holds: 'masked_latents' (gdd's: the
# data times the mask in the diffusion space, `with_known_region`) or
# 'masked_image' (Stable Diffusion's inpainting U-Net: the latents of the
# image with the region to fill zeroed, `spaces.encode_masked`; the network
# then reads the mask as 1 = fill in, `layers.known_region_input`).
INPAINTING_INPUTS = ('masked_latents', 'masked_image')


def known_region(tree: dict) -> Cond:
  """The known-region entries of a batch or cond (none for other models)."""
  return {key: tree[key] for key in KNOWN_REGION if key in tree}


def with_known_region(cond: Cond, x: jnp.ndarray, mask: jnp.ndarray) -> Cond:
  """`cond` (or a batch) with the known region of data x [B, h, w, C] in
  the diffusion space: 'mask' (1 kept, [B, h, w, 1]) and 'masked' = x · mask.
  """
  mask = jnp.asarray(mask, jnp.float32)
  return with_masked_input(cond, mask, x.astype(jnp.float32) * mask)


def with_masked_input(
  cond: Cond, mask: jnp.ndarray, masked: jnp.ndarray
) -> Cond:
  """`cond` (or a batch) with 'mask' (1 kept) and 'masked' as given: a
  'masked_image' network's input (`INPAINTING_INPUTS`)."""
  return dict(
    cond,
    mask=jnp.asarray(mask, jnp.float32),
    masked=jnp.asarray(masked, jnp.float32),
  )


@dataclasses.dataclass(frozen=True)
class ClassConditioning:
  """Class labels in [0, num_classes); the null label ∅ is num_classes.

  The null label is the last row of the network's class embedding
  (method.md §4), so one network learns x̂(z, c) and x̂(z, ∅).
  """

  num_classes: int

  def host_batch(self, batch: dict) -> dict:
    """A data set's host batch as the devices take it (labels: as is)."""
    return batch

  def from_batch(self, batch: dict) -> Cond:
    """The condition of a data batch ({'image', 'label'}[, known region])."""
    return {'label': batch['label'], **known_region(batch)}

  def null_like(self, cond: Cond) -> Cond:
    """The unconditional condition ∅, one per example of `cond` (its known
    region, if any, kept)."""
    null = jnp.full_like(cond['label'], self.num_classes)
    return {'label': null, **known_region(cond)}

  def drop_to_null(self, cond: Cond, rng: jax.Array, p: float) -> Cond:
    """Each example's condition replaced by ∅ with probability p (CFG)."""
    drop = jax.random.bernoulli(rng, p, (batch_size(cond),))
    return select(drop, self.null_like(cond), cond)

  def cycled(self, num: int) -> Cond:
    """`num` host conditions cycling through the classes 0..K−1 (eval)."""
    return {'label': np.arange(num, dtype=np.int32) % self.num_classes}

  def grid(self, per_row: int, max_rows: int) -> tuple[Cond, int]:
    """(host conditions, rows) of a sample grid: row r is class r."""
    classes = np.arange(min(self.num_classes, max_rows), dtype=np.int32)
    return {'label': np.repeat(classes, per_row)}, len(classes)

  def grid_titles(self, num_rows: int) -> None:
    """Titles of a grid's rows: none, row r is class r."""
    del num_rows

  def saved_arrays(self, cond: Cond) -> dict[str, np.ndarray]:
    """The arrays saved next to samples in an npz ('labels')."""
    return {'labels': np.asarray(cond['label'])}

  def abstract(self, size: int, sharding=None) -> Cond:
    """ShapeDtypeStructs of a batch of `size` conditions."""
    return {
      'label': jax.ShapeDtypeStruct((size,), jnp.int32, sharding=sharding)
    }

  def from_request(self, cond: Any) -> Cond:
    """A user's condition as host arrays, checked; raises CondError.

    Accepts {'label': ints} or the labels themselves (int [B]), so that
    `sampler(rng, labels, w)` keeps working.
    """
    if isinstance(cond, dict) and set(cond) != {'label'}:
      raise CondError(
        f'cond has keys {sorted(cond)}; this class-conditional model takes '
        "{'label': int [B]} only."
      )
    labels = np.asarray(cond['label'] if isinstance(cond, dict) else cond)
    if (
      labels.ndim != 1
      or not len(labels)
      or not np.issubdtype(labels.dtype, np.integer)
      or labels.min() < 0
      or labels.max() >= self.num_classes
    ):
      raise CondError(
        f'labels must be a non-empty 1-D int array in [0, {self.num_classes}); '
        f'got {labels.dtype} of shape {labels.shape}'
        + (f', range [{labels.min()}, {labels.max()}].' if labels.size else '.')
      )
    return {'label': labels.astype(np.int32)}


class Tokenizer(Protocol):
  """What `TextConditioning` needs of a tokenizer (`gdd.tokenization`)."""

  max_length: int

  def encode(self, texts: Sequence[str]) -> np.ndarray: ...

  def decode(self, tokens: np.ndarray) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class TextConditioning:
  """Captions, as token ids [B, L]; the null condition ∅ is the empty one.

  The network encodes the tokens with its text encoder (CLIP-style); as in
  Stable Diffusion the CFG null is the empty caption's encoding, so the
  null condition is the empty caption's tokens. `captions` are the
  held-out captions that sample grids and evaluation cycle through.
  """

  tokenizer: Tokenizer
  captions: tuple[str, ...]

  def __post_init__(self):
    if not self.captions:
      raise ValueError('TextConditioning needs at least one caption.')

  def tokens(self, texts: Sequence[str]) -> np.ndarray:
    """Token ids int32 [B, L] of `texts`."""
    return np.asarray(self.tokenizer.encode(list(texts)), np.int32)

  def host_batch(self, batch: dict) -> dict:
    """A host batch with its 'caption' strings replaced by 'tokens'."""
    batch = dict(batch)
    batch['tokens'] = self.tokens(batch.pop('caption'))
    return batch

  def from_batch(self, batch: dict) -> Cond:
    """The condition of a device batch ({'image', 'tokens'}[, known region])."""
    return {'tokens': batch['tokens'], **known_region(batch)}

  def null_like(self, cond: Cond) -> Cond:
    """The empty caption's tokens, one per example of `cond` (its known
    region, if any, kept)."""
    empty = jnp.asarray(self.tokens(['']))
    null = jnp.broadcast_to(empty, cond['tokens'].shape)
    return {'tokens': null, **known_region(cond)}

  def drop_to_null(self, cond: Cond, rng: jax.Array, p: float) -> Cond:
    """Each caption replaced by the empty one with probability p (CFG)."""
    drop = jax.random.bernoulli(rng, p, (batch_size(cond),))
    return select(drop, self.null_like(cond), cond)

  def cycled(self, num: int) -> Cond:
    """`num` host conditions cycling through the held-out captions."""
    return {'tokens': self.tokens(_cycle(self.captions, num))}

  def grid(self, per_row: int, max_rows: int) -> tuple[Cond, int]:
    """(host conditions, rows) of a sample grid: row r is caption r."""
    rows = self.captions[:max_rows]
    return {'tokens': self.tokens(np.repeat(rows, per_row))}, len(rows)

  def grid_titles(self, num_rows: int) -> list[str]:
    """Titles of a grid's rows: the captions they show."""
    return list(self.captions[:num_rows])

  def saved_arrays(self, cond: Cond) -> dict[str, np.ndarray]:
    """The arrays saved next to samples in an npz ('captions')."""
    return {'captions': np.asarray(self.tokenizer.decode(cond['tokens']))}

  def abstract(self, size: int, sharding=None) -> Cond:
    """ShapeDtypeStructs of a batch of `size` conditions."""
    shape = (size, self.tokenizer.max_length)
    return {'tokens': jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)}

  def from_request(self, cond: Any) -> Cond:
    """A user's captions as host token ids, checked; raises CondError.

    Accepts the captions ([B] strings, or {'caption': strings}), or token
    ids {'tokens': int [B, L]} as `cycled` and `grid` give them.
    """
    if isinstance(cond, dict) and set(cond) == {'tokens'}:
      return {'tokens': self._checked_tokens(cond['tokens'])}
    if isinstance(cond, dict):
      if set(cond) != {'caption'}:
        raise CondError(
          f'cond has keys {sorted(cond)}; this text-conditional model takes '
          "captions: [B] strings or {'caption': [B] strings} "
          "(or {'tokens': int [B, L]})."
        )
      cond = cond['caption']
    captions = [cond] if isinstance(cond, str) else list(np.asarray(cond))
    if not captions or not all(isinstance(c, str) for c in captions):
      raise CondError(
        'captions must be a non-empty list of strings (one per sample); got '
        f'{type(cond).__name__} {captions[:3]!r}.'
      )
    try:
      return {'tokens': self.tokens(captions)}
    except ValueError as error:
      raise CondError(str(error)) from error

  def _checked_tokens(self, tokens: Any) -> np.ndarray:
    tokens = np.asarray(tokens)
    length = self.tokenizer.max_length
    if (
      tokens.ndim != 2
      or not len(tokens)
      or tokens.shape[1] != length
      or not np.issubdtype(tokens.dtype, np.integer)
    ):
      raise CondError(
        f'tokens must be a non-empty int array [B, {length}]; got '
        f'{tokens.dtype} of shape {tokens.shape}.'
      )
    return tokens.astype(np.int32)


def _cycle(items: Sequence[str], num: int) -> list[str]:
  """`num` items, cycling through `items`."""
  return [items[i % len(items)] for i in range(num)]


def class_labels(cond: Cond) -> Any:
  """The class labels in `cond`, or None for conditions without classes."""
  return cond.get('label')
