// Where the CUDA kernels run: a GPU (cuda/device.cu, built with DELTAPACK_CUDA) or the CPU's emulation of one
// (cuda/emulate.cpp, always built: tests run the kernels' bodies on machines without a GPU). DeviceDelta
// (cuda/device_delta.cpp) is written once against this interface. Every call is ordered on `stream`.
#pragma once

#include <cstddef>

#include "bodies.h"

namespace deltapack::cuda {

struct Runtime {
    virtual ~Runtime() = default;
    virtual const char* name() const = 0;
    // Makes `device` current for the calling thread and returns the one that was (DeviceScope puts it back).
    virtual int select(int device) const = 0;
    virtual void* alloc(size_t bytes, void* stream) const = 0;  // stream-ordered
    virtual void release(void* p, void* stream) const noexcept = 0;
    virtual void to_device(void* dst, const void* src, size_t bytes, void* stream) const = 0;
    virtual void to_host(void* dst, const void* src, size_t bytes, void* stream) const = 0;
    virtual void wait(void* stream) const = 0;  // until the stream's work is done; throws its error
    virtual void apply(const ApplyArgs& a, void* stream) const = 0;
    virtual void decode(const DeltaView& v, float* out, void* stream) const = 0;
    virtual void products(const ProductArgs& p, void* stream) const = 0;
};

// `device` current while it lives, then the caller's device again: the library leaves the thread as it found it.
class DeviceScope {
public:
    DeviceScope(const Runtime& rt, int device) : rt_(rt), previous_(rt.select(device)) {}
    ~DeviceScope() {
        try {
            rt_.select(previous_);
        } catch (...) {  // the device was current a moment ago; nothing to report from a destructor
        }
    }
    DeviceScope(const DeviceScope&) = delete;
    DeviceScope& operator=(const DeviceScope&) = delete;

private:
    const Runtime& rt_;
    int previous_;
};

const Runtime& host_emulation();  // the kernels' bodies looped over their grids, on the calling thread
const Runtime& gpu();             // std::runtime_error when the library was built without CUDA
int gpu_count();                  // 0 when built without CUDA, or without a driver or device

}  // namespace deltapack::cuda
