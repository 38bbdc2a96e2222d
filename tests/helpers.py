"""Shared test fixtures: tiny configs that compile and run in seconds."""

import contextlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable

import ml_collections
import pytest
from PIL import Image

from gdd import config_lib, errors, workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, variant: str = '') -> ml_collections.ConfigDict:
  """`configs/<name>.py`'s get_config(variant), as config_flags loads it."""
  path = os.path.join(REPO, 'configs', f'{name}.py')
  return config_lib.load_file(f'{path}:{variant}' if variant else path)


@contextlib.contextmanager
def raises_user_error(builtin: type[Exception], match: str):
  """pytest.raises(builtin) that also wants a `gdd.errors.UserError`.

  The CLI prints a UserError's message alone; callers still catch `builtin`.
  """
  with pytest.raises(builtin, match=match) as info:
    yield info
  assert isinstance(info.value, errors.UserError), repr(info.value)


def write_tfds_metadata(
  tfds_name: str, data_dir: str, num_examples: int = 16
) -> None:
  """Makes `tfds_name` count as prepared in data_dir, for `check_available`.

  `tfds.testing.mock_data(data_dir=data_dir)` serves random examples; the
  builder's metadata in data_dir is what a prepared data set has there.
  Builders of manually downloaded data (imagenet2012) ship no split sizes:
  theirs are set to `num_examples` per split, as the mock serves.
  """
  import tensorflow_datasets as tfds

  builder = tfds.builder(tfds_name)
  if not builder.info.splits:
    builder.info.set_splits(
      tfds.core.SplitDict(
        [
          tfds.core.SplitInfo(
            name=split, shard_lengths=[num_examples], num_bytes=0
          )
          for split in ('train', 'validation')
        ]
      )
    )
  metadata_dir = os.path.join(data_dir, builder.info.full_name)
  os.makedirs(metadata_dir)
  builder.info.write_to_directory(metadata_dir)


def checkpoint_steps(stage_dir: str) -> list[int]:
  """The steps of a stage's finished checkpoints, ascending.

  Orbax names a finished checkpoint by its step; an unfinished save is a
  temporary folder whose name is not a number.
  """
  folder = workdir_lib.checkpoints_dir(stage_dir)
  if not folder.exists():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def quick_config(
  name: str = 'digits', num_train_steps: int = 4
) -> ml_collections.ConfigDict:
  """The `:quick` config shrunk further: a few steps, tiny sample grids."""
  config = load_config(name, 'quick')
  for stage in ('teacher', 'guided', 'distill', 'encoder'):
    config[stage].update(
      num_train_steps=num_train_steps,
      batch_size=16,
      log_every=2,
      grids_every=1000,
      checkpoint_every=1000,
    )
  config.teacher.optimizer.warmup_steps = 1
  config.distill.initial_num_steps = 8
  config.grids.update(teacher_num_steps=2, samples_per_class=1)
  config.sample.update(num_steps=2, num_samples=12, batch_size=8)
  config_lib.validate(config)
  return config


def quick_latent_config(
  name: str = 'shapes', num_train_steps: int = 4
) -> ml_collections.ConfigDict:
  """A latent config's `:quick` variant with a few steps per stage and one
  small grid, validated: the autoencoder → … chain in minutes."""
  config = shrink_latent_chain(load_config(name, 'quick'), num_train_steps)
  config_lib.validate(config)
  return config


def shrink_latent_chain(
  config: ml_collections.ConfigDict, num_train_steps: int = 4
) -> ml_collections.ConfigDict:
  """A latent `:quick` config shrunk further, in place: a few steps per
  stage (autoencoder too), batches of 8, one small grid, tiny samples."""
  for stage in ('autoencoder', 'teacher', 'guided', 'distill'):
    config[stage].update(
      num_train_steps=num_train_steps,
      batch_size=8,
      log_every=2,
      grids_every=1000,
      checkpoint_every=1000,
    )
    config[stage].optimizer.warmup_steps = 1
  config.grids.update(sample_ws=(1.0,), teacher_num_steps=2)
  config.sample.update(num_steps=2, num_samples=6, batch_size=4)
  return config


def noisy_params(model, seed: int = 0):
  """`model`'s fresh params with every leaf perturbed by 0.05·N(0, 1).

  A fresh network outputs exactly 0 (its last conv starts at zero); these
  make every input show in the output.
  """
  import jax

  from gdd.stages import common

  params = common.init_params(model, jax.random.PRNGKey(seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(
    tree,
    [
      x + 0.05 * jax.random.normal(k, x.shape)
      for x, k in zip(leaves, keys, strict=True)
    ],
  )


def exported_params(workdir, name: str):
  """The params export of the workdir's stage `name` (e.g. 'distill/1steps'),
  on the host."""
  # Imported here: gdd must load after conftest's XLA flags.
  import jax

  from gdd.train import checkpointing

  return jax.device_get(
    checkpointing.load_params(
      workdir_lib.params_dir(workdir_lib.stage_dir(workdir, name))
    )
  )


def train_steps(
  stage,
  mesh,
  num_steps: int,
  *,
  memory_config: ml_collections.ConfigDict | None = None,
  data_config: ml_collections.ConfigDict | None = None,
):
  """`num_steps` train steps of `stage` on `mesh`, from a fixed init.

  Returns (state, last step's metrics) on the host. Batches are digits
  training batches of the stage's batch size, laid out as the loop does.
  """
  # Imported here: gdd must load after conftest's XLA flags.
  import jax

  from gdd import data
  from gdd.train import loop, sharding
  from gdd.train.state import TrainState

  data_config = data_config or quick_config().data
  info = data.get_info(data_config)
  tx, step, layout = loop.build_train_step(
    stage,
    mesh,
    jax.random.PRNGKey(1),
    max_pixel_value=info.max_pixel_value,
    memory_config=memory_config,
  )
  frozen = jax.device_put(stage.frozen_params, layout.frozen)
  state = jax.jit(
    lambda rng, f: TrainState.create(stage.init_params(rng, f), tx),
    out_shardings=layout.state,
  )(jax.random.PRNGKey(0), frozen)
  batches = data.train_batches(
    data_config, seed=0, global_batch_size=stage.train_config.batch_size
  )
  for _ in range(num_steps):
    state, metrics = step(
      state, frozen, sharding.global_batch(next(batches), mesh)
    )
  return jax.device_get(state), jax.device_get(metrics)


# ------------------------------------------------- webdataset shards ---


def encode_image(image: Image.Image, file_format: str = 'PNG', **options):
  """The bytes of `image` saved in `file_format` (Pillow's options)."""
  buffer = io.BytesIO()
  image.save(buffer, file_format, **options)
  return buffer.getvalue()


def write_shard(path, members) -> None:
  """A tar of (name, bytes) members, in the order given."""
  with tarfile.open(path, 'w') as tar:
    for name, content in members:
      info = tarfile.TarInfo(name)
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))


def write_shards(
  folder,
  num_shards: int,
  per_shard: int,
  caption: Callable[[int, int], str] = lambda s, k: f'pair {s} {k}',
) -> list[str]:
  """Shards `00000.tar`, … of JPEG–caption pairs, as img2dataset writes.

  Pair K of shard S is a 20×30 picture of colour (K, S, 9) captioned
  `caption(S, K)`; each shard lists its pairs in reverse key order, each
  with a KEY.json to ignore. Returns the captions in index order (shard,
  then key).
  """
  folder.mkdir(exist_ok=True)
  captions = []
  for s in range(num_shards):
    members = []
    for k in reversed(range(per_shard)):
      key = f'{s:05d}{k:04d}'
      picture = Image.new('RGB', (20, 30), (k, s, 9))
      members += [
        (f'{key}.json', b'{}'),
        (f'{key}.txt', f'{caption(s, k)}\n'.encode()),
        (f'{key}.jpg', encode_image(picture, 'JPEG')),
      ]
    write_shard(folder / f'{s:05d}.tar', members)
    captions += [caption(s, k) for k in range(per_shard)]
  return captions


# ------------------------------------------------- CLIP tokenizer files ---

# A tiny CLIP-format vocabulary. Byte-level BPE maps ASCII letters and '!'
# to themselves; '</w>' marks a word's last symbol.
CLIP_VOCAB = {
  '!': 0,
  'a': 1,
  'c': 2,
  's': 3,
  't': 4,
  '!</w>': 5,
  'a</w>': 6,
  'c</w>': 7,
  's</w>': 8,
  't</w>': 9,
  'ca': 10,
  'cat</w>': 11,
  'at</w>': 12,
  '<|startoftext|>': 13,
  '<|endoftext|>': 14,
}
# In priority order: 'c a' before 'a t</w>', so 'cat' merges to 'ca' +
# 't</w>' and then 'cat</w>' (the other order would leave 'c' + 'at</w>').
CLIP_MERGES = '#version: 0.2\nc a\na t</w>\nca t</w>\n'


def write_clip_files(folder) -> tuple:
  """`folder`/vocab.json and merges.txt of the tiny CLIP vocabulary, as a
  Stable Diffusion download's tokenizer/ folder holds them."""
  vocab_json = folder / 'vocab.json'
  merges_txt = folder / 'merges.txt'
  vocab_json.write_text(json.dumps(CLIP_VOCAB))
  merges_txt.write_text(CLIP_MERGES)
  return vocab_json, merges_txt


# ---------------------------------------------------------- notebooks ---


def run_tiny_notebook(
  name: str, workdir: str, tmp_path, monkeypatch
) -> list[dict]:
  """Runs colabs/`name` on a copy of `workdir`; returns its cells' outputs.

  Each notebook's tiny setting trains exactly one of the session's chain
  fixtures (the same training keys), so its training cell finds every
  stage finished, and the cells that sample, plot and time run as they do
  for a user.
  """
  # Imported here: only the notebook tests need them.
  import nbclient  # noqa: PLC0415
  import nbformat  # noqa: PLC0415

  from tests import conftest  # noqa: PLC0415

  path = os.path.join(REPO, 'colabs', name)
  shutil.copytree(workdir, tmp_path / 'workdir')
  monkeypatch.setenv('GDD_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('GDD_NOTEBOOK_WORKDIR', str(tmp_path / 'workdir'))
  # One CPU device in the kernel, as a user's laptop has (the tests' 8 fake
  # devices would only slow its compiles down).
  monkeypatch.setenv('XLA_FLAGS', conftest.TEST_XLA_FLAGS)
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    notebook,
    timeout=600,
    kernel_name='python3',
    resources={'metadata': {'path': os.path.dirname(path)}},
  )
  client.execute()  # Raises CellExecutionError if any cell fails.
  return [o for cell in notebook.cells for o in cell.get('outputs', [])]


def notebook_text(outputs: list[dict]) -> str:
  return ''.join(o.get('text', '') for o in outputs)


def notebook_images(outputs: list[dict]) -> int:
  return sum('image/png' in o.get('data', {}) for o in outputs)
