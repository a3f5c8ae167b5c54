// The pybind11 module skyloom._C. Tensor ops register themselves with TORCH_LIBRARY in
// the other files of bindings/; loading this module is what runs those registrations.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "cpu/capability.h"

namespace py = pybind11;

namespace {

std::string compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = compiler();
  info["torch_version"] = SKYLOOM_TORCH_VERSION;
#ifdef SKYLOOM_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(SKYLOOM_CUDA_ARCHS_STR);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "skyloom's compiled kernels; the tensor ops live under torch.ops.skyloom";
  m.def("cpu_capabilities", &skyloom::cpu::cpu_capabilities,
        "The instruction sets of the CPU kernels (attention, patchify) this CPU runs, widest first; the first is used "
        "unless the environment variable SKYLOOM_CPU_CAPABILITY names another (unpinned, temporal attention of at most 8 "
        "frames runs the avx2 copy on an avx512 CPU).");
  m.def("build_info", &build_info,
        "How this extension was built: compiler, CUDA on/off, CUDA archs, the torch version it was built against.");
}
