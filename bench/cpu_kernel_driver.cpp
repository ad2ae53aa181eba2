// Times the CPU kernels (csrc/cpu) on their own, without Python, PyTorch or its allocator: the figures behind
// "Where the time goes" in docs/cpu-kernels.md. float32, random-free deterministic inputs.
//
//   g++ -O3 -std=c++17 -fno-math-errno -ffp-contract=off -mavx2 -mfma -fopenmp -Icsrc
//       bench/cpu_kernel_driver.cpp -o /tmp/cpu_kernel_driver      (one command; the flags of fbkernels._C_avx2)
//   /tmp/cpu_kernel_driver OP B C N THREADS [OUTPUTS [REPEATS [CACHE]]]
//
// OP: feedback_step_forward, feedback_step_backward (C = d, k = 2, every gradient), context_gate_forward,
// context_gate_backward (alpha 0). OUTPUTS: "fresh" (default) allocates the outputs before every call, as an op
// returning new tensors does, and counts the allocation and the page faults of the first write in the time;
// "preallocated" writes into the same outputs every call. CACHE: "warm" (default) leaves the previous call's data in
// the caches; "cold" writes a 64 MiB buffer before every call (untimed), pushing the inputs out of a 32 MiB L3 as
// the other providers do between calls in bench/step_throughput.py. Prints the median, 20th percentile and minimum
// over REPEATS calls (default 200) after 10 untimed ones.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/context_gate.h"
#include "cpu/feedback_step.h"

using namespace fbkernels;

namespace {

double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// 64-byte aligned like torch's CPU allocator; freed and allocated again per call when `fresh`.
struct Output {
  float* data = nullptr;
  size_t count;
  explicit Output(size_t n) : count(n) {}
  ~Output() { std::free(data); }
  uintptr_t get(bool fresh) {
    if (fresh || data == nullptr) {
      std::free(data);
      data = static_cast<float*>(std::aligned_alloc(64, (count * sizeof(float) + 63) / 64 * 64));
    }
    return reinterpret_cast<uintptr_t>(data);
  }
};

std::vector<float> pattern(size_t n, int period, float scale) {
  std::vector<float> values(n);
  for (size_t i = 0; i < n; ++i) values[i] = static_cast<float>(static_cast<int>(i % period) - period / 2) * scale;
  return values;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s OP B C N THREADS [fresh|preallocated [REPEATS [warm|cold]]]\n", argv[0]);
    return 2;
  }
  const std::string op = argv[1];
  const int64_t B = std::atol(argv[2]), C = std::atol(argv[3]), N = std::atol(argv[4]), threads = std::atol(argv[5]);
  const bool fresh = argc < 7 || std::strcmp(argv[6], "preallocated") != 0;
  const int repeats = argc > 7 ? std::atoi(argv[7]) : 200;
  const bool cold = argc > 8 && std::strcmp(argv[8], "cold") == 0;
  if (argc > 8 && !cold && std::strcmp(argv[8], "warm") != 0) {
    std::fprintf(stderr, "CACHE must be warm or cold, got %s\n", argv[8]);
    return 2;
  }
  const size_t state = static_cast<size_t>(B * C * N);
  const int64_t k = 2;
  const std::vector<float> x = pattern(state, 97, 0.02f), y = pattern(state, 89, 0.03f), g = pattern(state, 13, 0.1f);
  const std::vector<float> matrix = pattern(static_cast<size_t>(C * C), 7, 0.05f), logits = pattern(B * C, 5, 0.5f);
  const std::vector<float> v(static_cast<size_t>(B * k * N), 0.5f), grad_v = pattern(B * k * N, 7, 0.1f);
  std::vector<float> small(static_cast<size_t>(std::max(C * C, B * C)));
  Output first(state), second(op == "feedback_step_forward" ? static_cast<size_t>(B * k * N) : state);

  std::vector<double> times;
  std::vector<char> evict(cold ? size_t{64} << 20 : 0);
  for (int call = 0; call < repeats + 10; ++call) {
    if (cold) std::memset(evict.data(), call & 0xff, evict.size());
    const double start = seconds();
    if (op == "feedback_step_forward" || op == "feedback_step_backward") {
      FeedbackStepParams p;
      p.B = B, p.d = C, p.N = N, p.k = k, p.num_threads = threads;
      p.f = reinterpret_cast<uintptr_t>(y.data());
      p.decay = reinterpret_cast<uintptr_t>(matrix.data());
      if (op == "feedback_step_forward") {
        p.h = reinterpret_cast<uintptr_t>(x.data());
        p.h_next = first.get(fresh), p.v = second.get(fresh);
        cpu::feedback_step_forward<float>(p);
      } else {
        p.v = reinterpret_cast<uintptr_t>(v.data());
        p.grad_h_next = reinterpret_cast<uintptr_t>(g.data());
        p.grad_v = reinterpret_cast<uintptr_t>(grad_v.data());
        p.grad_h = first.get(fresh), p.grad_f = second.get(fresh);
        p.grad_decay = reinterpret_cast<uintptr_t>(small.data());
        cpu::feedback_step_backward<float>(p);
      }
    } else if (op == "context_gate_forward" || op == "context_gate_backward") {
      ContextGateParams p;
      p.B = B, p.C = C, p.N = N, p.alpha = 0.0, p.num_threads = threads;
      p.h = reinterpret_cast<uintptr_t>(x.data());
      p.gate_logits = reinterpret_cast<uintptr_t>(logits.data());
      if (op == "context_gate_forward") {
        p.out = first.get(fresh);
        cpu::context_gate_forward<float>(p);
      } else {
        p.grad_out = reinterpret_cast<uintptr_t>(g.data());
        p.grad_h = first.get(fresh);
        p.grad_gate_logits = reinterpret_cast<uintptr_t>(small.data());
        cpu::context_gate_backward<float>(p);
      }
    } else {
      std::fprintf(stderr, "unknown OP %s\n", op.c_str());
      return 2;
    }
    if (call >= 10) times.push_back((seconds() - start) * 1e3);
  }
  std::sort(times.begin(), times.end());
  std::printf("%s B=%ld C=%ld N=%ld threads=%ld %s%s: median %.3f ms, p20 %.3f ms, min %.3f ms (%d calls)\n",
              op.c_str(), static_cast<long>(B), static_cast<long>(C), static_cast<long>(N),
              static_cast<long>(threads), fresh ? "fresh outputs" : "preallocated outputs", cold ? ", cold" : "",
              times[times.size() / 2], times[times.size() / 5], times[0], repeats);
  return 0;
}
