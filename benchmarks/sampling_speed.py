r"""Wall time of the CFG teacher at many steps against the few-step student.

  python benchmarks/sampling_speed.py --config=configs/digits.py \
      --workdir=workdirs/digits [--update_eval]
  python benchmarks/sampling_speed.py --config=configs/shapes.py \
      --workdir=workdirs/shapes

Runs the speed part of `--mode=evaluate` alone (`config.evaluate.speed_*`:
batch size, teacher step counts, student step count) on this machine's
devices and prints the table. With --update_eval it also replaces the speed
section of an existing `WORKDIR/eval/results.json` and re-renders
results.md, so the speed can be re-timed without re-scoring every row.

On a text-to-image workdir (a caption data set, e.g. configs/shapes.py) it
then says where each sampler's time goes: seconds per sample of the CFG
teacher at every `speed_teacher_num_steps` and of the distilled student at
every distilled step count, whole and in three parts timed on their own —
the text encoder (one pass over what one network call encodes), the N
U-Net steps (the sampler's own loop, with every text encoder call answered
by that pass's output) and the decoder (`space.decode`: the autoencoder's
decoder in a latent space). Each is compiled before it is timed, over the
same devices and batch (`speed_batch_size`), at w = 1. What the parts leave
of the whole, in encoder passes, is ≈ N − 1 for an N-step sampler that
re-encodes the captions at every step and ≈ 0 for one that encodes them
once.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gdd import (
  conditioning,
  config_lib,
  data,
  sample,
  sampling,
  workdir_lib,
)
from gdd.evaluation import evaluate, report
from gdd.models import text_encoder
from gdd.stages import common, registry
from gdd.train import sharding

_CONFIG = config_flags.DEFINE_config_file('config', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished run.')
_UPDATE_EVAL = flags.DEFINE_bool(
  'update_eval', False, "Replace the speed section of the workdir's results."
)
_MIN_SECONDS = flags.DEFINE_float(
  'min_seconds',
  5.0,
  'A call shorter than this is repeated until the repeats fill it; the '
  'median is reported.',
)
flags.mark_flags_as_required(['config', 'workdir'])

# Guidance strength of every timed call (the speed does not depend on it).
_W = 1.0
# (stage, label) of the rows of the text table.
_TEACHER = ('teacher', 'CFG teacher')
_STUDENT = ('distill', 'distilled student')
PARTS = ('text_encoder', 'unet_steps', 'decoder')


def _given_encoding(encoding: text_encoder.TextEncoding) -> Callable:
  """A flax method interceptor: every text encoder call returns `encoding`."""

  def intercept(next_fun, args, kwargs, context):
    if not (
      isinstance(context.module, text_encoder.TextEncoder)
      and context.method_name == '__call__'
    ):
      return next_fun(*args, **kwargs)
    if args[0].shape[0] != encoding.last_hidden_state.shape[0]:
      raise ValueError(
        f'The network encodes {args[0].shape[0]} captions per call; the '
        f'timed encoder pass encoded {encoding.last_hidden_state.shape[0]}.'
      )
    return encoding

  return intercept


def _encoded_tokens(stage: str, loaded: sample.LoadedStage, cond) -> np.ndarray:
  """The tokens one network call of `stage` encodes: the batch, and for the
  CFG teacher (2 NFE per step) its null after it, one batch of 2B
  (`guidance.guided_x`)."""
  if registry.get(stage).nfe_per_step == 1:
    return cond['tokens']
  both = conditioning.concat(cond, loaded.cond_kind.null_like(cond))
  return np.asarray(both['tokens'])


def _timed(fn: Callable, args: tuple, shardings: tuple, out):
  """(seconds per call of `fn(*args)` compiled, its output); `shardings`
  and `out` place the arguments and the output."""
  args = jax.device_put(args, shardings)
  compiled = (
    jax.jit(fn, in_shardings=shardings, out_shardings=out)
    .lower(*args)
    .compile()
  )
  seconds = evaluate.time_call(lambda: compiled(*args), _MIN_SECONDS.value)
  # Ready before it is returned: a pending output would be waited for in
  # the next part's first timed call (JAX dispatches asynchronously).
  return seconds, jax.block_until_ready(compiled(*args))


def _unet_steps(loaded: sample.LoadedStage, num_steps: int, size: int):
  """(params, rng, cond, w, encoding) ↦ the sampler's latents: its own loop
  (`sampling.draw`), each text encoder call answered by `encoding`."""

  def unet_steps(params, rng, cond, w, encoding):
    if loaded.config.model.inpainting:  # Fills in everything, as sampling.
      cond, _ = sampling.known_region_request(loaded.space, cond, None)
    with nn.intercept_methods(_given_encoding(encoding)):
      return sampling.draw(
        loaded.config,
        loaded.space,
        loaded.make_denoiser(params, cond, w),
        rng,
        size,
        num_steps=num_steps,
        sampler='ddim',
      )

  return unet_steps


def _time_parts(stage: str, num_steps: int, workdir: str, cond) -> dict:
  """Seconds per sample of one DDIM sampler, whole and by part (`PARTS`)."""
  loaded = sample.load_stage(workdir, stage, num_steps=num_steps)
  mesh = sharding.make_mesh()
  rep, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  size = conditioning.batch_size(cond)
  params, space_params = loaded.params, loaded.space_params
  rng, w = np.asarray(jax.random.PRNGKey(0)), np.float32(_W)
  sample_fn = sampling.make_sample_fn(
    loaded.config, loaded.space, loaded.make_denoiser, num_steps=num_steps
  )

  def whole(params, rng, cond, w, space_params):
    return sample_fn(params, rng, cond, w, None, space_params)

  def encode(params, tokens):
    encoder = text_encoder.TextEncoder(loaded.model.config.text)
    return encoder.apply({'params': params['text_encoder']}, tokens)

  seconds = {}
  seconds['total'], _ = _timed(
    whole,
    (params, rng, cond, w, space_params),
    (rep, rep, batch, rep, rep),
    out=rep,  # As `sampling.Sampler` returns its samples.
  )
  seconds['text_encoder'], encoding = _timed(
    encode,
    (params, _encoded_tokens(stage, loaded, cond)),
    (rep, batch),
    out=batch,
  )
  seconds['unet_steps'], x = _timed(
    _unet_steps(loaded, num_steps, size),
    (params, rng, cond, w, encoding),
    (rep, rep, batch, rep, batch),
    out=batch,
  )
  seconds['decoder'], _ = _timed(
    loaded.space.decode, (space_params, x), (rep, batch), out=batch
  )
  return {name: value / size for name, value in seconds.items()}


def measure_text_parts(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """What `text_parts_table` shows, for a finished text-to-image workdir."""
  ev = config.evaluate
  cond_kind = common.build_conditioning(config, data.get_info(config.data))
  cond = conditioning.pad_to_multiple(
    cond_kind.cycled(ev.speed_batch_size), jax.device_count()
  )
  plan = [(_TEACHER, n) for n in ev.speed_teacher_num_steps] + [
    (_STUDENT, n) for n in workdir_lib.finished_rounds(workdir)
  ]
  rows = []
  for (stage, label), num_steps in plan:
    seconds = _time_parts(stage, num_steps, workdir, cond)
    rows.append(
      dict(
        model=label,
        num_steps=num_steps,
        nfe=registry.nfe(stage, num_steps),
        **seconds,
      )
    )
  return {
    'device': evaluate.device_description(),
    'batch_size': conditioning.batch_size(cond),
    'rows': rows,
  }


def text_parts_table(parts: dict) -> str:
  """Markdown: per sampler, ms per sample whole and by part."""
  lines = [
    '### Where text-to-image sampling spends its time',
    '',
    f'Device {parts["device"]}, batch {parts["batch_size"]}, w = {_W:g}; '
    'ms per sample, each part compiled and timed on its own (short calls: '
    'median of repeats after a warm-up call). Text encoder: one pass over '
    "what one network call encodes (the teacher's: the captions and the "
    'empty caption, 2B). The rest is the whole less its parts, also in '
    'text encoder passes: about N − 1 when an N-step sampler encodes the '
    'captions at every step.',
    '',
    '| model | steps | NFE | total | text encoder | U-Net steps | decoder '
    '| rest | rest in encoder passes |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  ]
  for row in parts['rows']:
    rest = row['total'] - sum(row[name] for name in PARTS)
    cells = [row['model'], row['num_steps'], row['nfe']] + [
      f'{1e3 * row[name]:.3f}' for name in ('total', *PARTS)
    ]
    cells += [f'{1e3 * rest:.3f}', f'{rest / row["text_encoder"]:.1f}']
    lines.append('| ' + ' | '.join(map(str, cells)) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate(config)
  print(f'device: {evaluate.device_description()}')
  speed = evaluate.measure_speed(
    config, _WORKDIR.value, min_seconds=_MIN_SECONDS.value
  )
  if speed is not None:
    print(report.speed_table(speed))
  if config.data.name in config_lib.CAPTION_DATASETS:
    print(text_parts_table(measure_text_parts(config, _WORKDIR.value)))
  if _UPDATE_EVAL.value and speed is not None:
    out_dir = workdir_lib.eval_dir(_WORKDIR.value)
    results = report.read(out_dir)
    results['speed'] = speed
    report.write(results, out_dir)
    print(f'updated {out_dir}/results.json and results.md')


if __name__ == '__main__':
  app.run(main)
