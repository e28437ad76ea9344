// The small-block multiply of small_blocks.cpp for bf16, with bf16 dot products:
// forward, and backward in one pass (grad x and all the parameters' gradients).
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
//                  tile's middle, rounded to bf16, is packed as hp[t, u/2, v, 2],
//                  w2 as w2p[e, u/2, v, 2]; vectors along v as in small_blocks.cpp.
//
// The middle is rounded to bf16 between the factors, as the chunked path's bf16
// GEMMs round it, and like them (oneDNN uses the same instruction) subnormal
// inputs and products count as zero; `mid` (or null) receives h in bf16 for
// backward. The forward needs p even and q, l multiples of 16; the backward p too.

#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include "cache_lines.h"
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

// out[t, a*Q + c] for t < NT, rounded to bf16: the first factor over pairs of j, C
// vectors of c at a time (each broadcast of x feeds C products). Forced inline, as is
// second_factor_rows: called out of line, GCC kept the accumulators in a stack array,
// zeroed and copied on every call of 16 steps (forward 1.07-1.15x faster inlined,
// backward 1.02-1.03x, docs/speed.md item 25).
template <int NT, int C>
__attribute__((always_inline)) inline void first_factor_columns(
    const uint16_t* xa, int64_t ldx, const uint16_t* wa, int64_t pairs, int64_t Q, int64_t c0,
    uint16_t* out, int64_t ldo) {
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
    for (int i = 0; i < C; ++i)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + t * ldo + c0 + i * kLanes),
                          round16(acc[t][i]));
}

// Rounded to bf16 as it leaves the registers: the middle (or grad x) is bf16 next, as
// the chunked path's bf16 GEMMs round it; a float32 tile rounded in a pass of its own
// made the sqrt(n) forward 1.1x slower (docs/speed.md item 25).
template <int NT>
void first_factor(const uint16_t* x, int64_t ldx, const uint16_t* w1p, int64_t K, int64_t P,
                  int64_t Q, uint16_t* out, int64_t ldo) {
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

// gp[t, e/2, v, 2] = g[t, e*L + v] for NT bf16 rows of g (rows ldg apart); an odd last
// e pairs with zero. For the second factor, whose sums run over u (forward) or e
// (grad h) in steps of L.
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
__attribute__((always_inline)) inline void second_factor_rows(
    const uint16_t* hp, int64_t ldp, const uint16_t* w2p, int64_t pairs, int64_t L, int64_t e,
    int64_t v0, const float* bias, uint16_t* y, int64_t ldy) {
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
  // v0 inside e, so that each output row's run e*L.. is written whole before the next
  // (v0 outside: a 64-byte line of y half written, the other half a pass later;
  // 1.06-1.25x faster at 8192 tokens, docs/speed.md item 25)
  int64_t e = 0;
  for (; e + 2 <= E; e += 2)
    for (int64_t v0 = 0; v0 < L; v0 += kLanes)
      second_factor_rows<NT, 2>(hp, ldp, w2p, pairs, L, e, v0, bias, y, ldy);
  if (e < E)
    for (int64_t v0 = 0; v0 < L; v0 += kLanes)
      second_factor_rows<NT, 1>(hp, ldp, w2p, pairs, L, e, v0, bias, y, ldy);
}

// (the middle h goes to mid, rows ldm apart: the caller's rows kept for backward, or
// scratch)
template <int NT>
void tile(const uint16_t* x, int64_t ldx, const uint16_t* w1p, const uint16_t* w2p,
          const float* bias, int64_t K, int64_t P, int64_t Q, int64_t E, int64_t U, int64_t L,
          uint16_t* mid, int64_t ldm, uint16_t* hp, int64_t ldp, uint16_t* y, int64_t ldy) {
  first_factor<NT>(x, ldx, w1p, K, P, Q, mid, ldm);
  pack_rows_bf16<NT>(mid, ldm, U, L, hp, ldp);
  second_factor<NT>(hp, ldp, w2p, E, (U + 1) / 2, L, bias, y, ldy);
}

// Backward, the two stages in the other order for NT tokens: grad h from grad y by
// the strided stage (pairs of e), stored in bf16 (kept for w1's gradient, and the
// next stage's input, as the chunked path's bf16 GEMMs round it); grad x from it by
// the block stage (pairs of c), rounded to bf16 (gx null: grad h only).
template <int NT>
void grad_tile(const uint16_t* g, int64_t ldg, const uint16_t* w2g, const uint16_t* w1g,
               int64_t K, int64_t Q, int64_t P, int64_t S, int64_t R, int64_t L, uint16_t* gp,
               int64_t ldp, uint16_t* gh, int64_t ldh, uint16_t* gx, int64_t ldx) {
  pack_rows_bf16<NT>(g, ldg, S, L, gp, ldp);
  second_factor<NT>(gp, ldp, w2g, R, (S + 1) / 2, L, nullptr, gh, ldh);
  if (gx != nullptr) first_factor<NT>(gh, ldh, w1g, K, Q, P, gx, ldx);
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

// w1's gradient, gw1[a, c, j] = sum_t gh[t, a*Q + c] x[t, a*P + j], from the same
// pairs of tokens: vectors along j (x's pairs), gh's pair for one c broadcast.
// acc[c, j0..j0+16*JV) += ... for CB values of c (rows P apart).
template <int CB, int JV>
inline void sum_w1_pairs(const uint16_t* ghp, int64_t ldp_gh, const uint16_t* xp, int64_t ldp_x,
                         int64_t pairs, float* acc, int64_t P) {
  __m512 sums[CB][JV];
  for (int i = 0; i < CB; ++i)
    for (int j = 0; j < JV; ++j) sums[i][j] = _mm512_loadu_ps(acc + i * P + j * kLanes);
  for (int64_t tp = 0; tp < pairs; ++tp) {
    __m512bh xv[JV];
    for (int j = 0; j < JV; ++j)
      xv[j] = as_bh(_mm512_loadu_si512(xp + tp * ldp_x + 2 * j * kLanes));
#pragma GCC unroll 16
    for (int i = 0; i < CB; ++i) {
      int32_t pair;
      std::memcpy(&pair, ghp + tp * ldp_gh + 2 * i, sizeof pair);
      const __m512bh gs = as_bh(_mm512_set1_epi32(pair));
      for (int j = 0; j < JV; ++j) sums[i][j] = _mm512_dpbf16_ps(sums[i][j], gs, xv[j]);
    }
  }
  for (int i = 0; i < CB; ++i)
    for (int j = 0; j < JV; ++j) _mm512_storeu_ps(acc + i * P + j * kLanes, sums[i][j]);
}

// gw2p[e, u, v] += sum over the packed pairs (gp: g's, hp: h's) for every e, u, v.
void sum_w2(const uint16_t* gp, int64_t ldp_g, const uint16_t* hp, int64_t ldp_h, int64_t pairs,
            int64_t S, int64_t R, int64_t L, float* acc) {
  for (int64_t v0 = 0; v0 < L; v0 += kLanes) {
    int64_t e = 0;
    for (; e + 4 <= S; e += 4) {
      int64_t u = 0;
      for (; u + 4 <= R; u += 4)
        sum_w2_pairs<4, 4>(gp + 2 * (e * L + v0), hp + 2 * (u * L + v0), ldp_g, ldp_h, pairs, L,
                           acc + (e * R + u) * L + v0, R);
      for (; u < R; ++u)
        sum_w2_pairs<4, 1>(gp + 2 * (e * L + v0), hp + 2 * (u * L + v0), ldp_g, ldp_h, pairs, L,
                           acc + (e * R + u) * L + v0, R);
    }
    for (; e < S; ++e)
      for (int64_t u = 0; u < R; ++u)
        sum_w2_pairs<1, 1>(gp + 2 * (e * L + v0), hp + 2 * (u * L + v0), ldp_g, ldp_h, pairs, L,
                           acc + (e * R + u) * L + v0, R);
  }
}

// gw1[a, c, j] += sum over the packed pairs (ghp: grad h's, xp: x's) for every a, c, j;
// Q and P multiples of 16.
void sum_w1(const uint16_t* ghp, int64_t ldp_gh, const uint16_t* xp, int64_t ldp_x,
            int64_t pairs, int64_t K, int64_t Q, int64_t P, float* acc) {
  for (int64_t a = 0; a < K; ++a) {
    int64_t j0 = 0;
    for (; j0 + 2 * kLanes <= P; j0 += 2 * kLanes)
      for (int64_t c = 0; c < Q; c += 8)
        sum_w1_pairs<8, 2>(ghp + 2 * (a * Q + c), ldp_gh, xp + 2 * (a * P + j0), ldp_x, pairs,
                           acc + (a * Q + c) * P + j0, P);
    if (j0 < P)
      for (int64_t c = 0; c < Q; c += 16)
        sum_w1_pairs<16, 1>(ghp + 2 * (a * Q + c), ldp_gh, xp + 2 * (a * P + j0), ldp_x, pairs,
                            acc + (a * Q + c) * P + j0, P);
  }
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
    // the tile's middle is written there and read back before y is written
    at::assert_no_overlap(*mid, x);
    at::assert_no_overlap(*mid, y);
  }
  if (n == 0) return;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const auto* w1 = reinterpret_cast<const uint16_t*>(w1p.data_ptr());
  const auto* w2 = reinterpret_cast<const uint16_t*>(w2p.data_ptr());
  const int64_t ldx = x.stride(0), ldy = y.stride(0);
  const int64_t ldm = (K * Q + 31) / 32 * 32 + 2 * kLanes;  // 64-byte rows, off 4 KiB
  const int64_t ldp = pairs * L * 2 + 2 * kLanes;
  over_tiles(
      n,
      [&] {  // the tile's middle (unless kept in mid), then packed in pairs of u
        return std::make_pair(aligned_vector<uint16_t>(mid_out != nullptr ? 0 : kTile * ldm),
                              aligned_vector<uint16_t>(kTile * ldp));
      },
      [&](auto nt, int64_t t0, auto& scratch) {
        uint16_t* h = mid_out != nullptr ? mid_out + t0 * K * Q : scratch.first.data();
        tile<decltype(nt)::value>(xp + t0 * ldx, ldx, w1, w2, b, K, P, Q, E, U, L, h,
                                  mid_out != nullptr ? K * Q : ldm, scratch.second.data(), ldp,
                                  yp + t0 * ldy, ldy);
      });
}

// The backward of small_blocks_forward_dpbf16_ in one pass over the tokens, for bf16
// g (N, s*l): gx (N, k*p) bf16, gw1 (k, q, p) and gw2p (s, r, l) float32 and colsum
// (s*l float32, added into: g's column sums, the bias gradient), each optional.
// x (N, k*p) is needed for gw1, h (N, k*q, the forward's middle) for gw2p; w2g
// (r, ceil(s/2), l, 2) and w1g (k, q/2, p, 2) are the factors packed in pairs along
// their sums (w2g[u, e/2, v, i] = w2[v, e + i, u], w1g[a, c/2, j, i] = w1[a, c + i, j]).
//
// Each task takes 64 tokens at a time: grad h by the strided stage, 8 tokens at a time
// into the task's own rows (grad x from it by the block stage), then both weight
// gradients from those 64 rows of g, h, grad h and x while they are in cache, packed
// in pairs of tokens. Run as three passes over memory (grad x and grad h, then each
// weight gradient from the stored grad h and the other rows) the sqrt(n) bf16 step
// read 176 MB and spent 16 of its 26 ms in the weight gradients (docs/speed.md items
// 18 and 25). Sums are per task, added in task order (partials.h): equal runs give
// equal bits; thread counts may differ in the last bits. Needs l, p and q multiples
// of 16.
void small_blocks_backward_dpbf16_(c10::optional<torch::Tensor> gx_opt,
                                   c10::optional<torch::Tensor> gw1_opt,
                                   c10::optional<torch::Tensor> gw2p_opt,
                                   c10::optional<torch::Tensor> colsum_opt, torch::Tensor g,
                                   c10::optional<torch::Tensor> x_opt,
                                   c10::optional<torch::Tensor> h_opt, torch::Tensor w2g,
                                   torch::Tensor w1g) {
  auto given = [](const c10::optional<torch::Tensor>& t) { return t.has_value() && t->defined(); };
  const bool want_x = given(gx_opt), want_w1 = given(gw1_opt), want_w2 = given(gw2p_opt),
             want_cols = given(colsum_opt);
  TORCH_CHECK(w2g.device().is_cpu() && w1g.device().is_cpu() && w2g.dim() == 4 &&
                  w1g.dim() == 4 && w2g.is_contiguous() && w1g.is_contiguous() &&
                  w2g.scalar_type() == at::kBFloat16 && w1g.scalar_type() == at::kBFloat16 &&
                  w2g.size(3) == 2 && w1g.size(3) == 2,
              "small_blocks_backward_dpbf16_: packed (r, s/2, l, 2) and (k, q/2, p, 2) bf16 CPU "
              "factors expected");
  TORCH_CHECK(g.dim() == 2, "small_blocks_backward_dpbf16_: g must be a matrix, got ", g.sizes());
  const int64_t R = w2g.size(0), L = w2g.size(2), K = w1g.size(0), Q = 2 * w1g.size(1),
                P = w1g.size(2), n = g.size(0);
  auto bf16_rows = [n](const torch::Tensor& t, int64_t cols) {
    return t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 2 &&
           t.stride(1) == 1 && t.size(0) == n && t.size(1) == cols;
  };
  TORCH_CHECK(L > 0 && L % kLanes == 0 && P % kLanes == 0 && Q % kLanes == 0 &&
                  K * Q == L * R && g.size(1) % L == 0 && (g.size(1) / L + 1) / 2 == w2g.size(1),
              "small_blocks_backward_dpbf16_: l, p and q must be multiples of 16, k*q == l*r "
              "and g (N, s*l) with w2g (r, ceil(s/2), l, 2); got g ", g.sizes(), ", w2g ",
              w2g.sizes(), ", w1g ", w1g.sizes());
  const int64_t S = g.size(1) / L;
  TORCH_CHECK(bf16_rows(g, S * L), "small_blocks_backward_dpbf16_: g must be a bf16 CPU matrix "
              "with contiguous rows");
  auto sums = [](const c10::optional<torch::Tensor>& t, std::initializer_list<int64_t> shape) {
    return t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
           t->sizes() == at::IntArrayRef(shape);
  };
  TORCH_CHECK(!want_x || bf16_rows(*gx_opt, K * P),
              "small_blocks_backward_dpbf16_: gx must be a bf16 CPU (N, k*p) = (", n, ", ", K * P,
              ") matrix with contiguous rows, got ", want_x ? gx_opt->sizes() : at::IntArrayRef{},
              want_x ? " " : "", want_x ? c10::toString(gx_opt->scalar_type()) : "");
  TORCH_CHECK(!want_w1 || sums(gw1_opt, {K, Q, P}),
              "small_blocks_backward_dpbf16_: gw1 must be a contiguous float32 CPU (k, q, p)");
  TORCH_CHECK(!want_w2 || sums(gw2p_opt, {S, R, L}),
              "small_blocks_backward_dpbf16_: gw2p must be a contiguous float32 CPU (s, r, l)");
  TORCH_CHECK(!want_cols || sums(colsum_opt, {S * L}),
              "small_blocks_backward_dpbf16_: colsum must be a contiguous float32 CPU tensor of ",
              S * L);
  TORCH_CHECK(!want_w1 || (given(x_opt) && bf16_rows(*x_opt, K * P)),
              "small_blocks_backward_dpbf16_: w1's gradient needs x (N, k*p), bf16 rows");
  TORCH_CHECK(!want_w2 || (given(h_opt) && bf16_rows(*h_opt, K * Q)),
              "small_blocks_backward_dpbf16_: w2's gradient needs h (N, k*q), bf16 rows");
  if (want_x) {  // gx is written while g, x and h are still to be read
    at::assert_no_internal_overlap(*gx_opt);
    at::assert_no_overlap(*gx_opt, g);
    if (want_w1) at::assert_no_overlap(*gx_opt, *x_opt);
    if (want_w2) at::assert_no_overlap(*gx_opt, *h_opt);
  }
  if (want_w1) gw1_opt->zero_();
  if (want_w2) gw2p_opt->zero_();
  if (n == 0) return;
  auto ptr = [](const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
  const uint16_t *G = ptr(g), *w2 = ptr(w2g), *w1 = ptr(w1g);
  const uint16_t* X = want_w1 ? ptr(*x_opt) : nullptr;
  const uint16_t* H = want_w2 ? ptr(*h_opt) : nullptr;
  uint16_t* GX = want_x ? ptr(*gx_opt) : nullptr;
  const int64_t ldg = g.stride(0), ldx_in = want_w1 ? x_opt->stride(0) : 0,
                ldh_in = want_w2 ? h_opt->stride(0) : 0, ldgx = want_x ? gx_opt->stride(0) : 0;
  const bool grad_h = want_x || want_w1;  // the strided stage
  const int64_t ldp = (S + 1) / 2 * L * 2 + 2 * kLanes;  // rows off the 4 KiB set stride
  const int64_t ldgh = (K * Q + 31) / 32 * 32 + 2 * kLanes;  // 64-byte rows, off 4 KiB
  // pairs of tokens: rows of a packed tile, the widest of g, h, grad h and x (+ 64 bytes)
  const int64_t ldpair = 2 * std::max(S * L, std::max(K * Q, K * P)) + 2 * kLanes;
  constexpr int64_t kTokens = 2 * kPairTile;
  const int64_t tiles = (n + kTokens - 1) / kTokens;
  OrderedPartials<float> w1_sums, w2_sums, columns;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc1(want_w1 ? K * Q * P : 0, 0.f), acc2(want_w2 ? S * R * L : 0, 0.f),
        col(want_cols ? S * L : 0, 0.f);
    aligned_vector<uint16_t> ge(grad_h ? kTile * ldp : 0), gh(grad_h ? kTokens * ldgh : 0);
    aligned_vector<uint16_t> first(kPairTile * ldpair), second(kPairTile * ldpair);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * kTokens, nt = std::min(kTokens, n - t0), pairs = (nt + 1) / 2;
      if (grad_h) {
        for (int64_t i = 0; i < nt; i += kTile) {
          const int64_t ti = t0 + i;
          if (ti + kTokens + kTile <= n) {  // the next tile's rows into L2, 8 at a time
            prefetch_rows(G + (ti + kTokens) * ldg, ldg, kTile, S * L);
            if (want_w1) prefetch_rows(X + (ti + kTokens) * ldx_in, ldx_in, kTile, K * P);
            if (want_w2) prefetch_rows(H + (ti + kTokens) * ldh_in, ldh_in, kTile, K * Q);
          }
          if (i + kTile <= nt) {
            grad_tile<kTile>(G + ti * ldg, ldg, w2, w1, K, Q, P, S, R, L, ge.data(), ldp,
                             gh.data() + i * ldgh, ldgh,
                             want_x ? GX + ti * ldgx : nullptr, ldgx);
          } else {
            for (int64_t t = i; t < nt; ++t)  // the ragged last tokens, one at a time
              grad_tile<1>(G + (t0 + t) * ldg, ldg, w2, w1, K, Q, P, S, R, L, ge.data(), ldp,
                           gh.data() + t * ldgh, ldgh,
                           want_x ? GX + (t0 + t) * ldgx : nullptr, ldgx);
          }
        }
      }
      if (want_w2 || want_cols) {
        bf16_pairs::pack_token_pairs(G + t0 * ldg, ldg, S * L, nt, first.data(), ldpair,
                                     want_cols ? col.data() : nullptr);
        if (want_w2) {
          bf16_pairs::pack_token_pairs(H + t0 * ldh_in, ldh_in, K * Q, nt, second.data(), ldpair);
          sum_w2(first.data(), ldpair, second.data(), ldpair, pairs, S, R, L, acc2.data());
        }
      }
      if (want_w1) {
        bf16_pairs::pack_token_pairs(gh.data(), ldgh, K * Q, nt, first.data(), ldpair);
        bf16_pairs::pack_token_pairs(X + t0 * ldx_in, ldx_in, K * P, nt, second.data(), ldpair);
        sum_w1(first.data(), ldpair, second.data(), ldpair, pairs, K, Q, P, acc1.data());
      }
    }
    if (want_w1) w1_sums.add(begin, std::move(acc1));
    if (want_w2) w2_sums.add(begin, std::move(acc2));
    if (want_cols) columns.add(begin, std::move(col));
  });
  if (want_w1) w1_sums.sum_into(gw1_opt->data_ptr<float>());
  if (want_w2) w2_sums.sum_into(gw2p_opt->data_ptr<float>());
  if (want_cols) columns.sum_into(colsum_opt->data_ptr<float>());
}

#else  // no AVX512-BF16: callers check bf16_dot() (module.cpp) first

void small_blocks_forward_dpbf16_(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                                  c10::optional<torch::Tensor>, c10::optional<torch::Tensor>) {
  TORCH_CHECK(false, "small_blocks_forward_dpbf16_: built without AVX512-BF16");
}

void small_blocks_backward_dpbf16_(c10::optional<torch::Tensor>, c10::optional<torch::Tensor>,
                                   c10::optional<torch::Tensor>, c10::optional<torch::Tensor>,
                                   torch::Tensor, c10::optional<torch::Tensor>,
                                   c10::optional<torch::Tensor>, torch::Tensor, torch::Tensor) {
  TORCH_CHECK(false, "small_blocks_backward_dpbf16_: built without AVX512-BF16");
}

#endif
