// sparse: DARE (seeded random drop, kept values * 1/(1-p)) or magnitude top-k. Index as a bitmap
// or as byte gaps (zero-valued filler entries bridge gaps over 255), whichever is smaller.
#include <algorithm>
#include <cmath>

#include "common.h"

namespace deltapack {
namespace {

uint64_t splitmix(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

DType value_dtype(const std::string& v) { return v == "int8" ? DType::I8 : dtype_from_name(v); }

struct SparseDecoder : RowDecoder {
    const int64_t* rowptr;
    const uint8_t *mask = nullptr, *gaps = nullptr, *values;
    const float* vscale = nullptr;
    DType vt;
    int64_t cols, mask_bytes;
    void decode(int64_t r0, int nrows, float* dst, const Kernels& k) const override {
        const size_t vsize = dtype_size(vt);
        for (int i = 0; i < nrows; ++i) {
            const int64_t r = r0 + i, e0 = rowptr[r], count = rowptr[r + 1] - e0;
            const float vs = vscale ? vscale[r] : 1.0f;
            const uint8_t* vals = values + size_t(e0) * vsize;
            float* out = dst + size_t(i) * size_t(cols);
            if (mask) {
                k.sparse_expand(mask + size_t(r * mask_bytes), vals, vt, vs, size_t(cols), out);
                continue;
            }
            // Gaps: widen the row's values, then place them (prefix sums of the gaps give the columns).
            thread_local std::vector<float> widened_storage;  // TLS lookup once per row, not per value
            widened_storage.resize(size_t(count));
            float* w = widened_storage.data();
            if (vt == DType::I8)
                for (int64_t q = 0; q < count; ++q) w[q] = sparse_value(vals, vt, size_t(q), vs);
            else
                k.to_f32(vals, vt, w, size_t(count));
            k.gaps_scatter(gaps + e0, w, size_t(count), out, size_t(cols));
        }
    }
    DeltaView view() const override {
        DeltaView v;
        v.kind = mask ? DeltaView::SparseBitmap : DeltaView::SparseGaps;
        v.part[0] = rowptr, v.part[1] = mask ? mask : gaps, v.part[2] = values, v.part[3] = vscale;
        v.row_bytes = mask_bytes, v.dtype = vt;
        return v;
    }
};

class SparseCodec : public Codec {
public:
    const char* name() const override { return "sparse"; }

    json::Value canonical(const json::Value& params) const override {
        ParamReader r("sparse", params);
        r.number("p", 0.9, 0.0, 1.0);
        r.choice("mode", "random", {"random", "magnitude"});
        r.integer("seed", 0, INT64_MIN, INT64_MAX);
        r.choice("values", "f16", {"f16", "bf16", "f32", "int8"});
        r.choice("index", "auto", {"auto", "bitmap", "gaps"});
        return r.finish();
    }

    std::map<std::string, Array> encode(json::Value& p, const EncodeInput& in, int threads) const override {
        const Matrix m = in.m;
        const double pr = param_num(p, "p");
        const bool random = param_str(p, "mode") == "random";
        const uint64_t seed = uint64_t(param_int(p, "seed"));
        const std::string vname = param_str(p, "values"), index = param_str(p, "index");
        const DType vt = value_dtype(vname);
        const int64_t mb = packed_row_bytes(m.cols, 1), n = m.rows * m.cols;
        const Kernels& k = kernels();
        Array mask = Array::zeros(DType::U8, {m.rows, mb});
        auto* mk = static_cast<uint8_t*>(mask.ref.data);
        std::vector<int64_t> nnz(size_t(m.rows)), ngap(size_t(m.rows));

        std::vector<uint8_t> keep_mag;  // magnitude mode: the global top-k, decided up front
        if (!random) {
            std::vector<uint64_t> keys(static_cast<size_t>(n));
            parallel_rows(m.rows, m.cols, threads, [&](int64_t r0, int64_t r1) {
                std::vector<float> buf(size_t(m.cols));
                for (int64_t r = r0; r < r1; ++r) {
                    in.row(r, buf.data(), k);
                    check_finite(buf.data(), m.cols, r);
                    for (int64_t j = 0; j < m.cols; ++j) {
                        uint64_t mag = f32_to_bits(buf[size_t(j)]) & 0x7fffffffu;
                        keys[size_t(r * m.cols + j)] = ((0x7fffffffull - mag) << 32) | uint64_t(r * m.cols + j);
                    }
                }
            });
            if (n >= (int64_t(1) << 32)) throw std::invalid_argument("sparse: tensor too large (>= 2^32 elements)");
            int64_t n_keep = n - int64_t(std::nearbyint(pr * double(n)));
            if (n_keep < n) std::nth_element(keys.begin(), keys.begin() + n_keep, keys.end());
            keep_mag.assign(size_t(n), 0);
            for (int64_t q = 0; q < n_keep; ++q) keep_mag[keys[size_t(q)] & 0xffffffffu] = 1;
        }
        // Pass 1: the mask, and per-row counts of values and of gap entries (with fillers).
        parallel_rows(m.rows, m.cols, threads, [&](int64_t r0, int64_t r1) {
            std::vector<float> buf(size_t(m.cols));
            for (int64_t r = r0; r < r1; ++r) {
                if (random) {
                    in.row(r, buf.data(), k);
                    check_finite(buf.data(), m.cols, r);
                }
                int64_t prev = -1, cnt = 0, gaps = 0;
                for (int64_t j = 0; j < m.cols; ++j) {
                    uint64_t flat = uint64_t(r * m.cols + j);
                    bool keep = random ? double(splitmix(seed, flat) >> 40) * 0x1p-24 >= pr : keep_mag[flat] != 0;
                    if (!keep) continue;
                    mk[r * mb + j / 8] |= uint8_t(1u << (j & 7));
                    gaps += (j - prev - 1) / 256 + 1;
                    prev = j;
                    ++cnt;
                }
                gaps += (m.cols - prev - 1) / 256;  // end fillers: the row reaches within 255 of its width
                nnz[size_t(r)] = cnt;
                ngap[size_t(r)] = gaps;
            }
        });
        int64_t total_nnz = 0, total_gap = 0;
        for (int64_t r = 0; r < m.rows; ++r) total_nnz += nnz[size_t(r)], total_gap += ngap[size_t(r)];
        const int64_t vsize = int64_t(dtype_size(vt));
        const bool use_gaps = index == "gaps" ||
                              (index == "auto" && total_gap * (1 + vsize) < m.rows * mb + total_nnz * vsize);
        p.set("index", json::Value::make_string(use_gaps ? "gaps" : "bitmap"));
        const std::vector<int64_t>& per_row = use_gaps ? ngap : nnz;
        Array rowptr = Array::zeros(DType::I64, {m.rows + 1});
        auto* rp = static_cast<int64_t*>(rowptr.ref.data);
        for (int64_t r = 0; r < m.rows; ++r) rp[r + 1] = rp[r] + per_row[size_t(r)];
        const int64_t entries = rp[m.rows];
        Array values = Array::zeros(vt, {entries});
        Array gaps = Array::zeros(DType::U8, {use_gaps ? entries : 0});
        Array vscale = Array::zeros(DType::F32, {vt == DType::I8 ? m.rows : 0});
        auto* gp = static_cast<uint8_t*>(gaps.ref.data);
        auto* vs = static_cast<float*>(vscale.ref.data);
        const float rescale = random ? float(1.0 / (1.0 - pr)) : 1.0f;
        // Pass 2: values (and gaps) at each row's offset.
        parallel_rows(m.rows, m.cols, threads, [&](int64_t r0, int64_t r1) {
            std::vector<float> buf(size_t(m.cols)), vals;
            for (int64_t r = r0; r < r1; ++r) {
                in.row(r, buf.data(), k);
                vals.clear();
                int64_t prev = -1, e = rp[r];
                for (int64_t j = 0; j < m.cols; ++j) {
                    if (!((mk[r * mb + j / 8] >> (j & 7)) & 1)) continue;
                    if (use_gaps) {
                        while (j - prev - 1 > 255) {
                            prev += 256;
                            gp[e++] = 255;
                            vals.push_back(0.0f);
                        }
                        gp[e++] = uint8_t(j - prev - 1);
                        prev = j;
                    }
                    vals.push_back(buf[size_t(j)] * rescale);
                }
                // End fillers: a row's entries reach within 255 columns of its width, so a reader can
                // tell a file's width from its data (a width no entry reaches is a decompression bomb).
                while (use_gaps && m.cols - prev - 1 > 255) {
                    prev += 256;
                    gp[e++] = 255;
                    vals.push_back(0.0f);
                }
                void* vdst = static_cast<uint8_t*>(values.ref.data) + size_t(rp[r]) * size_t(vsize);
                if (vt != DType::I8) {
                    for (size_t q = 0; q < vals.size(); ++q) store_checked(vdst, vt, q, vals[q], "sparse");
                    continue;
                }
                float mx = 0.0f;
                for (float v : vals) mx = std::max(mx, std::fabs(v));
                const float s = mx / 127.0f;
                vs[r] = s;
                auto* q8 = static_cast<int8_t*>(vdst);
                for (size_t q = 0; q < vals.size(); ++q)
                    q8[q] = s > 0.0f ? int8_t(std::min(127.0f, std::max(-127.0f, std::nearbyint(vals[q] / s)))) : 0;
            }
        });
        std::map<std::string, Array> out{{"rowptr", rowptr}, {"values", values}};
        if (use_gaps) out["gaps"] = gaps; else out["mask"] = mask;
        if (vt == DType::I8) out["vscale"] = vscale;
        return out;
    }

    std::unique_ptr<RowDecoder> prepare(const EncodedRef& e, const json::Value& p, const Matrix& m) const override {
        auto d = std::make_unique<SparseDecoder>();
        const std::string index = param_str(p, "index");
        if (index == "auto") bad_component(e, "index must be 'bitmap' or 'gaps' in a stored tensor");
        d->vt = value_dtype(param_str(p, "values"));
        d->cols = m.cols;
        d->mask_bytes = packed_row_bytes(m.cols, 1);
        d->rowptr = static_cast<const int64_t*>(need(e, "rowptr", DType::I64, {m.rows + 1}).data);
        const ArrayRef& vals = need_1d(e, "values", d->vt);
        d->values = static_cast<const uint8_t*>(vals.data);
        const int64_t entries = vals.shape[0];
        if (d->rowptr[0] != 0 || d->rowptr[m.rows] != entries)
            bad_component(e, "rowptr must start at 0 and end at the number of values (" + std::to_string(entries) + ")");
        for (int64_t r = 0; r < m.rows; ++r)
            if (d->rowptr[r + 1] < d->rowptr[r]) bad_component(e, "rowptr decreases at row " + std::to_string(r));
        if (d->vt == DType::I8) d->vscale = static_cast<const float*>(need(e, "vscale", DType::F32, {m.rows}).data);
        if (index == "bitmap") {
            d->mask = static_cast<const uint8_t*>(need(e, "mask", DType::U8, {m.rows, d->mask_bytes}).data);
            const int tail_bits = int(m.cols % 8);
            const Kernels& k = kernels();
            for (int64_t r = 0; r < m.rows; ++r) {
                const uint8_t* row = d->mask + size_t(r * d->mask_bytes);
                const int64_t cnt = int64_t(k.popcount_bytes(row, size_t(d->mask_bytes)));
                if (tail_bits && (row[d->mask_bytes - 1] >> tail_bits))
                    bad_component(e, "mask has bits set past the last column in row " + std::to_string(r));
                if (cnt != d->rowptr[r + 1] - d->rowptr[r])
                    bad_component(e, "mask and rowptr disagree in row " + std::to_string(r));
            }
        } else {
            d->gaps = static_cast<const uint8_t*>(need(e, "gaps", DType::U8, {entries}).data);
            // The last column of a row is sum(gap + 1) - 1 over its entries; it must lie in the row's last
            // 256 columns, so that the width is backed by data (end fillers pad rows that end early).
            const Kernels& k = kernels();
            for (int64_t r = 0; r < m.rows; ++r) {
                const int64_t count = d->rowptr[r + 1] - d->rowptr[r];
                const uint64_t span = k.sum_bytes(d->gaps + d->rowptr[r], size_t(count)) + uint64_t(count);
                if (span > uint64_t(m.cols)) bad_component(e, "gaps run past the last column in row " + std::to_string(r));
                if (uint64_t(m.cols) - span > 255)
                    bad_component(e, "row " + std::to_string(r) + " ends " + std::to_string(uint64_t(m.cols) - span) +
                                         " columns before the width (at most 255 may be left: a width the data "
                                         "does not reach is how a small file would declare a huge tensor)");
            }
        }
        return d;
    }
};

}  // namespace

const Codec& sparse_codec() {
    static SparseCodec c;
    return c;
}

}  // namespace deltapack
