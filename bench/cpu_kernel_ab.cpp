// Paired timing of two versions of the CPU kernels in one process: a committed version (namespace cpu_base) against
// the working tree's (cpu_change), called alternately, so that the load of a shared machine falls on both alike.
// Alternating separate runs of bench/cpu_kernel_driver.cpp resolve about 10% on a shared VM; this about 2% (the
// same kernels on both sides, 300 pairs, inputs out of cache: ratios 0.98-1.015 on the 2-core EPYC VM).
//
//   bash bench/cpu_kernel_ab.sh [REV] OP B C N THREADS [PAIRS [warm|cold]]      (builds, then runs this)
//
// OP, B, C, N, THREADS and the cold cache as in cpu_kernel_driver.cpp; the outputs are preallocated (one set per
// version). Each round calls both versions once, in alternating order, after 5 untimed rounds. Prints both medians,
// their ratio, in how many rounds the change was faster, and whether the two versions wrote the same bits.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_kernel_cases.h"
#include "kernels_base.h"
#include "kernels_change.h"

using namespace fbkernels;

namespace {

KERNELS_OF(Base, cpu_base);
KERNELS_OF(Change, cpu_change);

struct Outputs {
  std::vector<float> first, second, small;
  explicit Outputs(const bench::OpInputs& in)
      : first(in.first_size()), second(in.second_size()), small(in.small_size()) {}
  bool operator==(const Outputs& other) const {
    const auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
      return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
    };
    return same(first, other.first) && same(second, other.second) && same(small, other.small);
  }
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const auto parsed = bench::op_inputs_from_args(argc, argv, "[PAIRS [warm|cold]]");
  if (!parsed) return 2;
  const bench::OpInputs& in = *parsed;
  const int pairs = argc > 6 ? std::atoi(argv[6]) : 300;
  const bool cold = argc > 7 && std::strcmp(argv[7], "cold") == 0;
  if (pairs < 1 || (argc > 7 && !cold && std::strcmp(argv[7], "warm") != 0)) {
    std::fprintf(stderr, "PAIRS must be >= 1 and CACHE warm or cold\n");
    return 2;
  }
  Outputs base(in), change(in);
  std::vector<double> base_ms, change_ms;
  std::vector<char> evict(cold ? size_t{64} << 20 : 0);
  int change_faster = 0;
  for (int round = 0; round < pairs + 5; ++round) {
    double ms[2];
    for (int turn = 0; turn < 2; ++turn) {
      const int which = (round + turn) % 2;  // 0: base, 1: change; who goes first alternates
      if (cold) std::memset(evict.data(), (round * 2 + turn) & 0xff, evict.size());
      Outputs& out = which == 0 ? base : change;
      const double start = bench::seconds();
      if (which == 0) {
        in.call<Base>(out.first.data(), out.second.data(), out.small.data());
      } else {
        in.call<Change>(out.first.data(), out.second.data(), out.small.data());
      }
      ms[which] = (bench::seconds() - start) * 1e3;
    }
    if (round >= 5) {
      base_ms.push_back(ms[0]), change_ms.push_back(ms[1]);
      change_faster += ms[1] < ms[0];
    }
  }
  const double base_median = median(base_ms), change_median = median(change_ms);
  std::printf("%s B=%ld C=%ld N=%ld threads=%ld%s: base %.3f ms, change %.3f ms (medians), change/base %.3f, "
              "change faster in %d of %d pairs, %s bits\n",
              in.op.c_str(), static_cast<long>(in.B), static_cast<long>(in.C), static_cast<long>(in.N),
              static_cast<long>(in.threads), cold ? ", cold" : "", base_median, change_median,
              change_median / base_median, change_faster, pairs, base == change ? "same" : "different");
  return 0;
}
