// bf16 weight gradients with bf16 dot products, summed in float32:
//
//   c[b] (= or +=) a[b]^T bm[b],   a (B, T, M), bm (B, T, N) bf16, c (B, M, N) float32,
//
// the tokens T being the sum. A Monarch layer's two factor gradients are this
// (grad w2[v] = gz[v]^T mid[v], grad w1[a] = gh[a]^T x[a]); oneDNN ran those
// shapes at 400-600 GFLOP/s on the AMD EPYC VM against 700-800 for a dense
// GEMM, reading the token-major operands transposed, and each chunk's product
// then took a pass to add it to the float32 sum (item 8 of docs/speed.md).
//
// vdpbf16ps multiplies pairs along the sum, so both operands are packed with
// pairs of consecutive tokens side by side, KC tokens at a time, while they are
// in cache: a row-interleave of two rows, P[t/2][col][2] (a ragged last token
// pairs with zeros). a stays in that layout (each step of the micro-kernel
// broadcasts MR of its pairs); bm goes into 32-column strips, so a strip's pairs
// are one contiguous run the micro-kernel streams from L1. Each MR x 32 tile of
// c lives in registers over the KC tokens and is read and written once per KC
// (the next tile's c is prefetched meanwhile); small blocks take all their KC
// tokens at once instead. Work splits over blocks (and
// column strips when there are fewer blocks than twice the threads); every
// element of c has one owner and one order of summation, so the bits do not
// depend on the thread count. As in oneDNN (the same instruction), subnormal
// inputs and products count as zero.

#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include "bf16_pairs.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>

namespace {

constexpr int kMR = 12;      // rows of c per micro-tile (24 accumulators)
constexpr int kNR = 32;      // columns of c per micro-tile (two vectors)
constexpr int64_t kKC = 384;  // tokens packed at a time (a's pairs fill L2 at M = 1024)
// Packed rows of a are its columns rounded up to 32, plus 32: pair-rows 4 KiB
// apart (M = 1024) would all fall into one L1 set.
constexpr int64_t kPad = 32;
// Bytes of float32 sums up to which one thread takes all its items at each KC tokens.
constexpr int64_t kSmallSums = 512 * 1024;

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// p[js][tp][32][2]: bf16_pairs::pack_token_pairs's pairs cut into strips of 32 columns,
// each strip contiguous (zeros past ncols).
void pack_strips(const uint16_t* src, int64_t lds, int64_t ncols, int64_t nt, uint16_t* p) {
  const int64_t pairs = (nt + 1) / 2, strips = (ncols + kNR - 1) / kNR;
  for (int64_t tp = 0; tp < pairs; ++tp) {
    const uint16_t* r0 = src + 2 * tp * lds;
    const uint16_t* r1 = 2 * tp + 1 < nt ? r0 + lds : nullptr;
    for (int64_t js = 0; js < strips; ++js) {
      const int64_t c = js * kNR;
      __m512i lo, hi;
      bf16_pairs::pairs32(r0 + c, r1 ? r1 + c : nullptr, ncols - c, lo, hi);
      uint16_t* dst = p + (js * pairs + tp) * 2 * kNR;
      _mm512_store_si512(dst, lo);
      _mm512_store_si512(dst + 32, hi);
    }
  }
}

// c[0..rows, 0..32] (masked columns) = (load ? c : 0) + sum over the pairs of
// ap[tp][r][2] . bp[tp][col][2].
inline void micro_tile(const uint16_t* ap, int64_t ldap, const uint16_t* bp, int64_t pairs,
                       float* c, int64_t ldc, int rows, __mmask16 m0, __mmask16 m1, bool load,
                       bool prefetch_next) {
  __m512 acc[kMR][2];
  for (int r = 0; r < kMR; ++r) {
    const bool keep = load && r < rows;
    acc[r][0] = keep ? _mm512_maskz_loadu_ps(m0, c + r * ldc) : _mm512_setzero_ps();
    acc[r][1] = keep ? _mm512_maskz_loadu_ps(m1, c + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int r = 0; prefetch_next && r < kMR; ++r) {  // the caller's next tile: the next kMR rows
    _mm_prefetch(reinterpret_cast<const char*>(c + (kMR + r) * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + (kMR + r) * ldc + 16), _MM_HINT_T0);
  }
  for (int64_t tp = 0; tp < pairs; ++tp) {
    const __m512bh b0 = as_bh(_mm512_load_si512(bp + tp * 2 * kNR));
    const __m512bh b1 = as_bh(_mm512_load_si512(bp + tp * 2 * kNR + 32));
#pragma GCC unroll 12
    for (int r = 0; r < kMR; ++r) {
      int32_t pair;
      std::memcpy(&pair, ap + tp * ldap + 2 * r, sizeof pair);
      const __m512bh av = as_bh(_mm512_set1_epi32(pair));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  for (int r = 0; r < rows; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc[r][0]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc[r][1]);
  }
}

inline __mmask16 lane_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

}  // namespace

void weight_grad_dpbf16_(torch::Tensor c, torch::Tensor a, torch::Tensor bm, bool accumulate) {
  auto bf16_cpu = [](const torch::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 3 &&
           t.stride(2) == 1;
  };
  TORCH_CHECK(bf16_cpu(a) && bf16_cpu(bm),
              "weight_grad_dpbf16_: a and bm must be 3-D bf16 CPU tensors with unit last stride");
  TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == at::kFloat && c.dim() == 3 &&
                  c.stride(2) == 1,
              "weight_grad_dpbf16_: c must be a 3-D float32 CPU tensor with unit last stride");
  const int64_t nb = a.size(0), T = a.size(1), M = a.size(2), N = bm.size(2);
  TORCH_CHECK(bm.size(0) == nb && bm.size(1) == T && c.size(0) == nb && c.size(1) == M &&
                  c.size(2) == N,
              "weight_grad_dpbf16_: shapes ", a.sizes(), ", ", bm.sizes(), " -> ", c.sizes(),
              " do not fit c = a^T bm per block");
  at::assert_no_internal_overlap(c);  // each sum has one owner (and one writer)
  if (nb == 0 || M == 0 || N == 0) return;
  if (T == 0) {
    if (!accumulate) c.zero_();
    return;
  }
  const int64_t strips = (N + kNR - 1) / kNR, tiles = (M + kMR - 1) / kMR;
  // work items: blocks, each cut into column-strip groups when there are few blocks
  const int64_t want = 2 * at::get_num_threads();
  const int64_t cuts = nb >= want ? 1 : std::min(strips, (want + nb - 1) / nb);
  const int64_t per_item = (strips + cuts - 1) / cuts;
  const int64_t groups = (strips + per_item - 1) / per_item;
  const int64_t lda = (M + 31) / 32 * 32 + kPad;  // packed a: elements per pair of tokens / 2
  const auto* A = reinterpret_cast<const uint16_t*>(a.data_ptr());
  const auto* B = reinterpret_cast<const uint16_t*>(bm.data_ptr());
  float* C = c.data_ptr<float>();
  at::parallel_for(0, nb * groups, 1, [&](int64_t begin, int64_t end) {
    const int64_t max_pairs = (kKC + 1) / 2;
    // zero-filled: the last tile of a may read packed columns past M (its products are
    // not stored)
    std::vector<uint16_t> a_pack(max_pairs * lda * 2);
    std::vector<uint16_t> b_store(max_pairs * per_item * 2 * kNR + 32);
    auto* b_pack = reinterpret_cast<uint16_t*>(
        (reinterpret_cast<uintptr_t>(b_store.data()) + 63) & ~uintptr_t(63));
    auto pass = [&](int64_t item, int64_t t0) {  // KC tokens of one work item
      const int64_t blk = item / groups;
      const int64_t js0 = item % groups * per_item, js1 = std::min(strips, js0 + per_item);
      const int64_t nt = std::min(kKC, T - t0), pairs = (nt + 1) / 2;
      bf16_pairs::pack_token_pairs(A + blk * a.stride(0) + t0 * a.stride(1), a.stride(1), M,
                                   nt, a_pack.data(), 2 * lda);
      pack_strips(B + blk * bm.stride(0) + t0 * bm.stride(1) + js0 * kNR, bm.stride(1),
                  std::min(N, js1 * kNR) - js0 * kNR, nt, b_pack);
      float* cb = C + blk * c.stride(0);
      const bool load = accumulate || t0 > 0;
      for (int64_t js = js0; js < js1; ++js) {
        const int64_t left = N - js * kNR;
        const __mmask16 m0 = lane_mask(left), m1 = lane_mask(left - 16);
        const uint16_t* bs = b_pack + (js - js0) * pairs * 2 * kNR;
        for (int64_t it = 0; it < tiles; ++it) {
          const int rows = static_cast<int>(std::min<int64_t>(kMR, M - it * kMR));
          micro_tile(a_pack.data() + 2 * it * kMR, 2 * lda, bs, pairs,
                     cb + it * kMR * c.stride(1) + js * kNR, c.stride(1), rows, m0, m1, load,
                     it + 1 < tiles);
        }
      }
    };
    if ((end - begin) * M * per_item * kNR * sizeof(float) <= kSmallSums) {
      // small blocks (the sums of all this thread's items fit in L2): every item at
      // each KC tokens, so the tokens' rows are read together, not a block's column
      // slice of every row at a time (grad w1 of the sqrt(n) case in a bf16 training
      // step: 6-7 -> 3.2-3.6 ms, 8192 tokens)
      for (int64_t t0 = 0; t0 < T; t0 += kKC)
        for (int64_t item = begin; item < end; ++item) pass(item, t0);
    } else {
      for (int64_t item = begin; item < end; ++item)
        for (int64_t t0 = 0; t0 < T; t0 += kKC) pass(item, t0);
    }
  });
}

#else  // no AVX512-BF16: callers check bf16_dot() (module.cpp) first

void weight_grad_dpbf16_(torch::Tensor, torch::Tensor, torch::Tensor, bool) {
  TORCH_CHECK(false, "weight_grad_dpbf16_: built without AVX512-BF16");
}

#endif
