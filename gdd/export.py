"""--mode=export: a student of a Stable Diffusion chain → a diffusers folder.

Reads a finished stage-one student or halving round of a workdir trained
from `config.pretrained.folder` and writes a StableDiffusionPipeline folder
(`weights.diffusers_export.export_pipeline`): the student's U-Net with its
w-embedding folded in at `config.export.w`, the SD folder's VAE, text
encoder and tokenizer, and DDIM on the student's grid. diffusers (or any
runtime of diffusers' format) then samples the student in N steps at
guidance_scale 1, without gdd.
"""

import jax
import ml_collections
from etils import epath

from gdd import errors, paths, sample, workdir_lib
from gdd.weights import diffusers_export

MODE = 'export'


class ExportError(errors.UserError, ValueError):
  """A workdir or request that cannot be exported to diffusers."""


def export_to_folder(
  config: ml_collections.ConfigDict, workdir: epath.PathLike
) -> epath.Path:
  """Writes `config.export`'s student as a diffusers folder; returns it."""
  e = config.export
  out = paths.resolve(e.out) if e.out else _default_out(workdir, e)
  diffusers_export.check_new_folder(out)  # Before anything is loaded.
  loaded = sample.load_stage(workdir, e.stage, num_steps=e.num_steps)
  source = loaded.config.pretrained.folder
  if not source:
    raise ExportError(
      f'{workdir} was not distilled from a Stable Diffusion folder '
      '(config.pretrained.folder is unset in its config.json): only '
      "students of SD's networks export to diffusers."
    )
  low, high = loaded.config.guided.w_min, loaded.config.guided.w_max
  if not low <= e.w <= high:
    raise ExportError(
      f'config.export.w={e.w} is outside the w range the student was '
      f'trained on, [{low}, {high}].'
    )
  return diffusers_export.export_pipeline(
    paths.resolve(source),
    out,
    loaded.model.config.unet,
    jax.device_get(loaded.params)['unet'],
    w=float(e.w),
  )


def _default_out(workdir: epath.PathLike, e) -> epath.Path:
  folder = 'guided' if e.stage == 'guided' else f'distill_{e.num_steps}steps'
  return workdir_lib.exports_dir(workdir) / f'{folder}_w{e.w:g}'
