// Which instruction set the CPU kernels use. Each op that has vector code is compiled once per
// instruction set (GCC's `#pragma GCC target`, x86-64 only) and picks a copy on every call, so
// one wheel runs on any x86-64 and uses the widest vectors it has.
#pragma once

#include <string>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SKY_X86_KERNELS 1  // the AVX-512 and AVX2 builds (GCC's `#pragma GCC target`)
#else
#define SKY_X86_KERNELS 0
#endif

namespace skyloom::cpu {

// The instruction sets the kernels are built for that this CPU runs, widest first, from
// "avx512" (x86-64-v4), "avx2" (x86-64-v3, with FMA) and "default" (always there).
std::vector<std::string> cpu_capabilities();

// The one the next call uses: the first of cpu_capabilities(), or the one the environment
// variable SKYLOOM_CPU_CAPABILITY names (std::invalid_argument if this CPU cannot run it).
std::string cpu_capability();

// Whether SKYLOOM_CPU_CAPABILITY names the copy (set and not empty): then it is the one that runs.
bool cpu_capability_pinned();

}  // namespace skyloom::cpu
