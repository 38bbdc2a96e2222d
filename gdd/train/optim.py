"""The optax chain of a stage, built from its `optimizer` config block."""

import jax
import ml_collections
import optax


def learning_rate_schedule(
  opt_config: ml_collections.ConfigDict, num_train_steps: int
) -> optax.Schedule:
  """Linear warm-up from 0, then constant, cosine-to-0 or linear-to-0."""
  peak = opt_config.learning_rate
  warmup = int(opt_config.warmup_steps)
  decay_steps = max(num_train_steps - warmup, 1)
  if opt_config.decay == 'constant':
    after = optax.constant_schedule(peak)
  elif opt_config.decay == 'cosine':
    after = optax.cosine_decay_schedule(peak, decay_steps)
  elif opt_config.decay == 'linear':
    after = optax.linear_schedule(peak, 0.0, decay_steps)
  else:
    raise ValueError(f'Unknown learning-rate decay {opt_config.decay!r}.')
  if warmup == 0:
    return after
  return optax.join_schedules(
    [optax.linear_schedule(0.0, peak, warmup), after], boundaries=[warmup]
  )


def make_optimizer(
  opt_config: ml_collections.ConfigDict,
  num_train_steps: int,
  frozen: tuple[str, ...] = (),
) -> optax.GradientTransformation:
  """Global-norm clipping (if > 0) followed by Adam or AdamW.

  `frozen` names top-level params subtrees (e.g. a pretrained or
  teacher-trained 'text_encoder') that are never updated: no update, no
  weight decay, no optimiser state, and their gradients do not count in
  the clipping norm.
  """
  optimizer = _train_all(opt_config, num_train_steps)
  if not frozen:
    return optimizer
  return optax.multi_transform(
    {'train': optimizer, 'frozen': optax.set_to_zero()},
    lambda params: {
      key: jax.tree.map(
        lambda _, k=key: 'frozen' if k in frozen else 'train', value
      )
      for key, value in params.items()
    },
  )


def _train_all(
  opt_config: ml_collections.ConfigDict, num_train_steps: int
) -> optax.GradientTransformation:
  """The chain of `make_optimizer` over every param."""
  schedule = learning_rate_schedule(opt_config, num_train_steps)
  kwargs = dict(b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps)
  if opt_config.name == 'adam':
    optimizer = optax.adam(schedule, **kwargs)
  elif opt_config.name == 'adamw':
    optimizer = optax.adamw(
      schedule, weight_decay=opt_config.weight_decay, **kwargs
    )
  else:
    raise ValueError(f'Unknown optimizer {opt_config.name!r}.')
  if opt_config.grad_clip_norm > 0:
    return optax.chain(
      optax.clip_by_global_norm(opt_config.grad_clip_norm), optimizer
    )
  return optimizer
