"""Every stage kind gdd knows, in chain order; each declares itself.

The pipeline (`--mode`s), the sample API and CLI, `--mode=plan`, evaluation
and its report iterate over `KINDS`; a new stage adds its module's `KIND`
here and nothing else outside its module, config section and tests.
"""

from gdd import errors
from gdd.stages import (
  StageKind,
  autoencoder,
  encoder,
  guided,
  progressive,
  single_w,
  teacher,
)

# --mode=all trains the kinds with in_chain set, in this order.
KINDS: tuple[StageKind, ...] = (
  autoencoder.KIND,  # Latent-space configs only (`StageKind.applies`).
  teacher.KIND,
  guided.KIND,
  progressive.KIND,
  single_w.KIND,
  encoder.KIND,  # --mode=encoder only: it needs 'guided', samples nothing.
)
NAMES = tuple(kind.name for kind in KINDS)


class UnknownStageError(errors.UserError, ValueError):
  """A stage name that no registered kind has."""


def get(name: str) -> StageKind:
  """The kind called `name`; the error lists the known ones."""
  for kind in KINDS:
    if kind.name == name:
      return kind
  raise UnknownStageError(f'stage={name!r}; allowed: {NAMES}.')


def training_modes() -> tuple[str, ...]:
  """'all' and the --mode of every kind."""
  return ('all', *(kind.mode for kind in KINDS))


def for_mode(mode: str, config=None) -> list[StageKind]:
  """The kinds a training --mode runs, in order ('all': the chain).

  With a `config`, only the kinds that apply to it (`StageKind.applies`).
  """
  if mode == 'all':
    kinds = [kind for kind in KINDS if kind.in_chain]
  else:
    kinds = [kind for kind in KINDS if kind.mode == mode]
  return [k for k in kinds if config is None or k.applies(config)]


def nfe(name: str, num_steps: int) -> int:
  """Network evaluations per sample of an N-step sampler of kind `name`.

  The CFG teacher evaluates the conditional and the unconditional model at
  every step (`guidance.guided_x`); every student evaluates one network.
  """
  return get(name).nfe_per_step * num_steps
