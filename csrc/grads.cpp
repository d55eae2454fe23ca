// Why in C++: a dropped unit's parameters get their zero gradients once per step each; from Python every
// tensor costs an interpreter round trip for the allocation and a checked `.grad` setter, which showed in
// the host-bound step that benchmarks/bench_host.py times ("zero" against "none").
#include "grads.h"

namespace sdepth {

int64_t set_missing_zero_grads(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> zeros;
  std::vector<size_t> owners;
  zeros.reserve(params.size());
  owners.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.requires_grad() && !p.grad().defined()) {
      zeros.push_back(at::empty_like(p));  // preserves p's strides (dense, non-overlapping parameters)
      owners.push_back(i);
    }
  }
  if (zeros.empty()) return 0;
  at::_foreach_zero_(zeros);
  for (size_t k = 0; k < zeros.size(); ++k) {
    // what `p.grad = zero` does in Python after its checks (same dtype, device and size by construction);
    // the vector's tensors share their TensorImpl, and so their gradient, with the Python parameters
    params[owners[k]].mutable_grad() = std::move(zeros[k]);
  }
  return static_cast<int64_t>(zeros.size());
}

}  // namespace sdepth
