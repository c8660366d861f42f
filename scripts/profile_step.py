r"""Where the time of one jitted train step goes: a per-operation profile on this machine.

  python scripts/profile_step.py --model=cnn --seeds=1 --steps=3
  python scripts/profile_step.py --model=gan:cond --out=experiments/benchmarks

Runs the step under `jax.profiler.trace` (with XLA:CPU's per-thunk trace events on),
reads the Perfetto trace it writes, and sums the time of every XLA operation over the
traced steps and over the threads that ran it. Each operation is put in a category from
its name and its HLO instruction (dot / im2col copies / elementwise / ...), so the table
says at a glance whether a step is bound by its matmuls or by moving their operands.
Writes profile_<model>.md and .json into --out and prints the table.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import platform
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# XLA:CPU emits one trace event per executed thunk only with this flag.
_FLAG = '--xla_cpu_enable_xprof_traceme=true'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FLAG).strip()

import jax  # noqa: E402  after XLA_FLAGS

# (category, pattern on the HLO text of the instruction or its fused computation), first match.
CATEGORIES = (
    ('matmul (dot)', re.compile(r'\bdot\(|__ynn_fusion|custom-call.*(onednn|xnn)')),
    ('native convolution', re.compile(r'\bconvolution\(')),
    ('im2col copies (concatenate / pad / slice)', re.compile(r'\b(concatenate|pad|slice|dynamic-slice)\(')),
    ('reductions (sums, max-pool, softmax)', re.compile(r'\b(reduce|reduce-window|select-and-scatter)\(')),
    ('random bits (dropout)', re.compile(r'threefry|rng-bit-generator|\brng\(')),
    ('elementwise / other fusions', re.compile(r'.')),
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='cnn',
                 help="classifier (cnn, cnn_rnn, resnet) or 'gan:paper' / 'gan:cond'")
  p.add_argument('--seeds', type=int, default=1, help='S, vmapped seeds (or GANs)')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--steps', type=int, default=3, help='traced steps (after 2 untraced)')
  p.add_argument('--conv_impl', default='auto', choices=('auto', 'xla', 'matmul', 'onednn'))
  p.add_argument('--top', type=int, default=15, help='operations listed')
  p.add_argument('--out', default='', help='directory for profile_<model>.{md,json}')
  return p.parse_args(argv)


def build_step(args):
  """(jitted step, initial state, step args) for the model, as the benchmark builds them."""
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  import benchmark as bench
  from wbc_jax import models
  models.resolve_conv_impl(args.conv_impl)
  if args.model.startswith('gan:'):
    kind = args.model.split(':', 1)[1]
    config, step = bench.gan_program(kind, args.batch, args.conv_impl)
    state = bench.init_gan(config, args.seeds)
    data = bench.make_batch(args.seeds, args.batch, bench.GAN_IMAGE_SHAPE, seed=1)
    return step, state, (jax.device_put(data['image'] * 2.0 - 1.0),
                         jax.device_put(data['label']))
  programs = bench.build_programs(args.model, args.conv_impl)
  runner, _ = bench.prepare_classifier(programs, args.seeds, args.batch,
                                       bench.IMAGE_SHAPES[args.model])
  return programs.train_step, runner.state, (runner.batch, runner.class_weights)


def instruction_texts(hlo: str) -> dict[str, str]:
  """Instruction name -> its HLO line, plus the body of the computation a fusion calls."""
  computations, current = {}, None
  for line in hlo.splitlines():
    m = re.match(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if m:
      current = m.group(1)
      computations[current] = []
    elif current is not None:
      computations[current].append(line)
  texts = {}
  for lines in computations.values():
    for line in lines:
      m = re.match(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=', line)
      if not m:
        continue
      text = line
      called = re.search(r'calls=%?([\w.\-]+)', line)
      if called and called.group(1) in computations:
        text += '\n' + '\n'.join(computations[called.group(1)])
      texts[m.group(1)] = text
  return texts


def categorize(name: str, text: str) -> str:
  # The instruction's own line names its operands (e.g. '%ynn_fusion.6'): match on what
  # follows its '=' and on the body of the computation it calls, not on operand names.
  head, _, body = text.partition('\n')
  head = re.sub(r'%[\w.\-]+', '', head.split('=', 1)[-1])
  for category, pattern in CATEGORIES:
    if pattern.search(head) or pattern.search(body):
      return category
  return CATEGORIES[-1][0]


def output_shape(text: str) -> str:
  m = re.search(r'=\s*(\(?[a-z0-9]+\[[^\]]*\][^ ]*)', text)
  return m.group(1) if m else ''


def trace_events(trace_dir: str):
  """Complete ('X') events of the Perfetto trace, with their thread names."""
  files = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  if not files:
    raise SystemExit(f'profile_step: no *.trace.json.gz under {trace_dir}; the profiler wrote '
                     'no Perfetto trace.')
  with gzip.open(files[0]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  threads = {(e['pid'], e['tid']): e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  return [(threads.get((e['pid'], e['tid']), ''), e['name'], e['dur'] / 1e6)
          for e in events if e.get('ph') == 'X']


def main(argv=None):
  args = parse_args(argv)
  step, state, step_args = build_step(args)
  hlo = step.lower(state, *step_args).compile().as_text()
  texts = instruction_texts(hlo)
  for _ in range(2):  # compile and warm up outside the trace
    state, metrics = step(state, *step_args)
    jax.block_until_ready(metrics)

  trace_dir = tempfile.mkdtemp(prefix='wbc_profile_')
  t0 = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.steps):
      state, metrics = step(state, *step_args)
      jax.block_until_ready(metrics)
  wall = (time.perf_counter() - t0) / args.steps

  per_op = collections.defaultdict(float)
  for thread, name, seconds in trace_events(trace_dir):
    # XLA's operations run on its Eigen pool and on the client thread; everything else
    # (Python, the executor's own bookkeeping spans) is not an operation.
    if ('XLAEigen' in thread or 'XLAPjRtCpuClient' in thread) and name in texts:
      per_op[name] += seconds / args.steps
  if not per_op:
    raise SystemExit('profile_step: the trace holds no XLA operation events; is '
                     f'{_FLAG} supported by this jaxlib?')
  total = sum(per_op.values())
  by_category = collections.defaultdict(float)
  for name, seconds in per_op.items():
    by_category[categorize(name, texts[name])] += seconds
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]

  result = {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': 'python scripts/profile_step.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
      'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, '
                 f'load average {" / ".join(f"{x:.2f}" for x in os.getloadavg())}',
      'jax': jax.__version__, 'model': args.model, 'seeds': args.seeds, 'batch': args.batch,
      'steps': args.steps, 'wall_seconds_per_step': wall, 'op_seconds_per_step': total,
      'categories': {k: v for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
      'top_ops': [{'name': n, 'seconds': s, 'category': categorize(n, texts[n]),
                   'shape': output_shape(texts[n])} for n, s in top],
  }
  lines = [f'# Profile of one train step: {args.model}, S={args.seeds}, batch {args.batch}', '',
           f'- Date: {result["date"]}', f'- Command: `{result["command"]}`',
           f'- Machine: {result["machine"]}; JAX {jax.__version__}',
           f'- Wall time per step: {wall * 1e3:.0f} ms; operation time summed over threads: '
           f'{total * 1e3:.0f} ms per step (2 threads run operations at once)', '',
           '| category | ms/step (summed over threads) | share |', '|---|--:|--:|']
  lines += [f'| {k} | {v * 1e3:.0f} | {v / total:.0%} |' for k, v in result['categories'].items()]
  lines += ['', f'Top {len(top)} operations:', '', '| operation | category | output | ms/step | share |',
            '|---|---|---|--:|--:|']
  lines += [f'| `{o["name"]}` | {o["category"]} | `{o["shape"]}` | {o["seconds"] * 1e3:.0f} | '
            f'{o["seconds"] / total:.0%} |' for o in result['top_ops']]
  text = '\n'.join(lines) + '\n'
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, 'profile_' + args.model.replace(':', '_'))
    with open(stem + '.json', 'w') as f:
      json.dump(result, f, indent=2)
    with open(stem + '.md', 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
