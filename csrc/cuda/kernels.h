// Host launchers of the fbkernels CUDA kernels (module fbkernels._C_cuda).
//
// Plain C++ interface: raw device pointers, sizes, a dtype code and the CUDA stream to launch on. Every tensor is
// contiguous in the canonical layout [B, d, N] (N = product of the spatial dims); decay / grad_decay are [d, d]
// row-major; v / grad_v are [B, k, N] (the softmax of the last k channels); gate_logits are [B, C].
// The launchers never allocate, never synchronise and launch only on the given stream. Bad arguments throw
// std::invalid_argument, launch failures std::runtime_error (with cudaGetErrorString); nothing exits.
//
// This header needs no CUDA include: cudaStream_t is declared exactly as cuda_runtime_api.h declares it.
#pragma once

#include <cstdint>
#include <string>

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace fbkernels {
namespace cuda {

// Dtype codes shared with the Python layer (fbkernels/_cuda.py) and the CPU kernels.
enum DTypeCode : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// ------------------------------------------------------------------ feedback step
// h_next[b,:,n] = h[b,:,n] + decay @ f[b,:,n];  v[b,:,n] = softmax(h_next[b, d-k:, n]).
void feedback_step_forward(const void* h, const void* f, const void* decay, void* h_next, void* v, int64_t B,
                           int64_t d, int64_t N, int64_t k, int dtype, cudaStream_t stream);

// Number of [d, d] partial sums of grad_decay that feedback_step_backward writes (one per thread block of its
// main kernel). Depends on the sizes and on the current device (its SM count); at least 1.
int64_t feedback_step_num_partials(int64_t B, int64_t d, int64_t N);

// g = grad_h (zero if grad_h is null); g[:, d-k:] += v * (grad_v - sum_c v * grad_v) (skipped if grad_v is null);
// grad_h_in = g; grad_f[b,:,n] = decay^T @ g[b,:,n]; grad_decay = sum_{b,n} g[b,:,n] (outer) f[b,:,n].
// A null grad_h_in, grad_f or grad_decay is a gradient nobody needs: its work is skipped (for grad_decay the whole
// reduction, and partials may then be null). partials: workspace of at least feedback_step_num_partials(B, d, N)
// * d * d elements (partials_elements says how many it has; fewer throw), float32 (float64 when dtype is
// float64). grad_decay is the fixed-order sum of the partials: deterministic, no floating-point atomics.
void feedback_step_backward(const void* grad_h, const void* grad_v, const void* f, const void* v, const void* decay,
                            void* grad_h_in, void* grad_f, void* grad_decay, void* partials,
                            int64_t partials_elements, int64_t B, int64_t d, int64_t N, int64_t k, int dtype,
                            cudaStream_t stream);

// ------------------------------------------------------------------ context gate
// out[b,c,n] = alpha * h[b,c,n] + (1 - alpha) * h[b,c,n] * sigmoid(gate_logits[b,c]).
void context_gate_forward(const void* h, const void* gate_logits, void* out, int64_t B, int64_t C, int64_t N,
                          double alpha, int dtype, cudaStream_t stream);

// grad_h = grad_out * (alpha + (1 - alpha) * s);  grad_gate_logits[b,c] = (1 - alpha) * s * (1 - s) *
// sum_n grad_out[b,c,n] * h[b,c,n], with s = sigmoid(gate_logits[b,c]). The sum is a fixed-order tree.
// A null grad_h or grad_gate_logits is not computed.
void context_gate_backward(const void* grad_out, const void* h, const void* gate_logits, void* grad_h,
                           void* grad_gate_logits, int64_t B, int64_t C, int64_t N, double alpha, int dtype,
                           cudaStream_t stream);

// ------------------------------------------------------------------ device
// Empty when the current device can run these kernels, else the CUDA runtime's reason (no kernel image for the
// device's architecture, PTX newer than the driver, ...). Never throws.
std::string kernel_image_error();

}  // namespace cuda
}  // namespace fbkernels
