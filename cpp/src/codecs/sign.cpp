// sign (BitDelta): 1-bit signs + mean |delta| per tensor, row, or group of columns.
#include <algorithm>
#include <cmath>

#include "common.h"

namespace deltapack {
namespace {

struct SignDecoder : RowDecoder {
    const uint8_t* signs;
    const float* scales;
    int64_t cols, row_bytes, group, ngroups;
    int scope;  // 0 tensor, 1 row, 2 group
    void decode(int64_t r0, int nrows, float* dst, const Kernels& k) const override {
        for (int i = 0; i < nrows; ++i) {
            int64_t r = r0 + i;
            const uint8_t* bits = signs + size_t(r * row_bytes);
            float* out = dst + size_t(i) * size_t(cols);
            if (scope < 2) {
                k.sign_expand(bits, size_t(cols), scale_of(r, 0), out);
                continue;
            }
            for (int64_t g = 0; g < ngroups; ++g) {
                int64_t c0 = g * group, len = std::min(group, cols - c0);
                k.sign_expand(bits + c0 / 8, size_t(len), scale_of(r, g), out + c0);
            }
        }
    }

    DeltaView view() const override {
        DeltaView v;
        v.kind = DeltaView::Sign;
        v.part[0] = signs, v.part[1] = scales;
        v.row_bytes = row_bytes, v.group = group, v.ngroups = ngroups, v.scope = scope;
        return v;
    }

    // The scale of row r in span g: scales[r * scale_row_stride() + (g for group scales, else 0)].
    size_t scale_row_stride() const { return scope == 0 ? 0 : scope == 1 ? 1 : size_t(ngroups); }
    const float* scale_at(int64_t r, int64_t g) const {
        return scales + size_t(r) * scale_row_stride() + size_t(scope == 2 ? g : 0);
    }
    float scale_of(int64_t r, int64_t g) const { return *scale_at(r, g); }

    // Rebuilds without the f32 rows: each scale span is one sign_add_round with t = alpha * s. Declined for f16
    // output (the engine checks its overflow on decoded values) and for a t out of range (the engine reports it).
    bool add_rows(int64_t r0, int nrows, const uint8_t* base, DType bt, float alpha, uint8_t* out, DType ot,
                  bool stream, const Kernels& k) const override {
        const int64_t n = spans(), width = span_cols();
        if (ot == DType::F16) return false;
        for (int64_t r = r0; r < r0 + nrows; ++r)
            for (int64_t g = 0; g < n; ++g)
                if (!(std::fabs(alpha * scale_of(r, g)) <= kMaxStep)) return false;
        const size_t bsz = dtype_size(bt), osz = dtype_size(ot);
        for (int i = 0; i < nrows; ++i) {
            const int64_t r = r0 + i;
            for (int64_t g = 0; g < n; ++g) {
                const int64_t c0 = g * width, len = std::min(width, cols - c0);
                const size_t at = size_t(i * cols + c0);
                k.sign_add_round(signs + size_t(r * row_bytes + c0 / 8), alpha * scale_of(r, g), base + at * bsz, bt,
                                 out + at * osz, ot, size_t(len), stream);
            }
        }
        return true;
    }

    // Batch products from the bits: a row's product with x over a scale's span is s * (2 * (sum of x where the
    // bit is set) - (sum of x)); the second sum is the same for every row. The sums come from tables of x built
    // once per batch (Kernels::sign_tables), one table_sums call giving every span's (spans are whole groups of
    // 4 columns: the group size is a multiple of 8).
    int64_t spans() const { return scope == 2 ? ngroups : 1; }
    int64_t span_cols() const { return scope == 2 ? group : cols; }
    size_t span_groups() const { return size_t(std::max<int64_t>(1, (span_cols() + 3) / 4)); }
    bool product_from_packed() const override { return true; }
    std::vector<float> tables;  // [column group][batch row][16]
    std::vector<float> x_sums;  // [span][batch row]
    void begin_product(const Batch& x, const Kernels& k) override {
        tables.resize(size_t((cols + 3) / 4) * size_t(x.rows) * 16);
        k.sign_tables(x.data, size_t(cols), x.rows, size_t(cols), tables.data());
        const std::vector<uint8_t> ones(size_t(row_bytes), 0xff);
        x_sums.resize(table_spans(size_t(cols), span_groups()) * size_t(x.rows));
        k.table_sums(ones.data(), 0, 1, tables.data(), x.rows, size_t(cols), span_groups(), x_sums.data());
    }
    void product(int64_t r0, int nrows, const Batch& x, float alpha, float* y, size_t y_stride, const Kernels& k,
                 std::vector<float>& scratch) const override {
        const int64_t n = spans();
        const size_t per_row = table_spans(size_t(cols), span_groups()) * size_t(x.rows);  // [span][batch row]
        scratch.assign(size_t(nrows) * (per_row + size_t(x.rows)), 0.0f);
        float *sums = scratch.data(), *acc = sums + size_t(nrows) * per_row;
        k.table_sums(signs + size_t(r0 * row_bytes), size_t(row_bytes), nrows, tables.data(), x.rows, size_t(cols),
                     span_groups(), sums);
        // Spans outermost: the rows' sums are independent, so the adds overlap (row by row, each sum would wait
        // for its previous span's add through memory: 3x slower for a batch of one with 128-column groups).
        const size_t nx = size_t(x.rows);
        for (int64_t g = 0; g < n; ++g) {
            const float* all = x_sums.data() + size_t(g) * nx;
            const float* first = scale_at(r0, g);  // row r0 + i's scale: first[i * step]
            const size_t step = scale_row_stride();
            if (nx == 1) {  // a decode step: no loop over the batch
                for (int i = 0; i < nrows; ++i)
                    acc[i] = acc[i] + first[size_t(i) * step] * (2.0f * sums[size_t(i) * per_row + size_t(g)] - all[0]);
                continue;
            }
            for (int i = 0; i < nrows; ++i) {
                const float s = first[size_t(i) * step];
                const float* set = sums + size_t(i) * per_row + size_t(g) * nx;
                float* a = acc + size_t(i) * nx;
                for (size_t b = 0; b < nx; ++b) a[b] = a[b] + s * (2.0f * set[b] - all[b]);
            }
        }
        for (int i = 0; i < nrows; ++i)
            for (int b = 0; b < x.rows; ++b) {
                float& out = y[size_t(b) * y_stride + size_t(r0 + i)];
                out = out + alpha * acc[size_t(i * x.rows + b)];
            }
    }
};

class SignCodec : public Codec {
public:
    const char* name() const override { return "sign"; }

    json::Value canonical(const json::Value& params) const override {
        ParamReader r("sign", params);
        r.choice("scope", "tensor", {"tensor", "row", "group"});
        int64_t g = r.integer("group", 128, 8, int64_t(1) << 30);
        if (g % 8) throw std::invalid_argument("codec 'sign': group=" + std::to_string(g) + " must be a multiple of 8");
        return r.finish();
    }

    static std::vector<int64_t> scale_shape(const std::string& scope, const Matrix& m, int64_t group) {
        if (scope == "tensor") return {1};
        if (scope == "row") return {m.rows};
        return {m.rows, (m.cols + group - 1) / group};
    }

    std::map<std::string, Array> encode(json::Value& p, const EncodeInput& in, int threads) const override {
        const Matrix m = in.m;
        const std::string scope = param_str(p, "scope");
        const int64_t group = param_int(p, "group"), rb = packed_row_bytes(m.cols, 1);
        const int64_t ngroups = (m.cols + group - 1) / group;
        Array signs = Array::zeros(DType::U8, {m.rows, rb});
        Array scales = Array::zeros(DType::F32, scale_shape(scope, m, group));
        auto* sg = static_cast<uint8_t*>(signs.ref.data);
        auto* sc = static_cast<float*>(scales.ref.data);
        std::vector<double> row_sums(size_t(m.rows));
        const Kernels& k = kernels();
        parallel_rows(m.rows, m.cols, threads, [&](int64_t r0, int64_t r1) {
            std::vector<float> buf(size_t(m.cols));
            for (int64_t r = r0; r < r1; ++r) {
                in.row(r, buf.data(), k);
                k.pack_signs(buf.data(), size_t(m.cols), sg + size_t(r * rb));
                // A NaN or infinity makes the sum of |x| non-finite: that is the finiteness check.
                if (scope != "group") {
                    row_sums[size_t(r)] = k.abs_sum(buf.data(), size_t(m.cols));
                    if (!std::isfinite(row_sums[size_t(r)])) check_finite(buf.data(), m.cols, r);
                    continue;
                }
                for (int64_t g = 0; g < ngroups; ++g) {
                    int64_t c0 = g * group, len = std::min(group, m.cols - c0);
                    double sum = k.abs_sum(buf.data() + c0, size_t(len));
                    if (!std::isfinite(sum)) check_finite(buf.data(), m.cols, r);
                    sc[r * ngroups + g] = float(sum / double(len));
                }
            }
        });
        if (scope == "tensor") {
            double n = double(m.rows) * double(m.cols);
            sc[0] = n > 0 ? float(sum_in_row_order(row_sums) / n) : 0.0f;
        } else if (scope == "row") {
            for (int64_t r = 0; r < m.rows; ++r) sc[r] = m.cols ? float(row_sums[size_t(r)] / double(m.cols)) : 0.0f;
        }
        return {{"signs", signs}, {"scales", scales}};
    }

    std::unique_ptr<RowDecoder> prepare(const EncodedRef& e, const json::Value& p, const Matrix& m) const override {
        auto d = std::make_unique<SignDecoder>();
        const std::string scope = param_str(p, "scope");
        d->group = param_int(p, "group");
        d->cols = m.cols;
        d->row_bytes = packed_row_bytes(m.cols, 1);
        d->ngroups = (m.cols + d->group - 1) / d->group;
        d->scope = scope == "tensor" ? 0 : scope == "row" ? 1 : 2;
        d->signs = static_cast<const uint8_t*>(need(e, "signs", DType::U8, {m.rows, d->row_bytes}).data);
        d->scales = static_cast<const float*>(need(e, "scales", DType::F32, scale_shape(scope, m, d->group)).data);
        return d;
    }
};

}  // namespace

const Codec& sign_codec() {
    static SignCodec c;
    return c;
}

}  // namespace deltapack
