"""report.json of a fixed set of run directories must not drift.

The work directory of `fake_workdirs.make_kfold_workdir` (2 repeats x 3 folds, 2 regimes x 2
models, a LEAKY paper-protocol run, two GAN directories) is built from fixed random numbers,
and its report is compared, number by number, with tests/golden/report_kfold.json. A change
of how cells are pooled, bootstrapped, compared, ordered or labelled shows up here, whichever
module it happens in. Only what depends on the machine or the moment is left out.

After a deliberate change of the report, regenerate the golden file with
  WBC_JAX_UPDATE_GOLDEN=1 python -m pytest tests/test_report_golden.py
and say why in the commit.
"""

import json
import math
import os

from fake_workdirs import make_kfold_workdir
from wbc_jax import report

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden', 'report_kfold.json')
# The header fields that depend on where, when and with what software the report was built.
VOLATILE_HEADER = ('workdir', 'rebuild', 'versions', 'machine', 'generated')
VOLATILE_RUNS = ('first_completed', 'last_completed')


def _stable(data: dict) -> dict:
  data = json.loads(json.dumps(data))
  header = data['header']
  for key in VOLATILE_HEADER:
    header.pop(key)
  for key in VOLATILE_RUNS:
    header['runs'].pop(key)
  return data


def _assert_same(got, want, path='report.json'):
  if isinstance(want, dict):
    assert isinstance(got, dict), path
    assert sorted(got) == sorted(want), f'{path}: keys {sorted(got)} != {sorted(want)}'
    for key in want:
      _assert_same(got[key], want[key], f'{path}.{key}')
  elif isinstance(want, list):
    assert isinstance(got, list) and len(got) == len(want), f'{path}: {got!r} != {want!r}'
    for i, (g, w) in enumerate(zip(got, want)):
      _assert_same(g, w, f'{path}[{i}]')
  elif isinstance(want, float) and not isinstance(got, bool):
    # Room for the last bits of a sum on another CPU, none for a changed number.
    assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-9,
                                                          abs_tol=1e-12), f'{path}: {got} != {want}'
  else:
    assert got == want and type(got) is type(want), f'{path}: {got!r} != {want!r}'


def test_report_json_matches_golden(tmp_path):
  workdir = make_kfold_workdir(tmp_path / 'kfold')
  data = _stable(report.write_report(workdir, n_boot=200, seed=0, log=lambda s: None))
  if os.environ.get('WBC_JAX_UPDATE_GOLDEN'):
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, 'w') as f:
      json.dump(data, f, indent=1, sort_keys=True)
      f.write('\n')
  with open(GOLDEN) as f:
    golden = json.load(f)
  _assert_same(data, golden)


def test_golden_check_catches_a_changed_number():
  with open(GOLDEN) as f:
    golden = json.load(f)
  changed = json.loads(json.dumps(golden))
  changed['cells'][0]['pooled']['balanced_accuracy']['point'] += 1e-6
  try:
    _assert_same(changed, golden)
  except AssertionError as e:
    assert 'pooled.balanced_accuracy.point' in str(e)
  else:
    raise AssertionError('a changed number passed the golden comparison')
