// Vectors of floats one register wide (GCC vector extensions) and the bf16
// conversions the one-pass kernels share (small_blocks.cpp, few_tokens.cpp):
// unaligned loads and stores, a broadcast, and bf16 widening and rounding with
// c10::BFloat16's bits (round to nearest even, NaN -> 0x7FC0).
//
// One register: 16 floats with AVX-512, 8 with AVX2, 4 otherwise. A wider
// vector type on a narrower machine is not split into registers well: GCC kept
// arrays of 16-float accumulators on the stack and moved them through
// general-purpose registers on AVX2, and the small-block kernel ran at 5 GFLOP/s
// a core on a Zen 1 EPYC (measured).

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace vec {

#if defined(__AVX512F__)
constexpr int kLanes = 16;     // floats per vector
constexpr int kRegisters = 32;  // vector registers, for sizing register tiles
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kRegisters = 16;
#else
constexpr int kLanes = 4;
constexpr int kRegisters = 16;
#endif

typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef float vf_unaligned __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint16_t vh __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint16_t vh_unaligned __attribute__((vector_size(kLanes * sizeof(uint16_t)), aligned(2)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline vf load(const uint16_t* p) {  // kLanes bf16, widened
  const vh bits = *reinterpret_cast<const vh_unaligned*>(p);
  const vu wide = __builtin_convertvector(bits, vu) << 16;
  vf f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}
inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
inline void store(uint16_t* p, vf v) {  // rounded to bf16
  vu u;
  std::memcpy(&u, &v, sizeof u);
  vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const vi nan = v != v;  // all ones where NaN
  rounded = (rounded & ~vu(nan)) | (vu(nan) & 0x7FC0u);
  *reinterpret_cast<vh_unaligned*>(p) = __builtin_convertvector(rounded, vh);
}
// A broadcast. x + (-0.0) is x for every x, so the compiler drops the add and
// emits one vbroadcastss from memory (vf{} + x kept a scalar add: 0.0 + -0.0 is +0.0).
inline vf splat(float x) { return -vf{} + x; }

// The sum of a vector's lanes, halves added as a tree: a fixed order, so equal bits.
inline float lane_sum(vf v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof lanes);
  for (int half = kLanes / 2; half >= 1; half /= 2)
    for (int i = 0; i < half; ++i) lanes[i] += lanes[i + half];
  return lanes[0];
}

// The lane sums of N <= 8 vectors at once, out[i] = the sum of v[i]'s lanes. With
// AVX the vectors are halved to 8 lanes, then a transpose tree of hadds sums all
// of them together, about three instructions a sum where lane_sum takes about
// thirty (scalar adds through memory). A few-token dot product of 192 bf16 makes
// six vdpbf16ps per token and one sum, so the sums were most of its time (Zen 4,
// 8 tokens of 768->3072: 323 us against nn.Linear's 281, measured). The order is
// fixed (halves, then pairs of lanes, then the two 128-bit halves), so equal bits.
template <int N>
inline void lane_sums(const vf* v, float* out) {
  static_assert(N >= 1 && N <= 8, "lane_sums takes 1 to 8 vectors");
#if defined(__AVX__)  // AVX-512 implies it
  __m256 h[8];
  for (int i = 0; i < 8; ++i) {
    if (i >= N) {
      h[i] = _mm256_setzero_ps();
      continue;
    }
#if defined(__AVX512F__)
    const __m512 z = (__m512)v[i];
    h[i] = _mm256_add_ps(_mm512_castps512_ps256(z),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
#else
    h[i] = (__m256)v[i];
#endif
  }
  const __m256 a01 = _mm256_hadd_ps(h[0], h[1]), a23 = _mm256_hadd_ps(h[2], h[3]);
  const __m256 a45 = _mm256_hadd_ps(h[4], h[5]), a67 = _mm256_hadd_ps(h[6], h[7]);
  const __m256 b0 = _mm256_hadd_ps(a01, a23), b1 = _mm256_hadd_ps(a45, a67);
  const __m256 c = _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20),
                                 _mm256_permute2f128_ps(b0, b1, 0x31));
  float sums[8];
  _mm256_storeu_ps(sums, c);
  for (int i = 0; i < N; ++i) out[i] = sums[i];
#else
  for (int i = 0; i < N; ++i) out[i] = lane_sum(v[i]);
#endif
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t b) {  // bf16 bits
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if (f != f) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace vec
