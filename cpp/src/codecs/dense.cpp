// dense: the delta as it is, in f32, f16 or bf16 (norms, biases, small tensors).
#include "common.h"

namespace deltapack {
namespace {

struct DenseDecoder : RowDecoder {
    const uint8_t* values;
    DType dtype;
    int64_t cols;
    void decode(int64_t r0, int nrows, float* dst, const Kernels& k) const override {
        k.to_f32(values + size_t(r0 * cols) * dtype_size(dtype), dtype, dst, size_t(nrows * cols));
    }
    DeltaView view() const override {
        DeltaView v;
        v.kind = DeltaView::Dense;
        v.part[0] = values, v.dtype = dtype;
        return v;
    }
};

class DenseCodec : public Codec {
public:
    const char* name() const override { return "dense"; }

    json::Value canonical(const json::Value& params) const override {
        ParamReader r("dense", params);
        r.choice("dtype", "f32", {"f32", "f16", "bf16"});
        return r.finish();
    }

    std::map<std::string, Array> encode(json::Value& p, const EncodeInput& in, int threads) const override {
        const DType dt = dtype_from_name(param_str(p, "dtype"));
        Array values = Array::zeros(dt, in.a.shape);
        auto* out = static_cast<uint8_t*>(values.ref.data);
        const Matrix m = in.m;
        const Kernels& k = kernels();
        parallel_rows(m.rows, m.cols, threads, [&](int64_t r0, int64_t r1) {
            std::vector<float> buf(size_t(m.cols));
            for (int64_t r = r0; r < r1; ++r) {
                in.row(r, buf.data(), k);
                check_finite(buf.data(), m.cols, r);
                void* row = out + size_t(r * m.cols) * dtype_size(dt);
                for (int64_t j = 0; j < m.cols; ++j) store_checked(row, dt, size_t(j), buf[size_t(j)], "dense");
            }
        });
        return {{"values", values}};
    }

    std::unique_ptr<RowDecoder> prepare(const EncodedRef& e, const json::Value& p, const Matrix& m) const override {
        auto d = std::make_unique<DenseDecoder>();
        d->dtype = dtype_from_name(param_str(p, "dtype"));
        d->cols = m.cols;
        d->values = static_cast<const uint8_t*>(need(e, "values", d->dtype, e.shape).data);
        return d;
    }
};

}  // namespace

const Codec& dense_codec() {
    static DenseCodec c;
    return c;
}

}  // namespace deltapack
