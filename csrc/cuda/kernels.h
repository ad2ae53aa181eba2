// Host launchers of the fbkernels CUDA kernels (module fbkernels._C_cuda), one per op and pass, each taking the
// op's parameter struct of csrc/common.h (the same struct as the CPU kernels): data pointers of contiguous tensors
// in the canonical layout [B, d, N] (N = product of the spatial dims), sizes, dtype code and the CUDA stream.
// The launchers never allocate, never synchronise and launch only on params.stream. Bad arguments throw
// std::invalid_argument, launch failures std::runtime_error (with cudaGetErrorString); nothing exits.
// This header needs no CUDA include.
#pragma once

#include <cstdint>
#include <string>

#include "common.h"

namespace fbkernels {
namespace cuda {

// ------------------------------------------------------------------ feedback step
// h_next[b,:,n] = h[b,:,n] + decay @ f[b,:,n];  v[b,:,n] = softmax(h_next[b, d-k:, n]).
void feedback_step_forward(const FeedbackStepParams& params);

// Number of [d, d] partial sums of grad_decay that feedback_step_backward writes (one per thread block of its
// main kernel), from params.B, d and N. Depends on the current device (its SM count); at least 1.
int64_t feedback_step_num_partials(const FeedbackStepParams& params);

// g = grad_h_next (zero if null); g[:, d-k:] += v * (grad_v - sum_c v * grad_v) (skipped if grad_v is null);
// grad_h = g; grad_f[b,:,n] = decay^T @ g[b,:,n]; grad_decay = sum_{b,n} g[b,:,n] (outer) f[b,:,n].
// Only the outputs whose need_grad_* is set are computed (an unneeded grad_decay skips the whole reduction, and
// partials may then be null). grad_decay is the fixed-order sum of the partials workspace: deterministic, no
// floating-point atomics.
void feedback_step_backward(const FeedbackStepParams& params);

// ------------------------------------------------------------------ context gate
// out[b,c,n] = alpha * h[b,c,n] + (1 - alpha) * h[b,c,n] * sigmoid(gate_logits[b,c]).
void context_gate_forward(const ContextGateParams& params);

// grad_h = grad_out * (alpha + (1 - alpha) * s);  grad_gate_logits[b,c] = (1 - alpha) * s * (1 - s) *
// sum_n grad_out[b,c,n] * h[b,c,n], with s = sigmoid(gate_logits[b,c]). The sum is a fixed-order tree.
// Only the outputs whose need_grad_* is set are computed.
void context_gate_backward(const ContextGateParams& params);

// ------------------------------------------------------------------ device
// Empty when the current device can run these kernels, else the CUDA runtime's reason (no kernel image for the
// device's architecture, PTX newer than the driver, ...). Never throws.
std::string kernel_image_error();

}  // namespace cuda
}  // namespace fbkernels
