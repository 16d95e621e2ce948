// The C API (cpp/include/deltapack/deltapack_c.h): a thin layer over the C++ API that checks every
// caller buffer against its size, and turns exceptions into return codes and a per-thread message.
#include "deltapack/deltapack_c.h"

#include <sys/stat.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "deltapack/deltapack.h"
#include "codec.h"
#include "json.h"

#ifndef DELTAPACK_VERSION
#define DELTAPACK_VERSION "unknown"
#endif

struct dp_file {
    std::shared_ptr<deltapack::DeltaFile> file;
    std::vector<std::string> names;
    deltapack::json::Value metadata;  // the manifest's "metadata" value (Null if absent)
};

struct dp_base {
    std::shared_ptr<deltapack::ModelFiles> files;
    std::vector<std::string> names;
};

struct dp_checkpoint {
    std::unique_ptr<deltapack::CheckpointDelta> ck;
    std::vector<std::string> names;
};

struct dp_device_delta {
    std::unique_ptr<deltapack::DeviceDelta> delta;
    std::string where;  // file and tensor, for errors
};

struct dp_bank {
    std::unique_ptr<deltapack::Bank> bank;
    std::string path;
    std::vector<std::string> names;  // the base's tensors (fixed for the bank's life)
};

namespace {

thread_local std::string g_error;
// Shared locks of each bank this thread holds (dp_bank_lock_shared): its exclusive calls would wait for
// themselves, and an unlock it does not hold would be undefined.
thread_local std::map<const dp_bank*, int> g_bank_reads;

// Runs fn, returning its result; on an exception records the message and returns `failed`.
template <class R, class F>
R guarded(R failed, F&& fn) {
    try {
        R r = fn();
        g_error.clear();
        return r;
    } catch (const std::bad_alloc&) {
        g_error = "out of memory";
    } catch (const std::exception& ex) {
        g_error = ex.what();
    } catch (...) {
        g_error = "unknown error";
    }
    return failed;
}

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

bool known_dtype(int t) { return t >= int(deltapack::DType::F32) && t <= int(deltapack::DType::F8_E5M2); }

deltapack::DType to_dtype(int t, const char* what) {
    if (!known_dtype(t)) fail(std::string(what) + ": unknown dp_dtype " + std::to_string(t));
    return deltapack::DType(t);
}

// A float dtype the engine computes with, or a failure naming the role of the buffer.
deltapack::DType float_dtype(int t, const std::string& where, const char* what) {
    deltapack::DType d = to_dtype(t, what);
    if (d != deltapack::DType::F32 && d != deltapack::DType::F16 && d != deltapack::DType::BF16)
        fail(where + ": " + what + " dtype " + deltapack::dtype_name(d) + " is not f32, f16 or bf16");
    return d;
}

std::string shape_text(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

// The byte size a buffer of `shape` in `dtype` must have; a failure if `given` differs.
void check_size(const std::string& where, const char* what, const std::vector<int64_t>& shape, deltapack::DType dtype,
                size_t given) {
    deltapack::ArrayRef a{nullptr, dtype, shape};
    const size_t expected = a.nbytes();
    if (given != expected)
        fail(where + ": " + what + " holds " + std::to_string(given) + " bytes, expected " + std::to_string(expected) +
             " (" + shape_text(shape) + " " + deltapack::dtype_name(dtype) + ")");
}

std::string tensor_where(const dp_file* f, const char* name) {
    return f->file->path() + ": tensor '" + name + "'";
}

// snprintf-style copy: the full length, at most buf_size - 1 bytes and a NUL written.
int64_t copy_text(const std::string& text, char* buf, size_t buf_size, const char* fn) {
    if (!buf && buf_size) fail(std::string(fn) + ": buf is NULL but buf_size is " + std::to_string(buf_size));
    if (buf_size) {
        const size_t n = text.size() < buf_size - 1 ? text.size() : buf_size - 1;
        std::memcpy(buf, text.data(), n);
        buf[n] = '\0';
    }
    return int64_t(text.size());
}

int copy_shape(const std::string& where, const std::vector<int64_t>& shape, int64_t* dims, size_t max_dims) {
    if (dims == nullptr && max_dims == 0) return int(shape.size());  // a rank query
    if (!dims) fail(where + ": dims is NULL but max_dims is " + std::to_string(max_dims));
    if (max_dims < shape.size())
        fail(where + ": rank " + std::to_string(shape.size()) + " does not fit in dims of " + std::to_string(max_dims));
    for (size_t i = 0; i < shape.size(); ++i) dims[i] = shape[i];
    return int(shape.size());
}

void need(const void* p, const char* fn, const char* arg) {
    if (!p) fail(std::string(fn) + ": " + arg + " is NULL");
}

// The i-th of `names` (of the file at `path`) into buf, snprintf-style; a failure if i is out of range.
template <class Names>
int64_t name_at(const Names& names, size_t i, const std::string& path, char* buf, size_t buf_size, const char* fn) {
    if (i >= names.size())
        fail(path + ": tensor index " + std::to_string(i) + " out of range (" + std::to_string(names.size()) + " tensors)");
    return copy_text(names[i], buf, buf_size, fn);
}

deltapack::ApplyParams engine_params(const dp_apply_params& params) {
    deltapack::ApplyParams p = deltapack::apply_default_params();
    p.alpha = params.alpha;
    p.threads = params.threads;
    if (params.rounding < DP_ROUNDING_AUTO || params.rounding > DP_ROUNDING_DITHERED)
        fail("dp_apply_params.rounding " + std::to_string(params.rounding) + " is not a dp_rounding");
    static_assert(int(deltapack::Rounding::Auto) == DP_ROUNDING_AUTO && int(deltapack::Rounding::Nearest) ==
                  DP_ROUNDING_NEAREST && int(deltapack::Rounding::Dithered) == DP_ROUNDING_DITHERED, "same order");
    p.rounding = deltapack::Rounding(params.rounding);
    return p;
}

}  // namespace

extern "C" {

const char* dp_version(void) { return DELTAPACK_VERSION; }

const char* dp_last_error(void) { return g_error.c_str(); }

dp_apply_params dp_apply_default_params(void) { return {1.0f, 0, 1, DP_ROUNDING_AUTO}; }

const char* dp_dtype_name(dp_dtype t) {
    return guarded<const char*>(nullptr, [&] { return deltapack::dtype_name(to_dtype(int(t), "dp_dtype_name")); });
}

size_t dp_dtype_size(dp_dtype t) {
    return guarded<size_t>(0, [&] { return deltapack::dtype_size(to_dtype(int(t), "dp_dtype_size")); });
}

const char* dp_simd(void) {
    // The few path names as static strings, so the pointer stays valid.
    const std::string path = deltapack::simd();
    for (const char* known : {"scalar", "avx2", "avx512", "neon"})
        if (path == known) return known;
    return "unknown";
}

int dp_set_simd(const char* path) {
    return guarded(-1, [&] {
        deltapack::set_simd(path ? path : "auto");
        return 0;
    });
}

// ----------------------------------------------------------------------------- delta files

dp_file* dp_file_open(const char* path) {
    return guarded<dp_file*>(nullptr, [&] {
        need(path, "dp_file_open", "path");
        auto f = std::make_unique<dp_file>();
        f->file = deltapack::DeltaFile::open(path);
        f->names = f->file->keys();
        // The manifest was checked by open(); only its metadata value is kept for lookups.
        deltapack::json::Value manifest = deltapack::json::parse(f->file->manifest());
        if (const deltapack::json::Value* m = manifest.find("metadata")) f->metadata = *m;
        return f.release();
    });
}

void dp_file_close(dp_file* f) { delete f; }

size_t dp_file_count(const dp_file* f) { return f ? f->names.size() : 0; }

int64_t dp_file_name(const dp_file* f, size_t i, char* buf, size_t buf_size) {
    return guarded<int64_t>(-1, [&] {
        need(f, "dp_file_name", "f");
        return name_at(f->names, i, f->file->path(), buf, buf_size, "dp_file_name");
    });
}

// The manifest entry of tensor `name` (no CRC check: only shape, dtype and codec are read).
static deltapack::EncodedRef entry(const dp_file* f, const char* name, const char* fn) {
    need(f, fn, "f");
    need(name, fn, "name");
    return f->file->entry(name);
}

int dp_file_shape(const dp_file* f, const char* name, int64_t* dims, size_t max_dims) {
    return guarded(-1, [&] {
        deltapack::EncodedRef e = entry(f, name, "dp_file_shape");
        return copy_shape(tensor_where(f, name), e.shape, dims, max_dims);
    });
}

int64_t dp_file_numel(const dp_file* f, const char* name) {
    return guarded<int64_t>(-1, [&] {
        deltapack::EncodedRef e = entry(f, name, "dp_file_numel");
        return deltapack::ArrayRef{nullptr, e.dtype, e.shape}.numel();
    });
}

int dp_file_dtype(const dp_file* f, const char* name) {
    return guarded(-1, [&] { return int(entry(f, name, "dp_file_dtype").dtype); });
}

int64_t dp_file_codec(const dp_file* f, const char* name, char* buf, size_t buf_size) {
    return guarded<int64_t>(-1, [&] { return copy_text(entry(f, name, "dp_file_codec").codec, buf, buf_size, "dp_file_codec"); });
}

int64_t dp_file_metadata(const dp_file* f, const char* key, char* buf, size_t buf_size) {
    return guarded<int64_t>(-1, [&] {
        need(f, "dp_file_metadata", "f");
        need(key, "dp_file_metadata", "key");
        if (f->metadata.kind != deltapack::json::Value::Object)
            fail(f->file->path() + ": no metadata object in this delta file");
        const deltapack::json::Value* v = f->metadata.find(key);
        if (!v) fail(f->file->path() + ": no metadata key '" + key + "'");
        return copy_text(deltapack::json::dump(*v), buf, buf_size, "dp_file_metadata");
    });
}

int64_t dp_file_manifest(const dp_file* f, char* buf, size_t buf_size) {
    return guarded<int64_t>(-1, [&] {
        need(f, "dp_file_manifest", "f");
        return copy_text(f->file->manifest(), buf, buf_size, "dp_file_manifest");
    });
}

int dp_apply(const dp_file* f, const char* name, const void* base, size_t base_size, dp_dtype base_dtype, void* out,
             size_t out_size, dp_dtype out_dtype, dp_apply_params params) {
    return guarded(-1, [&] {
        need(f, "dp_apply", "f");
        need(name, "dp_apply", "name");
        need(base, "dp_apply", "base");
        need(out, "dp_apply", "out");
        const std::string where = tensor_where(f, name);
        const deltapack::DType bt = float_dtype(base_dtype, where, "base"), ot = float_dtype(out_dtype, where, "out");
        const std::vector<int64_t>& shape = f->file->shape(name);
        check_size(where, "base", shape, bt, base_size);  // before reading: a wrong call fails fast
        check_size(where, "out", shape, ot, out_size);
        const deltapack::DeltaTensor e = f->file->get(name, params.verify != 0);
        deltapack::apply(e.ref, deltapack::ArrayRef{const_cast<void*>(base), bt, shape}, deltapack::ArrayRef{out, ot, shape},
                         engine_params(params));
        return 0;
    });
}

int dp_decode(const dp_file* f, const char* name, float* out, size_t out_size, int threads) {
    return guarded(-1, [&] {
        need(f, "dp_decode", "f");
        need(name, "dp_decode", "name");
        need(out, "dp_decode", "out");
        const std::vector<int64_t>& shape = f->file->shape(name);
        check_size(tensor_where(f, name), "out", shape, deltapack::DType::F32, out_size);
        const deltapack::DeltaTensor e = f->file->get(name, true);
        deltapack::decode(e.ref, deltapack::ArrayRef{out, deltapack::DType::F32, shape}, threads);
        return 0;
    });
}

// ----------------------------------------------------------------------------- base models

dp_base* dp_base_open(const char* path) {
    return guarded<dp_base*>(nullptr, [&] {
        need(path, "dp_base_open", "path");
        auto b = std::make_unique<dp_base>();
        b->files = deltapack::ModelFiles::open(path);
        b->names = b->files->keys();
        return b.release();
    });
}

void dp_base_close(dp_base* b) { delete b; }

size_t dp_base_count(const dp_base* b) { return b ? b->names.size() : 0; }

int64_t dp_base_name(const dp_base* b, size_t i, char* buf, size_t buf_size) {
    return guarded<int64_t>(-1, [&] {
        need(b, "dp_base_name", "b");
        return name_at(b->names, i, b->files->path(), buf, buf_size, "dp_base_name");
    });
}

static const deltapack::TensorInfo& base_tensor(const dp_base* b, const char* name, const char* fn) {
    need(b, fn, "b");
    need(name, fn, "name");
    return b->files->info(name);
}

int dp_base_shape(const dp_base* b, const char* name, int64_t* dims, size_t max_dims) {
    return guarded(-1, [&] {
        const deltapack::TensorInfo& t = base_tensor(b, name, "dp_base_shape");
        return copy_shape(b->files->path() + ": tensor '" + name + "'", t.shape, dims, max_dims);
    });
}

int dp_base_dtype(const dp_base* b, const char* name) {
    return guarded(-1, [&] { return int(base_tensor(b, name, "dp_base_dtype").dtype); });
}

int dp_base_read(const dp_base* b, const char* name, void* out, size_t out_size) {
    return guarded(-1, [&] {
        const deltapack::TensorInfo& t = base_tensor(b, name, "dp_base_read");
        need(out, "dp_base_read", "out");
        check_size(b->files->path() + ": tensor '" + name + "'", "out", t.shape, t.dtype, out_size);
        b->files->read(name, out, out_size);
        return 0;
    });
}

int dp_apply_from_base(const dp_file* f, const dp_base* b, const char* name, void* out, size_t out_size,
                       dp_dtype out_dtype, dp_apply_params params) {
    return guarded(-1, [&] {
        need(f, "dp_apply_from_base", "f");
        const deltapack::TensorInfo& t = base_tensor(b, name, "dp_apply_from_base");
        need(out, "dp_apply_from_base", "out");
        const std::string where = tensor_where(f, name);
        const std::string base_where = b->files->path() + ": tensor '" + name + "'";
        const std::vector<int64_t>& shape = f->file->shape(name);
        if (t.shape != shape)
            fail(where + ": the delta's shape " + shape_text(shape) + " differs from the base's " + shape_text(t.shape) +
                 " in " + b->files->path());
        float_dtype(int(t.dtype), base_where, "base");
        const deltapack::DType ot = float_dtype(out_dtype, where, "out");
        check_size(where, "out", shape, ot, out_size);
        const deltapack::DeltaTensor d = f->file->get(name, params.verify != 0);
        const deltapack::EncodedRef& e = d.ref;
        if (t.dtype == ot) {  // the base read straight into out, rebuilt in place
            b->files->read(name, out, out_size);
            deltapack::apply(e, deltapack::ArrayRef{out, ot, e.shape}, deltapack::ArrayRef{out, ot, e.shape},
                             engine_params(params));
        } else {
            std::vector<uint8_t> base(size_t(t.nbytes));
            b->files->read(name, base.data(), t.nbytes);
            deltapack::apply(e, deltapack::ArrayRef{base.data(), t.dtype, e.shape}, deltapack::ArrayRef{out, ot, e.shape},
                             engine_params(params));
        }
        return 0;
    });
}

// ----------------------------------------------------------------------------- checkpoints

dp_checkpoint* dp_checkpoint_open(const dp_file* f, const dp_base* b, int force) {
    return guarded<dp_checkpoint*>(nullptr, [&] {
        need(f, "dp_checkpoint_open", "f");
        auto c = std::make_unique<dp_checkpoint>();
        c->ck = std::make_unique<deltapack::CheckpointDelta>(b ? b->files : nullptr, f->file, force != 0);
        for (const deltapack::CheckpointTensor& t : c->ck->tensors()) c->names.push_back(t.name);
        return c.release();
    });
}

void dp_checkpoint_close(dp_checkpoint* c) { delete c; }

size_t dp_checkpoint_count(const dp_checkpoint* c) { return c ? c->names.size() : 0; }

int64_t dp_checkpoint_name(const dp_checkpoint* c, size_t i, char* buf, size_t buf_size) {
    return guarded<int64_t>(-1, [&] {
        need(c, "dp_checkpoint_name", "c");
        return name_at(c->names, i, c->ck->delta().path(), buf, buf_size, "dp_checkpoint_name");
    });
}

static const deltapack::CheckpointTensor& ck_tensor(const dp_checkpoint* c, const char* name, const char* fn) {
    need(c, fn, "c");
    need(name, fn, "name");
    return c->ck->tensor(name);
}

int dp_checkpoint_kind(const dp_checkpoint* c, const char* name) {
    return guarded(-1, [&] { return int(ck_tensor(c, name, "dp_checkpoint_kind").kind); });
}

int dp_checkpoint_dtype(const dp_checkpoint* c, const char* name) {
    return guarded(-1, [&] { return int(ck_tensor(c, name, "dp_checkpoint_dtype").dtype); });
}

int dp_checkpoint_shape(const dp_checkpoint* c, const char* name, int64_t* dims, size_t max_dims) {
    return guarded(-1, [&] {
        const deltapack::CheckpointTensor& t = ck_tensor(c, name, "dp_checkpoint_shape");
        return copy_shape(c->ck->delta().path() + ": tensor '" + name + "'", t.shape, dims, max_dims);
    });
}

int64_t dp_checkpoint_source(const dp_checkpoint* c, const char* name, char* buf, size_t buf_size) {
    return guarded<int64_t>(-1, [&] {
        return copy_text(ck_tensor(c, name, "dp_checkpoint_source").source, buf, buf_size, "dp_checkpoint_source");
    });
}

int dp_checkpoint_rebuild(const dp_checkpoint* c, const char* name, void* out, size_t out_size, dp_dtype out_dtype,
                          dp_apply_params params) {
    return guarded(-1, [&] {
        ck_tensor(c, name, "dp_checkpoint_rebuild");
        need(out, "dp_checkpoint_rebuild", "out");
        c->ck->rebuild(name, out, out_size, to_dtype(out_dtype, "out"), params.alpha, params.threads,
                       engine_params(params).rounding);
        return 0;
    });
}

int dp_checkpoint_rebuild_from(const dp_checkpoint* c, const char* name, const void* base, size_t base_size,
                               dp_dtype base_dtype, void* out, size_t out_size, dp_dtype out_dtype,
                               dp_apply_params params) {
    return guarded(-1, [&] {
        ck_tensor(c, name, "dp_checkpoint_rebuild_from");
        need(out, "dp_checkpoint_rebuild_from", "out");
        c->ck->rebuild_from(name, base, base_size, to_dtype(base_dtype, "base"), out, out_size,
                            to_dtype(out_dtype, "out"), params.alpha, params.threads, true,
                            engine_params(params).rounding);
        return 0;
    });
}

int dp_apply_checkpoint(const char* base, const char* delta, const char* out, const char* dtype,
                        dp_apply_params params, int force, int overwrite) {
    return guarded(-1, [&] {
        need(base, "dp_apply_checkpoint", "base");
        need(delta, "dp_apply_checkpoint", "delta");
        need(out, "dp_apply_checkpoint", "out");
        deltapack::ApplyCheckpointOptions o;
        o.alpha = params.alpha;
        o.threads = params.threads;
        o.rounding = engine_params(params).rounding;
        o.dtype = dtype ? dtype : "";
        o.force = force != 0;
        o.overwrite = overwrite != 0;
        deltapack::apply_checkpoint(base, delta, out, o);
        return 0;
    });
}

// ----------------------------------------------------------------------------- the bank

static std::string bank_where(const dp_bank* b, const char* tensor) { return b->path + ": tensor '" + tensor + "'"; }

// The live buffer of `tensor` (its dtype and shape); a failure naming the base for an unknown name.
static deltapack::ArrayRef bank_tensor(const dp_bank* b, const char* tensor, const char* fn) {
    need(b, fn, "bank");
    need(tensor, fn, "tensor");
    return b->bank->tensor(tensor);
}

// A mix from C arrays: names[0..n) with alphas[0..n) (NULL: all 1).
static deltapack::Bank::Mix bank_mix(size_t n, const char* const* names, const float* alphas, const char* fn) {
    if (n && !names) fail(std::string(fn) + ": names is NULL but n is " + std::to_string(n));
    deltapack::Bank::Mix mix;
    for (size_t i = 0; i < n; ++i) {
        if (!names[i]) fail(std::string(fn) + ": names[" + std::to_string(i) + "] is NULL");
        mix.emplace_back(names[i], alphas ? alphas[i] : 1.0f);
    }
    return mix;
}

// Calls that take the bank exclusively, refused on a thread that holds its shared lock (they would wait forever).
static void exclusive(const dp_bank* b, const char* fn) {
    need(b, fn, "bank");
    auto it = g_bank_reads.find(b);
    if (it != g_bank_reads.end() && it->second > 0)
        fail(std::string(fn) + ": this thread holds the bank's shared lock (dp_bank_lock_shared), so the call would "
             "wait for itself; dp_bank_unlock_shared first");
}

// A buffer of `count` floats that must hold `expected`; NULL only when empty.
static void check_count(const std::string& where, const char* what, const void* p, size_t count, int64_t expected,
                        int64_t batch, int64_t width, const char* fn) {
    if (count != uint64_t(expected))
        fail(where + ": " + what + " holds " + std::to_string(count) + " values, expected " + std::to_string(expected) +
             " (batch " + std::to_string(batch) + " x " + std::to_string(width) + " f32)");
    if (count && !p) fail(std::string(fn) + ": " + what + " is NULL");
}

// A tensor's matrix view for products (the engine's: cols its last dimension, rows the rest), with a batch
// of `batch` rows whose x (batch x cols) and y (batch x rows) sizes fit in 64 bits.
static deltapack::Matrix batch_view(const deltapack::ArrayRef& t, int64_t batch, const std::string& where) {
    const deltapack::Matrix m = deltapack::Matrix::of(t.shape);
    if (batch < 0 || (m.cols && batch > std::numeric_limits<int64_t>::max() / m.cols) ||
        (m.rows && batch > std::numeric_limits<int64_t>::max() / m.rows))
        fail(where + ": batch " + std::to_string(batch) + " is out of range");
    return m;
}

dp_bank* dp_bank_open(const char* path) {
    return guarded<dp_bank*>(nullptr, [&] {
        need(path, "dp_bank_open", "path");
        auto b = std::make_unique<dp_bank>();
        b->bank = std::make_unique<deltapack::Bank>(path);
        b->path = path;
        b->names = b->bank->tensor_names();
        return b.release();
    });
}

void dp_bank_close(dp_bank* b) {
    if (!b) return;
    auto it = g_bank_reads.find(b);
    if (it != g_bank_reads.end()) {
        for (int i = 0; i < it->second; ++i) b->bank->unlock_shared();
        g_bank_reads.erase(it);
    }
    delete b;
}

int dp_bank_add(dp_bank* b, const char* name, const char* delta_path, int force) {
    return guarded(-1, [&] {
        exclusive(b, "dp_bank_add");
        need(name, "dp_bank_add", "name");
        need(delta_path, "dp_bank_add", "delta_path");
        b->bank->add(name, delta_path, force != 0);
        return 0;
    });
}

int dp_bank_remove(dp_bank* b, const char* name) {
    return guarded(-1, [&] {
        exclusive(b, "dp_bank_remove");
        need(name, "dp_bank_remove", "name");
        b->bank->remove(name);
        return 0;
    });
}

size_t dp_bank_fine_tune_count(const dp_bank* b) { return b ? b->bank->fine_tunes().size() : 0; }

int64_t dp_bank_fine_tune_name(const dp_bank* b, size_t i, char* buf, size_t buf_size) {
    return guarded<int64_t>(-1, [&] {
        need(b, "dp_bank_fine_tune_name", "bank");
        const std::vector<std::string> names = b->bank->fine_tunes();
        if (i >= names.size())
            fail(b->path + ": fine-tune index " + std::to_string(i) + " out of range (" + std::to_string(names.size()) +
                 " fine-tunes)");
        return copy_text(names[i], buf, buf_size, "dp_bank_fine_tune_name");
    });
}

int dp_bank_activate(dp_bank* b, size_t n, const char* const* names, const float* alphas, int threads) {
    return guarded(-1, [&] {
        exclusive(b, "dp_bank_activate");
        b->bank->activate(bank_mix(n, names, alphas, "dp_bank_activate"), threads);
        return 0;
    });
}

int64_t dp_bank_last_rewritten(const dp_bank* b, uint8_t* flags, size_t flags_size) {
    return guarded<int64_t>(-1, [&] {
        need(b, "dp_bank_last_rewritten", "bank");
        need(flags, "dp_bank_last_rewritten", "flags");
        if (flags_size != b->names.size())
            fail(b->path + ": flags holds " + std::to_string(flags_size) + " bytes, expected " +
                 std::to_string(b->names.size()) + " (one per tensor)");
        const std::vector<std::string> done = b->bank->last_rewritten();
        const std::set<std::string> rewritten(done.begin(), done.end());
        for (size_t i = 0; i < b->names.size(); ++i) flags[i] = rewritten.count(b->names[i]) ? 1 : 0;
        return int64_t(rewritten.size());
    });
}

size_t dp_bank_count(const dp_bank* b) { return b ? b->names.size() : 0; }

int64_t dp_bank_tensor_name(const dp_bank* b, size_t i, char* buf, size_t buf_size) {
    return guarded<int64_t>(-1, [&] {
        need(b, "dp_bank_tensor_name", "bank");
        return name_at(b->names, i, b->path, buf, buf_size, "dp_bank_tensor_name");
    });
}

int dp_bank_shape(const dp_bank* b, const char* tensor, int64_t* dims, size_t max_dims) {
    return guarded(-1, [&] {
        const deltapack::ArrayRef t = bank_tensor(b, tensor, "dp_bank_shape");
        return copy_shape(bank_where(b, tensor), t.shape, dims, max_dims);
    });
}

int dp_bank_dtype(const dp_bank* b, const char* tensor) {
    return guarded(-1, [&] { return int(bank_tensor(b, tensor, "dp_bank_dtype").dtype); });
}

int64_t dp_bank_numel(const dp_bank* b, const char* tensor) {
    return guarded<int64_t>(-1, [&] { return bank_tensor(b, tensor, "dp_bank_numel").numel(); });
}

int dp_bank_tensor(const dp_bank* b, const char* tensor, const void** data, size_t* nbytes) {
    return guarded(-1, [&] {
        const deltapack::ArrayRef t = bank_tensor(b, tensor, "dp_bank_tensor");
        need(data, "dp_bank_tensor", "data");
        *data = t.data;
        if (nbytes) *nbytes = t.nbytes();
        return 0;
    });
}

int dp_bank_rebuild(const dp_bank* b, size_t n, const char* const* names, const float* alphas, const char* tensor,
                    void* out, size_t out_size, int threads) {
    return guarded(-1, [&] {
        const deltapack::ArrayRef t = bank_tensor(b, tensor, "dp_bank_rebuild");
        const deltapack::Bank::Mix mix = bank_mix(n, names, alphas, "dp_bank_rebuild");
        check_size(bank_where(b, tensor), "out", t.shape, t.dtype, out_size);
        need(out, "dp_bank_rebuild", "out");
        b->bank->rebuild(mix, tensor, out, out_size, threads);
        return 0;
    });
}

int dp_bank_touches(const dp_bank* b, const char* fine_tune, const char* tensor) {
    return guarded(-1, [&] {
        bank_tensor(b, tensor, "dp_bank_touches");
        need(fine_tune, "dp_bank_touches", "fine_tune");
        return b->bank->touches(fine_tune, tensor) ? 1 : 0;
    });
}

int dp_bank_product(const dp_bank* b, const char* fine_tune, const char* tensor, const float* x, size_t x_count,
                    int64_t batch, float alpha, float* y, size_t y_count, int threads) {
    return guarded(-1, [&] {
        const deltapack::ArrayRef t = bank_tensor(b, tensor, "dp_bank_product");
        need(fine_tune, "dp_bank_product", "fine_tune");
        const std::string where = bank_where(b, tensor);
        const deltapack::Matrix m = batch_view(t, batch, where);
        check_count(where, "x", x, x_count, batch * m.cols, batch, m.cols, "dp_bank_product");
        check_count(where, "y", y, y_count, batch * m.rows, batch, m.rows, "dp_bank_product");
        b->bank->product(fine_tune, tensor, x, batch, alpha, y, threads);
        return 0;
    });
}

int dp_bank_mixed_product(const dp_bank* b, const char* tensor, size_t n_names, const char* const* names,
                          const int32_t* which, size_t which_count, const float* x, size_t x_count, int64_t batch,
                          float alpha, float* y, size_t y_count, int threads) {
    return guarded(-1, [&] {
        const deltapack::ArrayRef t = bank_tensor(b, tensor, "dp_bank_mixed_product");
        const std::string where = bank_where(b, tensor);
        const deltapack::Matrix m = batch_view(t, batch, where);
        if (n_names && !names) fail("dp_bank_mixed_product: names is NULL but n_names is " + std::to_string(n_names));
        if (n_names > size_t(std::numeric_limits<int32_t>::max()))
            fail("dp_bank_mixed_product: n_names " + std::to_string(n_names) + " is out of range");
        std::vector<std::string> fine_tunes;
        for (size_t i = 0; i < n_names; ++i) {
            if (!names[i]) fail("dp_bank_mixed_product: names[" + std::to_string(i) + "] is NULL");
            fine_tunes.emplace_back(names[i]);
        }
        if (which_count != uint64_t(batch))
            fail(where + ": which holds " + std::to_string(which_count) + " entries, expected " + std::to_string(batch) +
                 " (one per batch row)");
        if (which_count && !which) fail("dp_bank_mixed_product: which is NULL");
        for (size_t i = 0; i < which_count; ++i)
            if (which[i] < -1 || which[i] >= int32_t(n_names))
                fail(where + ": which[" + std::to_string(i) + "] is " + std::to_string(which[i]) + ", outside [-1, " +
                     std::to_string(n_names) + ")");
        check_count(where, "x", x, x_count, batch * m.cols, batch, m.cols, "dp_bank_mixed_product");
        check_count(where, "y", y, y_count, batch * m.rows, batch, m.rows, "dp_bank_mixed_product");
        b->bank->mixed_product(tensor, fine_tunes, which, x, batch, alpha, y, threads);
        return 0;
    });
}

int dp_bank_delta_rows(const dp_bank* b, const char* fine_tune, const char* tensor, const int64_t* rows, size_t n,
                       float alpha, float* out, size_t out_count) {
    return guarded(-1, [&] {
        const deltapack::ArrayRef t = bank_tensor(b, tensor, "dp_bank_delta_rows");
        need(fine_tune, "dp_bank_delta_rows", "fine_tune");
        const std::string where = bank_where(b, tensor);
        const deltapack::Matrix m = deltapack::Matrix::of(t.shape);
        const int64_t nrows = m.rows, cols = m.cols;
        if (cols && n > uint64_t(std::numeric_limits<int64_t>::max() / cols))
            fail(where + ": " + std::to_string(n) + " rows is out of range");
        if (n && !rows) fail("dp_bank_delta_rows: rows is NULL but n is " + std::to_string(n));
        if (out_count != uint64_t(int64_t(n) * cols))
            fail(where + ": out holds " + std::to_string(out_count) + " values, expected " +
                 std::to_string(int64_t(n) * cols) + " (" + std::to_string(n) + " rows x " + std::to_string(cols) +
                 " f32)");
        if (out_count && !out) fail("dp_bank_delta_rows: out is NULL");
        for (size_t i = 0; i < n; ++i)  // all checked before anything is written
            if (rows[i] < 0 || rows[i] >= nrows)
                fail(where + ": row " + std::to_string(rows[i]) + " (rows[" + std::to_string(i) + "]) is outside [0, " +
                     std::to_string(nrows) + ")");
        b->bank->delta_rows(fine_tune, tensor, rows, int64_t(n), alpha, out);
        return 0;
    });
}

int dp_bank_set_cache_budget(dp_bank* b, uint64_t bytes) {
    return guarded(-1, [&] {
        exclusive(b, "dp_bank_set_cache_budget");
        b->bank->set_cache_budget(bytes);
        return 0;
    });
}

int64_t dp_bank_cache_bytes(const dp_bank* b) {
    return guarded<int64_t>(-1, [&] {
        need(b, "dp_bank_cache_bytes", "bank");
        return int64_t(b->bank->cache_bytes());
    });
}

int dp_bank_lock_shared(const dp_bank* b) {
    return guarded(-1, [&] {
        need(b, "dp_bank_lock_shared", "bank");
        b->bank->lock_shared();
        ++g_bank_reads[b];
        return 0;
    });
}

int dp_bank_unlock_shared(const dp_bank* b) {
    return guarded(-1, [&] {
        need(b, "dp_bank_unlock_shared", "bank");
        auto it = g_bank_reads.find(b);
        if (it == g_bank_reads.end() || it->second <= 0)
            fail("dp_bank_unlock_shared: this thread holds no shared lock on this bank");
        b->bank->unlock_shared();
        if (--it->second == 0) g_bank_reads.erase(it);
        return 0;
    });
}

// ----------------------------------------------------------------------------- CUDA

int dp_cuda_built(void) { return deltapack::cuda_built() ? 1 : 0; }

int dp_cuda_device_count(void) {
    return guarded(0, [&] { return deltapack::cuda_device_count(); });
}

dp_device_delta* dp_device_delta_open(const dp_file* f, const char* name, int device, int verify, void* stream) {
    return guarded<dp_device_delta*>(nullptr, [&] {
        need(f, "dp_device_delta_open", "f");
        need(name, "dp_device_delta_open", "name");
        auto d = std::make_unique<dp_device_delta>();
        d->where = tensor_where(f, name);
        const deltapack::DeltaTensor e = f->file->get(name, verify != 0);
        d->delta = std::make_unique<deltapack::DeviceDelta>(e.ref, device, stream);
        return d.release();
    });
}

void dp_device_delta_close(dp_device_delta* d) { delete d; }

int dp_device_apply(const dp_device_delta* d, const void* base, size_t base_size, dp_dtype base_dtype, void* out,
                    size_t out_size, dp_dtype out_dtype, dp_apply_params params, void* stream) {
    return guarded(-1, [&] {
        need(d, "dp_device_apply", "d");
        need(base, "dp_device_apply", "base");
        need(out, "dp_device_apply", "out");
        const deltapack::DType bt = float_dtype(base_dtype, d->where, "base"), ot = float_dtype(out_dtype, d->where, "out");
        check_size(d->where, "base", d->delta->shape(), bt, base_size);
        check_size(d->where, "out", d->delta->shape(), ot, out_size);
        d->delta->apply(base, bt, out, ot, engine_params(params), stream);
        return 0;
    });
}

int dp_device_decode(const dp_device_delta* d, float* out, size_t out_size, void* stream) {
    return guarded(-1, [&] {
        need(d, "dp_device_decode", "d");
        need(out, "dp_device_decode", "out");
        check_size(d->where, "out", d->delta->shape(), deltapack::DType::F32, out_size);
        d->delta->decode(out, stream);
        return 0;
    });
}

namespace {
// The jobs of a C mixed batch; x and y unchecked (device memory) beyond NULL where the batch is not empty.
std::vector<deltapack::DeviceProductJob> device_jobs(size_t n, const dp_device_delta* const* d, const float* const* x,
                                                     const int64_t* batch, float* const* y, const char* fn) {
    if (n) {
        need(d, fn, "d");
        need(batch, fn, "batch");
    }
    std::vector<deltapack::DeviceProductJob> jobs;
    for (size_t i = 0; i < n; ++i) {
        need(d[i], fn, "a d[i]");
        if (batch[i] < 0) fail(std::string(fn) + ": batch[" + std::to_string(i) + "] is negative");
        const float* xi = x ? x[i] : nullptr;
        float* yi = y ? y[i] : nullptr;
        if (x && batch[i]) need(xi, fn, "an x[i]");
        if (y && batch[i]) need(yi, fn, "a y[i]");
        jobs.push_back(deltapack::DeviceProductJob{d[i]->delta.get(), xi, batch[i], yi});
    }
    return jobs;
}
}  // namespace

int64_t dp_device_products_workspace(size_t n, const dp_device_delta* const* d, const int64_t* batch) {
    return guarded<int64_t>(-1, [&] {
        return int64_t(deltapack::device_products_workspace(
            device_jobs(n, d, nullptr, batch, nullptr, "dp_device_products_workspace")));
    });
}

int dp_device_products(size_t n, const dp_device_delta* const* d, const float* const* x, const int64_t* batch,
                       float* const* y, float alpha, void* workspace, size_t workspace_size, void* stream) {
    return guarded(-1, [&] {
        if (n) {
            need(x, "dp_device_products", "x");
            need(y, "dp_device_products", "y");
        }
        deltapack::device_products(device_jobs(n, d, x, batch, y, "dp_device_products"), alpha, workspace,
                                   workspace_size, stream);
        return 0;
    });
}

}  // extern "C"
