#!/usr/bin/env bash
# Builds bench/cpu_kernel_ab.cpp with the CPU kernels of git revision REV (default HEAD) and of the working tree,
# then runs it: is an uncommitted change to csrc/cpu/feedback_step.h or context_gate.h faster, and same in bits?
#
#   bash bench/cpu_kernel_ab.sh [REV] OP B C N THREADS [PAIRS [warm|cold]]
#   bash bench/cpu_kernel_ab.sh feedback_step_forward 8 18 16384 2 300 cold
#
# Only the two op headers are taken from REV; common.h, cpu/vector.h and cpu/parallel.h come from the working tree
# and serve both versions (compare changes to those with alternating runs of bench/cpu_kernel_driver.cpp). Compiled
# with the flags of fbkernels._C_avx2 unless CXXFLAGS is set; CXX picks the compiler (default g++).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
rev=HEAD
# A first argument that names a commit is REV; anything else is the program's OP (it checks the op names).
if [ $# -gt 0 ] && git -C "$repo" rev-parse --verify --quiet "$1^{commit}" > /dev/null; then
  rev=$1
  shift
fi
if [ $# -lt 5 ]; then
  sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# One copy of each op header per version, its `namespace cpu` renamed; the shared helpers stay in namespace cpu.
for version in base change; do
  for op in feedback_step context_gate; do
    if [ "$version" = base ]; then
      git -C "$repo" show "$rev:csrc/cpu/$op.h"
    else
      cat "$repo/csrc/cpu/$op.h"
    fi | sed -e '/^#pragma once/d' \
             -e "s/^namespace cpu {\$/namespace cpu_$version { using namespace ::fbkernels::cpu;/" > "$work/${op}_$version.h"
    grep -q "^namespace cpu_$version {" "$work/${op}_$version.h" || { echo "no 'namespace cpu {' in $op.h" >&2; exit 1; }
    echo "#include \"${op}_$version.h\"" >> "$work/kernels_$version.h"
  done
done
${CXX:-g++} ${CXXFLAGS:--O3 -mavx2 -mfma} -std=c++17 -fno-math-errno -ffp-contract=off -fopenmp \
  -I"$work" -I"$repo/csrc" "$repo/bench/cpu_kernel_ab.cpp" -o "$work/ab"
"$work/ab" "$@"
