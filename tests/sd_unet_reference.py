"""diffusers' UNet2DConditionModel outputs that `SDUNet` must reproduce.

`sd_unet_reference.json` holds, for each config of `CONFIGS`, the state-dict
keys and shapes of diffusers' UNet2DConditionModel built with that config,
and its output on `inputs()` with the weights `weights()`, converted to
PyTorch's layout by `SDUNet`'s param-name rule (gdd/models/sd_unet.py).
`tests/test_sd_unet.py` checks the names, shapes and outputs against it
without diffusers. To regenerate (torch and diffusers, neither of them a
gdd dependency, in a separate folder):

  pip download diffusers==0.42.1 --no-deps -d /tmp/d && \
    unzip -q /tmp/d/diffusers-*.whl -d /tmp/diffusers && \
    PYTHONPATH=/tmp/diffusers python -m tests.sd_unet_reference

Weights and inputs come from a closed-form hash rather than a random number
generator, so the reference stays valid whatever the numpy or JAX version.
"""

import json
import math
import os
import re

import flax
import jax
import numpy as np

from gdd.models import sd_unet

PATH = os.path.join(os.path.dirname(__file__), 'sd_unet_reference.json')

# Both projections, per-block heads whose reversal the up path must apply,
# 1 and 2 transformer layers, both sinusoid orders and a class embedding.
CONFIGS = {
  'sd1_like': sd_unet.SDUNetConfig(
    sample_size=8,
    in_channels=4,
    mean_type='eps',
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    down_block_types=(
      'CrossAttnDownBlock2D',
      'CrossAttnDownBlock2D',
      'DownBlock2D',
    ),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    cross_attention_dim=12,
    attention_head_dim=(2, 4, 8),
    norm_num_groups=8,
    num_class_embeds=3,
  ),
  'sd2_like': sd_unet.SDUNetConfig(
    sample_size=8,
    in_channels=4,
    mean_type='eps',
    block_out_channels=(16, 32),
    layers_per_block=2,
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
    cross_attention_dim=8,
    attention_head_dim=4,
    transformer_layers_per_block=2,
    use_linear_projection=True,
    norm_num_groups=4,
    flip_sin_to_cos=False,
    freq_shift=1,
  ),
}
BATCH, TOKENS = 2, 3
LOGSNR = np.array([-3.0, 2.5], np.float32)


def _hash_noise(size: int, offset: int) -> np.ndarray:
  """`size` values spread over [−√3, √3] (std ≈ 1), fixed by `offset`."""
  i = np.arange(offset, offset + size, dtype=np.float64)
  uniform = np.mod(np.sin(i * 12.9898 + 78.233) * 43758.5453, 1.0)
  return ((2.0 * uniform - 1.0) * math.sqrt(3.0)).astype(np.float32)


def weights(param_shapes: dict) -> dict:
  """Params of the given shapes: fan-in scaled kernels, norms near 1.

  Every param is non-zero (the zero-initialised layers too), so every path
  of the network shows in the output.
  """
  flat = flax.traverse_util.flatten_dict(param_shapes)
  params, offset = {}, 0
  for path in sorted(flat):
    shape = tuple(flat[path].shape)
    noise = _hash_noise(math.prod(shape), offset).reshape(shape)
    offset += noise.size
    if path[-1] == 'kernel':
      value = noise / math.sqrt(math.prod(shape[:-1]))
    elif path[-1] == 'scale':
      value = 1.0 + 0.1 * noise
    elif path[-1] == 'embedding':
      value = noise
    else:
      value = 0.1 * noise
    params[path] = value
  return flax.traverse_util.unflatten_dict(params)


def inputs(config: sd_unet.SDUNetConfig) -> dict:
  """z, logsnr, context and (if the config has classes) labels."""
  size = config.sample_size
  z_shape = (BATCH, size, size, config.in_channels)
  context_shape = (BATCH, TOKENS, config.cross_attention_dim)
  result = {
    'z': _hash_noise(math.prod(z_shape), 10**7).reshape(z_shape),
    'logsnr': LOGSNR,
    'context': _hash_noise(math.prod(context_shape), 2 * 10**7).reshape(
      context_shape
    ),
  }
  if config.num_class_embeds is not None:
    labels = np.arange(BATCH, dtype=np.int32)
    result['labels'] = labels % config.num_class_embeds
  return result


def flax_path(torch_key: str, ndim: int) -> tuple[str, ...]:
  """The Flax param path of a PyTorch state-dict key (sd_unet.py's rule).

  `ndim` is the PyTorch tensor's: a 1-D `weight` is a norm's scale.
  """
  *modules, leaf = re.sub(r'\.(\d+)(?=\.)', r'_\1', torch_key).split('.')
  if leaf == 'bias':
    return (*modules, 'bias')
  if modules[-1] == 'class_embedding':
    return (*modules, 'embedding')
  return (*modules, 'scale' if ndim == 1 else 'kernel')


def torch_value(value: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
  """A Flax param in PyTorch's layout (conv OIHW, linear [out, in])."""
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2 and value.shape[::-1] == tuple(torch_shape):
    return value.T
  # class_embedding: diffusers has no row for the null label K.
  return value[: torch_shape[0]]


def param_shapes(config: sd_unet.SDUNetConfig) -> dict:
  """The `SDUNet` param tree of `config`, as shapes (nothing computed)."""
  x = inputs(config)
  return jax.eval_shape(
    lambda: sd_unet.SDUNet(config).init(
      jax.random.key(0),
      x['z'],
      x['logsnr'],
      x['context'],
      x.get('labels'),
      train=False,
    )['params']
  )


def load() -> dict:
  """The reference: {config name: {'params': {key: shape}, 'output': …}}."""
  with open(PATH, encoding='utf-8') as f:
    return json.load(f)


def _diffusers_kwargs(config: sd_unet.SDUNetConfig) -> dict:
  """UNet2DConditionModel's arguments for the same network."""
  same = [
    'sample_size',
    'in_channels',
    'block_out_channels',
    'layers_per_block',
    'down_block_types',
    'up_block_types',
    'cross_attention_dim',
    'attention_head_dim',
    'transformer_layers_per_block',
    'use_linear_projection',
    'norm_num_groups',
    'norm_eps',
    'num_class_embeds',
    'flip_sin_to_cos',
    'freq_shift',
    'dropout',
  ]
  kwargs = {name: getattr(config, name) for name in same}
  return {**kwargs, 'out_channels': config.out_channels}


def _diffusers_output(config: sd_unet.SDUNetConfig) -> tuple[dict, np.ndarray]:
  """diffusers' state-dict shapes and output, with `weights()` loaded."""
  # Imported here: neither is a gdd dependency.
  import diffusers
  import torch

  model = diffusers.UNet2DConditionModel(**_diffusers_kwargs(config)).eval()
  flat = flax.traverse_util.flatten_dict(weights(param_shapes(config)))
  state, used = {}, set()
  for key, tensor in model.state_dict().items():
    path = flax_path(key, tensor.ndim)
    used.add(path)
    value = torch_value(np.asarray(flat[path]), tuple(tensor.shape))
    state[key] = torch.from_numpy(np.ascontiguousarray(value))
  assert used == set(flat), set(flat) ^ used
  # strict: every key present, and PyTorch checks every shape.
  model.load_state_dict(state, strict=True)
  x = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs(config).items()}
  with torch.no_grad():
    out = model(
      x['z'].permute(0, 3, 1, 2),
      torch.tensor(np.asarray(sd_unet.timesteps(x['logsnr'].numpy()))),
      encoder_hidden_states=x['context'],
      class_labels=x['labels'].long() if 'labels' in x else None,
    ).sample
  shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
  return shapes, out.permute(0, 2, 3, 1).numpy()


def main() -> None:
  """Writes `PATH` from diffusers (see the module docstring)."""
  reference = {}
  for name, config in CONFIGS.items():
    shapes, output = _diffusers_output(config)
    reference[name] = {
      'params': shapes,
      'output_shape': list(output.shape),
      'output': [float(f'{v:.7g}') for v in output.ravel()],
    }
  text = json.dumps(reference, indent=1)
  # One line per list: a shape, or the output.
  text = re.sub(r'\[[^][{}]*\]', lambda m: ''.join(m.group().split()), text)
  with open(PATH, 'w', encoding='utf-8') as f:
    f.write(text + '\n')


if __name__ == '__main__':
  main()
