// The stochastic-depth gate scheduler: draws the Bernoulli gates of every residual unit of a network for
// one training step in a single call, compacts the surviving sample indices and builds their inverse maps,
// all into one buffer.
//
// Why on the host, all at once: the sizes of every sub-batch are then known to Python before the forward
// pass starts (no device sync per unit, which a `nonzero()` on the GPU would cost), and all row indices of a
// step travel to the device in one copy, together with the maps the fused epilogue needs (no index kernels).
//
// The gates are counter-based: each uniform is a pure function of (seed, step, unit, sample), so the whole
// state of a stream is (seed, step). Consequences: resuming is setting `step`; how many uniforms a step
// consumes does not matter (batch sizes may differ between steps, and between DDP ranks, without the ranks'
// streams drifting apart); concurrent draws from several threads each claim a distinct step atomically; and
// DDP ranks draw only their own samples' gates. The pure-Python fallback in sdepth_ext/scheduler.py computes
// the identical function (both are tested against each other and against a hand computation):
//   * mix64(z) is SplitMix64's output function (Steele, Lea, Flood 2014), G = 0x9E3779B97F4A7C15;
//   * step key  S = mix64(seed + (step + 1) * G), unit key U = mix64(S + (unit + 1) * G) (mod 2^64);
//   * word j of a unit: W_j = mix64(U + (j + 1) * G); sample g's uniform u is the low 32 bits of W_{g/2} for
//     even g, the high 32 bits for odd g;
//   * a unit survives for sample g iff u < ceil(p * 2^32): exact for p = 0 and p = 1, off by < 2.4e-10
//     elsewhere. Batch mode uses sample 0's uniform for the whole batch.
//   * subset mode (a fixed count, as DINOv2/DINOv3 train their ViTs): a unit keeps exactly
//     K = min(N, max(trunc(N * p), 1)) of the N samples (N * p a double product, truncated toward zero), the
//     K with the smallest keys (u << 32) | i, where u is sample i's uniform defined above and i its index in
//     the batch (unique keys: the index breaks ties of u). The uniforms being independent, every K-subset is
//     equally likely. Under DDP/FSDP the rule applies per rank, to the rank's own N samples (their uniforms
//     are those of their global indices g, as in row mode), so every rank keeps a count fixed by its N.
//   * DDP rank r of W ranks: local sample i is global sample g = i * W + r (ranks interleaved), so a single
//     process drawing the global batch W * N at the same step draws exactly the union of the ranks' plans.
//
// The packed buffer (int64 words) holds, for each unit with 0 < K < N survivors (others store nothing): its K
// sorted sample indices, then its inverse map slot[n] = k (the survivor's row in the sub-batch) or -1, as N
// int32 values packed two to a word (ceil(N / 2) words; an odd N's padding half is -1).
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

namespace sdepth {

struct StepDraw {
  // counts[l]: surviving samples of unit l (0..batch_size; batch mode: 0 or batch_size).
  std::vector<int64_t> counts;
  // active: units with counts[l] > 0, ascending.
  std::vector<int64_t> active;
  // offsets[l]..offsets[l+1]: the words of `buffer` holding unit l's rows and slot map (none for all-or-
  // nothing units).
  std::vector<int64_t> offsets;
  // buffer[0..size): the packed words. Scratch space that only grows: shrinking and regrowing it would
  // zero-fill tens of KB per step.
  std::vector<int64_t> buffer;
  std::vector<int32_t> slot_scratch;
  std::vector<uint64_t> key_scratch;  // subset mode: one unit's (uniform << 32 | index) keys
  int64_t size = 0;
};

// batch: one gate per unit and step; row: one Bernoulli gate per unit and sample; subset: a fixed count of
// samples per unit (above).
enum class Mode { kBatch, kRow, kSubset };

// Subset mode's count of kept samples out of n at survival probability p (see above).
int64_t subset_count(int64_t n, double p);

class GateSampler {
 public:
  GateSampler(const std::vector<double>& survival, Mode mode, uint64_t seed, uint64_t step);

  // Claims the next step (atomically: concurrent callers get distinct steps) and draws it for rank `rank` of
  // `world_size`. Returns the step drawn.
  uint64_t sample(int64_t batch_size, int64_t rank, int64_t world_size, StepDraw& out);
  // Draws step `step` without claiming it (a pure function of the arguments and the sampler's settings).
  void draw(uint64_t step, int64_t batch_size, int64_t rank, int64_t world_size, StepDraw& out) const;

  uint64_t seed() const { return seed_; }
  uint64_t step() const { return step_.load(std::memory_order_relaxed); }
  void set_step(uint64_t step) { step_.store(step, std::memory_order_relaxed); }
  int64_t num_units() const { return static_cast<int64_t>(thresholds_.size()); }
  Mode mode() const { return mode_; }

 private:
  std::vector<uint64_t> thresholds_;  // ceil(p_l * 2^32), in [0, 2^32]
  std::vector<double> survival_;      // p_l itself: subset mode's counts
  Mode mode_;
  uint64_t seed_;
  std::atomic<uint64_t> step_;
};

}  // namespace sdepth
