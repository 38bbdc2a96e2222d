"""gdd: distillation of classifier-free-guided diffusion models in JAX/Flax."""

import pathlib

import setuptools

# Only `python -m gdd.evaluation.convert_inception` (torch.load) needs torch.
_TORCH = 'torch>=2.0,<3'
# Only CLIP's BPE (Stable Diffusion's tokenizer files) needs tokenizers.
_TOKENIZERS = 'tokenizers>=0.23,<0.24'

setuptools.setup(
  name='gdd',
  version='0.1.0',
  description=(
    'Guided diffusion distillation (Meng et al., CVPR 2023) in JAX/Flax: '
    'CFG teacher, w-conditioned student, progressive distillation.'
  ),
  long_description=pathlib.Path(__file__)
  .with_name('README.md')
  .read_text('utf-8'),
  long_description_content_type='text/markdown',
  license='Apache-2.0',
  packages=setuptools.find_packages(include=['gdd', 'gdd.*']),
  python_requires='>=3.10',
  install_requires=[
    'absl-py>=2.1,<3',
    'chex>=0.1.90,<0.2',
    'clu>=0.0.12,<0.1',
    # epath: one path API for local folders and gs:// (gdd/paths.py).
    'etils[epath]>=1.15,<2',
    'flax>=0.12.8,<0.13',
    'jax>=0.10.2,<0.11',
    'matplotlib>=3.8,<4',
    'ml-collections>=1.1,<2',
    # bfloat16 in numpy: reading Stable Diffusion safetensors (gdd/weights).
    'ml-dtypes>=0.5,<1',
    'numpy>=2.0,<3',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'pillow>=10,<14',
    'scikit-learn>=1.5,<2',
    'scipy>=1.11,<2',
    # clu's metric writers need TensorFlow and, since TF 2.21, tensorboard.
    'tensorboard>=2.20,<3',
    'tensorflow-cpu>=2.21,<2.22',
    'tensorflow-datasets>=4.9.10,<5',
  ],
  extras_require={
    # Orbax reads gs:// bucket metadata through google-cloud-storage; not in
    # constraints.txt: no bucket is reachable where gdd is tested.
    'gcs': ['google-cloud-storage>=3,<4'],
    # Converts pytorch-fid's FID Inception weights to the .npz gdd loads.
    'convert': [_TORCH],
    # CLIP tokenization: text models on free captions (config.text
    # .tokenizer='clip'), Stable Diffusion's tokenizer/ files.
    'clip': [_TOKENIZERS],
    'test': [
      'ipykernel>=6,<8',
      'nbclient>=0.10,<0.12',
      'nbformat>=5.10,<6',
      'pytest>=8,<10',
      # Runs the suite on two workers (README command 2).
      'pytest-xdist>=3.6,<4',
      'ruff>=0.8,<0.18',
      # The converter's tests (tests/test_inception.py); a CPU build.
      _TORCH,
      _TOKENIZERS,
      # The reference implementations gdd's SD networks and weight loading
      # are tested against (tests/test_weights.py, test_sd_unet.py); and
      # the reference safetensors writer. Never imported by gdd itself.
      'diffusers>=0.42,<0.43',
      'safetensors>=0.8,<0.9',
      'transformers>=5.24,<6',
    ],
  },
)
