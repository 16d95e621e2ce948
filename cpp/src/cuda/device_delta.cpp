// DeviceDelta and device_products: the host side of the CUDA path, written once for the GPU and its host
// emulation (cuda/runtime.h). Validation, the rules of a rebuild and its errors are the CPU engine's (codec.h).
#include <algorithm>
#include <mutex>

#include "../codec.h"
#include "runtime.h"

namespace deltapack {

bool cuda_built() {
#ifdef DELTAPACK_WITH_CUDA
    return true;
#else
    return false;
#endif
}

int cuda_device_count() { return cuda::gpu_count(); }

static const cuda::Runtime& runtime_for(int device) {
    if (device == kHostEmulation) return cuda::host_emulation();
    if (device < 0) throw std::invalid_argument("device " + std::to_string(device) + ": not a CUDA device number");
    const cuda::Runtime& gpu = cuda::gpu();  // throws when built without CUDA
    const int n = cuda::gpu_count();
    if (device >= n)
        throw std::invalid_argument("CUDA device " + std::to_string(device) + " is not visible (" + std::to_string(n) +
                                    " devices)");
    return gpu;
}

static constexpr size_t kAlign = 256;  // every component on its own aligned start (as cudaMalloc's)
static size_t aligned(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

struct DeviceDelta::Impl {
    const cuda::Runtime* rt = nullptr;
    int device = 0;
    std::string name, codec;
    std::vector<int64_t> shape;
    DeltaView view;  // pointers into `memory`
    void* memory = nullptr;
    uint64_t bytes = 0;
    unsigned long long* errors = nullptr;  // 2 slots after the components: see cuda::ApplyArgs
    std::mutex mu;                         // apply's error slots: one call at a time
    ~Impl() {
        if (!memory) return;
        try {
            cuda::DeviceScope scope(*rt, device);
            rt->release(memory, nullptr);
        } catch (...) {  // a destructor reports nothing; the driver frees the memory with the context
        }
    }
};

DeviceDelta::DeviceDelta(const EncodedRef& enc, int device, void* stream) : impl_(std::make_unique<Impl>()) {
    Impl& d = *impl_;
    d.rt = &runtime_for(device);
    d.device = device;
    d.name = enc.name, d.codec = enc.codec, d.shape = enc.shape;
    d.view = describe(enc);  // validates; pointers into enc's components
    // The parts the view reads, each a whole component: laid out one after the other, then the error slots.
    std::vector<std::pair<const ArrayRef*, size_t>> parts;  // component, offset
    size_t at = 0;
    for (const void* p : d.view.part) {
        if (!p) continue;
        const ArrayRef* found = nullptr;  // the largest component starting there (an empty one may share its address)
        for (const auto& kv : enc.components)
            if (kv.second.data == p && (!found || kv.second.nbytes() > found->nbytes())) found = &kv.second;
        if (!found) throw std::logic_error("tensor '" + enc.name + "': a codec's view points outside its components");
        parts.push_back({found, at});
        at += aligned(found->nbytes());
    }
    d.bytes = at + 2 * sizeof(unsigned long long);
    cuda::DeviceScope scope(*d.rt, device);
    d.memory = d.rt->alloc(d.bytes, stream);
    auto* base = static_cast<uint8_t*>(d.memory);
    size_t next = 0;
    for (const void*& p : d.view.part) {
        if (!p) continue;
        d.rt->to_device(base + parts[next].second, parts[next].first->data, parts[next].first->nbytes(), stream);
        p = base + parts[next++].second;
    }
    d.errors = reinterpret_cast<unsigned long long*>(base + at);
    d.rt->wait(stream);
}

DeviceDelta::~DeviceDelta() = default;
const std::string& DeviceDelta::name() const { return impl_->name; }
const std::vector<int64_t>& DeviceDelta::shape() const { return impl_->shape; }
int DeviceDelta::device() const { return impl_->device; }
uint64_t DeviceDelta::device_bytes() const { return impl_->bytes; }

void DeviceDelta::apply(const void* base, DType base_dtype, void* out, DType out_dtype, ApplyParams params,
                        void* stream) const {
    Impl& d = *impl_;
    check_alpha(params.alpha);
    const int64_t numel = d.view.rows * d.view.cols;
    check_apply_buffers(d.name, base, base_dtype, out, out_dtype, numel);
    cuda::ApplyArgs a{d.view, base, out, base_dtype, out_dtype, params.alpha, dithers(d.codec, out_dtype, params.rounding),
                      cuda::runs_align(d.view.cols, base, out), d.errors};
    std::lock_guard<std::mutex> lock(d.mu);
    cuda::DeviceScope scope(*d.rt, d.device);
    unsigned long long first[2] = {~0ull, ~0ull};
    d.rt->to_device(d.errors, first, sizeof first, stream);
    d.rt->apply(a, stream);
    d.rt->to_host(first, d.errors, sizeof first, stream);
    d.rt->wait(stream);
    const int64_t cols = std::max<int64_t>(d.view.cols, 1);
    if (first[0] != ~0ull) throw bad_step_error(d.name, "beyond 2^126 or not a number", int64_t(first[0]) / cols);
    if (first[1] != ~0ull) throw f16_overflow_error(d.name, int64_t(first[1]) / cols);
}

void DeviceDelta::decode(float* out, void* stream) const {
    cuda::DeviceScope scope(*impl_->rt, impl_->device);
    impl_->rt->decode(impl_->view, out, stream);
}

// Friend of DeviceDelta: reads the views of a batch's deltas.
struct DeviceProducts {
    static const DeltaView& view(const DeviceDelta& d) { return d.impl_->view; }
    static const cuda::Runtime& runtime(const DeviceDelta& d) { return *d.impl_->rt; }
};

static uint64_t job_scratch_bytes(const DeviceProductJob& j) {
    return aligned(size_t(cuda::product_scratch_floats(DeviceProducts::view(*j.delta), j.batch)) * sizeof(float));
}

uint64_t device_products_workspace(const std::vector<DeviceProductJob>& jobs) {
    uint64_t total = 0;
    for (const DeviceProductJob& j : jobs) total += job_scratch_bytes(j);
    return total;
}

void device_products(const std::vector<DeviceProductJob>& jobs, float alpha, void* workspace, uint64_t workspace_bytes,
                     void* stream) {
    check_alpha(alpha);
    if (jobs.empty()) return;
    const DeviceDelta& first = *jobs[0].delta;
    for (const DeviceProductJob& j : jobs) {  // every job checked before anything is queued
        const DeltaView& v = DeviceProducts::view(*j.delta);
        if (j.batch < 0 || j.batch > (int64_t(1) << 30))
            throw std::invalid_argument("tensor '" + j.delta->name() + "': batch of " + std::to_string(j.batch) + " rows");
        if (v.rows != DeviceProducts::view(first).rows || v.cols != DeviceProducts::view(first).cols)
            throw std::invalid_argument("tensor '" + j.delta->name() + "': a " + std::to_string(v.rows) + " x " +
                                        std::to_string(v.cols) + " delta among " +
                                        std::to_string(DeviceProducts::view(first).rows) + " x " +
                                        std::to_string(DeviceProducts::view(first).cols) + " ones");
        if (j.delta->device() != first.device())
            throw std::invalid_argument("tensor '" + j.delta->name() + "': on device " + std::to_string(j.delta->device()) +
                                        ", the batch's other deltas on " + std::to_string(first.device()));
    }
    if (workspace_bytes < device_products_workspace(jobs))
        throw std::invalid_argument("device_products: the workspace holds " + std::to_string(workspace_bytes) +
                                    " bytes; the batch needs " + std::to_string(device_products_workspace(jobs)));
    if (!workspace && device_products_workspace(jobs))
        throw std::invalid_argument("device_products: the workspace is null");
    const cuda::Runtime& rt = DeviceProducts::runtime(first);
    cuda::DeviceScope scope(rt, first.device());
    auto* scratch = static_cast<uint8_t*>(workspace);
    for (size_t j0 = 0; j0 < jobs.size(); j0 += cuda::kMaxProductJobs) {  // launches of up to 16 fine-tunes
        cuda::ProductArgs p{};
        p.alpha = alpha;
        p.jobs = int(std::min<size_t>(cuda::kMaxProductJobs, jobs.size() - j0));
        for (int i = 0; i < p.jobs; ++i) {
            const DeviceProductJob& j = jobs[j0 + size_t(i)];
            p.job[i] = cuda::ProductJobArgs{DeviceProducts::view(*j.delta), j.x, j.y, j.batch,
                                            reinterpret_cast<float*>(scratch)};
            scratch += job_scratch_bytes(j);
        }
        rt.products(p, stream);
    }
}

}  // namespace deltapack
