"""The condition pytree: null, dropout to null, requests, grids, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdd import conditioning

KIND = conditioning.ClassConditioning(num_classes=10)


def test_null_is_the_last_class_embedding_row():
  cond = {'label': jnp.array([0, 3, 9], jnp.int32)}
  null = KIND.null_like(cond)
  np.testing.assert_array_equal(null['label'], [10, 10, 10])
  assert null['label'].dtype == jnp.int32


def test_drop_to_null_replaces_labels_with_probability_p():
  cond = {'label': jnp.arange(4000, dtype=jnp.int32) % 10}
  rng = jax.random.PRNGKey(0)
  dropped = KIND.drop_to_null(cond, rng, 0.1)['label']
  # The same Bernoulli draw as the teacher's label dropout always used.
  drop = jax.random.bernoulli(rng, 0.1, (4000,))
  np.testing.assert_array_equal(dropped, jnp.where(drop, 10, cond['label']))
  assert 0.08 < float(jnp.mean(dropped == 10)) < 0.12


def test_select_broadcasts_the_per_example_choice_over_leaves():
  cond = {'label': jnp.array([1, 2]), 'text': jnp.ones((2, 3, 4))}
  other = {'label': jnp.array([7, 8]), 'text': jnp.zeros((2, 3, 4))}
  out = conditioning.select(jnp.array([True, False]), cond, other)
  np.testing.assert_array_equal(out['label'], [1, 8])
  np.testing.assert_array_equal(out['text'][0], 1.0)
  np.testing.assert_array_equal(out['text'][1], 0.0)


def test_concat_take_and_padding():
  cond = {'label': np.array([4, 5, 6], np.int32)}
  both = conditioning.concat(cond, KIND.null_like(cond))
  np.testing.assert_array_equal(both['label'], [4, 5, 6, 10, 10, 10])
  assert conditioning.batch_size(both) == 6
  padded = conditioning.pad_to_multiple(cond, 8)
  np.testing.assert_array_equal(padded['label'], [4, 5, 6, 6, 6, 6, 6, 6])
  np.testing.assert_array_equal(
    conditioning.take(padded, 1, 3)['label'], [5, 6]
  )


def test_cycled_and_grid_conditions():
  np.testing.assert_array_equal(KIND.cycled(12)['label'], [*range(10), 0, 1])
  cond, rows = KIND.grid(per_row=2, max_rows=3)
  np.testing.assert_array_equal(cond['label'], [0, 0, 1, 1, 2, 2])
  assert rows == 3
  assert KIND.grid(per_row=1, max_rows=20)[1] == 10


def test_requests_accept_labels_or_a_cond_dict():
  for request in ([1, 2], np.array([1, 2]), {'label': [1, 2]}):
    cond = KIND.from_request(request)
    np.testing.assert_array_equal(cond['label'], [1, 2])
    assert cond['label'].dtype == np.int32


@pytest.mark.parametrize(
  'request_, match',
  [
    ([10], r'in \[0, 10\)'),
    ([-1], r'in \[0, 10\)'),
    ([[1, 2]], 'shape'),
    ([], 'non-empty'),
    ([1.5], 'float'),
    ({'label': [1], 'text': [2]}, 'keys'),
  ],
)
def test_bad_requests_say_what_is_allowed(request_, match):
  with pytest.raises(conditioning.CondError, match=match):
    KIND.from_request(request_)


def test_saved_arrays_and_abstract_shapes():
  cond = KIND.cycled(3)
  np.testing.assert_array_equal(KIND.saved_arrays(cond)['labels'], [0, 1, 2])
  spec = KIND.abstract(4)['label']
  assert spec.shape == (4,) and spec.dtype == jnp.int32
