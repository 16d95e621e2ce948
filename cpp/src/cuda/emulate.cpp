// Host emulation of the CUDA kernels: each kernel's body (cuda/bodies.h) run for every block and thread of the
// grid the GPU would launch, one after the other, on host memory. The same plans, bodies and arithmetic as the
// device, compiled by the host compiler: tests compare it bit for bit with the CPU engine.
#include <cstdlib>
#include <cstring>
#include <new>

#include "runtime.h"

namespace deltapack::cuda {
namespace {

struct HostEmulation : Runtime {
    const char* name() const override { return "host emulation"; }
    int select(int device) const override { return device; }
    void* alloc(size_t bytes, void*) const override {
        void* p = std::malloc(bytes ? bytes : 1);
        if (!p) throw std::bad_alloc();
        return p;
    }
    void release(void* p, void*) const noexcept override { std::free(p); }
    void to_device(void* dst, const void* src, size_t bytes, void*) const override {
        if (bytes) std::memcpy(dst, src, bytes);
    }
    void to_host(void* dst, const void* src, size_t bytes, void*) const override {
        if (bytes) std::memcpy(dst, src, bytes);
    }
    void wait(void*) const override {}
    // Every thread of the grid, block by block, as a GPU could schedule them.
    template <class Body>
    static void launch(const Body& body, const Grid& g) {
        if (!g.items) return;
        for (uint32_t job = 0; job < g.jobs; ++job)
            for (uint32_t block = 0; block < g.blocks; ++block)
                for (uint32_t thread = 0; thread < g.threads; ++thread) run_items(body, g, job, block, thread);
    }
    void apply(const ApplyArgs& a, void*) const override {
        plan_apply(a, [](const auto& body, const Grid& g) { launch(body, g); });
    }
    void decode(const DeltaView& v, float* out, void*) const override {
        plan_decode(v, out, [](const auto& body, const Grid& g) { launch(body, g); });
    }
    void products(const ProductArgs& p, void*) const override {
        plan_products(p, [](const auto& body, const Grid& g) { launch(body, g); });
    }
};

}  // namespace

const Runtime& host_emulation() {
    static HostEmulation r;
    return r;
}

}  // namespace deltapack::cuda
