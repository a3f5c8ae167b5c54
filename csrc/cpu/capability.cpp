#include "cpu/capability.h"

#include <cstdlib>
#include <stdexcept>

namespace skyloom::cpu {

std::vector<std::string> cpu_capabilities() {
  static const std::vector<std::string> supported = [] {
    std::vector<std::string> names;
#if SKY_X86_KERNELS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) names.push_back("avx512");
    if (__builtin_cpu_supports("x86-64-v3")) names.push_back("avx2");
#endif
    names.push_back("default");
    return names;
  }();
  return supported;
}

bool cpu_capability_pinned() {
  const char* requested = std::getenv("SKYLOOM_CPU_CAPABILITY");
  return requested != nullptr && *requested != '\0';
}

std::string cpu_capability() {
  const std::vector<std::string> supported = cpu_capabilities();
  if (!cpu_capability_pinned()) return supported.front();
  const char* requested = std::getenv("SKYLOOM_CPU_CAPABILITY");
  for (const std::string& name : supported)
    if (name == requested) return name;
  std::string names;
  for (const std::string& name : supported) names += (names.empty() ? "" : ", ") + name;
  throw std::invalid_argument(std::string("SKYLOOM_CPU_CAPABILITY=") + requested +
                              " is not one this CPU and build support; use one of " + names +
                              ", or unset it to use the first");
}

}  // namespace skyloom::cpu
