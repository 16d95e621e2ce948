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

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace deltapack {

// ----------------------------------------------------------------------------------- basics

// Float types the engine computes with, plus the integer/byte types of components and of
// other tensors a safetensors file may hold.
enum class DType : uint8_t { F32, F16, BF16, F64, I64, I32, I16, I8, U64, U32, U16, U8, BOOL, F8_E4M3, F8_E5M2 };

const char* dtype_name(DType t);                 // "f32", "f16", "bf16", "f64", "i64", ...
const char* safetensors_dtype_name(DType t);     // "F32", "F16", "BF16", "I64", ... (safetensors' spelling)
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

// How base + alpha * delta is rounded to an f16 or bf16 output (docs/FORMAT.md §3; f32 outputs are exact sums).
enum class Rounding : uint8_t {
    Auto,      // Dithered for a lossy codec (any but dense), Nearest for dense (which then rebuilds exactly)
    Nearest,   // to nearest, ties to even
    Dithered,  // away from zero with probability = the dropped fraction of an ulp, from a hash of the index:
               // unbiased, deterministic; keeps on average a lossy delta smaller than half an ulp that Nearest
               // erases (on a 135M pretrained pair: 77 % of the gain kept at 0.25 bit/param -> 100 %)
};
const char* rounding_name(Rounding r);           // "auto", "nearest", "dithered"
Rounding rounding_from_name(const std::string& name);  // std::invalid_argument for another name

struct ApplyParams {
    float alpha = 1.0f;  // out = base + alpha * delta
    int threads = 0;     // 0: all cores (see set_default_threads)
    Rounding rounding = Rounding::Auto;
};
ApplyParams apply_default_params();

// out = round(base + alpha * decode(enc)); base and out are f32, f16 or bf16 with the delta's
// shape; out may alias base (in place). Never materialises the whole f32 delta.
void apply(const EncodedRef& enc, const ArrayRef& base, const ArrayRef& out,
           ApplyParams params = apply_default_params());
// Rows [row0, row0 + nrows) of apply's result, for callers that stream a tensor in pieces: base and out
// point at those rows only (row-major, the delta's row width); out may alias base.
void apply_rows(const EncodedRef& enc, int64_t row0, int64_t nrows, const void* base, DType base_dtype, void* out,
                DType out_dtype, ApplyParams params = apply_default_params());

// out (f32, shape of the delta) = decode(enc).
void decode(const EncodedRef& enc, const ArrayRef& out, int threads = 0);

// Mixed batches, without rebuilding the weights. With the delta's (rows, cols) matrix view D:
// y (batch x rows, f32) += alpha * x (batch x cols, f32) times D transposed, i.e. the delta's part of a linear
// layer's output. Reads the packed delta once per call (sign: sums of x over the set bits, times the scales;
// lowrank: u (v x); other codecs: a few decoded rows at a time). f32 sums in a fixed order: every SIMD path
// gives the same bits.
void delta_product(const EncodedRef& enc, const float* x, int64_t batch, float alpha, float* y, int threads = 0);
// A mixed batch's products at once, one job per fine-tune, all deltas of one (rows, cols) shape: each job's
// y (batch x rows) += alpha * its x (batch x cols) times its D transposed, the same bits as delta_product
// per job. One set of threads takes the rows and runs every job over them (per-job calls would start and
// join threads once per fine-tune, a large share of a decode step's time).
struct ProductJob {
    EncodedRef enc;
    const float* x;
    int64_t batch;
    float* y;
};
void delta_products(const std::vector<ProductJob>& jobs, float alpha, int threads = 0);
// out (n x cols, f32) = alpha * the rows `rows` of D (an embedding's rows for a batch's tokens).
void delta_rows(const EncodedRef& enc, const int64_t* rows, int64_t n, float alpha, float* out);

// ----------------------------------------------------------------------------------- CUDA (docs/cuda.md)

// The rebuild and the batch products on a GPU, with the CPU engine's numerics: the same bits as apply, decode and
// delta_products. Built when the library is compiled with a CUDA toolkit (CMake DELTAPACK_CUDA=AUTO|ON|OFF).
bool cuda_built();
int cuda_device_count();  // visible GPUs; 0 when not built with CUDA, or without a driver or device
// The device number that runs the kernels' bodies on the CPU instead, over host memory, block by block and
// thread by thread (host emulation: how tests check the kernels where there is no GPU; slow).
constexpr int kHostEmulation = -1;

// One delta tensor on one GPU: validated as apply validates it, then its components copied to device memory the
// object owns (the copy is complete when the constructor returns: `enc`'s memory may go). Pointers given to its
// methods are device memory of that GPU (host memory for kHostEmulation); `stream` is a cudaStream_t (null: the
// default stream). One call at a time per object.
class DeviceDelta {
public:
    DeviceDelta(const EncodedRef& enc, int device, void* stream = nullptr);
    ~DeviceDelta();
    DeviceDelta(const DeviceDelta&) = delete;
    DeviceDelta& operator=(const DeviceDelta&) = delete;

    const std::string& name() const;
    const std::vector<int64_t>& shape() const;
    int device() const;
    uint64_t device_bytes() const;  // the components as held on the device

    // out = round(base + alpha * delta), as apply (params.threads is unused): base and out of the delta's shape,
    // f32/f16/bf16, out may be base. Waits for the stream to report a damaged delta (FormatError, as apply).
    void apply(const void* base, DType base_dtype, void* out, DType out_dtype,
               ApplyParams params = apply_default_params(), void* stream = nullptr) const;
    // out (f32, the delta's shape) = the delta. Queued on the stream; does not wait.
    void decode(float* out, void* stream = nullptr) const;

private:
    friend struct DeviceProducts;
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// A mixed batch on the GPU, as delta_products: y (batch x rows, f32, device) += alpha * x (batch x cols) times the
// job's delta transposed, every delta of one shape and on one device. The bits of delta_products on the CPU.
// `workspace`: device memory of at least device_products_workspace(jobs) bytes, the caller's (sign: the sums of x
// per scale span; lowrank: v x), so nothing is allocated per call. Queued on the stream; does not wait.
struct DeviceProductJob {
    const DeviceDelta* delta;
    const float* x;
    int64_t batch;
    float* y;
};
uint64_t device_products_workspace(const std::vector<DeviceProductJob>& jobs);
void device_products(const std::vector<DeviceProductJob>& jobs, float alpha, void* workspace, uint64_t workspace_bytes,
                     void* stream = nullptr);

// out[i] = f32(ft[i]) - f32(base[i]): the delta of two f32/f16/bf16 arrays of the same size (any shapes),
// one IEEE f32 subtraction per element, on `threads` threads (0: the default).
void delta_f32(const ArrayRef& ft, const ArrayRef& base, float* out, int threads = 0);

// SIMD path: "auto" (best available; default, or from env DELTAPACK_SIMD), "scalar", "avx2",
// "avx512" (x86-64), "neon" (AArch64). Throws std::invalid_argument for a path this CPU or build lacks.
void set_simd(const std::string& path);
std::string simd();                              // the path in use
std::vector<std::string> simd_available();       // paths this CPU and build can run
void set_default_threads(int threads);           // 0: hardware concurrency
int default_threads();

uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);
// The CRC-32C of A followed by B, from crc32c(A), crc32c(B) and B's length: pieces checksummed on
// different threads join in order.
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);
// SHA-256 of n bytes as 64 lowercase hex digits: how a delta names a kept file it takes from its base.
std::string sha256_hex(const void* data, size_t n);

// ----------------------------------------------------------------------------------- paths

// What deltapack reads from a model directory and where it writes (docs/SECURITY.md): one set of rules for
// compress, apply, the exporters, deltapack-apply and the C API.

constexpr uint64_t kMaxKeptFile = uint64_t(32) << 20;   // bytes: a larger non-weight file is not kept or copied
constexpr uint64_t kMaxKeptTotal = uint64_t(64) << 20;  // bytes of all the kept (or copied) files together
constexpr size_t kMaxKeptFiles = 256;                   // kept files of one model directory
constexpr size_t kMaxFileName = 255;                   // bytes (NAME_MAX)
// The U8 array of a delta file that holds the bytes of the kept files it stores (docs/FORMAT.md §7): a name no
// component can have ("<tensor>:<component>" always holds a ':').
constexpr const char* kFilesKey = "__files__";

// Files that hold tensors (*.safetensors, *.bin, *.pt, *.pth, *.ckpt, *.h5, *.msgpack, *.gguf, *.onnx, *.pkl,
// *.pickle, *.npy, *.npz, *.joblib; several are pickles, which run code when loaded) and their indexes
// (*.index.json); case-insensitive. compress never keeps them, apply writes its own.
bool is_weight_file(const std::string& name);
// What is wrong with `name` as a kept file (a non-weight file of a fine-tune directory that a checkpoint delta
// carries: config, tokenizer, ...), or "" if nothing: it must be one plain, visible file name of at most
// kMaxFileName bytes without control characters, and not a weight or index file.
std::string kept_file_problem(const std::string& name);

// The path to open for entry `name` of model directory `dir`. A symbolic link is followed only where it resolves
// inside `dir`, or into the blobs/ of the Hugging Face cache repository that `dir` is a snapshot of
// (models--org--name/snapshots/<revision>/<name> -> ../../blobs/<hash>); anywhere else is a FormatError naming
// the link and its target, unless follow_links.
std::string resolve_in_model_dir(const std::string& dir, const std::string& name, bool follow_links = false);

struct KeptFile {
    std::string name, data;  // data: the contents (for a skipped file, why it was skipped)
};
// The kept files of model directory `dir`: its top-level regular files that kept_file_problem() accepts, of at
// most kMaxKeptFile bytes each, kMaxKeptTotal and kMaxKeptFiles in all, sorted by name (links as
// resolve_in_model_dir allows). Those past a limit go to `skipped` with the reason.
std::vector<KeptFile> read_kept_files(const std::string& dir, bool follow_links = false,
                                      std::vector<KeptFile>* skipped = nullptr);

// The absolute path an output `out` names: its folder with every link and ".." resolved as the kernel resolves
// them (LINK/../NAME is beside LINK's target), its last component as given ("dir/" is dir). std::invalid_argument
// for a path that names no entry to write ("", ".", "..", "/").
std::string output_path(const std::string& out);

// What a command writes, for check_output.
enum class OutputKind : uint8_t { DeltaFile, SafetensorsFile, GgufFile, ModelDirectory, AdapterDirectory };
const char* output_kind_name(OutputKind k);  // "a deltapack file", "a model directory", ...
// Checks, before any work, that a command reading `inputs` may write `out`: it must not be an input, lie inside
// one or hold one (std::invalid_argument); an existing `out` is replaced only with `overwrite`, never when it is
// a symbolic link, and only when it looks like what the command writes (std::system_error EEXIST otherwise):
// a file of that format (a deltapack file is a safetensors file with a deltapack manifest; a GGUF file starts
// with "GGUF"), an empty directory, or a directory of regular files only: for ModelDirectory *.safetensors
// shards, their index and the config and tokenizer files of Hugging Face model directories (config.json,
// tokenizer.json, tokenizer.model, merges.txt, ...), for AdapterDirectory adapter_config.json and
// adapter_model.safetensors, plus any of `writes` (names this run writes). `out` is taken where output_path puts it.
void check_output(const std::string& out, OutputKind kind, const std::vector<std::string>& inputs, bool overwrite,
                  const std::vector<std::string>& writes = {});

// ----------------------------------------------------------------------------------- files

// Where one tensor of a safetensors file lives: dtype, shape and its byte range in the file.
struct TensorInfo {
    std::string name;
    DType dtype = DType::F32;
    std::vector<int64_t> shape;
    uint64_t offset = 0;  // absolute byte offset of its data in the file
    uint64_t nbytes = 0;
};

// Any safetensors file, checked before use by safetensors' own rules: a header of at most 10^8 bytes
// inside the file, strict JSON, known dtypes in safetensors' spelling, shape * dtype size == byte span,
// and arrays that tile the data section (no overlap, gap or trailing bytes). Nothing here maps files: a
// mapped file truncated by another process kills its reader with SIGBUS.
// open() reads only the header (pread) and keeps the file open: read() copies tensors into caller memory
// with pread and throws FormatError naming the file if it ends early or was modified (its size or
// modification time changed) since open(). load() reads the whole file into memory the object owns (later
// changes to the file do not matter) and get() returns views into it; from_memory() checks caller bytes.
class SafetensorsFile {
public:
    static std::unique_ptr<SafetensorsFile> open(const std::string& path);
    static std::unique_ptr<SafetensorsFile> load(const std::string& path);
    // The same checks on bytes already in memory (not copied: they must outlive the object); `name`
    // stands for the path in error messages.
    static std::unique_ptr<SafetensorsFile> from_memory(const std::string& name, const uint8_t* data, size_t size);
    ~SafetensorsFile();

    const std::string& path() const { return path_; }
    std::vector<std::string> keys() const;                      // in data-offset order
    bool contains(const std::string& name) const { return infos_.count(name) != 0; }
    const TensorInfo& info(const std::string& name) const;      // throws std::out_of_range
    bool in_memory() const { return data_ != nullptr; }
    const ArrayRef& get(const std::string& name) const;         // in-memory files only (load, from_memory)
    // Copies bytes [first_byte, first_byte + nbytes) of tensor `name` into `out` (FormatError if the range
    // leaves the tensor, or the file ends early or changed since it was opened, naming the file). Safe from
    // several threads at once.
    void read(const std::string& name, void* out, uint64_t nbytes, uint64_t first_byte = 0) const;
    const std::map<std::string, std::string>& metadata() const { return metadata_; }

private:
    friend class DeltaFile;  // checks its manifest before the layout: a manifest error says more
    SafetensorsFile() = default;
    static std::unique_ptr<SafetensorsFile> start(const std::string& path, bool in_memory);
    static std::unique_ptr<SafetensorsFile> wrap(const std::string& name, const uint8_t* data, size_t size);
    void parse(const uint8_t* header, uint64_t header_len, uint64_t file_size);
    void check_layout() const;  // the arrays tile the data section (found by parse, reported here)
    void check_unchanged(const std::string& name) const;  // FormatError naming the tensor read
    std::string path_, layout_problem_;
    std::map<std::string, TensorInfo> infos_;
    std::map<std::string, ArrayRef> arrays_;  // views, when the bytes are in memory
    std::vector<std::string> order_;
    std::map<std::string, std::string> metadata_;
    const uint8_t* data_ = nullptr;  // the whole file, when in memory
    std::vector<uint8_t> owned_;     // ... read by load()
    int fd_ = -1;                    // open(): read with pread
    uint64_t size_ = 0;
    int64_t mtime_ns_ = 0;           // open(): when it was last modified, as open() saw it
};

// An output file that appears under its final name only when commit() succeeds: an unnamed
// O_TMPFILE linked into place where the file system allows it (nothing is left if the process is
// killed), else a hidden "<path>.tmpXXXXXXXX" renamed into place. Destroyed or aborted before
// commit: nothing remains. Write errors name the path and say "disk full" where that is the cause.
class AtomicFile {
public:
    // replace: commit() may replace an existing file at `path`; otherwise it fails (EEXIST) and leaves it alone.
    explicit AtomicFile(const std::string& path, bool replace = true);
    ~AtomicFile();
    AtomicFile(const AtomicFile&) = delete;
    AtomicFile& operator=(const AtomicFile&) = delete;
    void write(const void* data, size_t n);
    // n bytes at `offset` (pwrite: the file position does not move; safe from several threads at once).
    // size() counts what write() appended only.
    void write_at(uint64_t offset, const void* data, size_t n);
    void commit(bool durable = true);  // durable: fsync the data and the directory
    void abort();
    void start_writeback();  // begin writing what was written so far to disk (no wait)
    const std::string& path() const { return path_; }
    uint64_t size() const { return written_; }
    // A path that opens this same, not yet committed file, for a library that only writes by path:
    // /proc/self/fd/N for an unnamed file, else the temporary name (created with O_EXCL by this object).
    std::string reopen_path() const;
    // An unnamed scratch file in `dir` (O_TMPFILE, or a created and at once unlinked file): its
    // descriptor, which the caller closes.
    static int scratch(const std::string& dir);

private:
    std::string path_, dir_, tmpname_;
    int fd_ = -1;
    uint64_t written_ = 0;
    bool replace_ = true;
};

// An output directory built under a hidden temporary name beside it, ".<name>.deltapack-tmp-<pid>-<hex>",
// and renamed into place when commit() succeeds. Temporaries of killed runs (their process gone; real
// directories of this user holding regular files only) are removed when the next one starts. Replacing
// (overwrite) moves the old output aside first, so a kill between the two renames leaves neither under the
// name, never a mix; without overwrite, commit() never replaces what appeared meanwhile. Not committed: removed.
// Whether an existing output may be replaced at all is check_output's to say, before any work.
class AtomicDir {
public:
    AtomicDir(const std::string& path, bool overwrite = false);  // EEXIST if it exists and !overwrite
    ~AtomicDir();
    AtomicDir(const AtomicDir&) = delete;
    AtomicDir& operator=(const AtomicDir&) = delete;
    const std::string& tmp() const { return tmp_; }    // write the contents here
    const std::string& path() const { return path_; }
    void commit(bool durable = true);  // durable: fsync every file and both directories first
    void abort();

private:
    std::string path_, tmp_;
    bool overwrite_ = false;
};

// Writes a safetensors file: the header first (every name, dtype and shape is declared up front), then
// the tensors' bytes, whole in the given order with write() (name and size checked against the
// declaration), or in pieces with write_part(). Atomic (AtomicFile); finish() checks every tensor came.
// durable: each tensor's last bytes start the writeback of what was written (so the final fsync has
// little left), and finish() makes the file and its name durable before returning.
class SafetensorsWriter {
public:
    SafetensorsWriter(const std::string& path, const std::vector<TensorInfo>& tensors,
                      const std::map<std::string, std::string>& metadata = {}, bool durable = true,
                      bool replace = true);  // replace: as AtomicFile's
    void write(const std::string& name, const void* data, uint64_t nbytes);  // whole tensors, declared order
    // Bytes [first_byte, first_byte + nbytes) of tensor `name`, in any order and from several threads at
    // once (pwrite); finish() checks that every tensor got all its bytes (by count: pieces must not overlap).
    void write_part(const std::string& name, uint64_t first_byte, const void* data, uint64_t nbytes);
    uint64_t finish();  // returns the file size
    void abort() { file_.abort(); }

private:
    AtomicFile file_;
    std::vector<TensorInfo> tensors_;
    std::map<std::string, size_t> index_;
    std::vector<std::atomic<uint64_t>> pending_;  // bytes of each tensor not written yet
    size_t next_ = 0;
    uint64_t data_start_ = 0, size_ = 0;
    bool durable_;
};

// A model's weights: one .safetensors file, or a Hugging Face directory holding model.safetensors or
// the shards that model.safetensors.index.json lists. Every header is read and checked on open (pread,
// no mapping); the index must agree with the shards (each listed tensor in its shard, none unlisted, no
// tensor stored twice); config.json, if present, must be a JSON object. Tensors are then read one at
// a time into caller memory. Missing files are std::system_error (ENOENT), bad contents FormatError.
class ModelFiles {
public:
    // follow_links: read files of a directory through symbolic links wherever they point (resolve_in_model_dir).
    static std::unique_ptr<ModelFiles> open(const std::string& path, bool follow_links = false);
    ModelFiles(const ModelFiles&) = delete;
    ModelFiles& operator=(const ModelFiles&) = delete;

    const std::string& path() const { return path_; }
    bool is_directory() const { return is_dir_; }
    const std::vector<std::string>& shards() const { return shards_; }  // file names, sorted (or the file)
    std::string shard_path(const std::string& shard) const;
    const SafetensorsFile& shard(const std::string& shard) const;
    std::vector<std::string> keys() const { return order_; }            // by shard, then data offset
    bool contains(const std::string& name) const { return shard_of_.count(name) != 0; }
    const TensorInfo& info(const std::string& name) const;             // throws std::out_of_range
    const std::string& shard_of(const std::string& name) const;
    void read(const std::string& name, void* out, uint64_t nbytes, uint64_t first_byte = 0) const;
    bool has_index() const { return has_index_; }
    const std::string& index_metadata() const { return index_metadata_; }  // JSON text ("null" if none)
    const std::string& config() const { return config_; }  // config.json as a JSON object's text ("" if none)

private:
    ModelFiles() = default;
    void read_index(const std::string& index, const std::string& file);
    std::string path_, index_metadata_ = "null", config_;
    bool is_dir_ = false, has_index_ = false;
    std::vector<std::string> shards_, order_;
    std::map<std::string, std::unique_ptr<SafetensorsFile>> files_;
    std::map<std::string, std::string> shard_of_, index_map_;
};

// Writes a safetensors file atomically at once. Tensors are laid out larger element sizes first
// (so each is aligned to its element size), otherwise in the given order.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, ArrayRef>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// One tensor of a delta file as read: its encoded view, and the memory that holds the components (read from
// the file for this tensor; none for a file held in memory, whose bytes live as long as the DeltaFile). Keep it
// while `ref` is in use.
struct DeltaTensor {
    EncodedRef ref;
    std::shared_ptr<void> bytes;
};

// A delta file opened read-only. Everything is checked before use: header length, JSON, dtypes, offsets in
// bounds and non-overlapping, manifest entries, component sizes, and the fields deltapack reads from its metadata
// (a checkpoint record, the base fingerprint: docs/FORMAT.md §7).
class DeltaFile {
public:
    // The header is read at once and the file kept open; each tensor's components are read with pread when it
    // is asked for (a file truncated or changed meanwhile is a FormatError, never a crash). in_memory: the whole
    // file is read into memory the object owns (later changes to the file do not matter).
    static std::unique_ptr<DeltaFile> open(const std::string& path, bool in_memory = false);
    static std::unique_ptr<DeltaFile> from_memory(const std::string& name, const uint8_t* data, size_t size);
    ~DeltaFile();

    const std::string& path() const { return path_; }
    std::vector<std::string> keys() const;       // delta tensor names, in file order
    bool contains(const std::string& name) const;
    // Tensor `name`, read and checked: with verify, the CRC-32C of its components and entry first (FormatError
    // on mismatch); then its components against its codec (validate).
    DeltaTensor get(const std::string& name, bool verify = true) const;
    // Its manifest entry alone (codec, params, shape, dtype; no components), read from nothing.
    EncodedRef entry(const std::string& name) const;
    const std::vector<int64_t>& shape(const std::string& name) const;  // as the manifest states it (no reading)
    uint64_t stored_bytes(const std::string& name) const;              // its components' bytes in the file
    const std::string& manifest() const { return manifest_; }  // the JSON manifest text
    // Bytes [begin, end) of the kept files' array (kFilesKey), as a checkpoint record's `bytes` names them.
    std::string stored_file(uint64_t begin, uint64_t end) const;

private:
    DeltaFile() = default;
    void read_manifest();
    struct Entry;
    struct Buffers;  // memory for tensors read from disk, reused
    const Entry& entry_of(const std::string& name) const;
    std::string path_, manifest_;
    std::vector<std::string> order_;
    std::map<std::string, std::shared_ptr<Entry>> entries_;
    std::unique_ptr<SafetensorsFile> file_;
    std::shared_ptr<Buffers> buffers_;
};

// Component bytes a DeltaWriter keeps in memory before it spills to scratch files: writing a sign delta
// of 4 Llama-3-8B-shaped layers (151 MiB) twice through this VM's page cache, once to the scratch file and
// once to the output, took as long as reading the 5 GiB of base and fine-tune.
constexpr uint64_t kSpillInMemory = uint64_t(256) << 20;

// Writes a delta file tensor by tensor, holding no tensor once add() returns: components are spilled by
// element size (8, 4, 2, 1 bytes: every component stays aligned), in memory up to `in_memory` bytes in
// all, then (each size after its pieces in memory) to unnamed scratch files; close() writes the header,
// then the spills, atomically (AtomicFile). Memory stays bounded by the manifest and `in_memory`. Not
// closed (destroyed, aborted, or close() failed): nothing remains under `path`.
class DeltaWriter {
public:
    // overwrite: close() may replace an existing file at `path` (as the library's save() does); otherwise close()
    // fails with EEXIST and leaves it alone. in_memory: component bytes held before spilling to scratch files.
    explicit DeltaWriter(const std::string& path, bool overwrite = true, uint64_t in_memory = kSpillInMemory);
    ~DeltaWriter();
    // Validates the tensor, checksums it (the CRC-32C of its components, then of its entry text) and
    // spills its components. Names must be new and non-empty (they may hold ':': a stored array's key
    // "<tensor>:<component>" splits at its last ':', as component names have none). borrowed: the caller
    // promises the components' bytes stay as they are until close() or abort(), so those held in memory are
    // referenced, not copied; returns whether any is (the caller must then keep them alive).
    bool add(const EncodedRef& tensor, bool borrowed = false);
    // Stores a kept file's bytes (written after every component, under kFilesKey); returns where they begin
    // there. The manifest's checkpoint record names them as {"bytes": [begin, begin + n], "sha256": ...}.
    uint64_t add_file(const void* data, size_t n);
    // `extra_manifest`: a JSON object text merged into the manifest ("metadata", "base", ...).
    uint64_t size(const std::string& extra_manifest = "{}") const;  // the bytes close() would write
    uint64_t close(const std::string& extra_manifest = "{}", bool durable = true);  // returns the size
    void abort();
    const std::string& path() const { return path_; }
    size_t count() const { return entries_.size(); }  // tensors added

private:
    std::string header(const std::string& extra_manifest) const;
    struct Component { std::string key; DType dtype; std::vector<int64_t> shape; uint64_t nbytes; };
    std::string path_;
    std::unique_ptr<AtomicFile> out_;
    std::vector<std::pair<std::string, std::string>> entries_;  // tensor name, manifest entry JSON text
    std::set<std::string> names_;
    std::vector<Component> components_;  // arrival order
    std::string files_;                  // add_file()'s bytes (at most kMaxKeptTotal)
    int spill_fd_[4] = {-1, -1, -1, -1};  // element sizes 8, 4, 2, 1
    uint64_t spill_size_[4] = {0, 0, 0, 0};
    struct Piece {  // a component in memory: a copy, or the caller's bytes (borrowed)
        std::string copy;
        const void* borrowed;
        size_t n;
        const void* data() const { return borrowed ? borrowed : copy.data(); }
        size_t size() const { return borrowed ? n : copy.size(); }
    };
    std::vector<Piece> spill_mem_[4];        // a size's first components, before its scratch file
    uint64_t in_memory_ = 0;                 // bytes in spill_mem_
    uint64_t memory_limit_;
};

// ----------------------------------------------------------------------------------- checkpoints

// The base given for a checkpoint delta is not the one it was made from (names, dtypes, shapes or
// contents differ from the delta's fingerprint). Pass force to rebuild anyway.
struct BaseMismatch : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// How one tensor of the fine-tune is rebuilt (docs/checkpoints.md).
enum class TensorKind : uint8_t {
    Unchanged,  // "same": the base tensor `source`, as is (converted if another dtype is asked for)
    Delta,      // "delta": base[source] + alpha * delta[name]
    Replaced,   // "new": delta[name] as stored (an added tensor, or one whose shape changed)
    Resized,    // "resized": rows [:k] = base[source][:k] + alpha * delta[name], rows [k:] = delta[new_rows]
};
const char* tensor_kind_name(TensorKind k);  // "same", "delta", "new", "resized"

struct CheckpointTensor {
    std::string name;
    TensorKind kind = TensorKind::Unchanged;
    DType dtype = DType::F32;     // the fine-tune's
    std::vector<int64_t> shape;   // the fine-tune's
    std::string source;           // the base tensor it starts from (empty for Replaced)
    std::string new_rows;         // Resized: the delta tensor holding rows [k:] (empty if none)
    // The dtype rebuild() writes when `requested` (F32, F16 or BF16) is asked for: it, for a float
    // tensor; the tensor's own dtype otherwise (integer tensors never change).
    DType output_dtype(DType requested) const;
    DType output_dtype() const { return dtype; }
    uint64_t nbytes(DType out) const;
};

// A fine-tune as `deltapack compress` records it in a delta file (its manifest's metadata["checkpoint"]),
// over a base model. Opening checks the record against the delta file and the base (every source in the
// base with a compatible shape, every stored tensor with the shape its kind needs) and, unless `force`,
// the base against the delta's fingerprint: the same tensor names, dtypes and shapes (BaseMismatch
// naming the first difference), and, as each base tensor is read, its CRC-32C. `base` may be null for
// an application that keeps its own weights: shapes are then checked against the fingerprint, and
// tensors are rebuilt with rebuild_from.
class CheckpointDelta {
public:
    CheckpointDelta(std::shared_ptr<const ModelFiles> base, std::shared_ptr<const DeltaFile> delta, bool force = false);
    static bool recorded_in(const DeltaFile& delta);  // whether `deltapack compress` made it (it has a record)

    const std::vector<CheckpointTensor>& tensors() const { return tensors_; }  // the fine-tune's, in order
    const CheckpointTensor& tensor(const std::string& name) const;            // throws std::out_of_range
    const std::vector<std::string>& removed() const { return removed_; }       // base tensors it dropped
    const std::string& record() const { return record_; }                       // the record's JSON text
    const ModelFiles& base() const { return *base_; }
    const DeltaFile& delta() const { return *delta_; }

    // Rebuilds tensor `name` into `out` (out_bytes = numel * size of out_dtype exactly; out_dtype must be
    // tensor(name).output_dtype(...) of some request), reading its base tensor from the base model. Never
    // holds more than the tensor and its base.
    void rebuild(const std::string& name, void* out, uint64_t out_bytes, DType out_dtype, float alpha = 1.0f,
                 int threads = 0, Rounding rounding = Rounding::Auto) const;
    // The same in blocks of rows, for a caller that writes the tensor somewhere (a file, its own storage):
    // sink(first_byte, data, nbytes) gets each block of the result in out_dtype (about 4 MiB, whole rows),
    // from up to `threads` threads at once and in no set order. Each block is read from the base, checked
    // and rebuilt in cache-sized memory, so reading, rebuilding and the sink's writing overlap. The base
    // tensor's CRC-32C is known when the last block is done: a mismatch throws BaseMismatch after the sink
    // has had every block. Added and resized tensors come as one block.
    void rebuild_blocks(const std::string& name, DType out_dtype, float alpha, int threads,
                        const std::function<void(uint64_t, const void*, uint64_t)>& sink,
                        Rounding rounding = Rounding::Auto) const;
    // The same from a base tensor the caller holds (an application with its own weight storage; `base` may
    // be null for Replaced tensors): `base` is the tensor `source` in `base_dtype`, base_bytes exactly its
    // size. Unless force, its dtype and CRC-32C must be the fingerprint's (check_crc false: the caller
    // verified these bytes already, with verify_base). `out` may be `base` (in place) when the sizes match.
    void rebuild_from(const std::string& name, const void* base, uint64_t base_bytes, DType base_dtype, void* out,
                      uint64_t out_bytes, DType out_dtype, float alpha = 1.0f, int threads = 0,
                      bool check_crc = true, Rounding rounding = Rounding::Auto) const;
    // Checks the bytes of base tensor `src` against the delta's fingerprint (its CRC-32C, where recorded):
    // BaseMismatch naming the tensor. Nothing unless constructed without force.
    void verify_base(const std::string& src, const void* data, uint64_t nbytes) const {
        if (!force_) check_contents(src, data, nbytes);
    }

private:
    struct Fingerprint { std::string dtype; std::vector<int64_t> shape; bool has_crc = false; uint32_t crc = 0; };
    const CheckpointTensor& check_out(const std::string& name, uint64_t out_bytes, DType out_dtype) const;
    void rebuild_core(const CheckpointTensor& t, const void* base, DType base_dtype, void* out, DType out_dtype,
                      float alpha, int threads, Rounding rounding = Rounding::Auto) const;
    void read_base(const std::string& src, void* out, uint64_t nbytes) const;  // with the fingerprint check
    void check_contents(const std::string& src, const void* data, uint64_t nbytes) const;
    void check_crc(const std::string& src, uint32_t crc) const;  // BaseMismatch unless the fingerprint's
    std::shared_ptr<const ModelFiles> base_;  // may be null: rebuild_from only
    std::shared_ptr<const DeltaFile> delta_;
    bool force_;
    std::string record_;
    std::vector<CheckpointTensor> tensors_;
    std::map<std::string, size_t> index_;
    std::vector<std::string> removed_;
    std::map<std::string, Fingerprint> fingerprint_;  // of the base the delta was made from
};

// What compress reads of one tensor, in one pass: out (count f32) = ft[name] - base[src] over their first
// `count` elements, whole rows of the last dimension (one IEEE f32 subtraction each); the CRC-32C of all
// of base[src] (the fingerprint, rows a resized fine-tune dropped included); and whether those elements
// are the same bytes in the same dtype. Both are read in cache-sized blocks on `threads` threads, so
// reading and subtracting overlap.
struct TensorDelta {
    uint32_t base_crc = 0;
    bool identical = false;
};
TensorDelta read_delta(const ModelFiles& ft, const std::string& name, const ModelFiles& base, const std::string& src,
                       uint64_t count, float* out, int threads = 0);
// The same pass feeding a codec instead of an f32 array: encodes ft[name] - base[src] over the delta's
// `shape` (the fine-tune's first shape[0] rows) as encode() would encode that array, without ever holding
// it (each row is computed from the files when the codec asks for it).
struct EncodedDelta {
    Encoded enc;
    TensorDelta read;
};
EncodedDelta encode_delta(const std::string& codec, const std::string& params, const ModelFiles& ft,
                          const std::string& name, const ModelFiles& base, const std::string& src,
                          const std::vector<int64_t>& shape, int threads = 0);

struct ApplyCheckpointOptions {
    float alpha = 1.0f;     // base + alpha * delta (1: the fine-tune; > 1 extrapolates, < 1 interpolates)
    std::string dtype;      // "f32", "f16" or "bf16" for every float tensor; empty: each tensor's own
    bool force = false;     // rebuild even from a base that differs from the delta's fingerprint
    Rounding rounding = Rounding::Auto;  // of float tensors rebuilt into f16 or bf16 (see Rounding)
    bool overwrite = false; // replace an existing output (only an earlier output of apply: check_output)
    bool follow_links = false;  // follow symbolic links in BASE wherever they point (resolve_in_model_dir)
    bool durable = true;    // fsync before the output appears (off: still atomic if killed, not on power loss)
    int threads = 0;
    std::function<void(uint64_t)> progress;  // called with the bytes of each tensor written
};

struct CheckpointOutput {
    std::string path;
    size_t tensors = 0;
    uint64_t bytes = 0;  // tensor data written
};

// Rebuilds the fine-tune `delta` records over `base` and writes it to `out`, atomically: for a base
// directory, a directory sharded like the base (index, kept config and tokenizer files, config.json's
// dtype set when `dtype` is given), loadable by transformers; for a base file, one .safetensors file.
// Before anything is written, `out` is checked with check_output (not BASE or the delta, not inside them, an
// existing output replaced only with `overwrite` and only if it is one).
CheckpointOutput apply_checkpoint(const std::string& base, const std::string& delta, const std::string& out,
                                  const ApplyCheckpointOptions& options = {});

// ----------------------------------------------------------------------------------- serving

// One base model held in memory, and fine-tunes of it (checkpoint deltas `deltapack compress` made against
// that base), used two ways:
//  - switched in place: activate(mix) makes the live buffers hold base + sum of alpha_i * delta_i. Every
//    tensor an active or the previously active fine-tune touches is rebuilt from the base (never on top of
//    the previous fine-tune), so one delta at alpha 1 gives exactly what apply_checkpoint writes and the
//    empty mix gives the base; other tensors are not written.
//  - per batch row, with the buffers at the base: product() and delta_rows() give one fine-tune's delta
//    times a batch, or rows of it, from the packed delta (see delta_product).
// Memory: the base once, a second copy of each tensor some added delta touches (the source of rebuilds),
// the delta files (read into memory by add: later changes to the files do not matter), and the cache.
// Fine-tunes that add, remove, resize or retype tensors are refused by add().
// Threads: add, remove and activate take the bank exclusively; product, delta_rows, rebuild and readers of
// the live buffers share it. A reader holds lock_shared() while it reads the buffers (activate waits for
// it), and must not call activate meanwhile (that would wait for itself).
class Bank {
public:
    using Mix = std::vector<std::pair<std::string, float>>;  // fine-tune names and alphas; empty: the base

    explicit Bank(const std::string& base);  // reads every base tensor once
    // Registers fine-tune `name` from a delta file: its CRC-32Cs, and its record against the bank's base
    // (fingerprint: names, dtypes, shapes, CRC-32C; BaseMismatchError unless force).
    void add(const std::string& name, const std::string& delta, bool force = false);
    void remove(const std::string& name);  // refused while it is active
    // Makes the live buffers hold `mix`. On failure the buffers hold the previous mix again.
    void activate(const Mix& mix, int threads = 0);
    Mix active() const;
    std::vector<std::string> last_rewritten() const;  // by the last activate()
    // Keeps the rebuilt tensors of recent mixes up to `bytes` in all (least recently used dropped first), so
    // switching back to one copies them instead of rebuilding; 0 (the default) keeps none.
    void set_cache_budget(uint64_t bytes);
    uint64_t cache_bytes() const;  // held now

    // Tensor `tensor` as `mix` has it (what activate would write), into caller memory of the base's dtype and
    // exactly nbytes; the live buffers are not touched.
    void rebuild(const Mix& mix, const std::string& tensor, void* out, uint64_t nbytes, int threads = 0) const;
    // Whether fine-tune `name` changes tensor `tensor`.
    bool touches(const std::string& name, const std::string& tensor) const;
    // Mixed batches: y += alpha * x times the delta of `tensor` (delta_product; x batch x cols, y batch x rows,
    // f32), and out = alpha * rows of that delta (delta_rows). Nothing when the fine-tune leaves it unchanged.
    void product(const std::string& name, const std::string& tensor, const float* x, int64_t batch, float alpha,
                 float* y, int threads = 0) const;
    void delta_rows(const std::string& name, const std::string& tensor, const int64_t* rows, int64_t n,
                    float alpha, float* out) const;
    // A whole mixed batch in one call: y[b] += alpha * x[b] times the delta of fine-tune names[which[b]] for
    // `tensor`, for each batch row b (which[b] = -1: the base, nothing added). x batch x cols, y batch x rows,
    // f32; each fine-tune's rows are gathered and its packed delta read once.
    void mixed_product(const std::string& tensor, const std::vector<std::string>& names, const int32_t* which,
                       const float* x, int64_t batch, float alpha, float* y, int threads = 0) const;

    // Fine-tune `name`'s delta of `tensor` copied to a GPU (kHostEmulation: host memory), for a bank that serves
    // from GPU memory (docs/cuda.md); null where the fine-tune leaves the tensor unchanged.
    std::unique_ptr<DeviceDelta> to_device(const std::string& name, const std::string& tensor, int device,
                                           void* stream = nullptr) const;

    std::vector<std::string> tensor_names() const { return base_->keys(); }
    ArrayRef tensor(const std::string& name);  // the live buffer (stable for the bank's life)
    std::vector<std::string> fine_tunes() const;
    void lock_shared() const { mu_.lock_shared(); }
    void unlock_shared() const { mu_.unlock_shared(); }

private:
    struct Buffer { Array live, pristine; };  // pristine: the base, for tensors some delta touches
    struct CacheEntry { std::string key; std::map<std::string, Array> tensors; uint64_t bytes = 0; };
    const CheckpointDelta& fine_tune(const std::string& name) const;
    const ArrayRef& base_of(const std::string& tensor) const;
    std::string where() const { return "bank over " + base_->path() + ": "; }  // errors name the base
    void rebuild_into(const Mix& mix, const std::string& tensor, const ArrayRef& out, int threads) const;
    void switch_to(const Mix& from, const Mix& mix, int threads);  // rewrites what either touches
    std::shared_ptr<const ModelFiles> base_;
    std::map<std::string, Buffer> buffers_;
    std::map<std::string, std::unique_ptr<CheckpointDelta>> deltas_;
    Mix active_;
    std::vector<std::string> rewritten_;
    std::list<CacheEntry> cache_;  // most recently used first
    uint64_t cache_budget_ = 0, cache_bytes_ = 0;
    mutable std::shared_mutex mu_;
};

// Writes a delta file at once (a DeltaWriter over `tensors`).
void save(const std::string& path, const std::vector<EncodedRef>& tensors,
          const std::string& extra_manifest = "{}");

}  // namespace deltapack
