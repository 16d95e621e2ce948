// The reconstruction engine (apply / decode), encode and validate entry points, parameter and
// component helpers shared by the codecs.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <mutex>
#include <thread>

#include "codec.h"

namespace deltapack {

Matrix Matrix::of(const std::vector<int64_t>& shape) {
    Matrix m;
    if (shape.empty()) return m;
    m.cols = shape.back();
    m.rows = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) m.rows *= shape[i];
    return m;
}

static std::string shape_str(const std::vector<int64_t>& s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
}

// ---------------------------------------------------------------------------- params

ParamReader::ParamReader(const char* codec, const json::Value& params) : codec_(codec), in_(params) {
    if (params.kind != json::Value::Object) fail("parameters must be a JSON object");
}

void ParamReader::fail(const std::string& msg) const {
    throw std::invalid_argument("codec '" + codec_ + "': " + msg);
}

const json::Value* ParamReader::take(const char* key) {
    used_.push_back(key);
    return in_.find(key);
}

int64_t ParamReader::integer(const char* key, int64_t def, int64_t lo, int64_t hi) {
    const json::Value* v = take(key);
    int64_t x = def;
    if (v) {
        if (v->kind != json::Value::Number || !v->is_integer) fail(std::string(key) + " must be an integer");
        x = v->integer;
    }
    if (x < lo || x > hi)
        fail(std::string(key) + "=" + std::to_string(x) + " is out of range [" + std::to_string(lo) + ", " +
             std::to_string(hi) + "]");
    out_.set(key, json::Value::make_int(x));
    return x;
}

double ParamReader::number(const char* key, double def, double lo, double hi_exclusive) {
    const json::Value* v = take(key);
    double x = def;
    if (v) {
        if (v->kind != json::Value::Number) fail(std::string(key) + " must be a number");
        x = v->num;
    }
    if (!(x >= lo && x < hi_exclusive))
        fail(std::string(key) + "=" + std::to_string(x) + " is out of range [" + std::to_string(lo) + ", " +
             std::to_string(hi_exclusive) + ")");
    out_.set(key, json::Value::make_number(x));
    return x;
}

std::string ParamReader::choice(const char* key, const std::string& def, const std::vector<std::string>& allowed) {
    const json::Value* v = take(key);
    std::string x = def;
    if (v) {
        if (v->kind != json::Value::String) fail(std::string(key) + " must be a string");
        x = v->str;
    }
    if (std::find(allowed.begin(), allowed.end(), x) == allowed.end()) {
        std::string opts;
        for (auto& a : allowed) opts += (opts.empty() ? "" : ", ") + a;
        fail(std::string(key) + "='" + x + "' is not one of: " + opts);
    }
    out_.set(key, json::Value::make_string(x));
    return x;
}

void ParamReader::put(const char* key, json::Value canonical) { out_.set(key, std::move(canonical)); }

json::Value ParamReader::finish() {
    for (auto& kv : in_.obj)
        if (std::find(used_.begin(), used_.end(), kv.first) == used_.end()) {
            std::string known;
            for (auto& u : used_) known += (known.empty() ? "" : ", ") + u;
            fail("unknown parameter '" + kv.first + "' (known: " + known + ")");
        }
    return out_;
}

int64_t param_int(const json::Value& p, const char* key) { return p.find(key)->integer; }
double param_num(const json::Value& p, const char* key) { return p.find(key)->num; }
std::string param_str(const json::Value& p, const char* key) { return p.find(key)->str; }

// ---------------------------------------------------------------------------- components

void bad_component(const EncodedRef& e, const std::string& what) {
    throw FormatError("tensor '" + e.name + "' (" + e.codec + "): " + what);
}

static const ArrayRef& get_component(const EncodedRef& e, const char* comp, DType dtype) {
    auto it = e.components.find(comp);
    if (it == e.components.end()) bad_component(e, std::string("missing component '") + comp + "'");
    if (it->second.dtype != dtype)
        bad_component(e, std::string("component '") + comp + "' has dtype " + dtype_name(it->second.dtype) +
                             ", expected " + dtype_name(dtype));
    return it->second;
}

const ArrayRef& need(const EncodedRef& e, const char* comp, DType dtype, const std::vector<int64_t>& shape) {
    const ArrayRef& a = get_component(e, comp, dtype);
    if (a.shape != shape)
        bad_component(e, std::string("component '") + comp + "' has shape " + shape_str(a.shape) + ", expected " +
                             shape_str(shape));
    return a;
}

const ArrayRef& need_1d(const EncodedRef& e, const char* comp, DType dtype) {
    const ArrayRef& a = get_component(e, comp, dtype);
    if (a.shape.size() != 1) bad_component(e, std::string("component '") + comp + "' must be 1-D");
    return a;
}

// ---------------------------------------------------------------------------- threading

void parallel_rows(int64_t rows, int64_t work_per_row, int threads,
                   const std::function<void(int64_t, int64_t)>& fn) {
    if (rows <= 0) return;
    int64_t t = threads > 0 ? threads : default_threads();
    int64_t by_work = std::max<int64_t>(1, (rows * std::max<int64_t>(work_per_row, 1)) >> 16);
    t = std::min({t, rows, by_work});
    if (t <= 1) { fn(0, rows); return; }
    // Pieces taken in turn, not one fixed share per thread: on a machine where another process holds a core,
    // the thread that shares it takes fewer pieces instead of making the others wait for its share (a fixed
    // split runs at the speed of the slowest core: 2x on 2 cores with one busy, against 1.33x in pieces).
    const int64_t pieces = std::min(rows, t * 8);
    std::atomic<int64_t> next{0};
    std::vector<std::thread> pool;
    std::exception_ptr error;
    std::mutex mu;
    auto work = [&]() {
        try {
            for (int64_t i; (i = next.fetch_add(1)) < pieces;) fn(rows * i / pieces, rows * (i + 1) / pieces);
        } catch (...) {
            next = pieces;  // the others stop at their next piece
            std::lock_guard<std::mutex> lock(mu);
            if (!error) error = std::current_exception();
        }
    };
    for (int64_t i = 1; i < t; ++i) pool.emplace_back(work);
    work();  // the calling thread takes pieces too: one thread fewer to start and to compete for the cores
    for (auto& th : pool) th.join();
    if (error) std::rethrow_exception(error);
}

double sum_in_row_order(const std::vector<double>& per_row) {
    double total = 0.0;
    for (double v : per_row) total = total + v;
    return total;
}

// ---------------------------------------------------------------------------- entry points

std::vector<std::string> codec_names() {
    std::vector<std::string> out;
    for (const Codec* c : all_codecs()) out.push_back(c->name());
    return out;
}

static json::Value parse_params(const std::string& codec, const std::string& text) {
    try {
        return json::parse(text.empty() ? "{}" : text);
    } catch (const std::exception& ex) {
        throw std::invalid_argument("codec '" + codec + "': parameters are not valid JSON: " + ex.what());
    }
}

std::string canonical_params(const std::string& codec, const std::string& params) {
    return json::dump(find_codec(codec).canonical(parse_params(codec, params)));
}

static Encoded encode_input(const std::string& codec, const std::string& params, const EncodeInput& in, int threads) {
    const Codec& c = find_codec(codec);
    json::Value p = c.canonical(parse_params(codec, params));
    Encoded out;
    out.components = c.encode(p, in, threads);
    out.codec = codec;
    out.params = json::dump(p);
    return out;
}

Encoded encode(const std::string& codec, const std::string& params, const ArrayRef& delta, int threads) {
    if (!is_float_dtype(delta.dtype))
        throw std::invalid_argument(std::string("encode: delta dtype ") + dtype_name(delta.dtype) +
                                    " is not supported (f32, f16, bf16)");
    return encode_input(codec, params, EncodeInput{delta, Matrix::of(delta.shape)}, threads);
}

Encoded encode_rows(const std::string& codec, const std::string& params, const RowSource& source,
                    const std::vector<int64_t>& shape, int threads) {
    const ArrayRef shape_only{nullptr, DType::F32, shape};
    return encode_input(codec, params, EncodeInput{shape_only, Matrix::of(shape), &source}, threads);
}

struct Prepared {
    Matrix m;
    std::unique_ptr<RowDecoder> dec;
};

static Prepared prepare(const EncodedRef& e) {
    const Codec& c = find_codec(e.codec);
    json::Value p;
    try {
        p = c.canonical(parse_params(e.codec, e.params));
    } catch (const std::invalid_argument& ex) {
        throw FormatError("tensor '" + e.name + "': " + ex.what());
    }
    for (int64_t d : e.shape)
        if (d < 0) throw FormatError("tensor '" + e.name + "': negative dimension in shape " + shape_str(e.shape));
    if (!plausible_shape(e.shape))
        throw FormatError("tensor '" + e.name + "': shape " + shape_str(e.shape) + " is implausibly large");
    Prepared out;
    out.m = Matrix::of(e.shape);
    out.dec = c.prepare(e, p, out.m);
    return out;
}

void validate(const EncodedRef& e) { prepare(e); }

bool plausible_shape(const std::vector<int64_t>& shape) {
    uint64_t extent = 1;
    for (int64_t d : shape)
        if (d < 0 || (d && (__builtin_mul_overflow(extent, uint64_t(d), &extent) || extent > kMaxExtent))) return false;
    return true;
}

ApplyParams apply_default_params() { return ApplyParams{}; }

const char* rounding_name(Rounding r) {
    return r == Rounding::Auto ? "auto" : r == Rounding::Nearest ? "nearest" : "dithered";
}

Rounding rounding_from_name(const std::string& name) {
    for (Rounding r : {Rounding::Auto, Rounding::Nearest, Rounding::Dithered})
        if (name == rounding_name(r)) return r;
    throw std::invalid_argument("rounding '" + name + "' is not one of auto, nearest, dithered");
}

// Rows per decode step: about 4K floats (16 KiB) of scratch, so it stays in L1; a multiple of the block.
static int64_t rows_per_step(const Matrix& m, int block) {
    int64_t r = std::max<int64_t>(1, 4096 / std::max<int64_t>(m.cols, 1));
    return std::max<int64_t>(block, r / block * block);
}

// Index of the first f16 element of out that the delta made infinite or NaN (base finite, alpha * d != 0), or
// n. A base value beyond f16 with no change is the conversion the caller asked for (IEEE: infinity).
static size_t first_f16_overflow(const uint16_t* out, const uint8_t* base, DType bt, const float* d, float alpha,
                                 size_t n) {
    int16_t top = 0;  // exponent all ones (inf, NaN) <=> |h| >= 0x7C00; a signed 16-bit max (SSE2 pmaxsw)
    for (size_t j = 0; j < n; ++j) top = std::max<int16_t>(top, int16_t(out[j] & 0x7FFF));
    if (top < 0x7C00) return n;
    for (size_t j = 0; j < n; ++j) {
        if ((out[j] & 0x7C00) != 0x7C00 || alpha * d[j] == 0.0f) continue;
        if (std::isfinite(load_one(base, bt, j))) return j;
    }
    return n;
}

// Rows [row0, row0 + nrows) of out = base + alpha x delta; b0 and o0 point at row row0.
static void apply_prepared(const Prepared& p, const EncodedRef& e, int64_t row0, int64_t nrows, const uint8_t* b0,
                           DType bt, uint8_t* o0, DType ot, ApplyParams params) {
    const Kernels& k = kernels();
    const int64_t cols = p.m.cols, step = rows_per_step(p.m, p.dec->rows_per_block());
    const size_t bsz = dtype_size(bt), osz = dtype_size(ot);
    // A large out-of-place output will not be re-read soon: stream it past the caches (saves the
    // read-for-ownership traffic). In place, the lines are already cached by the base read.
    const bool stream = b0 != o0 && size_t(nrows * cols) * osz >= (size_t(8) << 20);
    const bool dither = dithers(e.codec, ot, params.rounding);
    // f16 in place: the rows are rounded into scratch first, so that the overflow check below still reads the base
    // (it tells an infinity the delta made from one the base had).
    const bool staged = ot == DType::F16 && b0 == o0;
    parallel_rows(nrows, cols, params.threads, [&](int64_t l0, int64_t l1) {
        std::vector<float> scratch(size_t(step * cols)), sums(dither ? scratch.size() : 0);
        std::vector<uint16_t> staging(staged ? scratch.size() : 0);
        for (int64_t l = l0; l < l1; l += step) {
            const int64_t r = row0 + l;
            int n = int(std::min(step, l1 - l));
            const uint8_t* brow = b0 + size_t(l * cols) * bsz;
            uint8_t* orow = o0 + size_t(l * cols) * osz;
            if (!dither && p.dec->add_rows(r, n, brow, bt, params.alpha, orow, ot, stream, k)) continue;
            p.dec->decode(r, n, scratch.data(), k);
            const size_t m = size_t(n * cols);
            uint8_t* dst = staged ? reinterpret_cast<uint8_t*>(staging.data()) : orow;
            // Dithered: the same f32 sums (an f32 output is one rounding), then rounded element by element.
            const bool ok =
                dither ? k.add_round(brow, bt, scratch.data(), params.alpha, sums.data(), DType::F32, m, false)
                       : k.add_round(brow, bt, scratch.data(), params.alpha, dst, ot, m, stream);
            if (dither) {
                uint16_t* o = reinterpret_cast<uint16_t*>(dst);
                const uint64_t first = uint64_t(r) * uint64_t(cols);
                if (ot == DType::BF16)
                    for (size_t j = 0; j < m; ++j) o[j] = f32_to_bf16_dithered(sums[j], dither_bits(first + j));
                else
                    for (size_t j = 0; j < m; ++j) o[j] = f32_to_f16_dithered(sums[j], dither_bits(first + j));
            }
            if (!ok) {
                // a damaged or hostile delta: an error beats silent infinities (the output is not used)
                size_t bad = 0;
                while (std::fabs(params.alpha * scratch[bad]) <= kMaxStep) ++bad;
                throw bad_step_error(e.name, std::to_string(params.alpha * scratch[bad]),
                                     r + int64_t(bad) / std::max<int64_t>(cols, 1));
            }
            if (ot == DType::F16) {  // f16's range (65504) is the one a real rebuild can leave
                const size_t at = first_f16_overflow(reinterpret_cast<const uint16_t*>(dst), brow, bt,
                                                    scratch.data(), params.alpha, m);
                if (at < m) throw f16_overflow_error(e.name, r + int64_t(at) / std::max<int64_t>(cols, 1));
            }
            if (staged) std::memcpy(orow, dst, m * osz);
        }
        if (stream) store_fence();
    });
}

FormatError bad_step_error(const std::string& tensor, const std::string& value, int64_t row) {
    return FormatError("tensor '" + tensor + "': alpha x delta is " + value + " at row " + std::to_string(row) +
                       ": not a finite value a fine-tune can hold (a damaged or hostile delta)");
}

FormatError f16_overflow_error(const std::string& tensor, int64_t row) {
    return FormatError("tensor '" + tensor + "': base + alpha x delta overflows float16 at row " + std::to_string(row) +
                       " (rebuild in f32 or bf16)");
}

void check_apply_buffers(const std::string& tensor, const void* base, DType base_dtype, const void* out,
                         DType out_dtype, int64_t numel) {
    for (DType t : {base_dtype, out_dtype})
        if (!is_float_dtype(t))
            throw std::invalid_argument("tensor '" + tensor + "': dtype " + dtype_name(t) +
                                        " is not supported (f32, f16, bf16)");
    const auto* b0 = static_cast<const uint8_t*>(base);
    const auto* o0 = static_cast<const uint8_t*>(out);
    if (numel == 0) return;  // nothing to read or write (empty arrays may share any address)
    if (b0 == o0 && base_dtype != out_dtype)
        throw std::invalid_argument("tensor '" + tensor + "': in-place apply needs out and base of the same dtype");
    if (b0 != o0 && o0 < b0 + size_t(numel) * dtype_size(base_dtype) && b0 < o0 + size_t(numel) * dtype_size(out_dtype))
        throw std::invalid_argument("tensor '" + tensor + "': out partially overlaps base");
}

bool dithers(const std::string& codec, DType out, Rounding rounding) {
    return out != DType::F32 && (rounding == Rounding::Dithered || (rounding == Rounding::Auto && codec != "dense"));
}

DeltaView describe(const EncodedRef& e) {
    const Prepared p = prepare(e);
    DeltaView v = p.dec->view();
    v.rows = p.m.rows, v.cols = p.m.cols;
    return v;
}

void check_alpha(float alpha) {
    if (!std::isfinite(alpha)) {
        char text[32];
        std::snprintf(text, sizeof text, "%g", double(alpha));
        throw std::invalid_argument(std::string("alpha ") + text + " is invalid: the scale of a delta must be a finite number");
    }
}

void apply(const EncodedRef& e, const ArrayRef& base, const ArrayRef& out, ApplyParams params) {
    check_alpha(params.alpha);
    for (const ArrayRef* a : {&base, &out})
        if (a->shape != e.shape)
            throw std::invalid_argument("tensor '" + e.name + "': " + (a == &base ? "base" : "out") + " shape " +
                                        shape_str(a->shape) + " does not match the delta's shape " +
                                        shape_str(e.shape));
    check_apply_buffers(e.name, base.data, base.dtype, out.data, out.dtype, base.numel());
    const Prepared p = prepare(e);
    apply_prepared(p, e, 0, p.m.rows, static_cast<const uint8_t*>(base.data), base.dtype,
                   static_cast<uint8_t*>(out.data), out.dtype, params);
}

void apply_rows(const EncodedRef& e, int64_t row0, int64_t nrows, const void* base, DType base_dtype, void* out,
                DType out_dtype, ApplyParams params) {
    check_alpha(params.alpha);
    const Prepared p = prepare(e);
    if (row0 < 0 || nrows < 0 || row0 > p.m.rows || nrows > p.m.rows - row0)
        throw std::out_of_range("tensor '" + e.name + "': rows [" + std::to_string(row0) + ", +" +
                                std::to_string(nrows) + ") of " + std::to_string(p.m.rows));
    check_apply_buffers(e.name, base, base_dtype, out, out_dtype, nrows * p.m.cols);
    apply_prepared(p, e, row0, nrows, static_cast<const uint8_t*>(base), base_dtype, static_cast<uint8_t*>(out),
                   out_dtype, params);
}

void decode(const EncodedRef& e, const ArrayRef& out, int threads) {
    if (out.dtype != DType::F32 || out.numel() != Matrix::of(e.shape).rows * Matrix::of(e.shape).cols)
        throw std::invalid_argument("tensor '" + e.name + "': decode output must be f32 with " +
                                    std::to_string(ArrayRef{nullptr, DType::F32, e.shape}.numel()) + " elements");
    Prepared p = prepare(e);
    const Kernels& k = kernels();
    const int64_t cols = p.m.cols, step = rows_per_step(p.m, p.dec->rows_per_block());
    float* o = static_cast<float*>(out.data);
    parallel_rows(p.m.rows, cols, threads, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r += step)
            p.dec->decode(r, int(std::min(step, r1 - r)), o + size_t(r * cols), k);
    });
}

void RowDecoder::product(int64_t r0, int nrows, const Batch& x, float alpha, float* y, size_t y_stride,
                         const Kernels& k, std::vector<float>& scratch) const {
    const size_t cols = size_t(x.cols);
    scratch.resize(size_t(nrows) * (cols + size_t(x.rows)));
    float* dots = scratch.data() + size_t(nrows) * cols;
    decode(r0, nrows, scratch.data(), k);
    k.dots(scratch.data(), cols, nrows, x.data, cols, x.rows, cols, dots);
    for (int i = 0; i < nrows; ++i)
        for (int b = 0; b < x.rows; ++b) {
            float& out = y[size_t(b) * y_stride + size_t(r0 + i)];
            out = out + alpha * dots[size_t(i * x.rows + b)];
        }
}

void delta_product(const EncodedRef& e, const float* x, int64_t batch, float alpha, float* y, int threads) {
    delta_products({ProductJob{e, x, batch, y}}, alpha, threads);
}

static constexpr int64_t kProductChunk = 64;  // rows of the delta per product() call
// Batch rows whose per-batch state is held at once (a sign delta's tables take 16 floats per 4 columns and
// batch row, 4x x itself): a larger batch, such as a prompt's tokens, runs in waves of this many.
static constexpr int64_t kProductWave = 128;

void delta_products(const std::vector<ProductJob>& jobs, float alpha, int threads) {
    check_alpha(alpha);
    std::vector<Prepared> prepared;  // every job checked before anything is computed
    int64_t rows = -1, cols = -1;
    for (const ProductJob& j : jobs) {
        if (j.batch < 0 || j.batch > (int64_t(1) << 30))
            throw std::invalid_argument("tensor '" + j.enc.name + "': batch of " + std::to_string(j.batch) + " rows");
        prepared.push_back(prepare(j.enc));
        const Matrix m = prepared.back().m;
        if (rows >= 0 && (m.rows != rows || m.cols != cols))
            throw std::invalid_argument("tensor '" + j.enc.name + "': a " + std::to_string(m.rows) + " x " +
                                        std::to_string(m.cols) + " delta among " + std::to_string(rows) + " x " +
                                        std::to_string(cols) + " ones");
        rows = m.rows, cols = m.cols;
    }
    if (rows <= 0) return;
    struct Slice {
        size_t job;
        int64_t b0, batch;
    };
    std::vector<Slice> slices;
    for (size_t i = 0; i < jobs.size(); ++i)
        for (int64_t b0 = 0; b0 < jobs[i].batch; b0 += kProductWave)
            slices.push_back(Slice{i, b0, std::min(kProductWave, jobs[i].batch - b0)});
    struct Ready {
        Prepared p;
        RowDecoder::Batch x;
        float* y;
        int64_t step;
    };
    const Kernels& k = kernels();
    for (size_t first = 0; first < slices.size();) {
        std::vector<Ready> ready;  // one wave
        int64_t work = 0, batch = 0;
        for (; first < slices.size() && (ready.empty() || batch + slices[first].batch <= kProductWave); ++first) {
            const Slice& sl = slices[first];
            const ProductJob& j = jobs[sl.job];
            Prepared p = prepared[sl.job].dec ? std::move(prepared[sl.job]) : prepare(j.enc);  // a decoder per slice
            // Packed products take a whole chunk per call (the sign kernels' tables serve 64 rows per load);
            // decoded tiles at least 16 rows, so a batch row loaded once serves several.
            const int block = p.dec->rows_per_block();
            const int64_t step = p.dec->product_from_packed()
                                     ? kProductChunk
                                     : std::max<int64_t>(rows_per_step(p.m, block), (16 + block - 1) / block * block);
            const RowDecoder::Batch xb{j.x + size_t(sl.b0 * cols), int(sl.batch), cols};
            p.dec->begin_product(xb, k);
            work += cols * sl.batch;
            batch += sl.batch;
            ready.push_back(Ready{std::move(p), xb, j.y + size_t(sl.b0 * rows), step});
        }
        // Chunks of rows taken in turn, not fixed shares: a thread slowed by another process (a torch thread pool
        // still spinning after its matmul) takes fewer, instead of making the others wait for its share. One
        // job's chunks before the next: the threads share that fine-tune's bits and tables while they are in
        // cache. A thread is started for every 2^20 multiply-adds or so (parallel_rows counts 2^16 units of work
        // per thread; these are 16 to a SIMD instruction): a decode step of a small model runs on the caller alone.
        const int64_t chunks = (rows + kProductChunk - 1) / kProductChunk;
        std::atomic<int64_t> next{0};
        parallel_rows(chunks, kProductChunk * work / 16, threads, [&](int64_t, int64_t) {
            std::vector<float> scratch;
            for (int64_t item; (item = next.fetch_add(1)) < chunks * int64_t(ready.size());) {
                const Ready& j = ready[size_t(item / chunks)];
                const int64_t r0 = item % chunks * kProductChunk, r1 = std::min(rows, r0 + kProductChunk);
                for (int64_t r = r0; r < r1; r += j.step)
                    j.p.dec->product(r, int(std::min(j.step, r1 - r)), j.x, alpha, j.y, size_t(rows), k, scratch);
            }
        });
    }
}

void delta_rows(const EncodedRef& e, const int64_t* rows, int64_t n, float alpha, float* out) {
    check_alpha(alpha);
    Prepared p = prepare(e);
    const Kernels& k = kernels();
    const size_t cols = size_t(p.m.cols);
    for (int64_t i = 0; i < n; ++i)  // every index before anything is written
        if (rows[i] < 0 || rows[i] >= p.m.rows)
            throw std::out_of_range("tensor '" + e.name + "': row " + std::to_string(rows[i]) + " of " +
                                    std::to_string(p.m.rows));
    for (int64_t i = 0; i < n; ++i) {
        float* dst = out + size_t(i) * cols;
        p.dec->decode(rows[i], 1, dst, k);
        k.scale(dst, cols, alpha);
    }
}

void delta_f32(const ArrayRef& ft, const ArrayRef& base, float* out, int threads) {
    if (!is_float_dtype(ft.dtype) || !is_float_dtype(base.dtype) || ft.numel() != base.numel())
        throw std::invalid_argument("delta_f32: ft and base must be f32, f16 or bf16 arrays of the same size");
    const int64_t n = ft.numel(), block = 1 << 14;  // 64 KiB of f32 per step: both rows stay in cache
    const Kernels& k = kernels();
    parallel_rows((n + block - 1) / block, block, threads, [&](int64_t b0, int64_t b1) {
        std::vector<float> tmp(static_cast<size_t>(block));
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t i = b * block, m = std::min(block, n - i);
            subtract_f32(static_cast<const uint8_t*>(ft.data) + size_t(i) * dtype_size(ft.dtype), ft.dtype,
                         static_cast<const uint8_t*>(base.data) + size_t(i) * dtype_size(base.dtype), base.dtype,
                         out + i, tmp.data(), size_t(m), k);
        }
    });
}

}  // namespace deltapack
