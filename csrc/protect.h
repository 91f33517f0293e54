// What every C entry point of the shim needs so that no C++ exception crosses into Rust (which
// would abort the process): tensor handles checked for null, and TF_PROTECT, which runs a body
// and turns any exception into a heap string for Rust to free. Shared by shim.cpp and dist.cpp.
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

// c10's what() carries a C++ backtrace of dozens of frames; users need the message.
inline const char *message_of(const std::exception &e) {
  if (const auto *c10_error = dynamic_cast<const c10::Error *>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

}  // namespace tch_fabric_shim

// Runs the body (variadic, so that it may contain commas in template arguments) and returns
// nullptr, or the message of a std::exception (c10::Error derives from it) without c10's
// backtrace, or "unknown C++ error" for anything else.
#define TF_PROTECT(...)                                                  \
  try {                                                                  \
    __VA_ARGS__                                                          \
    return nullptr;                                                      \
  } catch (const std::exception &e) {                                    \
    return ::tch_fabric_shim::dup_message(::tch_fabric_shim::message_of(e)); \
  } catch (...) {                                                        \
    return ::tch_fabric_shim::dup_message(nullptr);                      \
  }
