// A Monarch multiply for a few tokens (1-16), forward and backward, in one call each.
//
// With a handful of tokens every GEMM of a Monarch multiply is a matrix-vector
// product that only has to stream the weights once, but each CPU bf16 GEMM call
// costs about 20-30 us however small it is (oneDNN's fixed cost, measured: a
// 1x192 @ 192x768 product takes 21 us), and a training step makes six of them
// plus a dozen small tensor ops: a bf16 step of a 768->3072 layer at one token
// ran no faster than nn.Linear's. Here each pass streams every weight row once,
// with the tokens' activations (a few KiB) in L1:
//
//   forward:   mid[t, v, u] = h[t, u*l + v],  h[t, a*q + c] = sum_j w1[a, c, j] x[t, a*p + j]
//              y[t, e*l + v] = sum_u w2[v, e, u] mid[t, v, u] (+ bias)      (dot products)
//   backward:  gmid[t, v, u] = sum_e w2[v, e, u] g[t, e*l + v]
//              gw2[v, e, u]  = sum_t g[t, e*l + v] mid[t, v, u]             (one pass over w2)
//              gx[t, a*p + j] = sum_c w1[a, c, j] gh[t, a*q + c]
//              gw1[a, c, j]  = sum_t gh[t, a*q + c] x[t, a*p + j]           (one pass over w1)
//
// The weights stay in their stored layout (k, q, p) and (l, s, r), float32 or
// bf16. Everything is summed in float32 in a fixed order and rounded once, so
// results do not depend on the thread count. The bf16 forward with AVX512-BF16
// multiplies bf16 pairs (vdpbf16ps) and rounds the middle to bf16 for the second
// factor, as a bf16 GEMM does; like every use of that instruction (oneDNN's bf16
// GEMMs too) it treats subnormal inputs and products as zero. Without it, and
// in backward (which takes the float32 middle), bf16 weights are widened in
// registers and the activations are float32.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "vec.h"

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace vec;
constexpr int kGroup = 8;  // tokens whose accumulators stay in registers
constexpr int64_t kMaxTokens = 16;

// Loads and stores of one lane (V = float) or sixteen (V = vf), from float32 or bf16.
template <typename V>
struct Lane;

template <>
struct Lane<float> {
  static constexpr int width = 1;
  static float load(const float* p) { return *p; }
  static float load(const uint16_t* p) { return to_float(*p); }
  static void store(float* p, float v) { *p = v; }
  static void store(uint16_t* p, float v) { *p = to_bf16(v); }
  static float splat(float s) { return s; }
};

template <>
struct Lane<vf> {
  static constexpr int width = kLanes;
  static vf load(const float* p) { return vec::load(p); }
  static vf load(const uint16_t* p) { return vec::load(p); }
  static void store(float* p, vf v) { vec::store(p, v); }
  static void store(uint16_t* p, vf v) { vec::store(p, v); }
  static vf splat(float s) { return vec::splat(s); }
};

// Calls f(std::integral_constant<int, n>) for a runtime 1 <= n <= N: the token
// loops then have compile-time trip counts, so their accumulators stay in registers.
template <int N, typename F>
inline void with_tokens(int64_t n, F&& f) {
  if constexpr (N == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    if (n == N)
      f(std::integral_constant<int, N>{});
    else
      with_tokens<N - 1>(n, f);
  }
}

// out[i] = sum_j w[j] * in[i*ld + j] for NT rows of `in` (float32), j < width.
// With one or two rows, U independent partial sums per row hide the FMA latency.
template <int NT, typename T>
inline void dots(const T* w, const float* in, int64_t ld, int64_t width, float* out) {
  constexpr int U = NT == 1 ? 4 : NT == 2 ? 2 : 1;
  vf acc[U][NT] = {};
  int64_t j = 0;
  for (; j + U * kLanes <= width; j += U * kLanes) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const vf wv = Lane<vf>::load(w + j + u * kLanes);
#pragma GCC unroll 8
      for (int i = 0; i < NT; ++i) acc[u][i] += wv * Lane<vf>::load(in + i * ld + j + u * kLanes);
    }
  }
  for (; j + kLanes <= width; j += kLanes) {
    const vf wv = Lane<vf>::load(w + j);
    for (int i = 0; i < NT; ++i) acc[0][i] += wv * Lane<vf>::load(in + i * ld + j);
  }
  vf total[NT];
  for (int i = 0; i < NT; ++i) {
    total[i] = acc[0][i];
    for (int u = 1; u < U; ++u) total[i] += acc[u][i];
  }
  lane_sums<NT>(total, out);
  for (int i = 0; i < NT; ++i)
    for (int64_t jj = j; jj < width; ++jj) out[i] += Lane<float>::load(w + jj) * in[i * ld + jj];
}

// dots() for n <= kMaxTokens rows, in register groups; out[i * ldo].
template <typename T>
inline void dots_n(const T* w, const float* in, int64_t ld, int64_t width, int64_t n, float* out,
                   int64_t ldo) {
  float r[kGroup];
  for (int64_t t0 = 0; t0 < n; t0 += kGroup) {
    const int64_t nt = std::min<int64_t>(kGroup, n - t0);
    const float* it = in + t0 * ld;
    with_tokens<kGroup>(nt, [&](auto tokens) { dots<decltype(tokens)::value>(w, it, ld, width, r); });
    for (int64_t i = 0; i < nt; ++i) out[(t0 + i) * ldo] = r[i];
  }
}

#if defined(__AVX512BF16__)
// dots() with bf16 rows on both sides, pairs of products per vdpbf16ps: half the
// instructions of widening the weights to float32 and no float32 copy of `in`.
template <int NT>
inline void dots_bf16(const uint16_t* w, const uint16_t* in, int64_t ld, int64_t width,
                      float* out) {
  constexpr int kPairLanes = 2 * kLanes;  // bf16 per vector
  constexpr int U = NT == 1 ? 4 : NT == 2 ? 2 : 1;
  __m512 acc[U][NT];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < NT; ++i) acc[u][i] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + U * kPairLanes <= width; j += U * kPairLanes) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + j + u * kPairLanes));
#pragma GCC unroll 8
      for (int i = 0; i < NT; ++i) {
        const __m512i xv = _mm512_loadu_si512(in + i * ld + j + u * kPairLanes);
        acc[u][i] = _mm512_dpbf16_ps(acc[u][i], reinterpret_cast<__m512bh>(xv), wv);
      }
    }
  }
  for (; j + kPairLanes <= width; j += kPairLanes) {
    const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + j));
    for (int i = 0; i < NT; ++i)
      acc[0][i] = _mm512_dpbf16_ps(acc[0][i], reinterpret_cast<__m512bh>(
                                                  _mm512_loadu_si512(in + i * ld + j)), wv);
  }
  vf total[NT];
  for (int i = 0; i < NT; ++i) {
    __m512 t = acc[0][i];
    for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, acc[u][i]);
    total[i] = (vf)t;
  }
  lane_sums<NT>(total, out);
  for (int i = 0; i < NT; ++i)
    for (int64_t jj = j; jj < width; ++jj) out[i] += to_float(w[jj]) * to_float(in[i * ld + jj]);
}

inline void dots_bf16_n(const uint16_t* w, const uint16_t* in, int64_t ld, int64_t width,
                        int64_t n, float* out, int64_t ldo) {
  float r[kGroup];
  for (int64_t t0 = 0; t0 < n; t0 += kGroup) {
    const int64_t nt = std::min<int64_t>(kGroup, n - t0);
    with_tokens<kGroup>(nt, [&](auto tokens) {
      dots_bf16<decltype(tokens)::value>(w, in + t0 * ld, ld, width, r);
    });
    for (int64_t i = 0; i < nt; ++i) out[(t0 + i) * ldo] = r[i];
  }
}
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
inline void dots_bf16_n(const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, float*,
                        int64_t) {}  // never called: kBf16Dot is false
#endif

// gin[t, j..] += sum_c coef[c, t] * w[c, j..] for NT tokens and one lane group V of
// columns: an input gradient. coef is (rows, ldc), gin (tokens, lda), float32.
template <int NT, typename V, typename T>
inline void input_grad(const T* w, int64_t ldw, int64_t rows, const float* coef, int64_t ldc,
                       float* gin, int64_t lda) {
  using L = Lane<V>;
  V acc[NT];
  for (int i = 0; i < NT; ++i) acc[i] = L::load(gin + i * lda);
  for (int64_t c = 0; c < rows; ++c) {
    const V wv = L::load(w + c * ldw);
#pragma GCC unroll 16
    for (int i = 0; i < NT; ++i) acc[i] += L::splat(coef[c * ldc + i]) * wv;
  }
  for (int i = 0; i < NT; ++i) L::store(gin + i * lda, acc[i]);
}

// gw[c, j..] = sum_t coef[c, t] * act[t, j..] over all NT tokens, rounded once to T:
// a weight gradient.
template <int NT, typename V, typename T>
inline void weight_grad(int64_t rows, const float* coef, int64_t ldc, const float* act,
                        int64_t lda, T* gw, int64_t ldgw) {
  using L = Lane<V>;
  V a[NT];
  for (int i = 0; i < NT; ++i) a[i] = L::load(act + i * lda);
  for (int64_t c = 0; c < rows; ++c) {
    V sum = L::splat(coef[c * ldc]) * a[0];
#pragma GCC unroll 16
    for (int i = 1; i < NT; ++i) sum += L::splat(coef[c * ldc + i]) * a[i];
    L::store(gw + c * ldgw, sum);
  }
}

// Columns [j0, j1) of one weight block (rows c < rows): gin from w in groups of
// kGroup tokens, and gw from act with every token at once; either may be null.
// coef holds kMaxTokens columns per row.
template <typename T>
void grad_block(const T* w, int64_t ldw, int64_t rows, const float* coef, const float* act,
                float* gin, int64_t lda, T* gw, int64_t n, int64_t j0, int64_t j1) {
  if (gin != nullptr) {
    for (int64_t t0 = 0; t0 < n; t0 += kGroup) {
      with_tokens<kGroup>(std::min<int64_t>(kGroup, n - t0), [&](auto tokens) {
        constexpr int NT = decltype(tokens)::value;
        float* gt = gin + t0 * lda;
        int64_t j = j0;
        for (; j + kLanes <= j1; j += kLanes)
          input_grad<NT, vf>(w + j, ldw, rows, coef + t0, kMaxTokens, gt + j, lda);
        for (; j < j1; ++j) input_grad<NT, float>(w + j, ldw, rows, coef + t0, kMaxTokens, gt + j, lda);
      });
    }
  }
  if (gw != nullptr) {
    with_tokens<kMaxTokens>(n, [&](auto tokens) {
      constexpr int NT = decltype(tokens)::value;
      int64_t j = j0;
      for (; j + kLanes <= j1; j += kLanes)
        weight_grad<NT, vf>(rows, coef, kMaxTokens, act + j, lda, gw + j, ldw);
      for (; j < j1; ++j) weight_grad<NT, float>(rows, coef, kMaxTokens, act + j, lda, gw + j, ldw);
    });
  }
}

// Columns per backward task: 4 vectors, so a task's accumulators fit in registers.
constexpr int64_t kColumns = 4 * kLanes;

template <typename T>
inline const T* data(const torch::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
inline T* data_mut(const torch::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename T>
void store_rounded(const float* src, T* dst, int64_t count) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) Lane<vf>::store(dst + i, Lane<vf>::load(src + i));
  for (; i < count; ++i) Lane<float>::store(dst + i, src[i]);
}

template <typename T>
void forward_impl(const torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& w1,
                  const torch::Tensor& w2, const float* bias, float* mid) {
  const int64_t n = x.size(0), k = w1.size(0), q = w1.size(1), p = w1.size(2);
  const int64_t l = w2.size(0), s = w2.size(1), r = w2.size(2);
  const T* xp = data<T>(x);
  const T* w1p = data<T>(w1);
  const T* w2p = data<T>(w2);
  constexpr bool pairs = kBf16Dot && std::is_same<T, uint16_t>::value;  // bf16: vdpbf16ps
  std::vector<float> xf(pairs ? 0 : n * k * p);
  for (size_t i = 0; i < xf.size(); ++i) xf[i] = Lane<float>::load(xp + i);
  // stage 1: row m = a*q + c of h, written to mid[t, v, u] with m = u*l + v
  at::parallel_for(0, k * q, 32, [&](int64_t begin, int64_t end) {
    // (a, c) and (u, v) of row m = a*q + c = u*l + v, stepped without divisions
    int64_t a = begin / q, c = begin % q, u = begin / l, v = begin % l;
    for (int64_t m = begin; m < end; ++m) {
      if constexpr (pairs)
        dots_bf16_n(w1p + m * p, xp + a * p, k * p, p, n, mid + v * r + u, l * r);
      else
        dots_n(w1p + m * p, xf.data() + a * p, k * p, p, n, mid + v * r + u, l * r);
      if (++c == q) {
        c = 0;
        ++a;
      }
      if (++v == l) {
        v = 0;
        ++u;
      }
    }
  });
  // bf16: the second factor reads the middle rounded to bf16, as a bf16 GEMM would
  // (backward keeps the float32 mid)
  std::vector<uint16_t> mid_b(pairs ? n * l * r : 0);
  for (size_t i = 0; i < mid_b.size(); ++i) mid_b[i] = to_bf16(mid[i]);
  // stage 2: row (v, e) of w2 gives y[t, e*l + v]; tasks take ranges of e*l + v, so
  // that two threads share at most the cache lines at their ranges' ends (in (v, e)
  // order they took turns on every line of the output: 3x slower, measured)
  std::vector<float> out(n * s * l);
  at::parallel_for(0, l * s, 32, [&](int64_t begin, int64_t end) {
    int64_t e = begin / l, v = begin % l;  // i = e*l + v, stepped without divisions
    for (int64_t i = begin; i < end; ++i) {
      float* o = out.data() + i;
      if constexpr (pairs)
        dots_bf16_n(w2p + (v * s + e) * r, mid_b.data() + v * r, l * r, r, n, o, s * l);
      else
        dots_n(w2p + (v * s + e) * r, mid + v * r, l * r, r, n, o, s * l);
      if (bias != nullptr)
        for (int64_t t = 0; t < n; ++t) o[t * s * l] += bias[i];
      if (++v == l) {
        v = 0;
        ++e;
      }
    }
  });
  T* yp = data_mut<T>(y);
  for (int64_t t = 0; t < n; ++t) store_rounded(out.data() + t * s * l, yp + t * y.stride(0), s * l);
}

template <typename T>
void backward_impl(const torch::Tensor& g, const torch::Tensor& x, const torch::Tensor& w1,
                   const torch::Tensor& w2, const float* mid, T* gx, T* gw1, T* gw2, T* gbias) {
  const int64_t n = x.size(0), k = w1.size(0), q = w1.size(1), p = w1.size(2);
  const int64_t l = w2.size(0), s = w2.size(1), r = w2.size(2);
  // gz[(v*s + e) * kMaxTokens + t] = g[t, e*l + v]: each weight row's coefficients together
  std::vector<float> gz(l * s * kMaxTokens, 0.f);
  const T* gp = data<T>(g);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t e = 0; e < s; ++e)
      for (int64_t v = 0; v < l; ++v) gz[(v * s + e) * kMaxTokens + t] = Lane<float>::load(gp + t * s * l + e * l + v);
  if (gbias != nullptr)
    for (int64_t i = 0; i < s * l; ++i) {
      float sum = 0.f;
      for (int64_t t = 0; t < n; ++t) sum += Lane<float>::load(gp + t * s * l + i);
      Lane<float>::store(gbias + i, sum);
    }
  const bool need_h = gx != nullptr || gw1 != nullptr;
  // second factor: tasks of kColumns columns u of one block v
  std::vector<float> gmid(need_h ? n * l * r : 0, 0.f);  // (n, l, r)
  const int64_t tiles2 = (r + kColumns - 1) / kColumns;
  at::parallel_for(0, l * tiles2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t v = task / tiles2, u0 = task % tiles2 * kColumns;
      const int64_t u1 = std::min(r, u0 + kColumns);
      grad_block(data<T>(w2) + v * s * r, r, s, gz.data() + v * s * kMaxTokens, mid + v * r,
                 need_h ? gmid.data() + v * r : nullptr, l * r, gw2 ? gw2 + v * s * r : nullptr,
                 n, u0, u1);
    }
  });
  if (!need_h) return;
  // gh[(a*q + c) * kMaxTokens + t] = gmid[t, v, u] with a*q + c = u*l + v
  std::vector<float> gh(k * q * kMaxTokens, 0.f);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t m = 0; m < k * q; ++m) gh[m * kMaxTokens + t] = gmid[t * l * r + (m % l) * r + m / l];
  std::vector<float> xf(gw1 ? n * k * p : 0);
  const T* xp = data<T>(x);
  for (size_t i = 0; i < xf.size(); ++i) xf[i] = Lane<float>::load(xp + i);
  std::vector<float> gxf(gx ? n * k * p : 0, 0.f);
  const int64_t tiles1 = (p + kColumns - 1) / kColumns;
  at::parallel_for(0, k * tiles1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t a = task / tiles1, j0 = task % tiles1 * kColumns;
      const int64_t j1 = std::min(p, j0 + kColumns);
      grad_block(data<T>(w1) + a * q * p, p, q, gh.data() + a * q * kMaxTokens,
                 gw1 ? xf.data() + a * p : nullptr, gx ? gxf.data() + a * p : nullptr, k * p,
                 gw1 ? gw1 + a * q * p : nullptr, n, j0, j1);
    }
  });
  if (gx != nullptr) store_rounded(gxf.data(), gx, n * k * p);
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "few_tokens: ", what); }

void check_inputs(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& w2) {
  const auto type = x.scalar_type();
  check(type == at::kFloat || type == at::kBFloat16, "float32 or bfloat16 only");
  check(x.device().is_cpu() && w1.device().is_cpu() && w2.device().is_cpu(), "CPU tensors only");
  check(x.dim() == 2 && x.is_contiguous() && x.size(0) <= kMaxTokens,
        "x must be a contiguous (N, k*p) with N <= 16");
  check(w1.dim() == 3 && w2.dim() == 3 && w1.is_contiguous() && w2.is_contiguous() &&
            w1.scalar_type() == type && w2.scalar_type() == type,
        "w1 and w2 must be contiguous 3-D tensors of x's dtype");
  check(w1.size(0) * w1.size(1) == w2.size(0) * w2.size(2) && x.size(1) == w1.size(0) * w1.size(2),
        "the factors do not fit x or each other");
}

float* float_buffer(const c10::optional<torch::Tensor>& t, int64_t numel, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == at::kFloat &&
                  t->numel() == numel,
              "few_tokens: ", what, " must be a contiguous float32 CPU tensor of ", numel,
              " elements");
  return t->data_ptr<float>();
}

}  // namespace

// y (N, s*l) = x M^T (+ bias, float32); mid (N, l*r) float32 receives the permuted
// middle activation, which backward takes.
void few_tokens_forward_(torch::Tensor y, torch::Tensor mid, torch::Tensor x, torch::Tensor w1,
                         torch::Tensor w2, c10::optional<torch::Tensor> bias) {
  check_inputs(x, w1, w2);
  const int64_t n = x.size(0), l = w2.size(0), s = w2.size(1), r = w2.size(2);
  check(y.device().is_cpu() && y.dim() == 2 && y.size(0) == n && y.size(1) == s * l &&
            y.stride(1) == 1 && y.scalar_type() == x.scalar_type(),
        "y must be an (N, s*l) CPU tensor of x's dtype with contiguous rows");
  float* midp = float_buffer(mid, n * l * r, "mid");
  check(midp != nullptr, "mid is required");
  const float* b = float_buffer(bias, s * l, "bias");
  if (n == 0) return;
  if (x.scalar_type() == at::kFloat)
    forward_impl<float>(y, x, w1, w2, b, midp);
  else
    forward_impl<uint16_t>(y, x, w1, w2, b, midp);
}

// Gradients from grad_y g (N, s*l), all in x's dtype: gx (N, k*p), gw1 (k, q, p),
// gw2 (l, s, r), gbias (s*l); any may be undefined (not wanted).
void few_tokens_backward_(torch::Tensor g, torch::Tensor x, torch::Tensor w1, torch::Tensor w2,
                          torch::Tensor mid, c10::optional<torch::Tensor> gx,
                          c10::optional<torch::Tensor> gw1, c10::optional<torch::Tensor> gw2,
                          c10::optional<torch::Tensor> gbias) {
  check_inputs(x, w1, w2);
  const int64_t n = x.size(0), k = w1.size(0), q = w1.size(1), p = w1.size(2);
  const int64_t l = w2.size(0), s = w2.size(1), r = w2.size(2);
  check(g.device().is_cpu() && g.is_contiguous() && g.dim() == 2 && g.size(0) == n &&
            g.size(1) == s * l && g.scalar_type() == x.scalar_type(),
        "grad_y must be a contiguous (N, s*l) CPU tensor of x's dtype");
  const float* midp = float_buffer(mid, n * l * r, "mid");
  check(midp != nullptr, "mid is required");
  auto out = [&](const c10::optional<torch::Tensor>& t, int64_t numel, const char* what) -> void* {
    if (!t.has_value() || !t->defined()) return nullptr;
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == x.scalar_type() &&
                    t->numel() == numel,
                "few_tokens: ", what, " must be a contiguous CPU tensor of x's dtype with ", numel,
                " elements");
    return t->data_ptr();
  };
  void* gxp = out(gx, n * k * p, "gx");
  void* gw1p = out(gw1, k * q * p, "gw1");
  void* gw2p = out(gw2, l * s * r, "gw2");
  void* gbp = out(gbias, s * l, "gbias");
  if (n == 0) return;
  if (x.scalar_type() == at::kFloat)
    backward_impl<float>(g, x, w1, w2, midp, static_cast<float*>(gxp), static_cast<float*>(gw1p),
                         static_cast<float*>(gw2p), static_cast<float*>(gbp));
  else
    backward_impl<uint16_t>(g, x, w1, w2, midp, static_cast<uint16_t*>(gxp),
                            static_cast<uint16_t*>(gw1p), static_cast<uint16_t*>(gw2p),
                            static_cast<uint16_t*>(gbp));
}
