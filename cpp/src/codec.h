// The codec interface and registry. A codec validates and canonicalises its parameters, encodes a
// matrix, and prepares a row decoder over validated components. Adding a codec = one file plus
// one line in registry.cpp.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "deltapack/deltapack.h"
#include "cuda/delta_view.h"
#include "json.h"
#include "kernels.h"

namespace deltapack {

// The (rows, cols) view of a tensor: rows = prod(shape[:-1]), cols = shape[-1]; 0-d is (1, 1).
struct Matrix {
    int64_t rows = 1, cols = 1;
    static Matrix of(const std::vector<int64_t>& shape);
};

// Decodes blocks of rows of one tensor into f32 (dst is nrows x cols, row-major).
struct RowDecoder {
    virtual ~RowDecoder() = default;
    virtual int rows_per_block() const { return 1; }
    virtual void decode(int64_t row0, int nrows, float* dst, const Kernels& k) const = 0;
    // The packed form as the CUDA kernels (and their host emulation) read it: pointers to the components.
    virtual DeltaView view() const = 0;
    // A rebuild of rows [row0, row0 + nrows) straight from the packed form: out = round(base + alpha * delta),
    // the bits decode + add_round would give. False where the codec has none or declines (the engine then
    // decodes the rows and adds them, and reports any error).
    virtual bool add_rows(int64_t row0, int nrows, const uint8_t* base, DType base_dtype, float alpha, uint8_t* out,
                          DType out_dtype, bool stream, const Kernels& k) const {
        (void)row0, (void)nrows, (void)base, (void)base_dtype, (void)alpha, (void)out, (void)out_dtype, (void)stream;
        (void)k;
        return false;
    }

    // Batch products (mixed batches): for the rows [row0, row0 + nrows) of the delta and the batch rows
    // x_b = x.data + b * cols (f32, b < x.rows), y[b * y_stride + r] += alpha * (delta row r . x_b). Nothing is
    // rebuilt: a codec reads its packed form (sign: sums of x over the set bits; lowrank: u . (v x)); the
    // default decodes a few rows at a time into `scratch` and takes dot products.
    struct Batch {
        const float* data;
        int rows;
        int64_t cols;
    };
    // Whether product() reads the packed form for any number of rows (sign, lowrank), rather than decoding
    // rows_per_block()-sized tiles.
    virtual bool product_from_packed() const { return false; }
    // What every row shares, computed once per batch before product() runs (on several threads).
    virtual void begin_product(const Batch& x, const Kernels& k) { (void)x, (void)k; }
    virtual void product(int64_t row0, int nrows, const Batch& x, float alpha, float* y, size_t y_stride,
                         const Kernels& k, std::vector<float>& scratch) const;
};

// Rows of a tensor that is not in memory (compress's ft - base, computed from the files as asked for).
struct RowSource {
    virtual ~RowSource() = default;
    virtual void row(int64_t r, float* dst, const Kernels& k) const = 0;  // safe from several threads
};

// A tensor to encode: f32/f16/bf16 matrix `a`, or `source` (then a.data is null); rows are converted to f32
// on demand.
struct EncodeInput {
    const ArrayRef& a;
    Matrix m;
    const RowSource* source = nullptr;
    void row(int64_t r, float* dst, const Kernels& k) const {
        if (source) return source->row(r, dst, k);
        k.to_f32(static_cast<const uint8_t*>(a.data) + size_t(r * m.cols) * dtype_size(a.dtype), a.dtype,
                 dst, size_t(m.cols));
    }
};

// encode() over rows from a source: the same parameters, checks and components.
Encoded encode_rows(const std::string& codec, const std::string& params, const RowSource& source,
                    const std::vector<int64_t>& shape, int threads);

class Codec {
public:
    virtual ~Codec() = default;
    virtual const char* name() const = 0;
    // Checks keys, types and ranges; fills defaults. Throws std::invalid_argument.
    virtual json::Value canonical(const json::Value& params) const = 0;
    // Encodes; may add encoder-chosen values to `params`.
    virtual std::map<std::string, Array> encode(json::Value& params, const EncodeInput& in,
                                                int threads) const = 0;
    // Validates the components against shape and params (throws FormatError) and returns a decoder.
    virtual std::unique_ptr<RowDecoder> prepare(const EncodedRef& e, const json::Value& params,
                                                const Matrix& m) const = 0;
};

const Codec& find_codec(const std::string& name);  // throws std::invalid_argument if unknown
const std::vector<const Codec*>& all_codecs();

// ------------------------------------------------------------------- parameter helpers

// Reads a params object: each accessor consumes a key; finish() rejects unknown keys.
class ParamReader {
public:
    ParamReader(const char* codec, const json::Value& params);
    int64_t integer(const char* key, int64_t def, int64_t lo, int64_t hi);
    double number(const char* key, double def, double lo, double hi_exclusive);
    std::string choice(const char* key, const std::string& def, const std::vector<std::string>& allowed);
    const json::Value* take(const char* key);         // consumes a key the codec checks itself (null if absent)
    void put(const char* key, json::Value canonical);  // ... and writes its canonical value
    json::Value finish();  // the canonical object (keys in accessor order)

private:
    [[noreturn]] void fail(const std::string& msg) const;
    std::string codec_;
    const json::Value& in_;
    std::vector<std::string> used_;
    json::Value out_ = json::Value::make_object();
};

int64_t param_int(const json::Value& params, const char* key);
double param_num(const json::Value& params, const char* key);
std::string param_str(const json::Value& params, const char* key);

// ------------------------------------------------------------------- component helpers

// Fetches a component and checks dtype and exact shape. Throws FormatError naming tensor/component.
const ArrayRef& need(const EncodedRef& e, const char* comp, DType dtype, const std::vector<int64_t>& shape);
// Fetches a 1-D component of any length with the given dtype.
const ArrayRef& need_1d(const EncodedRef& e, const char* comp, DType dtype);
[[noreturn]] void bad_component(const EncodedRef& e, const std::string& what);

// Every shape deltapack reads from a file (tensors, components, checkpoint records, fingerprints): dimensions
// >= 0 whose nonzero ones multiply to at most kMaxExtent. It bounds every row count, row width and per-row size
// computed from a shape (a zero dimension must not hide a huge other one: [0, 2^63-1] has no elements but a
// row width).
constexpr uint64_t kMaxExtent = uint64_t(1) << 48;
bool plausible_shape(const std::vector<int64_t>& shape);

// std::invalid_argument("alpha nan is invalid: ...") unless alpha is finite: every entry point that scales a delta.
void check_alpha(float alpha);

// The rules every rebuild (CPU and GPU) shares: f32/f16/bf16 in and out, in place only in one dtype, no partial
// overlap (std::invalid_argument naming the tensor); whether `rounding` dithers into `out`; the errors a damaged delta
// causes (FormatError naming the tensor and the row).
void check_apply_buffers(const std::string& tensor, const void* base, DType base_dtype, const void* out,
                         DType out_dtype, int64_t numel);
bool dithers(const std::string& codec, DType out, Rounding rounding);
FormatError bad_step_error(const std::string& tensor, const std::string& value, int64_t row);
FormatError f16_overflow_error(const std::string& tensor, int64_t row);

// The validated delta as the CUDA kernels read it (RowDecoder::view, with the matrix's rows and columns): pointers
// into e's components. FormatError as apply.
DeltaView describe(const EncodedRef& e);

// The checks of a delta file's manifest beyond its tensors: the fields deltapack itself reads from the metadata
// (the checkpoint record, the budget, calibration and PEFT records) and the base fingerprint have the types and
// ranges it expects (docs/FORMAT.md §7). FormatError naming `path` and the field. Called when a file is opened.
// `stored_files`: the size of the file's kFilesKey array (0 when it has none), which kept files stored as bytes
// must lie in; kUnknownSize when there is no file yet (a user's metadata checked before compressing).
constexpr uint64_t kUnknownSize = ~uint64_t(0);
void check_manifest_fields(const json::Value& manifest, const std::string& path, uint64_t stored_files);

inline bool is_float_dtype(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

// dst = f32(ft) - f32(base) over n elements, one IEEE f32 subtraction each (the delta compress stores);
// tmp holds n floats.
inline void subtract_f32(const void* ft, DType ft_dtype, const void* base, DType base_dtype, float* dst, float* tmp,
                         size_t n, const Kernels& k) {
    k.to_f32(static_cast<const uint8_t*>(ft), ft_dtype, dst, n);
    k.to_f32(static_cast<const uint8_t*>(base), base_dtype, tmp, n);
    for (size_t j = 0; j < n; ++j) dst[j] -= tmp[j];
}

// Runs fn(row_begin, row_end) over consecutive pieces of [0, rows) on up to `threads` threads (0 = default);
// fn may be called several times per thread, with pieces in any order.
void parallel_rows(int64_t rows, int64_t work_per_row, int threads,
                   const std::function<void(int64_t, int64_t)>& fn);

// Per-row float64 sums combined sequentially in row order (reference.rows_then_sum).
double sum_in_row_order(const std::vector<double>& per_row);

}  // namespace deltapack
