// A Monarch multiply for small blocks (16-64 wide), in one pass over the tokens.
//
// With blocks of 32 (the sqrt(n) Monarch of a 1024-wide layer) each of the two
// batched GEMMs has inner and outer dims of 32: MKL/oneDNN run those at a tenth
// of their large-GEMM speed, and the two stride permutations cost as much again.
// Here both factors are register-blocked loops over a tile of 8 tokens, vectors
// of 16 floats wide, with the middle activation of the tile kept in L1:
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

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int kLanes = 16;     // floats per vector
constexpr int kTile = 8;       // tokens per register block
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef float vf_unaligned __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
inline vf splat(float x) { return vf{} + x; }

inline float to_float(float x) { return x; }
inline float to_float(uint16_t b) {  // bf16 bits
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline void store_out(float* d, vf v) { store(d, v); }
typedef uint32_t vu __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint16_t vh __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint16_t vh_unaligned __attribute__((vector_size(kLanes * sizeof(uint16_t)), aligned(2)));

inline void store_out(uint16_t* d, vf v) {  // round to nearest even, as c10::BFloat16
  vu u;
  std::memcpy(&u, &v, sizeof u);
  vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const vi nan = v != v;  // all ones where NaN
  rounded = (rounded & ~vu(nan)) | (vu(nan) & 0x7FC0u);
  *reinterpret_cast<vh_unaligned*>(d) = __builtin_convertvector(rounded, vh);
}

struct Shapes {
  int64_t k, q, p, l, s, r;
};

// h[t, a*q + c] for NT tokens: NT x (2 or 1) vectors of accumulators.
template <int NT, typename T>
void first_factor(const T* x, int64_t ldx, const float* w1t, const Shapes& d, float* h,
                  int64_t ldh) {
  for (int64_t a = 0; a < d.k; ++a) {
    const float* w = w1t + a * d.p * d.q;
    const T* xa = x + a * d.p;
    int64_t c0 = 0;
    for (; c0 + 2 * kLanes <= d.q; c0 += 2 * kLanes) {
      vf acc[NT][2] = {};
      for (int64_t j = 0; j < d.p; ++j) {
        const vf b0 = load(w + j * d.q + c0), b1 = load(w + j * d.q + c0 + kLanes);
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
          const vf xs = splat(to_float(xa[t * ldx + j]));
          acc[t][0] += xs * b0;
          acc[t][1] += xs * b1;
        }
      }
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        store(h + t * ldh + a * d.q + c0, acc[t][0]);
        store(h + t * ldh + a * d.q + c0 + kLanes, acc[t][1]);
      }
    }
    for (; c0 < d.q; c0 += kLanes) {
      vf acc[NT] = {};
      for (int64_t j = 0; j < d.p; ++j) {
        const vf b0 = load(w + j * d.q + c0);
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) acc[t] += splat(to_float(xa[t * ldx + j])) * b0;
      }
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) store(h + t * ldh + a * d.q + c0, acc[t]);
    }
  }
}

// y[t, e*l + v] for NT tokens, v in vectors of 16, e in pairs.
template <int NT, typename T>
void second_factor(const float* h, int64_t ldh, const float* w2p, const float* bias,
                   const Shapes& d, T* y, int64_t ldy) {
  const int64_t l = d.l, r = d.r;
  for (int64_t v0 = 0; v0 < l; v0 += kLanes) {
    int64_t e = 0;
    for (; e < d.s; e += 2) {
      const int eb = e + 1 < d.s ? 2 : 1;
      const float* w0 = w2p + e * r * l + v0;
      const float* w1 = w0 + (eb == 2 ? r * l : 0);
      vf acc[NT][2] = {};
      for (int64_t u = 0; u < r; ++u) {
        const vf b0 = load(w0 + u * l), b1 = load(w1 + u * l);
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
          const vf hv = load(h + t * ldh + u * l + v0);
          acc[t][0] += hv * b0;
          acc[t][1] += hv * b1;
        }
      }
      const vf bias0 = bias ? load(bias + e * l + v0) : vf{};
      const vf bias1 = bias && eb == 2 ? load(bias + (e + 1) * l + v0) : vf{};
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        store_out(y + t * ldy + e * l + v0, acc[t][0] + bias0);
        if (eb == 2) store_out(y + t * ldy + (e + 1) * l + v0, acc[t][1] + bias1);
      }
    }
  }
}

template <typename T>
void forward_impl(const torch::Tensor& y, const torch::Tensor& x, const float* w1t,
                  const float* w2p, const float* bias, const Shapes& d) {
  const int64_t n = x.size(0), ldx = x.stride(0), ldy = y.stride(0);
  const int64_t middle = d.k * d.q;
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t width = d.k * d.p;
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> h(kTile * middle);  // one tile's middle activation, in L1/L2
    // bf16: the tile's input in float32 first, so the inner loop broadcasts floats
    std::vector<float> xf(std::is_same<T, float>::value ? 0 : kTile * width);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * kTile;
      const int64_t nt = std::min<int64_t>(kTile, n - t0);
      const float* xt;
      int64_t ld;
      if constexpr (std::is_same<T, float>::value) {
        xt = xp + t0 * ldx;
        ld = ldx;
      } else {
        for (int64_t t = 0; t < nt; ++t) {
          const T* src = xp + (t0 + t) * ldx;
          float* dst = xf.data() + t * width;
          for (int64_t i = 0; i < width; ++i) dst[i] = to_float(src[i]);
        }
        xt = xf.data();
        ld = width;
      }
      T* yt = yp + t0 * ldy;
      if (nt == kTile) {
        first_factor<kTile>(xt, ld, w1t, d, h.data(), middle);
        second_factor<kTile>(h.data(), middle, w2p, bias, d, yt, ldy);
      } else {
        for (int64_t t = 0; t < nt; ++t) {  // the ragged last tile, a token at a time
          first_factor<1>(xt + t * ld, ld, w1t, d, h.data(), middle);
          second_factor<1>(h.data(), middle, w2p, bias, d, yt + t * ldy, ldy);
        }
      }
    }
  });
}

}  // namespace

// y = x M^T (+ bias) for a 2-D contiguous-rows x; w1t (k, p, q) and w2p (s, r, l)
// float32 and contiguous (see the top of this file), bias float32 or undefined.
void small_blocks_forward_(torch::Tensor y, torch::Tensor x, torch::Tensor w1t,
                           torch::Tensor w2p, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "small_blocks_forward_: CPU only");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.stride(1) == 1 && y.stride(1) == 1,
              "small_blocks_forward_: 2-D x and y with contiguous rows expected");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "small_blocks_forward_: x and y must both be float32 or both bfloat16");
  TORCH_CHECK(w1t.dim() == 3 && w2p.dim() == 3 && w1t.is_contiguous() && w2p.is_contiguous() &&
                  w1t.scalar_type() == at::kFloat && w2p.scalar_type() == at::kFloat,
              "small_blocks_forward_: w1t (k, p, q) and w2p (s, r, l) must be contiguous float32");
  const Shapes d{w1t.size(0), w1t.size(2), w1t.size(1), w2p.size(2), w2p.size(0), w2p.size(1)};
  TORCH_CHECK(d.q % kLanes == 0 && d.l % kLanes == 0,
              "small_blocks_forward_: q and l must be multiples of 16, got q=", d.q, ", l=", d.l);
  TORCH_CHECK(d.k * d.q == d.l * d.r, "small_blocks_forward_: middle widths differ");
  TORCH_CHECK(x.size(1) == d.k * d.p && y.size(1) == d.s * d.l && y.size(0) == x.size(0),
              "small_blocks_forward_: x ", x.sizes(), " and y ", y.sizes(),
              " do not fit the factors");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat &&
                    bias->numel() == d.s * d.l,
                "small_blocks_forward_: bias must be contiguous float32 of ", d.s * d.l);
  }
  if (x.size(0) == 0) return;
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat) {
    forward_impl<float>(y, x, w1t.data_ptr<float>(), w2p.data_ptr<float>(), bp, d);
  } else {
    forward_impl<uint16_t>(y, x, w1t.data_ptr<float>(), w2p.data_ptr<float>(), bp, d);
  }
}
