// lowrank: truncated SVD factors, delta = u @ v with u (rows x r) and v (r x cols).
// Two layouts. Float factors (`dtype`): u = U·√S and v = √S·Vᵀ stored as f16/bf16/f32. Quantized
// factors (`bits`, mixed precision along the spectrum as in Delta-CoMe): singular values in f32 and
// the unit singular vectors in k-bit groups with f16 scales, bit widths set band by band.
// Encoding (the SVD) is done by LAPACK through numpy in python/deltapack; this file validates
// and decodes.
#include <algorithm>
#include <mutex>

#include "common.h"

namespace deltapack {
namespace {

// Both layouts decode as delta rows = u rows (f32, per block) @ v (r x cols, widened to f32 once, by the
// first decode: validate(), which also prepares a decoder, then does no decode work).
struct LowrankRowsDecoder : RowDecoder {
    int64_t rank = 0, cols = 0;
    mutable std::vector<float> v;
    mutable std::once_flag v_ready;
    virtual void widen_v(float* dst, const Kernels& k) const = 0;                 // rank x cols
    virtual void u_rows(int64_t r0, int nrows, float* dst, const Kernels& k) const = 0;  // nrows x rank
    int rows_per_block() const override { return 4; }
    void ensure_v(const Kernels& k) const {
        std::call_once(v_ready, [&] {
            v.resize(size_t(rank * cols));
            widen_v(v.data(), k);
        });
    }
    void decode(int64_t r0, int nrows, float* dst, const Kernels& k) const override {
        ensure_v(k);
        float ublock[4 * 4096];
        std::vector<float> big;
        float* ub = ublock;
        if (nrows * rank > int64_t(sizeof(ublock) / sizeof(float))) {
            big.resize(size_t(nrows * rank));
            ub = big.data();
        }
        u_rows(r0, nrows, ub, k);
        k.lowrank_rows(ub, v.data(), int(rank), size_t(cols), nrows, dst);
    }

    // Batch products as u . (v x): v x once per batch, then rank products per row and batch row.
    std::vector<float> vx;  // [direction][batch row]
    bool product_from_packed() const override { return true; }
    void begin_product(const Batch& x, const Kernels& k) override {
        ensure_v(k);
        vx.resize(size_t(rank * x.rows));
        k.dots(v.data(), size_t(cols), int(rank), x.data, size_t(cols), x.rows, size_t(cols), vx.data());
    }
    void product(int64_t r0, int nrows, const Batch& x, float alpha, float* y, size_t y_stride, const Kernels& k,
                 std::vector<float>& scratch) const override {
        scratch.resize(size_t(nrows * rank));
        u_rows(r0, nrows, scratch.data(), k);
        for (int i = 0; i < nrows; ++i) {
            const float* u = scratch.data() + size_t(i * rank);
            for (int b = 0; b < x.rows; ++b) {
                float acc = 0.0f;
                for (int64_t d = 0; d < rank; ++d) acc = acc + u[d] * vx[size_t(d * x.rows + b)];
                float& out = y[size_t(b) * y_stride + size_t(r0 + i)];
                out = out + alpha * acc;
            }
        }
    }
};

// The float layout: u and v stored as f16/bf16/f32.
struct LowrankDecoder : LowrankRowsDecoder {
    const uint8_t *u, *v_stored;
    DType dt;
    void widen_v(float* dst, const Kernels& k) const override { k.to_f32(v_stored, dt, dst, size_t(rank * cols)); }
    void u_rows(int64_t r0, int nrows, float* dst, const Kernels& k) const override {
        k.to_f32(u + size_t(r0 * rank) * dtype_size(dt), dt, dst, size_t(nrows * rank));
    }
    DeltaView view() const override {
        DeltaView v;
        v.kind = DeltaView::Lowrank;
        v.part[0] = u, v.part[1] = v_stored, v.dtype = dt, v.rank = rank;
        return v;
    }
};

// One direction's quantized singular vector: `bits`-wide codes, one f16 scale per `group` elements.
// Element j = f32(code_j - (2^bits - 1)/2) * f32(scale[j / group]).
struct QuantVector {
    const uint8_t* codes;
    const uint16_t* scales;
    int bits;
    float offset() const { return float((1 << bits) - 1) * 0.5f; }
    float at(int64_t j, int64_t group) const {
        return (float(read_code(codes, bits, size_t(j))) - offset()) * f16_to_f32(scales[j / group]);
    }
};

// The quantized layout: v̂ is dequantized group by group; u rows are dequantized and multiplied by the
// singular values per block.
struct QuantLowrankDecoder : LowrankRowsDecoder {
    std::vector<QuantVector> u, vq;  // one per direction
    const float* s;
    int64_t group;
    const uint8_t* codes;     // all directions' codes
    const uint16_t* scales;   // all directions' scales
    std::vector<int64_t> bits, bands;
    DeltaView view() const override {
        DeltaView v;
        v.kind = DeltaView::LowrankQuant;
        v.part[0] = codes, v.part[1] = scales, v.part[2] = s;
        v.rank = rank, v.group = group, v.nbands = int32_t(bands.size());
        for (size_t b = 0; b < bands.size(); ++b) v.band_bits[b] = uint8_t(bits[b]), v.band_size[b] = int32_t(bands[b]);
        return v;
    }
    void widen_v(float* dst, const Kernels& k) const override {
        for (int64_t d = 0; d < rank; ++d)
            for (int64_t c0 = 0; c0 < cols; c0 += group) {
                const QuantVector& q = vq[size_t(d)];
                // group is a multiple of 8, so every group starts on a byte boundary.
                k.unpack_codes(q.codes + c0 * q.bits / 8, q.bits, size_t(std::min(group, cols - c0)),
                               q.offset(), f16_to_f32(q.scales[c0 / group]), dst + d * cols + c0);
            }
    }
    void u_rows(int64_t r0, int nrows, float* dst, const Kernels&) const override {
        for (int i = 0; i < nrows; ++i)
            for (int64_t d = 0; d < rank; ++d) dst[size_t(i * rank + d)] = u[size_t(d)].at(r0 + i, group) * s[d];
    }
};

// "8/4/2" (or a bare integer) -> {8, 4, 2}.
std::vector<int64_t> parse_list(const json::Value* v, const char* key) {
    auto bad = [&] { throw std::invalid_argument(std::string("codec 'lowrank': ") + key +
                                                 " must be an integer or a list like \"8/4/2\""); };
    std::vector<int64_t> out;
    if (v->kind == json::Value::Number) {
        if (!v->is_integer) bad();
        out.push_back(v->integer);
        return out;
    }
    if (v->kind != json::Value::String || v->str.empty() || v->str.size() > 200) bad();
    int64_t cur = -1;
    for (char ch : v->str + "/") {
        if (ch == '/') {
            if (cur < 0) bad();
            out.push_back(cur);
            cur = -1;
        } else if (ch >= '0' && ch <= '9') {
            cur = (cur < 0 ? 0 : cur) * 10 + (ch - '0');
            if (cur > (int64_t(1) << 30)) bad();
        } else {
            bad();
        }
    }
    return out;
}

std::string format_list(const std::vector<int64_t>& xs) {
    std::string s;
    for (size_t i = 0; i < xs.size(); ++i) s += (i ? "/" : "") + std::to_string(xs[i]);
    return s;
}

class LowrankCodec : public Codec {
public:
    const char* name() const override { return "lowrank"; }

    // Float layout: {rank, dtype}. Quantized layout: {rank, bits, bands, group}, with `bits` and
    // `bands` canonical as "b0/b1/..." strings and rank = the sum of the bands.
    json::Value canonical(const json::Value& params) const override {
        if (params.kind != json::Value::Object || !params.find("bits")) {
            ParamReader r("lowrank", params);
            r.integer("rank", 16, 1, int64_t(1) << 20);
            r.choice("dtype", "f16", {"f16", "bf16", "f32"});
            return r.finish();
        }
        auto fail = [](const std::string& m) { throw std::invalid_argument("codec 'lowrank': " + m); };
        std::vector<int64_t> bits = parse_list(params.find("bits"), "bits"), bands;
        for (int64_t b : bits)
            if (b < 1 || b > 8) fail("bits=" + std::to_string(b) + " is out of range [1, 8]");
        if (bits.size() > 64) fail("at most 64 bands");
        const json::Value* rank_v = params.find("rank");
        if (const json::Value* bv = params.find("bands")) {
            bands = parse_list(bv, "bands");
        } else if (bits.size() == 1 && rank_v && rank_v->kind == json::Value::Number && rank_v->is_integer) {
            bands = {rank_v->integer};
        } else {
            fail("bits=" + format_list(bits) + " needs bands=... (the rank of each band)");
        }
        if (bands.size() != bits.size())
            fail("bits has " + std::to_string(bits.size()) + " entries and bands " + std::to_string(bands.size()));
        int64_t total = 0;
        for (int64_t b : bands) {
            if (b < 1) fail("every band needs rank >= 1");
            total += b;
        }
        ParamReader r("lowrank", params);
        r.integer("rank", total, 1, int64_t(1) << 20);
        if (rank_v && rank_v->integer != total)
            fail("rank=" + std::to_string(rank_v->integer) + " is not the sum of bands=" + format_list(bands));
        r.take("bits");
        r.put("bits", json::Value::make_string(format_list(bits)));
        r.take("bands");
        r.put("bands", json::Value::make_string(format_list(bands)));
        int64_t group = r.integer("group", 64, 8, int64_t(1) << 30);
        if (group % 8) fail("group=" + std::to_string(group) + " must be a multiple of 8");
        return r.finish();
    }

    std::map<std::string, Array> encode(json::Value&, const EncodeInput&, int) const override {
        throw std::invalid_argument("codec 'lowrank' is encoded in Python (numpy SVD): use deltapack.encode");
    }

    std::unique_ptr<RowDecoder> prepare(const EncodedRef& e, const json::Value& p, const Matrix& m) const override {
        // As the encoder: a rank above min(rows, cols) describes nothing more, only costs rank x rows x cols to
        // decode (a few stored bytes could ask for hours).
        if (param_int(p, "rank") > std::max<int64_t>(1, std::min(m.rows, m.cols)))
            bad_component(e, "rank " + std::to_string(param_int(p, "rank")) + " exceeds min(rows, cols) = " +
                                 std::to_string(std::min(m.rows, m.cols)));
        if (!p.find("bits")) {
            auto d = std::make_unique<LowrankDecoder>();
            d->rank = param_int(p, "rank");
            d->dt = dtype_from_name(param_str(p, "dtype"));
            d->cols = m.cols;
            d->u = static_cast<const uint8_t*>(need(e, "u", d->dt, {m.rows, d->rank}).data);
            d->v_stored = static_cast<const uint8_t*>(need(e, "v", d->dt, {d->rank, m.cols}).data);
            return d;
        }
        auto d = std::make_unique<QuantLowrankDecoder>();
        d->rank = param_int(p, "rank");
        d->group = param_int(p, "group");
        d->cols = m.cols;
        const std::vector<int64_t> bits = parse_list(p.find("bits"), "bits"), bands = parse_list(p.find("bands"), "bands");
        d->s = static_cast<const float*>(need(e, "s", DType::F32, {d->rank}).data);
        const int64_t ug = (m.rows + d->group - 1) / d->group, vg = (m.cols + d->group - 1) / d->group;
        const auto* sc = static_cast<const uint16_t*>(need(e, "scales", DType::F16, {d->rank, ug + vg}).data);
        // codes: per direction its u codes then its v codes, each packed to whole bytes.
        int64_t total = 0;
        for (size_t b = 0; b < bands.size(); ++b) {
            const int64_t per = packed_row_bytes(m.rows, int(bits[b])) + packed_row_bytes(m.cols, int(bits[b]));
            int64_t band_bytes;
            if (__builtin_mul_overflow(bands[b], per, &band_bytes) || __builtin_add_overflow(total, band_bytes, &total))
                bad_component(e, "the shape and bands need more code bytes than any file can hold");
        }
        const auto* codes = static_cast<const uint8_t*>(need(e, "codes", DType::U8, {total}).data);
        d->codes = codes, d->scales = sc, d->bits = bits, d->bands = bands;
        int64_t dir = 0, at = 0;
        for (size_t b = 0; b < bands.size(); ++b) {
            const int w = int(bits[b]);
            const int64_t ub = packed_row_bytes(m.rows, w), vb = packed_row_bytes(m.cols, w);
            for (int64_t j = 0; j < bands[b]; ++j, ++dir, at += ub + vb) {
                d->u.push_back({codes + at, sc + dir * (ug + vg), w});
                d->vq.push_back({codes + at + ub, sc + dir * (ug + vg) + ug, w});
            }
        }
        return d;
    }
};

}  // namespace

const Codec& lowrank_codec() {
    static LowrankCodec c;
    return c;
}

}  // namespace deltapack
