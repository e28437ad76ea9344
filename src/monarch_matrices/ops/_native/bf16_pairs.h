// Pairs of bf16 values side by side, as vdpbf16ps multiplies them (AVX512-BF16):
// lane i of a 32-lane result holds value i/2 of the first source for even i and
// of the second for odd i. The dot-product kernels (small_blocks_dpbf16.cpp,
// weight_grad_dpbf16.cpp) pack their operands so: along a sum that runs over the
// tokens, the two sources are two token rows; along one inside a row, two runs of
// that row.

#pragma once

#if defined(__AVX512BF16__)
#include <immintrin.h>

#include <cstdint>

namespace bf16_pairs {

// A 512-bit [16 values of a | 16 of b] in, its pairs out.
alignas(64) constexpr uint16_t kPairOrder[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5,
                                                 21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26,
                                                 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
// 32 values of a and 32 of b (as two vectors) in: their first 16 pairs, their last 16.
alignas(64) constexpr uint16_t kLowPairs[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) constexpr uint16_t kHighPairs[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                                 53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                                 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

inline __m512i interleave(__m512i both) {
  return _mm512_permutexvar_epi16(_mm512_load_si512(kPairOrder), both);
}

// The 16 pairs (a[i], b[i]) (b null: zeros).
inline __m512i pairs16(const uint16_t* a, const uint16_t* b) {
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i hi = b != nullptr ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b))
                                  : _mm256_setzero_si256();
  return interleave(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
}

inline __mmask16 lanes16(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// The 32 pairs (a[i], b[i]) for i < left (zeros past it, and for b null): the first
// 16 in lo, the last 16 in hi. Full loads unless the run ends inside.
inline void pairs32(const uint16_t* a, const uint16_t* b, int64_t left, __m512i& lo,
                    __m512i& hi) {
  __m512i va, vb = _mm512_setzero_si512();
  if (left >= 32) {
    va = _mm512_loadu_si512(a);
    if (b != nullptr) vb = _mm512_loadu_si512(b);
  } else {
    const __mmask32 mask = left <= 0 ? __mmask32(0) : (__mmask32(1) << left) - 1;
    va = _mm512_maskz_loadu_epi16(mask, a);
    if (b != nullptr) vb = _mm512_maskz_loadu_epi16(mask, b);
  }
  lo = _mm512_permutex2var_epi16(va, _mm512_load_si512(kLowPairs), vb);
  hi = _mm512_permutex2var_epi16(va, _mm512_load_si512(kHighPairs), vb);
}

// Adds the two values of each of 16 pairs into sum[0..left) (float32): 32-bit lane i
// holds a pair as bf16, the first value in the low half, the second in the high half.
inline void add_pair_sums(__m512i pairs, float* sum, int64_t left) {
  const __m512 first = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  const __m512 second = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(-65536)));
  const __mmask16 mask = lanes16(left);
  _mm512_mask_storeu_ps(sum, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, sum),
                                                 _mm512_add_ps(first, second)));
}

// p[tp][c][2] = (src[2tp][c], src[2tp+1][c]) for the nt rows of src (lds apart), c
// up to ncols rounded up to 32 (zeros past ncols; a ragged last row pairs with
// zeros); pair-rows ldp elements apart. With sum, also adds every row into sum[c]
// for c < ncols (float32).
inline void pack_token_pairs(const uint16_t* src, int64_t lds, int64_t ncols, int64_t nt,
                             uint16_t* p, int64_t ldp, float* sum = nullptr) {
  for (int64_t tp = 0; tp < (nt + 1) / 2; ++tp) {
    const uint16_t* r0 = src + 2 * tp * lds;
    const uint16_t* r1 = 2 * tp + 1 < nt ? r0 + lds : nullptr;
    for (int64_t c = 0; c < ncols; c += 32) {
      __m512i lo, hi;
      pairs32(r0 + c, r1 == nullptr ? nullptr : r1 + c, ncols - c, lo, hi);
      _mm512_storeu_si512(p + tp * ldp + 2 * c, lo);
      _mm512_storeu_si512(p + tp * ldp + 2 * c + 32, hi);
      if (sum != nullptr) {
        add_pair_sums(lo, sum + c, ncols - c);
        add_pair_sums(hi, sum + c + 16, ncols - c - 16);
      }
    }
  }
}

}  // namespace bf16_pairs

#endif
