// Per-task partial sums of a parallel loop, added in task order once it is done:
// a sum then depends on the thread count (through how the tokens are split) but
// never on which thread finished first, so equal runs give equal bits.

#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

template <typename AccT>
class OrderedPartials {
 public:
  // A task's partial sums, keyed by the first index of its range.
  void add(int64_t begin, std::vector<AccT>&& part) {
    std::lock_guard<std::mutex> guard(lock_);
    parts_.emplace(begin, std::move(part));
  }

  // out[i] += every part's [i], in task order.
  void sum_into(AccT* out) const {
    for (const auto& entry : parts_) {
      const std::vector<AccT>& part = entry.second;
      for (size_t i = 0; i < part.size(); ++i) out[i] += part[i];
    }
  }

 private:
  std::mutex lock_;
  std::map<int64_t, std::vector<AccT>> parts_;
};
