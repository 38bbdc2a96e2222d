"""Tests of gdd.tokenization: id layout, padding, truncation, BPE, errors."""

import numpy as np
import pytest

from gdd import errors, tokenization
from tests import helpers

WORDS = ('a', 'red', 'blue', 'circle', 'square', 'left', 'of')
# WordTokenizer ids: 0 pad, 1 BOS, 2 EOS, then WORDS from 3.
A, RED, BLUE, CIRCLE, SQUARE, LEFT, OF = range(3, 10)


def test_word_tokenizer_layout_and_round_trip():
  tokenizer = tokenization.WordTokenizer(WORDS, max_length=7)
  assert tokenizer.vocab_size == 10
  assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 2)
  ids = tokenizer.encode(['a red circle', 'Blue  square\tleft of a', ''])
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(
    ids,
    [
      [1, A, RED, CIRCLE, 2, 0, 0],
      [1, BLUE, SQUARE, LEFT, OF, A, 2],
      [1, 2, 0, 0, 0, 0, 0],
    ],
  )
  assert tokenizer.decode(ids) == ['a red circle', 'blue square left of a', '']


def test_word_tokenizer_truncation_keeps_eos_last():
  tokenizer = tokenization.WordTokenizer(WORDS, max_length=4)
  ids = tokenizer.encode(['a red circle left of a blue square'])
  np.testing.assert_array_equal(ids, [[1, A, RED, 2]])


def test_word_tokenizer_unknown_word():
  tokenizer = tokenization.WordTokenizer(WORDS, max_length=8)
  with pytest.raises(tokenization.UnknownWordError, match="'green'.*data set"):
    tokenizer.encode(['a green circle'])
  assert issubclass(tokenization.UnknownWordError, errors.UserError)


@pytest.mark.parametrize(
  'vocabulary, max_length, match',
  [
    ((), 8, 'empty'),
    (('red', 'Blue'), 8, "'Blue'"),
    (('red', 'dark blue'), 8, "'dark blue'"),
    (('red', ''), 8, "''"),
    (('red', 'blue', 'red'), 8, "duplicate.*'red'"),
    (WORDS, 1, 'max_length=1'),
  ],
)
def test_word_tokenizer_rejects_bad_arguments(vocabulary, max_length, match):
  with pytest.raises(ValueError, match=match):
    tokenization.WordTokenizer(vocabulary, max_length)


def test_encode_refuses_a_lone_string():
  tokenizer = tokenization.WordTokenizer(WORDS, max_length=8)
  with pytest.raises(TypeError, match='sequence of str'):
    tokenizer.encode('a red circle')


BOS = helpers.CLIP_VOCAB['<|startoftext|>']
EOS = helpers.CLIP_VOCAB['<|endoftext|>']


@pytest.fixture
def clip_files(tmp_path):
  return helpers.write_clip_files(tmp_path)


@pytest.mark.parametrize(
  'text, tokens',
  [
    ('cat', [11]),  # c a → ca; ca t</w> → cat</w>
    ('at', [12]),
    ('cats', [10, 4, 8]),  # ca, t, s</w>: no merge 'ca t'
    ('tact', [4, 1, 2, 9]),  # no merge 'a c': t a c t</w>
    ('A  Cat!', [6, 11, 5]),  # lower-cased; '!' split off the word
    ('cat!!\ta\n', [11, 0, 5, 6]),  # '!!' is one piece: ! + !</w>
    ('a <|endoftext|> cat', [6, EOS, 11]),  # a special token typed in
    ('', []),
  ],
)
def test_clip_tokenizer_ids(clip_files, text, tokens):
  tokenizer = tokenization.ClipTokenizer.from_files(*clip_files, max_length=8)
  padding = [EOS] * (8 - 2 - len(tokens))
  np.testing.assert_array_equal(
    tokenizer.encode([text]), [[BOS, *tokens, EOS, *padding]]
  )


def test_clip_tokenizer_pad_token_and_truncation(clip_files):
  # SD 2.x pads with '!' (id 0); a '!' in the text stays '!</w>' (id 5).
  tokenizer = tokenization.ClipTokenizer.from_files(
    *clip_files, max_length=6, pad_token='!'
  )
  assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (
    15,
    EOS,
    0,
  )
  ids = tokenizer.encode(['a!', 'a cat cats cat', ''])
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(
    ids,
    [
      [BOS, 6, 5, EOS, 0, 0],
      [BOS, 6, 11, 10, 4, EOS],  # truncated to 4 tokens, EOS kept last
      [BOS, EOS, 0, 0, 0, 0],
    ],
  )
  assert tokenizer.encode([]).shape == (0, 6)


def test_clip_tokenizer_missing_file(clip_files, tmp_path):
  vocab_json, _ = clip_files
  missing = tmp_path / 'tokenizer' / 'merges.txt'
  with pytest.raises(FileNotFoundError, match=str(missing)) as info:
    tokenization.ClipTokenizer.from_files(vocab_json, missing)
  assert isinstance(info.value, errors.UserError)


def test_clip_tokenizer_malformed_files(clip_files):
  vocab_json, merges_txt = clip_files
  merges_txt.write_text('#version: 0.2\nc a\nca t</w> x\n')
  with pytest.raises(tokenization.TokenizerFileError, match='line 3'):
    tokenization.ClipTokenizer.from_files(vocab_json, merges_txt)
  vocab_json.write_text('["a", "b"]')
  with pytest.raises(tokenization.TokenizerFileError, match='map tokens'):
    tokenization.ClipTokenizer.from_files(vocab_json, merges_txt)


def test_clip_tokenizer_pad_token_must_be_in_vocabulary():
  merges = [('c', 'a')]
  with pytest.raises(ValueError, match="pad_token='<pad>'"):
    tokenization.ClipTokenizer(helpers.CLIP_VOCAB, merges, pad_token='<pad>')
  vocab = {
    k: v for k, v in helpers.CLIP_VOCAB.items() if k != '<|startoftext|>'
  }
  with pytest.raises(ValueError, match='BOS'):
    tokenization.ClipTokenizer(vocab, merges)


def test_clip_decode_gives_back_the_text_without_special_tokens(clip_files):
  tokenizer = tokenization.ClipTokenizer.from_files(*clip_files, max_length=8)
  ids = tokenizer.encode(['a cat', 'cat a'])
  assert tokenizer.decode(ids) == ['a cat', 'cat a']
