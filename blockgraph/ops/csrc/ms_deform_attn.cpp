// CPU kernels of the multi-scale deformable attention core (Zhu et al., "Deformable DETR: Deformable Transformers
// for End-to-End Object Detection", ICLR 2021), registered as the ops `blockgraph_msda::forward` / `::backward`.
//
// Layouts (contiguous, one floating dtype):
//   value  [N, S, M, D]         read in place: level l is value[:, start_l : start_l + H_l*W_l] (row-major pixels)
//   loc    [N, Lq, M, L, P, 2]  normalized (x, y); pixel coordinate x = loc_x * W_l - 0.5 (align_corners=False)
//   attn   [N, Lq, M, L, P]     attention weights
//   out    [N, Lq, M, D]        = sum_{l,p} attn * bilinear(value_l, loc), zero padding
//
// Memory traffic: the forward finds the corners of row (n, q + 1), and prefetches their value rows, while it sums
// row (n, q); the backward prefetches the per-sample inputs and outputs of query q + 8 (a head's task reads every
// M-th block of them, too sparse for the hardware prefetcher).
//
// Determinism: no atomics. The forward parallelises over (n, q): each task owns its output rows. The backward
// parallelises over heads (n, m), or (n, m, l) when there are fewer heads than threads: a task owns
// grad_value[n, its levels' rows, m, :] and the location/weight gradients of its samples, and visits its samples
// in a fixed order (q, then l, then p). A value row of level l only receives contributions from level-l samples, so
// each of its sums is taken in the same order whatever the thread count or the task split.
//
// Instruction sets: the loops are compiled twice, for the x86-64 baseline and with AVX2+FMA (GCC target attribute);
// the AVX2 copy runs where both the CPU and torch's own kernels use AVX2 (decided once per process). This keeps the
// cached binary portable (no -march=native) at the price of a second copy of two loops. Each copy also has a
// compile-time D = 32 instance (the Deformable-DETR head size, 256 / 8).
//
// Rounding of the pixel coordinate: grid_sample (the reference) unnormalizes g = 2 * loc - 1 as
// (g + 1) * (W / 2) - 0.5, as one fused multiply-add in its AVX2/AVX512 kernels. We do the same (std::fma) in the
// AVX2 copy and unfused in the baseline copy, so floor(x) agrees with the reference at pixel centres, where the
// derivative w.r.t. the location is one-sided (tests/ops: test_pixel_centres_take_the_same_side...).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#define MSDA_AVX2 1
#endif

// Helpers are force-inlined into each instruction-set copy of the loops, and compiled for it.
#define MSDA_INLINE inline __attribute__((always_inline))

namespace {

// Sizes shared by both kernels.
struct Geometry {
  int64_t N, S, M, D, Lq, L, P;
  std::vector<int64_t> H, W, start;
};

Geometry geometry(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                  const at::Tensor& attn) {
  Geometry g{value.size(0), value.size(1), value.size(2), value.size(3), attn.size(1), attn.size(3), attn.size(4),
             {}, {}, {}};
  TORCH_CHECK(shapes.numel() == 2 * g.L && starts.numel() == g.L, "spatial_shapes must be [L, 2] and ",
              "level_start_index [L] with L = ", g.L);
  const auto sh = shapes.to(at::kCPU, at::kLong).contiguous();
  const auto st = starts.to(at::kCPU, at::kLong).contiguous();
  const int64_t* shp = sh.const_data_ptr<int64_t>();
  const int64_t* stp = st.const_data_ptr<int64_t>();
  for (int64_t l = 0; l < g.L; ++l) {
    g.H.push_back(shp[2 * l]);
    g.W.push_back(shp[2 * l + 1]);
    g.start.push_back(stp[l]);
    TORCH_CHECK(g.H[l] >= 0 && g.W[l] >= 0 && g.start[l] >= 0 && g.start[l] + g.H[l] * g.W[l] <= g.S, "level ", l,
                " (", g.H[l], "x", g.W[l], " from row ", g.start[l], ") does not fit in value's ", g.S, " rows");
  }
  return g;
}

// The four bilinear corners of one sample: corner c = (y0 + c / 2, x0 + c % 2). `offset` is the element offset of
// the corner's D-vector from the level's (pixel 0, head m) origin, or -1 outside the map; `weight` is 0 outside.
template <typename scalar_t>
struct Corners {
  std::array<int64_t, 4> offset;
  std::array<scalar_t, 4> weight;
  scalar_t fx, fy;
};

// Pixel coordinate of a normalized location on a map of `size` pixels, rounded as grid_sample rounds it.
template <bool kFused, typename scalar_t>
MSDA_INLINE scalar_t unnormalize(scalar_t loc, int64_t size) {
  const scalar_t grid_plus_one = (loc * 2 - 1) + 1;
  const scalar_t half = static_cast<scalar_t>(size) / 2;
  if constexpr (kFused) return std::fma(grid_plus_one, half, scalar_t(-0.5));
  return grid_plus_one * half - scalar_t(0.5);
}

// Returns false when no corner lies inside the H x W map (the sample then contributes nothing, nor any gradient;
// NaN coordinates land here too).
template <bool kFused, typename scalar_t>
MSDA_INLINE bool locate(const scalar_t* loc, int64_t H, int64_t W, int64_t row_stride, Corners<scalar_t>& c) {
  const scalar_t x = unnormalize<kFused>(loc[0], W), y = unnormalize<kFused>(loc[1], H);
  if (!(x >= -1 && x < W && y >= -1 && y < H)) return false;
  const scalar_t xf = std::floor(x), yf = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  c.fx = x - xf;
  c.fy = y - yf;
  const scalar_t gx = 1 - c.fx, gy = 1 - c.fy;
  const bool in_x0 = x0 >= 0, in_x1 = x0 + 1 < W, in_y0 = y0 >= 0, in_y1 = y0 + 1 < H;
  const int64_t base = (y0 * W + x0) * row_stride;
  c.offset = {in_y0 && in_x0 ? base : -1, in_y0 && in_x1 ? base + row_stride : -1,
              in_y1 && in_x0 ? base + W * row_stride : -1, in_y1 && in_x1 ? base + (W + 1) * row_stride : -1};
  c.weight = {in_y0 && in_x0 ? gy * gx : scalar_t(0), in_y0 && in_x1 ? gy * c.fx : scalar_t(0),
              in_y1 && in_x0 ? c.fy * gx : scalar_t(0), in_y1 && in_x1 ? c.fy * c.fx : scalar_t(0)};
  return true;
}

// Prefetch the cache lines of n contiguous elements.
template <typename scalar_t>
MSDA_INLINE void prefetch(const scalar_t* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(scalar_t)); b += 64) __builtin_prefetch(bytes + b);
}

// o += w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3 over D channels.
template <typename scalar_t>
MSDA_INLINE void gather4(scalar_t* __restrict__ o, const scalar_t* __restrict__ v0, const scalar_t* __restrict__ v1,
                         const scalar_t* __restrict__ v2, const scalar_t* __restrict__ v3, scalar_t w0, scalar_t w1,
                         scalar_t w2, scalar_t w3, int64_t D) {
  for (int64_t d = 0; d < D; ++d) o[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
}

// The four dot products <g, v_c>. `omp simd` lets the compiler keep vector partial sums (a fixed reassociation:
// the same order on every run).
template <typename scalar_t>
MSDA_INLINE std::array<scalar_t, 4> dot4(const scalar_t* __restrict__ g, const scalar_t* __restrict__ v0,
                                         const scalar_t* __restrict__ v1, const scalar_t* __restrict__ v2,
                                         const scalar_t* __restrict__ v3, int64_t D) {
  scalar_t r0 = 0, r1 = 0, r2 = 0, r3 = 0;
#pragma omp simd reduction(+ : r0, r1, r2, r3)
  for (int64_t d = 0; d < D; ++d) {
    r0 += g[d] * v0[d];
    r1 += g[d] * v1[d];
    r2 += g[d] * v2[d];
    r3 += g[d] * v3[d];
  }
  return {r0, r1, r2, r3};
}

// o += w * g over D channels.
template <typename scalar_t>
MSDA_INLINE void axpy(scalar_t* __restrict__ o, const scalar_t* __restrict__ g, scalar_t w, int64_t D) {
  for (int64_t d = 0; d < D; ++d) o[d] += w * g[d];
}

// The corners of the M*L*P samples of output row nq (and a prefetch of their value rows).
template <bool kFused, typename scalar_t>
MSDA_INLINE void find_row_corners(const Geometry& g, int64_t D, const scalar_t* value, const scalar_t* loc,
                                  int64_t nq, Corners<scalar_t>* cs, char* ok) {
  const int64_t n = nq / g.Lq, MD = g.M * D, MLP = g.M * g.L * g.P;
  for (int64_t m = 0; m < g.M; ++m)
    for (int64_t l = 0; l < g.L; ++l) {
      const scalar_t* v = value + (n * g.S + g.start[l]) * MD + m * D;  // level l, head m, pixel 0
      for (int64_t p = 0; p < g.P; ++p) {
        const int64_t i = (m * g.L + l) * g.P + p;
        ok[i] = locate<kFused>(loc + 2 * (nq * MLP + i), g.H[l], g.W[l], MD, cs[i]);
        if (ok[i])
          for (int k = 0; k < 4; ++k)
            if (cs[i].offset[k] >= 0) prefetch(v + cs[i].offset[k], D);
      }
    }
}

// Output rows [begin, end) of the flattened (n, q). kD > 0 fixes D at compile time.
template <bool kFused, int kD, typename scalar_t>
MSDA_INLINE void forward_rows(const Geometry& g, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                              scalar_t* out, int64_t begin, int64_t end) {
  const int64_t D = kD > 0 ? kD : g.D, MD = g.M * D, LP = g.L * g.P, MLP = g.M * LP;
  const std::vector<scalar_t> zero(D, scalar_t(0));  // stands in for corners outside the map
  const scalar_t* z = zero.data();
  // The corners of row nq + 1 are found (and their cache lines prefetched) before row nq is summed.
  std::vector<Corners<scalar_t>> now(MLP), next(MLP);
  std::vector<char> ok_now(MLP), ok_next(MLP);
  if (begin < end) find_row_corners<kFused>(g, D, value, loc, begin, now.data(), ok_now.data());
  for (int64_t nq = begin; nq < end; ++nq) {
    if (nq + 1 < end) find_row_corners<kFused>(g, D, value, loc, nq + 1, next.data(), ok_next.data());
    const int64_t n = nq / g.Lq;
    for (int64_t m = 0; m < g.M; ++m) {
      scalar_t* o = out + (nq * g.M + m) * D;
      std::fill(o, o + D, scalar_t(0));
      for (int64_t l = 0; l < g.L; ++l) {
        const scalar_t* v = value + (n * g.S + g.start[l]) * MD + m * D;  // level l, head m, pixel 0
        for (int64_t p = 0; p < g.P; ++p) {
          const int64_t i = (m * g.L + l) * g.P + p;
          if (!ok_now[i]) continue;
          const Corners<scalar_t>& c = now[i];
          const scalar_t a = attn[nq * MLP + i];
          gather4(o, c.offset[0] >= 0 ? v + c.offset[0] : z, c.offset[1] >= 0 ? v + c.offset[1] : z,
                  c.offset[2] >= 0 ? v + c.offset[2] : z, c.offset[3] >= 0 ? v + c.offset[3] : z,
                  a * c.weight[0], a * c.weight[1], a * c.weight[2], a * c.weight[3], D);
        }
      }
    }
    std::swap(now, next);
    std::swap(ok_now, ok_next);
  }
}

// Backward tasks [begin, end) of the flattened (n, m, level group), `groups` level groups per head (1: all levels;
// L: one level each). A null gradient pointer skips that gradient's work.
template <bool kFused, int kD, typename scalar_t>
MSDA_INLINE void backward_tasks(const Geometry& g, int64_t groups, const scalar_t* grad_out, const scalar_t* value,
                                const scalar_t* loc, const scalar_t* attn, scalar_t* grad_value, scalar_t* grad_loc,
                                scalar_t* grad_attn, int64_t begin, int64_t end) {
  constexpr int64_t kAhead = 8;  // queries prefetched ahead: a task reads one block in M, too sparse for the hardware
  const int64_t D = kD > 0 ? kD : g.D, MD = g.M * D, LP = g.L * g.P;
  const bool dots = grad_loc != nullptr || grad_attn != nullptr;
  const std::vector<scalar_t> zero(D, scalar_t(0));
  const scalar_t* z = zero.data();
  Corners<scalar_t> c;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / (g.M * groups), m = task / groups % g.M;
    const int64_t l_begin = groups == 1 ? 0 : task % groups, l_end = groups == 1 ? g.L : l_begin + 1;
    for (int64_t q = 0; q < g.Lq; ++q) {
      const int64_t nqm = (n * g.Lq + q) * g.M + m;
      const scalar_t* go = grad_out + nqm * D;
      if (q + kAhead < g.Lq) {
        const int64_t ahead = nqm + kAhead * g.M;
        prefetch(loc + 2 * ahead * LP, 2 * LP);
        prefetch(attn + ahead * LP, LP);
        prefetch(grad_out + ahead * D, D);
        if (grad_loc != nullptr) prefetch(grad_loc + 2 * ahead * LP, 2 * LP);
        if (grad_attn != nullptr) prefetch(grad_attn + ahead * LP, LP);
      }
      for (int64_t l = l_begin; l < l_end; ++l) {
        const int64_t origin = (n * g.S + g.start[l]) * MD + m * D;  // level l, head m, pixel 0
        const scalar_t* v = value + origin;
        const scalar_t W = static_cast<scalar_t>(g.W[l]), H = static_cast<scalar_t>(g.H[l]);  // d pixel / d loc
        for (int64_t p = 0; p < g.P; ++p) {
          const int64_t s = nqm * LP + l * g.P + p;
          if (!locate<kFused>(loc + 2 * s, g.H[l], g.W[l], MD, c)) continue;  // its gradients stay 0
          const scalar_t a = attn[s];
          if (dots) {
            const auto d = dot4(go, c.offset[0] >= 0 ? v + c.offset[0] : z, c.offset[1] >= 0 ? v + c.offset[1] : z,
                                c.offset[2] >= 0 ? v + c.offset[2] : z, c.offset[3] >= 0 ? v + c.offset[3] : z, D);
            if (grad_attn != nullptr)
              grad_attn[s] = c.weight[0] * d[0] + c.weight[1] * d[1] + c.weight[2] * d[2] + c.weight[3] * d[3];
            if (grad_loc != nullptr) {
              const scalar_t gx = 1 - c.fx, gy = 1 - c.fy;
              grad_loc[2 * s] = a * W * ((d[1] - d[0]) * gy + (d[3] - d[2]) * c.fy);
              grad_loc[2 * s + 1] = a * H * ((d[2] - d[0]) * gx + (d[3] - d[1]) * c.fx);
            }
          }
          if (grad_value != nullptr) {
            scalar_t* gv = grad_value + origin;
            for (int k = 0; k < 4; ++k)
              if (c.offset[k] >= 0) axpy(gv + c.offset[k], go, a * c.weight[k], D);
          }
        }
      }
    }
  }
}

// One copy of the loops per instruction set, each with a D = 32 instance.
template <typename scalar_t>
void forward_rows_base(const Geometry& g, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                       scalar_t* out, int64_t begin, int64_t end) {
  if (g.D == 32) return forward_rows<false, 32>(g, value, loc, attn, out, begin, end);
  forward_rows<false, 0>(g, value, loc, attn, out, begin, end);
}

template <typename scalar_t>
void backward_tasks_base(const Geometry& g, int64_t groups, const scalar_t* grad_out, const scalar_t* value,
                         const scalar_t* loc, const scalar_t* attn, scalar_t* grad_value, scalar_t* grad_loc,
                         scalar_t* grad_attn, int64_t begin, int64_t end) {
  if (g.D == 32)
    return backward_tasks<false, 32>(g, groups, grad_out, value, loc, attn, grad_value, grad_loc, grad_attn, begin,
                                     end);
  backward_tasks<false, 0>(g, groups, grad_out, value, loc, attn, grad_value, grad_loc, grad_attn, begin, end);
}

#ifdef MSDA_AVX2
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void forward_rows_avx2(const Geometry& g, const scalar_t* value,
                                                           const scalar_t* loc, const scalar_t* attn, scalar_t* out,
                                                           int64_t begin, int64_t end) {
  if (g.D == 32) return forward_rows<true, 32>(g, value, loc, attn, out, begin, end);
  forward_rows<true, 0>(g, value, loc, attn, out, begin, end);
}

template <typename scalar_t>
__attribute__((target("avx2,fma"))) void backward_tasks_avx2(const Geometry& g, int64_t groups,
                                                             const scalar_t* grad_out, const scalar_t* value,
                                                             const scalar_t* loc, const scalar_t* attn,
                                                             scalar_t* grad_value, scalar_t* grad_loc,
                                                             scalar_t* grad_attn, int64_t begin, int64_t end) {
  if (g.D == 32)
    return backward_tasks<true, 32>(g, groups, grad_out, value, loc, attn, grad_value, grad_loc, grad_attn, begin,
                                    end);
  backward_tasks<true, 0>(g, groups, grad_out, value, loc, attn, grad_value, grad_loc, grad_attn, begin, end);
}
#endif

}  // namespace

// The AVX2+FMA copy runs where the CPU has it and torch's kernels (grid_sample included) use AVX2 or AVX512. (Shared
// with depthwise_conv.cpp, compiled into the same library.)
bool blockgraph_use_avx2() {
#ifdef MSDA_AVX2
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          (at::get_cpu_capability() == "AVX2" || at::get_cpu_capability() == "AVX512");
  return yes;
#else
  return false;
#endif
}

namespace {

bool use_avx2() { return blockgraph_use_avx2(); }

template <typename scalar_t>
void forward_kernel(const Geometry& g, const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                    scalar_t* out) {
  // Enough (n, q) rows per task to amortise the scheduling; each task owns its output rows.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.M * g.L * g.P));
  const bool avx2 = use_avx2();
  at::parallel_for(0, g.N * g.Lq, grain, [&](int64_t begin, int64_t end) {
#ifdef MSDA_AVX2
    if (avx2) return forward_rows_avx2(g, value, loc, attn, out, begin, end);
#endif
    forward_rows_base(g, value, loc, attn, out, begin, end);
  });
}

template <typename scalar_t>
void backward_kernel(const Geometry& g, const scalar_t* grad_out, const scalar_t* value, const scalar_t* loc,
                     const scalar_t* attn, scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn) {
  const bool avx2 = use_avx2();
  // One task per head (n, m); per (head, level) when that leaves threads idle. Same results either way.
  const int64_t groups = g.N * g.M >= 2 * at::get_num_threads() ? 1 : std::max<int64_t>(1, g.L);
  at::parallel_for(0, g.N * g.M * groups, 1, [&](int64_t begin, int64_t end) {
#ifdef MSDA_AVX2
    if (avx2)
      return backward_tasks_avx2(g, groups, grad_out, value, loc, attn, grad_value, grad_loc, grad_attn, begin, end);
#endif
    backward_tasks_base(g, groups, grad_out, value, loc, attn, grad_value, grad_loc, grad_attn, begin, end);
  });
}

void check_inputs(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn) {
  TORCH_CHECK(value.device().is_cpu() && loc.device().is_cpu() && attn.device().is_cpu(),
              "blockgraph_msda: CPU tensors only");
  TORCH_CHECK(loc.scalar_type() == value.scalar_type() && attn.scalar_type() == value.scalar_type(),
              "blockgraph_msda: value, sampling_locations and attention_weights must share a dtype");
  TORCH_CHECK(value.dim() == 4 && attn.dim() == 5 && loc.dim() == 6 && loc.size(5) == 2,
              "blockgraph_msda: expected value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2], ",
              "attention_weights [N, Lq, M, L, P]");
  for (int64_t i = 0; i < 5; ++i)
    TORCH_CHECK(loc.size(i) == attn.size(i), "blockgraph_msda: sampling_locations and attention_weights disagree");
  TORCH_CHECK(loc.size(0) == value.size(0) && loc.size(2) == value.size(2),
              "blockgraph_msda: N or M of sampling_locations differs from value's");
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts, const at::Tensor& loc,
                   const at::Tensor& attn) {
  check_inputs(value, loc, attn);
  const Geometry g = geometry(value, shapes, starts, attn);
  const auto v = value.contiguous(), lc = loc.contiguous(), a = attn.contiguous();
  auto out = at::empty({g.N, g.Lq, g.M * g.D}, value.options());  // [N, Lq, M*D]
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "blockgraph_msda::forward", [&] {
    forward_kernel<scalar_t>(g, v.const_data_ptr<scalar_t>(), lc.const_data_ptr<scalar_t>(),
                             a.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& value,
                                                        const at::Tensor& shapes, const at::Tensor& starts,
                                                        const at::Tensor& loc, const at::Tensor& attn,
                                                        bool need_value, bool need_loc, bool need_attn) {
  check_inputs(value, loc, attn);
  const Geometry g = geometry(value, shapes, starts, attn);
  TORCH_CHECK(grad_out.numel() == g.N * g.Lq * g.M * g.D, "blockgraph_msda: grad_out must be [N, Lq, M*D]");
  const auto go = grad_out.to(value.scalar_type()).contiguous();
  const auto v = value.contiguous(), lc = loc.contiguous(), a = attn.contiguous();
  // A gradient nobody asked for is returned empty ([0]) and its work is skipped.
  const auto none = at::empty({0}, value.options());
  const at::Tensor gv = need_value ? at::zeros_like(v) : none;
  const at::Tensor gl = need_loc ? at::zeros_like(lc) : none;
  const at::Tensor ga = need_attn ? at::zeros_like(a) : none;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "blockgraph_msda::backward", [&] {
    backward_kernel<scalar_t>(g, go.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                              lc.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                              need_value ? gv.mutable_data_ptr<scalar_t>() : nullptr,
                              need_loc ? gl.mutable_data_ptr<scalar_t>() : nullptr,
                              need_attn ? ga.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {gv, gl, ga};
}

}  // namespace

TORCH_LIBRARY(blockgraph_msda, m) {
  m.def(
      "forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights) -> Tensor");
  m.def(
      "backward(Tensor grad_out, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool need_value, bool need_loc, bool need_attn) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(blockgraph_msda, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
