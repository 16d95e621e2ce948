// The GPU runtime: each body of cuda/bodies.h as a __global__ kernel, launched on the caller's stream over the
// grids of the plans there; memory through the stream-ordered allocator (its pool serves repeated calls without
// a system allocation). Built with DELTAPACK_CUDA; compiled with --fmad=false (no FMA contraction: the CPU's bits).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "runtime.h"

namespace deltapack::cuda {
namespace {

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}

// Kernel parameters travel by value: a batch's 16 deltas' views fit the 32 KiB that CUDA 12.1+ allows (Volta on).
static_assert(sizeof(ProductRows) + sizeof(Grid) <= 32764, "kernel parameters over 32 KiB");

template <class Body>
__global__ void __launch_bounds__(kThreadsPerBlock) run_kernel(const Body body, const Grid g) {
    run_items(body, g, blockIdx.y, blockIdx.x, threadIdx.x);
}

template <class Body>
void launch(const Body& body, const Grid& g, cudaStream_t stream) {
    if (!g.items) return;
    run_kernel<Body><<<dim3(g.blocks, g.jobs), dim3(g.threads), 0, stream>>>(body, g);
    check(cudaGetLastError(), "kernel launch");
}

struct Gpu : Runtime {
    const char* name() const override { return "cuda"; }
    int select(int device) const override {
        int previous = 0;
        check(cudaGetDevice(&previous), "cudaGetDevice");
        if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
        return previous;
    }
    void* alloc(size_t bytes, void* stream) const override {
        void* p = nullptr;
        check(cudaMallocAsync(&p, bytes ? bytes : 1, cudaStream_t(stream)), "cudaMallocAsync");
        return p;
    }
    void release(void* p, void* stream) const noexcept override { cudaFreeAsync(p, cudaStream_t(stream)); }
    void to_device(void* dst, const void* src, size_t bytes, void* stream) const override {
        if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cudaStream_t(stream)), "copy to device");
    }
    void to_host(void* dst, const void* src, size_t bytes, void* stream) const override {
        if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cudaStream_t(stream)), "copy to host");
    }
    void wait(void* stream) const override { check(cudaStreamSynchronize(cudaStream_t(stream)), "stream"); }
    void apply(const ApplyArgs& a, void* stream) const override {
        plan_apply(a, [&](const auto& body, const Grid& g) { launch(body, g, cudaStream_t(stream)); });
    }
    void decode(const DeltaView& v, float* out, void* stream) const override {
        plan_decode(v, out, [&](const auto& body, const Grid& g) { launch(body, g, cudaStream_t(stream)); });
    }
    void products(const ProductArgs& p, void* stream) const override {
        plan_products(p, [&](const auto& body, const Grid& g) { launch(body, g, cudaStream_t(stream)); });
    }
};

}  // namespace

const Runtime& gpu() {
    static Gpu r;
    return r;
}

int gpu_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // no driver or no device: not an error to keep
        return 0;
    }
    return n;
}

}  // namespace deltapack::cuda
