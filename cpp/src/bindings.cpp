// nanobind bindings: deltapack._core. Thin: arrays in (numpy or DLPack, zero-copy), arrays out
// (numpy owning the C++ buffer, or viewing memory a delta tensor was read into). The Python API is python/deltapack.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <system_error>

#include "codec.h"
#include "deltapack/deltapack.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace deltapack;

using AnyArray = nb::ndarray<nb::c_contig, nb::device::cpu>;            // writable (outputs)
using InArray = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;    // read-only views accepted

template <class A>
static DType dtype_of(const A& a) {
    nb::dlpack::dtype t = a.dtype();
    if (t.lanes == 1) {
        if (t.code == uint8_t(nb::dlpack::dtype_code::Float)) {
            if (t.bits == 32) return DType::F32;
            if (t.bits == 16) return DType::F16;
            if (t.bits == 64) return DType::F64;
        }
        if (t.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && t.bits == 16) return DType::BF16;
        if (t.code == uint8_t(nb::dlpack::dtype_code::Int)) {
            if (t.bits == 64) return DType::I64;
            if (t.bits == 32) return DType::I32;
            if (t.bits == 8) return DType::I8;
        }
        if (t.code == uint8_t(nb::dlpack::dtype_code::UInt)) {
            if (t.bits == 8) return DType::U8;
            if (t.bits == 16) return DType::BF16;  // numpy has no bfloat16: deltapack keeps bf16 bits as uint16
        }
    }
    throw std::invalid_argument("unsupported array dtype (code " + std::to_string(t.code) + ", " +
                                std::to_string(t.bits) + " bits)");
}

template <class A>
static ArrayRef ref_of(const A& a) {
    ArrayRef r;
    r.data = const_cast<void*>(static_cast<const void*>(a.data()));
    r.dtype = dtype_of(a);
    for (size_t i = 0; i < a.ndim(); ++i) r.shape.push_back(a.shape(i));
    return r;
}

static nb::dlpack::dtype numpy_dtype(DType t) {
    switch (t) {
        case DType::F32: return nb::dtype<float>();
        case DType::F16: return {uint8_t(nb::dlpack::dtype_code::Float), 16, 1};
        case DType::BF16: return nb::dtype<uint16_t>();
        case DType::F64: return nb::dtype<double>();
        case DType::I64: return nb::dtype<int64_t>();
        case DType::I32: return nb::dtype<int32_t>();
        case DType::I16: return nb::dtype<int16_t>();
        case DType::I8: return nb::dtype<int8_t>();
        case DType::U64: return nb::dtype<uint64_t>();
        case DType::U32: return nb::dtype<uint32_t>();
        case DType::U16: return nb::dtype<uint16_t>();
        case DType::BOOL: return nb::dtype<bool>();
        default: return nb::dtype<uint8_t>();  // u8 and the f8 formats (raw bytes)
    }
    return nb::dtype<uint8_t>();
}

static nb::object to_numpy(const ArrayRef& r, nb::handle owner, bool readonly) {
    std::vector<size_t> shape(r.shape.begin(), r.shape.end());
    if (readonly)
        return nb::cast(nb::ndarray<nb::numpy, nb::ro>(r.data, shape.size(), shape.data(), owner, nullptr,
                                                       numpy_dtype(r.dtype)));
    return nb::cast(nb::ndarray<nb::numpy>(r.data, shape.size(), shape.data(), owner, nullptr, numpy_dtype(r.dtype)));
}

static nb::object owned_numpy(const Array& a) {
    auto* keep = new Array(a);
    nb::capsule owner(keep, [](void* p) noexcept { delete static_cast<Array*>(p); });
    return to_numpy(a.ref, owner, false);
}

// Any C-contiguous array on any device: a DeviceDelta's inputs and outputs (checked by on_device).
using DeviceArray = nb::ndarray<nb::c_contig>;

// The data of `a`, which must lie where `d` computes: on its GPU, or in host memory for the host emulation; with
// `shape` where given.
static void* on_device(const DeviceDelta& d, const DeviceArray& a, const char* what,
                       const std::vector<int64_t>* shape = nullptr) {
    const bool host = d.device() == kHostEmulation;
    const int want = host ? nb::device::cpu::value : nb::device::cuda::value;
    if (a.device_type() != want || (!host && a.device_id() != d.device()))
        throw std::invalid_argument("tensor '" + d.name() + "': " + what + " must be " +
                                    (host ? std::string("in host memory (host emulation)")
                                          : "on CUDA device " + std::to_string(d.device())));
    if (shape) {
        std::vector<int64_t> have;
        for (size_t i = 0; i < a.ndim(); ++i) have.push_back(a.shape(i));
        if (have != *shape)
            throw std::invalid_argument("tensor '" + d.name() + "': " + what + " does not have the delta's shape");
    }
    return a.data();
}

// (name, codec, params, shape, dtype, components) as passed from Python.
using PyEncoded = std::tuple<std::string, std::string, std::string, std::vector<int64_t>, std::string,
                             std::map<std::string, InArray>>;

// The batch of a product with a delta of `shape` (its matrix view: rows x cols): x must hold batch x cols f32
// values and y batch x rows (a size of -1: not f32). The error names `what` and both sizes it needs.
static int64_t batch_of(const std::string& what, const std::vector<int64_t>& shape, int64_t x_size, int64_t y_size) {
    const Matrix m = Matrix::of(shape);
    const int64_t batch = m.cols ? x_size / m.cols : 0;
    if (!m.cols || x_size < 0 || y_size < 0 || x_size != batch * m.cols || y_size != batch * m.rows)
        throw std::invalid_argument(what + " needs f32 x of batch x " + std::to_string(m.cols) +
                                    " and f32 y of batch x " + std::to_string(m.rows) + "; got " +
                                    std::to_string(x_size) + " and " + std::to_string(y_size) + " values");
    return batch;
}

static EncodedRef ref_of(const PyEncoded& e) {
    EncodedRef r;
    r.name = std::get<0>(e);
    r.codec = std::get<1>(e);
    r.params = std::get<2>(e);
    r.shape = std::get<3>(e);
    r.dtype = dtype_from_name(std::get<4>(e));
    for (auto& kv : std::get<5>(e)) r.components[kv.first] = ref_of(kv.second);
    return r;
}

NB_MODULE(_core, m) {
    m.doc() = "deltapack C++ core";
    m.attr("__version__") = DELTAPACK_VERSION;
    // The names apply's rounding option takes, spelled by rounding_name (the one place they are written).
    m.attr("roundings") = std::vector<std::string>{rounding_name(Rounding::Auto), rounding_name(Rounding::Nearest),
                                                   rounding_name(Rounding::Dithered)};
    nb::exception<FormatError>(m, "FormatError", PyExc_ValueError);
    nb::exception<BaseMismatch>(m, "BaseMismatchError", PyExc_ValueError);
    // File-system failures (disk full, permission denied, a vanished shard) become OSError with errno,
    // hence FileNotFoundError, PermissionError, ... as Python's own I/O raises them.
    nb::register_exception_translator([](const std::exception_ptr& p, void*) {
        try {
            std::rethrow_exception(p);
        } catch (const std::system_error& ex) {
            nb::object err = nb::module_::import_("builtins").attr("OSError")(ex.code().value(), ex.what());
            PyErr_SetObject((PyObject*)Py_TYPE(err.ptr()), err.ptr());
        }
    });

    m.def("codec_names", &codec_names);
    m.def("canonical_params", &canonical_params, "codec"_a, "params"_a);
    m.def("set_simd", &set_simd, "path"_a);
    m.def("simd", &simd);
    m.def("simd_available", &simd_available);
    m.def("set_default_threads", &set_default_threads, "threads"_a);
    m.def("default_threads", &default_threads);
    m.def("crc32c", [](nb::bytes b, uint32_t crc) { return crc32c(b.c_str(), b.size(), crc); }, "data"_a, "crc"_a = 0);
    m.def("sha256_hex", [](nb::bytes b) { return sha256_hex(b.c_str(), b.size()); }, "data"_a);
    m.def(
        "crc32c",
        [](const InArray& a, uint32_t crc) {
            const void* p = a.data();
            size_t n = a.nbytes();
            nb::gil_scoped_release nogil;
            return crc32c(p, n, crc);
        },
        "data"_a, "crc"_a = 0, "CRC-32C of a contiguous array's bytes (no copy).");
    m.def("crc32c_combine", &crc32c_combine, "crc_a"_a, "crc_b"_a, "len_b"_a,
          "CRC-32C of A followed by B from the CRCs of A and B and the length of B.");

    m.def(
        "encode",
        [](const std::string& codec, const std::string& params, const InArray& delta, int threads) {
            ArrayRef in = ref_of(delta);
            Encoded enc;
            {
                nb::gil_scoped_release nogil;
                enc = encode(codec, params, in, threads);
            }
            nb::dict comps;
            for (auto& kv : enc.components) comps[kv.first.c_str()] = owned_numpy(kv.second);
            return nb::make_tuple(enc.params, comps);
        },
        "codec"_a, "params"_a, "delta"_a, "threads"_a = 0);
    m.def(
        "encode_delta",
        [](const std::string& codec, const std::string& params, const ModelFiles& ft, const std::string& name,
           const ModelFiles& base, const std::string& src, const std::vector<int64_t>& shape, int threads) {
            EncodedDelta d;
            {
                nb::gil_scoped_release nogil;
                d = encode_delta(codec, params, ft, name, base, src, shape, threads);
            }
            nb::dict comps;
            for (auto& kv : d.enc.components) comps[kv.first.c_str()] = owned_numpy(kv.second);
            return nb::make_tuple(d.enc.params, comps, d.read.base_crc, d.read.identical);
        },
        "codec"_a, "params"_a, "ft"_a, "name"_a, "base"_a, "src"_a, "shape"_a, "threads"_a = 0,
        "encode(ft[name] - base[src]) over `shape` without holding the delta; returns (params, components, "
        "CRC-32C of all of base[src], identical).");

    m.def("validate", [](const PyEncoded& e) { validate(ref_of(e)); }, "encoded"_a);

    m.def(
        "apply",
        [](const PyEncoded& e, const InArray& base, AnyArray out, float alpha, int threads,
           const std::string& rounding) {
            EncodedRef r = ref_of(e);
            ArrayRef b = ref_of(base), o = ref_of(out);
            ApplyParams p = apply_default_params();
            p.alpha = alpha;
            p.threads = threads;
            p.rounding = rounding_from_name(rounding);
            nb::gil_scoped_release nogil;
            apply(r, b, o, p);
        },
        "encoded"_a, "base"_a, "out"_a.noconvert(), "alpha"_a = 1.0f, "threads"_a = 0, "rounding"_a = "auto");

    m.def(
        "decode",
        [](const PyEncoded& e, AnyArray out, int threads) {
            EncodedRef r = ref_of(e);
            ArrayRef o = ref_of(out);
            nb::gil_scoped_release nogil;
            decode(r, o, threads);
        },
        "encoded"_a, "out"_a.noconvert(), "threads"_a = 0);

    m.def(
        "delta_product",  // y (batch x rows) += alpha * x (batch x cols) times the delta transposed
        [](const PyEncoded& e, const InArray& x, AnyArray y, float alpha, int threads) {
            EncodedRef r = ref_of(e);
            ArrayRef xr = ref_of(x), yr = ref_of(y);
            const int64_t batch = batch_of("delta_product: tensor '" + r.name + "'", r.shape,
                                           xr.dtype == DType::F32 ? xr.numel() : -1,
                                           yr.dtype == DType::F32 ? yr.numel() : -1);
            nb::gil_scoped_release nogil;
            delta_product(r, static_cast<const float*>(xr.data), batch, alpha, static_cast<float*>(yr.data), threads);
        },
        "encoded"_a, "x"_a, "y"_a.noconvert(), "alpha"_a = 1.0f, "threads"_a = 0);

    nb::class_<DeltaWriter>(m, "DeltaWriter")
        .def(nb::init<const std::string&, bool, uint64_t>(), "path"_a, "overwrite"_a = true,
             "in_memory"_a = kSpillInMemory)
        .def_prop_ro("path", &DeltaWriter::path)
        .def("__len__", &DeltaWriter::count)
        .def(
            "add",
            [](DeltaWriter& w, const PyEncoded& e, bool borrowed) {
                EncodedRef r = ref_of(e);
                nb::gil_scoped_release nogil;
                return w.add(r, borrowed);
            },
            "encoded"_a, "borrowed"_a = false)
        .def(
            "add_file", [](DeltaWriter& w, nb::bytes b) { return w.add_file(b.c_str(), b.size()); }, "data"_a)
        .def("size", &DeltaWriter::size, "extra_manifest"_a = "{}")
        .def(
            "close",
            [](DeltaWriter& w, const std::string& extra, bool durable) {
                nb::gil_scoped_release nogil;
                return w.close(extra, durable);
            },
            "extra_manifest"_a = "{}", "durable"_a = true)
        .def("abort", &DeltaWriter::abort);

    // A model: one .safetensors file or a Hugging Face directory (shards + index), read with pread.
    nb::class_<ModelFiles>(m, "ModelFiles")
        .def_static("open", &ModelFiles::open, "path"_a, "follow_links"_a = false)
        .def_prop_ro("path", &ModelFiles::path)
        .def_prop_ro("is_directory", &ModelFiles::is_directory)
        .def_prop_ro("shards", &ModelFiles::shards)
        .def_prop_ro("has_index", &ModelFiles::has_index)
        .def_prop_ro("index_metadata", &ModelFiles::index_metadata)
        .def_prop_ro("config", &ModelFiles::config)
        .def("shard_path", &ModelFiles::shard_path, "shard"_a)
        .def("shard_metadata", [](const ModelFiles& m, const std::string& shard) { return m.shard(shard).metadata(); },
             "shard"_a)
        .def(
            "tensors",
            [](const ModelFiles& m) {  // (name, dtype, shape, offset, nbytes, shard) by shard, then data order
                std::vector<std::tuple<std::string, std::string, std::vector<int64_t>, uint64_t, uint64_t, std::string>> out;
                for (const std::string& k : m.keys()) {
                    const TensorInfo& t = m.info(k);
                    out.emplace_back(t.name, safetensors_dtype_name(t.dtype), t.shape, t.offset, t.nbytes, m.shard_of(k));
                }
                return out;
            })
        .def(
            "read",
            [](const ModelFiles& m, const std::string& name, AnyArray out, uint64_t first_byte) {
                void* p = out.data();
                const uint64_t n = out.nbytes();
                nb::gil_scoped_release nogil;
                m.read(name, p, n, first_byte);
            },
            "name"_a, "out"_a.noconvert(), "first_byte"_a = 0);

    // A fine-tune over its base, as `deltapack compress` recorded it: tensors rebuilt into caller memory.
    nb::class_<CheckpointDelta>(m, "CheckpointDelta")
        .def(
            "__init__",  // base None: no base model (rebuild_from with the caller's base tensors)
            [](CheckpointDelta* self, std::optional<std::string> base, const std::string& delta, bool force,
               bool follow_links) {
                std::shared_ptr<const ModelFiles> b;
                if (base) b = ModelFiles::open(*base, follow_links);
                std::shared_ptr<const DeltaFile> d = DeltaFile::open(delta);
                new (self) CheckpointDelta(b, d, force);
            },
            "base"_a.none(), "delta"_a, "force"_a = false, "follow_links"_a = false)
        .def_prop_ro("record", &CheckpointDelta::record)
        .def_prop_ro("removed", &CheckpointDelta::removed)
        .def(
            "tensors",
            [](const CheckpointDelta& c) {  // (name, op, dtype, shape, source, new_rows) in the fine-tune's order
                std::vector<std::tuple<std::string, std::string, std::string, std::vector<int64_t>, std::string, std::string>> out;
                for (const CheckpointTensor& t : c.tensors())
                    out.emplace_back(t.name, tensor_kind_name(t.kind), safetensors_dtype_name(t.dtype), t.shape, t.source,
                                     t.new_rows);
                return out;
            })
        .def(
            "rebuild",
            [](const CheckpointDelta& c, const std::string& name, AnyArray out, const std::string& dtype, float alpha,
               int threads, const std::string& rounding) {
                void* p = out.data();
                const uint64_t n = out.nbytes();
                const DType t = dtype_from_name(dtype);
                const Rounding r = rounding_from_name(rounding);
                nb::gil_scoped_release nogil;
                c.rebuild(name, p, n, t, alpha, threads, r);
            },
            "name"_a, "out"_a.noconvert(), "dtype"_a, "alpha"_a = 1.0f, "threads"_a = 0, "rounding"_a = "auto")
        .def(
            "rebuild_from",  // out may be base (in place)
            [](const CheckpointDelta& c, const std::string& name, std::optional<InArray> base, AnyArray out,
               const std::string& dtype, float alpha, int threads) {
                const void* bp = base ? base->data() : nullptr;
                const uint64_t bn = base ? base->nbytes() : 0;
                const DType bt = base ? dtype_of(*base) : DType::F32;
                void* p = out.data();
                const uint64_t n = out.nbytes();
                const DType t = dtype_from_name(dtype);
                nb::gil_scoped_release nogil;
                c.rebuild_from(name, bp, bn, bt, p, n, t, alpha, threads);
            },
            "name"_a, "base"_a.none(), "out"_a.noconvert(), "dtype"_a, "alpha"_a = 1.0f, "threads"_a = 0);

    m.def(
        "apply_checkpoint",
        [](const std::string& base, const std::string& delta, const std::string& out, float alpha,
           const std::string& dtype, bool force, bool overwrite, bool durable, int threads, nb::object progress,
           bool follow_links, const std::string& rounding) {
            ApplyCheckpointOptions o;
            o.alpha = alpha, o.dtype = dtype, o.force = force, o.overwrite = overwrite, o.durable = durable;
            o.follow_links = follow_links;
            o.rounding = rounding_from_name(rounding);
            o.threads = threads;
            if (!progress.is_none())
                o.progress = [progress](uint64_t n) {
                    nb::gil_scoped_acquire gil;
                    progress(n);
                };
            nb::gil_scoped_release nogil;
            CheckpointOutput r = apply_checkpoint(base, delta, out, o);
            return std::make_tuple(r.path, r.tensors, r.bytes);
        },
        "base"_a, "delta"_a, "out"_a, "alpha"_a = 1.0f, "dtype"_a = "", "force"_a = false, "overwrite"_a = false,
        "durable"_a = true, "threads"_a = 0, "progress"_a = nb::none(), "follow_links"_a = false,
        "rounding"_a = "auto");

    m.def(
        "check_manifest_fields",  // the schema of what deltapack reads from a manifest (FORMAT.md §7)
        [](const std::string& manifest, const std::string& path) {
            check_manifest_fields(json::parse(manifest), path, kUnknownSize);
        },
        "manifest"_a, "path"_a);
    // The rules for model directories and outputs (deltapack.h, "paths").
    m.def("is_weight_file", &is_weight_file, "name"_a);
    m.def("kept_file_problem", &kept_file_problem, "name"_a);
    m.def("resolve_in_model_dir", &resolve_in_model_dir, "dir"_a, "name"_a, "follow_links"_a = false);
    m.def(
        "read_kept_files",  // ([(name, bytes)], [(name, why skipped)])
        [](const std::string& dir, bool follow_links) {
            std::vector<KeptFile> kept, skipped;
            {
                nb::gil_scoped_release nogil;
                kept = read_kept_files(dir, follow_links, &skipped);
            }
            nb::list files, left;
            for (auto& f : kept) files.append(nb::make_tuple(f.name, nb::bytes(f.data.data(), f.data.size())));
            for (auto& f : skipped) left.append(nb::make_tuple(f.name, f.data));
            return nb::make_tuple(files, left);
        },
        "dir"_a, "follow_links"_a = false);
    nb::enum_<OutputKind>(m, "OutputKind")
        .value("DELTA_FILE", OutputKind::DeltaFile)
        .value("SAFETENSORS_FILE", OutputKind::SafetensorsFile)
        .value("GGUF_FILE", OutputKind::GgufFile)
        .value("MODEL_DIRECTORY", OutputKind::ModelDirectory)
        .value("ADAPTER_DIRECTORY", OutputKind::AdapterDirectory);
    m.def("check_output", &check_output, "out"_a, "kind"_a, "inputs"_a, "overwrite"_a = false,
          "writes"_a = std::vector<std::string>{});
    nb::class_<AtomicFile>(m, "AtomicFile")
        .def(nb::init<const std::string&, bool>(), "path"_a, "replace"_a = true)
        .def_prop_ro("path", &AtomicFile::path)
        .def_prop_ro("reopen_path", &AtomicFile::reopen_path)
        .def("commit", &AtomicFile::commit, "durable"_a = true, nb::call_guard<nb::gil_scoped_release>())
        .def("abort", &AtomicFile::abort);

    using F32In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
    using F32Out = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
    using RowsIn = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
    auto bank_batch = [](Bank& b, const std::string& tensor, size_t x_size, size_t y_size) {
        return batch_of("bank: tensor '" + tensor + "'", b.tensor(tensor).shape, int64_t(x_size), int64_t(y_size));
    };
    nb::class_<Bank>(m, "Bank")
        .def(nb::init<const std::string&>(), "base"_a, nb::call_guard<nb::gil_scoped_release>())
        .def("add", &Bank::add, "name"_a, "delta"_a, "force"_a = false, nb::call_guard<nb::gil_scoped_release>())
        .def("remove", &Bank::remove, "name"_a, nb::call_guard<nb::gil_scoped_release>())
        .def("activate", &Bank::activate, "mix"_a, "threads"_a = 0, nb::call_guard<nb::gil_scoped_release>())
        .def("active", &Bank::active)
        .def("tensor_names", &Bank::tensor_names)
        .def("fine_tunes", &Bank::fine_tunes)
        .def("last_rewritten", &Bank::last_rewritten)
        .def("set_cache_budget", &Bank::set_cache_budget, "bytes"_a, nb::call_guard<nb::gil_scoped_release>())
        .def("cache_bytes", &Bank::cache_bytes)
        .def("touches", &Bank::touches, "name"_a, "tensor"_a)
        .def("lock_shared", &Bank::lock_shared, nb::call_guard<nb::gil_scoped_release>())
        .def("unlock_shared", &Bank::unlock_shared)
        .def(
            "rebuild",
            [](Bank& b, const Bank::Mix& mix, const std::string& tensor, AnyArray out, int threads) {
                void* p = out.data();
                const uint64_t n = out.nbytes();
                nb::gil_scoped_release nogil;
                b.rebuild(mix, tensor, p, n, threads);
            },
            "mix"_a, "tensor"_a, "out"_a, "threads"_a = 0)
        .def(
            "product",
            [bank_batch](Bank& b, const std::string& name, const std::string& tensor, F32In x, F32Out y, float alpha,
                         int threads) {
                const int64_t batch = bank_batch(b, tensor, x.size(), y.size());
                const float* xp = x.data();
                float* yp = y.data();
                nb::gil_scoped_release nogil;
                b.product(name, tensor, xp, batch, alpha, yp, threads);
            },
            "name"_a, "tensor"_a, "x"_a, "y"_a, "alpha"_a = 1.0f, "threads"_a = 0)
        .def(
            "mixed_product",
            [bank_batch](Bank& b, const std::string& tensor, const std::vector<std::string>& names,
                       nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> which, F32In x, F32Out y,
                       float alpha, int threads) {
                const int64_t batch = bank_batch(b, tensor, x.size(), y.size());
                if (which.size() != size_t(batch))
                    throw std::invalid_argument("bank: " + std::to_string(which.size()) + " fine-tune choices for a batch of " +
                                                std::to_string(batch) + " rows");
                const int32_t* w = which.data();
                const float* xp = x.data();
                float* yp = y.data();
                nb::gil_scoped_release nogil;
                b.mixed_product(tensor, names, w, xp, batch, alpha, yp, threads);
            },
            "tensor"_a, "names"_a, "which"_a, "x"_a, "y"_a, "alpha"_a = 1.0f, "threads"_a = 0)
        .def(
            "delta_rows",
            [](Bank& b, const std::string& name, const std::string& tensor, RowsIn rows, F32Out out, float alpha) {
                const size_t cols = size_t(Matrix::of(b.tensor(tensor).shape).cols);
                if (out.size() != rows.size() * cols)
                    throw std::invalid_argument("bank: " + std::to_string(rows.size()) + " rows of tensor '" + tensor +
                                                "' need " + std::to_string(rows.size() * cols) + " values, not " +
                                                std::to_string(out.size()));
                const int64_t* rp = rows.data();
                float* op = out.data();
                nb::gil_scoped_release nogil;
                b.delta_rows(name, tensor, rp, int64_t(rows.size()), alpha, op);
            },
            "name"_a, "tensor"_a, "rows"_a, "out"_a, "alpha"_a = 1.0f)
        .def(
            "to_device",
            [](const Bank& b, const std::string& name, const std::string& tensor, int device, uintptr_t stream) {
                nb::gil_scoped_release nogil;
                return b.to_device(name, tensor, device, reinterpret_cast<void*>(stream));
            },
            "name"_a, "tensor"_a, "device"_a, "stream"_a = 0)
        .def(
            "tensor",  // a numpy view of the live buffer; it keeps the bank alive
            [](nb::handle self, const std::string& name) {
                return to_numpy(nb::cast<Bank&>(self).tensor(name), self, false);
            },
            "name"_a);

    // CUDA (docs/cuda.md): arrays on the DeviceDelta's GPU (DLPack: torch CUDA tensors), or host arrays for the host
    // emulation (device -1); streams as integers (torch.cuda.Stream.cuda_stream).
    m.def("cuda_built", &cuda_built);
    m.def("cuda_device_count", &cuda_device_count);
    m.attr("HOST_EMULATION") = kHostEmulation;
    nb::class_<DeviceDelta>(m, "DeviceDelta")
        .def(
            "__init__",
            [](DeviceDelta* self, const PyEncoded& e, int device, uintptr_t stream) {
                EncodedRef r = ref_of(e);
                nb::gil_scoped_release nogil;
                new (self) DeviceDelta(r, device, reinterpret_cast<void*>(stream));
            },
            "encoded"_a, "device"_a, "stream"_a = 0)
        .def_prop_ro("name", &DeviceDelta::name)
        .def_prop_ro("shape", &DeviceDelta::shape)
        .def_prop_ro("device", &DeviceDelta::device)
        .def_prop_ro("device_bytes", &DeviceDelta::device_bytes)
        .def(
            "apply",
            [](const DeviceDelta& d, const DeviceArray& base, DeviceArray out, float alpha, const std::string& rounding,
               uintptr_t stream) {
                const void* b = on_device(d, base, "base", &d.shape());
                void* o = on_device(d, out, "out", &d.shape());
                ApplyParams p = apply_default_params();
                p.alpha = alpha;
                p.rounding = rounding_from_name(rounding);
                const DType bt = dtype_of(base), ot = dtype_of(out);
                nb::gil_scoped_release nogil;
                d.apply(b, bt, o, ot, p, reinterpret_cast<void*>(stream));
            },
            "base"_a, "out"_a, "alpha"_a = 1.0f, "rounding"_a = "auto", "stream"_a = 0)
        .def(
            "decode",
            [](const DeviceDelta& d, DeviceArray out, uintptr_t stream) {
                if (dtype_of(out) != DType::F32) throw std::invalid_argument("tensor '" + d.name() + "': decode output must be f32");
                void* o = on_device(d, out, "out", &d.shape());
                nb::gil_scoped_release nogil;
                d.decode(static_cast<float*>(o), reinterpret_cast<void*>(stream));
            },
            "out"_a, "stream"_a = 0);
    // jobs: (DeviceDelta, x, y) with x batch x cols and y batch x rows, f32 on the deltas' device.
    using DeviceJobs = std::vector<std::tuple<const DeviceDelta*, DeviceArray, DeviceArray>>;
    auto device_jobs = [](const DeviceJobs& jobs) {
        std::vector<DeviceProductJob> out;
        for (const auto& [d, x, y] : jobs) {
            const int64_t batch = batch_of("device_products: tensor '" + d->name() + "'", d->shape(),
                                           dtype_of(x) == DType::F32 ? int64_t(x.size()) : -1,
                                           dtype_of(y) == DType::F32 ? int64_t(y.size()) : -1);
            out.push_back(DeviceProductJob{d, static_cast<const float*>(on_device(*d, x, "x")), batch,
                                           static_cast<float*>(on_device(*d, y, "y"))});
        }
        return out;
    };
    m.def(
        "device_products_workspace", [device_jobs](const DeviceJobs& jobs) { return device_products_workspace(device_jobs(jobs)); },
        "jobs"_a);
    m.def(
        "device_products",
        [device_jobs](const DeviceJobs& jobs, float alpha, DeviceArray workspace, uintptr_t stream) {
            std::vector<DeviceProductJob> js = device_jobs(jobs);
            void* w = js.empty() ? nullptr : on_device(*js[0].delta, workspace, "workspace");
            const uint64_t bytes = workspace.nbytes();
            nb::gil_scoped_release nogil;
            device_products(js, alpha, w, bytes, reinterpret_cast<void*>(stream));
        },
        "jobs"_a, "alpha"_a, "workspace"_a, "stream"_a = 0);

    nb::class_<AtomicDir>(m, "AtomicDir")
        .def(nb::init<const std::string&, bool>(), "path"_a, "overwrite"_a = false)
        .def_prop_ro("tmp", &AtomicDir::tmp)
        .def_prop_ro("path", &AtomicDir::path)
        .def("commit", &AtomicDir::commit, "durable"_a = true)
        .def("abort", &AtomicDir::abort);

    nb::class_<SafetensorsWriter>(m, "SafetensorsWriter")
        .def(
            "__init__",
            [](SafetensorsWriter* self, const std::string& path,
               const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>>& tensors,
               const std::map<std::string, std::string>& metadata, bool durable) {
                std::vector<TensorInfo> infos;
                for (auto& t : tensors) infos.push_back(TensorInfo{std::get<0>(t), dtype_from_name(std::get<1>(t)), std::get<2>(t), 0, 0});
                new (self) SafetensorsWriter(path, infos, metadata, durable);
            },
            "path"_a, "tensors"_a, "metadata"_a = std::map<std::string, std::string>{}, "durable"_a = true)
        .def(
            "write",
            [](SafetensorsWriter& w, const std::string& name, const InArray& data) {
                const void* p = data.data();
                const uint64_t n = data.nbytes();
                nb::gil_scoped_release nogil;
                w.write(name, p, n);
            },
            "name"_a, "data"_a)
        .def("finish",
             [](SafetensorsWriter& w) {
                 nb::gil_scoped_release nogil;
                 return w.finish();
             })
        .def("abort", &SafetensorsWriter::abort);

    m.def(
        "read_delta",
        [](const ModelFiles& ft, const std::string& name, const ModelFiles& base, const std::string& src, AnyArray out,
           int threads) {
            ArrayRef o = ref_of(out);
            if (o.dtype != DType::F32) throw std::invalid_argument("read_delta: out must be float32");
            const uint64_t n = uint64_t(o.numel());
            float* p = static_cast<float*>(o.data);
            nb::gil_scoped_release nogil;
            const TensorDelta d = read_delta(ft, name, base, src, n, p, threads);
            return std::make_pair(d.base_crc, d.identical);
        },
        "ft"_a, "name"_a, "base"_a, "src"_a, "out"_a.noconvert(), "threads"_a = 0,
        "out = ft[name] - base[src] (f32) over out's length; returns (CRC-32C of all of base[src], identical).");
    m.def(
        "delta_f32",
        [](const InArray& ft, const InArray& base, AnyArray out, int threads) {
            ArrayRef f = ref_of(ft), b = ref_of(base), o = ref_of(out);
            if (o.dtype != DType::F32 || o.numel() != f.numel())
                throw std::invalid_argument("delta_f32: out must be float32 with as many elements as ft");
            nb::gil_scoped_release nogil;
            delta_f32(f, b, static_cast<float*>(o.data), threads);
        },
        "ft"_a, "base"_a, "out"_a.noconvert(), "threads"_a = 0);

    nb::class_<DeltaFile>(m, "DeltaFile")
        .def_static("open", &DeltaFile::open, "path"_a, "in_memory"_a = false)
        .def_prop_ro("path", &DeltaFile::path)
        .def_prop_ro("manifest", &DeltaFile::manifest)
        .def("keys", &DeltaFile::keys)
        .def("__contains__", &DeltaFile::contains)
        .def("stored_bytes", &DeltaFile::stored_bytes, "name"_a)
        .def(
            "entry",  // (codec, params, shape, dtype) from the manifest, nothing read
            [](const DeltaFile& f, const std::string& name) {
                const EncodedRef r = f.entry(name);
                return nb::make_tuple(r.codec, r.params, r.shape, std::string(dtype_name(r.dtype)));
            },
            "name"_a)
        .def(
            "get",  // components as read-only numpy views of the memory they were read into
            [](nb::handle self, const std::string& name, bool verify) {
                const DeltaFile& f = nb::cast<const DeltaFile&>(self);
                DeltaTensor t;
                {
                    nb::gil_scoped_release nogil;
                    t = f.get(name, verify);
                }
                nb::object owner = nb::borrow(self);  // a file held in memory owns the bytes
                if (t.bytes) {
                    auto* keep = new std::shared_ptr<void>(t.bytes);
                    owner = nb::capsule(keep, [](void* p) noexcept { delete static_cast<std::shared_ptr<void>*>(p); });
                }
                nb::dict comps;
                for (auto& kv : t.ref.components) comps[kv.first.c_str()] = to_numpy(kv.second, owner, true);
                const EncodedRef& r = t.ref;
                return nb::make_tuple(r.codec, r.params, r.shape, std::string(dtype_name(r.dtype)), comps);
            },
            "name"_a, "verify"_a = true);
}
