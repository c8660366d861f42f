"""benchmark.md from benchmark.json's contents (scripts/benchmark.py)."""

from __future__ import annotations

from typing import Any, Callable

from benchmark_keras import PAPER_KERAS_CNN_RNN_PARAMS
from benchmark_tools import mb


def _fmt(value, spec: str = '.1f') -> str:
  return 'n/a' if value is None else format(value, spec)


def _pct(value) -> str:
  return 'n/a' if value is None else f'{100 * value:.1f}%'


def _memory(key: str) -> Callable[[dict], str]:
  return lambda r: mb((r[key] or {}).get('total'))


def _col(header: str, key: str, spec: str = '.1f', align: str = '--:'):
  return header, (lambda r: _fmt(r.get(key), spec)), align


# (header, row -> cell, alignment) of each table; a skipped row fills the first four cells,
# says why, and gives its program's memory in the last column.
CLASSIFIER_COLUMNS = [
    ('model', lambda r: r['model'], '---'), _col('S', 'seeds', 'd'), _col('batch', 'batch', 'd'),
    _col('params/seed', 'params_per_seed', ','),
    _col('compile train (s)', 'compile_train_s'),
    _col('first call train (s)', 'first_call_train_s'),
    _col('compile predict (s)', 'compile_predict_s'), _col('train ms/step', 'train_ms'),
    _col('train img/s', 'train_images_per_s'),
    _col('train GFLOP/step', 'train_gflop_per_step', '.2f'),
    _col('train GFLOP/s', 'train_gflop_per_s'),
    ('train % peak', lambda r: _pct(r['train_fraction_of_peak']), '--:'),
    _col('predict ms', 'predict_ms'), _col('predict img/s', 'predict_images_per_s'),
    _col('predict GFLOP/s', 'predict_gflop_per_s'),
    ('predict % peak', lambda r: _pct(r['predict_fraction_of_peak']), '--:'),
    ('train program MB', _memory('train_memory_bytes'), '--:'),
]
GAN_COLUMNS = [
    ('kind', lambda r: r['kind'], '---'), _col('S', 'seeds', 'd'), _col('batch', 'batch', 'd'),
    _col('params/GAN (G + D)', 'params_per_seed', ','), _col('compile (s)', 'compile_s'),
    _col('first call (s)', 'first_call_s'), _col('ms/step', 'step_ms'),
    _col('real img/s', 'step_images_per_s'), _col('GFLOP/step', 'step_gflop_per_step', '.2f'),
    _col('GFLOP/s', 'step_gflop_per_s'),
    ('% peak', lambda r: _pct(r['step_fraction_of_peak']), '--:'),
    ('program MB', _memory('memory_bytes'), '--:'),
]
PEER_COLUMNS = [
    ('model', lambda r: r['model'], '---'), _col('Keras params', 'keras_params', ','),
    _col('wbc_jax params', 'wbc_jax_params', ','),
    ('Keras jit_compile', lambda r: str(r['keras_jit_compile']), '---'),
    _col('Keras first step (s)', 'keras_first_train_step_s'),
    _col('train: wbc_jax img/s', 'train_wbc_jax_images_per_s'),
    _col('train: Keras img/s', 'train_keras_images_per_s'),
    ('train ratio', lambda r: f'**{r["train_ratio_median"]:.2f}x**', '--:'),
    _col('predict: wbc_jax img/s', 'predict_wbc_jax_images_per_s'),
    _col('predict: Keras img/s', 'predict_keras_images_per_s'),
    ('predict ratio', lambda r: (f'{r["predict_ratio_median"]:.2f}x'
                                 if 'predict_ratio_median' in r else 'n/a'), '--:'),
]


def table(rows: list[dict], columns) -> list[str]:
  lines = ['| ' + ' | '.join(c[0] for c in columns) + ' |',
           '|' + '|'.join(c[2] for c in columns) + '|']
  for r in rows:
    if 'skipped' in r:
      cells = [cell(r) for _, cell, _ in columns[:4]] + [f'skipped: {r["skipped"]}']
      cells += [''] * (len(columns) - 6) + [columns[-1][1](r)]
    else:
      cells = [cell(r) for _, cell, _ in columns]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def to_markdown(result: dict[str, Any]) -> str:
  m, s, peak, args = result['machine'], result['settings'], result['matmul_peak'], result['args']
  loads = lambda key: ' / '.join(f'{x:.2f}' for x in m[key])
  lines = [
      '# wbc_jax benchmark', '',
      f'- Date: {result["date"]}',
      f'- Command: `{result["command"]}`',
      f'- Machine: {m["cpu_model"]}, {m["usable_cores"]} usable cores, {m["memory_gb"]} GB; '
      f'JAX backend `{m["jax_backend"]}` ({m["jax_device_kind"]}); load average '
      f'{loads("load_average_at_start")} at the start, {loads("load_average_at_end")} at the end',
      '- Versions: ' + ', '.join(f'{k} {v}' for k, v in result['versions'].items()),
      f'- Threads: XLA {s["xla_intra_op_threads"]} intra-op; TensorFlow '
      f'{s["tf_intra_op_threads"]} intra-op / {s["tf_inter_op_threads"]} inter-op '
      f'(applied: {s["tf_thread_settings_applied"]}); XLA_FLAGS=`{s["XLA_FLAGS"]}`. '
      f'{s["note"]}',
      f'- Matmul peak (float32 {peak["n"]}x{peak["n"]} @ {peak["n"]}x{peak["n"]}, jitted, '
      f'median): **{peak["gflop_per_s"]:.1f} GFLOP/s** (start {peak["start_gflop_per_s"]:.1f}, '
      f'end {_fmt(peak.get("end_gflop_per_s"))}; the larger is the reference)',
      f'- Reps: {args["reps"]} timed steps per figure (medians; {args["gan_reps"]} for GAN '
      f'steps), {args["warmup"]} warm-up step(s); conv_impl `{args["conv_impl"]}` (resolved: '
      f'`{result["conv_impl_resolved"]}`)',
      '', '## wbc_jax classifiers', '',
      'Images/s = S x batch / step time. GFLOP/step from XLA\'s cost analysis of the compiled '
      'program (loop bodies counted once, so a lower bound for the CNN-RNN). "Compile" is trace '
      '+ lower + compile; "first call" is the first run of the compiled program. Memory: the '
      'compiled train program\'s arguments + outputs + temporaries (donated state counted once).'
      + (' With conv_impl `onednn` the convolutions are custom calls, which XLA\'s cost '
         'analysis does not count: GFLOP and % of peak then leave them out.'
         if result['conv_impl_resolved'] == 'onednn' else ''),
      '', *table(result['classifiers'], CLASSIFIER_COLUMNS)]
  if result.get('seed_scaling'):
    lines += ['', 'Seed scaling (train images/s at the largest S / at S = 1): '
              + ', '.join(f'{k} {v:.2f}x' for k, v in result['seed_scaling'].items())]
  gan, peer = result['gan'], result['keras_peer']
  lines += ['', '## wbc_jax GANs', '']
  if gan['status'] != 'ok':
    lines.append(f'Skipped: {gan["reason"]}')
  else:
    lines += ['One step = one Adam step of D (real + generated batch) then one of G, vmapped '
              'over S GANs; img/s counts real images.', '', *table(gan['rows'], GAN_COLUMNS)]
  lines += ['', f'## {peer["label"]}', '']
  if peer['status'] != 'ok':
    lines.append(f'Skipped: {peer["reason"]}')
  else:
    lines += [
        'Same layers, batch and inputs; Keras trains with `train_on_batch` (the train function '
        '`model.fit` runs; `jit_compile` as Keras resolves its default) and predicts with '
        '`predict_on_batch`. wbc_jax at S = 1 and Keras are timed alternately, '
        f'{peer["rows"][0]["pairs"] if peer["rows"] else 0} pairs; ratio = wbc_jax img/s / '
        'Keras img/s, median over pairs.', '', *table(peer['rows'], PEER_COLUMNS)]
    if any(r['model'] == 'cnn_rnn' for r in peer['rows']):
      lines += ['', f'The paper-era Keras count of the CNN-RNN, with cuDNN LSTMs (two biases per '
                f'gate), is {PAPER_KERAS_CNN_RNN_PARAMS:,}; Keras 3\'s LSTM keeps one bias.']
    if peer.get('gan_reason'):
      lines += ['', f'Keras paper-GAN step skipped: {peer["gan_reason"]}']
  lines += ['', f'Process peak RSS: {result["process_maxrss_mb"]:.0f} MB. '
            f'Total wall time: {result["wall_s"]:.0f} s.', '']
  return '\n'.join(lines)
