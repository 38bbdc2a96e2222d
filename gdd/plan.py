"""`--mode=plan`: memory and FLOPs per device of each training stage.

For a config and a target (`config.plan.target`: '8xH100', 'v5e-64', 'v4-32',
… or '' for the devices present) and each training stage (teacher, guided,
distill), `print_plan` shows what one device holds and computes:

- State, counted exactly from shapes (`jax.eval_shape`; nothing is
  allocated): params, optimiser state, EMA params and the frozen teacher,
  laid out by the FSDP rules (`sharding.tree_specs`) on the target's (data,
  fsdp) mesh; the gradients (twice with accumulation: the running sum and
  the micro-batch's); under FSDP, the params gathered for compute, counted
  whole (an upper bound: XLA may gather one layer at a time).
- Activations: the temporary bytes (`memory_analysis().temp_size_in_bytes`)
  of the stage's gradient program, compiled on this machine's default
  backend for one device at micro-batches 4 and 8 and extrapolated linearly,
  temp(b) = intercept + slope · b. Smaller micro-batches are off the line
  (XLA lays out batch-1 programs differently). The intercept holds
  batch-independent temporaries (e.g. bfloat16 copies of the params). On CPU
  the numbers are XLA:CPU's: it computes bfloat16 in float32, so a bfloat16
  model's activations come out near their float32 size where TPUs and GPUs
  keep them in bfloat16 (an upper bound), and fusion differs by backend.
  Run the plan on the target's backend for its own numbers.
- FLOPs per step from the same programs' cost analysis (per example ×
  batch), and the seconds per step they take at `config.plan.assumed_mfu`
  of the device's peak (`gdd.train.throughput`).
- The largest per-device micro-batch that fits in what is left of the
  device's memory after the state and a 10% reserve, and the smallest
  `grad_accum_steps` that brings the batch down to it.

`check_fits` makes the same estimate for the devices of a real mesh before a
stage compiles at full size, and fails with the knobs that lower it.
"""

import dataclasses
import math
import re
from collections.abc import Callable
from concurrent import futures
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gdd import config_lib, data
from gdd.stages import Stage, common, registry
from gdd.train import optim, sharding, throughput

# The config sections planned: one per kind that --mode=all trains (a
# config plans those that apply to it, `sections`).
STAGE_SECTIONS = tuple(
  kind.section for kind in registry.for_mode('all') if kind.plan_stage
)


def sections(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The planned sections of the stages `config`'s chain trains."""
  return tuple(
    kind.section
    for kind in registry.for_mode('all', config)
    if kind.plan_stage and kind.trains(config)
  )


# The micro-batches the gradient program is compiled at (see the docstring).
MEASURED_MICRO_BATCHES = (4, 8)
# Kept free of the plan: XLA's fragmentation, program code, estimate error.
MEMORY_RESERVE = 0.1
# XLA:CPU drops remat's optimisation barriers before a CSE pass that merges
# the recomputation back into the forward pass, so a CPU compile would show
# no memory saved by `memory.remat`; GPU and TPU compilers keep them. Planning
# on CPU keeps them too.
CPU_KEEP_REMAT = {'xla_disable_hlo_passes': 'cse_barrier_expander'}
# What a JAX process allocates of a GPU's memory by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION; raise it to use more).
_GPU_MEMORY_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class _Accelerator:
  device_kind: str  # As `jax.Device.device_kind` reports it.
  memory_bytes: float  # Memory of one JAX device.
  # TensorCores per JAX device, as a slice's name counts them.
  cores_per_device: int = 1


# NVIDIA datasheets: memory per GPU.
_GPUS = {
  'H100': _Accelerator('NVIDIA H100 80GB HBM3', 80e9),
  'H100-PCIE': _Accelerator('NVIDIA H100 PCIe', 80e9),
  'H200': _Accelerator('NVIDIA H200', 141e9),
  'A100-80GB': _Accelerator('NVIDIA A100-SXM4-80GB', 80e9),
  'A100-40GB': _Accelerator('NVIDIA A100-SXM4-40GB', 40e9),
  'L4': _Accelerator('NVIDIA L4', 24e9),
}
# Cloud TPU docs (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): HBM per
# chip. A v4 or v5p chip is one JAX device, but 'v4-32' counts its two
# TensorCores: 16 chips. v5e and v6e slices count chips.
_TPUS = {
  'v4': _Accelerator('TPU v4', 32 * 2**30, cores_per_device=2),
  'v5e': _Accelerator('TPU v5 lite', 16e9),
  'v5p': _Accelerator('TPU v5p', 95e9, cores_per_device=2),
  'v6e': _Accelerator('TPU v6 lite', 32e9),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices a plan is for.

  Attributes:
    name: as given, e.g. '8xH100', or a description of the present devices.
    device_kind: `jax.Device.device_kind` of the devices.
    num_devices: JAX devices.
    memory_bytes: memory one process can use on each device (GPUs: 75% by
      default), or None where unknown (CPU).
    peak_flops: peak FLOP/s per device in the model's dtype, or None.
  """

  name: str
  device_kind: str
  num_devices: int
  memory_bytes: float | None
  peak_flops: float | None


def _known_targets() -> str:
  """How targets are written, for error messages."""
  return (
    f"'NxGPU' with GPU one of {tuple(_GPUS)} (e.g. '8xH100'), 'TPU-N' with "
    f"TPU one of {tuple(_TPUS)} (e.g. 'v5e-64', 'v4-32': v4 and v5p count "
    "TensorCores, 2 per chip), or '' for the devices present"
  )


def parse_target(target: str, dtype: str) -> Target:
  """The `Target` of a `config.plan.target` string (see `_known_targets`)."""
  if not target:
    return present_target(jax.devices(), dtype)
  gpu = re.fullmatch(r'([1-9]\d*)x([\w-]+)', target, re.IGNORECASE)
  tpu = re.fullmatch(r'(v\d+[a-z]?)-([1-9]\d*)', target, re.IGNORECASE)
  if gpu and gpu[2].upper() in _GPUS:
    spec, count = _GPUS[gpu[2].upper()], int(gpu[1])
    memory = spec.memory_bytes * _GPU_MEMORY_FRACTION
  elif tpu and tpu[1].lower() in _TPUS:
    spec, cores = _TPUS[tpu[1].lower()], int(tpu[2])
    if cores % spec.cores_per_device:
      raise config_lib.ConfigError(
        f'config.plan.target={target!r}: a {tpu[1]} slice counts '
        f'TensorCores, {spec.cores_per_device} per chip; use a multiple of '
        f'{spec.cores_per_device}.'
      )
    count, memory = cores // spec.cores_per_device, spec.memory_bytes
  else:
    raise config_lib.ConfigError(
      f'config.plan.target={target!r} is not a known target; use '
      f'{_known_targets()}.'
    )
  return Target(
    name=target,
    device_kind=spec.device_kind,
    num_devices=count,
    memory_bytes=memory,
    peak_flops=throughput.table_peak_flops(spec.device_kind, dtype),
  )


def present_target(devices: list[jax.Device], dtype: str) -> Target:
  """A `Target` for real devices (memory from the runtime, if it says)."""
  device = devices[0]
  return Target(
    name=f'{len(devices)} × {device.device_kind} (present)',
    device_kind=device.device_kind,
    num_devices=len(devices),
    memory_bytes=device_memory_bytes(devices),
    peak_flops=throughput.peak_flops_per_second(device, dtype),
  )


def device_memory_bytes(devices) -> float | None:
  """The smallest memory limit of this process's `devices`, or None.

  None where the runtime reports none (CPU devices).
  """
  local = [d for d in devices if d.process_index == jax.process_index()]
  stats = [d.memory_stats() for d in local]
  if not stats or any(s is None or 'bytes_limit' not in s for s in stats):
    return None
  return float(min(s['bytes_limit'] for s in stats))


@dataclasses.dataclass(frozen=True)
class StateBytes:
  """Bytes of one device's share of the train state, gradients and teacher.

  Attributes:
    params, opt_state, ema_params, frozen_params: as laid out by the FSDP
      rules (the frozen teacher's params; 0 for the teacher stage).
    grads: one gradient tree, laid out like the params.
    gathered: under FSDP, the rest of the params and teacher params, which
      XLA gathers where a layer needs them; counted whole (an upper bound).
  """

  params: int
  opt_state: int
  ema_params: int
  frozen_params: int
  grads: int
  gathered: int

  def total(self, accumulating: bool) -> int:
    """All of it; `accumulating` adds the running sum of the gradients."""
    grads = self.grads * (2 if accumulating else 1)
    return (
      self.params
      + self.opt_state
      + self.ema_params
      + self.frozen_params
      + grads
      + self.gathered
    )


def _nbytes(tree: Any) -> int:
  return sum(
    int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
  )


def state_bytes(
  params: Any,
  frozen_params: Any,
  tx,
  memory_config: ml_collections.ConfigDict,
  *,
  fsdp: int,
  num_devices: int,
) -> StateBytes:
  """What one of `num_devices` devices holds, with `fsdp` as the fsdp axis.

  `params` and `frozen_params` may be ShapeDtypeStructs; the optimiser state
  is `tx.init`'s, evaluated abstractly.
  """
  sharding.check_fsdp(fsdp, num_devices)
  mesh_shape = {
    sharding.DATA_AXIS: num_devices // fsdp,
    sharding.FSDP_AXIS: fsdp,
  }

  def laid_out(tree):
    specs = sharding.tree_specs(tree, memory_config, fsdp)
    return sharding.bytes_per_device(tree, specs, mesh_shape)

  params_bytes = laid_out(params)
  frozen_bytes = laid_out(frozen_params)
  return StateBytes(
    params=params_bytes,
    opt_state=laid_out(jax.eval_shape(tx.init, params)),
    ema_params=params_bytes,
    frozen_params=frozen_bytes,
    grads=params_bytes,
    gathered=_nbytes((params, frozen_params)) - params_bytes - frozen_bytes,
  )


@dataclasses.dataclass(frozen=True)
class GradientProgram:
  """Temporary bytes and FLOPs of a stage's gradient program on one device.

  Both are linear in the micro-batch b, intercept + per_example · b, fitted
  through two compiled programs (`measure_gradient_program`).
  """

  temp_intercept: float
  temp_per_example: float
  flops_intercept: float
  flops_per_example: float
  backend: str

  def temp_bytes(self, micro_batch: int) -> float:
    return self.temp_intercept + self.temp_per_example * micro_batch

  def flops(self, micro_batch: int) -> float:
    return self.flops_intercept + self.flops_per_example * micro_batch


def batch_maker(
  config: ml_collections.ConfigDict, info: data.DatasetInfo
) -> Callable[[int], dict]:
  """batch size ↦ ShapeDtypeStructs of a training batch as losses take it.

  Images in [−1, 1] (a stage in a latent space encodes them itself) and
  the condition arrays of the config's conditioning (labels, tokens).
  """
  cond_kind = common.build_conditioning(config, info)

  def batch(batch_size: int) -> dict:
    image = jax.ShapeDtypeStruct((batch_size, *info.image_shape), jnp.float32)
    return {'image': image, **cond_kind.abstract(batch_size)}

  return batch


def _abstract(tree: Any) -> Any:
  """Shapes and dtypes only (no sharding): arrays or ShapeDtypeStructs."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def abstract_params(stage: Stage) -> tuple[Any, Any]:
  """(trainable params, frozen params) of `stage` as ShapeDtypeStructs."""
  frozen = _abstract(stage.frozen_params)
  params = jax.eval_shape(stage.init_params, jax.random.PRNGKey(0), frozen)
  return _abstract(params), frozen


def compile_gradient_programs(
  stage: Stage,
  make_batch: Callable[[int], dict],
  micro_batches: tuple[int, ...],
) -> list[jax.stages.Compiled]:
  """value_and_grad of the stage's loss, compiled at each micro-batch.

  For one device of the default backend; nothing runs and nothing the size
  of the model is allocated. XLA compiles a program on one thread, so the
  programs compile side by side (the paper-scale U-Net takes minutes).
  """
  params, frozen = abstract_params(stage)
  grad_fn = jax.jit(jax.value_and_grad(stage.loss_fn, has_aux=True))
  lowered = [
    grad_fn.lower(
      params,
      frozen,
      make_batch(micro_batch),
      jax.random.PRNGKey(0),
    )
    for micro_batch in micro_batches
  ]
  options = CPU_KEEP_REMAT if jax.default_backend() == 'cpu' else None
  with futures.ThreadPoolExecutor(len(lowered)) as pool:
    return list(pool.map(lambda p: p.compile(options), lowered))


def fit_gradient_program(
  micro_batches: tuple[int, int], compiled: list[jax.stages.Compiled]
) -> GradientProgram:
  """The line through two compiled programs' temp bytes and FLOPs."""
  temps = [c.memory_analysis().temp_size_in_bytes for c in compiled]
  flops = [throughput.step_flops(c) for c in compiled]
  first, span = micro_batches[0], micro_batches[1] - micro_batches[0]
  temp_slope = (temps[1] - temps[0]) / span
  flops_slope = (flops[1] - flops[0]) / span
  return GradientProgram(
    temp_intercept=temps[0] - temp_slope * first,
    temp_per_example=temp_slope,
    flops_intercept=flops[0] - flops_slope * first,
    flops_per_example=flops_slope,
    backend=jax.default_backend(),
  )


def measure_gradient_program(
  stage: Stage, make_batch: Callable[[int], dict]
) -> GradientProgram:
  """The stage's gradient program, fitted at MEASURED_MICRO_BATCHES."""
  compiled = compile_gradient_programs(
    stage, make_batch, MEASURED_MICRO_BATCHES
  )
  return fit_gradient_program(MEASURED_MICRO_BATCHES, compiled)


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """One stage's memory and time per device on a target, and what fits."""

  section: str  # The config section: 'teacher', 'guided' or 'distill'.
  batch_size: int
  grad_accum_steps: int
  target: Target
  state: StateBytes
  program: GradientProgram
  assumed_mfu: float

  @property
  def budget_bytes(self) -> float | None:
    """Device memory the plan may fill (all but MEMORY_RESERVE of it)."""
    memory = self.target.memory_bytes
    return None if memory is None else memory * (1 - MEMORY_RESERVE)

  def micro_batch(self, grad_accum_steps: int) -> int:
    """Examples per device in one pass of the gradient program."""
    return self.batch_size // (self.target.num_devices * grad_accum_steps)

  def needed_bytes(self, grad_accum_steps: int) -> float:
    """Peak bytes per device of a step with `grad_accum_steps` passes."""
    return self.state.total(grad_accum_steps > 1) + self.program.temp_bytes(
      self.micro_batch(grad_accum_steps)
    )

  def fits(self, grad_accum_steps: int) -> bool | None:
    """Whether such a step fits the budget; None if memory is unknown."""
    budget = self.budget_bytes
    return (
      None if budget is None else self.needed_bytes(grad_accum_steps) <= budget
    )

  def max_micro_batch(self) -> int | None:
    """The largest micro-batch per device that fits (with accumulation)."""
    if self.budget_bytes is None:
      return None
    free = (
      self.budget_bytes
      - self.state.total(accumulating=True)
      - self.program.temp_intercept
    )
    return max(0, math.floor(free / self.program.temp_per_example))

  def min_grad_accum_steps(self) -> int | None:
    """The fewest micro-batches per step that fit.

    None if none does, or if the device memory is unknown.
    """
    per_device = self.batch_size // self.target.num_devices
    for steps in range(1, per_device + 1):
      if per_device % steps == 0 and self.fits(steps):
        return steps
    return None

  def flops_per_device(self) -> float:
    """FLOPs of one step's gradient programs on one device."""
    steps = self.grad_accum_steps
    return steps * self.program.flops(self.micro_batch(steps))

  def seconds_per_step(self) -> float | None:
    """At `assumed_mfu` of the device's peak; None if the peak is unknown."""
    peak = self.target.peak_flops
    if not peak:
      return None
    return self.flops_per_device() / (peak * self.assumed_mfu)


def build_stage(
  config: ml_collections.ConfigDict, info: data.DatasetInfo, section: str
) -> Stage:
  """The stage of `section`, its teacher as ShapeDtypeStructs (untrained).

  Each kind builds its own (`StageKind.plan_stage`); the halving rounds
  plan their first round, since every round has the same program.
  """
  for kind in registry.for_mode('all', config):
    if kind.section == section and kind.plan_stage:
      stage = kind.plan_stage(config, info)
      if not kind.in_space:
        return stage
      return common.as_trained(
        stage,
        config,
        common.build_space(config, info),
        common.abstract_space_params(config, info),
      )
  raise ValueError(f'section={section!r}; planned: {sections(config)}.')


def check_splits(
  config: ml_collections.ConfigDict, section: str, target: Target
) -> None:
  """The FSDP axis and the stage's micro-batches divide the target's devices."""
  num_devices = target.num_devices
  sharding.check_fsdp(config.memory.fsdp, num_devices)
  train_config = config[section]
  parts = num_devices * train_config.grad_accum_steps
  if train_config.batch_size % parts:
    raise config_lib.ConfigError(
      f'config.{section}.batch_size={train_config.batch_size} does not '
      f'split into {train_config.grad_accum_steps} micro-batches '
      f'(grad_accum_steps) over the {num_devices} devices of '
      f'{target.name}; use a multiple of {parts}.'
    )


def plan_stage(
  config: ml_collections.ConfigDict,
  section: str,
  stage: Stage,
  program: GradientProgram,
  target: Target,
) -> StagePlan:
  """The `StagePlan` of `stage` (of config section `section`) on `target`."""
  train_config = config[section]
  params, frozen = abstract_params(stage)
  tx = optim.make_optimizer(
    train_config.optimizer, train_config.num_train_steps
  )
  return StagePlan(
    section=section,
    batch_size=train_config.batch_size,
    grad_accum_steps=train_config.grad_accum_steps,
    target=target,
    state=state_bytes(
      params,
      frozen,
      tx,
      config.memory,
      fsdp=config.memory.fsdp,
      num_devices=target.num_devices,
    ),
    program=program,
    assumed_mfu=config.plan.assumed_mfu,
  )


def measure_stages(
  config: ml_collections.ConfigDict,
) -> dict[str, tuple[Stage, GradientProgram]]:
  """Each training stage and its measured gradient program (compiles 2 each).

  The measurement does not depend on the target, so one serves many.
  """
  info = data.get_info(config.data)
  make_batch = batch_maker(config, info)
  measured = {}
  for section in sections(config):
    stage = build_stage(config, info, section)
    measured[section] = (stage, measure_gradient_program(stage, make_batch))
  return measured


def print_plan(config: ml_collections.ConfigDict) -> None:
  """`--mode=plan`: prints every training stage's plan on the target."""
  target = parse_target(config.plan.target, config.model.dtype)
  for section in sections(config):
    check_splits(config, section, target)
  plans = [
    plan_stage(config, section, stage, program, target)
    for section, (stage, program) in measure_stages(config).items()
  ]
  print(format_plan(config, target, plans))


def _gb(num_bytes: float | None) -> str:
  """Bytes in GB (1e9) to 3 significant digits."""
  return '?' if num_bytes is None else f'{num_bytes / 1e9:.3g}'


_COLUMNS = (
  'stage',
  'batch',
  'accum',
  'micro-batch/device',
  'params',
  'opt state',
  'EMA',
  'teacher',
  'grads',
  'gathered',
  'act/example',
  'activations',
  'total/device',
  'fits',
  'max micro-batch',
  'min accum',
  'TFLOP/step/device',
  's/step',
)


def _or_unknown(value: Any) -> str:
  return '?' if value is None else str(value)


def _row(plan: StagePlan) -> tuple[str, ...]:
  steps = plan.grad_accum_steps
  state, program = plan.state, plan.program
  micro_batch = plan.micro_batch(steps)
  fits = {None: '?', True: 'yes', False: 'NO'}[plan.fits(steps)]
  return (
    plan.section,
    str(plan.batch_size),
    str(steps),
    str(micro_batch),
    _gb(state.params),
    _gb(state.opt_state),
    _gb(state.ema_params),
    _gb(state.frozen_params),
    _gb(state.grads * (2 if steps > 1 else 1)),
    _gb(state.gathered),
    _gb(program.temp_per_example),
    _gb(program.temp_bytes(micro_batch)),
    _gb(plan.needed_bytes(steps)),
    fits,
    _or_unknown(plan.max_micro_batch()),
    _or_unknown(None if fits == '?' else plan.min_grad_accum_steps() or 'none'),
    f'{plan.flops_per_device() / 1e12:.3g}',
    _or_unknown(plan.seconds_per_step() and f'{plan.seconds_per_step():.3g}'),
  )


def format_plan(
  config: ml_collections.ConfigDict, target: Target, plans: list[StagePlan]
) -> str:
  """The plan as notes and a markdown table (GB = 1e9 bytes)."""
  fsdp = config.memory.fsdp
  peak = target.peak_flops
  memory = target.memory_bytes
  budget = plans[0].budget_bytes
  notes = [
    f'Target {target.name}: {target.num_devices} × {target.device_kind}, '
    f'{_gb(memory)} GB per device usable, {_gb(budget)} GB planned '
    f'({MEMORY_RESERVE:.0%} reserve); mesh data={target.num_devices // fsdp}'
    f' × fsdp={fsdp}.',
    f'Model dtype {config.model.dtype}, remat {config.memory.remat!r}; peak '
    + ('unknown' if not peak else f'{peak / 1e12:.0f} TFLOP/s per device')
    + f'; s/step at {config.plan.assumed_mfu:.0%} of peak.',
    f'Activations: temp bytes of the gradient program compiled on '
    f'{plans[0].program.backend} for one device at micro-batches '
    f'{MEASURED_MICRO_BATCHES}, extrapolated linearly (intercept + slope · '
    'micro-batch). XLA:CPU computes bfloat16 in float32: on CPU, bfloat16 '
    'activations are an upper bound for TPU/GPU.',
    'State per device under the FSDP rules; grads doubled with accumulation '
    '(running sum); gathered = params XLA gathers under FSDP, counted whole '
    '(an upper bound). GB = 1e9 bytes.',
  ]
  if memory is not None and target.device_kind.startswith('NVIDIA'):
    notes.append(
      f'GPUs: a JAX process allocates {_GPU_MEMORY_FRACTION:.0%} of the '
      'memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION).'
    )
  rows = [_COLUMNS, tuple('---' for _ in _COLUMNS)]
  rows += [_row(plan) for plan in plans]
  table = '\n'.join('| ' + ' | '.join(row) + ' |' for row in rows)
  return '\n'.join(notes) + '\n\n' + table


def require_fits(plan: StagePlan, config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError, naming the knobs, if the planned step does not fit."""
  steps = plan.grad_accum_steps
  if plan.fits(steps) is not False:
    return
  section, target = plan.section, plan.target
  micro_batch = plan.micro_batch(steps)
  min_steps = plan.min_grad_accum_steps()
  accum_hint = f'{min_steps} fits' if min_steps else 'no value fits alone'
  raise config_lib.ConfigError(
    f'[{section}] a training step needs about '
    f'{_gb(plan.needed_bytes(steps))} GB per device '
    f'({_gb(plan.state.total(steps > 1))} GB of params, optimiser state, '
    f'EMA, teacher and gradients; {_gb(plan.program.temp_bytes(micro_batch))}'
    f' GB of activations for {micro_batch} examples per device), more than '
    f'the {_gb(plan.budget_bytes)} GB planned per {target.device_kind} '
    f'({_gb(target.memory_bytes)} GB less a {MEMORY_RESERVE:.0%} reserve). '
    f'Lower it with config.{section}.grad_accum_steps (now {steps}; '
    f'{accum_hint}), config.memory.remat (now {config.memory.remat!r}; '
    "'full' keeps the fewest activations), config.model.dtype (now "
    f"{config.model.dtype!r}; 'bfloat16' halves most activations) or "
    f'config.memory.fsdp (now {config.memory.fsdp}; up to '
    f'{target.num_devices} splits the state over more devices). '
    '--mode=plan shows the estimate per stage.'
  )


def check_fits(
  config: ml_collections.ConfigDict,
  stage: Stage,
  section: str,
  mesh: jax.sharding.Mesh,
) -> None:
  """Fails before a stage compiles at full size if it cannot fit.

  `mesh` is the training mesh (`sharding.mesh_for(config)`); `section` is
  the stage's config section ('teacher', 'guided' or 'distill'). Compiles
  the stage's gradient program twice at small micro-batches on the mesh's
  backend (`measure_gradient_program`); does nothing where the devices
  report no memory size (CPU).

  Raises:
    ConfigError: the estimated bytes per device exceed the devices' memory
      less MEMORY_RESERVE; names the knobs that lower it.
  """
  devices = list(mesh.devices.flat)
  if device_memory_bytes(devices) is None:
    return
  target = present_target(devices, config.model.dtype)
  info = data.get_info(config.data)
  program = measure_gradient_program(stage, batch_maker(config, info))
  require_fits(plan_stage(config, section, stage, program, target), config)
