// Why in C++: a dropped unit's parameters get their zero gradients once per step each; from Python every
// tensor costs an interpreter round trip for the allocation and a checked `.grad` setter, which showed in
// the host-bound step that benchmarks/bench_host.py times ("zero" against "none"). And Python has no way to
// change a graph node's edges, which skipping the idle AccumulateGrad nodes needs (SkipIdleAccumulators).
#include "grads.h"

#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>

#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>

namespace sdepth {

namespace {

// Up to this size a CPU zero gradient is cleared on the calling thread; above it, where splitting the fill
// over threads can save more than their fork and join cost, by ATen (docs/benchmarks.md, "The CPU zero fill").
constexpr int64_t kMemsetMaxBytes = int64_t{1} << 20;

}  // namespace

int64_t set_missing_zero_grads(const std::vector<at::Tensor>& params) {
  // A Python dispatch mode (a counting tool, fake tensors) sees every op, so under one every zero goes
  // through _foreach_zero_, as on a GPU.
  const bool may_memset = !c10::impl::TorchDispatchModeTLS::any_modes_set();
  std::vector<at::Tensor> zeros;
  std::vector<at::Tensor> to_fill;  // the zeros that _foreach_zero_ fills
  std::vector<size_t> owners;
  zeros.reserve(params.size());
  owners.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.requires_grad() && !p.grad().defined()) {
      at::Tensor zero = at::empty_like(p);  // preserves p's strides (dense, non-overlapping parameters)
      // A CPU tensor of at most kMemsetMaxBytes whose memory is one dense block is cleared with memset, on
      // this thread: all-zero bytes are zero in every dtype a gradient has. On a CPU _foreach_zero_ is a loop
      // of zero_ calls, each through the dispatcher and a TensorIterator (about 1 us per tensor above the
      // memory it clears), and each forks and joins the thread pool for a tensor above GRAIN_SIZE (32768)
      // elements, which at the end of a backward costs more than clearing the bytes on one thread.
      const int64_t nbytes = zero.numel() * zero.element_size();
      if (!may_memset || !zero.is_cpu() || !zero.is_non_overlapping_and_dense() || nbytes > kMemsetMaxBytes) {
        to_fill.push_back(zero);
      } else if (nbytes > 0) {  // an empty tensor may have no memory at all
        std::memset(zero.data_ptr(), 0, static_cast<size_t>(nbytes));
      }
      zeros.push_back(std::move(zero));
      owners.push_back(i);
    }
  }
  if (zeros.empty()) return 0;
  if (!to_fill.empty()) at::_foreach_zero_(to_fill);
  for (size_t k = 0; k < zeros.size(); ++k) {
    // what `p.grad = zero` does in Python after its checks (same dtype, device and size by construction);
    // the vector's tensors share their TensorImpl, and so their gradient, with the Python parameters
    params[owners[k]].mutable_grad() = std::move(zeros[k]);
  }
  return static_cast<int64_t>(zeros.size());
}

// Why at the end of the backward rather than in the node's: the zeros then are not allocated while the
// backward's activations and gradients still are (they added to its peak memory), and a parameter that also
// gets a real gradient elsewhere in the graph keeps that tensor as is, with no zero to add it to. Nothing
// sees `.grad` of these parameters in between: a parameter with a hook of its own is left to autograd.
bool queue_missing_zero_grads(const std::vector<at::Tensor>& params) {
  for (const at::Tensor& p : params) {
    // no autograd metadata (a frozen parameter, never hooked): nothing to see; the hooks' own accessors
    // assert that there is some
    const auto* meta = torch::autograd::impl::get_autograd_meta(p);
    if (meta != nullptr && (!meta->hooks_.empty() || meta->post_acc_grad_hooks_ != nullptr)) return false;
  }
  torch::autograd::Engine::get_default_engine().queue_callback([params]() { set_missing_zero_grads(params); });
  return true;
}

namespace {

using torch::autograd::AccumulateGrad;
using torch::autograd::Edge;
using torch::autograd::Node;
using torch::autograd::variable_list;

// Whether anything but the engine would see `fn` run: a hook on the node, or on its tensor.
bool hooked(Node& fn) {
  return !fn.pre_hooks().empty() || !fn.post_hooks().empty() || !fn.tensor_pre_hooks().empty() ||
         !fn.retains_grad_hooks().empty() || fn.tensor_post_acc_grad_hooks() != nullptr;
}

// Why: the engine runs every node of the graph in a backward of the whole graph, and an AccumulateGrad
// that gets no gradient does nothing, yet costs a ready-queue push and pop and a restore of the thread's
// autograd state, per dropped parameter and step (bench_host's "zero" against "none" times it). Post hooks
// run after the node's backward and before the engine follows its edges, so an edge cleared here is not
// followed. The cleared nodes are kept until the hook's node goes: nothing is freed earlier than before.
struct SkipIdleAccumulators : torch::autograd::FunctionPostHook {
  explicit SkipIdleAccumulators(Node* owner) : owner(owner) {}

  variable_list operator()(const variable_list& outputs, const variable_list& /*inputs*/) override {
    const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
    // autograd.grad / backward(inputs=...) (a non-empty exec_info) and a retained graph may use the edges.
    if (exec_info == nullptr || !exec_info->empty() || torch::autograd::get_current_graph_task_keep_graph()) {
      return outputs;
    }
    auto& edges = owner->next_edges();
    for (size_t i = 0; i < edges.size() && i < outputs.size(); ++i) {
      auto& fn = edges[i].function;
      // use_count 1: no other edge of any live graph leads there (a parameter used elsewhere keeps its
      // edge, and its gradient arrives on it as usual), and nobody holds it to hook it (DDP's reducer; a
      // Python object made for it, as `next_functions` makes, holds it too)
      if (!fn || outputs[i].defined() || fn.use_count() != 1 ||
          dynamic_cast<AccumulateGrad*>(fn.get()) == nullptr || hooked(*fn)) {
        continue;
      }
      skipped.push_back(std::move(fn));
      edges[i] = Edge();
    }
    return outputs;
  }

  // Compiled autograd collects each hook's arguments; this one registers nothing there (under compiled
  // autograd the node returns every gradient, so there is nothing to skip). Both signatures: the base's is
  // const in newer torch, not in older; one of the two overrides it.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& /*args*/) const {}
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& /*args*/) {}

  Node* owner;  // the node this hook belongs to (it owns the hook, so it outlives every call)
  // the nodes whose edges were cleared (Edge::function: shared_ptr in older torch, intrusive_ptr in newer)
  std::vector<std::remove_reference_t<decltype(std::declval<Edge&>().function)>> skipped;
};

}  // namespace

bool skip_idle_accumulators(const at::Tensor& out) {
  const auto& node = out.grad_fn();
  if (!node) return false;
  node->add_post_hook(std::make_unique<SkipIdleAccumulators>(node.get()));
  return true;
}

}  // namespace sdepth
