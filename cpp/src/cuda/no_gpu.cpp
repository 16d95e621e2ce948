// The GPU runtime of a library built without CUDA (DELTAPACK_CUDA=OFF, or AUTO without a toolkit): no GPU, and
// a clear error for anything that asks for one. The host emulation is still there.
#include <stdexcept>

#include "runtime.h"

namespace deltapack::cuda {

const Runtime& gpu() {
    throw std::runtime_error("this deltapack was built without CUDA (rebuild with a CUDA toolkit; docs/cuda.md)");
}

int gpu_count() { return 0; }

}  // namespace deltapack::cuda
