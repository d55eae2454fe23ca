// The stochastic-depth gate scheduler: draws the Bernoulli gates of every residual block of a network
// for one training step in a single call, and compacts the surviving sample indices into one buffer.
//
// Why on the host, all at once: the sizes of every sub-batch are then known to Python before the forward
// pass starts (no device sync per block, which a `nonzero()` on the GPU would cost), and all row indices
// of a step travel to the device in one copy.
//
// The random stream is defined exactly, so the pure-Python fallback in sdepth_ext/scheduler.py draws the
// identical plans (both paths are tested against each other):
//   * 64-bit words come from SplitMix64 (Steele, Lea, Flood 2014): state += 0x9E3779B97F4A7C15, then the
//     output mix. Its whole state is one uint64, so saving and resuming a run is trivial.
//   * each word gives two 32-bit uniforms, low half first; a gate survives iff u32 < ceil(p * 2^32).
//     That is exact for p = 0 and p = 1 and off by < 2.4e-10 elsewhere, and halves the mixing work.
//   * one sample() call consumes L uniforms (batch mode) or L * batch_size (row mode, block-major), and
//     an odd leftover half word is discarded, so every call starts on a fresh word.
#pragma once

#include <cstdint>
#include <vector>

namespace sdepth {

struct StepDraw {
  // counts[l]: surviving samples of block l (0..batch_size; batch mode: 0 or batch_size).
  std::vector<int64_t> counts;
  // active: blocks with counts[l] > 0, ascending.
  std::vector<int64_t> active;
  // offsets[l]..offsets[l+1]: the slice of `indices` holding block l's rows. Only partially surviving
  // blocks store rows; a block whose samples all survive stores none (rows(l) is None: no gather).
  std::vector<int64_t> offsets;
  // indices[0..num_indices): the packed rows. The vector is scratch space of at least L * batch_size
  // elements that only grows: shrinking and regrowing it would zero-fill 54 x 128 x 8 B = 55 KB per step.
  std::vector<int64_t> indices;
  int64_t num_indices = 0;
};

class GateSampler {
 public:
  GateSampler(const std::vector<double>& survival, bool row_mode, uint64_t state);

  // Draws one step's gates into `out` (its vectors are reused to avoid reallocation).
  void sample(int64_t batch_size, StepDraw& out);

  uint64_t state() const { return state_; }
  void set_state(uint64_t state) { state_ = state; }
  int64_t num_blocks() const { return static_cast<int64_t>(thresholds_.size()); }
  bool row_mode() const { return row_mode_; }

 private:
  std::vector<uint64_t> thresholds_;  // ceil(p_l * 2^32), in [0, 2^32]
  bool row_mode_;
  uint64_t state_;
};

}  // namespace sdepth
