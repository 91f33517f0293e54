// Build-time check (build_gloo.rs) that the ProcessGroupGloo.hpp dist.cpp compiles against,
// with the system's Gloo headers (Debian's libgloo-dev), lays the classes out as this
// libtorch's libtorch_cpu.so does. libtorch is built with its own Gloo copy; a header that
// disagrees would make `new` allocate too little, or put Options' fields where the library
// does not read them, silently. Exit status 0 means the layouts agree; otherwise the reason is
// printed.
//
// - Options: the library's create_default() builds one (library code, library layout); the
//   header's inline members must read its defaults back.
// - Both classes: constructed by the library's exported constructors inside a buffer that is
//   larger than the header's sizeof and filled with a pattern; a library object larger than the
//   header says would write past sizeof, into the pattern.
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <cstdio>
#include <cstring>
#include <new>

namespace {

constexpr size_t kSlack = 4096;
constexpr unsigned char kPattern = 0xA5;

template <typename T>
struct Canary {
  alignas(alignof(std::max_align_t)) unsigned char bytes[sizeof(T) + kSlack];
  Canary() { std::memset(bytes, kPattern, sizeof bytes); }
  T *at() { return reinterpret_cast<T *>(bytes); }
  bool untouched() const {
    for (size_t i = sizeof(T); i < sizeof bytes; ++i) {
      if (bytes[i] != kPattern) return false;
    }
    return true;
  }
};

int fail(const char *what) {
  std::fprintf(stderr, "ProcessGroupGloo layout probe: %s\n", what);
  return 1;
}

}  // namespace

int main() {
  using c10d::ProcessGroupGloo;
  try {
    auto made = ProcessGroupGloo::Options::create_default(std::chrono::milliseconds(1234));
    if (made->timeout != std::chrono::milliseconds(1234) || made->devices.size() != 1 ||
        made->threads <= 0 || made->threads > 4096) {
      return fail("Options made by the library do not read back through the header");
    }

    auto *options_canary = new Canary<ProcessGroupGloo::Options>();
    auto *options = new (options_canary->at()) ProcessGroupGloo::Options(std::chrono::milliseconds(99));
    if (!options_canary->untouched()) return fail("Options is larger in the library than in the header");
    if (options->timeout != std::chrono::milliseconds(99) || options->threads != 2) {
      return fail("Options' fields are not where the library writes them");
    }
    options->devices.push_back(ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    c10::intrusive_ptr<ProcessGroupGloo::Options> owned =
        c10::intrusive_ptr<ProcessGroupGloo::Options>::unsafe_steal_from_new(options);
    owned->threads = 1;

    auto store = c10::make_intrusive<c10d::HashStore>();
    auto *group_canary = new Canary<ProcessGroupGloo>();
    auto *group = new (group_canary->at()) ProcessGroupGloo(store, 0, 1, owned);
    if (!group_canary->untouched()) {
      return fail("ProcessGroupGloo is larger in the library than in the header");
    }
    if (group->getRank() != 0 || group->getSize() != 1 || group->getNumThreads() != 1) {
      return fail("ProcessGroupGloo's fields are not where the library writes them");
    }
    // The objects live in the canaries' buffers: destroyed, not deleted. (The options are
    // leaked on purpose: `unsafe_steal_from_new` made the refcount own memory inside a canary.)
    group->~ProcessGroupGloo();
    owned.release();
    std::printf("ok: sizeof(ProcessGroupGloo) %zu, sizeof(Options) %zu\n", sizeof(ProcessGroupGloo),
                sizeof(ProcessGroupGloo::Options));
    return 0;
  } catch (const std::exception &e) {
    return fail(e.what());
  }
}
