"""scripts/publish_report.py: what a published copy of a report keeps and leaves out."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import publish_report  # noqa: E402


def _touch(path, text='x'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def test_copies_linked_metric_files_and_leaves_out_real_cell_figures(tmp_path, capsys):
  work, out = tmp_path / 'work', tmp_path / 'out'
  gan = 'crop/r0_k0/gan_cond'
  report = ('![a](report/chart.png) [c](config.json) ![s](%s/samples/step_000300.png) '
            '[f](%s/closest_pairs_pixel.png) [g](%s/real_vs_synthetic.png) '
            '![l](crop/r0_k0/original/cnn/learning_curves.png) [w](https://example.org/x.png)'
            % (gan, gan, gan))
  _touch(str(work / 'REPORT.md'), report)
  for rel in ['report/chart.png', 'report/report.json', 'config.json', 'crop/splits.json',
              f'{gan}/samples/step_000300.png', f'{gan}/closest_pairs_pixel.png',
              f'{gan}/real_vs_synthetic.png', f'{gan}/measures.json', f'{gan}/synthetic.npz',
              'crop/r0_k0/original/cnn/learning_curves.png',
              'crop/r0_k0/original/cnn/predictions.npz']:
    _touch(str(work / rel))
  assert publish_report.main(['--workdir', str(work), '--out', str(out)]) == 0
  kept = sorted(os.path.relpath(os.path.join(d, f), out)
                for d, _, files in os.walk(out) for f in files)
  assert kept == sorted(['REPORT.md', 'config.json', 'crop/splits.json', 'report/chart.png',
                         'report/report.json', f'{gan}/samples/step_000300.png',
                         f'{gan}/measures.json', 'crop/r0_k0/original/cnn/learning_curves.png'])
  printed = capsys.readouterr().out
  assert f'left out (shows real cells): {gan}/real_vs_synthetic.png' in printed


def test_missing_report_is_a_clear_error(tmp_path, capsys):
  assert publish_report.main(['--workdir', str(tmp_path), '--out', str(tmp_path / 'o')]) == 2
  assert 'REPORT.md not found' in capsys.readouterr().err
