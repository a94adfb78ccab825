// CPU kernel of the weight gradient of a depthwise convolution (stride 1, dilation 1, zero padding), registered as
// the op `blockgraph_conv::depthwise_weight_grad`.
//
//   grad_weight[c, 0, i, j] = sum_{n, y, x} grad_out[n, c, y, x] * input[n, c, y + i - ph, x + j - pw]
//
// (zero outside the input). oneDNN's backward-weights kernel of a depthwise convolution is slow for kernels larger
// than 3x3 (a 7x7 over [8, 64, 56, 56] takes 10-15x its forward on AVX2), and it computes the bias gradient, a plain
// sum, inside the same slow pass. This is one pass of fused multiply-adds over the channels-last maps.
//
// Layouts: grad_out [N, C, Ho, Wo] and input [N, C, H, W] with channels innermost (channels-last strides; any
// strides of the other dims: a map viewed from tokens is read in place); Ho = H + 2 ph - kh + 1, Wo likewise.
// Float32, float64 or bfloat16 in; sums in float32 (float64 for float64); the result [C, 1, kh, kw] in the input's
// dtype.
//
// Work split: the output rows (n, y) are cut into chunks of a fixed size that depends only on the shapes (so that a
// chunk's rows stay in cache while each block of V channels and each kernel row i passes over them). Each chunk
// writes its partial sums; the partials are then added in chunk order. No atomics: the result does not depend on
// the number of threads.
//
// Instruction sets: as ms_deform_attn.cpp, the loops are compiled for the x86-64 baseline and with AVX2+FMA, the
// AVX2 copy taken where the CPU and torch's own kernels use it (ms_deform_attn.cpp's blockgraph_use_avx2).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
#define DWCONV_AVX2 1
#endif

#define DWCONV_INLINE inline __attribute__((always_inline))

bool blockgraph_use_avx2();  // ms_deform_attn.cpp (the same library): whether the AVX2+FMA copy runs

namespace {

struct Shape {
  int64_t N, C, H, W, Ho, Wo, kh, kw, ph, pw;
  int64_t gn, gh, gw;  // grad_out strides (elements) of n, y, x; channels: 1
  int64_t in_, ih, iw;  // input strides
  int64_t rows_per_chunk, chunks;
};

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A column near the border: the taps inside the input only, [jlo, jhi), summed into the registers' sums.
template <int V, int KW, typename scalar_t>
DWCONV_INLINE void border_column(const Shape& s, const scalar_t* grow, const scalar_t* irow, int64_t x,
                                 acc_t<scalar_t> (&reg)[KW][V]) {
  using T = acc_t<scalar_t>;
  const int64_t jlo = std::max<int64_t>(0, s.pw - x), jhi = std::min<int64_t>(KW, s.W + s.pw - x);
  T gv[V];
  for (int v = 0; v < V; ++v) gv[v] = static_cast<T>(grow[x * s.gw + v]);
  for (int64_t j = jlo; j < jhi; ++j)
    for (int v = 0; v < V; ++v) reg[j][v] += gv[v] * static_cast<T>(irow[(x - s.pw + j) * s.iw + v]);
}

// One block of V channels starting at c0, kernel row i, the chunk's output rows [r0, r1): the KW sums of taps (i, j)
// added into acc[j * V + v]. KW > 0: the kernel width known at compile time (registers); 0: s.kw at run time.
template <int V, int KW, typename scalar_t>
DWCONV_INLINE void taps_row(const Shape& s, const scalar_t* g, const scalar_t* in, int64_t c0, int64_t i, int64_t r0,
                            int64_t r1, acc_t<scalar_t>* acc) {
  using T = acc_t<scalar_t>;
  const int64_t kw = KW > 0 ? KW : s.kw;
  constexpr int KMAX = KW > 0 ? KW : 1;
  T reg[KMAX][V];
  for (int j = 0; j < KMAX; ++j)
    for (int v = 0; v < V; ++v) reg[j][v] = 0;
  // Output columns whose taps all fall inside the input: x - pw >= 0 and x + kw - 1 - pw < W.
  const int64_t x_lo = std::min(s.Wo, s.pw), x_hi = std::max(x_lo, std::min(s.Wo, s.W - kw + 1 + s.pw));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / s.Ho, y = r % s.Ho, yy = y + i - s.ph;
    if (yy < 0 || yy >= s.H) continue;
    const scalar_t* grow = g + n * s.gn + y * s.gh + c0;
    const scalar_t* irow = in + n * s.in_ + yy * s.ih + c0;
    if constexpr (KW > 0) {
      // (Three loops, the interior's free of tests: GCC keeps reg in registers then; one loop with a test per column
      // or a lambda capturing reg made the float32 copy 2-3x slower.)
      for (int64_t x = 0; x < x_lo; ++x) border_column<V, KW>(s, grow, irow, x, reg);
      for (int64_t x = x_lo; x < x_hi; ++x) {  // every tap inside the input
        T gv[V];
        for (int v = 0; v < V; ++v) gv[v] = static_cast<T>(grow[x * s.gw + v]);
        const scalar_t* ip = irow + (x - s.pw) * s.iw;
#pragma GCC unroll 16
        for (int j = 0; j < KW; ++j)
          for (int v = 0; v < V; ++v) reg[j][v] += gv[v] * static_cast<T>(ip[j * s.iw + v]);
      }
      for (int64_t x = x_hi; x < s.Wo; ++x) border_column<V, KW>(s, grow, irow, x, reg);
    } else {  // the kernel width known at run time only: every column checked tap by tap, summed into acc
      for (int64_t x = 0; x < s.Wo; ++x) {
        T gv[V];
        for (int v = 0; v < V; ++v) gv[v] = static_cast<T>(grow[x * s.gw + v]);
        for (int64_t j = 0; j < kw; ++j) {
          const int64_t xx = x + j - s.pw;
          if (xx < 0 || xx >= s.W) continue;
          const scalar_t* ip = irow + xx * s.iw;
          for (int v = 0; v < V; ++v) acc[j * V + v] += gv[v] * static_cast<T>(ip[v]);
        }
      }
    }
  }
  if constexpr (KW > 0)
    for (int j = 0; j < KW; ++j)
      for (int v = 0; v < V; ++v) acc[j * V + v] += reg[j][v];
}

// The partial sums of one chunk of output rows: part[(i * kw + j) * C + c].
template <int KW, typename scalar_t>
DWCONV_INLINE void chunk_sums(const Shape& s, const scalar_t* g, const scalar_t* in, int64_t chunk,
                              acc_t<scalar_t>* part) {
  using T = acc_t<scalar_t>;
  constexpr int V = 8;
  const int64_t r0 = chunk * s.rows_per_chunk, r1 = std::min(s.N * s.Ho, r0 + s.rows_per_chunk);
  T acc[64 * V];  // [kw][V], kw <= 64 (checked by the caller)
  for (int64_t i = 0; i < s.kh; ++i) {
    int64_t c0 = 0;
    for (; c0 + V <= s.C; c0 += V) {
      std::fill(acc, acc + s.kw * V, T(0));
      taps_row<V, KW>(s, g, in, c0, i, r0, r1, acc);
      for (int64_t j = 0; j < s.kw; ++j)
        for (int v = 0; v < V; ++v) part[(i * s.kw + j) * s.C + c0 + v] = acc[j * V + v];
    }
    for (; c0 < s.C; ++c0) {  // the last C % V channels, one at a time
      std::fill(acc, acc + s.kw, T(0));
      taps_row<1, 0>(s, g, in, c0, i, r0, r1, acc);
      for (int64_t j = 0; j < s.kw; ++j) part[(i * s.kw + j) * s.C + c0] = acc[j];
    }
  }
}

template <typename scalar_t>
DWCONV_INLINE void chunks_dispatch(const Shape& s, const scalar_t* g, const scalar_t* in, int64_t begin, int64_t end,
                                   acc_t<scalar_t>* parts) {
  const int64_t size = s.kh * s.kw * s.C;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    auto* part = parts + chunk * size;
    switch (s.kw) {
      case 1: chunk_sums<1>(s, g, in, chunk, part); break;
      case 3: chunk_sums<3>(s, g, in, chunk, part); break;
      case 5: chunk_sums<5>(s, g, in, chunk, part); break;
      case 7: chunk_sums<7>(s, g, in, chunk, part); break;
      case 9: chunk_sums<9>(s, g, in, chunk, part); break;
      case 11: chunk_sums<11>(s, g, in, chunk, part); break;
      default: chunk_sums<0>(s, g, in, chunk, part);
    }
  }
}

template <typename scalar_t>
void chunks_base(const Shape& s, const scalar_t* g, const scalar_t* in, int64_t begin, int64_t end,
                 acc_t<scalar_t>* parts) {
  chunks_dispatch(s, g, in, begin, end, parts);
}

#ifdef DWCONV_AVX2
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void chunks_avx2(const Shape& s, const scalar_t* g, const scalar_t* in,
                                                     int64_t begin, int64_t end, acc_t<scalar_t>* parts) {
  chunks_dispatch(s, g, in, begin, end, parts);
}
#endif


at::Tensor channels_innermost(const at::Tensor& t) {
  return t.stride(1) == 1 ? t : t.contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor depthwise_weight_grad(const at::Tensor& grad_out, const at::Tensor& input, int64_t kh, int64_t kw,
                                 int64_t ph, int64_t pw) {
  TORCH_CHECK(grad_out.device().is_cpu() && input.device().is_cpu(), "blockgraph_conv: CPU tensors only");
  TORCH_CHECK(input.dim() == 4 && grad_out.dim() == 4, "blockgraph_conv: expected 4-d maps [N, C, H, W]");
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "blockgraph_conv: grad_out and input dtypes differ");
  TORCH_CHECK(kh >= 1 && kw >= 1 && kw <= 64 && ph >= 0 && pw >= 0, "blockgraph_conv: kernel width 1..64, ",
              "padding >= 0");
  Shape s{};
  s.N = input.size(0), s.C = input.size(1), s.H = input.size(2), s.W = input.size(3);
  s.kh = kh, s.kw = kw, s.ph = ph, s.pw = pw;
  s.Ho = s.H + 2 * ph - kh + 1, s.Wo = s.W + 2 * pw - kw + 1;
  TORCH_CHECK(grad_out.size(0) == s.N && grad_out.size(1) == s.C && grad_out.size(2) == s.Ho &&
                  grad_out.size(3) == s.Wo,
              "blockgraph_conv: grad_out is not the output's shape for this kernel and padding");
  const auto g = channels_innermost(grad_out), in = channels_innermost(input);
  s.gn = g.stride(0), s.gh = g.stride(2), s.gw = g.stride(3);
  s.in_ = in.stride(0), s.ih = in.stride(2), s.iw = in.stride(3);
  const int64_t rows = s.N * s.Ho;
  // Rows per chunk: the chunk's grad_out and input rows (plus the kernel's halo) in about 128 KiB, for reuse across
  // channel blocks and kernel rows; a size that depends only on the shapes.
  const int64_t row_bytes = std::max<int64_t>(1, (s.Wo + s.W) * s.C * static_cast<int64_t>(input.element_size()));
  s.rows_per_chunk = std::clamp<int64_t>((128 * 1024) / row_bytes, 1, std::max<int64_t>(1, rows));
  s.chunks = rows == 0 ? 0 : (rows + s.rows_per_chunk - 1) / s.rows_per_chunk;
  const int64_t size = kh * kw * s.C;
  const bool is_double = input.scalar_type() == at::kDouble;
  const auto acc_type = is_double ? at::kDouble : at::kFloat;
  auto parts = at::empty({std::max<int64_t>(1, s.chunks), size}, input.options().dtype(acc_type));
  auto total = at::zeros({size}, input.options().dtype(acc_type));
  const bool avx2 = blockgraph_use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "blockgraph_conv::depthwise_weight_grad", [&] {
    using T = acc_t<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* ip = in.const_data_ptr<scalar_t>();
    T* pp = parts.mutable_data_ptr<T>();
    at::parallel_for(0, s.chunks, 1, [&](int64_t begin, int64_t end) {
#ifdef DWCONV_AVX2
      if (avx2) return chunks_avx2<scalar_t>(s, gp, ip, begin, end, pp);
#endif
      chunks_base<scalar_t>(s, gp, ip, begin, end, pp);
    });
    T* tp = total.mutable_data_ptr<T>();
    at::parallel_for(0, size, 256, [&](int64_t begin, int64_t end) {  // the chunks' partials, in chunk order
      for (int64_t chunk = 0; chunk < s.chunks; ++chunk) {
        const T* part = pp + chunk * size;
        for (int64_t k = begin; k < end; ++k) tp[k] += part[k];
      }
    });
  });
  // [kh, kw, C] -> [C, 1, kh, kw]
  return total.view({kh, kw, s.C}).permute({2, 0, 1}).unsqueeze(1).to(input.scalar_type()).contiguous();
}

}  // namespace

TORCH_LIBRARY(blockgraph_conv, m) {
  m.def("depthwise_weight_grad(Tensor grad_out, Tensor input, int kh, int kw, int ph, int pw) -> Tensor");
}

TORCH_LIBRARY_IMPL(blockgraph_conv, CPU, m) { m.impl("depthwise_weight_grad", &depthwise_weight_grad); }
