// The __half attention launchers (attention_launch_impl.cuh), a translation unit of their own.
#include "cuda/attention_launch_impl.cuh"

namespace skyloom::cuda {

SKYLOOM_ATTENTION_LAUNCHERS(__half)

}  // namespace skyloom::cuda
