// The float attention launchers (attention_launch_impl.cuh), a translation unit of their own.
#include "cuda/attention_launch_impl.cuh"

namespace skyloom::cuda {

SKYLOOM_ATTENTION_LAUNCHERS(float)

}  // namespace skyloom::cuda
