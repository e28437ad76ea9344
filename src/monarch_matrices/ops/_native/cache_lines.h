// Cache lines for the small-block kernels: scratch buffers on 64-byte boundaries,
// and rows fetched ahead towards L2.
//
// malloc gives 16 bytes, so a 512-bit load from a std::vector's rows splits two
// cache lines; the small-block kernels load their tiles that way on every step
// (aligning them made the grad w2 sums of the sqrt(n) bf16 backward 1.10-1.23x
// faster, docs/speed.md item 25).

#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::size_t kAlign = 64;

  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}

  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kAlign)));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(kAlign)); }

  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const noexcept { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const noexcept { return false; }
};

// A std::vector whose data() is 64-byte aligned (zero-filled as usual).
template <typename T>
using aligned_vector = std::vector<T, CacheLineAllocator<T>>;

// `cols` elements of each of `rows` rows from p (ld elements apart) towards L2
// (prefetcht1): the next tile's rows while this one computes. Rows of a tile are
// kilobytes apart, too many streams for the hardware prefetcher (docs/speed.md item
// 25: the bf16 one-pass backward 1.10-1.16x, the float32 weight-gradient pass
// 1.16-1.23x).
template <typename T>
inline void prefetch_rows(const T* p, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t b = 0; b < cols * int64_t(sizeof(T)); b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(p + t * ld) + b, 0, 2);
}
