// XLA FFI handlers for float32 NHWC 2-D convolution on CPU through oneDNN.
//
// Three handlers, one per pass of a convolution layer:
//   WbcOnednnConvFwd            x [..., N, H, W, Ci], w [..., KH, KW, Ci, Co] -> y [..., N, Ho, Wo, Co]
//   WbcOnednnConvBwdData        dy [..., N, Ho, Wo, Co], w [..., KH, KW, Ci, Co] -> dx [..., N, H, W, Ci]
//   WbcOnednnConvBwdWeights     x [..., N, H, W, Ci], dy [..., N, Ho, Wo, Co] -> dw [..., KH, KW, Ci, Co]
// with attributes stride_h, stride_w and explicit pads pad_top, pad_bottom, pad_left, pad_right
// (so both 'SAME' and 'VALID' map onto them), Ho = (H + pad_top + pad_bottom - KH) / stride_h + 1
// (floor), likewise Wo. Kernels are HWIO, as flax and lax use them.
//
// Leading '...' axes are vmap's (jax.ffi.ffi_call with vmap_method='expand_dims'): every
// operand has the result's number of them, each of the result's size or 1 (an operand that was
// not batched, read again for every index instead of being copied). The handler loops over
// them, one oneDNN call per index, so a seed-vmapped train step runs S convolutions of batch N
// in one custom call rather than S custom calls in a while loop.
//
// oneDNN primitives are built once per shape and kept in a process-wide cache: building one
// JIT-compiles a kernel (milliseconds), running it is the fast part. The forward and
// backward-data passes run on the caller's NHWC activations directly (oneDNN's AVX2/AVX-512
// kernels read NHWC, so there is no activation copy); the weight gradient lets oneDNN choose
// blocked activation layouts and reorders into them, because its NHWC weight-gradient kernel
// made the paper CNN's train step ~25% slower on a 2-core AVX2 machine (WbcOnednnSetBlockedPasses
// changes this per pass). Weights always get the layout the primitive asks for, reordered from
// (or, for the weight gradient, to) HWIO on each call, which is cheap at these sizes.
// The scratchpad is the caller's (scratchpad_mode::user): a per-thread buffer that also holds the
// reordered copies, because XLA may run independent custom calls on several threads at once.

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

enum Kind : int64_t { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

// Passes that let oneDNN choose the activations' layout (see the top of the file).
constexpr int kDefaultBlockedPasses = 1 << kBwdWeights;

// One convolution's geometry, per vmap index.
struct Geometry {
  int64_t n, h, w, ci, ho, wo, co, kh, kw, sh, sw, pt, pb, pl, pr;
};

// Which passes let oneDNN pick the activations' layout (format_tag::any, with reorders from and
// to NHWC around the call) instead of running on NHWC directly. Bit k is pass k (Kind).
std::atomic<int> blocked_passes{kDefaultBlockedPasses};

using Key = std::array<int64_t, 17>;

Key MakeKey(Kind kind, bool blocked, const Geometry& g) {
  return {kind, blocked, g.n, g.h, g.w, g.ci, g.ho, g.wo, g.co, g.kh, g.kw, g.sh, g.sw, g.pt,
          g.pb, g.pl, g.pr};
}

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// One tensor argument of a primitive: where it comes from and the layout the primitive wants.
struct Operand {
  int arg = 0;              // DNNL_ARG_*
  int slot = 0;             // the handler's buffer: 0, 1 = its two inputs, 2 = its result
  memory::desc user_md;     // NHWC or HWIO, as XLA holds it
  memory::desc prim_md;     // as the primitive wants it
  bool reorder = false;     // prim_md != user_md: go through a scratch copy
  dnnl::reorder convert;    // user -> prim for inputs, prim -> user for the result
  size_t offset = 0;        // of the scratch copy in the per-thread buffer
};

// A built primitive and what a call needs besides the caller's buffers.
struct Plan {
  dnnl::primitive prim;
  std::array<Operand, 3> operands;
  memory::desc scratchpad_md;
  size_t buffer_bytes = 0;  // scratchpad + reordered operands
  std::string impl;
};

struct Dims {
  memory::dims src, wei, dst, strides, pad_l, pad_r;
};

Dims MakeDims(const Geometry& g) {
  // oneDNN names dimensions logically (N, C, H, W and O, I, H, W) whatever the memory layout.
  return {{g.n, g.ci, g.h, g.w},   {g.co, g.ci, g.kh, g.kw}, {g.n, g.co, g.ho, g.wo},
          {g.sh, g.sw},            {g.pt, g.pl},             {g.pb, g.pr}};
}

Operand MakeOperand(int arg, int slot, const memory::desc& user_md,
                    const memory::desc& prim_md) {
  Operand op;
  op.arg = arg;
  op.slot = slot;
  op.user_md = user_md;
  op.prim_md = prim_md;
  op.reorder = prim_md != user_md;
  if (op.reorder) {
    op.convert = slot == 2 ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), prim_md,
                                                                         Engine(), user_md))
                           : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), user_md,
                                                                         Engine(), prim_md));
  }
  return op;
}

std::unique_ptr<Plan> BuildPlan(Kind kind, bool blocked, const Geometry& g) {
  auto plan = std::make_unique<Plan>();
  Dims d = MakeDims(g);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const memory::desc user_src(d.src, dt::f32, tag::nhwc), user_dst(d.dst, dt::f32, tag::nhwc);
  const memory::desc user_wei(d.wei, dt::f32, tag::hwio);
  const tag act = blocked ? tag::any : tag::nhwc;
  const memory::desc src(d.src, dt::f32, act), dst(d.dst, dt::f32, act);
  const memory::desc wei(d.wei, dt::f32, tag::any);
  // Also the hint of the backward passes, which pick layouts consistent with it.
  dnnl::convolution_forward::primitive_desc fwd_pd(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, wei,
      dst, d.strides, d.pad_l, d.pad_r, attr);
  if (kind == kFwd) {
    plan->prim = dnnl::convolution_forward(fwd_pd);
    plan->operands = {MakeOperand(DNNL_ARG_SRC, 0, user_src, fwd_pd.src_desc()),
                      MakeOperand(DNNL_ARG_WEIGHTS, 1, user_wei, fwd_pd.weights_desc()),
                      MakeOperand(DNNL_ARG_DST, 2, user_dst, fwd_pd.dst_desc())};
    plan->scratchpad_md = fwd_pd.scratchpad_desc();
    plan->impl = fwd_pd.impl_info_str();
  } else if (kind == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, src, wei, dst, d.strides, d.pad_l,
        d.pad_r, fwd_pd, attr);
    plan->prim = dnnl::convolution_backward_data(pd);
    plan->operands = {MakeOperand(DNNL_ARG_DIFF_DST, 0, user_dst, pd.diff_dst_desc()),
                      MakeOperand(DNNL_ARG_WEIGHTS, 1, user_wei, pd.weights_desc()),
                      MakeOperand(DNNL_ARG_DIFF_SRC, 2, user_src, pd.diff_src_desc())};
    plan->scratchpad_md = pd.scratchpad_desc();
    plan->impl = pd.impl_info_str();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, src, wei, dst, d.strides, d.pad_l,
        d.pad_r, fwd_pd, attr);
    plan->prim = dnnl::convolution_backward_weights(pd);
    plan->operands = {MakeOperand(DNNL_ARG_SRC, 0, user_src, pd.src_desc()),
                      MakeOperand(DNNL_ARG_DIFF_DST, 1, user_dst, pd.diff_dst_desc()),
                      MakeOperand(DNNL_ARG_DIFF_WEIGHTS, 2, user_wei, pd.diff_weights_desc())};
    plan->scratchpad_md = pd.scratchpad_desc();
    plan->impl = pd.impl_info_str();
  }
  auto align = [](size_t n) { return (n + 63) / 64 * 64; };
  size_t bytes = align(plan->scratchpad_md.get_size());
  for (Operand& op : plan->operands) {
    if (!op.reorder) continue;
    op.offset = bytes;
    bytes += align(op.prim_md.get_size());
  }
  plan->buffer_bytes = bytes;
  return plan;
}

// Process-wide cache of plans; plans are immutable once built and oneDNN primitives may be
// executed from several threads at once (each with its own scratchpad).
std::mutex cache_mutex;
std::map<Key, std::unique_ptr<Plan>>& Cache() {
  static auto* cache = new std::map<Key, std::unique_ptr<Plan>>();
  return *cache;
}

const Plan& GetPlan(Kind kind, const Geometry& g) {
  bool blocked = (blocked_passes.load(std::memory_order_relaxed) >> kind) & 1;
  Key key = MakeKey(kind, blocked, g);
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto& cache = Cache();
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, BuildPlan(kind, blocked, g)).first;
  return *it->second;
}

// 64-byte-aligned per-thread buffer, grown as needed, for the scratchpad and reordered weights.
struct ScratchBuffer {
  char* data = nullptr;
  size_t size = 0;
  ~ScratchBuffer() { std::free(data); }
  char* Get(size_t bytes) {
    if (bytes > size) {
      std::free(data);
      size = (bytes + 4095) / 4096 * 4096;
      data = static_cast<char*>(std::aligned_alloc(64, size));
      if (data == nullptr) size = 0;
    }
    return data;
  }
};

// Threads oneDNN's OpenMP runtime uses per call; 0 leaves OpenMP's default (OMP_NUM_THREADS or
// the core count). Set from Python (WbcOnednnSetNumThreads). OpenMP keeps the count per calling
// thread, and XLA calls handlers from its own pool threads, so each applies it on first use.
std::atomic<int> num_threads{0};
std::atomic<int> num_threads_generation{0};

void ApplyNumThreads() {
  thread_local int seen_generation = -1;
  int generation = num_threads_generation.load(std::memory_order_relaxed);
  if (generation != seen_generation) {
    seen_generation = generation;
    int n = num_threads.load(std::memory_order_relaxed);
    if (n > 0) omp_set_num_threads(n);
  }
}

// Leading (vmap) axes: the result's sizes, and each operand's element strides over them (0
// where the operand has size 1, so that it is reused).
struct Batch {
  std::vector<int64_t> sizes;
  int64_t count = 1;
};

ffi::Error CheckLeading(ffi::Span<const int64_t> dims, size_t lead, const Batch& batch,
                        const char* name) {
  if (dims.size() != lead + 4) {
    return ffi::Error::InvalidArgument(std::string(name) + ": expected rank " +
                                       std::to_string(lead + 4));
  }
  for (size_t i = 0; i < lead; ++i) {
    if (dims[i] != batch.sizes[i] && dims[i] != 1) {
      return ffi::Error::InvalidArgument(std::string(name) +
                                         ": leading axes do not broadcast to the result's");
    }
  }
  return ffi::Error::Success();
}

// Element offset of batch index `flat` in an operand with leading dims `dims[:lead]` and
// `inner` elements per index.
int64_t Offset(ffi::Span<const int64_t> dims, size_t lead, const Batch& batch, int64_t flat,
               int64_t inner) {
  int64_t offset = 0, stride = inner;
  for (size_t i = lead; i-- > 0;) {
    int64_t idx = flat % batch.sizes[i];
    flat /= batch.sizes[i];
    if (dims[i] != 1) offset += idx * stride;
    stride *= dims[i];
  }
  return offset;
}

int64_t Inner(ffi::Span<const int64_t> dims, size_t lead) {
  int64_t n = 1;
  for (size_t i = lead; i < dims.size(); ++i) n *= dims[i];
  return n;
}

struct Attrs {
  int64_t sh, sw, pt, pb, pl, pr;
};

ffi::Error Run(Kind kind, const Attrs& a, ffi::Buffer<ffi::F32> in0, ffi::Buffer<ffi::F32> in1,
               ffi::Result<ffi::Buffer<ffi::F32>> out) {
  auto d0 = in0.dimensions(), d1 = in1.dimensions(), dout = out->dimensions();
  if (dout.size() < 4) return ffi::Error::InvalidArgument("result rank must be at least 4");
  size_t lead = dout.size() - 4;
  Batch batch;
  for (size_t i = 0; i < lead; ++i) {
    batch.sizes.push_back(dout[i]);
    batch.count *= dout[i];
  }
  if (auto e = CheckLeading(d0, lead, batch, "first operand"); e.failure()) return e;
  if (auto e = CheckLeading(d1, lead, batch, "second operand"); e.failure()) return e;

  // Which buffer is which tensor, per pass.
  ffi::Span<const int64_t> x_dims, y_dims, w_dims;
  if (kind == kFwd) {
    x_dims = d0, w_dims = d1, y_dims = dout;
  } else if (kind == kBwdData) {
    y_dims = d0, w_dims = d1, x_dims = dout;
  } else {
    x_dims = d0, y_dims = d1, w_dims = dout;
  }
  Geometry g{x_dims[lead],     x_dims[lead + 1], x_dims[lead + 2], x_dims[lead + 3],
             y_dims[lead + 1], y_dims[lead + 2], y_dims[lead + 3], w_dims[lead],
             w_dims[lead + 1], a.sh,             a.sw,             a.pt,
             a.pb,             a.pl,             a.pr};
  if (y_dims[lead] != g.n || w_dims[lead + 2] != g.ci || w_dims[lead + 3] != g.co) {
    return ffi::Error::InvalidArgument("operand shapes do not form a convolution");
  }
  if ((g.h + g.pt + g.pb - g.kh) / g.sh + 1 != g.ho ||
      (g.w + g.pl + g.pr - g.kw) / g.sw + 1 != g.wo) {
    return ffi::Error::InvalidArgument("output size does not match strides and padding");
  }
  if (batch.count == 0 || g.n == 0 || g.co == 0 || g.ci == 0) return ffi::Error::Success();

  try {
    ApplyNumThreads();
    const Plan& plan = GetPlan(kind, g);
    thread_local ScratchBuffer scratch_buffer;
    char* scratch = scratch_buffer.Get(plan.buffer_bytes + 64);
    if (scratch == nullptr) return ffi::Error::Internal("out of memory for the scratchpad");
    thread_local dnnl::stream* stream = new dnnl::stream(Engine());

    const ffi::Span<const int64_t> slot_dims[3] = {d0, d1, dout};
    int64_t slot_inner[3];
    for (int i = 0; i < 3; ++i) slot_inner[i] = Inner(slot_dims[i], lead);
    float* slot_data[3] = {in0.typed_data(), in1.typed_data(), out->typed_data()};
    for (int64_t b = 0; b < batch.count; ++b) {
      std::unordered_map<int, memory> args;
      args.emplace(DNNL_ARG_SCRATCHPAD, memory(plan.scratchpad_md, Engine(), scratch));
      memory user[3], prim[3];
      for (int i = 0; i < 3; ++i) {
        const Operand& op = plan.operands[i];
        float* data = slot_data[op.slot] + Offset(slot_dims[op.slot], lead, batch, b,
                                                  slot_inner[op.slot]);
        user[i] = memory(op.user_md, Engine(), data);
        prim[i] = op.reorder ? memory(op.prim_md, Engine(), scratch + op.offset) : user[i];
        if (op.reorder && op.slot != 2) op.convert.execute(*stream, user[i], prim[i]);
        args.emplace(op.arg, prim[i]);
      }
      plan.prim.execute(*stream, args);
      for (int i = 0; i < 3; ++i) {
        const Operand& op = plan.operands[i];
        if (op.reorder && op.slot == 2) op.convert.execute(*stream, prim[i], user[i]);
      }
    }
    stream->wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Fwd(int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
               ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
               ffi::Result<ffi::Buffer<ffi::F32>> y) {
  return Run(kFwd, {sh, sw, pt, pb, pl, pr}, x, w, y);
}

ffi::Error BwdData(int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                   ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                   ffi::Result<ffi::Buffer<ffi::F32>> dx) {
  return Run(kBwdData, {sh, sw, pt, pb, pl, pr}, dy, w, dx);
}

ffi::Error BwdWeights(int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                      ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::Result<ffi::Buffer<ffi::F32>> dw) {
  return Run(kBwdWeights, {sh, sw, pt, pb, pl, pr}, x, dy, dw);
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right");
}

}  // namespace

// The library is built with hidden visibility; what follows is its exported C interface.
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(WbcOnednnConvFwd, Fwd,
                              Binding()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(WbcOnednnConvBwdData, BwdData,
                              Binding()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(WbcOnednnConvBwdWeights, BwdWeights,
                              Binding()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw
);

extern "C" {

// Threads per oneDNN call (0: OpenMP's default). Takes effect on each XLA thread's next call.
void WbcOnednnSetNumThreads(int n) {
  num_threads.store(n < 0 ? 0 : n, std::memory_order_relaxed);
  num_threads_generation.fetch_add(1, std::memory_order_relaxed);
}

// Bit k set: pass k (0 forward, 1 backward data, 2 backward weights) lets oneDNN choose the
// activations' layout, reordering them from and to NHWC; clear: it runs on NHWC. Returns the
// previous mask. Plans already built keep theirs (the mask is part of the cache key).
int WbcOnednnSetBlockedPasses(int mask) {
  return blocked_passes.exchange(mask & 7, std::memory_order_relaxed);
}

// oneDNN's version, as major * 10000 + minor * 100 + patch.
int WbcOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

// Writes "pass N H W Ci -> Ho Wo Co KHxKW stride pads: implementation" lines for the cached
// primitives into buf (NUL-terminated, truncated to size); returns the length needed.
int WbcOnednnDescribeCache(char* buf, int size) {
  static const char* kNames[] = {"fwd", "bwd_data", "bwd_weights"};
  std::string text;
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    for (const auto& [k, plan] : Cache()) {
      text += std::string(kNames[k[0]]);
      for (size_t i = 2; i < k.size(); ++i) text += " " + std::to_string(k[i]);
      text += ": " + plan->impl;
      static const char* kArgs[] = {"first input", "second input", "result"};
      for (const Operand& op : plan->operands) {
        if (op.reorder) text += std::string(", ") + kArgs[op.slot] + " reordered";
      }
      text += k[1] ? " (blocked activations)\n" : "\n";
    }
  }
  if (buf != nullptr && size > 0) {
    size_t n = std::min(text.size(), static_cast<size_t>(size - 1));
    std::memcpy(buf, text.data(), n);
    buf[n] = '\0';
  }
  return static_cast<int>(text.size());
}

}  // extern "C"

#pragma GCC visibility pop
