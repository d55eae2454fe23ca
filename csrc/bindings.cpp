// pybind11 bindings of the gate scheduler (module sdepth_ext._C).
//
// sample() returns plain Python lists for the per-block bookkeeping (Python reads them every block, so
// they must not be tensors) and one int64 tensor with all row indices of the step, allocated in pinned
// memory when asked, so that moving a plan to the GPU is one asynchronous copy.
#include <torch/extension.h>

#include <cstring>

#include "scheduler.h"

namespace {

py::tuple sample(sdepth::GateSampler& sampler, int64_t batch_size, bool pin_memory) {
  // The scratch vectors live as long as the thread: a step reuses the previous step's capacity.
  thread_local sdepth::StepDraw draw;
  {
    py::gil_scoped_release no_gil;  // pure C++ from here: other Python threads (data loaders) may run
    sampler.sample(batch_size, draw);
  }
  const int64_t n = draw.num_indices;
  at::Tensor indices = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(pin_memory));
  if (n > 0) {
    std::memcpy(indices.data_ptr<int64_t>(), draw.indices.data(), n * sizeof(int64_t));
  }
  return py::make_tuple(draw.active, draw.counts, draw.offsets, indices);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sdepth_ext compiled scheduler: host-side Bernoulli gates and survivor compaction";
  py::class_<sdepth::GateSampler>(m, "GateSampler")
      .def(py::init<const std::vector<double>&, bool, uint64_t>(), py::arg("survival"),
           py::arg("row_mode"), py::arg("state"))
      .def("sample", &sample, py::arg("batch_size"), py::arg("pin_memory") = false,
           "Draw one step: (active, counts, offsets, indices).")
      .def_property("state", &sdepth::GateSampler::state, &sdepth::GateSampler::set_state)
      .def_property_readonly("num_blocks", &sdepth::GateSampler::num_blocks)
      .def_property_readonly("row_mode", &sdepth::GateSampler::row_mode);
}
