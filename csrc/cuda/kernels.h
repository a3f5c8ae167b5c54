// CUDA kernels for the torch.ops.skyloom ops: torch-free launchers over raw pointers,
// element strides and a stream. Shapes, modes and masks mean what they mean for the CPU
// kernels (cpu/patchify.h, cpu/attention.h), whose plain structs are shared here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cpu/attention.h"
#include "cpu/patchify.h"

namespace skyloom::cuda {

using cpu::AttentionOptions;
using cpu::AttentionShape;
using cpu::PatchGeometry;
using cpu::Strided;
using cpu::StridedOut;

// As cpu::patchify / cpu::unpatchify; element_size 2, 4 or 8 bytes. Where the video's W axis
// is unit-stride and 16-byte aligned, each thread moves 16 bytes of a video row at once.
void patchify(const void* video, const int64_t video_strides[5], void* tokens, const PatchGeometry& g,
              int64_t element_size, cudaStream_t stream);
void unpatchify(const void* tokens, const int64_t token_strides[3], void* video, const PatchGeometry& g,
                int64_t element_size, cudaStream_t stream);

// dtype: kFloat16, kBFloat16 or kFloat32; head_dim 32, 64 or 128. lse is float32.
// options.valid_lengths, when set, is a device pointer.
void attention_forward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided q,
                       Strided k, Strided v, StridedOut out, StridedOut lse, cudaStream_t stream);

// delta_workspace: B·T·S·heads floats of device scratch (rowsum(grad_out ∘ out)).
void attention_backward(DType dtype, const AttentionShape& shape, const AttentionOptions& options, Strided grad_out,
                        Strided q, Strided k, Strided v, Strided out, Strided lse, StridedOut grad_q,
                        StridedOut grad_k, StridedOut grad_v, float* delta_workspace, cudaStream_t stream);

bool head_dim_supported(int64_t head_dim);

}  // namespace skyloom::cuda
