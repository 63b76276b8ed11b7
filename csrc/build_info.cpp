// fop_kernels::build_info() -> str: how this extension was built, for available_backends() and
// `python -m fop_kernels`. ATen/library headers only (no torch/extension.h).
#include <torch/library.h>

#include <string>

namespace {

std::string build_info() {
  std::string info = "cpp=1";
#ifdef FOP_KERNELS_WITH_CUDA
  info += ";cuda=1";
#else
  info += ";cuda=0";
#endif
#ifdef _OPENMP
  info += ";openmp=1";
#else
  info += ";openmp=0";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fop_kernels, m) {
  m.def("build_info() -> str", &build_info);
}
