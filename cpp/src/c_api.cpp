// The C API (cpp/include/deltapack/deltapack_c.h): a thin layer over the C++ API that turns
// exceptions into return codes and a per-thread error message.
#include "deltapack/deltapack_c.h"

#include <string>
#include <vector>

#include "deltapack/deltapack.h"

struct dp_file {
    std::unique_ptr<deltapack::DeltaFile> file;
    std::vector<std::string> names;
};

static thread_local std::string g_error;

template <class F>
static int guarded(F&& fn) {
    try {
        fn();
        g_error.clear();
        return 0;
    } catch (const std::exception& ex) {
        g_error = ex.what();
    } catch (...) {
        g_error = "unknown error";
    }
    return -1;
}

static deltapack::DType to_dtype(dp_dtype t) {
    switch (t) {
        case DP_F32: return deltapack::DType::F32;
        case DP_F16: return deltapack::DType::F16;
        case DP_BF16: return deltapack::DType::BF16;
    }
    throw std::invalid_argument("unknown dp_dtype " + std::to_string(int(t)));
}

extern "C" {

dp_apply_params dp_apply_default_params(void) { return {1.0f, 0, 1}; }

const char* dp_last_error(void) { return g_error.c_str(); }

dp_file* dp_file_open(const char* path) {
    dp_file* out = nullptr;
    guarded([&] {
        if (!path) throw std::invalid_argument("dp_file_open: path is NULL");
        auto f = std::make_unique<dp_file>();
        f->file = deltapack::DeltaFile::open(path);
        f->names = f->file->keys();
        out = f.release();
    });
    return out;
}

void dp_file_close(dp_file* f) { delete f; }

size_t dp_file_count(const dp_file* f) { return f ? f->names.size() : 0; }

const char* dp_file_name(const dp_file* f, size_t i) {
    return f && i < f->names.size() ? f->names[i].c_str() : nullptr;
}

int dp_file_shape(const dp_file* f, const char* name, int64_t* dims, int max_dims) {
    int rank = -1;
    guarded([&] {
        if (!f || !name) throw std::invalid_argument("dp_file_shape: NULL argument");
        deltapack::EncodedRef e = f->file->get(name, false);
        rank = int(e.shape.size());
        for (int i = 0; i < rank && i < max_dims; ++i) dims[i] = e.shape[size_t(i)];
    });
    return rank;
}

int dp_apply(const dp_file* f, const char* name, const void* base, dp_dtype base_dtype, void* out,
             dp_dtype out_dtype, dp_apply_params params) {
    return guarded([&] {
        if (!f || !name || !base || !out) throw std::invalid_argument("dp_apply: NULL argument");
        deltapack::EncodedRef e = f->file->get(name, params.verify != 0);
        deltapack::ArrayRef b{const_cast<void*>(base), to_dtype(base_dtype), e.shape};
        deltapack::ArrayRef o{out, to_dtype(out_dtype), e.shape};
        deltapack::ApplyParams p = deltapack::apply_default_params();
        p.alpha = params.alpha;
        p.threads = params.threads;
        deltapack::apply(e, b, o, p);
    });
}

const char* dp_simd(void) {
    static thread_local std::string name;
    name = deltapack::simd();
    return name.c_str();
}

int dp_set_simd(const char* path) {
    return guarded([&] { deltapack::set_simd(path ? path : "auto"); });
}

}  // extern "C"
