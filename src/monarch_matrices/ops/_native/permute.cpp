// The two stride permutations of a Monarch multiply, as CPU kernels.
//
// A Monarch multiply on CPU is two batched GEMMs and two copies that move
// `l` interleaved streams in or out of place (the middle stride permutation
// and the output interleave). PyTorch's generic strided copy runs those with
// an innermost dimension of `l` elements (4 for nblocks=4) at a fraction of
// what the cache can deliver, and a bias added to a permuted view is slower
// still. These loops have the group size `L` as a template constant so the
// compiler turns them into vector shuffles (for L = 8 and 16, explicit
// in-register transposes: group_transpose.h), and add the bias in the same
// pass. Results are bit-identical to `copy_` (and to `add_` for the bias:
// reduced-precision adds are done in float and rounded once, as c10's scalar
// conversion does; PyTorch's own vector loop writes a NaN with other bits).
//
//   interleave_(dst, src, bias):  dst[i, j, e, v] = src[i, j, v, e] (+ bias[e*L + v])
//   deinterleave_(dst, src, sum): dst[i, j, v, e] = src[i, j, e, v]
//                                 (and sum[e*L + v] += src[i, j, e, v] over all i, j)
//
// The optional column sum is the bias gradient of a layer whose output gradient
// is being deinterleaved: taken while each row is in L1, it saves a pass over
// the whole gradient. It accumulates in float64 for float/double and in float
// for bf16/fp16 (which round the result to 8 or 11 bits anyway).
//
// with 4-D views (n1, n2, ., .): the two outer dims are any strides (token,
// block), the inner (e, v) pair of the interleaved side is contiguous, and
// the other side's rows are contiguous with any stride between the L rows.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "group_transpose.h"
#include "partials.h"

#include <algorithm>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Raw-bits helpers: the copies move bit patterns, only the bias needs arithmetic.
inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as c10::BFloat16
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);  // a select, so it vectorizes
}

// d[i] = Op::apply(d[i], bias[i]) for i < n: the bias pass over one output row.
template <typename Op, typename T>
inline void add_row_elementwise(T* __restrict d, const T* __restrict bias, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = Op::apply(d[i], bias[i]);
}

template <typename T>
struct Add {  // float, double: the add itself
  static inline T apply(T a, T b) { return a + b; }
  static inline void add_row(T* d, const T* bias, int64_t n) {
    add_row_elementwise<Add>(d, bias, n);
  }
};

struct AddBF16 {
  static inline uint16_t apply(uint16_t a, uint16_t b) {
    return float_to_bf16(bf16_to_float(a) + bf16_to_float(b));
  }
  static void add_row(uint16_t* d, const uint16_t* bias, int64_t n);
};

#if defined(__AVX512BF16__)
// 16 bf16 (bits) widened to float.
inline __m512 widen_bf16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// 32 elements at a time, rounded by the hardware's vcvtne2ps2bf16: 3-4x fewer
// instructions than the emulated rounding, which made the bias pass cost as
// much as the interleave itself. That instruction flushes subnormals and keeps
// a NaN's sign, so 32 whose sums hold a NaN or a subnormal take the emulated
// path: the bits stay those of float_to_bf16 (c10::BFloat16) everywhere.
void AddBF16::add_row(uint16_t* d, const uint16_t* bias, int64_t n) {
  const __m512 smallest = _mm512_set1_ps(1.17549435e-38f);  // FLT_MIN, the least normal
  const __m512 zero = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i a = _mm512_loadu_si512(d + i);
    const __m512i b = _mm512_loadu_si512(bias + i);
    const __m512 lo = _mm512_add_ps(widen_bf16(_mm512_castsi512_si256(a)),
                                    widen_bf16(_mm512_castsi512_si256(b)));
    const __m512 hi = _mm512_add_ps(widen_bf16(_mm512_extracti64x4_epi64(a, 1)),
                                    widen_bf16(_mm512_extracti64x4_epi64(b, 1)));
    const __m512 alo = _mm512_abs_ps(lo), ahi = _mm512_abs_ps(hi);
    // NaN, or neither zero nor normal: "not >= FLT_MIN" holds for NaN, "!= 0" too
    const __mmask16 odd_lo = _mm512_cmp_ps_mask(alo, smallest, _CMP_NGE_UQ) &
                             _mm512_cmp_ps_mask(alo, zero, _CMP_NEQ_UQ);
    const __mmask16 odd_hi = _mm512_cmp_ps_mask(ahi, smallest, _CMP_NGE_UQ) &
                             _mm512_cmp_ps_mask(ahi, zero, _CMP_NEQ_UQ);
    if ((odd_lo | odd_hi) != 0) {
      add_row_elementwise<AddBF16>(d + i, bias + i, 32);
      continue;
    }
    _mm512_storeu_si512(d + i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
  }
  add_row_elementwise<AddBF16>(d + i, bias + i, n - i);
}
#else
void AddBF16::add_row(uint16_t* d, const uint16_t* bias, int64_t n) {
  add_row_elementwise<AddBF16>(d, bias, n);
}
#endif

struct AddHalf {
  static inline uint16_t apply(uint16_t a, uint16_t b) {
    c10::Half x, y;
    x.x = a;
    y.x = b;
    return c10::Half(static_cast<float>(x) + static_cast<float>(y)).x;
  }
  static inline void add_row(uint16_t* d, const uint16_t* bias, int64_t n) {
    add_row_elementwise<AddHalf>(d, bias, n);
  }
};

// One row: d[e*L + v] = s[v*sv + e] (+ bias). L > 0 is a compile-time group size;
// L == 0 means "runtime l" (the generic fallback).
template <int L, typename T, typename Op>
inline void interleave_row(const T* __restrict s, int64_t sv, T* __restrict d,
                           const T* __restrict bias, int64_t m, int64_t l_rt) {
  const int64_t l = L > 0 ? L : l_rt;
  int64_t e = 0;
  if constexpr (group_transpose::handles(L)) {  // whole vectors of every stream first
    constexpr int W = group_transpose::lanes<T>();
    for (; e + W <= m; e += W) group_transpose::interleave_group<L>(s + e, sv, d + e * L);
  }
  for (; e < m; ++e) {
#pragma GCC unroll 32
    for (int64_t v = 0; v < l; ++v) d[e * l + v] = s[v * sv + e];
  }
  if (bias != nullptr) Op::add_row(d, bias, m * l);  // a second pass while the row is in L1
}

// One row: d[v*dv + e] = s[e*L + v].
template <int L, typename T>
inline void deinterleave_row(const T* __restrict s, T* __restrict d, int64_t dv, int64_t m,
                             int64_t l_rt) {
  const int64_t l = L > 0 ? L : l_rt;
  int64_t e = 0;
  if constexpr (group_transpose::handles(L)) {
    constexpr int W = group_transpose::lanes<T>();
    for (; e + W <= m; e += W) group_transpose::deinterleave_group<L>(s + e * L, d + e, dv);
  }
  for (; e < m; ++e) {
#pragma GCC unroll 32
    for (int64_t v = 0; v < l; ++v) d[v * dv + e] = s[e * l + v];
  }
}

// Rows per task: enough elements that a task is worth waking a thread for.
inline int64_t grain(int64_t row_elems) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(row_elems, 1));
}

template <typename T, typename Op, int L>
void interleave_impl(const torch::Tensor& dst, const torch::Tensor& src,
                     const T* bias) {
  const int64_t n1 = src.size(0), n2 = src.size(1), l = src.size(2), m = src.size(3);
  const int64_t s1 = src.stride(0), s2 = src.stride(1), sv = src.stride(2);
  const int64_t d1 = dst.stride(0), d2 = dst.stride(1);
  const T* sp = reinterpret_cast<const T*>(src.data_ptr());
  T* dp = reinterpret_cast<T*>(dst.data_ptr());
  at::parallel_for(0, n1 * n2, grain(m * l), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r / n2, j = r % n2;
      interleave_row<L, T, Op>(sp + i * s1 + j * s2, sv, dp + i * d1 + j * d2, bias, m, l);
    }
  });
}

template <typename T, int L>
void deinterleave_impl(const torch::Tensor& dst, const torch::Tensor& src) {
  const int64_t n1 = dst.size(0), n2 = dst.size(1), l = dst.size(2), m = dst.size(3);
  const int64_t s1 = src.stride(0), s2 = src.stride(1);
  const int64_t d1 = dst.stride(0), d2 = dst.stride(1), dv = dst.stride(2);
  const T* sp = reinterpret_cast<const T*>(src.data_ptr());
  T* dp = reinterpret_cast<T*>(dst.data_ptr());
  at::parallel_for(0, n1 * n2, grain(m * l), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r / n2, j = r % n2;
      deinterleave_row<L, T>(sp + i * s1 + j * s2, dp + i * d1 + j * d2, dv, m, l);
    }
  });
}

// deinterleave_impl, and each source row added into `sum` (AccT) while it is in L1.
// `Load` turns an element into AccT. Every task sums its rows locally; the partial
// sums are added in task order (partials.h), so equal runs give equal bits.
template <typename T, typename AccT, int L, typename Load>
void deinterleave_sum_impl(const torch::Tensor& dst, const torch::Tensor& src, AccT* sum,
                           Load load) {
  const int64_t n1 = dst.size(0), n2 = dst.size(1), l = dst.size(2), m = dst.size(3);
  const int64_t s1 = src.stride(0), s2 = src.stride(1);
  const int64_t d1 = dst.stride(0), d2 = dst.stride(1), dv = dst.stride(2);
  const T* sp = reinterpret_cast<const T*>(src.data_ptr());
  T* dp = reinterpret_cast<T*>(dst.data_ptr());
  const int64_t width = l * m;
  OrderedPartials<AccT> partials;
  at::parallel_for(0, n1 * n2, grain(width), [&](int64_t begin, int64_t end) {
    std::vector<AccT> local(width, AccT(0));
    AccT* __restrict acc = local.data();
    constexpr int kRows = 4;  // rows added per pass over acc: a quarter of acc's loads and stores
    const T* rows[kRows];
    for (int64_t r0 = begin; r0 < end; r0 += kRows) {
      const int64_t count = std::min<int64_t>(kRows, end - r0);
      for (int64_t t = 0; t < kRows; ++t) {
        const int64_t r = r0 + std::min<int64_t>(t, count - 1);
        const int64_t i = r / n2, j = r % n2;
        rows[t] = sp + i * s1 + j * s2;
        if (t < count) deinterleave_row<L, T>(rows[t], dp + i * d1 + j * d2, dv, m, l);
      }
      if (count == kRows) {
        const T* __restrict a = rows[0];
        const T* __restrict b = rows[1];
        const T* __restrict c2 = rows[2];
        const T* __restrict d = rows[3];
        for (int64_t c = 0; c < width; ++c)
          acc[c] += (load(a[c]) + load(b[c])) + (load(c2[c]) + load(d[c]));
      } else {
        for (int64_t t = 0; t < count; ++t) {
          const T* __restrict a = rows[t];
          for (int64_t c = 0; c < width; ++c) acc[c] += load(a[c]);
        }
      }
    }
    partials.add(begin, std::move(local));
  });
  partials.sum_into(sum);
}

// Dispatch on the group size: the common nblocks get unrolled shuffles.
template <typename F>
void with_group_size(int64_t l, F&& f) {
  switch (l) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

void check_common(const torch::Tensor& dst, const torch::Tensor& src, const char* what) {
  TORCH_CHECK(dst.device().is_cpu() && src.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(dst.dim() == 4 && src.dim() == 4, what, ": 4-D views expected, got ", src.dim(),
              "-D and ", dst.dim(), "-D");
  TORCH_CHECK(dst.scalar_type() == src.scalar_type(), what, ": dtypes differ (",
              src.scalar_type(), " vs ", dst.scalar_type(), ")");
  TORCH_CHECK(dst.size(0) == src.size(0) && dst.size(1) == src.size(1) &&
                  dst.size(2) == src.size(3) && dst.size(3) == src.size(2),
              what, ": dst must be src with the last two dims swapped, got ", src.sizes(),
              " and ", dst.sizes());
}

}  // namespace

void interleave_(torch::Tensor dst, torch::Tensor src, c10::optional<torch::Tensor> bias) {
  check_common(dst, src, "interleave_");
  const int64_t l = src.size(2), m = src.size(3);
  TORCH_CHECK(src.stride(3) == 1 || m == 1, "interleave_: src rows must be contiguous");
  TORCH_CHECK(dst.stride(3) == 1 && (dst.stride(2) == l || m == 1),
              "interleave_: dst's last two dims must be contiguous");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == l * m &&
                    bias->scalar_type() == src.scalar_type() && bias->device().is_cpu(),
                "interleave_: bias must be a contiguous CPU tensor of ", l * m,
                " elements of the same dtype");
  }
  if (src.numel() == 0) return;
  const void* bp = has_bias ? bias->data_ptr() : nullptr;
  with_group_size(l, [&](auto L) {
    constexpr int G = decltype(L)::value;
    switch (src.scalar_type()) {
      case at::kFloat:
        interleave_impl<float, Add<float>, G>(dst, src, static_cast<const float*>(bp));
        break;
      case at::kDouble:
        interleave_impl<double, Add<double>, G>(dst, src, static_cast<const double*>(bp));
        break;
      case at::kBFloat16:
        interleave_impl<uint16_t, AddBF16, G>(dst, src, static_cast<const uint16_t*>(bp));
        break;
      case at::kHalf:
        interleave_impl<uint16_t, AddHalf, G>(dst, src, static_cast<const uint16_t*>(bp));
        break;
      default:
        TORCH_CHECK(false, "interleave_: unsupported dtype ", src.scalar_type());
    }
  });
}

// The accumulator dtype of deinterleave_'s column sum for a source dtype.
at::ScalarType sum_type(at::ScalarType t) {
  return (t == at::kFloat || t == at::kDouble) ? at::kDouble : at::kFloat;
}

void deinterleave_(torch::Tensor dst, torch::Tensor src, c10::optional<torch::Tensor> sum) {
  check_common(dst, src, "deinterleave_");
  const int64_t l = dst.size(2), m = dst.size(3);
  TORCH_CHECK(dst.stride(3) == 1 || m == 1, "deinterleave_: dst rows must be contiguous");
  TORCH_CHECK(src.stride(3) == 1 && (src.stride(2) == l || m == 1),
              "deinterleave_: src's last two dims must be contiguous");
  const bool has_sum = sum.has_value() && sum->defined();
  if (has_sum) {
    const auto want = sum_type(src.scalar_type());
    TORCH_CHECK(src.scalar_type() == at::kFloat || src.scalar_type() == at::kDouble ||
                    src.scalar_type() == at::kBFloat16 || src.scalar_type() == at::kHalf,
                "deinterleave_: a column sum needs a float, double, bf16 or fp16 source, got ",
                src.scalar_type());
    TORCH_CHECK(sum->is_contiguous() && sum->numel() == l * m && sum->scalar_type() == want &&
                    sum->device().is_cpu(),
                "deinterleave_: sum must be a contiguous CPU ", want, " tensor of ", l * m,
                " elements");
  }
  if (src.numel() == 0) return;
  if (has_sum) {
    with_group_size(l, [&](auto L) {
      constexpr int G = decltype(L)::value;
      switch (src.scalar_type()) {
        case at::kFloat:
          deinterleave_sum_impl<float, double, G>(dst, src, sum->data_ptr<double>(),
                                                  [](float x) { return double(x); });
          break;
        case at::kDouble:
          deinterleave_sum_impl<double, double, G>(dst, src, sum->data_ptr<double>(),
                                                   [](double x) { return x; });
          break;
        case at::kBFloat16:
          deinterleave_sum_impl<uint16_t, float, G>(dst, src, sum->data_ptr<float>(),
                                                    [](uint16_t x) { return bf16_to_float(x); });
          break;
        default: {  // kHalf (checked above)
          deinterleave_sum_impl<uint16_t, float, G>(dst, src, sum->data_ptr<float>(),
                                                    [](uint16_t x) {
                                                      c10::Half h;
                                                      h.x = x;
                                                      return static_cast<float>(h);
                                                    });
        }
      }
    });
    return;
  }
  with_group_size(l, [&](auto L) {
    constexpr int G = decltype(L)::value;
    switch (src.element_size()) {  // a pure copy: only the width of an element matters
      case 8: deinterleave_impl<uint64_t, G>(dst, src); break;
      case 4: deinterleave_impl<uint32_t, G>(dst, src); break;
      case 2: deinterleave_impl<uint16_t, G>(dst, src); break;
      default: TORCH_CHECK(false, "deinterleave_: unsupported dtype ", src.scalar_type());
    }
  });
}
