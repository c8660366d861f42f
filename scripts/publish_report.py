r"""Copies a work directory's REPORT.md and the files it links, minus pictures of real cells.

  python scripts/publish_report.py --workdir=workdirs/study --out=experiments/study

What is copied, keeping the relative paths so the report's links work: REPORT.md,
report/ (report.json and the metric figures), config.json, every <view>/splits.json (image
ids, no pixels), and each PNG or JSON the report links, except figures in a GAN directory
outside its samples/ folder (measures.json is kept: numbers only). Those figures
(real_vs_synthetic.png, closest_pairs_*.png) show real cells beside synthetic ones and stay
in the work directory. Sample grids are synthetic images only and are copied. No checkpoint,
prediction array or image array is copied.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wbc_jax import rundir  # noqa: E402


def shows_real_cells(rel: str) -> bool:
  """True for the synthetic-data measures' figures, which put real cells beside synthetic ones."""
  parts = rel.split('/')
  in_gan = any(p.startswith(rundir.GAN_PREFIX) for p in parts)
  return in_gan and rel.endswith('.png') and 'samples' not in parts


def linked_files(report_text: str) -> list[str]:
  """Relative paths of the PNG and JSON files the Markdown links or embeds."""
  links = re.findall(r'\]\(([^)\s]+)\)', report_text)
  return sorted({l for l in links if not re.match(r'^[a-z]+://', l) and
                 l.endswith(('.png', '.json', '.md', '.txt'))})


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--out', required=True)
  args = p.parse_args(argv)
  report = os.path.join(args.workdir, 'REPORT.md')
  if not os.path.isfile(report):
    print(f'publish_report: {report} not found; build it with '
          f'`python -m wbc_jax.report --workdir={args.workdir}`.', file=sys.stderr)
    return 2
  with open(report) as f:
    text = f.read()
  wanted = set(linked_files(text)) | {'REPORT.md', 'config.json'}
  wanted |= {os.path.relpath(p, args.workdir)
             for p in glob.glob(os.path.join(args.workdir, 'report', '*'))}
  wanted |= {os.path.relpath(p, args.workdir)
             for p in glob.glob(rundir.splits_path(args.workdir, '*'))}
  wanted |= {os.path.relpath(os.path.join(g.path, rundir.MEASURES), args.workdir)
             for g in rundir.find_gan_dirs(args.workdir)}
  copied, left_out = [], []
  for rel in sorted(wanted):
    src = os.path.join(args.workdir, rel)
    if not os.path.isfile(src):
      continue
    if shows_real_cells(rel):
      left_out.append(rel)
      continue
    dst = os.path.join(args.out, rel)
    os.makedirs(os.path.dirname(dst) or '.', exist_ok=True)
    shutil.copyfile(src, dst)
    copied.append(rel)
  print(f'copied {len(copied)} files to {args.out}')
  for rel in left_out:
    print(f'left out (shows real cells): {rel}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
