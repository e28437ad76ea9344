// A Monarch multiply for small blocks (16-64 wide), in one pass over the tokens.
//
// With blocks of 32 (the sqrt(n) Monarch of a 1024-wide layer) each of the two
// batched GEMMs has inner and outer dims of 32: MKL/oneDNN run those at a tenth
// of their large-GEMM speed, and the two stride permutations cost as much again.
// Here both factors are register-blocked loops over a tile of 8 tokens (6 with
// AVX2), vectors one register wide, with the middle activation of the tile in L1:
//
//   first factor, vectors along a block's outputs c:
//     h[t, a*q + c]   = sum_j x[t, a*p + j] * w1t[a, j, c]
//   second factor, vectors along the l blocks v (h's stride permutation makes
//   the l inputs h[t, u*l + v] of one u contiguous, and so are the l outputs
//   y[t, e*l + v] of one e):
//     y[t, e*l + v]   = sum_u h[t, u*l + v] * w2p[e, u, v]   (+ bias)
//
// so neither permutation is a pass of its own. Both need q and l to be multiples
// of 16. Computes in float32 for float32 and bf16 inputs (bf16 read and rounded
// once on output, as a GEMM does; the middle activation stays float32).
//
// Backward is the same two stages in the other order (grad h from grad y by the
// strided stage with w2's blocks transposed, grad x from grad h by the block
// stage with w1 as it is: that one needs p to be a multiple of 16 too), and one
// pass over the tokens that sums both weight gradients, register-blocked over
// a tile of 32 tokens in L2, each thread into its own float32 partial sums
// (added in task order afterwards: partials.h).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "cache_lines.h"
#include "partials.h"
#include "vec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using namespace vec;
// The layout contract: q and l (and p for grad x) are multiples of this, on every
// machine, so the Python side's LANES never depends on the build.
constexpr int64_t kMultiple = 16;
static_assert(kMultiple % kLanes == 0, "vectors must divide the layout multiple");
// Register tiles: tokens per block x kCols vectors of accumulators, 8 x 2 of
// AVX-512's 32 registers, 6 x 2 of AVX2's 16 (with the two weight vectors and a
// broadcast, 15).
constexpr int kTile = kRegisters >= 32 ? 8 : 6;
constexpr int kCols = 2;

// Rows of a tile buffer are this many floats longer than their data: rows 4 KiB
// apart (1024 floats) would all map onto the same L1 sets.
constexpr int64_t kPad = 16;  // a cache line

inline int64_t padded(int64_t width) { return width + kPad; }

// A tile's rows as float32: the rows themselves for float32, else converted into
// `buf`, rows padded(width) apart.
template <typename T>
const float* as_float(const T* src, int64_t ld, int64_t rows, int64_t width, float* buf,
                      int64_t* ld_out) {
  if constexpr (std::is_same<T, float>::value) {
    *ld_out = ld;
    return src;
  }
  const int64_t ldb = padded(width);
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t i = 0; i < width; ++i) buf[t * ldb + i] = to_float(src[t * ld + i]);
  *ld_out = ldb;
  return buf;
}

// Stores rows of float32 in T (rounded for bf16).
template <typename T>
void store_rows(const float* src, int64_t lds, int64_t rows, int64_t width, T* dst, int64_t ld) {
  for (int64_t t = 0; t < rows; ++t) {
    if constexpr (std::is_same<T, float>::value) {
      std::memcpy(dst + t * ld, src + t * lds, width * sizeof(float));
    } else {
      for (int64_t i = 0; i < width; i += kLanes) store(dst + t * ld + i, load(src + t * lds + i));
    }
  }
}

// Both stages below take NT rows of float32 `in` to NT rows of `out` (float32 or
// bf16) through emit<NT>(in, ldi, out, ldo, tmp); `tmp` is NT * out_width() floats
// of scratch (needed only for bf16 output of the block stage).

// out[t, a*Q + c] = sum_j in[t, a*P + j] * W[a, j, c] for a < K: vectors along c
// (Q % 16 == 0), the input broadcast. Forward's first factor (W = w1 as (k, p, q));
// backward's grad x (W = w1 as it is, (k, q, p)).
struct BlockStage {
  const float* W;
  int64_t K, P, Q;

  int64_t in_width() const { return K * P; }
  int64_t out_width() const { return K * Q; }

  template <int NT, typename TO>
  void emit(const float* in, int64_t ldi, TO* out, int64_t ldo, float* tmp) const {
    if constexpr (std::is_same<TO, float>::value) {
      run<NT>(in, ldi, out, ldo);
    } else {  // into float32, then rounded
      run<NT>(in, ldi, tmp, out_width());
      store_rows(tmp, out_width(), NT, out_width(), out, ldo);
    }
  }

  template <int NT>
  void run(const float* in, int64_t ldi, float* out, int64_t ldo) const {
    for (int64_t a = 0; a < K; ++a) {
      const float* w = W + a * P * Q;
      const float* ia = in + a * P;
      float* oa = out + a * Q;
      int64_t c0 = 0;
      for (; c0 + kCols * kLanes <= Q; c0 += kCols * kLanes) {
        vf acc[NT][kCols] = {};
        for (int64_t j = 0; j < P; ++j) {
          vf b[kCols];
          for (int i = 0; i < kCols; ++i) b[i] = load(w + j * Q + c0 + i * kLanes);
#pragma GCC unroll 8
          for (int t = 0; t < NT; ++t) {
            const vf xs = splat(ia[t * ldi + j]);
            for (int i = 0; i < kCols; ++i) acc[t][i] += xs * b[i];
          }
        }
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t)
          for (int i = 0; i < kCols; ++i) store(oa + t * ldo + c0 + i * kLanes, acc[t][i]);
      }
      for (; c0 < Q; c0 += kLanes) {  // a last vector
        vf acc[NT] = {};
        for (int64_t j = 0; j < P; ++j) {
          const vf b0 = load(w + j * Q + c0);
#pragma GCC unroll 8
          for (int t = 0; t < NT; ++t) acc[t] += splat(ia[t * ldi + j]) * b0;
        }
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) store(oa + t * ldo + c0, acc[t]);
      }
    }
  }
};

// out[t, e*L + v] = sum_u in[t, u*L + v] * W[e, u, v] (+ bias[e*L + v]) for e < E,
// u < U: vectors along v (L % 16 == 0), kCols outputs e at once. Forward's second
// factor (W[e, u, v] = w2[v, e, u]); backward's grad h (W[u, e, v] = w2[v, e, u]).
// (With AVX2, blocks of 2 tokens x 4 outputs, which load fewer vectors per FMA,
// ran no faster on Zen 1.)
struct StridedStage {
  const float* W;
  const float* bias;  // or null
  int64_t E, U, L;

  int64_t in_width() const { return U * L; }
  int64_t out_width() const { return E * L; }

  template <int NT, typename TO>
  void emit(const float* in, int64_t ldi, TO* out, int64_t ldo, float* /*tmp*/) const {
    for (int64_t v0 = 0; v0 < L; v0 += kLanes) {
      for (int64_t e = 0; e < E; e += kCols) {
        const int ne = static_cast<int>(std::min<int64_t>(kCols, E - e));
        const float* w[kCols];  // a missing last e reads the one before and is not stored
        for (int i = 0; i < kCols; ++i) w[i] = W + (e + std::min(i, ne - 1)) * U * L + v0;
        vf acc[NT][kCols] = {};
        for (int64_t u = 0; u < U; ++u) {
          vf b[kCols];
          for (int i = 0; i < kCols; ++i) b[i] = load(w[i] + u * L);
#pragma GCC unroll 8
          for (int t = 0; t < NT; ++t) {
            const vf hv = load(in + t * ldi + u * L + v0);
            for (int i = 0; i < kCols; ++i) acc[t][i] += hv * b[i];
          }
        }
        for (int i = 0; i < ne; ++i) {
          const vf bi = bias ? load(bias + (e + i) * L + v0) : vf{};
#pragma GCC unroll 8
          for (int t = 0; t < NT; ++t) store(out + t * ldo + (e + i) * L + v0, acc[t][i] + bi);
        }
      }
    }
  }
};

// A tile of kTile tokens at a time through two stages, the middle activation of the
// tile in L1; `mid_out` (or null) keeps it, in T, rows out_width() of s1 long.
// Forward: block stage, then strided stage. grad x: strided stage (grad y ->
// grad h, kept), then block stage.
template <typename T, typename First, typename Second>
void two_stages(T* out, int64_t ldo, const T* in, int64_t ldi, int64_t n, const First& s1,
                const Second& s2, T* mid_out) {
  const int64_t width = s1.in_width(), middle = s1.out_width();
  const bool is_float = std::is_same<T, float>::value;
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    const int64_t ldm = padded(middle);
    aligned_vector<float> mid(kTile * ldm);
    aligned_vector<float> in_f(is_float ? 0 : kTile * padded(width));
    aligned_vector<float> tmp(is_float ? 0 : kTile * s2.out_width());
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * kTile;
      const int64_t nt = std::min<int64_t>(kTile, n - t0);
      int64_t ld;
      const float* it = as_float(in + t0 * ldi, ldi, nt, width, in_f.data(), &ld);
      T* ot = out + t0 * ldo;
      if (nt == kTile) {
        s1.template emit<kTile>(it, ld, mid.data(), ldm, nullptr);
        s2.template emit<kTile>(mid.data(), ldm, ot, ldo, tmp.data());
      } else {
        for (int64_t t = 0; t < nt; ++t) {  // the ragged last tile, a token at a time
          s1.template emit<1>(it + t * ld, ld, mid.data() + t * ldm, ldm, nullptr);
          s2.template emit<1>(mid.data() + t * ldm, ldm, ot + t * ldo, ldo, tmp.data());
        }
      }
      if (mid_out != nullptr) store_rows(mid.data(), ldm, nt, middle, mid_out + t0 * middle, middle);
    }
  });
}

constexpr int kSumTile = 32;  // tokens whose rows the weight-gradient pass keeps in L2

// Register blocks of the weight gradients (see kTile): rows j of w1's gradient at
// once (each kCols vectors: 16 or 12 accumulators), and e x u of w2's (16 or 8,
// with the e + u vectors they multiply).
constexpr int kRowsW1 = kRegisters >= 32 ? 8 : 6;
constexpr int kEW2 = kRegisters >= 32 ? 4 : 2, kUW2 = 4;

// acc[a, j, c0..c0+kLanes*NV) += sum_t x[t, a*p + j] * gh[t, a*q + c0..]: JB rows of j at once.
template <int JB, int NV>
inline void sum_w1_block(const float* x, int64_t ldx, const float* gh, int64_t ldgh, int64_t nt,
                         float* acc, int64_t q) {
  vf a[JB][NV];
  for (int i = 0; i < JB; ++i)
    for (int c = 0; c < NV; ++c) a[i][c] = load(acc + i * q + c * kLanes);
  for (int64_t t = 0; t < nt; ++t) {
    vf g[NV];
    for (int c = 0; c < NV; ++c) g[c] = load(gh + t * ldgh + c * kLanes);
#pragma GCC unroll 8
    for (int i = 0; i < JB; ++i) {
      const vf xs = splat(x[t * ldx + i]);
      for (int c = 0; c < NV; ++c) a[i][c] += xs * g[c];
    }
  }
  for (int i = 0; i < JB; ++i)
    for (int c = 0; c < NV; ++c) store(acc + i * q + c * kLanes, a[i][c]);
}

// sum_w1_block over the rows j < p, kRowsW1 at a time.
template <int NV>
inline void sum_w1_rows(const float* x, int64_t ldx, const float* gh, int64_t ldgh, int64_t nt,
                        float* acc, int64_t q, int64_t p) {
  int64_t j = 0;
  for (; j + kRowsW1 <= p; j += kRowsW1)
    sum_w1_block<kRowsW1, NV>(x + j, ldx, gh, ldgh, nt, acc + j * q, q);
  for (; j < p; ++j) sum_w1_block<1, NV>(x + j, ldx, gh, ldgh, nt, acc + j * q, q);
}

// acc[e, u, v0..v0+kLanes) += sum_t g[t, e*l + v0..] * h[t, u*l + v0..]: EB x UB at once.
template <int EB, int UB>
inline void sum_w2_block(const float* g, int64_t ldg, const float* h, int64_t ldh, int64_t nt,
                         float* acc, int64_t r, int64_t l) {
  vf a[EB][UB];
  for (int i = 0; i < EB; ++i)
    for (int j = 0; j < UB; ++j) a[i][j] = load(acc + (i * r + j) * l);
  for (int64_t t = 0; t < nt; ++t) {
    vf gv[EB], hv[UB];
    for (int i = 0; i < EB; ++i) gv[i] = load(g + t * ldg + i * l);
    for (int j = 0; j < UB; ++j) hv[j] = load(h + t * ldh + j * l);
#pragma GCC unroll 16
    for (int i = 0; i < EB; ++i)
      for (int j = 0; j < UB; ++j) a[i][j] += gv[i] * hv[j];
  }
  for (int i = 0; i < EB; ++i)
    for (int j = 0; j < UB; ++j) store(acc + (i * r + j) * l, a[i][j]);
}

struct Dims {
  int64_t k, q, p, l, s, r;
};

// gw1t[a, j, c] += sum_t x[t, a*p + j] gh[t, a*q + c];  gw2p[e, u, v] += sum_t g[t, e*l + v] h[t, u*l + v];
// colsum[i] += sum_t g[t, i] (the bias gradient, in float64, while g's tile is in cache:
// a separate float64 sum of grad y cost 15% of a float32 sqrt(n) training step)
template <typename T>
void grad_w_impl(float* gw1t, float* gw2p, double* colsum, const T* x, const T* gh, const T* g,
                 const T* h, int64_t n, const Dims& d) {
  const int64_t in_w = d.k * d.p, mid_w = d.k * d.q, out_w = d.s * d.l;
  const int64_t n1 = gw1t ? d.k * d.p * d.q : 0, n2 = gw2p ? d.s * d.r * d.l : 0;
  const int64_t n3 = colsum ? out_w : 0;
  const int64_t tiles = (n + kSumTile - 1) / kSumTile;
  OrderedPartials<float> partials1, partials2;  // added in task order: equal runs, equal bits
  OrderedPartials<double> partials3;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a1(n1, 0.f), a2(n2, 0.f);
    std::vector<double> a3(n3, 0.0);
    // bf16 tiles converted into buffers with padded rows (see kPad); float32 read in
    // place (copying it to padded rows cost more than it saved: 0.88x)
    std::vector<float> xf(gw1t ? kSumTile * padded(in_w) : 0);
    std::vector<float> ghf(gw1t ? kSumTile * padded(mid_w) : 0);
    std::vector<float> gf(gw2p || colsum ? kSumTile * padded(out_w) : 0);
    std::vector<float> hf(gw2p ? kSumTile * padded(mid_w) : 0);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * kSumTile, nt = std::min<int64_t>(kSumTile, n - t0);
      const bool ahead = t0 + 2 * kSumTile <= n;  // a full tile follows: fetch its rows
      if (gw1t) {
        int64_t ldx, ldgh;
        const float* xt = as_float(x + t0 * in_w, in_w, nt, in_w, xf.data(), &ldx);
        const float* ght = as_float(gh + t0 * mid_w, mid_w, nt, mid_w, ghf.data(), &ldgh);
        for (int64_t a = 0; a < d.k; ++a) {
          if (ahead) {  // block a's columns of the next tile
            prefetch_rows(x + (t0 + kSumTile) * in_w + a * d.p, in_w, kSumTile, d.p);
            prefetch_rows(gh + (t0 + kSumTile) * mid_w + a * d.q, mid_w, kSumTile, d.q);
          }
          for (int64_t c0 = 0; c0 < d.q; c0 += kCols * kLanes) {
            const float* xa = xt + a * d.p;
            const float* ga = ght + a * d.q + c0;
            float* acc = a1.data() + a * d.p * d.q + c0;
            if (c0 + kCols * kLanes <= d.q)
              sum_w1_rows<kCols>(xa, ldx, ga, ldgh, nt, acc, d.q, d.p);
            else  // a last vector
              sum_w1_rows<1>(xa, ldx, ga, ldgh, nt, acc, d.q, d.p);
          }
        }
      }
      if (colsum || gw2p) {
        int64_t ldg, ldh;
        const float* gt = as_float(g + t0 * out_w, out_w, nt, out_w, gf.data(), &ldg);
        for (int64_t t = 0; colsum && t < nt; ++t)
          for (int64_t i = 0; i < out_w; ++i) a3[i] += gt[t * ldg + i];
        if (!gw2p) continue;
        const float* ht = as_float(h + t0 * mid_w, mid_w, nt, mid_w, hf.data(), &ldh);
        if (ahead) {
          prefetch_rows(g + (t0 + kSumTile) * out_w, out_w, kSumTile, out_w);
          prefetch_rows(h + (t0 + kSumTile) * mid_w, mid_w, kSumTile, mid_w);
        }
        for (int64_t v0 = 0; v0 < d.l; v0 += kLanes) {
          int64_t e = 0;
          for (; e + kEW2 <= d.s; e += kEW2) {
            int64_t u = 0;
            for (; u + kUW2 <= d.r; u += kUW2)
              sum_w2_block<kEW2, kUW2>(gt + e * d.l + v0, ldg, ht + u * d.l + v0, ldh, nt,
                                       a2.data() + (e * d.r + u) * d.l + v0, d.r, d.l);
            for (; u < d.r; ++u)
              sum_w2_block<kEW2, 1>(gt + e * d.l + v0, ldg, ht + u * d.l + v0, ldh, nt,
                                       a2.data() + (e * d.r + u) * d.l + v0, d.r, d.l);
          }
          for (; e < d.s; ++e)
            for (int64_t u = 0; u < d.r; ++u)
              sum_w2_block<1, 1>(gt + e * d.l + v0, ldg, ht + u * d.l + v0, ldh, nt,
                                 a2.data() + (e * d.r + u) * d.l + v0, d.r, d.l);
        }
      }
    }
    if (gw1t) partials1.add(begin, std::move(a1));
    if (gw2p) partials2.add(begin, std::move(a2));
    if (colsum) partials3.add(begin, std::move(a3));
  });
  if (gw1t) partials1.sum_into(gw1t);
  if (gw2p) partials2.sum_into(gw2p);
  if (colsum) partials3.sum_into(colsum);
}

void check_activation(const torch::Tensor& t, int64_t rows, int64_t cols, at::ScalarType type,
                      const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous() && t.size(0) == rows &&
                  t.size(1) == cols && t.scalar_type() == type,
              "small blocks: ", what, " must be a contiguous CPU ", type, " tensor of (", rows,
              ", ", cols, "), got ", t.scalar_type(), " ", t.sizes());
}

void check_weights(const torch::Tensor& w1, const torch::Tensor& w2) {
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3 && w1.is_contiguous() && w2.is_contiguous() &&
                  w1.scalar_type() == at::kFloat && w2.scalar_type() == at::kFloat &&
                  w1.device().is_cpu() && w2.device().is_cpu(),
              "small blocks: the weights must be contiguous float32 CPU tensors");
}

}  // namespace

// y = x M^T (+ bias), with w1t (k, p, q) and w2p (s, r, l) float32 (see the top of
// this file); with mid (N, k*q) in x's dtype, also keeps the middle activation.
void small_blocks_forward_(torch::Tensor y, torch::Tensor x, torch::Tensor w1t,
                           torch::Tensor w2p, c10::optional<torch::Tensor> bias,
                           c10::optional<torch::Tensor> mid) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "small_blocks_forward_: CPU only");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.stride(1) == 1 && y.stride(1) == 1,
              "small_blocks_forward_: 2-D x and y with contiguous rows expected");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "small_blocks_forward_: x and y must both be float32 or both bfloat16");
  check_weights(w1t, w2p);
  const BlockStage s1{w1t.data_ptr<float>(), w1t.size(0), w1t.size(1), w1t.size(2)};
  const int64_t l = w2p.size(2), s = w2p.size(0), r = w2p.size(1);
  TORCH_CHECK(s1.Q % kMultiple == 0 && l % kMultiple == 0,
              "small_blocks_forward_: q and l must be multiples of 16, got q=", s1.Q, ", l=", l);
  TORCH_CHECK(s1.K * s1.Q == l * r, "small_blocks_forward_: middle widths differ");
  TORCH_CHECK(x.size(1) == s1.K * s1.P && y.size(1) == s * l && y.size(0) == x.size(0),
              "small_blocks_forward_: x ", x.sizes(), " and y ", y.sizes(),
              " do not fit the factors");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->is_contiguous() &&
                    bias->scalar_type() == at::kFloat && bias->numel() == s * l,
                "small_blocks_forward_: bias must be a contiguous float32 CPU tensor of ", s * l);
  }
  const bool has_mid = mid.has_value() && mid->defined();
  if (has_mid) check_activation(*mid, x.size(0), s1.K * s1.Q, x.scalar_type(), "mid");
  if (x.size(0) == 0) return;
  const StridedStage s2{w2p.data_ptr<float>(), has_bias ? bias->data_ptr<float>() : nullptr, s,
                        r, l};
  if (x.scalar_type() == at::kFloat) {
    two_stages<float>(y.data_ptr<float>(), y.stride(0), x.data_ptr<float>(), x.stride(0),
                      x.size(0), s1, s2, has_mid ? mid->data_ptr<float>() : nullptr);
  } else {
    auto ptr = [](const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
    two_stages<uint16_t>(ptr(y), y.stride(0), ptr(x), x.stride(0), x.size(0), s1, s2,
                         has_mid ? ptr(*mid) : nullptr);
  }
}

// Backward: grad_x (N, k*p) and grad_h (N, k*q) from grad_y (N, s*l), with w2q
// (r, s, l) = w2 as [u, e, v] and w1 (k, q, p), both float32.
void small_blocks_grad_x_(torch::Tensor gx, torch::Tensor gh, torch::Tensor g, torch::Tensor w2q,
                          torch::Tensor w1) {
  check_weights(w1, w2q);
  const int64_t k = w1.size(0), q = w1.size(1), p = w1.size(2);
  const int64_t r = w2q.size(0), s = w2q.size(1), l = w2q.size(2);
  TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kBFloat16,
              "small_blocks_grad_x_: float32 or bfloat16 only");
  TORCH_CHECK(p % kMultiple == 0 && l % kMultiple == 0 && k * q == l * r,
              "small_blocks_grad_x_: p and l must be multiples of 16 and k*q == l*r");
  const int64_t n = g.size(0);
  check_activation(g, n, s * l, g.scalar_type(), "grad_y");
  check_activation(gx, n, k * p, g.scalar_type(), "grad_x");
  check_activation(gh, n, k * q, g.scalar_type(), "grad_h");
  if (n == 0) return;
  const StridedStage s1{w2q.data_ptr<float>(), nullptr, r, s, l};
  const BlockStage s2{w1.data_ptr<float>(), k, q, p};
  if (g.scalar_type() == at::kFloat) {
    two_stages<float>(gx.data_ptr<float>(), k * p, g.data_ptr<float>(), s * l, n, s1, s2,
                      gh.data_ptr<float>());
  } else {
    auto ptr = [](const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
    two_stages<uint16_t>(ptr(gx), k * p, ptr(g), s * l, n, s1, s2, ptr(gh));
  }
}

// Adds the weight gradients summed over the tokens to gw1t (k, p, q) and gw2p
// (s, r, l), float32, and grad_y's column sums to colsum (s*l), float64 (each may
// be undefined: not wanted), from x (N, k*p), grad_h (N, k*q), grad_y (N, s*l) and
// the middle activation h (N, k*q).
void small_blocks_grad_w_(c10::optional<torch::Tensor> gw1t, c10::optional<torch::Tensor> gw2p,
                          torch::Tensor x, torch::Tensor gh, torch::Tensor g, torch::Tensor h,
                          int64_t k, int64_t l, c10::optional<torch::Tensor> colsum) {
  const auto type = x.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16,
              "small_blocks_grad_w_: float32 or bfloat16 only");
  const int64_t n = x.size(0);
  TORCH_CHECK(k > 0 && l > 0 && x.size(1) % k == 0 && gh.size(1) % k == 0 && g.size(1) % l == 0 &&
                  h.size(1) % l == 0 && gh.size(1) == h.size(1),
              "small_blocks_grad_w_: widths do not fit k=", k, ", l=", l);
  const Dims d{k, gh.size(1) / k, x.size(1) / k, l, g.size(1) / l, h.size(1) / l};
  TORCH_CHECK(d.q % kMultiple == 0 && d.l % kMultiple == 0,
              "small_blocks_grad_w_: q and l must be multiples of 16");
  const bool want1 = gw1t.has_value() && gw1t->defined();
  const bool want2 = gw2p.has_value() && gw2p->defined();
  check_activation(x, n, d.k * d.p, type, "x");
  check_activation(gh, n, d.k * d.q, type, "grad_h");
  check_activation(g, n, d.s * d.l, type, "grad_y");
  check_activation(h, n, d.k * d.q, type, "h");
  if (want1)
    TORCH_CHECK(gw1t->device().is_cpu() && gw1t->is_contiguous() &&
                    gw1t->scalar_type() == at::kFloat &&
                    gw1t->numel() == d.k * d.p * d.q,
                "small_blocks_grad_w_: gw1t must be a contiguous float32 CPU (k, p, q)");
  if (want2)
    TORCH_CHECK(gw2p->device().is_cpu() && gw2p->is_contiguous() &&
                    gw2p->scalar_type() == at::kFloat &&
                    gw2p->numel() == d.s * d.r * d.l,
                "small_blocks_grad_w_: gw2p must be a contiguous float32 CPU (s, r, l)");
  const bool want3 = colsum.has_value() && colsum->defined();
  if (want3)
    TORCH_CHECK(colsum->device().is_cpu() && colsum->is_contiguous() &&
                    colsum->scalar_type() == at::kDouble && colsum->numel() == d.s * d.l,
                "small_blocks_grad_w_: colsum must be a contiguous float64 CPU (s*l)");
  if (n == 0 || !(want1 || want2 || want3)) return;
  float* p1 = want1 ? gw1t->data_ptr<float>() : nullptr;
  float* p2 = want2 ? gw2p->data_ptr<float>() : nullptr;
  double* p3 = want3 ? colsum->data_ptr<double>() : nullptr;
  if (type == at::kFloat) {
    grad_w_impl<float>(p1, p2, p3, x.data_ptr<float>(), gh.data_ptr<float>(), g.data_ptr<float>(),
                       h.data_ptr<float>(), n, d);
  } else {
    auto ptr = [](const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); };
    grad_w_impl<uint16_t>(p1, p2, p3, ptr(x), ptr(gh), ptr(g), ptr(h), n, d);
  }
}
