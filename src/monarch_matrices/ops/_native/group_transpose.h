// In-register transposes for the stride permutations with 8 or 16 streams.
//
// permute.cpp's row loops move one element per stream at a time: with 16
// streams (nblocks=16) the compiler cannot vectorize the scatter and a bf16
// deinterleave ran at a fifth of a copy's speed (219 us against 41 us at
// nblocks=4 for a 384x4096 chunk, measured). Here a group of W elements of
// each of the L streams (W = one vector's worth) is loaded as L vectors,
// transposed with log2(L) rounds of two-vector shuffles, and stored as L
// vectors.
//
// Think of an element's place in the L loaded vectors as one index F =
// vector * W + lane, of log2(L) + log2(W) bits. A deinterleave loads the
// interleaved side, F = e*L + v, and must store vector v, lane e, F = v*W + e:
// F rotated right by log2(L) bits. An interleave is the inverse, a rotation
// left. One
// `zip` round (vectors i and i + L/2 shuffled into 2i and 2i + 1) rotates F
// left by one bit; one `unzip` round rotates it right by one. Only bits move,
// so the element type only sets the width (2, 4 or 8 bytes).

#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

namespace group_transpose {

#if defined(__AVX512F__)
constexpr int kBytes = 64;
#else
constexpr int kBytes = 32;  // two registers where vectors are narrower: still correct
#endif

template <int Size>
struct Bits;
template <>
struct Bits<2> {
  typedef uint16_t vec __attribute__((vector_size(kBytes)));
  typedef uint16_t vec_u __attribute__((vector_size(kBytes), aligned(2), may_alias));
  typedef int16_t mask __attribute__((vector_size(kBytes)));
};
template <>
struct Bits<4> {
  typedef uint32_t vec __attribute__((vector_size(kBytes)));
  typedef uint32_t vec_u __attribute__((vector_size(kBytes), aligned(4), may_alias));
  typedef int32_t mask __attribute__((vector_size(kBytes)));
};
template <>
struct Bits<8> {
  typedef uint64_t vec __attribute__((vector_size(kBytes)));
  typedef uint64_t vec_u __attribute__((vector_size(kBytes), aligned(8), may_alias));
  typedef int64_t mask __attribute__((vector_size(kBytes)));
};

// Elements of T per vector.
template <typename T>
constexpr int lanes() {
  return kBytes / static_cast<int>(sizeof(T));
}

// out[o] = (a ++ b)[index(o)] for every lane o, index a constant expression.
template <int Size, typename Index, std::size_t... O>
inline typename Bits<Size>::vec shuffle(typename Bits<Size>::vec a, typename Bits<Size>::vec b,
                                        std::index_sequence<O...>) {
  constexpr int W = kBytes / Size;
#if defined(__clang__) || __GNUC__ >= 12
  return __builtin_shufflevector(a, b, Index::template at<W>(O)...);
#else
  return __builtin_shuffle(a, b, typename Bits<Size>::mask{Index::template at<W>(O)...});
#endif
}

// Lanes o of zip's first output: a[0], b[0], a[1], b[1], ..., from the first halves.
struct ZipLow {
  template <int W>
  static constexpr int at(std::size_t o) { return int(o >> 1) | int(o & 1) * W; }
};
struct ZipHigh {  // the same from the second halves
  template <int W>
  static constexpr int at(std::size_t o) { return int((o + W) >> 1) | int(o & 1) * W; }
};
struct Even {  // (a ++ b)[0], [2], [4], ...
  template <int W>
  static constexpr int at(std::size_t o) { return int(2 * o); }
};
struct Odd {
  template <int W>
  static constexpr int at(std::size_t o) { return int(2 * o + 1); }
};

// v[0..L) rotated left (zip) or right (unzip) by `rounds` bits of F, in place.
template <int Size, int L, bool Zip>
inline void rotate(typename Bits<Size>::vec (&v)[L], int rounds) {
  using vec = typename Bits<Size>::vec;
  constexpr auto lanes_seq = std::make_index_sequence<kBytes / Size>{};
  for (int round = 0; round < rounds; ++round) {
    vec out[L];
#pragma GCC unroll 16
    for (int i = 0; i < L / 2; ++i) {
      if (Zip) {
        out[2 * i] = shuffle<Size, ZipLow>(v[i], v[i + L / 2], lanes_seq);
        out[2 * i + 1] = shuffle<Size, ZipHigh>(v[i], v[i + L / 2], lanes_seq);
      } else {
        out[i] = shuffle<Size, Even>(v[2 * i], v[2 * i + 1], lanes_seq);
        out[i + L / 2] = shuffle<Size, Odd>(v[2 * i], v[2 * i + 1], lanes_seq);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) v[i] = out[i];
  }
}

constexpr int log2(int x) { return x <= 1 ? 0 : 1 + log2(x / 2); }

// L vectors loaded from s (ls elements apart), rotated, stored to d (ld apart).
template <int L, bool Zip, typename T>
inline void transpose_group(const T* __restrict s, int64_t ls, T* __restrict d, int64_t ld) {
  using B = Bits<sizeof(T)>;
  typename B::vec v[L];
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) v[i] = *reinterpret_cast<const typename B::vec_u*>(s + i * ls);
  rotate<sizeof(T), L, Zip>(v, log2(L));
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) *reinterpret_cast<typename B::vec_u*>(d + i * ld) = v[i];
}

// d[v*dv + e] = s[e*L + v] for e in [0, lanes<T>()): one group of a deinterleave.
template <int L, typename T>
inline void deinterleave_group(const T* __restrict s, T* __restrict d, int64_t dv) {
  transpose_group<L, false>(s, lanes<T>(), d, dv);
}

// d[e*L + v] = s[v*sv + e] for e in [0, lanes<T>()): one group of an interleave.
template <int L, typename T>
inline void interleave_group(const T* __restrict s, int64_t sv, T* __restrict d) {
  transpose_group<L, true>(s, sv, d, lanes<T>());
}

// Whether group_transpose handles a group size: powers of two from 8 to 16
// (at 4 the plain loops already run at copy speed; 32 vectors do not fit in registers).
constexpr bool handles(int L) { return L == 8 || L == 16; }

}  // namespace group_transpose
