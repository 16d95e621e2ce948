// deltapack: compact fine-tune deltas (W_ft - W_base), rebuilt on load.
//
// The whole public C++ API. A delta file is a safetensors file whose tensors are the codec
// components of each delta ("<tensor>:<component>") and whose __metadata__ holds a JSON manifest
// (docs/FORMAT.md). Numerics everywhere: decode to f32, out = round(f32(base) + f32(alpha) * d),
// rounded once to the output dtype (nearest-even); every SIMD path gives the same bits.
//
// Errors are reported as deltapack::FormatError (bad file or component data) or
// std::invalid_argument (bad parameters, mismatched shapes); messages name file, tensor, problem.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace deltapack {

// ----------------------------------------------------------------------------------- basics

// Float types the engine computes with, plus the integer/byte types of components and of
// other tensors a safetensors file may hold.
enum class DType : uint8_t { F32, F16, BF16, F64, I64, I32, I16, I8, U64, U32, U16, U8, BOOL, F8_E4M3, F8_E5M2 };

const char* dtype_name(DType t);                 // "f32", "f16", "bf16", "f64", "i64", ...
DType dtype_from_name(const std::string& name);  // accepts deltapack and safetensors spellings
size_t dtype_size(DType t);                      // bytes per element

struct FormatError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A non-owning view of a dense row-major array.
struct ArrayRef {
    void* data = nullptr;
    DType dtype = DType::F32;
    std::vector<int64_t> shape;
    int64_t numel() const;
    size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
};

// An owned array (what encoders produce).
struct Array {
    std::shared_ptr<uint8_t[]> storage;
    ArrayRef ref;
    static Array zeros(DType dtype, std::vector<int64_t> shape);
};

// ----------------------------------------------------------------------------------- codecs

// One encoded tensor: codec name, canonical parameters (JSON object text), the original tensor's
// shape and dtype, and the components (views; whoever builds it keeps the bytes alive).
struct EncodedRef {
    std::string name;                            // tensor name, for error messages
    std::string codec;                           // "sign", "levels", "sparse", "lowrank", "quant", "dense"
    std::string params;                          // canonical JSON object, e.g. {"scope":"row","group":128}
    std::vector<int64_t> shape;                  // original tensor shape
    DType dtype = DType::F32;                    // original tensor dtype
    std::map<std::string, ArrayRef> components;  // e.g. {"signs": ..., "scales": ...}
};

struct Encoded {
    std::string codec, params;
    std::map<std::string, Array> components;
};

// Names of the registered codecs, in registry order.
std::vector<std::string> codec_names();

// Validates `params` (JSON object text) for `codec`, fills defaults, returns canonical JSON.
// Throws std::invalid_argument on an unknown codec, unknown key or out-of-range value.
std::string canonical_params(const std::string& codec, const std::string& params);

// Encodes a tensor (f32, f16 or bf16) with a codec. The returned params are canonical and may
// include values chosen by the encoder (e.g. quant's scale_exp, sparse's index).
// lowrank has no C++ encoder (its SVD is done by LAPACK through numpy); use the Python API.
Encoded encode(const std::string& codec, const std::string& params, const ArrayRef& delta,
               int threads = 0);

// Checks that the components of `enc` are consistent with its codec, params and shape (sizes,
// dtypes, index streams in range). Throws FormatError naming the tensor. apply/decode call it.
void validate(const EncodedRef& enc);

// ----------------------------------------------------------------------------------- engine

struct ApplyParams {
    float alpha = 1.0f;  // out = base + alpha * delta
    int threads = 0;     // 0: all cores (see set_default_threads)
};
ApplyParams apply_default_params();

// out = round(base + alpha * decode(enc)); base and out are f32, f16 or bf16 with the delta's
// shape; out may alias base (in place). Never materialises the whole f32 delta.
void apply(const EncodedRef& enc, const ArrayRef& base, const ArrayRef& out,
           ApplyParams params = apply_default_params());

// out (f32, shape of the delta) = decode(enc).
void decode(const EncodedRef& enc, const ArrayRef& out, int threads = 0);

// SIMD path: "auto" (best available; default, or from env DELTAPACK_SIMD), "scalar", "avx2",
// "avx512" (x86-64), "neon" (AArch64). Throws std::invalid_argument for a path this CPU or build lacks.
void set_simd(const std::string& path);
std::string simd();                              // the path in use
std::vector<std::string> simd_available();       // paths this CPU and build can run
void set_default_threads(int threads);           // 0: hardware concurrency
int default_threads();

uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

// ----------------------------------------------------------------------------------- files

// Any safetensors file, opened read-only and memory-mapped. Checked before use: header length,
// JSON, dtypes, shape * dtype size == byte span, offsets in bounds, no overlapping regions.
class SafetensorsFile {
public:
    static std::unique_ptr<SafetensorsFile> open(const std::string& path);
    // The same checks on bytes already in memory (not copied: they must outlive the object); `name`
    // stands for the path in error messages.
    static std::unique_ptr<SafetensorsFile> from_memory(const std::string& name, const uint8_t* data, size_t size);
    ~SafetensorsFile();

    const std::string& path() const { return path_; }
    std::vector<std::string> keys() const;                      // in data-offset order
    bool contains(const std::string& name) const { return arrays_.count(name) != 0; }
    const ArrayRef& get(const std::string& name) const;         // throws std::out_of_range
    const std::map<std::string, std::string>& metadata() const { return metadata_; }

private:
    SafetensorsFile() = default;
    void parse();
    std::string path_;
    std::map<std::string, ArrayRef> arrays_;
    std::vector<std::string> order_;
    std::map<std::string, std::string> metadata_;
    const uint8_t* map_ = nullptr;
    size_t size_ = 0;
    bool mapped_ = false;
};

// Writes a safetensors file atomically (temporary name, fsync, rename). Tensors are laid out
// larger element sizes first (so each is aligned to its element size), otherwise in the given order.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, ArrayRef>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// A delta file opened read-only and memory-mapped. Everything is checked before use: header
// length, JSON, dtypes, offsets in bounds and non-overlapping, manifest entries, component sizes.
class DeltaFile {
public:
    static std::unique_ptr<DeltaFile> open(const std::string& path);
    static std::unique_ptr<DeltaFile> from_memory(const std::string& name, const uint8_t* data, size_t size);
    ~DeltaFile();

    const std::string& path() const { return path_; }
    std::vector<std::string> keys() const;       // delta tensor names, in file order
    bool contains(const std::string& name) const;
    // The encoded tensor (views into the mapping, valid while this DeltaFile lives). With
    // verify, the components' CRC-32C is checked first (FormatError on mismatch).
    EncodedRef get(const std::string& name, bool verify = true) const;
    const std::string& manifest() const { return manifest_; }  // the JSON manifest text

private:
    DeltaFile() = default;
    void read_manifest();
    struct Entry;
    std::string path_, manifest_;
    std::vector<std::string> order_;
    std::map<std::string, std::shared_ptr<Entry>> entries_;
    std::unique_ptr<SafetensorsFile> file_;
};

// Writes a delta file atomically (a temporary name in the same directory, fsync, rename).
// `extra_manifest` is a JSON object text merged into the manifest ("metadata", "base", ...).
void save(const std::string& path, const std::vector<EncodedRef>& tensors,
          const std::string& extra_manifest = "{}");

}  // namespace deltapack
