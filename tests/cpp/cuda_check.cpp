// The CUDA path's checks that need no GPU, and those that do where one is visible:
//  - launch arithmetic: grids for counts of 2^31 and more cover every item exactly once, in 64-bit indices;
//  - the host emulation against the CPU engine (apply in every output dtype, products);
//  - with a GPU: the device against the host emulation, bit for bit, on the same deltas.
// Prints "cuda checks passed" (and what ran); exit status 0 = passed. Built by CMake (DELTAPACK_TESTS) and run by
// tests/test_kernels_native.py, and with the CUDA toolkit from PyPI by tests/test_cuda_build.py.
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "codec.h"
#include "cuda/runtime.h"

using namespace deltapack;

static int failures = 0;
static void check(bool ok, const std::string& what) {
    if (!ok && failures++ < 20) std::printf("FAILED %s\n", what.c_str());
}

// Every item of a grid once: the counts of all threads add up to `items`, and the thread that owns the last item
// reaches it (its loop's 64-bit index does not wrap).
static void check_grid(uint64_t items, uint32_t jobs) {
    const cuda::Grid g = cuda::grid_for(items, jobs);
    const std::string name = "grid for " + std::to_string(items) + " items";
    check(g.blocks >= 1 && g.blocks <= cuda::kMaxBlocks && g.threads == cuda::kThreadsPerBlock && g.jobs == jobs, name);
    const uint64_t most = uint64_t(cuda::kMaxBlocks) * cuda::kThreadsPerBlock;  // every thread busy when items allow
    check(uint64_t(g.blocks) * g.threads >= (items < most ? items : most), name + ": too few threads");
    uint64_t total = 0;
    for (uint32_t b = 0; b < g.blocks; ++b)
        for (uint32_t t = 0; t < g.threads; ++t) {
            const uint64_t first = cuda::first_item(g, b, t);
            if (first < items) total += (items - first + cuda::item_stride(g) - 1) / cuda::item_stride(g);
        }
    check(total == items, name + ": counts add to " + std::to_string(total));
    if (!items) return;
    const uint64_t owner = (items - 1) % cuda::item_stride(g);
    uint64_t last = 0, seen = 0;
    cuda::run_items([&](uint32_t, uint64_t i) { last = i, ++seen; }, g, 0, uint32_t(owner / g.threads),
                    uint32_t(owner % g.threads));
    check(last == items - 1 && seen == (items - 1 - owner) / cuda::item_stride(g) + 1, name + ": last item");
}

static std::mt19937_64 rng(7);
static std::vector<float> normal(size_t n, float scale) {
    std::normal_distribution<float> nd(0.0f, scale);
    std::vector<float> v(n);
    for (float& x : v) x = nd(rng);
    return v;
}

struct Case {
    const char* codec;
    const char* params;
};

int main() {
    for (uint64_t n : {uint64_t(0), uint64_t(1), uint64_t(255), uint64_t(256), uint64_t(257), uint64_t(1) << 24,
                       (uint64_t(1) << 31) + 5, uint64_t(3) << 32, uint64_t(1) << 40})
        check_grid(n, 1);
    check_grid(1000, 16);
    // A 2^31-row tensor's runs: 64-bit throughout.
    DeltaView big;
    big.rows = int64_t(1) << 31, big.cols = 13;
    check(cuda::runs_of(big) == (uint64_t(1) << 32), "runs of a 2^31 x 13 tensor");
    check(packed_row_bytes(int64_t(1) << 40, 3) == (int64_t(3) << 37), "packed bytes of 2^40 3-bit codes");

    const int devices = cuda_device_count();
    const std::vector<Case> cases = {{"sign", "{\"scope\":\"group\",\"group\":16}"}, {"sign", "{\"scope\":\"row\"}"},
                                     {"quant", "{\"bits\":3,\"group\":12}"},      {"levels", "{\"bits\":3}"},
                                     {"sparse", "{\"p\":0.8,\"index\":\"gaps\"}"}, {"dense", "{\"dtype\":\"bf16\"}"}};
    const std::vector<int64_t> shape = {37, 45};
    const size_t n = 37 * 45;
    const std::vector<float> delta = normal(n, 0.01f), base = normal(n, 1.0f), x = normal(3 * 45, 1.0f);
    for (const Case& c : cases) {
        Encoded enc = encode(c.codec, c.params, ArrayRef{const_cast<float*>(delta.data()), DType::F32, shape}, 1);
        EncodedRef ref{"w", enc.codec, enc.params, shape, DType::F32, {}};
        for (auto& kv : enc.components) ref.components[kv.first] = kv.second.ref;
        const std::string what = std::string(c.codec) + " " + c.params;
        // apply into bf16, dithered: the CPU engine, the emulation and (where there is one) the GPU agree
        std::vector<uint16_t> cpu(n), emulated(n);
        apply(ref, ArrayRef{const_cast<float*>(base.data()), DType::F32, shape}, ArrayRef{cpu.data(), DType::BF16, shape});
        DeviceDelta host(ref, kHostEmulation);
        host.apply(base.data(), DType::F32, emulated.data(), DType::BF16);
        check(cpu == emulated, what + ": emulated apply");
        std::vector<float> y_cpu(3 * 37, 0.5f), y_emulated = y_cpu;
        delta_product(ref, x.data(), 3, 0.75f, y_cpu.data(), 1);
        std::vector<uint8_t> ws(device_products_workspace({{&host, x.data(), 3, y_emulated.data()}}));
        device_products({{&host, x.data(), 3, y_emulated.data()}}, 0.75f, ws.data(), ws.size());
        check(std::memcmp(y_cpu.data(), y_emulated.data(), y_cpu.size() * 4) == 0, what + ": emulated product");
        if (!devices) continue;
        // the GPU: copies in, the same calls, copies out
        const cuda::Runtime& gpu = cuda::gpu();
        DeviceDelta dev(ref, 0);
        auto* d_base = static_cast<float*>(gpu.alloc(n * 4, nullptr));
        auto* d_out = static_cast<uint16_t*>(gpu.alloc(n * 2, nullptr));
        auto* d_x = static_cast<float*>(gpu.alloc(x.size() * 4, nullptr));
        auto* d_y = static_cast<float*>(gpu.alloc(y_emulated.size() * 4, nullptr));
        auto* d_ws = gpu.alloc(ws.size() + 1, nullptr);
        gpu.to_device(d_base, base.data(), n * 4, nullptr);
        gpu.to_device(d_x, x.data(), x.size() * 4, nullptr);
        std::vector<float> y_gpu(3 * 37, 0.5f);
        gpu.to_device(d_y, y_gpu.data(), y_gpu.size() * 4, nullptr);
        dev.apply(d_base, DType::F32, d_out, DType::BF16);
        device_products({{&dev, d_x, 3, d_y}}, 0.75f, d_ws, ws.size() + 1);
        std::vector<uint16_t> on_gpu(n);
        gpu.to_host(on_gpu.data(), d_out, n * 2, nullptr);
        gpu.to_host(y_gpu.data(), d_y, y_gpu.size() * 4, nullptr);
        gpu.wait(nullptr);
        check(on_gpu == cpu, what + ": GPU apply");
        check(std::memcmp(y_gpu.data(), y_cpu.data(), y_cpu.size() * 4) == 0, what + ": GPU product");
        for (void* p : {(void*)d_base, (void*)d_out, (void*)d_x, (void*)d_y, d_ws}) gpu.release(p, nullptr);
        gpu.wait(nullptr);
    }
    std::printf("cuda built: %s; GPUs: %d\n", cuda_built() ? "yes" : "no", devices);
    if (failures) {
        std::printf("%d checks failed\n", failures);
        return 1;
    }
    std::printf("cuda checks passed (launch arithmetic, host emulation%s)\n", devices ? ", GPU" : "");
    return 0;
}
