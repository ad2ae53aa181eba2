// Times the CPU kernels (csrc/cpu) on their own, without Python, PyTorch or its allocator: the figures behind
// "Where the time goes" in docs/cpu-kernels.md. float32, random-free deterministic inputs.
//
//   g++ -O3 -std=c++17 -fno-math-errno -ffp-contract=off -mavx2 -mfma -fopenmp -Icsrc
//       bench/cpu_kernel_driver.cpp -o /tmp/cpu_kernel_driver      (one command; the flags of fbkernels._C_avx2;
//       -mavx512f -mavx512vl -mavx512dq -mavx512bw -mfma instead of -mavx2 -mfma for those of _C_avx512)
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
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/context_gate.h"
#include "cpu/feedback_step.h"
#include "cpu_kernel_cases.h"

using namespace fbkernels;

namespace {

KERNELS_OF(Current, cpu);

// 64-byte aligned like torch's CPU allocator; freed and allocated again per call when `fresh`.
struct Output {
  float* data = nullptr;
  size_t count;
  explicit Output(size_t n) : count(std::max<size_t>(n, 1)) {}
  ~Output() { std::free(data); }
  float* get(bool fresh) {
    if (fresh || data == nullptr) {
      std::free(data);
      data = static_cast<float*>(std::aligned_alloc(64, (count * sizeof(float) + 63) / 64 * 64));
    }
    return data;
  }
};

}  // namespace

int main(int argc, char** argv) {
  const auto parsed = bench::op_inputs_from_args(argc, argv, "[fresh|preallocated [REPEATS [warm|cold]]]");
  if (!parsed) return 2;
  const bench::OpInputs& in = *parsed;
  const bool fresh = argc < 7 || std::strcmp(argv[6], "preallocated") != 0;
  const int repeats = argc > 7 ? std::atoi(argv[7]) : 200;
  const bool cold = argc > 8 && std::strcmp(argv[8], "cold") == 0;
  if (argc > 8 && !cold && std::strcmp(argv[8], "warm") != 0) {
    std::fprintf(stderr, "CACHE must be warm or cold, got %s\n", argv[8]);
    return 2;
  }
  Output first(in.first_size()), second(in.second_size()), small(in.small_size());

  std::vector<double> times;
  std::vector<char> evict(cold ? size_t{64} << 20 : 0);
  for (int call = 0; call < repeats + 10; ++call) {
    if (cold) std::memset(evict.data(), call & 0xff, evict.size());
    const double start = bench::seconds();
    in.call<Current>(first.get(fresh), second.get(fresh), small.get(false));
    if (call >= 10) times.push_back((bench::seconds() - start) * 1e3);
  }
  std::sort(times.begin(), times.end());
  std::printf("%s B=%ld C=%ld N=%ld threads=%ld %s%s: median %.3f ms, p20 %.3f ms, min %.3f ms (%d calls)\n",
              in.op.c_str(), static_cast<long>(in.B), static_cast<long>(in.C), static_cast<long>(in.N),
              static_cast<long>(in.threads), fresh ? "fresh outputs" : "preallocated outputs", cold ? ", cold" : "",
              times[times.size() / 2], times[times.size() / 5], times[0], repeats);
  return 0;
}
