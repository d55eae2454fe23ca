// The "zero" dropped-gradient policy's gradients, written in one call (sdepth_ext/grads.py).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace sdepth {

// `.grad` = zeros for every tensor of `params` that requires grad and has none: what autograd would leave
// there for a parameter whose gradient is zero. Each zero is an uninitialised `empty_like` of its parameter
// (same sizes, strides, dtype and device: a channels_last weight gets a channels_last gradient), and all are
// filled by one `_foreach_zero_` (one fused launch per few hundred tensors on a GPU). Returns how many it
// wrote. The caller holds plain tensors only (no subclasses such as DTensor).
int64_t set_missing_zero_grads(const std::vector<at::Tensor>& params);

}  // namespace sdepth
