"""Prints '<XLA FFI include dir>;<oneDNN install prefix>' for CMakeLists.txt.

Build requirements may be installed under a prefix other than sys.prefix (pip's isolated
build environment), so the paths come from the installed distributions' own file lists.
"""

import importlib.metadata
import os
import sys


def _dist_file(dist_name: str, suffix: str) -> str:
  # RECORD paths of data files are relative to site-packages ('../../../include/...').
  for f in importlib.metadata.distribution(dist_name).files or ():
    path = os.path.realpath(f.locate())
    if path.replace(os.sep, '/').endswith(suffix):
      return path
  raise FileNotFoundError(f'{suffix} not in {dist_name}')


def main() -> int:
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
    xla_include = os.path.join(os.path.dirname(jaxlib.__file__), 'include')
    if not os.path.exists(os.path.join(xla_include, 'xla', 'ffi', 'api', 'ffi.h')):
      raise FileNotFoundError(f'no xla/ffi/api/ffi.h under {xla_include}')
    # <prefix>/lib/cmake/dnnl/dnnl-config.cmake -> <prefix>
    config = _dist_file('onednn-devel-cpu-gomp', 'lib/cmake/dnnl/dnnl-config.cmake')
    prefix = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(config))))
  except Exception as e:  # pylint: disable=broad-except
    print(f'find_deps: {e}', file=sys.stderr)
    return 1
  print(f'{xla_include};{prefix}', end='')
  return 0


if __name__ == '__main__':
  sys.exit(main())
