"""Captions → fixed-length token ids for a text encoder.

Every tokenizer returns int32 [B, L] rows laid out as CLIP's are: BOS, the
text's tokens, EOS, then padding up to L = `max_length`. A text too long for
L is truncated to its first L − 2 tokens, so every row still ends its text
with EOS (the text encoder pools the state at the first EOS). Two tokenizers:

- `WordTokenizer`: one id per word of a closed vocabulary, for gdd's
  synthetic captions, whose vocabulary is the data set's.
- `ClipTokenizer`: CLIP's byte-level BPE from the `vocab.json` and
  `merges.txt` shipped with Stable Diffusion weights, built on the
  `tokenizers` package as transformers' `CLIPTokenizer` (fast) is.
"""

import json
from collections.abc import Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np
from etils import epath

from gdd import checks, data, errors, paths

BOS_TOKEN = '<|startoftext|>'
EOS_TOKEN = '<|endoftext|>'

# CLIP's pre-tokenizer: its special tokens, English contractions, runs of
# letters, single digits, runs of other non-space characters (as in OpenAI
# CLIP's `simple_tokenizer.py` and transformers' CLIPTokenizer).
_CLIP_PATTERN = (
  r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
  r'|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+'
)


class Tokenizer(Protocol):
  """What a text model needs from a tokenizer."""

  @property
  def max_length(self) -> int:
    """L: every row of `encode` has exactly this many ids."""

  @property
  def vocab_size(self) -> int:
    """Number of ids; every id is in [0, vocab_size)."""

  @property
  def eos_id(self) -> int:
    """The id that ends each text (the text encoder pools its state)."""

  @property
  def pad_id(self) -> int:
    """The id that fills each row after EOS."""

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [len(texts), max_length]: BOS, tokens, EOS, padding per text."""


class UnknownWordError(errors.UserError, ValueError):
  """A caption word outside a `WordTokenizer`'s vocabulary."""


class MissingTokenizerFileError(errors.UserError, FileNotFoundError):
  """A tokenizer file (vocab.json, merges.txt) does not exist."""


class TokenizerFileError(errors.UserError, ValueError):
  """A tokenizer file (vocab.json, merges.txt) is not in its format."""


def _check_max_length(max_length: int) -> None:
  """An L that holds at least BOS and EOS."""
  if not checks.is_int(max_length, 2):
    raise ValueError(
      f'max_length={max_length!r}; must be an int >= 2 (room for BOS and EOS).'
    )


def _check_texts(texts: Sequence[str]) -> list[str]:
  """`texts` as a list; a lone str is refused (it would be split in chars)."""
  if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
    raise TypeError(
      f'texts must be a sequence of str (e.g. [caption]); got {texts!r}.'
    )
  return list(texts)


def _is_word(word) -> bool:
  """Whether `word` is one non-empty, lower-case word without whitespace."""
  return isinstance(word, str) and word.split() == [word.lower()]


class WordTokenizer:
  """One id per word, for captions built from a known, closed vocabulary.

  Ids: 0 is padding, 1 BOS, 2 EOS, and word i of `vocabulary` is 3 + i.
  A text is lower-cased and split on whitespace; a word outside the
  vocabulary is an error rather than an unknown id, since the vocabulary is
  every word the data set's captions use, so a request with another word
  names something the model never saw.
  """

  pad_id = 0
  bos_id = 1
  eos_id = 2
  _NUM_SPECIAL = 3

  def __init__(self, vocabulary: Sequence[str], max_length: int):
    """Checks and indexes the vocabulary.

    Args:
      vocabulary: every word of the data set's captions: unique, non-empty,
        lower-case, without whitespace. Its order fixes the ids.
      max_length: L, the length of every encoded row (>= 2).
    """
    vocabulary = tuple(vocabulary)
    if not vocabulary:
      raise ValueError("vocabulary is empty; pass the data set's words.")
    bad = [w for w in vocabulary if not _is_word(w)]
    if bad:
      raise ValueError(
        'vocabulary must hold non-empty lower-case words without whitespace; '
        f'got {bad[:5]}.'
      )
    if len(set(vocabulary)) != len(vocabulary):
      duplicates = sorted({w for w in vocabulary if vocabulary.count(w) > 1})
      raise ValueError(f'vocabulary has duplicate words: {duplicates[:5]}.')
    _check_max_length(max_length)
    self._words = vocabulary
    self._ids = {w: self._NUM_SPECIAL + i for i, w in enumerate(vocabulary)}
    self._max_length = max_length

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def vocab_size(self) -> int:
    return self._NUM_SPECIAL + len(self._words)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [len(texts), L]: BOS, word ids, EOS, padding (see class doc).

    Raises:
      UnknownWordError: a word is not in the vocabulary.
    """
    texts = _check_texts(texts)
    rows = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    for row, text in zip(rows, texts, strict=True):
      ids = [self._word_id(w) for w in text.lower().split()]
      ids = [self.bos_id, *ids[: self.max_length - 2], self.eos_id]
      row[: len(ids)] = ids
    return rows

  def decode(self, ids: np.ndarray) -> list[str]:
    """The words of each row of `ids` [B, L] up to its first EOS, joined."""
    texts = []
    for row in np.asarray(ids).tolist():
      words = row[1 : row.index(self.eos_id)]
      texts.append(' '.join(self._words[i - self._NUM_SPECIAL] for i in words))
    return texts

  def _word_id(self, word: str) -> int:
    if word not in self._ids:
      shown = ', '.join(self._words[:10])
      more = ', …' if len(self._words) > 10 else ''
      raise UnknownWordError(
        f'Unknown word {word!r}: this model knows only the words of its data '
        f"set's captions ({len(self._words)} words: {shown}{more})."
      )
    return self._ids[word]


class ClipTokenizer:
  """CLIP's byte-level BPE, as Stable Diffusion checkpoints ship it.

  Text is NFC-normalised, each run of whitespace becomes one space and it
  is lower-cased; it is split by CLIP's pattern (`_CLIP_PATTERN`), mapped to
  bytes-as-characters, and each piece is BPE-merged with `</w>` marking its
  end. `<|startoftext|>` and `<|endoftext|>` typed in a text are those
  tokens. A character outside the vocabulary becomes `<|endoftext|>` (CLIP's
  unknown token; CLIP's own vocabulary covers every byte). This is
  transformers' fast CLIPTokenizer; OpenAI's original also repairs mojibake
  (ftfy) and HTML entities, which changes only texts that contain them.

  The pad token differs between checkpoints: SD 1.x pads with
  `<|endoftext|>`, SD 2.x (OpenCLIP) with `!` (id 0). It only fills rows:
  a `!` in a text is tokenized as any other character.
  """

  def __init__(
    self,
    vocab: dict[str, int],
    merges: Sequence[tuple[str, str]],
    max_length: int = 77,
    pad_token: str = EOS_TOKEN,
  ):
    """Builds the BPE pipeline.

    Args:
      vocab: vocab.json's token → id map; it must hold `<|startoftext|>`,
        `<|endoftext|>` and `pad_token`.
      merges: merges.txt's pairs, highest priority first.
      max_length: L, the length of every encoded row (77 for SD).
      pad_token: the token that fills rows after EOS.
    """
    _check_max_length(max_length)
    for name, token in (('BOS', BOS_TOKEN), ('EOS', EOS_TOKEN)):
      if token not in vocab:
        raise ValueError(f'The vocabulary has no {name} token {token!r}.')
    if pad_token not in vocab:
      raise ValueError(
        f'pad_token={pad_token!r} is not in the vocabulary; SD 1.x pads with '
        f"{EOS_TOKEN!r}, SD 2.x with '!'."
      )
    self._max_length = max_length
    self._vocab_size = max(vocab.values()) + 1
    self._eos_id = vocab[EOS_TOKEN]
    self._pad_id = vocab[pad_token]
    self._tokenizer = _clip_bpe(vocab, list(merges))
    self._tokenizer.enable_truncation(max_length)
    self._tokenizer.enable_padding(
      pad_id=self._pad_id, pad_token=pad_token, length=max_length
    )

  @classmethod
  def from_files(
    cls,
    vocab_json: epath.PathLike,
    merges_txt: epath.PathLike,
    max_length: int = 77,
    pad_token: str = EOS_TOKEN,
  ) -> 'ClipTokenizer':
    """Reads a checkpoint's `tokenizer/vocab.json` and `tokenizer/merges.txt`.

    Paths may be local or gs:// (`gdd.paths.resolve`).

    Raises:
      MissingTokenizerFileError: a file does not exist.
      TokenizerFileError: a file is not in its format.
    """
    vocab_path = paths.resolve(vocab_json)
    try:
      vocab = json.loads(_read(vocab_path))
    except json.JSONDecodeError as e:
      raise TokenizerFileError(f'{vocab_path} is not JSON: {e}.') from e
    if not isinstance(vocab, dict):
      raise TokenizerFileError(
        f'{vocab_path} must map tokens to ids; got a {type(vocab).__name__}.'
      )
    merges = _parse_merges(_read(merges_txt), paths.resolve(merges_txt))
    return cls(vocab, merges, max_length, pad_token)

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def pad_id(self) -> int:
    return self._pad_id

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [len(texts), L]: BOS, BPE ids, EOS, padding (see module doc)."""
    texts = _check_texts(texts)
    ids = [e.ids for e in self._tokenizer.encode_batch(texts)]
    # reshape: an empty batch must still have shape [0, L].
    return np.array(ids, np.int32).reshape(len(texts), self.max_length)

  def decode(self, ids: np.ndarray) -> list[str]:
    """The (lower-cased, normalised) text of each row of ids [B, L]."""
    rows = np.asarray(ids).tolist()
    return [
      text.strip()
      for text in self._tokenizer.decode_batch(rows, skip_special_tokens=True)
    ]


def _clip_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
  """The `tokenizers` pipeline of transformers' CLIPTokenizer (fast).

  `tokenizers` is imported here: only CLIP tokenization needs it (the
  `clip` extra), not the embedded data sets' word tokenizer.
  """
  try:
    import tokenizers
    from tokenizers import decoders, normalizers, pre_tokenizers, processors
  except ImportError as error:
    raise errors.UserError(
      "CLIP tokenization needs the 'tokenizers' package: "
      "pip install -e '.[clip]'."
    ) from error
  tokenizer = tokenizers.Tokenizer(
    tokenizers.models.BPE(
      vocab=vocab,
      merges=merges,
      continuing_subword_prefix='',
      end_of_word_suffix='</w>',
      fuse_unk=False,
      unk_token=EOS_TOKEN,
    )
  )
  tokenizer.normalizer = normalizers.Sequence(
    [
      normalizers.NFC(),
      normalizers.Replace(tokenizers.Regex(r'\s+'), ' '),
      normalizers.Lowercase(),
    ]
  )
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(
        tokenizers.Regex(_CLIP_PATTERN), behavior='removed', invert=True
      ),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  tokenizer.decoder = decoders.Sequence(
    [decoders.BPEDecoder(suffix='</w>'), decoders.ByteLevel()]
  )
  tokenizer.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
  tokenizer.post_processor = processors.TemplateProcessing(
    single=f'{BOS_TOKEN} $A {EOS_TOKEN}',
    special_tokens=[(t, vocab[t]) for t in (BOS_TOKEN, EOS_TOKEN)],
  )
  return tokenizer


def _read(path: epath.PathLike) -> str:
  """The text of a tokenizer file, or an error naming its path."""
  path = paths.resolve(path)
  if not path.exists():
    raise MissingTokenizerFileError(
      f'Tokenizer file not found: {path}. Stable Diffusion checkpoints '
      'ship it as tokenizer/vocab.json and tokenizer/merges.txt.'
    )
  return path.read_text(encoding='utf-8')


def _parse_merges(text: str, path: epath.Path) -> list[tuple[str, str]]:
  """merges.txt's pairs in priority order, without its `#version` header."""
  merges = []
  for number, line in enumerate(text.splitlines(), start=1):
    if (number == 1 and line.startswith('#version')) or not line:
      continue
    pair = line.split(' ')
    if len(pair) != 2:
      raise TokenizerFileError(
        f'{path}, line {number}: {line!r} is not a merge "left right".'
      )
    merges.append(tuple(pair))
  return merges


def for_config(config: ml_collections.ConfigDict, info) -> Tokenizer:
  """The tokenizer of `config.text` for the caption data set of `info`.

  'word': the data set's caption vocabulary (`data.caption_vocabulary`);
  'clip': CLIP's BPE from `text.vocab_file` and `text.merges_file` (by
  default the `tokenizer/` files of `config.pretrained.folder`).
  """
  text = config.text
  if text.tokenizer == 'clip':
    # A Stable Diffusion chain reads its folder's tokenizer/ by default.
    tokenizer_dir = epath.Path(config.pretrained.folder or '.') / 'tokenizer'
    return ClipTokenizer.from_files(
      text.vocab_file or tokenizer_dir / 'vocab.json',
      text.merges_file or tokenizer_dir / 'merges.txt',
      text.max_length,
      text.pad_token,
    )
  vocabulary = data.caption_vocabulary(config.data)
  if vocabulary is None:
    raise errors.UserError(
      f"config.text.tokenizer='word' needs a data set with a fixed caption "
      f'vocabulary (shapes); {info.name!r} has free text: set '
      "config.text.tokenizer='clip' with text.vocab_file and "
      'text.merges_file.'
    )
  return WordTokenizer(vocabulary, text.max_length)
