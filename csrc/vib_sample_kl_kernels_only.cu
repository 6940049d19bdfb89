// Kernel-only translation unit: every kernel variant the launchers can pick, without ATen/torch.
// Used for fast, torch-independent ptxas resource reports (tests/test_cpp_build.py, CMake target
// vittle_fast_kernels_ptxas).
#include "vib_sample_kl_kernels.cuh"

namespace vittle_fast {
namespace cuda {

#define VITTLE_INSTANTIATE_LAUNCHERS(T)                                                        \
  template void launch_forward<T>(const ForwardPointers<T>&, const KernelArgs&, cudaStream_t);  \
  template void launch_backward<T>(const BackwardPointers<T>&, const KernelArgs&, cudaStream_t);

VITTLE_INSTANTIATE_LAUNCHERS(float)
VITTLE_INSTANTIATE_LAUNCHERS(__nv_bfloat16)
VITTLE_INSTANTIATE_LAUNCHERS(__half)

}  // namespace cuda
}  // namespace vittle_fast
