// The small-block forward of small_blocks.cpp for bf16, with bf16 dot products.
//
// small_blocks.cpp computes bf16 in float32 FMAs, so a bf16 layer runs no faster
// than a float32 one there (6.3 against 6.7 ms for 8192 tokens of the sqrt(n)
// Monarch of 1024, measured), while the dense bf16 GEMM is four times faster
// than the float32 one. CPUs with AVX512-BF16 multiply pairs of bf16 into float32
// lanes (vdpbf16ps: 32 products per instruction, twice an FMA's 16), so here
// both stages work on pairs along their sums:
//
//   first factor:  h[t, a*q + c] = sum_j x[t, a*p + j] w1[a, c, j], j in pairs: the
//                  pair (x[.., j], x[.., j+1]) is one 32-bit broadcast from x's row,
//                  w1 packed as w1p[a, j/2, c, 2];
//   second factor: y[t, e*l + v] = sum_u h[t, u*l + v] w2[v, e, u], u in pairs: the
//                  tile's middle is rounded to bf16 and packed as hp[t, u/2, v, 2],
//                  w2 as w2p[e, u/2, v, 2]; vectors along v as in small_blocks.cpp.
//
// The middle is rounded to bf16 between the factors, as the chunked path's bf16
// GEMMs round it, and like them (oneDNN uses the same instruction) subnormal
// inputs and products count as zero; `mid` (or null) receives h in bf16 for backward. Needs p even
// and q, l multiples of 16.

#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include "bf16_pairs.h"
#include "partials.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>

namespace {

constexpr int kLanes = 16;
constexpr int kTile = 8;  // tokens per register block

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// 16 floats rounded to bf16 (round to nearest even), NaN kept a NaN.
inline __m256i round16(__m512 v) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)); }

// out[t, a*Q + c] for t < NT, float32: the first factor over pairs of j, C vectors
// of c at a time (each broadcast of x feeds C products).
template <int NT, int C>
inline void first_factor_columns(const uint16_t* xa, int64_t ldx, const uint16_t* wa,
                                 int64_t pairs, int64_t Q, int64_t c0, float* out,
                                 int64_t ldo) {
  __m512 acc[NT][C];
  for (int t = 0; t < NT; ++t)
    for (int i = 0; i < C; ++i) acc[t][i] = _mm512_setzero_ps();
  for (int64_t jp = 0; jp < pairs; ++jp) {
    __m512i w[C];
    for (int i = 0; i < C; ++i) w[i] = _mm512_loadu_si512(wa + (jp * Q + c0 + i * kLanes) * 2);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      int32_t pair;
      std::memcpy(&pair, xa + t * ldx + 2 * jp, sizeof pair);
      const __m512bh xs = as_bh(_mm512_set1_epi32(pair));
      for (int i = 0; i < C; ++i) acc[t][i] = _mm512_dpbf16_ps(acc[t][i], xs, as_bh(w[i]));
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int i = 0; i < C; ++i) _mm512_storeu_ps(out + t * ldo + c0 + i * kLanes, acc[t][i]);
}

template <int NT>
void first_factor(const uint16_t* x, int64_t ldx, const uint16_t* w1p, int64_t K, int64_t P,
                  int64_t Q, float* out, int64_t ldo) {
  const int64_t pairs = P / 2;
  for (int64_t a = 0; a < K; ++a) {
    const uint16_t* xa = x + a * P;
    const uint16_t* wa = w1p + a * pairs * Q * 2;
    int64_t c0 = 0;
    for (; c0 + 2 * kLanes <= Q; c0 += 2 * kLanes)
      first_factor_columns<NT, 2>(xa, ldx, wa, pairs, Q, c0, out + a * Q, ldo);
    if (c0 < Q) first_factor_columns<NT, 1>(xa, ldx, wa, pairs, Q, c0, out + a * Q, ldo);
  }
}

// hp[t, u/2, v, 2] = bf16(h[t, u*L + v]) for NT rows of h (float32, rows ldh apart);
// an odd last u pairs with zero.
template <int NT>
void pack_middle(const float* h, int64_t ldh, int64_t U, int64_t L, uint16_t* hp, int64_t ldp) {
  for (int t = 0; t < NT; ++t) {
    for (int64_t u = 0; u < U; u += 2) {
      for (int64_t v0 = 0; v0 < L; v0 += kLanes) {
        const __m512 lo = _mm512_loadu_ps(h + t * ldh + u * L + v0);
        const __m512 hi = u + 1 < U ? _mm512_loadu_ps(h + t * ldh + (u + 1) * L + v0)
                                    : _mm512_setzero_ps();
        const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(hp + t * ldp + (u / 2 * L + v0) * 2, bf16_pairs::interleave(both));
      }
    }
  }
}

// The same pairs from bf16 rows: gp[t, e/2, v, 2] = g[t, e*L + v] for NT rows of g
// (rows ldg apart); an odd last e pairs with zero. For grad h, whose sums run over e.
template <int NT>
void pack_rows_bf16(const uint16_t* g, int64_t ldg, int64_t S, int64_t L, uint16_t* gp,
                    int64_t ldp) {
  for (int t = 0; t < NT; ++t) {
    for (int64_t e = 0; e < S; e += 2) {
      const uint16_t* first = g + t * ldg + e * L;
      const uint16_t* second = e + 1 < S ? first + L : nullptr;
      for (int64_t v0 = 0; v0 < L; v0 += kLanes)
        _mm512_storeu_si512(gp + t * ldp + (e / 2 * L + v0) * 2,
                            bf16_pairs::pairs16(first + v0, second ? second + v0 : nullptr));
    }
  }
}

// y[t, e*L + v] = sum_u h[t, u*L + v] w2[v, e, u] (+ bias) for t < NT, pairs of u;
// E2 values of e at a time (each load of h feeds E2 products).
template <int NT, int E2>
inline void second_factor_rows(const uint16_t* hp, int64_t ldp, const uint16_t* w2p,
                               int64_t pairs, int64_t L, int64_t e, int64_t v0,
                               const float* bias, uint16_t* y, int64_t ldy) {
  __m512 acc[NT][E2];
  for (int t = 0; t < NT; ++t)
    for (int i = 0; i < E2; ++i) acc[t][i] = _mm512_setzero_ps();
  for (int64_t up = 0; up < pairs; ++up) {
    __m512i w[E2];
    for (int i = 0; i < E2; ++i)
      w[i] = _mm512_loadu_si512(w2p + ((e + i) * pairs * L + up * L + v0) * 2);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512bh hv = as_bh(_mm512_loadu_si512(hp + t * ldp + (up * L + v0) * 2));
      for (int i = 0; i < E2; ++i) acc[t][i] = _mm512_dpbf16_ps(acc[t][i], hv, as_bh(w[i]));
    }
  }
  for (int i = 0; i < E2; ++i) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + (e + i) * L + v0) : _mm512_setzero_ps();
    for (int t = 0; t < NT; ++t)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + t * ldy + (e + i) * L + v0),
                          round16(_mm512_add_ps(acc[t][i], b)));
  }
}

template <int NT>
void second_factor(const uint16_t* hp, int64_t ldp, const uint16_t* w2p, int64_t E,
                   int64_t pairs, int64_t L, const float* bias, uint16_t* y, int64_t ldy) {
  for (int64_t v0 = 0; v0 < L; v0 += kLanes) {
    int64_t e = 0;
    for (; e + 2 <= E; e += 2)
      second_factor_rows<NT, 2>(hp, ldp, w2p, pairs, L, e, v0, bias, y, ldy);
    if (e < E) second_factor_rows<NT, 1>(hp, ldp, w2p, pairs, L, e, v0, bias, y, ldy);
  }
}

template <int NT>
void tile(const uint16_t* x, int64_t ldx, const uint16_t* w1p, const uint16_t* w2p,
          const float* bias, int64_t K, int64_t P, int64_t Q, int64_t E, int64_t U, int64_t L,
          float* mid, int64_t ldm, uint16_t* hp, int64_t ldp, uint16_t* y, int64_t ldy,
          uint16_t* mid_out) {
  first_factor<NT>(x, ldx, w1p, K, P, Q, mid, ldm);
  if (mid_out != nullptr)  // h for backward, rows K*Q long (Q is a multiple of 16)
    for (int t = 0; t < NT; ++t)
      for (int64_t i = 0; i < K * Q; i += kLanes)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(mid_out + t * K * Q + i),
                            round16(_mm512_loadu_ps(mid + t * ldm + i)));
  pack_middle<NT>(mid, ldm, U, L, hp, ldp);
  second_factor<NT>(hp, ldp, w2p, E, (U + 1) / 2, L, bias, y, ldy);
}

// Backward, the two stages in the other order for NT tokens: grad h from grad y by
// the strided stage (pairs of e), stored in bf16 (kept for w1's gradient, and the
// next stage's input, as the chunked path's bf16 GEMMs round it); grad x from it by
// the block stage (pairs of c), rounded to bf16.
template <int NT>
void grad_tile(const uint16_t* g, int64_t ldg, const uint16_t* w2g, const uint16_t* w1g,
               int64_t K, int64_t Q, int64_t P, int64_t S, int64_t R, int64_t L, uint16_t* gp,
               int64_t ldp, uint16_t* gh, int64_t ldh, float* gxf, int64_t ldf, uint16_t* gx,
               int64_t ldx) {
  pack_rows_bf16<NT>(g, ldg, S, L, gp, ldp);
  second_factor<NT>(gp, ldp, w2g, R, (S + 1) / 2, L, nullptr, gh, ldh);
  first_factor<NT>(gh, ldh, w1g, K, Q, P, gxf, ldf);
  for (int t = 0; t < NT; ++t)
    for (int64_t i = 0; i < K * P; i += kLanes)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(gx + t * ldx + i),
                          round16(_mm512_loadu_ps(gxf + t * ldf + i)));
}

// w2's gradient, gw2p[e, u, v] = sum_t g[t, e*L + v] h[t, u*L + v]: vectors along v,
// whose lanes are side by side in both g and h, so no permutation pass is needed.
// The sum runs over tokens, so a tile's rows are packed in pairs of tokens,
// P[t/2][col][2] (a ragged last token pairs with zeros); with `colsum`, g's column
// sums (the bias gradient) are taken while its rows are packed.
constexpr int kPairTile = 32;  // token pairs per tile: both packed tiles in L2

// acc[e, u, v0..v0+16) += sum over the pairs of gp[., e*L + v0..] . hp[., u*L + v0..]
// for EB values of e and UB of u.
template <int EB, int UB>
inline void sum_w2_pairs(const uint16_t* gp, const uint16_t* hp, int64_t ldp_g, int64_t ldp_h,
                         int64_t pairs, int64_t L, float* acc, int64_t R) {
  __m512 sums[EB][UB];
  for (int i = 0; i < EB; ++i)
    for (int j = 0; j < UB; ++j) sums[i][j] = _mm512_loadu_ps(acc + (i * R + j) * L);
  for (int64_t tp = 0; tp < pairs; ++tp) {
    __m512bh gv[EB], hv[UB];
    for (int i = 0; i < EB; ++i) gv[i] = as_bh(_mm512_loadu_si512(gp + tp * ldp_g + 2 * i * L));
    for (int j = 0; j < UB; ++j) hv[j] = as_bh(_mm512_loadu_si512(hp + tp * ldp_h + 2 * j * L));
    for (int i = 0; i < EB; ++i)
      for (int j = 0; j < UB; ++j) sums[i][j] = _mm512_dpbf16_ps(sums[i][j], gv[i], hv[j]);
  }
  for (int i = 0; i < EB; ++i)
    for (int j = 0; j < UB; ++j) _mm512_storeu_ps(acc + (i * R + j) * L, sums[i][j]);
}

// In parallel over the tokens: run(std::integral_constant<int, kTile>{}, t0, scratch) for
// each full tile of kTile tokens from t0, and the same with 1 for each token of a
// ragged last tile; scratch is each task's make_scratch().
template <typename MakeScratch, typename Run>
void over_tiles(int64_t n, const MakeScratch& make_scratch, const Run& run) {
  at::parallel_for(0, (n + kTile - 1) / kTile, 4, [&](int64_t begin, int64_t end) {
    auto scratch = make_scratch();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t t0 = t * kTile, nt = std::min<int64_t>(kTile, n - t0);
      if (nt == kTile) {
        run(std::integral_constant<int, kTile>{}, t0, scratch);
      } else {
        for (int64_t i = t0; i < t0 + nt; ++i)  // the ragged last tile, a token at a time
          run(std::integral_constant<int, 1>{}, i, scratch);
      }
    }
  });
}

}  // namespace

// y = x M^T (+ bias) for bf16 x (N, k*p) and y (N, s*l) with rows contiguous;
// w1p (k, p/2, q, 2) and w2p (s, ceil(r/2), l, 2) bf16 packed as above, bias float32;
// with mid (N, k*q) bf16, also keeps the middle activation.
void small_blocks_forward_dpbf16_(torch::Tensor y, torch::Tensor x, torch::Tensor w1p,
                                  torch::Tensor w2p, c10::optional<torch::Tensor> bias,
                                  c10::optional<torch::Tensor> mid) {
  auto bf16_cpu = [](const torch::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kBFloat16;
  };
  TORCH_CHECK(bf16_cpu(x) && bf16_cpu(y) && bf16_cpu(w1p) && bf16_cpu(w2p),
              "small_blocks_forward_dpbf16_: bf16 CPU tensors expected");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.stride(1) == 1 && y.stride(1) == 1 &&
                  w1p.dim() == 4 && w2p.dim() == 4 && w1p.is_contiguous() &&
                  w2p.is_contiguous() && w1p.size(3) == 2 && w2p.size(3) == 2,
              "small_blocks_forward_dpbf16_: x, y with contiguous rows and packed "
              "(k, p/2, q, 2), (s, r/2, l, 2) weights expected");
  const int64_t K = w1p.size(0), P = 2 * w1p.size(1), Q = w1p.size(2);
  const int64_t E = w2p.size(0), pairs = w2p.size(1), L = w2p.size(2);
  TORCH_CHECK(L > 0 && Q % kLanes == 0 && L % kLanes == 0 && (K * Q) % L == 0 &&
                  (K * Q / L + 1) / 2 == pairs,
              "small_blocks_forward_dpbf16_: q and l must be multiples of 16 and k*q == l*r");
  const int64_t U = K * Q / L;
  TORCH_CHECK(x.size(1) == K * P && y.size(1) == E * L && y.size(0) == x.size(0),
              "small_blocks_forward_dpbf16_: x ", x.sizes(), " and y ", y.sizes(),
              " do not fit the factors");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->is_contiguous() &&
                    bias->scalar_type() == at::kFloat && bias->numel() == E * L,
                "small_blocks_forward_dpbf16_: bias must be a contiguous float32 CPU tensor of ",
                E * L);
    b = bias->data_ptr<float>();
  }
  const int64_t n = x.size(0);
  uint16_t* mid_out = nullptr;
  if (mid.has_value() && mid->defined()) {
    TORCH_CHECK(bf16_cpu(*mid) && mid->is_contiguous() && mid->dim() == 2 &&
                    mid->size(0) == n && mid->size(1) == K * Q,
                "small_blocks_forward_dpbf16_: mid must be a contiguous bf16 CPU (N, k*q)");
    mid_out = reinterpret_cast<uint16_t*>(mid->data_ptr());
  }
  if (n == 0) return;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const auto* w1 = reinterpret_cast<const uint16_t*>(w1p.data_ptr());
  const auto* w2 = reinterpret_cast<const uint16_t*>(w2p.data_ptr());
  const int64_t ldx = x.stride(0), ldy = y.stride(0);
  const int64_t ldm = K * Q + kLanes;            // rows padded off the 4 KiB set stride
  const int64_t ldp = pairs * L * 2 + 2 * kLanes;
  over_tiles(
      n,
      [&] {  // the tile's middle (float32), then packed in pairs of u (bf16)
        return std::make_pair(std::vector<float>(kTile * ldm), std::vector<uint16_t>(kTile * ldp));
      },
      [&](auto nt, int64_t t0, auto& scratch) {
        tile<decltype(nt)::value>(xp + t0 * ldx, ldx, w1, w2, b, K, P, Q, E, U, L,
                                  scratch.first.data(), ldm, scratch.second.data(), ldp,
                                  yp + t0 * ldy, ldy, mid_out ? mid_out + t0 * K * Q : nullptr);
      });
}

// grad x and grad h of small_blocks_forward_dpbf16_ for bf16 g (N, s*l): gh (N, k*q)
// and gx (N, k*p) receive them (rows contiguous); w2g (r, ceil(s/2), l, 2) and
// w1g (k, q/2, p, 2) are the factors packed in pairs along their sums
// (w2g[u, e/2, v, i] = w2[v, e + i, u], w1g[a, c/2, j, i] = w1[a, c + i, j]).
// Needs l and p multiples of 16, q even.
void small_blocks_grad_x_dpbf16_(torch::Tensor gx, torch::Tensor gh, torch::Tensor g,
                                 torch::Tensor w2g, torch::Tensor w1g) {
  auto bf16_rows = [](const torch::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 2 &&
           t.stride(1) == 1;
  };
  TORCH_CHECK(bf16_rows(gx) && bf16_rows(gh) && bf16_rows(g),
              "small_blocks_grad_x_dpbf16_: gx, gh and g must be bf16 CPU matrices with "
              "contiguous rows");
  TORCH_CHECK(w2g.dim() == 4 && w1g.dim() == 4 && w2g.is_contiguous() && w1g.is_contiguous() &&
                  w2g.scalar_type() == at::kBFloat16 && w1g.scalar_type() == at::kBFloat16 &&
                  w2g.size(3) == 2 && w1g.size(3) == 2,
              "small_blocks_grad_x_dpbf16_: packed (r, s/2, l, 2) and (k, q/2, p, 2) bf16 "
              "factors expected");
  const int64_t R = w2g.size(0), L = w2g.size(2), K = w1g.size(0), Q = 2 * w1g.size(1),
                P = w1g.size(2);
  const int64_t n = g.size(0);
  TORCH_CHECK(L > 0 && L % kLanes == 0 && P % kLanes == 0 && K * Q == L * R &&
                  g.size(1) % L == 0 && (g.size(1) / L + 1) / 2 == w2g.size(1),
              "small_blocks_grad_x_dpbf16_: l and p must be multiples of 16 and k*q == l*r");
  const int64_t S = g.size(1) / L;
  TORCH_CHECK(gh.size(0) == n && gh.size(1) == K * Q && gx.size(0) == n && gx.size(1) == K * P,
              "small_blocks_grad_x_dpbf16_: gh ", gh.sizes(), " and gx ", gx.sizes(),
              " do not fit the factors");
  at::assert_no_internal_overlap(gx);
  at::assert_no_internal_overlap(gh);
  if (n == 0) return;
  auto ptr = [](const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
  const uint16_t *gp_in = ptr(g), *w2 = ptr(w2g), *w1 = ptr(w1g);
  uint16_t *ghp = ptr(gh), *gxp = ptr(gx);
  const int64_t ldg = g.stride(0), ldh = gh.stride(0), ldx = gx.stride(0);
  const int64_t ldp = (S + 1) / 2 * L * 2 + 2 * kLanes;  // rows off the 4 KiB set stride
  const int64_t ldf = K * P + kLanes;
  over_tiles(
      n,
      [&] {  // grad y packed in pairs of e (bf16), then grad x before rounding (float32)
        return std::make_pair(std::vector<uint16_t>(kTile * ldp), std::vector<float>(kTile * ldf));
      },
      [&](auto nt, int64_t t0, auto& scratch) {
        grad_tile<decltype(nt)::value>(gp_in + t0 * ldg, ldg, w2, w1, K, Q, P, S, R, L,
                                       scratch.first.data(), ldp, ghp + t0 * ldh, ldh,
                                       scratch.second.data(), ldf, gxp + t0 * ldx, ldx);
      });
}

// gw2p (s, r, l) float32 = sum over the tokens of g[t, e*l + v] h[t, u*l + v], for
// bf16 g (N, s*l) and h (N, r*l) with contiguous rows; colsum (s*l float32, or
// undefined) = g's column sums. Per-task partial sums added in task order (partials.h).
void small_blocks_grad_w2_dpbf16_(torch::Tensor gw2p, torch::Tensor g, torch::Tensor h,
                                  c10::optional<torch::Tensor> colsum) {
  TORCH_CHECK(gw2p.device().is_cpu() && gw2p.scalar_type() == at::kFloat && gw2p.dim() == 3 &&
                  gw2p.is_contiguous(),
              "small_blocks_grad_w2_dpbf16_: gw2p must be a contiguous float32 CPU (s, r, l)");
  const int64_t S = gw2p.size(0), R = gw2p.size(1), L = gw2p.size(2), n = g.size(0);
  auto bf16_rows = [n](const torch::Tensor& t, int64_t cols) {
    return t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 2 &&
           t.stride(1) == 1 && t.size(0) == n && t.size(1) == cols;
  };
  TORCH_CHECK(L > 0 && L % kLanes == 0,
              "small_blocks_grad_w2_dpbf16_: l must be a positive multiple of 16");
  TORCH_CHECK(bf16_rows(g, S * L) && bf16_rows(h, R * L),
              "small_blocks_grad_w2_dpbf16_: g (N, s*l) and h (N, r*l) must be bf16 CPU "
              "matrices with contiguous rows, got ", g.sizes(), " and ", h.sizes());
  float* cs = nullptr;
  if (colsum.has_value() && colsum->defined()) {
    TORCH_CHECK(colsum->device().is_cpu() && colsum->scalar_type() == at::kFloat &&
                    colsum->is_contiguous() && colsum->numel() == S * L,
                "small_blocks_grad_w2_dpbf16_: colsum must be a contiguous float32 CPU tensor of ",
                S * L);
    cs = colsum->data_ptr<float>();
  }
  gw2p.zero_();
  if (n == 0) return;
  const auto* G = reinterpret_cast<const uint16_t*>(g.data_ptr());
  const auto* H = reinterpret_cast<const uint16_t*>(h.data_ptr());
  const int64_t ldg = g.stride(0), ldh = h.stride(0);
  const int64_t ldp_g = 2 * S * L + 2 * kLanes, ldp_h = 2 * R * L + 2 * kLanes;  // off 4 KiB
  const int64_t tiles = (n + 2 * kPairTile - 1) / (2 * kPairTile);
  OrderedPartials<float> sums, columns;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(S * R * L, 0.f), col(cs != nullptr ? S * L : 0, 0.f);
    std::vector<uint16_t> gp(kPairTile * ldp_g), hp(kPairTile * ldp_h);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * 2 * kPairTile, nt = std::min<int64_t>(2 * kPairTile, n - t0);
      const int64_t pairs = (nt + 1) / 2;
      bf16_pairs::pack_token_pairs(G + t0 * ldg, ldg, S * L, nt, gp.data(), ldp_g,
                                   cs != nullptr ? col.data() : nullptr);
      bf16_pairs::pack_token_pairs(H + t0 * ldh, ldh, R * L, nt, hp.data(), ldp_h);
      for (int64_t v0 = 0; v0 < L; v0 += kLanes) {
        int64_t e = 0;
        for (; e + 4 <= S; e += 4) {
          int64_t u = 0;
          for (; u + 4 <= R; u += 4)
            sum_w2_pairs<4, 4>(gp.data() + 2 * (e * L + v0), hp.data() + 2 * (u * L + v0), ldp_g,
                               ldp_h, pairs, L, acc.data() + (e * R + u) * L + v0, R);
          for (; u < R; ++u)
            sum_w2_pairs<4, 1>(gp.data() + 2 * (e * L + v0), hp.data() + 2 * (u * L + v0), ldp_g,
                               ldp_h, pairs, L, acc.data() + (e * R + u) * L + v0, R);
        }
        for (; e < S; ++e)
          for (int64_t u = 0; u < R; ++u)
            sum_w2_pairs<1, 1>(gp.data() + 2 * (e * L + v0), hp.data() + 2 * (u * L + v0), ldp_g,
                               ldp_h, pairs, L, acc.data() + (e * R + u) * L + v0, R);
      }
    }
    sums.add(begin, std::move(acc));
    if (cs != nullptr) columns.add(begin, std::move(col));
  });
  sums.sum_into(gw2p.data_ptr<float>());
  if (cs != nullptr) columns.sum_into(cs);
}

#else  // no AVX512-BF16: callers check bf16_dot() (module.cpp) first

void small_blocks_forward_dpbf16_(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                                  c10::optional<torch::Tensor>, c10::optional<torch::Tensor>) {
  TORCH_CHECK(false, "small_blocks_forward_dpbf16_: built without AVX512-BF16");
}

void small_blocks_grad_x_dpbf16_(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                                 torch::Tensor) {
  TORCH_CHECK(false, "small_blocks_grad_x_dpbf16_: built without AVX512-BF16");
}

void small_blocks_grad_w2_dpbf16_(torch::Tensor, torch::Tensor, torch::Tensor,
                                  c10::optional<torch::Tensor>) {
  TORCH_CHECK(false, "small_blocks_grad_w2_dpbf16_: built without AVX512-BF16");
}

#endif
