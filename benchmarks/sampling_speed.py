r"""Wall time of the CFG teacher at many steps against the few-step student.

  python benchmarks/sampling_speed.py --config=configs/digits.py \
      --workdir=workdirs/digits [--update_eval]

Runs the speed part of `--mode=evaluate` alone (`config.evaluate.speed_*`:
batch size, teacher step counts, student step count) on this machine's
devices and prints the table. With --update_eval it also replaces the speed
section of an existing `WORKDIR/eval/results.json` and re-renders
results.md, so the speed can be re-timed without re-scoring every row.
"""

from absl import app, flags
from ml_collections import config_flags

from gdd import config_lib, workdir_lib
from gdd.evaluation import evaluate, report

_CONFIG = config_flags.DEFINE_config_file('config', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished run.')
_UPDATE_EVAL = flags.DEFINE_bool(
  'update_eval', False, "Replace the speed section of the workdir's results."
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate(config)
  speed = evaluate.measure_speed(config, _WORKDIR.value)
  if speed is None:
    return
  print(f'device: {evaluate.device_description()}')
  print(report.speed_table(speed))
  if _UPDATE_EVAL.value:
    out_dir = workdir_lib.eval_dir(_WORKDIR.value)
    results = report.read(out_dir)
    results['speed'] = speed
    report.write(results, out_dir)
    print(f'updated {out_dir}/results.json and results.md')


if __name__ == '__main__':
  app.run(main)
