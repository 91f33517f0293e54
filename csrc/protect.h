// What every C entry point of the shim needs so that no C++ exception crosses into Rust (which
// would abort the process): tensor handles checked for null, and TF_PROTECT_WITH, which runs a
// body and turns any exception into a heap string for Rust to free. Shared by shim.cpp and
// dist.cpp.
#pragma once

#include "tch_fabric.h"

#include <ATen/ATen.h>

#include <cstring>
#include <exception>
#include <stdexcept>

namespace tch_fabric_shim {

inline char *dup_message(const char *msg) {
  return strdup(msg == nullptr ? "unknown C++ error" : msg);
}

inline const at::Tensor &deref(tf_tensor t) {
  if (t == nullptr) throw std::invalid_argument("tch-fabric shim: null tensor");
  return *static_cast<at::Tensor *>(t);
}

}  // namespace tch_fabric_shim

// Runs the body (variadic, so that it may contain commas in template arguments) and returns
// nullptr, or the text MESSAGE(e) of a std::exception (c10::Error derives from it), or
// "unknown C++ error" for anything else.
#define TF_PROTECT_WITH(MESSAGE, ...)                           \
  try {                                                         \
    __VA_ARGS__                                                 \
    return nullptr;                                             \
  } catch (const std::exception &e) {                           \
    return ::tch_fabric_shim::dup_message(MESSAGE(e));          \
  } catch (...) {                                               \
    return ::tch_fabric_shim::dup_message(nullptr);             \
  }
