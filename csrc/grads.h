// The "zero" dropped-gradient policy's gradients, written in one call, and the engine work they leave behind
// skipped (sdepth_ext/grads.py).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace sdepth {

// `.grad` = zeros for every tensor of `params` that requires grad and has none: what autograd would leave
// there for a parameter whose gradient is zero. Each zero is an uninitialised `empty_like` of its parameter
// (same sizes, strides, dtype and device: a channels_last weight gets a channels_last gradient), filled by
// one `_foreach_zero_` (one fused launch per few hundred tensors on a GPU), or on a CPU, where that is a loop
// of zero_ calls, by memset on the calling thread for dense tensors up to 1 MiB (not under a Python dispatch
// mode, which sees every op). Returns how many it wrote. The caller holds plain tensors only (no subclasses
// such as DTensor).
int64_t set_missing_zero_grads(const std::vector<at::Tensor>& params);

// Called from a node's backward: `set_missing_zero_grads(params)` when the running backward ends (a final
// callback of the autograd engine), unless a parameter carries a hook of its own (a tensor hook, a
// post-accumulate-grad hook): then nothing is queued and it returns false (the caller hands the zeros to
// autograd, which runs those hooks). Plain tensors only, as above.
bool queue_missing_zero_grads(const std::vector<at::Tensor>& params);

// Lets the autograd engine skip the parameters' AccumulateGrad nodes that `out`'s node (grads.StepZeroGrads)
// hands no gradient, in a backward of the whole graph that frees it: each would run with nothing to
// accumulate. Only where nothing can tell: the node is referenced by that edge alone and carries no hook
// (a tensor hook, a post-accumulate-grad hook, a node hook). Returns whether `out` has a node to do it on.
bool skip_idle_accumulators(const at::Tensor& out);

}  // namespace sdepth
