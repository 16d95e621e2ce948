// lowrank: truncated SVD factors, delta = u @ v with u (rows x r) and v (r x cols).
// Encoding (the SVD) is done by LAPACK through numpy in python/deltapack; this file validates
// and decodes.
#include <mutex>

#include "common.h"

namespace deltapack {
namespace {

struct LowrankDecoder : RowDecoder {
    const uint8_t *u, *v_stored;
    DType dt;
    int64_t rank, cols;
    // The r x cols factor widened to f32 once, by the first decode: validate() (which also prepares a
    // decoder) then does no decode work.
    mutable std::vector<float> v;
    mutable std::once_flag v_ready;
    int rows_per_block() const override { return 4; }
    void decode(int64_t r0, int nrows, float* dst, const Kernels& k) const override {
        std::call_once(v_ready, [&] {
            v.resize(size_t(rank * cols));
            k.to_f32(v_stored, dt, v.data(), v.size());
        });
        float ublock[4 * 4096];
        std::vector<float> big;
        float* ub = ublock;
        if (nrows * rank > int64_t(sizeof(ublock) / sizeof(float))) {
            big.resize(size_t(nrows * rank));
            ub = big.data();
        }
        k.to_f32(u + size_t(r0 * rank) * dtype_size(dt), dt, ub, size_t(nrows * rank));
        k.lowrank_rows(ub, v.data(), int(rank), size_t(cols), nrows, dst);
    }
};

class LowrankCodec : public Codec {
public:
    const char* name() const override { return "lowrank"; }

    json::Value canonical(const json::Value& params) const override {
        ParamReader r("lowrank", params);
        r.integer("rank", 16, 1, int64_t(1) << 20);
        r.choice("dtype", "f16", {"f16", "bf16", "f32"});
        return r.finish();
    }

    std::map<std::string, Array> encode(json::Value&, const EncodeInput&, int) const override {
        throw std::invalid_argument("codec 'lowrank' is encoded in Python (numpy SVD): use deltapack.encode");
    }

    std::unique_ptr<RowDecoder> prepare(const EncodedRef& e, const json::Value& p, const Matrix& m) const override {
        auto d = std::make_unique<LowrankDecoder>();
        d->rank = param_int(p, "rank");
        d->dt = dtype_from_name(param_str(p, "dtype"));
        d->cols = m.cols;
        d->u = static_cast<const uint8_t*>(need(e, "u", d->dt, {m.rows, d->rank}).data);
        d->v_stored = static_cast<const uint8_t*>(need(e, "v", d->dt, {d->rank, m.cols}).data);
        return d;
    }
};

}  // namespace

const Codec& lowrank_codec() {
    static LowrankCodec c;
    return c;
}

}  // namespace deltapack
