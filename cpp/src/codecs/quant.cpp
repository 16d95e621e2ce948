// quant: symmetric k-bit group quantization along the last dimension, f16 group scales times a
// per-tensor power of two (scale_exp) so small deltas keep full f16 precision.
#include <algorithm>
#include <cmath>

#include "common.h"

namespace deltapack {
namespace {

struct QuantDecoder : RowDecoder {
    const uint8_t* codes;
    const uint16_t* scales;
    int64_t cols, row_bytes, group, ngroups;
    int bits, scale_exp;
    void decode(int64_t r0, int nrows, float* dst, const Kernels& k) const override {
        const float qmax = float((1 << (bits - 1)) - 1);
        for (int i = 0; i < nrows; ++i) {
            int64_t r = r0 + i;
            float* out = dst + size_t(i) * size_t(cols);
            const uint8_t* row = codes + size_t(r * row_bytes);
            const bool byte_aligned_groups = (group * bits) % 8 == 0;
            if (!byte_aligned_groups) k.unpack_codes(row, bits, size_t(cols), qmax, 1.0f, out);
            for (int64_t g = 0; g < ngroups; ++g) {
                int64_t c0 = g * group, len = std::min(group, cols - c0);
                const float s = std::ldexp(f16_to_f32(scales[r * ngroups + g]), scale_exp);
                if (byte_aligned_groups) k.unpack_codes(row + c0 * bits / 8, bits, size_t(len), qmax, s, out + c0);
                else k.scale(out + c0, size_t(len), s);
            }
        }
    }
    DeltaView view() const override {
        DeltaView v;
        v.kind = DeltaView::Quant;
        v.part[0] = codes, v.part[1] = scales;
        v.row_bytes = row_bytes, v.group = group, v.ngroups = ngroups, v.bits = bits, v.scale_exp = scale_exp;
        return v;
    }
};

class QuantCodec : public Codec {
public:
    const char* name() const override { return "quant"; }

    json::Value canonical(const json::Value& params) const override {
        ParamReader r("quant", params);
        int64_t bits = r.integer("bits", 4, 2, 8);
        if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
            throw std::invalid_argument("codec 'quant': bits=" + std::to_string(bits) + " is not one of 2, 3, 4, 8");
        r.integer("group", 128, 1, int64_t(1) << 30);
        r.integer("scale_exp", 0, -300, 300);
        return r.finish();
    }

    std::map<std::string, Array> encode(json::Value& p, const EncodeInput& in, int threads) const override {
        const Matrix m = in.m;
        const int bits = int(param_int(p, "bits"));
        const int64_t group = param_int(p, "group"), ng = (m.cols + group - 1) / group;
        const int64_t rb = packed_row_bytes(m.cols, bits);
        const float qmax = float((1 << (bits - 1)) - 1);
        const Kernels& k = kernels();
        std::vector<float> row_max(size_t(m.rows), 0.0f);
        parallel_rows(m.rows, m.cols, threads, [&](int64_t r0, int64_t r1) {
            std::vector<float> buf(size_t(m.cols));
            for (int64_t r = r0; r < r1; ++r) {
                in.row(r, buf.data(), k);
                check_finite(buf.data(), m.cols, r);
                float mx = 0.0f;
                for (float v : buf) mx = std::max(mx, std::fabs(v));
                row_max[size_t(r)] = mx;
            }
        });
        float amax = 0.0f;
        for (float v : row_max) amax = std::max(amax, v);
        const float smax = amax / qmax;
        int e = 0;
        if (smax > 0.0f) { std::frexp(smax, &e); e -= 15; }
        p.set("scale_exp", json::Value::make_int(e));
        Array codes = Array::zeros(DType::U8, {m.rows, rb});
        Array scales = Array::zeros(DType::F16, {m.rows, ng});
        auto* cd = static_cast<uint8_t*>(codes.ref.data);
        auto* sc16 = static_cast<uint16_t*>(scales.ref.data);
        parallel_rows(m.rows, m.cols, threads, [&](int64_t r0, int64_t r1) {
            std::vector<float> buf(size_t(m.cols));
            std::vector<uint32_t> c(size_t(m.cols));
            for (int64_t r = r0; r < r1; ++r) {
                in.row(r, buf.data(), k);
                for (int64_t g = 0; g < ng; ++g) {
                    int64_t c0 = g * group, len = std::min(group, m.cols - c0);
                    float gmax = 0.0f;
                    for (int64_t j = c0; j < c0 + len; ++j) gmax = std::max(gmax, std::fabs(buf[size_t(j)]));
                    uint16_t s16 = f32_to_f16(std::ldexp(gmax / qmax, -e));
                    if ((s16 & 0x7c00u) == 0x7c00u)
                        throw std::invalid_argument("quant: a group scale of row " + std::to_string(r) + " overflows float16");
                    sc16[r * ng + g] = s16;
                    const float s = std::ldexp(f16_to_f32(s16), e);
                    for (int64_t j = c0; j < c0 + len; ++j) {
                        float q = s > 0.0f ? std::min(qmax, std::max(-qmax, std::nearbyint(buf[size_t(j)] / s))) : 0.0f;
                        c[size_t(j)] = uint32_t(q + qmax);
                    }
                }
                pack_codes(c.data(), m.cols, bits, cd + size_t(r * rb));
            }
        });
        return {{"codes", codes}, {"scales", scales}};
    }

    std::unique_ptr<RowDecoder> prepare(const EncodedRef& e, const json::Value& p, const Matrix& m) const override {
        auto d = std::make_unique<QuantDecoder>();
        d->bits = int(param_int(p, "bits"));
        d->group = param_int(p, "group");
        d->scale_exp = int(param_int(p, "scale_exp"));
        d->cols = m.cols;
        d->ngroups = (m.cols + d->group - 1) / d->group;
        d->row_bytes = packed_row_bytes(m.cols, d->bits);
        d->codes = static_cast<const uint8_t*>(need(e, "codes", DType::U8, {m.rows, d->row_bytes}).data);
        d->scales = static_cast<const uint16_t*>(need(e, "scales", DType::F16, {m.rows, d->ngroups}).data);
        return d;
    }
};

}  // namespace

const Codec& quant_codec() {
    static QuantCodec c;
    return c;
}

}  // namespace deltapack
