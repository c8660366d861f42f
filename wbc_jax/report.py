r"""The report: `python -m wbc_jax.report --workdir=DIR` writes DIR/REPORT.md.

Built only from the files a finished ablation leaves in its work directory (config.json,
<view>/splits.json, each run's results.json, predictions.npz and learning curves, the GAN
directories), so it can be rebuilt at any time without training. Figures go to DIR/report/,
and DIR/report/report.json holds every number REPORT.md prints.

It writes; the numbers come from the library: runs are found through `wbc_jax.rundir`, grouped
into cells (one view, protocol, regime and model over its splits and seeds), pooled and compared
by `wbc_jax.cells` (see there what each number is), with `wbc_jax.metrics` and
`wbc_jax.stats`; the figures are `wbc_jax.plots`'s. Runs of the paper's leaky protocol are
reported in their own section, labelled LEAKY, and never enter the honest tables or tests.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import itertools
import json
import os
import platform
import shlex
from collections.abc import Callable, Sequence

from wbc_jax import cells as cells_lib
from wbc_jax import located
from wbc_jax import names
from wbc_jax import paper_results
from wbc_jax import plots
from wbc_jax import rundir
from wbc_jax import utils

# The synthetic-data measures shown in REPORT.md when present (wbc_jax.measures writes
# them); everything else stays in the linked measures.json.
HEADLINE_MEASURES = ('kid.overall.mean', 'kid.overall.std', 'fid.overall',
                     'memorisation.feature.overall.median_ratio',
                     'memorisation.pixel.overall.median_ratio',
                     'memorisation.feature.overall.nearest_real_same_class',
                     'cas.accuracy_mean', 'cas.balanced_accuracy_mean',
                     'cas.real_trained.accuracy_mean', 'cas.real_trained.balanced_accuracy_mean')
POOLING_NOTE = (
    'Pooled out-of-fold (OOF): the seed ensemble\'s test predictions of all folds of a repeat '
    'are concatenated (each image is tested once per repeat) and the metric is computed once '
    'on the pool; the 95% interval is a stratified bootstrap over images. With several '
    'repeats the value is the mean over repeats of the pooled metric, and every bootstrap '
    'resample of images is applied to all repeats at once, so repeats are not counted as new '
    'test images.')


class ReportError(ValueError):
  """The work directory cannot give a report; the message names the path."""


# ----------------------------------------------------------------------------- figures


def _figure_name(cell: dict) -> str:
  return (f'confusion_{cell["view"]}_{cell["protocol"]}_{cell["regime"].replace("+", "_")}_'
          f'{cell["model"]}.png')


def write_figures(cells: Sequence[dict], report_dir: str) -> None:
  """The confusion matrix of every cell and the chart of pooled balanced accuracies."""
  for cell in cells:
    path = os.path.join(report_dir, _figure_name(cell))
    title = f'{cell["view"]} {cells_lib.label(cell)}: pooled OOF, seed ensemble'
    if cell['leaky']:
      title = 'LEAKY ' + title
    plots.plot_confusion_matrix(cell['confusion_matrix'], cell['class_names'], path, title=title)
    cell['figures'] = {'confusion': f'report/{_figure_name(cell)}'}
  honest = [c for c in cells if not c['leaky']]
  if honest:
    metric, name = 'balanced_accuracy', cells_lib.METRIC_NAMES['balanced_accuracy']
    plots.plot_intervals(
        [f'{c["view"]} {c["protocol"]} | {cells_lib.label(c)}' for c in honest],
        *([100 * c['pooled'][metric][k] for c in honest] for k in ('point', 'low', 'high')),
        [100 * c['majority']['pooled'][metric] for c in honest],
        os.path.join(report_dir, 'pooled_balanced_accuracy.png'), xlabel=f'{name} (%)',
        title=f'Pooled {name} on held-out real images', interval_label='pooled OOF, 95% CI',
        baseline_label='majority baseline')


# ----------------------------------------------------------------------------- GAN directories


def _flatten(obj, prefix=''):
  """Scalar leaves of a JSON object as (dotted key, value) pairs."""
  if isinstance(obj, dict):
    for k, v in obj.items():
      yield from _flatten(v, f'{prefix}.{k}' if prefix else str(k))
  elif isinstance(obj, (int, float, str, bool)) or obj is None:
    yield prefix, obj


def gan_entries(workdir: str) -> list[dict]:
  """Per GAN directory (`rundir.find_gan_dirs`): its latest sample grid, figures and measures."""
  found = []
  for gan in rundir.find_gan_dirs(workdir):
    gan_dir = gan.path
    rel = os.path.relpath(gan_dir, workdir)
    samples = sorted(glob.glob(os.path.join(gan_dir, 'samples', '*.png')))
    measures_path = os.path.join(gan_dir, rundir.MEASURES)
    measures, notes = None, []
    if os.path.exists(measures_path):
      try:
        raw = utils.read_json(measures_path)
      except (OSError, json.JSONDecodeError):
        raw = None  # being written by a running job: leave it out rather than fail
      if isinstance(raw, dict):
        measures = dict(_flatten(raw))
        notes = [str(n) for n in raw.get('notes', []) if isinstance(n, str)]
    figures = sorted(glob.glob(os.path.join(gan_dir, '*.png')))
    found.append({'dir': rel.replace(os.sep, '/'),
                  'samples': [os.path.relpath(s, workdir).replace(os.sep, '/')
                              for s in samples[-1:]],
                  'figures': [os.path.relpath(f, workdir).replace(os.sep, '/') for f in figures],
                  'measures_file': (os.path.relpath(measures_path, workdir).replace(os.sep, '/')
                                    if measures is not None else None),
                  'measures': measures, 'measure_notes': notes})
  return found


# ----------------------------------------------------------------------------- header


def _run_dates(workdir: str, runs: Sequence[rundir.Run]) -> tuple[str, str]:
  """First and last completion time of the runs (results.json is written last, UTC)."""
  times = [os.path.getmtime(os.path.join(workdir, r.path, 'results.json')) for r in runs]
  fmt = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M UTC')
  return fmt(min(times)), fmt(max(times))


def _command(report_dir: str, command: str | None) -> str | None:
  """The ablation's command: given by the caller (and recorded), else as recorded before."""
  path = os.path.join(report_dir, 'command.txt')
  if command:
    utils.write_atomic(path, command + '\n')
    return command
  if os.path.exists(path):
    with open(path) as f:
      return f.read().strip() or None
  return None


def header_info(workdir: str, report_dir: str, runs: Sequence[rundir.Run],
                command: str | None) -> dict:
  config = rundir.read_config(workdir)
  first, last = _run_dates(workdir, runs)
  timing_path = os.path.join(workdir, 'timing.json')
  timing = dict(_flatten(utils.read_json(timing_path))) if os.path.exists(timing_path) else None
  return {
      'workdir': os.path.abspath(workdir),
      'command': _command(report_dir, command),
      'rebuild': shlex.join(['python', '-m', 'wbc_jax.report', f'--workdir={workdir}']),
      'config': {
          'protocol': config.get('split', {}).get('protocol'),
          'folds': config.get('split', {}).get('folds'),
          'repeats': config.get('split', {}).get('repeats'),
          'num_seeds': config.get('num_seeds'),
          'epochs': config.get('train', {}).get('epochs'),
          'gan_kind': config.get('gan', {}).get('kind'),
      },
      'versions': utils.software_versions(),
      'machine': {'platform': platform.platform(), 'cpu_count': os.cpu_count()},
      'runs': {'count': len(runs), 'first_completed': first, 'last_completed': last,
               'train_seconds': float(sum(r.results.get('train_seconds', 0.0) for r in runs))},
      'timing': timing,
      'generated': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
  }


# ----------------------------------------------------------------------------- Markdown


def pct(x: float | None) -> str:
  return 'n/a' if x is None else f'{100 * x:.1f}'


def _mean_sd_text(d: dict) -> str:
  return f'{pct(d["mean"])} ± {pct(d["sd"])}'


def _ci_text(d: dict) -> str:
  return f'{pct(d["point"])} [{pct(d["low"])}, {pct(d["high"])}]'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  esc = lambda s: str(s).replace('|', '\\|')
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
  lines += ['| ' + ' | '.join(esc(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def _cell_rows(cells: Sequence[dict]) -> list[list[str]]:
  rows = []
  for c in cells:
    ms, po = c['mean_sd'], c['pooled']
    rows.append([
        c['view'], names.REGIME_LABELS.get(c['regime'], c['regime']),
        names.MODEL_LABELS.get(c['model'], c['model']),
        f'{len(c["splits"])} x {c["seeds"]}', str(c['pooled_n']),
        _mean_sd_text(ms['accuracy']), _mean_sd_text(ms['balanced_accuracy']),
        _mean_sd_text(ms['macro_f1']),
        _ci_text(po['accuracy']), _ci_text(po['balanced_accuracy']), _ci_text(po['macro_f1']),
        pct(c['majority']['pooled']['accuracy']),
        pct(c['majority']['pooled']['balanced_accuracy']),
    ])
  return rows


CELL_HEADERS = ('view', 'regime', 'model', 'splits x seeds', 'pooled n', 'acc (mean ± SD)',
                'bal. acc (mean ± SD)', 'macro-F1 (mean ± SD)', 'pooled acc [95% CI]',
                'pooled bal. acc [95% CI]', 'pooled macro-F1 [95% CI]', 'majority acc',
                'majority bal. acc')


def _groups(cells: Sequence[dict]):
  keyf = lambda c: (c['view'], c['protocol'])
  for key, group in itertools.groupby(cells, key=keyf):
    yield key, list(group)


def _section_header(info: dict, n_boot: int) -> str:
  cfg = info['config']
  lines = [
      '# Report', '',
      f'Built only from the files in `{info["workdir"]}`; rebuild without training with '
      f'`{info["rebuild"]}`. Every number below is also in '
      '[report/report.json](report/report.json).', '',
      '- Command: ' + (f'`{info["command"]}`' if info['command'] else
                       'not recorded (the report was built by hand); see the config.'),
      f'- Config: [config.json](config.json) (protocol {cfg["protocol"]}, folds {cfg["folds"]}, '
      f'repeats {cfg["repeats"]}, seeds {cfg["num_seeds"]}, epochs {cfg["epochs"]}, GAN '
      f'{cfg["gan_kind"]})',
      '- Software (the environment that built this report): ' + ', '.join(
          f'{k} {v}' for k, v in info['versions'].items()),
      f'- Machine: {info["machine"]["platform"]}, {info["machine"]["cpu_count"]} CPUs',
      f'- Runs: {info["runs"]["count"]}, completed {info["runs"]["first_completed"]} to '
      f'{info["runs"]["last_completed"]}; classifier training wall time '
      f'{utils.format_duration(info["runs"]["train_seconds"])} (the sum of the runs\' '
      'train_seconds; GAN training not included)',
  ]
  if info['timing']:
    lines.append('- Timing file (timing.json): ' + ', '.join(
        f'{k} {v}' for k, v in info['timing'].items()))
  lines += [f'- Report built {info["generated"]}; bootstrap resamples: {n_boot}', '']
  return '\n'.join(lines) + '\n'


def _section_results(cells: Sequence[dict]) -> str:
  honest = [c for c in cells if not c['leaky']]
  out = ['## Results on real held-out images', '',
         'Test images are real and were never seen in training, model selection or GAN '
         'training. "mean ± SD" is over every (split, seed) pair; "pooled" is the seed '
         'ensemble on the pooled out-of-fold test predictions. The majority baseline always '
         'predicts the most frequent training class ('
         + ', '.join(sorted({m for c in honest for m in c['majority']['classes']})) + ').', '',
         POOLING_NOTE, '', names.REGIME_NOTE, '']
  for (view, protocol), group in _groups(honest):
    out += [f'### {view} view, {protocol} protocol', '',
            _table(CELL_HEADERS, _cell_rows(group))]
    notes = [f'{cells_lib.label(c)}: {c["pool_note"]}' for c in group if c['pool_note']]
    out += [f'Note: {n}.' for n in notes] + ([''] if notes else [])
  if honest:
    out += ['![pooled balanced accuracy](report/pooled_balanced_accuracy.png)', '']
  return '\n'.join(out) + '\n'


def _section_paper(cells: Sequence[dict]) -> str:
  honest = [c for c in cells if not c['leaky']]
  views = sorted({c['view'] for c in honest})
  headers = ['regime', 'model', f'paper test acc, {paper_results.CAVEAT}', 'paper test n']
  headers += [f'ours: {v} pooled acc [95% CI]' for v in views]
  headers += [f'ours: {v} pooled bal. acc [95% CI]' for v in views]
  rows = []
  for cell in paper_results.TABLE2:
    row = [names.REGIME_LABELS[cell.regime], names.MODEL_LABELS[cell.model],
           'not reported' if cell.accuracy is None else pct(cell.accuracy),
           '' if cell.n_test is None else str(cell.n_test)]
    for metric in ('accuracy', 'balanced_accuracy'):
      for view in views:
        match = [c for c in honest if (c['view'], c['regime'], c['model']) ==
                 (view, cell.regime, cell.model)]
        row.append(' / '.join(f'{_ci_text(c["pooled"][metric])} ({c["protocol"]})'
                              for c in match) or 'not run')
    rows.append(row)
  sources = [f'- {names.REGIME_LABELS[c.regime]} ({names.MODEL_LABELS[c.model]}): '
             f'`{c.path}` at {c.commit[:10]}: "{c.line}"' for c in paper_results.TABLE2]
  return '\n'.join([
      "## The paper's Table 2 beside ours", '',
      'The paper column is the test accuracy its notebooks print, ' + paper_results.CAVEAT
      + ': the GAN that drew them had seen the real test images, and the original-data regimes '
      'used one unstratified split of 56 images. Our columns are pooled out-of-fold values on '
      'real images only. The two are not comparable; they stand side by side to show the gap.',
      '',
      _table(headers, rows),
      f'Sources in github.com/{paper_results.REPOSITORY} (the printed line of each notebook):',
      *sources,
      f'- The repository README (at {paper_results.README_COMMIT[:10]}) says: '
      f'"{paper_results.README_BEST_LINE}"', '']) + '\n'


def _section_comparisons(comparisons: Sequence[dict]) -> str:
  if not comparisons:
    return ('## Comparisons\n\nNo two cells share a view and protocol with the same model or '
            'the same regime: nothing to compare.\n\n')
  headers = ['view', 'protocol', 'a', 'b', 'splits', 'mean diff (per split) [95% CI]',
             'corrected t-test p', 'Holm p (t)', 'pooled diff [95% CI]', 'McNemar b / c',
             'McNemar p', 'Holm p (McNemar)']
  rows = []
  for c in comparisons:
    t = c['ttest']
    rows.append([
        c['view'], c['protocol'], c['name_a'], c['name_b'], str(c['n_splits']),
        'not defined (one split)' if t is None else
        f'{100 * t["mean_diff"]:+.1f} [{100 * t["ci_low"]:.1f}, {100 * t["ci_high"]:.1f}]',
        'not defined (one split)' if t is None else cells_lib.format_p(t['p']),
        'not defined' if t is None else cells_lib.format_p(c['ttest_p_holm']),
        f'{100 * c["pooled_diff"]["point"]:+.1f} [{100 * c["pooled_diff"]["low"]:.1f}, '
        f'{100 * c["pooled_diff"]["high"]:.1f}]',
        f'{c["mcnemar"]["b"]} / {c["mcnemar"]["c"]}', cells_lib.format_p(c['mcnemar']['p']),
        cells_lib.format_p(c['mcnemar_p_holm'])])
  metric_name = cells_lib.METRIC_NAMES[cells_lib.COMPARISON_METRIC]
  return '\n'.join([
      '## Comparisons', '',
      f'Differences are a minus b in points of {metric_name}. The '
      'corrected resampled t-test (Nadeau & Bengio) pairs the per-split seed-ensemble scores '
      '(n_train = real training images, n_test = test images of a split); it needs at least '
      'two splits. The pooled difference is a paired stratified bootstrap on the pooled OOF '
      'images; McNemar (exact) compares correctness on the first repeat\'s pool, b = a right '
      'and b wrong, c = the reverse. Holm adjusts each family (one view and protocol), '
      'separately for each test.', '',
      _table(headers, rows), *[f'- {c["sentence"]}' for c in comparisons], '']) + '\n'


def _section_recall(cells: Sequence[dict]) -> str:
  class_names = list(dict.fromkeys(n for c in cells for n in c['class_names']))
  rows = []
  for c in cells:
    row = [('LEAKY ' if c['leaky'] else '') + c['view'], c['protocol'],
           names.REGIME_LABELS.get(c['regime'], c['regime']),
           names.MODEL_LABELS.get(c['model'], c['model'])]
    for name in class_names:
      ms = c['mean_sd']['recall'].get(name)
      pooled = c['pooled']['recall'].get(name)
      row.append('absent' if ms is None else f'{_mean_sd_text(ms)} ({pct(pooled)})')
    rows.append(row)
  return '\n'.join([
      '## Recall per class', '',
      'Mean ± SD over (split, seed) pairs, with the pooled OOF seed-ensemble recall in '
      'parentheses.', '',
      _table(['view', 'protocol', 'regime', 'model', *class_names], rows)]) + '\n'


def _section_figures(cells: Sequence[dict], gans: Sequence[dict]) -> str:
  out = ['## Figures', '',
         'Pooled OOF confusion matrices of the seed ensemble (first repeat); learning curves '
         'are per run (mean over seeds, min-max band; the test curve is never used for '
         'selection).', '']
  for c in cells:
    tag = 'LEAKY ' if c['leaky'] else ''
    curves = ' · '.join(f'[{s}]({p})' for s, p in c['learning_curves'].items())
    out += [f'### {tag}{c["view"]}, {c["protocol"]}: {cells_lib.label(c)}', '',
            f'![confusion matrix]({c["figures"]["confusion"]})', '',
            f'Learning curves: {curves}', '']
  if gans:
    out += ['## GANs', '',
            'Sample grids are synthetic images only (one row per class). Synthetic-data '
            'measures are shown where a measures.json exists.', '']
    for g in gans:
      out += [f'### {g["dir"]}', '']
      out += [f'![samples]({s})' for s in g['samples']] or ['No sample grid.']
      out.append('')
      if g['figures']:
        out += ['Figures (they show real cells beside synthetic ones, so they stay in the work '
                'directory and are left out of published copies of this report): '
                + ' · '.join(f'[{os.path.basename(f)}]({f})' for f in g['figures']), '']
      if g['measures']:
        shown = {k: v for k, v in g['measures'].items() if k in HEADLINE_MEASURES}
        if not shown:  # a layout this report does not know: show every scalar
          shown = g['measures']
        out.append(_table(['measure', 'value'], [[k, _format_value(v)] for k, v in shown.items()]))
        out += [f'- {n}' for n in g['measure_notes']]
        out += [f'All measures: [{g["measures_file"]}]({g["measures_file"]}).', '']
  return '\n'.join(out) + '\n'


def _format_value(v) -> str:
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


def _section_leaky(cells: Sequence[dict]) -> str:
  leaky = [c for c in cells if c['leaky']]
  if not leaky:
    return ''
  return '\n'.join([
      '## LEAKY: runs of the paper\'s protocol', '',
      'These runs follow the published pipeline: in its GAN regimes the split is drawn after '
      'synthetic images were mixed in, so their test images include synthetic ones made by a '
      'GAN that saw the real test images (the synthetic share is in the table; the '
      'non-GAN regimes of this protocol test on real images). They are here to reproduce the '
      'paper\'s numbers and are never compared with, or pooled into, the rows above.', '',
      _table(['LEAKY', *CELL_HEADERS, 'synthetic share of test', 'acc on real test (ensemble)',
              'bal. acc on real test (ensemble)'],
             [['LEAKY', *row, *_paper_columns(c)] for c, row in zip(leaky, _cell_rows(leaky))])
  ]) + '\n'


def _paper_columns(cell: dict) -> list[str]:
  info = cell['paper_protocol'] or {}
  real = info.get('real_test') or {}
  return [pct(info.get('test_synthetic_fraction')), pct(real.get('accuracy')),
          pct(real.get('balanced_accuracy'))]


def render_markdown(report: dict, cells: Sequence[dict]) -> str:
  return ''.join([
      _section_header(report['header'], report['n_boot']),
      _section_results(cells),
      located.localisation_markdown(report.get('localisation', [])),
      _section_paper(cells),
      _section_comparisons(report['comparisons']),
      _section_recall(cells),
      _section_leaky(cells),
      _section_figures(cells, report['gans']),
  ])


# ----------------------------------------------------------------------------- entry points


def _public(cell: dict) -> dict:
  return {k: v for k, v in cell.items() if not k.startswith('_')}


def write_report(workdir: str, *, command: str | None = None, n_boot: int = 2000,
                 seed: int = 0, log: Callable = print) -> dict:
  """Builds DIR/REPORT.md, DIR/report/report.json and the figures; returns report.json's data.

  Raises:
    ReportError: if the work directory does not exist or holds no completed run.
  """
  if not os.path.isdir(workdir):
    raise ReportError(f'{workdir}: no such work directory.')
  runs = rundir.find_runs(workdir)
  if not runs:
    raise ReportError(f'{workdir}: no completed runs (no <view>/<split>/<regime>/<model>/'
                      'results.json); train first with python -m wbc_jax.main.')
  report_dir = os.path.join(workdir, 'report')
  os.makedirs(report_dir, exist_ok=True)
  cells, comparisons = cells_lib.summarize_runs(runs, workdir, n_boot=n_boot, seed=seed)
  write_figures(cells, report_dir)
  report = {
      'header': header_info(workdir, report_dir, runs, command),
      'n_boot': n_boot, 'seed': seed, 'pooling': POOLING_NOTE,
      'cells': [_public(c) for c in cells],
      'comparisons': comparisons,
      'paper': {'caveat': paper_results.CAVEAT, 'repository': paper_results.REPOSITORY,
                'readme_commit': paper_results.README_COMMIT,
                'readme_line': paper_results.README_BEST_LINE,
                'table2': [dataclasses.asdict(c) for c in paper_results.TABLE2]},
      'gans': gan_entries(workdir),
      'localisation': located.localisation_summary(runs),
  }
  utils.write_json(os.path.join(report_dir, 'report.json'), report)
  # Last, and atomically: a REPORT.md that exists is a complete one.
  utils.write_atomic(os.path.join(workdir, 'REPORT.md'), render_markdown(report, cells))
  log(f'report: {os.path.join(workdir, "REPORT.md")} ({len(cells)} cells, '
      f'{len(comparisons)} comparisons)')
  return report


def main(argv):
  from absl import app
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from absl import flags
  f = flags.FLAGS
  try:
    write_report(f.workdir, n_boot=f.n_boot, seed=f.seed)
  except ValueError as e:  # ReportError, rundir.RunDirError, an image pooled twice
    raise SystemExit(f'wbc_jax.report: {e}') from None


def cli():
  from absl import app
  from absl import flags
  # Defined here, not at import: the ablation imports this module in the process whose
  # wbc_jax.main already defines --workdir.
  flags.DEFINE_string('workdir', None, 'Work directory of a finished (or partial) ablation.')
  flags.DEFINE_integer('n_boot', 2000, 'Bootstrap resamples per interval.')
  flags.DEFINE_integer('seed', 0, 'Seed of the bootstrap resampling.')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)


if __name__ == '__main__':
  cli()
