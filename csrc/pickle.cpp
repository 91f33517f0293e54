// torch.save-format files for tch-fabric: libtorch's own zip reader/writer
// (caffe2::serialize::PyTorchStreamReader/Writer) and pickler, plus handles on the IValues they
// produce and consume, so that Rust can walk and build the value tree. Every entry point catches
// C++ exceptions and returns the message (TF_PROTECT, protect.h).
//
// Reading does not go through torch::pickle_load: libtorch's Unpickler turns
// `collections.OrderedDict` into None (it expects one only as a tensor's empty backward hooks),
// so every state_dict fails. Rust rewrites the pickle first (src/checkpoint/pickle.rs) and hands
// the result to tf_torch_load, which runs the Unpickler as readArchiveAndTensors does, with the
// tensors read from the same archive.
#include "protect.h"

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/ivalue.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/csrc/jit/serialization/storage_context.h>
#include <torch/csrc/jit/serialization/unpickler.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using c10::IValue;

IValue &iv(tf_ivalue v) {
  if (v == nullptr) throw std::invalid_argument("tch-fabric shim: null IValue");
  return *static_cast<IValue *>(v);
}

tf_ivalue boxed(IValue v) { return new IValue(std::move(v)); }

}  // namespace

extern "C" {

void tf_ivalue_free(tf_ivalue v) { delete static_cast<IValue *>(v); }

void tf_free_buffer(char *data) { std::free(data); }

char *tf_torch_load(const char *path, const char *pickle, size_t len, tf_ivalue *out,
                    char **records, size_t *records_len) {
  TF_PROTECT({
    *out = nullptr;
    *records = nullptr;
    *records_len = 0;
    caffe2::serialize::PyTorchStreamReader reader{std::string(path)};
    // One parse of the pickle; `read_record` supplies each storage's bytes. The Unpickler trusts
    // the pickle's element count: a storage declared longer than its record would expose the
    // heap past the record, so sizes are checked before anything is read (below).
    auto parse = [&](std::function<at::DataPtr(const std::string &)> read_record,
                     const std::shared_ptr<torch::jit::DeserializationStorageContext> &context) {
      size_t offset = 0;
      auto read = [&](char *buffer, size_t n) -> size_t {
        if (offset >= len) return 0;
        size_t k = std::min(n, len - offset);
        std::memcpy(buffer, pickle + offset, k);
        offset += k;
        return k;
      };
      // One storage per record, as torch.load shares them: a weight saved under two names (a
      // tied weight) reads back as two tensors over one storage.
      torch::jit::Unpickler unpickler(read, nullptr, nullptr, std::move(read_record),
                                      at::Device(at::kCPU), false,
                                      torch::jit::Unpickler::defaultTypeParser, context);
      unpickler.set_version(reader.version());
      return unpickler.parse_ivalue();
    };
    // Pass 1 reads no record: each storage gets no bytes, only its declared size, which the
    // archive's own directory (sizes, not contents) must match; a decompression bomb or a short
    // record is refused before a byte of it is inflated.
    std::vector<std::string> keys;
    std::unordered_map<std::string, size_t> index;  // key -> position in keys
    std::vector<size_t> record_bytes;
    {
      auto context = std::make_shared<torch::jit::DeserializationStorageContext>();
      parse(
          [&](const std::string &key) -> at::DataPtr {
            if (index.emplace(key, keys.size()).second) keys.push_back(key);
            return at::DataPtr(nullptr, at::Device(at::kCPU));
          },
          context);
      for (const auto &key : keys) {
        const std::string name = "data/" + key;
        if (!reader.hasRecord(name)) {
          throw std::runtime_error("the pickle names a storage '" + name +
                                   "' that the archive does not hold");
        }
        const size_t declared = context->getStorage(key).nbytes();
        const size_t held = reader.getRecordSize(name);
        if (held != declared) {
          throw std::runtime_error("record '" + name + "' holds " + std::to_string(held) +
                                   " bytes where the pickle declares a storage of " +
                                   std::to_string(declared) +
                                   " bytes (torch.load refuses it too)");
        }
        record_bytes.push_back(held);
      }
    }
    // Pass 2 reads the records the first pass checked, and only those.
    auto context = std::make_shared<torch::jit::DeserializationStorageContext>();
    IValue value = parse(
        [&](const std::string &key) -> at::DataPtr {
          auto at = index.find(key);
          if (at == index.end()) {
            throw std::runtime_error("the pickle read storage '" + key + "' only the second time");
          }
          const std::string name = "data/" + key;
          if (reader.getRecordSize(name) != record_bytes[at->second]) {
            throw std::runtime_error("record '" + name + "' changed while it was read");
          }
          return std::move(std::get<0>(reader.getRecord(name)));
        },
        context);
    // The records' names, a line each, and (beside the value) a byte tensor over each record's
    // storage, in the same order: Rust checks the CRC-32 of the very bytes libtorch read (not a
    // second reading of the file, which another zip reader could resolve differently), and the
    // tensors keep the storages alive even where the pickle dropped its own tensor.
    std::string listed;
    c10::List<at::Tensor> bytes;
    for (size_t i = 0; i < keys.size(); i++) {
      if (!context->hasStorage(keys[i])) continue;
      const c10::Storage storage = context->getStorage(keys[i]);
      if (storage.nbytes() != record_bytes[i]) {
        throw std::runtime_error("storage '" + keys[i] + "' changed size between two reads");
      }
      bytes.push_back(at::empty({0}, at::TensorOptions().dtype(at::kByte)).set_(storage));
      listed += "data/" + keys[i] + "\n";
    }
    char *names = static_cast<char *>(std::malloc(listed.size() + 1));
    if (names == nullptr) throw std::bad_alloc();
    std::memcpy(names, listed.data(), listed.size() + 1);
    *out = boxed(IValue(c10::ivalue::Tuple::create({std::move(value), IValue(bytes)})));
    *records = names;
    *records_len = listed.size();
  })
}

char *tf_torch_save(tf_ivalue value, const char *path) {
  TF_PROTECT({
    // pickle_save, but with untagged aggregates: a tagged dict or list is wrapped in
    // torch.jit._pickle.restore_type_tag, which torch.load(weights_only=True) refuses.
    // No tensor table: tensors go out as storages (persistent ids), collected in tensorData().
    std::vector<char> pickled;
    torch::jit::Pickler pickler(
        [&](const char *buf, size_t n) { pickled.insert(pickled.end(), buf, buf + n); },
        nullptr, nullptr, nullptr, nullptr, /*tag_aggregates=*/false);
    pickler.protocol();
    pickler.pushIValue(iv(value));
    pickler.stop();
    std::ofstream file(path, std::ios::binary | std::ios::trunc);
    if (!file) throw std::runtime_error(std::string("cannot open ") + path + " for writing");
    // The zip writer is told every write succeeded: on a short write it throws, and then
    // throws again from its destructor (which finishes the archive at a position it no longer
    // agrees with), which aborts the process. So the first failure is kept here, later writes
    // are skipped, and the save fails once the writer is done.
    int write_errno = 0;
    bool failed = false;
    {
      caffe2::serialize::PyTorchStreamWriter writer([&](const void *bytes, size_t n) -> size_t {
        if (!failed) {
          errno = 0;
          file.write(static_cast<const char *>(bytes), static_cast<std::streamsize>(n));
          if (!file) {
            failed = true;
            write_errno = errno;
          }
        }
        return n;
      });
      torch::jit::writeArchiveAndTensors("data", pickled.data(), pickled.size(), pickler.tensorData(),
                                         writer);
      writer.writeEndOfFile();
    }
    file.close();
    if (failed || !file) {
      throw std::runtime_error(std::string("cannot write ") + path +
                               (write_errno != 0 ? std::string(": ") + std::strerror(write_errno)
                                                 : std::string()));
    }
  })
}

char *tf_ivalue_inspect(tf_ivalue value, tf_ivalue_info *out) {
  TF_PROTECT({
    const IValue &v = iv(value);
    *out = tf_ivalue_info{};
    if (v.isNone()) {
      out->tag = TF_IV_NONE;
    } else if (v.isBool()) {
      out->tag = TF_IV_BOOL;
      out->int_value = v.toBool();
    } else if (v.isInt()) {
      out->tag = TF_IV_INT;
      out->int_value = v.toInt();
    } else if (v.isDouble()) {
      out->tag = TF_IV_DOUBLE;
      out->double_value = v.toDouble();
    } else if (v.isString()) {
      out->tag = TF_IV_STRING;
      out->len = v.toStringRef().size();
    } else if (v.isTensor()) {
      out->tag = TF_IV_TENSOR;
    } else if (v.isList()) {
      out->tag = TF_IV_LIST;
      out->len = v.toListRef().size();
    } else if (v.isTuple()) {
      out->tag = TF_IV_TUPLE;
      out->len = v.toTupleRef().elements().size();
    } else if (v.isGenericDict()) {
      out->tag = TF_IV_DICT;
      out->len = v.toGenericDict().size();
    } else {
      throw std::runtime_error("a value of type " + v.type()->annotation_str() +
                               ", which checkpoints do not hold");
    }
  })
}

char *tf_ivalue_string(tf_ivalue value, const char **data) {
  TF_PROTECT({ *data = iv(value).toStringRef().data(); })
}

char *tf_ivalue_tensor(tf_ivalue value, tf_tensor *out) {
  TF_PROTECT({ *out = new at::Tensor(iv(value).toTensor()); })
}

char *tf_ivalue_item(tf_ivalue value, size_t i, tf_ivalue *out) {
  TF_PROTECT({
    const IValue &v = iv(value);
    if (v.isTuple()) {
      *out = boxed(v.toTupleRef().elements().at(i));
    } else {
      *out = boxed(v.toListRef().at(i));
    }
  })
}

char *tf_ivalue_entry(tf_ivalue value, size_t i, tf_ivalue *key, tf_ivalue *item) {
  TF_PROTECT({
    auto dict = iv(value).toGenericDict();
    if (i >= dict.size()) throw std::out_of_range("dict entry out of range");
    auto it = dict.begin();
    std::advance(it, static_cast<std::ptrdiff_t>(i));
    *key = boxed(it->key());
    *item = boxed(it->value());
  })
}

char *tf_ivalue_new(int32_t tag, int64_t int_value, double double_value, const char *text,
                    size_t len, tf_tensor tensor, const tf_ivalue *items, size_t n,
                    tf_ivalue *out) {
  TF_PROTECT({
    *out = nullptr;
    switch (tag) {
      case TF_IV_NONE: *out = boxed(IValue()); break;
      case TF_IV_BOOL: *out = boxed(IValue(int_value != 0)); break;
      case TF_IV_INT: *out = boxed(IValue(int_value)); break;
      case TF_IV_DOUBLE: *out = boxed(IValue(double_value)); break;
      case TF_IV_STRING: *out = boxed(IValue(std::string(text, len))); break;
      case TF_IV_TENSOR: *out = boxed(IValue(::tch_fabric_shim::deref(tensor))); break;
      case TF_IV_LIST: {
        c10::impl::GenericList list(c10::AnyType::get());
        for (size_t i = 0; i < n; i++) list.push_back(iv(items[i]));
        *out = boxed(IValue(list));
        break;
      }
      case TF_IV_TUPLE: {
        std::vector<IValue> elements;
        for (size_t i = 0; i < n; i++) elements.push_back(iv(items[i]));
        *out = boxed(IValue(c10::ivalue::Tuple::create(std::move(elements))));
        break;
      }
      case TF_IV_DICT: {
        // items: key, value, key, value, ...
        c10::impl::GenericDict dict(c10::AnyType::get(), c10::AnyType::get());
        for (size_t i = 0; i + 1 < n; i += 2) dict.insert_or_assign(iv(items[i]), iv(items[i + 1]));
        *out = boxed(IValue(dict));
        break;
      }
      default: throw std::invalid_argument("tch-fabric shim: unknown IValue tag");
    }
  })
}

}  // extern "C"
