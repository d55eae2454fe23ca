#include "scheduler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace sdepth {
namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Sample g's 32-bit uniform under unit key `unit_key` (scheduler.h).
inline uint64_t sample_uniform(uint64_t unit_key, uint64_t g) {
  const uint64_t word = mix64(unit_key + ((g >> 1) + 1) * kGamma);
  return (g & 1) ? (word >> 32) : (word & 0xFFFFFFFFULL);
}

// Compacts the survivors of one unit at one step into words[0..K) (branch-free: always write the index,
// advance only on survival; the survive branch is a coin flip at p = 0.5, so a branch would mispredict about
// half the time) and returns K. Sample g's uniform is half of word W_{g/2} (scheduler.h).
inline int64_t compact_unit(uint64_t unit_key, uint64_t threshold, int64_t n, uint64_t world_size,
                            uint64_t rank, int64_t* words) {
  int64_t k = 0;
  if (world_size == 1) {
    // A single process: samples 2j and 2j + 1 share word j; W_j = mix64(key + (j + 1) G) step by step.
    uint64_t state = unit_key;
    int64_t i = 0;
    for (; i + 1 < n; i += 2) {
      state += kGamma;
      const uint64_t word = mix64(state);
      words[k] = i;
      k += static_cast<int64_t>((word & 0xFFFFFFFFULL) < threshold);
      words[k] = i + 1;
      k += static_cast<int64_t>((word >> 32) < threshold);
    }
    if (i < n) {
      words[k] = i;
      k += static_cast<int64_t>((mix64(state + kGamma) & 0xFFFFFFFFULL) < threshold);
    }
    return k;
  }
  // DDP rank r of W (W >= 2): local sample i is global sample g = i W + r, each in a word of its own.
  for (int64_t i = 0; i < n; ++i) {
    words[k] = i;
    k += static_cast<int64_t>(sample_uniform(unit_key, static_cast<uint64_t>(i) * world_size + rank) <
                              threshold);
  }
  return k;
}

// Subset mode: the `count` samples of the n with the smallest keys (u << 32) | i, sorted by index, into
// words[0..count); `keys` is scratch space of n words.
inline void select_subset(uint64_t unit_key, int64_t n, int64_t count, uint64_t world_size, uint64_t rank,
                          uint64_t* keys, int64_t* words) {
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t g = static_cast<uint64_t>(i) * world_size + rank;
    keys[i] = (sample_uniform(unit_key, g) << 32) | static_cast<uint64_t>(i);
  }
  std::nth_element(keys, keys + count - 1, keys + n);  // the count smallest keys end up in keys[0..count)
  for (int64_t k = 0; k < count; ++k) words[k] = static_cast<int64_t>(keys[k] & 0xFFFFFFFFULL);
  std::sort(words, words + count);
}

}  // namespace

int64_t subset_count(int64_t n, double p) {
  const int64_t count = static_cast<int64_t>(static_cast<double>(n) * p);  // truncation toward zero
  return std::min(n, std::max<int64_t>(count, 1));
}

GateSampler::GateSampler(const std::vector<double>& survival, Mode mode, uint64_t seed, uint64_t step)
    : survival_(survival), mode_(mode), seed_(seed), step_(step) {
  if (survival.empty()) {
    throw std::invalid_argument("survival must hold at least one probability, got an empty list");
  }
  thresholds_.reserve(survival.size());
  for (size_t l = 0; l < survival.size(); ++l) {
    const double p = survival[l];
    if (!(p >= 0.0 && p <= 1.0)) {  // also rejects NaN
      throw std::invalid_argument("survival[" + std::to_string(l) + "] must be in [0, 1], got " +
                                  std::to_string(p));
    }
    // p * 2^32 is exact in double; ceil makes u32 < threshold exact for p = 0 and p = 1.
    thresholds_.push_back(static_cast<uint64_t>(std::ceil(std::ldexp(p, 32))));
  }
}

uint64_t GateSampler::sample(int64_t batch_size, int64_t rank, int64_t world_size, StepDraw& out) {
  // Validate before claiming, so that a rejected call does not advance the stream.
  if (batch_size < 1) {
    throw std::invalid_argument("batch_size must be >= 1, got " + std::to_string(batch_size));
  }
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    throw std::invalid_argument("rank must be in [0, world_size) with world_size >= 1, got rank " +
                                std::to_string(rank) + " of " + std::to_string(world_size));
  }
  const uint64_t step = step_.fetch_add(1, std::memory_order_relaxed);
  draw(step, batch_size, rank, world_size, out);
  return step;
}

void GateSampler::draw(uint64_t step, int64_t batch_size, int64_t rank, int64_t world_size,
                       StepDraw& out) const {
  if (batch_size < 1) {
    throw std::invalid_argument("batch_size must be >= 1, got " + std::to_string(batch_size));
  }
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    throw std::invalid_argument("rank must be in [0, world_size) with world_size >= 1, got rank " +
                                std::to_string(rank) + " of " + std::to_string(world_size));
  }
  const int64_t L = num_units();
  const int64_t N = batch_size;
  out.counts.resize(L);
  out.active.clear();
  out.offsets.resize(L + 1);
  out.size = 0;
  const uint64_t step_key = mix64(seed_ + (step + 1) * kGamma);

  if (mode_ == Mode::kBatch) {
    for (int64_t l = 0; l < L; ++l) {
      // Sample 0's uniform (the low half of word 0) gates the whole batch.
      const uint64_t unit_key = mix64(step_key + static_cast<uint64_t>(l + 1) * kGamma);
      const bool keep = (mix64(unit_key + kGamma) & 0xFFFFFFFFULL) < thresholds_[l];
      out.counts[l] = keep ? N : 0;
      out.offsets[l] = 0;
      if (keep) out.active.push_back(l);
    }
    out.offsets[L] = 0;
    return;
  }

  const int64_t slot_words = (N + 1) / 2;
  // Upper bound on the words stored, plus room for a unit's scratch indices past the last stored word.
  const size_t capacity = static_cast<size_t>(L * (N + slot_words) + N);
  if (out.buffer.size() < capacity) out.buffer.resize(capacity);
  if (out.slot_scratch.size() < static_cast<size_t>(2 * slot_words)) {
    out.slot_scratch.resize(static_cast<size_t>(2 * slot_words));
  }
  const bool subset = mode_ == Mode::kSubset;
  if (subset && out.key_scratch.size() < static_cast<size_t>(N)) {
    out.key_scratch.resize(static_cast<size_t>(N));
  }
  int64_t* words = out.buffer.data();
  int32_t* slot = out.slot_scratch.data();
  const uint64_t W = static_cast<uint64_t>(world_size);
  const uint64_t r = static_cast<uint64_t>(rank);
  int64_t n = 0;
  for (int64_t l = 0; l < L; ++l) {
    const uint64_t unit_key = mix64(step_key + static_cast<uint64_t>(l + 1) * kGamma);
    int64_t count;
    if (subset) {
      count = subset_count(N, survival_[l]);
      if (count < N) select_subset(unit_key, N, count, W, r, out.key_scratch.data(), words + n);
    } else {
      count = compact_unit(unit_key, thresholds_[l], N, W, r, words + n);
    }
    out.offsets[l] = n;
    out.counts[l] = count;
    if (count > 0) out.active.push_back(l);
    if (count == 0 || count == N) continue;  // all or nothing: no rows stored, no gather needed
    // The inverse map, after the compaction: writing it inside the compaction loop (one select per sample)
    // measured several times slower than this fill + K stores.
    std::memset(slot, 0xFF, static_cast<size_t>(2 * slot_words) * sizeof(int32_t));  // -1, padding included
    for (int64_t k = 0; k < count; ++k) slot[words[n + k]] = static_cast<int32_t>(k);
    std::memcpy(words + n + count, slot, static_cast<size_t>(slot_words) * sizeof(int64_t));
    n += count + slot_words;
  }
  out.offsets[L] = n;
  out.size = n;
}

}  // namespace sdepth
