// levels: the paper's multi-bit BitDelta (Sec. 5.3). `bits` stored bits per parameter, sign
// included: 2^(bits-1) equal-count magnitude blocks, each represented by its mean magnitude.
#include <algorithm>
#include <cmath>

#include "common.h"

namespace deltapack {
namespace {

struct LevelsDecoder : RowDecoder {
    const uint8_t *signs, *codes;
    const float* levels;
    int64_t cols, sign_bytes, code_bytes;
    int width;
    void decode(int64_t r0, int nrows, float* dst, const Kernels& k) const override {
        for (int i = 0; i < nrows; ++i) {
            int64_t r = r0 + i;
            float* out = dst + size_t(i) * size_t(cols);
            k.levels_expand(signs + size_t(r * sign_bytes), width ? codes + size_t(r * code_bytes) : nullptr, width,
                            size_t(cols), levels, out);
        }
    }
    DeltaView view() const override {
        DeltaView v;
        v.kind = DeltaView::Levels;
        v.part[0] = signs, v.part[1] = levels, v.part[2] = codes;
        v.row_bytes = sign_bytes, v.code_bytes = code_bytes, v.bits = width;
        return v;
    }
};

// Puts keys[b*n/K, (b+1)*n/K) in block b's place for every b in [lo, hi), each block's keys in any order: only
// which quantile block a key falls in matters, so selections (nth_element, linear time, log2 K rounds) do what a
// sort did (on a 2048 x 14336 sample: 2.3 s for the sort). The keys are distinct (they carry their index), so
// the blocks hold the same elements a sort would put there.
static void select_blocks(std::vector<uint64_t>& keys, int64_t lo, int64_t hi, int64_t n, int64_t K) {
    if (hi - lo < 2) return;
    const int64_t mid = (lo + hi) / 2;
    std::nth_element(keys.begin() + lo * n / K, keys.begin() + mid * n / K, keys.begin() + hi * n / K);
    select_blocks(keys, lo, mid, n, K);
    select_blocks(keys, mid, hi, n, K);
}

class LevelsCodec : public Codec {
public:
    const char* name() const override { return "levels"; }

    json::Value canonical(const json::Value& params) const override {
        ParamReader r("levels", params);
        r.integer("bits", 2, 1, 8);
        return r.finish();
    }

    std::map<std::string, Array> encode(json::Value& p, const EncodeInput& in, int threads) const override {
        const Matrix m = in.m;
        const int bits = int(param_int(p, "bits")), width = bits - 1;
        const int64_t K = int64_t(1) << width, n = m.rows * m.cols;
        const int64_t sb = packed_row_bytes(m.cols, 1), cb = packed_row_bytes(m.cols, width);
        const Kernels& k = kernels();
        // |x| as f32 bits (monotone for non-negative floats) with the flat index: one sort key.
        std::vector<uint64_t> keys(static_cast<size_t>(n));
        Array signs = Array::zeros(DType::U8, {m.rows, sb});
        auto* sg = static_cast<uint8_t*>(signs.ref.data);
        parallel_rows(m.rows, m.cols, threads, [&](int64_t r0, int64_t r1) {
            std::vector<float> buf(size_t(m.cols));
            for (int64_t r = r0; r < r1; ++r) {
                in.row(r, buf.data(), k);
                check_finite(buf.data(), m.cols, r);
                k.pack_signs(buf.data(), size_t(m.cols), sg + size_t(r * sb));
                for (int64_t j = 0; j < m.cols; ++j) {
                    uint64_t mag = f32_to_bits(buf[size_t(j)]) & 0x7fffffffu;
                    keys[size_t(r * m.cols + j)] = (mag << 32) | uint64_t(r * m.cols + j);
                }
            }
        });
        if (n >= (int64_t(1) << 32)) throw std::invalid_argument("levels: tensor too large (>= 2^32 elements)");
        select_blocks(keys, 0, K, n, K);
        std::vector<uint8_t> block(static_cast<size_t>(n));
        for (int64_t b = 0; b < K; ++b)
            for (int64_t q = b * n / K; q < (b + 1) * n / K; ++q) block[keys[size_t(q)] & 0xffffffffu] = uint8_t(b);
        std::vector<uint64_t>().swap(keys);
        // Block means: per row, 16 float64 lanes per block, folded; then rows in order.
        std::vector<double> row_sums(size_t(m.rows * K));
        Array codes = Array::zeros(DType::U8, {m.rows, cb});
        auto* cd = static_cast<uint8_t*>(codes.ref.data);
        parallel_rows(m.rows, m.cols, threads, [&](int64_t r0, int64_t r1) {
            std::vector<float> buf(size_t(m.cols));
            std::vector<double> lanes(size_t(K * 16));
            std::vector<uint32_t> c(size_t(m.cols));
            for (int64_t r = r0; r < r1; ++r) {
                in.row(r, buf.data(), k);
                std::fill(lanes.begin(), lanes.end(), 0.0);
                for (int64_t j = 0; j < m.cols; ++j) {
                    uint32_t b = block[size_t(r * m.cols + j)];
                    c[size_t(j)] = b;
                    double& lane = lanes[size_t(b * 16 + (j & 15))];
                    lane = lane + double(std::fabs(buf[size_t(j)]));
                }
                for (int64_t b = 0; b < K; ++b) {
                    scalar::fold_lanes(&lanes[size_t(b * 16)]);
                    row_sums[size_t(b * m.rows + r)] = lanes[size_t(b * 16)];
                }
                if (width) pack_codes(c.data(), m.cols, width, cd + size_t(r * cb));
            }
        });
        Array levels = Array::zeros(DType::F32, {K});
        auto* lv = static_cast<float*>(levels.ref.data);
        for (int64_t b = 0; b < K; ++b) {
            int64_t count = (b + 1) * n / K - b * n / K;
            std::vector<double> sums(row_sums.begin() + b * m.rows, row_sums.begin() + (b + 1) * m.rows);
            lv[b] = count ? float(sum_in_row_order(sums) / double(count)) : 0.0f;
        }
        std::map<std::string, Array> out{{"signs", signs}, {"levels", levels}};
        if (width) out["codes"] = codes;
        return out;
    }

    std::unique_ptr<RowDecoder> prepare(const EncodedRef& e, const json::Value& p, const Matrix& m) const override {
        auto d = std::make_unique<LevelsDecoder>();
        d->width = int(param_int(p, "bits")) - 1;
        d->cols = m.cols;
        d->sign_bytes = packed_row_bytes(m.cols, 1);
        d->code_bytes = packed_row_bytes(m.cols, d->width);
        d->signs = static_cast<const uint8_t*>(need(e, "signs", DType::U8, {m.rows, d->sign_bytes}).data);
        d->levels = static_cast<const float*>(need(e, "levels", DType::F32, {int64_t(1) << d->width}).data);
        d->codes = d->width ? static_cast<const uint8_t*>(need(e, "codes", DType::U8, {m.rows, d->code_bytes}).data)
                            : nullptr;
        return d;
    }
};

}  // namespace

const Codec& levels_codec() {
    static LevelsCodec c;
    return c;
}

}  // namespace deltapack
