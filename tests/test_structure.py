"""The shape of the code: who imports whom, and how long a module may grow.

Every module under wbc_jax/ is parsed (not imported) with `ast`; every import counts, the
ones inside functions too, so a cycle cannot hide in a function body. The rules:
  - no import cycle among wbc_jax modules;
  - wbc_jax/gan/ is a GAN library: it imports nothing of the ablation (the driver, the run
    directory, the names of regimes and models, the measures, the report, prediction);
  - no module of wbc_jax/ over MAX_MODULE_LINES lines, no script over MAX_SCRIPT_LINES.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'wbc_jax'
MAX_MODULE_LINES = 520
MAX_SCRIPT_LINES = 620
# What the GAN library may not import: the ablation and everything built on it.
NOT_FOR_GAN = ('ablation', 'cells', 'main', 'measures', 'names', 'predict', 'report', 'rundir')


def module_files(root: str, package: str = PACKAGE) -> dict[str, str]:
  """{dotted module name: path} of every .py file of `package` under `root`."""
  out = {}
  for directory, _, files in os.walk(os.path.join(root, package)):
    for name in files:
      if not name.endswith('.py'):
        continue
      path = os.path.join(directory, name)
      parts = os.path.relpath(path, root)[:-len('.py')].split(os.sep)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      out['.'.join(parts)] = path
  return out


def imported_modules(path: str, module: str, known: set[str]) -> set[str]:
  """The modules of `known` that the file imports, anywhere in it (functions included)."""
  is_package = os.path.basename(path) == '__init__.py'
  package = module if is_package else module.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = '.'.join(anchor + ([base] if base else []))
      # `from a.b import c` imports the module a.b.c when there is one, else a name of a.b.
      for alias in node.names:
        found.add(f'{base}.{alias.name}' if f'{base}.{alias.name}' in known else base)
  return {name for name in found if name in known and name != module}


def import_graph(root: str, package: str = PACKAGE) -> dict[str, set[str]]:
  files = module_files(root, package)
  known = set(files)
  return {module: imported_modules(path, module, known) for module, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def gan_violations(graph: dict[str, set[str]]) -> list[str]:
  forbidden = {f'{PACKAGE}.{name}' for name in NOT_FOR_GAN}
  return sorted(f'{module} imports {target}' for module, targets in graph.items()
                if module.startswith(f'{PACKAGE}.gan') for target in targets & forbidden)


def _line_counts(paths) -> dict[str, int]:
  return {os.path.relpath(p, ROOT): sum(1 for _ in open(p)) for p in paths}


# ----------------------------------------------------------------------------- the rules


def test_no_import_cycle():
  assert find_cycle(import_graph(ROOT)) is None, ' -> '.join(find_cycle(import_graph(ROOT)))


def test_gan_library_imports_nothing_of_the_ablation():
  assert gan_violations(import_graph(ROOT)) == []


def test_modules_and_scripts_stay_small():
  modules = _line_counts(module_files(ROOT).values())
  scripts_dir = os.path.join(ROOT, 'scripts')
  scripts = _line_counts(os.path.join(scripts_dir, f) for f in os.listdir(scripts_dir)
                         if f.endswith('.py'))
  assert {p: n for p, n in modules.items() if n > MAX_MODULE_LINES} == {}
  assert {p: n for p, n in scripts.items() if n > MAX_SCRIPT_LINES} == {}


# ----------------------------------------------------------------------------- the checker


def _package(tmp_path, files: dict[str, str]) -> str:
  for rel, text in files.items():
    path = tmp_path / PACKAGE / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return str(tmp_path)


def test_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
  root = _package(tmp_path, {
      '__init__.py': '',
      'a.py': 'from wbc_jax import b\n',
      'b.py': 'import os\n\ndef f():\n  from wbc_jax.c import thing\n  return thing\n',
      'c.py': 'def g():\n  import wbc_jax.a\n',
      'd.py': 'from wbc_jax import c  # no cycle through d\n',
  })
  graph = import_graph(root)
  assert graph['wbc_jax.b'] == {'wbc_jax.c'} and graph['wbc_jax.c'] == {'wbc_jax.a'}
  assert find_cycle(graph) == ['wbc_jax.a', 'wbc_jax.b', 'wbc_jax.c', 'wbc_jax.a']
  del graph['wbc_jax.c']
  assert find_cycle(graph) is None


def test_checker_finds_the_gan_library_importing_the_ablation(tmp_path):
  root = _package(tmp_path, {
      '__init__.py': '',
      'ablation.py': 'from wbc_jax.gan import train\n',
      'plots.py': '',
      'gan/__init__.py': 'from wbc_jax.gan.train import step\n',
      'gan/train.py': ('from wbc_jax import plots\nfrom . import models\n\n'
                       'def step():\n  from ..rundir import run_dir\n'),
      'gan/models.py': '',
      'rundir.py': '',
  })
  graph = import_graph(root)
  assert graph['wbc_jax.gan.train'] == {'wbc_jax.plots', 'wbc_jax.gan.models', 'wbc_jax.rundir'}
  assert gan_violations(graph) == ['wbc_jax.gan.train imports wbc_jax.rundir']


def test_line_counts_are_counted(tmp_path):
  path = tmp_path / 'long.py'
  path.write_text('x = 1\n' * (MAX_MODULE_LINES + 1))
  assert _line_counts([str(path)]) == {os.path.relpath(str(path), ROOT): MAX_MODULE_LINES + 1}
