// The threaded paths under ThreadSanitizer (fuzz/run.sh builds it with -DDELTAPACK_TSAN=ON): for every codec,
// several application threads rebuild from one shared encoded tensor and one shared open delta file at once,
// each rebuild itself split over worker threads; every result must equal the single-threaded rebuild.
// Exit status 0 = no mismatch (TSan reports races on its own and fails the run).
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "deltapack/deltapack.h"

using namespace deltapack;

int main() {
    const int64_t rows = 384, cols = 1024;
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.0f, 1e-3f);
    std::vector<float> delta(size_t(rows * cols)), base(delta.size());
    for (auto& x : delta) x = nd(rng);
    for (auto& x : base) x = 50.0f * nd(rng);
    const ArrayRef din{delta.data(), DType::F32, {rows, cols}}, bin{base.data(), DType::F32, {rows, cols}};
    const char* path = "thread_check.dpk";
    int failures = 0;
    // lowrank is encoded in Python (numpy's SVD): its factors here are random, which decodes the same way.
    const int64_t rank = 8;
    Encoded lowrank{"lowrank", canonical_params("lowrank", "{\"rank\":8,\"dtype\":\"f32\"}"), {}};
    for (auto [name, shape] : {std::pair<const char*, std::vector<int64_t>>{"u", {rows, rank}}, {"v", {rank, cols}}}) {
        Array a = Array::zeros(DType::F32, shape);
        for (int64_t i = 0; i < shape[0] * shape[1]; ++i) static_cast<float*>(a.ref.data)[i] = nd(rng);
        lowrank.components[name] = a;
    }
    for (const char* recipe : {"sign|{}", "levels|{\"bits\":3}", "sparse|{\"p\":0.9,\"index\":\"gaps\"}",
                               "sparse|{\"p\":0.9,\"index\":\"bitmap\"}", "lowrank|", "quant|{\"bits\":4}",
                               "dense|{}"}) {
        const std::string spec(recipe), codec = spec.substr(0, spec.find('|')), params = spec.substr(spec.find('|') + 1);
        Encoded enc = codec == "lowrank" ? lowrank : encode(codec, params, din, 4);
        EncodedRef ref{"w", enc.codec, enc.params, {rows, cols}, DType::F32, {}};
        for (auto& c : enc.components) ref.components[c.first] = c.second.ref;
        save(path, {ref});
        auto file = DeltaFile::open(path);
        std::vector<float> expected(delta.size());
        ApplyParams one = apply_default_params();
        one.threads = 1;
        apply(ref, bin, ArrayRef{expected.data(), DType::F32, {rows, cols}}, one);
        std::vector<std::vector<float>> outs(6, std::vector<float>(delta.size()));
        std::vector<std::thread> pool;
        for (size_t t = 0; t < outs.size(); ++t)
            pool.emplace_back([&, t] {
                ApplyParams p = apply_default_params();
                p.threads = 3;
                const DeltaTensor read = t % 2 ? file->get("w", true) : DeltaTensor{ref, nullptr};  // the shared file
                apply(read.ref, bin, ArrayRef{outs[t].data(), DType::F32, {rows, cols}}, p);    // (CRC checked) or the arrays
            });
        for (auto& th : pool) th.join();
        for (auto& o : outs)
            if (std::memcmp(o.data(), expected.data(), expected.size() * sizeof(float)) != 0) {
                std::printf("MISMATCH %s\n", recipe);
                ++failures;
            }
    }
    std::remove(path);
    std::printf(failures ? "%d mismatches\n" : "threaded rebuilds identical\n", failures);
    return failures ? 1 : 0;
}
