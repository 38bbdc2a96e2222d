"""The stage registry: every kind's declaration is complete and consistent."""

import pytest

from gdd import config_lib, pipeline, plan, sampling
from gdd.evaluation import evaluate
from gdd.stages import registry


def test_config_knows_exactly_the_registered_kinds():
  assert config_lib.STAGES == registry.NAMES
  assert set(config_lib.TRAINING_KEYS) == set(registry.NAMES)
  config = config_lib.base_config()
  for kind in registry.KINDS:
    assert kind.section in config, kind.name


def test_kinds_declare_modes_inputs_and_samplers():
  modes = [kind.mode for kind in registry.KINDS]
  assert len(set(modes)) == len(modes)
  assert set(modes) <= set(pipeline.MODES)
  seen = set()
  for kind in registry.KINDS:
    # Every input is declared before the kind that needs it.
    assert kind.needs is None or kind.needs in seen, kind.name
    seen.add(kind.name)
    assert set(kind.samplers) <= set(config_lib.SAMPLERS), kind.name
    assert set(kind.series) <= set(kind.samplers), kind.name


def test_modes_run_their_kinds_in_chain_order():
  assert [k.name for k in registry.for_mode('all')] == [
    'autoencoder',
    'teacher',
    'guided',
    'distill',
  ]
  assert [k.name for k in registry.for_mode('distill_single_w')] == ['single_w']
  assert plan.STAGE_SECTIONS == ('autoencoder', 'teacher', 'guided', 'distill')


def test_the_autoencoder_is_a_stage_of_latent_configs_only():
  config = config_lib.base_config()
  assert 'autoencoder' not in [k.name for k in registry.for_mode('all', config)]
  assert registry.for_mode('autoencoder', config) == []
  config.space = 'latent'
  assert [k.name for k in registry.for_mode('all', config)][0] == 'autoencoder'


def test_nfe_counts_the_cfg_pair_of_the_teacher_only():
  assert registry.nfe('teacher', 8) == 16
  for name in ('guided', 'distill', 'single_w'):
    assert registry.nfe(name, 8) == 8
  assert evaluate.Row('teacher', 'ddim', 4).nfe == 8
  assert evaluate.Row(evaluate.REAL, 'test', 0).nfe == 0


def test_unknown_kind_lists_the_known_ones():
  with pytest.raises(registry.UnknownStageError, match="'single_w'"):
    registry.get('student')


def test_empty_workdir_offers_no_rows(tmp_path):
  config = config_lib.base_config()
  assert evaluate.plan_rows(config, str(tmp_path)) == []


@pytest.mark.parametrize('kind', registry.KINDS, ids=registry.NAMES)
def test_every_declared_function_runs_on_an_empty_workdir(kind, tmp_path):
  config = config_lib.base_config()
  workdir = str(tmp_path)
  assert kind.eval_rows(config.evaluate, workdir) == []
  summary = kind.summary(config, workdir)
  assert summary is None or isinstance(summary, str)
  low, high = kind.w_range(config, 1.0)
  assert 0 <= low <= high
  for sampler in kind.samplers:
    try:
      folder = kind.sampler_folder(workdir, 4, sampler, 1.0)
    except sampling.SampleRequestError as error:
      assert 'none' in str(error)  # Names what exists: nothing yet.
    else:
      assert folder == kind.name
