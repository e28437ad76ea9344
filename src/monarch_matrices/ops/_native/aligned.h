// Scratch buffers on 64-byte (cache-line) boundaries. malloc gives 16 bytes, so a
// 512-bit load from a std::vector's rows splits two cache lines; the small-block
// bf16 kernels load their packed tiles that way on every step (aligning them made
// the grad w2 sums of the sqrt(n) bf16 backward 1.10-1.23x faster, docs/speed.md
// item 25).

#pragma once

#include <cstddef>
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
