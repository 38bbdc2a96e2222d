"""configs/webdataset.py: the latent text-to-image chain on caption shards.

Small shards and a tiny CLIP vocabulary are written here; the stages that
read the data (autoencoder → teacher) then train on them through
`pipeline.run`, as `python -m gdd.main` runs it, and `--mode=sample` reads
its prompts from a file.
"""

import flax
import numpy as np
import pytest

from gdd import config_lib, data, pipeline, workdir_lib
from gdd.stages import common
from tests import helpers

# Captions of the tiny vocabulary's words (helpers.CLIP_VOCAB).
TRAIN_CAPTIONS = ('a cat', 'cats', 'a cat at a cat', 'at a cat', 'tact', 'cat')
HELD_OUT_CAPTIONS = ('cat at a cat', 'a tact cat', 'cats at cats', 'a cat!')


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Two training shards of 8 pairs, a held-out shard of 4, and the
  tokenizer files, as paths."""
  root = tmp_path_factory.mktemp('text_shards')
  helpers.write_shards(
    root / 'train',
    num_shards=2,
    per_shard=8,
    caption=lambda s, k: TRAIN_CAPTIONS[(8 * s + k) % len(TRAIN_CAPTIONS)],
  )
  helpers.write_shards(
    root / 'held_out',
    num_shards=1,
    per_shard=4,
    caption=lambda s, k: HELD_OUT_CAPTIONS[k],
  )
  (root / 'tokenizer').mkdir()
  vocab_json, merges_txt = helpers.write_clip_files(root / 'tokenizer')
  return dict(
    data_dir=str(root / 'train'),
    held_out_dir=str(root / 'held_out'),
    vocab_file=str(vocab_json),
    merges_file=str(merges_txt),
  )


def _config(files):
  """`webdataset:quick` on the test shards, smaller still: 16×16 images,
  one-level networks, 4 steps a stage."""
  config = helpers.load_config('webdataset', 'quick')
  helpers.shrink_latent_chain(config)
  config.data.update(
    data_dir=files['data_dir'],
    held_out_dir=files['held_out_dir'],
    image_size=16,
  )
  config.text.update(
    vocab_file=files['vocab_file'], merges_file=files['merges_file']
  )
  # Compiling dominates the chain's time, and a program's size sets it:
  # one level per network, the text read by the U-Net's mid block only,
  # one round.
  config.autoencoder.model.update(
    block_out_channels=(16,), mid_block_add_attention=False
  )
  config.model.update(
    block_out_channels=(16,),
    down_block_types=('DownBlock2D',),
    up_block_types=('UpBlock2D',),
  )
  config.distill.initial_num_steps = 2
  config_lib.validate(config)
  return config


@pytest.mark.parametrize('variant', ['', 'quick'])
def test_the_config_validates_once_given_its_required_keys(files, variant):
  config = helpers.load_config('webdataset', variant)
  assert config.data.name == 'webdataset' and config.space == 'latent'
  assert (config.text.tokenizer, config.text.max_length) == ('clip', 77)
  for key in ('data_dir', 'held_out_dir'):
    config.data[key] = files[key]
  for key in ('vocab_file', 'merges_file'):
    config.text[key] = files[key]
  config_lib.validate(config)


@pytest.mark.parametrize(
  'given, missing',
  [
    ({}, ('data.data_dir', 'text.vocab_file', 'text.merges_file')),
    ({'data.data_dir': 'data_dir'}, ('text.vocab_file', 'text.merges_file')),
    (
      {'text.vocab_file': 'vocab_file', 'text.merges_file': 'merges_file'},
      ('data.data_dir',),
    ),
  ],
)
def test_unset_required_keys_fail_as_one_error_before_any_work(
  files, tmp_path, given, missing
):
  config = helpers.load_config('webdataset')
  for key, name in given.items():
    section, leaf = key.split('.')
    config[section][leaf] = files[name]
  workdir = tmp_path / 'run'
  with helpers.raises_user_error(config_lib.ConfigError, 'must be set') as info:
    pipeline.run(config, str(workdir), 'all')
  message = str(info.value)
  for key in ('data.data_dir', 'text.vocab_file', 'text.merges_file'):
    # Each unset key with an example value; the given ones not at all.
    assert (f'--config.{key}=/' in message) == (key in missing), key
  assert not workdir.exists()


def test_free_text_captions_refuse_the_word_tokenizer(files):
  config = _config(files)
  config.text.tokenizer = 'word'
  with pytest.raises(config_lib.ConfigError, match="tokenizer='word'.*'clip'"):
    config_lib.validate(config)


@pytest.fixture(scope='module')
def workdir(files, tmp_path_factory):
  """autoencoder → teacher on the shards: the stages that read the data.

  The students learn from their teacher on the same batches; what they do
  in a latent text chain is the shapes chain's tests.
  """
  workdir = str(tmp_path_factory.mktemp('run'))
  for mode in ('autoencoder', 'teacher'):
    pipeline.run(_config(files), workdir, mode)
  return workdir


def test_the_data_stages_train_on_the_shards(workdir, files):
  ae_dir = workdir_lib.stage_dir(workdir, 'autoencoder')
  record = workdir_lib.read_latent_record(ae_dir)
  # All 16 training pairs scale the latents, all 4 held-out pairs give
  # the PSNR (fewer than the config asks for).
  assert (record['num_scaling_examples'], record['num_psnr_examples']) == (
    16,
    4,
  )
  assert record['scaling_factor'] > 0 and np.isfinite(record['psnr_db'])
  # The text encoder embeds the tokenizer files' vocabulary.
  teacher = helpers.exported_params(workdir, 'teacher')
  embedding = flax.traverse_util.flatten_dict(teacher['text_encoder'])[
    ('embeddings', 'token_embedding', 'embedding')
  ]
  assert embedding.shape[0] == len(helpers.CLIP_VOCAB)


def test_grids_and_samples_cycle_the_held_out_captions(files):
  config = _config(files)
  cond_kind = common.build_conditioning(config, data.get_info(config.data))
  assert cond_kind.captions == HELD_OUT_CAPTIONS


def test_sample_mode_writes_the_prompts_as_captions(
  workdir, files, tmp_path, capsys
):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('a cat\n\ncats at a cat\n')
  config = _config(files)
  config.sample.update(
    stage='teacher', num_steps=1, prompts=str(prompts), num_samples=4
  )
  pipeline.run(config, workdir, 'sample')
  path = capsys.readouterr().out.strip()
  with np.load(path) as saved:
    assert saved['images'].shape == (4, 16, 16, 3)
    assert saved['images'].dtype == np.uint8
    assert list(saved['captions']) == ['a cat', 'cats at a cat'] * 2
