"""Test set-up: 8 fake CPU devices, so sharded code runs as on a pod slice.

The flag must be set before JAX initialises its backends, hence here.
"""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after the flags above)

# Stages rebuilt from the same config compile to the same programs; a
# persistent cache lets the tests reuse them instead of recompiling.
jax.config.update(
  'jax_compilation_cache_dir',
  os.path.join(os.path.dirname(__file__), '..', '.pytest_cache', 'jax'),
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
