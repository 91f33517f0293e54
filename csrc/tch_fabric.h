/* The C interface between tch-fabric's Rust code (src/ffi.rs) and libtorch.
 *
 * Conventions:
 * - Every function returns NULL on success, or a heap-allocated error message that the caller
 *   releases with tf_free_error. No C++ exception ever leaves these functions.
 * - A `tf_tensor` is the `at::Tensor*` that a tch `Tensor` wraps (tch's `C_tensor`).
 * - Device types and scalar types are c10's integers (DeviceType: CPU=0, CUDA=1;
 *   ScalarType: Half=5, Float=6, Double=7, BFloat16=15), not tch's.
 */
#ifndef TCH_FABRIC_H
#define TCH_FABRIC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef void *tf_tensor;

/* Autocast state of one device type on the calling thread. */
typedef struct {
  int32_t enabled;
  int32_t dtype;
  int32_t cache_enabled;
} tf_autocast_state;

/* What Rust needs to know about a tensor, read in one call (tch's accessors panic on an
 * undefined tensor and take one call each). For an undefined tensor only `defined` (0) is set.
 * device_type and dtype are c10's numbers; impl identifies the TensorImpl (shallow copies of
 * one tensor share it); data is the address of its first element (0 without storage): two
 * tensors with the same data, shape and dtype are the same values (tied weights in a file). */
typedef struct {
  int32_t defined;
  int32_t device_type;
  int32_t device_index;
  int32_t dtype;
  int32_t sparse;
  int32_t contiguous;
  int64_t numel;
  uintptr_t impl;
  uintptr_t data;
} tf_tensor_meta;

void tf_free_error(char *err);

/* Metadata of n tensors into out[0..n]. */
char *tf_tensor_meta_list(const tf_tensor *tensors, size_t n, tf_tensor_meta *out);
/* The gradients of n parameters: grads[i] receives a new tensor (tch frees it) or NULL when the
 * parameter has no gradient, meta[i] its metadata, param_meta[i] (when not NULL) the
 * parameter's own. On error nothing is allocated. */
char *tf_collect_grads(const tf_tensor *params, size_t n, tf_tensor *grads, tf_tensor_meta *meta,
                       tf_tensor_meta *param_meta);
/* The layout of the structs above as this compiler lays them out, for the Rust mirrors' check:
 * sizeof and offsetof of each field, in declaration order, tf_autocast_state (4 values), then
 * tf_tensor_meta (10), then tf_ivalue_info (5). n must be at most 19. */
char *tf_struct_layouts(size_t *out, size_t n);
/* Loads libtorch_cuda.so from the folder of the process's libtorch_cpu.so, so that CUDA is
 * registered even in a binary whose linker dropped it (--as-needed). *loaded is 1 when it is
 * loaded now (or was already), 0 when there is none (a CPU-only libtorch). */
char *tf_load_cuda(int32_t *loaded);
/* Whether the dispatcher has a kernel of op `name` (e.g. "tch_fabric::unscale_sumsq_") for a
 * device type (0 = CPU, 1 = CUDA); 0 too when the op is unknown. */
char *tf_op_has_kernel(const char *name, int32_t device_type, int32_t *out);

/* The caching allocator's statistics for CUDA device `device_index` (bytes, all pools
 * together): out[0] allocated now, out[1] peak allocated, out[2] reserved now, out[3] peak
 * reserved. Needs CUDA registered (libtorch_cuda loaded) and a valid device index. */
char *tf_cuda_memory_stats(int32_t device_index, int64_t out[4]);
/* Counts the memory of CPU tensors from now on, on every thread: wraps the process's CPU
 * allocator (once; later calls do nothing). */
char *tf_cpu_counting_enable(void);
/* out[0]: 1 when counting, out[1] bytes CPU tensors hold now, out[2] the peak of out[1] since
 * counting started or the last reset. */
char *tf_cpu_counting_stats(int64_t out[3]);
/* Starts the peak over from the current bytes. */
char *tf_cpu_counting_reset_peak(void);
/* Resets the caching allocator's peak statistics of CUDA device `device_index`. */
char *tf_cuda_reset_peak_memory_stats(int32_t device_index);

/* Whether libtorch has an autocast implementation for this device type. */
char *tf_autocast_available(int32_t device_type, int32_t *out);
/* Reads the current thread's autocast state for a device type. */
char *tf_autocast_get(int32_t device_type, tf_autocast_state *out);
/* Enters an autocast scope in PyTorch's order, writing the state to restore into *saved. */
char *tf_autocast_enter(int32_t device_type, int32_t dtype, int32_t enabled,
                        int32_t cache_enabled, tf_autocast_state *saved);
/* Leaves a scope: clears the cast cache when the outermost scope ends, restores *saved. */
char *tf_autocast_exit(int32_t device_type, const tf_autocast_state *saved);

/* The process-wide default floating dtype (torch.get_default_dtype / set_default_dtype). */
char *tf_default_dtype_get(int32_t *dtype);
char *tf_default_dtype_set(int32_t dtype);

/* torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale): one call for
 * the whole list. */
char *tf_amp_foreach_non_finite_check_and_unscale(const tf_tensor *grads, size_t n,
                                                  tf_tensor found_inf, tf_tensor inv_scale);

/* torch.nn.utils.get_total_norm(grads, norm_type) over gradients already grouped by (device,
 * dtype): `grads` holds the groups one after another, group k has group_sizes[k] tensors.
 * Per-tensor norms (torch._foreach_norm per group on CPU and CUDA, linalg.vector_norm
 * elsewhere, as PyTorch picks), stacked on the first gradient's device, then their norm.
 * *out receives a new tensor (tch frees it). No gradients give 0. */
char *tf_grad_total_norm(const tf_tensor *grads, const size_t *group_sizes, size_t n_groups,
                         double norm_type, tf_tensor *out);

/* torch._fused_adamw_ over n parameters (max_exp_avg_sqs has n entries when amsgrad, else
 * it is ignored). grad_scale and found_inf may be NULL. */
char *tf_fused_adamw(const tf_tensor *params, const tf_tensor *grads, const tf_tensor *exp_avgs,
                     const tf_tensor *exp_avg_sqs, const tf_tensor *max_exp_avg_sqs,
                     const tf_tensor *state_steps, size_t n, double lr, double beta1,
                     double beta2, double weight_decay, double eps, int32_t amsgrad,
                     int32_t maximize, tf_tensor grad_scale, tf_tensor found_inf);

/* torch._fused_sgd_ over n parameters (momentum_buffers is read only when momentum != 0).
 * grad_scale and found_inf may be NULL. */
char *tf_fused_sgd(const tf_tensor *params, const tf_tensor *grads, const tf_tensor *momentum_buffers,
                   size_t n, double weight_decay, double momentum, double lr, double dampening,
                   int32_t nesterov, int32_t maximize, int32_t is_first_step, tf_tensor grad_scale,
                   tf_tensor found_inf);

/* torch.optim.Adam / AdamW without fused=True: _single_tensor_adam, or _multi_tensor_adam when
 * foreach != 0, the same ATen ops in the same order. state_steps are 0-dim CPU tensors;
 * max_exp_avg_sqs is read only with amsgrad; decoupled selects AdamW's decay. */
char *tf_adam_for_loop(const tf_tensor *params, const tf_tensor *grads, const tf_tensor *exp_avgs,
                       const tf_tensor *exp_avg_sqs, const tf_tensor *max_exp_avg_sqs,
                       const tf_tensor *state_steps, size_t n, double lr, double beta1,
                       double beta2, double weight_decay, double eps, int32_t amsgrad,
                       int32_t maximize, int32_t decoupled, int32_t foreach);
/* torch.optim.SGD without fused=True: _single_tensor_sgd, or _multi_tensor_sgd when
 * foreach != 0. momentum_buffers is read only when momentum != 0; fresh[i] != 0 marks a
 * buffer made for this step (it takes the gradient). */
char *tf_sgd_for_loop(const tf_tensor *params, const tf_tensor *grads, const tf_tensor *momentum_buffers,
                      const int32_t *fresh, size_t n, double weight_decay, double momentum,
                      double lr, double dampening, int32_t nesterov, int32_t maximize,
                      int32_t foreach);

/* torch._foreach_add_(tensors, value) and torch._foreach_sub_(tensors, [other] * n): the
 * step-count bookkeeping of fused optimizers, kept on the device. */
char *tf_foreach_add_scalar(const tf_tensor *tensors, size_t n, double value);
char *tf_foreach_sub_tensor(const tf_tensor *tensors, size_t n, tf_tensor other);
/* torch._foreach_mul_(tensors, other) with a 0-dim tensor: clip_grad_norm_'s scaling. */
char *tf_foreach_mul_tensor(const tf_tensor *tensors, size_t n, tf_tensor other);
/* torch._foreach_clamp_min_ then _foreach_clamp_max_: clip_grad_value_. */
char *tf_foreach_clamp(const tf_tensor *tensors, size_t n, double min, double max);

/* Optimizer.zero_grad(set_to_none=True): every gradient becomes undefined (its memory is freed
 * until the next backward allocates it again). */
char *tf_grads_set_to_none(const tf_tensor *params, size_t n);

/* tch_fabric::unscale_sumsq_ through the dispatcher (see csrc/ops.cpp): *out receives the sum
 * of squares. Fails with a clear message when the ops library is not loaded. */
char *tf_unscale_sumsq(const tf_tensor *grads, size_t n, tf_tensor found_inf, tf_tensor inv_scale,
                       int32_t unscale, tf_tensor *out);
/* tch_fabric::adamw_folded_ through the dispatcher (see csrc/ops.cpp). */
char *tf_adamw_folded(const tf_tensor *params, const tf_tensor *grads, const tf_tensor *exp_avgs,
                      const tf_tensor *exp_avg_sqs, const tf_tensor *state_steps, size_t n,
                      double lr, double beta1, double beta2, double weight_decay, double eps,
                      int32_t maximize, tf_tensor divisor, tf_tensor found_inf);
/* tch_fabric::adamw_rounded_ / sgd_rounded_ / stochastic_round through the dispatcher (see
 * csrc/rounding.cpp). Lists have n entries, or the count given beside them. */
char *tf_adamw_rounded(const tf_tensor *params, const tf_tensor *grads, const tf_tensor *exp_avgs,
                       const tf_tensor *exp_avg_sqs, const tf_tensor *max_exp_avg_sqs,
                       size_t n_max, const tf_tensor *kahan_comps, size_t n_comps,
                       const tf_tensor *state_steps, const int64_t *positions, size_t n, double lr,
                       double beta1, double beta2, double weight_decay, double eps,
                       int32_t maximize, int64_t mode, uint64_t seed, tf_tensor grad_scale,
                       tf_tensor found_inf);
char *tf_sgd_rounded(const tf_tensor *params, const tf_tensor *grads,
                     const tf_tensor *momentum_buffers, size_t n_buffers,
                     const tf_tensor *kahan_comps, size_t n_comps, const tf_tensor *state_steps,
                     size_t n_steps, const int64_t *positions, size_t n, double lr,
                     double weight_decay, double momentum, double dampening, int32_t nesterov,
                     int32_t maximize, int32_t is_first_step, int64_t mode, uint64_t seed,
                     tf_tensor grad_scale, tf_tensor found_inf);
char *tf_stochastic_round(tf_tensor x, uint64_t seed, uint32_t position, uint32_t step,
                          tf_tensor *out);
/* tch_fabric::clip_divisor through the dispatcher: *norm and *divisor receive new tensors. */
char *tf_clip_divisor(tf_tensor sumsq, tf_tensor scale, double max_norm, tf_tensor *norm,
                      tf_tensor *divisor);

/* Counts the dispatcher calls (ATen ops, tch_fabric ops) made on the calling thread between
 * begin and end. *report receives "name\tall\ttop_level\tself_ns\n" lines (free with
 * tf_free_error): all = every invocation, top_level = those not made from inside another op,
 * self_ns = nanoseconds in the op less those in the ops it called. */
char *tf_op_count_begin(void);
char *tf_op_count_end(char **report);

/* A c10d process group (csrc/dist.cpp): a TCPStore rendezvous plus a Gloo backend. */
typedef void *tf_process_group;

/* Joins the group: rank 0 serves the TCPStore at master_addr:master_port and waits for
 * world_size ranks; the others connect. backend is "gloo" ("nccl" is a clear error in this
 * build). Rendezvous (store and Gloo connections) fails after rendezvous_timeout_ms;
 * collectives after timeout_ms, naming the ranks that did not arrive. listen_fd: on rank 0, a
 * listening socket already bound to master_addr:master_port, which the store takes over (and
 * the call closes on error); -1 to let c10d bind the port on every interface.
 * agent_store_attempt: -1, or torchrun's restart count when its agent serves the store
 * (TORCHELASTIC_USE_AGENT_STORE): every rank then joins as a client, under PyTorch's key prefix
 * "/worker/attempt_<n>". *out receives the group (free with tf_pg_free). */
char *tf_pg_new(const char *backend, const char *master_addr, int32_t master_port, int32_t rank,
                int32_t world_size, int64_t rendezvous_timeout_ms, int64_t timeout_ms,
                int32_t listen_fd, int64_t agent_store_attempt, tf_process_group *out);
void tf_pg_free(tf_process_group pg);
/* In-place all-reduce of one tensor across the group; op 0 = sum, 1 = max. Blocks until done. */
char *tf_pg_all_reduce(tf_process_group pg, tf_tensor tensor, int32_t op);
/* In-place broadcast of one tensor from rank root. Blocks until done. */
char *tf_pg_broadcast(tf_process_group pg, tf_tensor tensor, int32_t root);
/* Blocks until every rank reached the barrier. */
char *tf_pg_barrier(tf_process_group pg);
/* After a failed collective: which ranks never entered it ("" when all did), a heap string
 * freed with tf_free_error. */
char *tf_pg_missing_ranks(tf_process_group pg, char **out);
/* Bucket all-reduces the group's DDP Reducers issued. */
uint64_t tf_pg_bucket_all_reduces(tf_process_group pg);

/* libtorch's DDP Reducer (c10d::Reducer) over `params` (named for its errors): gradients
 * averaged in buckets of at most `bucket_bytes`, each all-reduced during backward as soon as
 * its gradients are ready. tf_reducer_prepare arms it for the next backward (`outputs` are
 * searched for unused parameters when `find_unused`); a backward without it leaves the
 * gradients local (no_backward_sync). */
typedef void *tf_reducer;
char *tf_reducer_new(tf_process_group pg, const tf_tensor *params, size_t n,
                     const char *const *names, int64_t bucket_bytes, int32_t find_unused,
                     tf_reducer *out);
char *tf_reducer_prepare(tf_reducer r, const tf_tensor *outputs, size_t n);
void tf_reducer_free(tf_reducer r);

/* torch.save-format files (pickle.cpp). A `tf_ivalue` is a heap `c10::IValue*` owned by the
 * caller and released with tf_ivalue_free; buffers from tf_torch_load with tf_free_buffer. */
typedef void *tf_ivalue;
enum {
  TF_IV_NONE = 0,
  TF_IV_BOOL = 1,
  TF_IV_INT = 2,
  TF_IV_DOUBLE = 3,
  TF_IV_STRING = 4,
  TF_IV_TENSOR = 5,
  TF_IV_LIST = 6,
  TF_IV_TUPLE = 7,
  TF_IV_DICT = 8
};
/* One value: its tag, a bool/int or double payload, and the length of a string, list, tuple or
 * dict. Any other kind of value is an error naming its type. */
typedef struct {
  int32_t tag;
  int64_t int_value;
  double double_value;
  size_t len;
} tf_ivalue_info;
void tf_ivalue_free(tf_ivalue v);
void tf_free_buffer(char *data);
/* Unpickles `pickle` with the tensors read from the archive at `path`, onto the CPU, after
 * checking that every storage's record holds exactly the bytes the pickle declares. `out` is a
 * tuple (value, list of byte tensors over the records read); `records` (malloc'ed,
 * `records_len` bytes) names those records, a line each, in the same order. */
char *tf_torch_load(const char *path, const char *pickle, size_t len, tf_ivalue *out,
                    char **records, size_t *records_len);
/* Writes `value` to `path` as torch.save does (zip archive, pickle protocol 2, untagged). */
char *tf_torch_save(tf_ivalue value, const char *path);
char *tf_ivalue_inspect(tf_ivalue value, tf_ivalue_info *out);
/* A string's bytes (tf_ivalue_info.len of them), valid while the value lives. */
char *tf_ivalue_string(tf_ivalue value, const char **data);
char *tf_ivalue_tensor(tf_ivalue value, tf_tensor *out);
/* Element i of a list or tuple. */
char *tf_ivalue_item(tf_ivalue value, size_t i, tf_ivalue *out);
/* Entry i of a dict, in insertion order. */
char *tf_ivalue_entry(tf_ivalue value, size_t i, tf_ivalue *key, tf_ivalue *item);
/* A new value of `tag`: the payload that tag reads (int_value for bool/int, double_value, text
 * and len, tensor, or n items: elements, or key, value, key, value for a dict of n/2 entries). */
char *tf_ivalue_new(int32_t tag, int64_t int_value, double double_value, const char *text,
                    size_t len, tf_tensor tensor, const tf_ivalue *items, size_t n,
                    tf_ivalue *out);

#ifdef __cplusplus
}
#endif

#endif /* TCH_FABRIC_H */
