// The C++ half of tch-fabric's FFI. Each entry point is wrapped in TF_PROTECT so that no C++
// exception crosses into Rust: the message (without c10's backtrace) is returned as a heap
// string instead.
#include "protect.h"

#include <ATen/ATen.h>
#include <ATen/ScalarOps.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/DefaultDtype.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <set>
#include <tuple>
#include <mutex>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <vector>

namespace {

using tch_fabric_shim::deref;

c10::DeviceType device_type_from(int32_t device_type) {
  switch (device_type) {
    case 0:
      return c10::DeviceType::CPU;
    case 1:
      return c10::DeviceType::CUDA;
    default:
      throw std::invalid_argument("tch-fabric shim: unsupported device type " +
                                  std::to_string(device_type));
  }
}

c10::ScalarType scalar_type_from(int32_t dtype) {
  if (dtype < 0 || dtype >= static_cast<int32_t>(c10::ScalarType::NumOptions)) {
    throw std::invalid_argument("tch-fabric shim: invalid scalar type " + std::to_string(dtype));
  }
  return static_cast<c10::ScalarType>(dtype);
}

std::vector<at::Tensor> to_vector(const tf_tensor *list, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(deref(list[i]));
  return out;
}

// Counting of dispatcher calls on one thread (tf_op_count_begin / _end): every op invocation,
// the top-level ones (made from outside any other op) apart, and each op's self time (its
// own duration less that of the ops it called), as a profiler's "self CPU" column.
struct OpStat {
  std::string name;
  int64_t all = 0;
  int64_t top = 0;
  int64_t self_ns = 0;
};
struct OpFrame {
  size_t index;
  std::chrono::steady_clock::time_point start;
  int64_t children_ns;
};
struct OpCounts {
  std::vector<OpStat> by_name;
  std::vector<OpFrame> open;  // the calls in progress, innermost last
};
thread_local OpCounts *t_counts = nullptr;
thread_local at::CallbackHandle t_count_handle = at::INVALID_CALLBACK_HANDLE;

std::unique_ptr<at::ObserverContext> count_start(const at::RecordFunction &fn) {
  if (t_counts == nullptr) return nullptr;
  std::string name = fn.name();
  auto &list = t_counts->by_name;
  auto it = std::find_if(list.begin(), list.end(), [&](const auto &e) { return e.name == name; });
  if (it == list.end()) {
    list.push_back(OpStat{name});
    it = list.end() - 1;
  }
  it->all += 1;
  if (t_counts->open.empty()) it->top += 1;
  t_counts->open.push_back(
      {static_cast<size_t>(it - list.begin()), std::chrono::steady_clock::now(), 0});
  return nullptr;
}

void count_end(const at::RecordFunction &, at::ObserverContext *) {
  if (t_counts == nullptr || t_counts->open.empty()) return;
  auto frame = t_counts->open.back();
  t_counts->open.pop_back();
  int64_t took = std::chrono::duration_cast<std::chrono::nanoseconds>(
                     std::chrono::steady_clock::now() - frame.start)
                     .count();
  t_counts->by_name[frame.index].self_ns += took - frame.children_ns;
  if (!t_counts->open.empty()) t_counts->open.back().children_ns += took;
}

void fill_meta(const at::Tensor &t, tf_tensor_meta *m) {
  *m = tf_tensor_meta{};
  m->defined = t.defined() ? 1 : 0;
  if (!t.defined()) return;
  m->device_type = static_cast<int32_t>(t.device().type());
  m->device_index = t.device().index();
  m->dtype = static_cast<int32_t>(t.scalar_type());
  m->sparse = t.is_sparse() ? 1 : 0;
  m->contiguous = (!t.is_sparse() && t.is_contiguous()) ? 1 : 0;
  m->numel = t.numel();
  m->impl = reinterpret_cast<uintptr_t>(t.unsafeGetTensorImpl());
  m->data = (!t.is_sparse() && t.has_storage()) ? reinterpret_cast<uintptr_t>(t.data_ptr()) : 0;
}

// Tensor memory on the CPU, counted as CUDA's caching allocator counts it: every byte a CPU
// tensor holds, on any thread, now and at its peak. libtorch keeps no such statistics for the
// CPU, so the process's CPU allocator is wrapped: each allocation takes 64 bytes more from the
// allocator it replaces (c10's alignment, so the data stays aligned), records its size there,
// and counts it until its deleter runs. Data and context stay the same pointer, so the raw
// allocate/deallocate interface works as with the default allocator. Allocations made before
// the wrapper was installed keep their own deleters and are not counted.
class CountingCpuAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHeader = 64;

  explicit CountingCpuAllocator(c10::Allocator *inner)
      : inner_(inner), inner_free_(inner->raw_deleter()) {}

  c10::DataPtr allocate(size_t n) override {
    void *base = inner_->raw_allocate(n + kHeader);
    *static_cast<size_t *>(base) = n;
    add(static_cast<int64_t>(n));
    void *data = static_cast<char *>(base) + kHeader;
    return {data, data, &CountingCpuAllocator::free_counted, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CountingCpuAllocator::free_counted; }

  void copy_data(void *dest, const void *src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t current() const { return current_.load(); }
  int64_t peak() const { return peak_.load(); }
  void reset_peak() { peak_.store(current_.load()); }

  static CountingCpuAllocator *instance;

 private:
  static void free_counted(void *data) {
    if (data == nullptr) return;
    void *base = static_cast<char *>(data) - kHeader;
    instance->add(-static_cast<int64_t>(*static_cast<size_t *>(base)));
    instance->inner_free_(base);
  }

  void add(int64_t n) {
    const int64_t now = current_.fetch_add(n) + n;
    int64_t seen = peak_.load();
    while (now > seen && !peak_.compare_exchange_weak(seen, now)) {
    }
  }

  c10::Allocator *inner_;
  c10::DeleterFnPtr inner_free_;
  std::atomic<int64_t> current_{0};
  std::atomic<int64_t> peak_{0};
};

CountingCpuAllocator *CountingCpuAllocator::instance = nullptr;

}  // namespace

extern "C" {

void tf_free_error(char *err) { free(err); }

char *tf_autocast_available(int32_t device_type, int32_t *out) {
  TF_PROTECT(*out = at::autocast::is_autocast_available(device_type_from(device_type)) ? 1 : 0;)
}

char *tf_autocast_get(int32_t device_type, tf_autocast_state *out) {
  TF_PROTECT({
    auto dt = device_type_from(device_type);
    out->enabled = at::autocast::is_autocast_enabled(dt) ? 1 : 0;
    out->dtype = static_cast<int32_t>(at::autocast::get_autocast_dtype(dt));
    out->cache_enabled = at::autocast::is_autocast_cache_enabled() ? 1 : 0;
  })
}

char *tf_autocast_enter(int32_t device_type, int32_t dtype, int32_t enabled,
                        int32_t cache_enabled, tf_autocast_state *saved) {
  TF_PROTECT({
    // torch.amp.autocast.__enter__: save (cache, enabled, dtype), set enabled, set dtype,
    // increment the nesting counter, then set the cache flag.
    auto dt = device_type_from(device_type);
    auto st = scalar_type_from(dtype);
    tf_autocast_state prev;
    prev.cache_enabled = at::autocast::is_autocast_cache_enabled() ? 1 : 0;
    prev.enabled = at::autocast::is_autocast_enabled(dt) ? 1 : 0;
    prev.dtype = static_cast<int32_t>(at::autocast::get_autocast_dtype(dt));
    at::autocast::set_autocast_enabled(dt, enabled != 0);
    at::autocast::set_autocast_dtype(dt, st);
    at::autocast::increment_nesting();
    at::autocast::set_autocast_cache_enabled(cache_enabled != 0);
    *saved = prev;
  })
}

char *tf_autocast_exit(int32_t device_type, const tf_autocast_state *saved) {
  TF_PROTECT({
    // torch.amp.autocast.__exit__: clear the cast cache when the outermost scope ends, then
    // restore what __enter__ saved.
    auto dt = device_type_from(device_type);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(dt, saved->enabled != 0);
    at::autocast::set_autocast_dtype(dt, scalar_type_from(saved->dtype));
    at::autocast::set_autocast_cache_enabled(saved->cache_enabled != 0);
  })
}

char *tf_default_dtype_get(int32_t *dtype) {
  TF_PROTECT(*dtype = static_cast<int32_t>(c10::get_default_dtype_as_scalartype());)
}

char *tf_default_dtype_set(int32_t dtype) {
  TF_PROTECT({
    auto st = scalar_type_from(dtype);
    // torch.set_default_dtype only accepts floating types; the same rule here.
    if (!c10::isFloatingType(st)) {
      throw std::invalid_argument(std::string("default dtype must be floating, got ") +
                                  c10::toString(st));
    }
    c10::set_default_dtype(caffe2::TypeMeta::fromScalarType(st));
  })
}

char *tf_amp_foreach_non_finite_check_and_unscale(const tf_tensor *grads, size_t n,
                                                  tf_tensor found_inf, tf_tensor inv_scale) {
  TF_PROTECT({
    std::vector<at::Tensor> list = to_vector(grads, n);
    at::Tensor found = deref(found_inf);
    at::_amp_foreach_non_finite_check_and_unscale_(list, found, deref(inv_scale));
  })
}

char *tf_grad_total_norm(const tf_tensor *grads, const size_t *group_sizes, size_t n_groups,
                         double norm_type, tf_tensor *out) {
  TF_PROTECT({
    *out = nullptr;
    std::vector<at::Tensor> norms;
    size_t offset = 0;
    std::optional<c10::Device> first_device;
    for (size_t k = 0; k < n_groups; ++k) {
      auto group = to_vector(grads + offset, group_sizes[k]);
      offset += group_sizes[k];
      if (group.empty()) continue;
      if (!first_device) first_device = group[0].device();
      // PyTorch takes the foreach path on CPU and CUDA (_device_has_foreach_support), whose
      // reductions may sum in another order than linalg.vector_norm: use it too, for the same
      // bits.
      auto type = group[0].device().type();
      if (type == c10::DeviceType::CPU || type == c10::DeviceType::CUDA) {
        auto r = at::_foreach_norm(group, norm_type);
        norms.insert(norms.end(), r.begin(), r.end());
      } else {
        for (auto &g : group) norms.push_back(at::linalg_vector_norm(g, norm_type));
      }
    }
    if (norms.empty()) {
      *out = new at::Tensor(at::zeros({}, at::kFloat));
      return nullptr;
    }
    // PyTorch moves every norm to the first device; where it is there already, to() returns
    // the tensor itself, so skipping the call changes no bit and saves one dispatch per norm.
    for (auto &t : norms) {
      if (t.device() != *first_device) t = t.to(*first_device);
    }
    *out = new at::Tensor(at::linalg_vector_norm(at::stack(norms), norm_type));
  })
}

char *tf_fused_adamw(const tf_tensor *params, const tf_tensor *grads, const tf_tensor *exp_avgs,
                     const tf_tensor *exp_avg_sqs, const tf_tensor *max_exp_avg_sqs,
                     const tf_tensor *state_steps, size_t n, double lr, double beta1,
                     double beta2, double weight_decay, double eps, int32_t amsgrad,
                     int32_t maximize, tf_tensor grad_scale, tf_tensor found_inf) {
  TF_PROTECT({
    auto p = to_vector(params, n), g = to_vector(grads, n), m = to_vector(exp_avgs, n),
         v = to_vector(exp_avg_sqs, n), s = to_vector(state_steps, n);
    std::vector<at::Tensor> vmax = amsgrad ? to_vector(max_exp_avg_sqs, n) : std::vector<at::Tensor>{};
    std::optional<at::Tensor> scale, inf;
    if (grad_scale != nullptr) scale = deref(grad_scale);
    if (found_inf != nullptr) inf = deref(found_inf);
    at::_fused_adamw_(p, g, m, v, vmax, s, lr, beta1, beta2, weight_decay, eps, amsgrad != 0,
                      maximize != 0, scale, inf);
  })
}

char *tf_fused_sgd(const tf_tensor *params, const tf_tensor *grads, const tf_tensor *momentum_buffers,
                   size_t n, double weight_decay, double momentum, double lr, double dampening,
                   int32_t nesterov, int32_t maximize, int32_t is_first_step, tf_tensor grad_scale,
                   tf_tensor found_inf) {
  TF_PROTECT({
    auto p = to_vector(params, n), g = to_vector(grads, n);
    // Without momentum the kernel takes an empty buffer list, as torch.optim.SGD passes it.
    std::vector<at::Tensor> buf = momentum != 0.0 ? to_vector(momentum_buffers, n) : std::vector<at::Tensor>{};
    std::optional<at::Tensor> scale, inf;
    if (grad_scale != nullptr) scale = deref(grad_scale);
    if (found_inf != nullptr) inf = deref(found_inf);
    at::_fused_sgd_(p, g, buf, weight_decay, momentum, lr, dampening, nesterov != 0, maximize != 0,
                    is_first_step != 0, scale, inf);
  })
}

// A Python float handed to an ATen op where its Python signature takes a Tensor
// (`t.mul_(0.9)`, `t / x`, `t.add_(eps)`): the binding wraps it into a 0-dim double tensor
// marked as a wrapped number. On reduced-precision tensors `mul_` rounds differently with it
// than with a C++ Scalar (which the foreach ops pass), so torch.optim's for-loop path is
// reproduced with these, its foreach path with Scalars.
static at::Tensor py_float(double v) {
  at::Tensor t = at::scalar_to_tensor(v);
  t.unsafeGetTensorImpl()->set_wrapped_number(true);
  return t;
}

// The host values of 0-dim step counts (Python's `_get_value(step)`).
static std::vector<double> step_values(const std::vector<at::Tensor> &steps) {
  std::vector<double> out;
  out.reserve(steps.size());
  for (const auto &s : steps) out.push_back(s.item<double>());
  return out;
}

// The stand-ins of a step (see refused_scalars): one parameter per distinct (dtype, device,
// gradient dtype, `extra`: the step count or the fresh-buffer flag), which is all that decides
// whether an op accepts the step's scalars; the first position of each.
static std::vector<size_t> representatives(const std::vector<at::Tensor> &p,
                                           const std::vector<at::Tensor> &g,
                                           const std::function<double(size_t)> &extra) {
  std::set<std::tuple<int, int, int, int, double>> seen;
  std::vector<size_t> out;
  for (size_t i = 0; i < p.size(); ++i) {
    const auto key = std::make_tuple(static_cast<int>(p[i].scalar_type()),
                                     static_cast<int>(p[i].device().type()),
                                     static_cast<int>(p[i].device().index()),
                                     static_cast<int>(g[i].scalar_type()), extra(i));
    if (seen.insert(key).second) out.push_back(i);
  }
  return out;
}

// One-element tensors with the options (dtype, device) of `ts` at `at`: stand-ins that run an
// optimizer's ops with its scalars and change nothing.
static std::vector<at::Tensor> tiny(const std::vector<at::Tensor> &ts, const std::vector<size_t> &at) {
  std::vector<at::Tensor> out;
  if (ts.empty()) return out;
  out.reserve(at.size());
  for (size_t i : at) out.push_back(at::zeros({1}, ts[i].options()));
  return out;
}

// Copies of the (0-dim) step counts at `at`.
static std::vector<at::Tensor> copies(const std::vector<at::Tensor> &ts, const std::vector<size_t> &at) {
  std::vector<at::Tensor> out;
  out.reserve(at.size());
  for (size_t i : at) out.push_back(ts[i].clone());
  return out;
}

static void refused_scalars(const std::function<void()> &probe, double lr) {
  try {
    probe();
  } catch (const std::exception &e) {
    throw std::runtime_error(c10::str("lr = ", lr, " gives a step the parameters' dtype cannot ",
                                      "take (", ::tch_fabric_shim::message_of(e),
                                      "); nothing was changed"));
  }
}

char *tf_adam_for_loop(const tf_tensor *params, const tf_tensor *grads, const tf_tensor *exp_avgs,
                       const tf_tensor *exp_avg_sqs, const tf_tensor *max_exp_avg_sqs,
                       const tf_tensor *state_steps, size_t n, double lr, double beta1,
                       double beta2, double weight_decay, double eps, int32_t amsgrad,
                       int32_t maximize, int32_t decoupled, int32_t foreach) {
  TF_PROTECT({
    auto p = to_vector(params, n), g = to_vector(grads, n), m = to_vector(exp_avgs, n),
         v = to_vector(exp_avg_sqs, n), s = to_vector(state_steps, n);
    std::vector<at::Tensor> vmax = amsgrad ? to_vector(max_exp_avg_sqs, n) : std::vector<at::Tensor>{};
    // Under no_grad, as Optimizer.step runs. The Python floats are C++ doubles, `**` is
    // libm's pow.
    at::NoGradGuard no_grad;
    auto run = [&](std::vector<at::Tensor> &p, std::vector<at::Tensor> &g, std::vector<at::Tensor> &m,
                   std::vector<at::Tensor> &v, std::vector<at::Tensor> &vmax,
                   std::vector<at::Tensor> &s) {
      if (foreach) {
        // torch.optim.adam._multi_tensor_adam (capturable=False), step counts on the CPU.
        std::vector<at::Tensor> gs = maximize ? at::_foreach_neg(g) : g;
        at::_foreach_add_(s, at::scalar_tensor(1.0, at::kFloat), 1.0);
        if (weight_decay != 0) {
          if (decoupled) {
            at::_foreach_mul_(p, 1 - lr * weight_decay);
          } else if (maximize) {
            at::_foreach_add_(gs, p, weight_decay);
          } else {
            gs = at::_foreach_add(gs, p, weight_decay);
          }
        }
        at::_foreach_lerp_(m, gs, 1 - beta1);
        at::_foreach_mul_(v, beta2);
        at::_foreach_addcmul_(v, gs, gs, 1 - beta2);
        std::vector<at::Scalar> step_size, bias_correction2_sqrt;
        for (double step : step_values(s)) {
          const double bias_correction1 = 1 - std::pow(beta1, step);
          const double bias_correction2 = 1 - std::pow(beta2, step);
          step_size.emplace_back((lr / bias_correction1) * -1);
          bias_correction2_sqrt.emplace_back(std::pow(bias_correction2, 0.5));
        }
        std::vector<at::Tensor> denom;
        if (amsgrad) {
          at::_foreach_maximum_(vmax, v);
          denom = at::_foreach_sqrt(vmax);
        } else {
          denom = at::_foreach_sqrt(v);
        }
        at::_foreach_div_(denom, bias_correction2_sqrt);
        at::_foreach_add_(denom, eps);
        at::_foreach_addcdiv_(p, m, denom, step_size);
        return;
      }
      // torch.optim.adam._single_tensor_adam (capturable=False, differentiable=False), op for op.
      for (size_t i = 0; i < p.size(); ++i) {
        at::Tensor &param = p[i];
        at::Tensor grad = maximize ? g[i].neg() : g[i];
        s[i].add_(1);
        if (weight_decay != 0) {
          if (decoupled) {
            param.mul_(py_float(1 - lr * weight_decay));
          } else {
            grad = grad.add(param, weight_decay);
          }
        }
        m[i].lerp_(grad, 1 - beta1);
        v[i].mul_(py_float(beta2)).addcmul_(grad, grad, 1 - beta2);
        const double step = s[i].item<double>();
        const double bias_correction1 = 1 - std::pow(beta1, step);
        const double bias_correction2 = 1 - std::pow(beta2, step);
        const double step_size = lr / bias_correction1;
        const double bias_correction2_sqrt = std::pow(bias_correction2, 0.5);
        at::Tensor denom;
        if (amsgrad) {
          at::maximum_out(vmax[i], vmax[i], v[i]);
          denom = vmax[i].sqrt().div(py_float(bias_correction2_sqrt)).add_(py_float(eps));
        } else {
          denom = v[i].sqrt().div(py_float(bias_correction2_sqrt)).add_(py_float(eps));
        }
        param.addcdiv_(m[i], denom, -step_size);
      }
    };
    // The same step on one-element stand-ins first: an op that refuses its scalars (a step
    // size beyond the dtype's range: "value cannot be converted ... without overflow") fails
    // there, before any parameter or state changed.
    const auto steps = step_values(s);
    const auto at = representatives(p, g, [&](size_t i) { return steps[i]; });
    auto tp = tiny(p, at), tg = tiny(g, at), tm = tiny(m, at), tv = tiny(v, at),
         tvmax = tiny(vmax, at);
    auto ts = copies(s, at);
    refused_scalars([&] { run(tp, tg, tm, tv, tvmax, ts); }, lr);
    run(p, g, m, v, vmax, s);
  })
}

char *tf_sgd_for_loop(const tf_tensor *params, const tf_tensor *grads, const tf_tensor *momentum_buffers,
                      const int32_t *fresh, size_t n, double weight_decay, double momentum,
                      double lr, double dampening, int32_t nesterov, int32_t maximize,
                      int32_t foreach) {
  TF_PROTECT({
    auto p = to_vector(params, n), g = to_vector(grads, n);
    std::vector<at::Tensor> buf = momentum != 0.0 ? to_vector(momentum_buffers, n) : std::vector<at::Tensor>{};
    // A fresh buffer (PyTorch's `grad.detach().clone()`) was made by the caller and
    // receives the gradient's values.
    at::NoGradGuard no_grad;
    auto run = [&](std::vector<at::Tensor> &p, std::vector<at::Tensor> &g,
                   std::vector<at::Tensor> &buf, const std::vector<int32_t> &fresh) {
      if (foreach) {
        // torch.optim.sgd._multi_tensor_sgd (dense gradients). As there, Nesterov adds into the
        // gradient list in place, which is the parameters' own gradients when neither maximize
        // nor weight decay made copies.
        std::vector<at::Tensor> gs = maximize ? at::_foreach_neg(g) : g;
        if (weight_decay != 0) {
          if (maximize) {
            at::_foreach_add_(gs, p, weight_decay);
          } else {
            gs = at::_foreach_add(gs, p, weight_decay);
          }
        }
        if (momentum != 0) {
          const bool all_old =
              std::none_of(fresh.begin(), fresh.end(), [](int32_t f) { return f != 0; });
          if (all_old) {
            at::_foreach_mul_(buf, momentum);
            at::_foreach_add_(buf, gs, 1 - dampening);
          } else {
            for (size_t i = 0; i < p.size(); ++i) {
              if (fresh[i] != 0) {
                buf[i].copy_(gs[i]);
              } else {
                buf[i].mul_(py_float(momentum)).add_(gs[i], 1 - dampening);
              }
            }
          }
          if (nesterov) {
            at::_foreach_add_(gs, buf, momentum);
          } else {
            gs = buf;
          }
        }
        at::_foreach_add_(p, gs, -lr);
        return;
      }
      // torch.optim.sgd._single_tensor_sgd, op for op.
      for (size_t i = 0; i < p.size(); ++i) {
        at::Tensor grad = maximize ? g[i].neg() : g[i];
        if (weight_decay != 0) grad = grad.add(p[i], weight_decay);
        if (momentum != 0) {
          if (fresh[i] != 0) {
            buf[i].copy_(grad);
          } else {
            buf[i].mul_(py_float(momentum)).add_(grad, 1 - dampening);
          }
          grad = nesterov ? grad.add(buf[i], momentum) : buf[i];
        }
        p[i].add_(grad, -lr);
      }
    };
    // One-element stand-ins first, as in tf_adam_for_loop: a refused scalar fails there.
    const std::vector<int32_t> all_fresh(fresh, fresh + n);
    const auto at = representatives(p, g, [&](size_t i) { return all_fresh[i]; });
    auto tp = tiny(p, at), tg = tiny(g, at), tbuf = tiny(buf, at);
    std::vector<int32_t> tfresh;
    for (size_t i : at) tfresh.push_back(all_fresh[i]);
    refused_scalars([&] { run(tp, tg, tbuf, tfresh); }, lr);
    run(p, g, buf, all_fresh);
  })
}

char *tf_foreach_add_scalar(const tf_tensor *tensors, size_t n, double value) {
  TF_PROTECT({
    auto list = to_vector(tensors, n);
    if (!list.empty() && list[0].is_cpu()) {
      // As torch.optim does for CPU step counts: a 0-dim tensor as the addend, so that the
      // per-tensor fallback calls add_ once per tensor instead of wrapping the scalar into a
      // tensor first (two ops per tensor). Made once and never freed (no destruction order
      // to get wrong at exit); only ever read.
      static const at::Tensor *one = new at::Tensor(at::scalar_tensor(1.0, at::kFloat));
      at::_foreach_add_(list, *one, value);
    } else {
      at::_foreach_add_(list, value);
    }
  })
}

char *tf_foreach_sub_tensor(const tf_tensor *tensors, size_t n, tf_tensor other) {
  TF_PROTECT({
    auto list = to_vector(tensors, n);
    // torch.optim's fused step: torch._foreach_sub_(steps, [found_inf] * len(steps)).
    std::vector<at::Tensor> others(n, deref(other));
    at::_foreach_sub_(list, others);
  })
}

char *tf_foreach_mul_tensor(const tf_tensor *tensors, size_t n, tf_tensor other) {
  TF_PROTECT({
    auto list = to_vector(tensors, n);
    at::_foreach_mul_(list, deref(other));
  })
}

char *tf_foreach_clamp(const tf_tensor *tensors, size_t n, double min, double max) {
  TF_PROTECT({
    auto list = to_vector(tensors, n);
    at::_foreach_clamp_min_(list, min);
    at::_foreach_clamp_max_(list, max);
  })
}

char *tf_tensor_meta_list(const tf_tensor *tensors, size_t n, tf_tensor_meta *out) {
  TF_PROTECT({
    for (size_t i = 0; i < n; ++i) fill_meta(deref(tensors[i]), &out[i]);
  })
}

char *tf_collect_grads(const tf_tensor *params, size_t n, tf_tensor *grads, tf_tensor_meta *meta,
                       tf_tensor_meta *param_meta) {
  TF_PROTECT({
    for (size_t i = 0; i < n; ++i) grads[i] = nullptr;
    try {
      for (size_t i = 0; i < n; ++i) {
        if (param_meta != nullptr) fill_meta(deref(params[i]), &param_meta[i]);
        const at::Tensor &g = deref(params[i]).grad();
        fill_meta(g, &meta[i]);
        if (g.defined()) grads[i] = new at::Tensor(g);
      }
    } catch (...) {
      for (size_t i = 0; i < n; ++i) delete static_cast<at::Tensor *>(grads[i]);
      for (size_t i = 0; i < n; ++i) grads[i] = nullptr;
      throw;
    }
  })
}

char *tf_struct_layouts(size_t *out, size_t n) {
  TF_PROTECT({
    const size_t layouts[] = {
        sizeof(tf_autocast_state),
        offsetof(tf_autocast_state, enabled),
        offsetof(tf_autocast_state, dtype),
        offsetof(tf_autocast_state, cache_enabled),
        sizeof(tf_tensor_meta),
        offsetof(tf_tensor_meta, defined),
        offsetof(tf_tensor_meta, device_type),
        offsetof(tf_tensor_meta, device_index),
        offsetof(tf_tensor_meta, dtype),
        offsetof(tf_tensor_meta, sparse),
        offsetof(tf_tensor_meta, contiguous),
        offsetof(tf_tensor_meta, numel),
        offsetof(tf_tensor_meta, impl),
        offsetof(tf_tensor_meta, data),
        sizeof(tf_ivalue_info),
        offsetof(tf_ivalue_info, tag),
        offsetof(tf_ivalue_info, int_value),
        offsetof(tf_ivalue_info, double_value),
        offsetof(tf_ivalue_info, len),
    };
    const size_t count = sizeof(layouts) / sizeof(layouts[0]);
    if (n > count) throw std::invalid_argument("tf_struct_layouts knows " + std::to_string(count) + " values, not " + std::to_string(n));
    for (size_t i = 0; i < n; ++i) out[i] = layouts[i];
  })
}

char *tf_load_cuda(int32_t *loaded) {
  TF_PROTECT({
    *loaded = 0;
    // libtorch_cuda.so registers CUDA with libtorch when it is loaded. A binary linked with
    // --as-needed (a dependent crate's, by default) drops it, so load it by hand from the
    // folder of the libtorch_cpu.so this process uses.
    Dl_info info;
    if (dladdr(reinterpret_cast<void *>(&at::globalContext), &info) != 0 && info.dli_fname) {
      std::string path(info.dli_fname);
      auto slash = path.rfind('/');
      std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
      void *handle = dlopen((dir + "libtorch_cuda.so").c_str(), RTLD_NOW | RTLD_GLOBAL);
      *loaded = handle != nullptr ? 1 : 0;
    }
  })
}

char *tf_op_has_kernel(const char *name, int32_t device_type, int32_t *out) {
  TF_PROTECT({
    *out = 0;
    if (name == nullptr) throw std::invalid_argument("tch-fabric shim: null op name");
    auto op = c10::Dispatcher::singleton().findOp(c10::OperatorName(name, ""));
    if (op) {
      auto key = device_type_from(device_type) == c10::DeviceType::CUDA ? c10::DispatchKey::CUDA
                                                                         : c10::DispatchKey::CPU;
      *out = op->hasKernelForDispatchKey(key) ? 1 : 0;
    }
  })
}

// The allocator is reached through c10's generic `DeviceAllocator` interface (exported by
// libc10), not `c10::cuda::CUDACachingAllocator`: no link to libc10_cuda is needed, so a CPU
// build of the crate also reads the statistics on a GPU machine once libtorch_cuda is loaded.
static c10::DeviceAllocator *cuda_allocator(int32_t device_index) {
  if (device_index < 0 || device_index > std::numeric_limits<c10::DeviceIndex>::max()) {
    throw std::invalid_argument("tch-fabric shim: invalid CUDA device index " +
                                std::to_string(device_index));
  }
  return c10::getDeviceAllocator(c10::DeviceType::CUDA);
}

char *tf_cuda_memory_stats(int32_t device_index, int64_t out[4]) {
  TF_PROTECT({
    auto stats = cuda_allocator(device_index)
                     ->getDeviceStats(static_cast<c10::DeviceIndex>(device_index));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[all].current;
    out[1] = stats.allocated_bytes[all].peak;
    out[2] = stats.reserved_bytes[all].current;
    out[3] = stats.reserved_bytes[all].peak;
  })
}

char *tf_cpu_counting_enable(void) {
  TF_PROTECT({
    static std::mutex lock;
    std::lock_guard<std::mutex> guard(lock);
    if (CountingCpuAllocator::instance != nullptr) return nullptr;
    c10::Allocator *inner = c10::GetCPUAllocator();
    // The wrapper allocates through the raw interface, which needs a deleter of the raw
    // pointer and a context that is the data itself (c10's default allocator has both).
    bool raw_ok = inner->raw_deleter() != nullptr;
    if (raw_ok) {
      c10::DataPtr probe = inner->allocate(64);
      raw_ok = probe.get() == probe.get_context();
    }
    if (!raw_ok) {
      throw std::runtime_error(
          "the CPU allocator of this process does not hand out raw pointers (no raw deleter, "
          "or a context apart from the data), so tch-fabric cannot count the memory of CPU "
          "tensors");
    }
    // Never freed: tensors counted by it may outlive everything else.
    CountingCpuAllocator::instance = new CountingCpuAllocator(inner);
    c10::SetCPUAllocator(CountingCpuAllocator::instance, std::numeric_limits<uint8_t>::max());
    if (c10::GetCPUAllocator() != CountingCpuAllocator::instance) {
      throw std::runtime_error("libtorch kept its own CPU allocator");
    }
  })
}

char *tf_cpu_counting_stats(int64_t out[3]) {
  TF_PROTECT({
    const auto *a = CountingCpuAllocator::instance;
    out[0] = a != nullptr ? 1 : 0;
    out[1] = a != nullptr ? a->current() : 0;
    out[2] = a != nullptr ? a->peak() : 0;
  })
}

char *tf_cpu_counting_reset_peak(void) {
  TF_PROTECT({
    if (CountingCpuAllocator::instance != nullptr) CountingCpuAllocator::instance->reset_peak();
  })
}

char *tf_cuda_reset_peak_memory_stats(int32_t device_index) {
  TF_PROTECT({
    cuda_allocator(device_index)->resetPeakStats(static_cast<c10::DeviceIndex>(device_index));
  })
}

char *tf_grads_set_to_none(const tf_tensor *params, size_t n) {
  TF_PROTECT({
    for (size_t i = 0; i < n; ++i) {
      at::Tensor p = deref(params[i]);
      p.mutable_grad().reset();
    }
  })
}

char *tf_unscale_sumsq(const tf_tensor *grads, size_t n, tf_tensor found_inf, tf_tensor inv_scale,
                       int32_t unscale, tf_tensor *out) {
  TF_PROTECT({
    *out = nullptr;
    static const auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("tch_fabric::unscale_sumsq_", "")
                         .typed<at::Tensor(at::TensorList, at::Tensor &, const at::Tensor &, bool)>();
    auto list = to_vector(grads, n);
    at::Tensor found = deref(found_inf);
    *out = new at::Tensor(op.call(list, found, deref(inv_scale), unscale != 0));
  })
}

char *tf_adamw_folded(const tf_tensor *params, const tf_tensor *grads, const tf_tensor *exp_avgs,
                      const tf_tensor *exp_avg_sqs, const tf_tensor *state_steps, size_t n,
                      double lr, double beta1, double beta2, double weight_decay, double eps,
                      int32_t maximize, tf_tensor divisor, tf_tensor found_inf) {
  TF_PROTECT({
    static const auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("tch_fabric::adamw_folded_", "")
                         .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                     at::TensorList, double, double, double, double, double, bool,
                                     const at::Tensor &, const at::Tensor &)>();
    op.call(to_vector(params, n), to_vector(grads, n), to_vector(exp_avgs, n),
            to_vector(exp_avg_sqs, n), to_vector(state_steps, n), lr, beta1, beta2, weight_decay,
            eps, maximize != 0, deref(divisor), deref(found_inf));
  })
}

// The rounded steps (csrc/rounding.cpp). Each list has n entries, or the count given beside it
// (0 where the step does not use it).
char *tf_adamw_rounded(const tf_tensor *params, const tf_tensor *grads, const tf_tensor *exp_avgs,
                       const tf_tensor *exp_avg_sqs, const tf_tensor *max_exp_avg_sqs,
                       size_t n_max, const tf_tensor *kahan_comps, size_t n_comps,
                       const tf_tensor *state_steps, const int64_t *positions, size_t n, double lr,
                       double beta1, double beta2, double weight_decay, double eps,
                       int32_t maximize, int64_t mode, uint64_t seed, tf_tensor grad_scale,
                       tf_tensor found_inf) {
  TF_PROTECT({
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("tch_fabric::adamw_rounded_", "")
            .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                        at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef, double,
                        double, double, double, double, bool, int64_t, int64_t,
                        const std::optional<at::Tensor> &, const std::optional<at::Tensor> &)>();
    std::optional<at::Tensor> scale, inf;
    if (grad_scale != nullptr) scale = deref(grad_scale);
    if (found_inf != nullptr) inf = deref(found_inf);
    op.call(to_vector(params, n), to_vector(grads, n), to_vector(exp_avgs, n),
            to_vector(exp_avg_sqs, n), to_vector(max_exp_avg_sqs, n_max),
            to_vector(kahan_comps, n_comps), to_vector(state_steps, n),
            at::IntArrayRef(positions, n), lr, beta1, beta2, weight_decay, eps, maximize != 0,
            mode, static_cast<int64_t>(seed), scale, inf);
  })
}

char *tf_sgd_rounded(const tf_tensor *params, const tf_tensor *grads,
                     const tf_tensor *momentum_buffers, size_t n_buffers,
                     const tf_tensor *kahan_comps, size_t n_comps, const tf_tensor *state_steps,
                     size_t n_steps, const int64_t *positions, size_t n, double lr,
                     double weight_decay, double momentum, double dampening, int32_t nesterov,
                     int32_t maximize, int32_t is_first_step, int64_t mode, uint64_t seed,
                     tf_tensor grad_scale, tf_tensor found_inf) {
  TF_PROTECT({
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("tch_fabric::sgd_rounded_", "")
            .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                        at::TensorList, at::IntArrayRef, double, double, double, double, bool, bool,
                        bool, int64_t, int64_t, const std::optional<at::Tensor> &,
                        const std::optional<at::Tensor> &)>();
    std::optional<at::Tensor> scale, inf;
    if (grad_scale != nullptr) scale = deref(grad_scale);
    if (found_inf != nullptr) inf = deref(found_inf);
    op.call(to_vector(params, n), to_vector(grads, n), to_vector(momentum_buffers, n_buffers),
            to_vector(kahan_comps, n_comps), to_vector(state_steps, n_steps),
            at::IntArrayRef(positions, n), lr, weight_decay, momentum, dampening, nesterov != 0,
            maximize != 0, is_first_step != 0, mode, static_cast<int64_t>(seed), scale, inf);
  })
}

char *tf_stochastic_round(tf_tensor x, uint64_t seed, uint32_t position, uint32_t step,
                          tf_tensor *out) {
  TF_PROTECT({
    *out = nullptr;
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("tch_fabric::stochastic_round", "")
            .typed<at::Tensor(const at::Tensor &, int64_t, int64_t, int64_t)>();
    *out = new at::Tensor(op.call(deref(x), static_cast<int64_t>(seed), position, step));
  })
}

char *tf_clip_divisor(tf_tensor sumsq, tf_tensor scale, double max_norm, tf_tensor *norm,
                      tf_tensor *divisor) {
  TF_PROTECT({
    *norm = nullptr;
    *divisor = nullptr;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("tch_fabric::clip_divisor", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(
                                   const at::Tensor &, const at::Tensor &, double)>();
    auto [n, d] = op.call(deref(sumsq), deref(scale), max_norm);
    *norm = new at::Tensor(n);
    *divisor = new at::Tensor(d);
  })
}

char *tf_op_count_begin() {
  TF_PROTECT({
    if (t_counts != nullptr) throw std::runtime_error("op counting is already on for this thread");
    t_counts = new OpCounts();
    t_count_handle = at::addThreadLocalCallback(
        at::RecordFunctionCallback(&count_start, &count_end).scopes({at::RecordScope::FUNCTION}));
  })
}

char *tf_op_count_end(char **report) {
  TF_PROTECT({
    *report = nullptr;
    if (t_counts == nullptr) throw std::runtime_error("op counting is not on for this thread");
    at::removeCallback(t_count_handle);
    t_count_handle = at::INVALID_CALLBACK_HANDLE;
    std::string out;
    for (const auto &e : t_counts->by_name) {
      out += e.name + "\t" + std::to_string(e.all) + "\t" + std::to_string(e.top) + "\t" +
             std::to_string(e.self_ns) + "\n";
    }
    delete t_counts;
    t_counts = nullptr;
    *report = strdup(out.c_str());
  })
}

}  // extern "C"
