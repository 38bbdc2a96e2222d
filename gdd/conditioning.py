"""What the network is conditioned on: the `cond` pytree and its rules.

A `cond` is a dict of arrays that share a leading batch axis. Today it is
{'label': int32[B]} (class-conditional models); text models add a 'text'
entry. The network, guidance, losses, samplers, grids, CLI and evaluation
pass `cond` through as a pytree; only a `Conditioning` knows its keys: its
null value for classifier-free guidance, the dropout to null in teacher
training, what a user's request must look like, and which conditions sample
grids and evaluation draw.
"""

import dataclasses
from typing import Any

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


@dataclasses.dataclass(frozen=True)
class ClassConditioning:
  """Class labels in [0, num_classes); the null label ∅ is num_classes.

  The null label is the last row of the network's class embedding
  (method.md §4), so one network learns x̂(z, c) and x̂(z, ∅).
  """

  num_classes: int

  def from_batch(self, batch: dict) -> Cond:
    """The condition of a data batch ({'image', 'label'})."""
    return {'label': batch['label']}

  def null_like(self, cond: Cond) -> Cond:
    """The unconditional condition ∅, one per example of `cond`."""
    return {'label': jnp.full_like(cond['label'], self.num_classes)}

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


def class_labels(cond: Cond) -> Any:
  """The class labels in `cond`, or None for conditions without classes."""
  return cond.get('label')


def for_data(info) -> ClassConditioning:
  """The conditioning of a data set (`data.DatasetInfo`): its classes."""
  return ClassConditioning(info.num_classes)
