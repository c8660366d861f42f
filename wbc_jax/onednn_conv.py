"""2-D convolution on CPU through oneDNN, as XLA FFI custom calls.

On CPU, XLA's native convolution is several times slower than oneDNN's direct (JIT, AVX-512)
convolutions, and the im2col matmul of `wbc_jax.models.Conv3x3` materialises a 9x patch
tensor. This module calls oneDNN instead: `_onednn_conv.so` (built from csrc/onednn_conv.cc by
`pip install`, against the PyPI packages onednn-cpu-gomp and onednn-devel-cpu-gomp) holds three
XLA FFI handlers, forward, input gradient and weight gradient, for float32 NHWC activations and
HWIO kernels. `conv2d` wires them into JAX with `jax.custom_vjp`; each of the three passes is
itself differentiable through the other two, so gradients of gradients (the GANs' R1 penalty)
work too. Under `jax.vmap` (a seed axis of params and batches) the handlers loop over the
vmapped axes inside one custom call (`vmap_method='expand_dims'`).

The library is optional: `available()` says whether it loaded, and the module imports without
it. It runs on the CPU backend only; arrays on other devices take XLA's own convolution.

Environment:
  WBC_JAX_ONEDNN_LIB: path of _onednn_conv.so, instead of looking next to this module.
  WBC_JAX_ONEDNN_THREADS: threads per oneDNN call (default: OpenMP's, OMP_NUM_THREADS or the
    number of cores).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import threading
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Padding = Union[str, Sequence[tuple[int, int]]]

_LIB_FILE = '_onednn_conv.so'
_TARGETS = {
    'wbc_onednn_conv_fwd': 'WbcOnednnConvFwd',
    'wbc_onednn_conv_bwd_data': 'WbcOnednnConvBwdData',
    'wbc_onednn_conv_bwd_weights': 'WbcOnednnConvBwdWeights',
}

# How the custom calls batch under jax.vmap: 'expand_dims' loops over the vmapped axes inside
# one call; 'sequential' would make XLA loop over calls (kept switchable for measurements).
_VMAP_METHOD = 'expand_dims'

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_loaded = False


def _find_library() -> str | None:
  """Path of _onednn_conv.so: $WBC_JAX_ONEDNN_LIB, else the first in the package's __path__.

  An editable install keeps the Python files in the source tree and puts the built library in
  site-packages; the package's __path__ holds both directories.
  """
  env = os.environ.get('WBC_JAX_ONEDNN_LIB')
  if env:
    return env
  import wbc_jax  # pylint: disable=import-outside-toplevel
  dirs = [*getattr(wbc_jax, '__path__', ()), os.path.dirname(os.path.abspath(__file__))]
  for d in dirs:
    path = os.path.join(d, _LIB_FILE)
    if os.path.exists(path):
      return path
  return None


def _preload_onednn() -> None:
  """Loads libdnnl.so.3 from the onednn-cpu-gomp distribution, so the library's dependency
  resolves whatever the install layout (the library's own rpath covers only a plain wheel)."""
  try:
    files = importlib.metadata.distribution('onednn-cpu-gomp').files or ()
  except importlib.metadata.PackageNotFoundError:
    return
  for f in files:
    if f.name == 'libdnnl.so.3':
      path = os.path.realpath(f.locate())
      if os.path.exists(path):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
      return


def _load() -> ctypes.CDLL | None:
  """Loads the library and registers its FFI targets with XLA, once per process."""
  global _lib, _load_error, _loaded
  with _lock:
    if _loaded:
      return _lib
    _loaded = True
    path = _find_library()
    if path is None:
      _load_error = (f'{_LIB_FILE} not found (not built: pip install -e . builds it where '
                     'onednn-cpu-gomp is available, Linux x86-64)')
      return None
    try:
      _preload_onednn()
      lib = ctypes.CDLL(path)
      for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform='cpu')
      lib.WbcOnednnVersion.restype = ctypes.c_int
      lib.WbcOnednnDescribeCache.restype = ctypes.c_int
      lib.WbcOnednnDescribeCache.argtypes = [ctypes.c_char_p, ctypes.c_int]
      lib.WbcOnednnSetNumThreads.argtypes = [ctypes.c_int]
      lib.WbcOnednnSetBlockedPasses.argtypes = [ctypes.c_int]
      lib.WbcOnednnSetBlockedPasses.restype = ctypes.c_int
      threads = os.environ.get('WBC_JAX_ONEDNN_THREADS')
      if threads:
        lib.WbcOnednnSetNumThreads(int(threads))
    except (OSError, AttributeError, ValueError) as e:
      _load_error = f'{path}: {e}'
      return None
    _lib = lib
    return lib


def available() -> bool:
  """Whether the oneDNN library loaded (and its FFI targets are registered)."""
  return _load() is not None


def load_error() -> str | None:
  """Why `available()` is False (None when it is True or not yet asked)."""
  _load()
  return _load_error


def version() -> str:
  """oneDNN's version, e.g. '3.2.0'."""
  lib = _require()
  v = lib.WbcOnednnVersion()
  return f'{v // 10000}.{v // 100 % 100}.{v % 100}'


def set_num_threads(n: int) -> None:
  """Threads per oneDNN call from now on; 0 restores OpenMP's default."""
  _require().WbcOnednnSetNumThreads(int(n))


def set_blocked_passes(forward: bool, backward_data: bool,
                       backward_weights: bool) -> tuple[bool, bool, bool]:
  """Which passes let oneDNN choose the activations' layout (reordered from and to NHWC around
  each call) rather than run on NHWC. By default only the weight gradient does (see
  csrc/onednn_conv.cc). Applies to the next calls, also of compiled programs.

  Returns:
    The previous setting, in the same order.
  """
  old = _require().WbcOnednnSetBlockedPasses(int(forward) | int(backward_data) << 1
                                             | int(backward_weights) << 2)
  return bool(old & 1), bool(old & 2), bool(old & 4)


def describe_cache() -> str:
  """One line per cached oneDNN primitive: pass, shape key and oneDNN's implementation name
  (e.g. 'brg_conv_fwd:avx512_core' or 'jit:avx512_core'; 'ref' or 'gemm' would be slow)."""
  lib = _require()
  size = lib.WbcOnednnDescribeCache(None, 0) + 1
  buf = ctypes.create_string_buffer(size)
  lib.WbcOnednnDescribeCache(buf, size)
  return buf.value.decode()


def _require() -> ctypes.CDLL:
  lib = _load()
  if lib is None:
    raise RuntimeError(f'oneDNN convolution unavailable: {_load_error}')
  return lib


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def same_pads(size: int, stride: int, kernel_size: int) -> tuple[int, int]:
  """(before, after) padding of one axis for XLA/TensorFlow 'SAME': ceil(size / stride)
  outputs, an odd total padding puts the extra row or column after."""
  total = max((-(-size // stride) - 1) * stride + kernel_size - size, 0)
  return total // 2, total - total // 2


def _geometry(x_shape, kernel_shape, stride, padding) -> tuple[int, ...]:
  """(stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right), all Python ints."""
  sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
  kh, kw = kernel_shape[:2]
  if isinstance(padding, str):
    if padding == 'SAME':
      (pt, pb), (pl, pr) = same_pads(x_shape[1], sh, kh), same_pads(x_shape[2], sw, kw)
    elif padding == 'VALID':
      pt = pb = pl = pr = 0
    else:
      raise ValueError(f"padding must be 'SAME', 'VALID' or pairs, got {padding!r}")
  else:
    (pt, pb), (pl, pr) = padding
  geom = tuple(int(v) for v in (sh, sw, pt, pb, pl, pr))
  if min(geom[:2]) < 1 or min(geom[2:]) < 0:
    raise ValueError(f'strides must be >= 1 and pads >= 0, got {geom}')
  return geom


def _out_hw(in_hw, kernel_hw, geom) -> tuple[int, int]:
  sh, sw, pt, pb, pl, pr = geom
  return ((in_hw[0] + pt + pb - kernel_hw[0]) // sh + 1,
          (in_hw[1] + pl + pr - kernel_hw[1]) // sw + 1)


def _attrs(geom) -> dict[str, np.int64]:
  names = ('stride_h', 'stride_w', 'pad_top', 'pad_bottom', 'pad_left', 'pad_right')
  return {name: np.int64(v) for name, v in zip(names, geom)}


def _call(target: str, shape, *args, geom) -> Array:
  _require()  # registers the targets before the first lowering
  # expand_dims: under vmap an unbatched operand gets a size-1 axis, which the handler reads
  # again for every index instead of XLA materialising copies.
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method=_VMAP_METHOD)(*args, **_attrs(geom))


# --------------------------------------------------------------------------------------------
# The three passes, each differentiable through the others
# --------------------------------------------------------------------------------------------
#
# With y = conv(x, k): dx = bwd_data(dy, k) and dk = bwd_weights(x, dy) are bilinear, and
# <c, bwd_data(dy, k)> = <conv(c, k), dy>, <c, bwd_weights(x, dy)> = <conv(x, c), dy>, so the
# cotangents of the backward passes are again convolutions of the three kinds.


def _conv_impl(x: Array, kernel: Array, geom: tuple[int, ...]) -> Array:
  """x [N, H, W, Ci], kernel [KH, KW, Ci, Co] -> y [N, Ho, Wo, Co]."""
  n, h, w, _ = x.shape
  ho, wo = _out_hw((h, w), kernel.shape[:2], geom)
  return _call('wbc_onednn_conv_fwd', (n, ho, wo, kernel.shape[3]), x, kernel, geom=geom)


_conv = jax.custom_vjp(_conv_impl, nondiff_argnums=(2,))


def _conv_fwd(x, kernel, geom):
  return _conv(x, kernel, geom), (x, kernel)


def _conv_bwd(geom, res, dy):
  x, kernel = res
  return (_bwd_data(dy, kernel, geom, x.shape[1:3]),
          _bwd_weights(x, dy, geom, kernel.shape[:2]))


def _bwd_data_impl(dy: Array, kernel: Array, geom: tuple[int, ...], in_hw) -> Array:
  """dy [N, Ho, Wo, Co], kernel [KH, KW, Ci, Co] -> dx [N, H, W, Ci] (H, W = in_hw)."""
  return _call('wbc_onednn_conv_bwd_data', (dy.shape[0], *in_hw, kernel.shape[2]), dy, kernel,
               geom=geom)


def _bwd_weights_impl(x: Array, dy: Array, geom: tuple[int, ...], kernel_hw) -> Array:
  """x [N, H, W, Ci], dy [N, Ho, Wo, Co] -> dk [KH, KW, Ci, Co] (KH, KW = kernel_hw)."""
  return _call('wbc_onednn_conv_bwd_weights', (*kernel_hw, x.shape[3], dy.shape[3]), x, dy,
               geom=geom)


_bwd_data = jax.custom_vjp(_bwd_data_impl, nondiff_argnums=(2, 3))
_bwd_weights = jax.custom_vjp(_bwd_weights_impl, nondiff_argnums=(2, 3))


def _bwd_data_fwd(dy, kernel, geom, in_hw):
  return _bwd_data(dy, kernel, geom, in_hw), (dy, kernel)


def _bwd_data_bwd(geom, in_hw, res, c):
  dy, kernel = res
  return _conv(c, kernel, geom), _bwd_weights(c, dy, geom, kernel.shape[:2])


def _bwd_weights_fwd(x, dy, geom, kernel_hw):
  return _bwd_weights(x, dy, geom, kernel_hw), (x, dy)


def _bwd_weights_bwd(geom, kernel_hw, res, c):
  x, dy = res
  return _bwd_data(dy, c, geom, x.shape[1:3]), _conv(x, c, geom)


_conv.defvjp(_conv_fwd, _conv_bwd)
_bwd_data.defvjp(_bwd_data_fwd, _bwd_data_bwd)
_bwd_weights.defvjp(_bwd_weights_fwd, _bwd_weights_bwd)


def conv2d(x: Array, kernel: Array, stride: int | Sequence[int] = 1,
           padding: Padding = 'SAME') -> Array:
  """NHWC convolution with an HWIO kernel through oneDNN, no bias.

  The same result as `lax.conv_general_dilated(x, kernel, (sh, sw), padding,
  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`; differentiable (any order of reverse mode),
  jittable and vmappable (vmapped axes are looped over inside one custom call).

  Args:
    x: [batch, height, width, cin].
    kernel: [kh, kw, cin, cout].
    stride: one int for both spatial axes, or (stride_h, stride_w).
    padding: 'SAME' (XLA/TensorFlow's, also for stride 2), 'VALID', or ((top, bottom),
      (left, right)).

  Returns:
    [batch, out_height, out_width, cout], out = (size + pads - k) // stride + 1, in the result
    type of x and kernel (computed in float32).

  Raises:
    RuntimeError: the library is not available (see `load_error()`).
  """
  _require()
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[3] != kernel.shape[2]:
    raise ValueError(f'expected x [N, H, W, Ci] and kernel [KH, KW, Ci, Co], got {x.shape} '
                     f'and {kernel.shape}')
  dtype = jnp.result_type(x, kernel)
  geom = _geometry(x.shape, kernel.shape, stride, padding)
  y = _conv(x.astype(jnp.float32), kernel.astype(jnp.float32), geom)
  return y.astype(dtype)
