// pybind11 bindings of the gate scheduler and the zero-gradient writer (module sdepth_ext._C).
//
// sample() returns plain Python lists for the per-unit bookkeeping (Python reads them every unit, so they
// must not be tensors) and one int64 tensor with all row indices and slot maps of the step, allocated in
// pinned memory when the caller will copy it to a GPU, so that moving a plan there is one asynchronous copy.
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "grads.h"
#include "scheduler.h"

namespace {

sdepth::Mode parse_mode(const std::string& mode) {
  if (mode == "batch") return sdepth::Mode::kBatch;
  if (mode == "row") return sdepth::Mode::kRow;
  if (mode == "subset") return sdepth::Mode::kSubset;
  throw std::invalid_argument("mode must be one of ('batch', 'row', 'subset'), got '" + mode + "'");
}

const char* mode_name(sdepth::Mode mode) {
  switch (mode) {
    case sdepth::Mode::kBatch:
      return "batch";
    case sdepth::Mode::kRow:
      return "row";
    default:
      return "subset";
  }
}

py::tuple pack(const sdepth::StepDraw& draw, bool pin_memory) {
  const int64_t n = draw.size;
  at::Tensor buffer = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(pin_memory));
  if (n > 0) {
    std::memcpy(buffer.data_ptr<int64_t>(), draw.buffer.data(), n * sizeof(int64_t));
  }
  return py::make_tuple(draw.active, draw.counts, draw.offsets, buffer);
}

py::tuple sample(sdepth::GateSampler& sampler, int64_t batch_size, int64_t rank, int64_t world_size,
                 bool pin_memory) {
  // The scratch vectors live as long as the thread: a step reuses the previous step's capacity, and threads
  // never share them (the sampler's own state is one atomic counter).
  thread_local sdepth::StepDraw draw;
  uint64_t step;
  {
    py::gil_scoped_release no_gil;  // pure C++ from here: other Python threads (data loaders) may run
    step = sampler.sample(batch_size, rank, world_size, draw);
  }
  py::tuple packed = pack(draw, pin_memory);
  return py::make_tuple(packed[0], packed[1], packed[2], packed[3], step);
}

py::tuple draw_at(const sdepth::GateSampler& sampler, uint64_t step, int64_t batch_size, int64_t rank,
                  int64_t world_size) {
  thread_local sdepth::StepDraw draw;
  {
    py::gil_scoped_release no_gil;
    sampler.draw(step, batch_size, rank, world_size, draw);
  }
  return pack(draw, false);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sdepth_ext compiled scheduler: host-side counter-based Bernoulli gates, survivor compaction; "
            "and the dropped units' zero gradients in one call";
  m.def("set_missing_zero_grads", &sdepth::set_missing_zero_grads, py::arg("params"),
        "`.grad` = zeros (one fused fill) where a tensor requiring grad has none; returns how many.");
  m.def("queue_missing_zero_grads", &sdepth::queue_missing_zero_grads, py::arg("params"),
        "From a node's backward: set_missing_zero_grads(params) when the backward ends; nothing (False) if a "
        "parameter has a hook of its own.");
  m.def("skip_idle_accumulators", &sdepth::skip_idle_accumulators, py::arg("out"),
        "In a backward of the whole graph, skip the AccumulateGrad nodes that out's node hands no gradient "
        "and nothing else can see; returns whether out has a node.");
  py::class_<sdepth::GateSampler>(m, "GateSampler")
      .def(py::init([](const std::vector<double>& survival, const std::string& mode, uint64_t seed,
                       uint64_t step) {
             return new sdepth::GateSampler(survival, parse_mode(mode), seed, step);
           }),
           py::arg("survival"), py::arg("mode"), py::arg("seed"), py::arg("step") = 0)
      .def("sample", &sample, py::arg("batch_size"), py::arg("rank") = 0, py::arg("world_size") = 1,
           py::arg("pin_memory") = false,
           "Claim the next step and draw it: (active, counts, offsets, buffer, step).")
      .def("draw", &draw_at, py::arg("step"), py::arg("batch_size"), py::arg("rank") = 0,
           py::arg("world_size") = 1, "Draw a given step without claiming it: (active, counts, offsets, buffer).")
      .def_property_readonly("seed", &sdepth::GateSampler::seed)
      .def_property("step", &sdepth::GateSampler::step, &sdepth::GateSampler::set_step)
      .def_property_readonly("num_units", &sdepth::GateSampler::num_units)
      .def_property_readonly("mode",
                             [](const sdepth::GateSampler& sampler) { return mode_name(sampler.mode()); });
}
