/* deltapack C API: rebuild fine-tuned weights from a delta file, for C and FFI (ctypes, Rust, Go, C#, ...).
 *
 * Conventions (every function follows them):
 * - Opaque handles (dp_file, dp_base, dp_checkpoint, dp_bank), plain integers and pointers. A handle is
 *   read-only once open: several threads may call functions on the same handle at once. Close every handle
 *   you open. The exception is dp_bank, which changes state: its own section says what may run at once.
 * - Status: functions returning int return 0 on success and -1 on failure; those returning a count,
 *   length, rank or dtype return it (>= 0) or -1. After a failure dp_last_error() describes it (file,
 *   tensor, problem); a successful call of a function that can fail clears it. NULL handles and names
 *   are failures, never crashes.
 * - Every caller buffer comes with its size. Numeric buffers (apply, decode, read, shapes) must be exactly
 *   (or, for shapes, at least) as large as needed: anything else is a failure that names the expected and
 *   the given size, and nothing is written. Text is returned snprintf-style: the call returns the full
 *   length (without the terminating NUL), writes at most buf_size - 1 bytes plus a NUL when buf_size > 0,
 *   so a return >= buf_size means "truncated, call again with return + 1 bytes"; buf may be NULL when
 *   buf_size is 0 (a length query).
 * - Arrays are dense, row-major, little-endian, with the element types of enum dp_dtype.
 * - Returned const char* point to static storage (never freed by the caller).
 *
 * Linking: the static library (CMake target deltapack::deltapack) or libdeltapack.so
 * (deltapack::deltapack_shared, which defines DELTAPACK_SHARED for its users). See README "C++".
 */
#ifndef DELTAPACK_C_H
#define DELTAPACK_C_H

#include <stddef.h>
#include <stdint.h>

/* DELTAPACK_API marks the exported functions. Define DELTAPACK_SHARED when using (and, with
 * DELTAPACK_BUILD, when building) the shared library; nothing for the static one. */
#if defined(DELTAPACK_SHARED)
#  if defined(_WIN32) && !defined(__MINGW32__)
#    if defined(DELTAPACK_BUILD)
#      define DELTAPACK_API __declspec(dllexport)
#    else
#      define DELTAPACK_API __declspec(dllimport)
#    endif
#  else
#    define DELTAPACK_API __attribute__((visibility("default")))
#  endif
#else
#  define DELTAPACK_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dp_file dp_file;  /* an open delta file (read-only; tensors read with pread when used) */
typedef struct dp_base dp_base;  /* an open base model: a .safetensors file or a Hugging Face directory */
typedef struct dp_checkpoint dp_checkpoint;  /* a fine-tune as `deltapack compress` recorded it */
typedef struct dp_bank dp_bank;  /* a base held in memory and fine-tunes switched on it (deltapack::Bank) */

/* Element types. Deltas are applied to and into F32, F16 and BF16 only; the others describe base
 * tensors. Values match deltapack::DType. DP_DTYPE_UNKNOWN is what the dtype accessors return on
 * failure; DP_DTYPE_MAX_ENUM makes the enum a full 32-bit int, so any value a caller passes is
 * checked (an error) rather than undefined. */
enum dp_dtype {
    DP_DTYPE_UNKNOWN = -1,
    DP_F32 = 0, DP_F16 = 1, DP_BF16 = 2, DP_F64 = 3,
    DP_I64 = 4, DP_I32 = 5, DP_I16 = 6, DP_I8 = 7,
    DP_U64 = 8, DP_U32 = 9, DP_U16 = 10, DP_U8 = 11,
    DP_BOOL = 12, DP_F8_E4M3 = 13, DP_F8_E5M2 = 14,
    DP_DTYPE_MAX_ENUM = 0x7FFFFFFF
};

/* How base + alpha * delta is rounded into an f16 or bf16 output (docs/FORMAT.md section 3). */
enum dp_rounding {
    DP_ROUNDING_AUTO = 0,      /* dithered for a lossy codec (any but dense), nearest for dense: the default */
    DP_ROUNDING_NEAREST = 1,   /* to nearest, ties to even */
    DP_ROUNDING_DITHERED = 2   /* unbiased and deterministic: a change under half an ulp survives on average */
};

struct dp_apply_params {
    float alpha;   /* out = base + alpha * delta */
    int threads;   /* 0: all cores */
    int verify;    /* non-zero: check the tensor's CRC-32C before use */
    int rounding;  /* enum dp_rounding */
};

/* ------------------------------------------------------------------------------ library */

/* The library version, e.g. "0.1.0". */
DELTAPACK_API const char* dp_version(void);

/* The message of the last failure on this thread ("" after a success). Valid until the next call
 * on this thread. */
DELTAPACK_API const char* dp_last_error(void);

/* Defaults: alpha 1, all cores, verify on, DP_ROUNDING_AUTO. */
DELTAPACK_API struct dp_apply_params dp_apply_default_params(void);

/* "f32", "f16", "bf16", "f64", "i64", ...; NULL (and an error) for a value outside enum dp_dtype. */
DELTAPACK_API const char* dp_dtype_name(enum dp_dtype t);
/* Bytes per element; 0 (and an error) for a value outside enum dp_dtype. */
DELTAPACK_API size_t dp_dtype_size(enum dp_dtype t);

/* The SIMD path in use ("scalar", "avx2", "avx512", "neon"). */
DELTAPACK_API const char* dp_simd(void);
/* Forces a SIMD path for the whole process ("auto" or NULL: the best one); -1 if this CPU lacks it. */
DELTAPACK_API int dp_set_simd(const char* path);

/* ------------------------------------------------------------------------------ delta files */

/* Opens a delta file (every header field, offset and manifest entry, and the metadata fields deltapack reads,
 * are checked); NULL on failure. Tensors are read with pread when used, never mapped: a file truncated or
 * rewritten meanwhile makes that call fail, naming it. */
DELTAPACK_API dp_file* dp_file_open(const char* path);
/* Closes it (NULL is allowed). Names and pointers obtained from it are invalid afterwards. */
DELTAPACK_API void dp_file_close(dp_file* f);

/* Number of delta tensors (0 for NULL). */
DELTAPACK_API size_t dp_file_count(const dp_file* f);
/* The i-th tensor name (file order) into buf, snprintf-style; -1 if i >= dp_file_count(f). */
DELTAPACK_API int64_t dp_file_name(const dp_file* f, size_t i, char* buf, size_t buf_size);

/* The shape of tensor `name`: returns its rank and writes its dimensions into dims[0..rank).
 * dims NULL with max_dims 0 only queries the rank; max_dims < rank otherwise is a failure. */
DELTAPACK_API int dp_file_shape(const dp_file* f, const char* name, int64_t* dims, size_t max_dims);
/* Number of elements of tensor `name` (1 for 0-d); -1 if unknown. */
DELTAPACK_API int64_t dp_file_numel(const dp_file* f, const char* name);
/* The dtype of the original delta (DP_F32, DP_F16 or DP_BF16, as an int); -1 (DP_DTYPE_UNKNOWN) on failure. */
DELTAPACK_API int dp_file_dtype(const dp_file* f, const char* name);
/* The codec name of tensor `name` ("sign", "levels", "sparse", "lowrank", "quant", "dense"), snprintf-style. */
DELTAPACK_API int64_t dp_file_codec(const dp_file* f, const char* name, char* buf, size_t buf_size);

/* The user metadata stored with the delta (the manifest's "metadata" object, see docs/FORMAT.md):
 * the compact JSON text of the value under `key` (a string comes quoted: "\"gsm8k\""), snprintf-style;
 * -1 if the file has no metadata object or no such key. */
DELTAPACK_API int64_t dp_file_metadata(const dp_file* f, const char* key, char* buf, size_t buf_size);
/* The whole manifest (JSON object text: format, version, tool, metadata, base, tensors), snprintf-style. */
DELTAPACK_API int64_t dp_file_manifest(const dp_file* f, char* buf, size_t buf_size);

/* out = base + alpha * delta for tensor `name`, rounded once to out_dtype. base holds base_size bytes,
 * out out_size bytes: each must be numel * dp_dtype_size(its dtype) exactly. Dtypes: F32, F16, BF16,
 * mixed freely. out may equal base (in place); other overlaps are not allowed. */
DELTAPACK_API int dp_apply(const dp_file* f, const char* name, const void* base, size_t base_size,
                           enum dp_dtype base_dtype, void* out, size_t out_size, enum dp_dtype out_dtype,
                           struct dp_apply_params params);

/* out (float32, out_size bytes = numel * 4 exactly) = the decoded delta of tensor `name`. */
DELTAPACK_API int dp_decode(const dp_file* f, const char* name, float* out, size_t out_size, int threads);

/* ------------------------------------------------------------------------------ base models */

/* Opens a base model's weights: one .safetensors file, or a Hugging Face model directory (model.safetensors,
 * or shards + model.safetensors.index.json). Headers are checked on open; tensors are read (pread) when
 * asked for. Symbolic links inside a directory are followed only within it or into a Hugging Face cache's
 * blobs/. NULL on failure. */
DELTAPACK_API dp_base* dp_base_open(const char* path);
/* Closes it (NULL is allowed). */
DELTAPACK_API void dp_base_close(dp_base* b);

/* Number of tensors (0 for NULL), the i-th name (data-offset order) snprintf-style (-1 if out of range). */
DELTAPACK_API size_t dp_base_count(const dp_base* b);
DELTAPACK_API int64_t dp_base_name(const dp_base* b, size_t i, char* buf, size_t buf_size);
/* Shape of base tensor `name`, as dp_file_shape. */
DELTAPACK_API int dp_base_shape(const dp_base* b, const char* name, int64_t* dims, size_t max_dims);
/* Its dtype (enum dp_dtype, any of them, as an int); -1 (DP_DTYPE_UNKNOWN) on failure. */
DELTAPACK_API int dp_base_dtype(const dp_base* b, const char* name);
/* Copies base tensor `name` as stored into out (out_size = its byte size exactly): unchanged tensors. */
DELTAPACK_API int dp_base_read(const dp_base* b, const char* name, void* out, size_t out_size);

/* out = base[name] + alpha * delta[name], straight from the base tensor of the same name. The base
 * tensor must have the delta's shape and dtype F32, F16 or BF16; out holds out_size bytes = numel *
 * dp_dtype_size(out_dtype) exactly. Failures name the delta file, the base and the tensor. */
DELTAPACK_API int dp_apply_from_base(const dp_file* f, const dp_base* b, const char* name, void* out,
                                     size_t out_size, enum dp_dtype out_dtype, struct dp_apply_params params);

/* ------------------------------------------------------------------------------ checkpoints */

/* How a fine-tune tensor is rebuilt (docs/checkpoints.md). */
enum dp_tensor_kind {
    DP_UNCHANGED = 0,  /* the base tensor `source`, as is (converted if another dtype is asked for) */
    DP_DELTA = 1,      /* base[source] + alpha * delta */
    DP_REPLACED = 2,   /* stored whole in the delta: an added tensor, or one whose shape changed */
    DP_RESIZED = 3     /* rows [:k] = base[source][:k] + alpha * delta, rows [k:] stored (a resized vocabulary) */
};

/* Opens the fine-tune that `f` (a delta made by `deltapack compress`) records over base `b`. Unless
 * force, `b` must be the delta's base (names, dtypes, shapes; contents by CRC-32C as tensors are read).
 * The record is held to the output bound of docs/FORMAT.md section 7 (a base tensor serves at most two
 * fine-tune tensors, a tensor without a base stores at least a bit per element), with or without `b`.
 * b may be NULL for an application that keeps its own weights: it rebuilds with dp_checkpoint_rebuild_from.
 * f and b must stay open while the checkpoint is. NULL on failure. */
DELTAPACK_API dp_checkpoint* dp_checkpoint_open(const dp_file* f, const dp_base* b, int force);
DELTAPACK_API void dp_checkpoint_close(dp_checkpoint* c);

/* The fine-tune's tensors: count, the i-th name (snprintf-style), and per name its kind (enum
 * dp_tensor_kind), dtype (enum dp_dtype), shape (as dp_file_shape) and source base tensor ("" for
 * DP_REPLACED, snprintf-style). -1 on failure. */
DELTAPACK_API size_t dp_checkpoint_count(const dp_checkpoint* c);
DELTAPACK_API int64_t dp_checkpoint_name(const dp_checkpoint* c, size_t i, char* buf, size_t buf_size);
DELTAPACK_API int dp_checkpoint_kind(const dp_checkpoint* c, const char* name);
DELTAPACK_API int dp_checkpoint_dtype(const dp_checkpoint* c, const char* name);
DELTAPACK_API int dp_checkpoint_shape(const dp_checkpoint* c, const char* name, int64_t* dims, size_t max_dims);
DELTAPACK_API int64_t dp_checkpoint_source(const dp_checkpoint* c, const char* name, char* buf, size_t buf_size);

/* Rebuilds tensor `name` into out (out_size = numel * dp_dtype_size(out_dtype) exactly), reading its base
 * tensor from the base opened with the checkpoint. Float tensors may be rebuilt as F32, F16 or BF16;
 * others only as their own dtype. */
DELTAPACK_API int dp_checkpoint_rebuild(const dp_checkpoint* c, const char* name, void* out, size_t out_size,
                                        enum dp_dtype out_dtype, struct dp_apply_params params);
/* The same from the caller's copy of the source base tensor (base_size bytes of base_dtype; NULL for
 * DP_REPLACED). Unless the checkpoint was opened with force, its dtype and CRC-32C must be those the delta
 * was made against. out may equal base when the sizes match (in place). */
DELTAPACK_API int dp_checkpoint_rebuild_from(const dp_checkpoint* c, const char* name, const void* base,
                                             size_t base_size, enum dp_dtype base_dtype, void* out,
                                             size_t out_size, enum dp_dtype out_dtype,
                                             struct dp_apply_params params);

/* Writes the whole fine-tune, as `deltapack apply` does: for a base directory a Hugging Face directory
 * `out` (shards, index, config and tokenizer files), for a base file one .safetensors file; atomically.
 * dtype: "f32", "f16", "bf16" or NULL (each tensor's own). `out` is checked before any work as `deltapack
 * apply` checks it: never `base` or `delta`, inside or above them, or a symbolic link; an existing `out` is
 * replaced only with overwrite, and only when it is a model directory (or .safetensors file) apply could have
 * written. Symbolic links inside `base` are followed only within it or into a Hugging Face cache's blobs/. */
DELTAPACK_API int dp_apply_checkpoint(const char* base, const char* delta, const char* out, const char* dtype,
                                      struct dp_apply_params params, int force, int overwrite);

/* ------------------------------------------------------------------------------ the bank */

/* One base model held in memory and fine-tunes of it (checkpoint deltas `deltapack compress` made against
 * that base): the C face of deltapack::Bank (deltapack.h; docs/serving.md). Used two ways:
 * - switched in place: dp_bank_activate makes the live buffers (dp_bank_tensor) hold base + the sum of
 *   alpha_i * delta_i. Every tensor an active or the previously active fine-tune touches is rebuilt from the
 *   base, never on top of the previous fine-tune: one delta at alpha 1 gives exactly the bytes
 *   dp_apply_checkpoint (`deltapack apply`) writes, and no delta gives the base; other tensors are not
 *   written. dp_bank_rebuild gives the same into caller memory without touching the buffers.
 * - per batch row, with the buffers at the base: dp_bank_product adds one fine-tune's delta times a batch
 *   to a layer's output, dp_bank_mixed_product each row's own fine-tune's, and dp_bank_delta_rows gives rows
 *   of a delta (for embeddings), all from the packed deltas.
 * A mix is n fine-tune names with n alphas, applied in that order, each rounded once (alphas NULL: all 1;
 * n 0: the base).
 * Memory: the base once, a second copy of each tensor an added delta touches, the delta files (read into
 * memory by dp_bank_add: later changes to the files do not matter) and the cache (dp_bank_set_cache_budget).
 * Fine-tunes that add, remove, resize or retype tensors (a grown vocabulary) are refused by dp_bank_add.
 *
 * Threads: dp_bank_add, dp_bank_remove, dp_bank_activate and dp_bank_set_cache_budget take the bank
 * exclusively (one at a time; they wait for every reader). The other functions may run on several threads
 * at once. A thread that reads the live buffers while another may switch them holds dp_bank_lock_shared
 * ... dp_bank_unlock_shared around its reads; the exclusive functions called by a thread that holds it fail
 * (they would wait for themselves). dp_bank_rebuild, the products, dp_bank_delta_rows, dp_bank_touches,
 * dp_bank_last_rewritten, dp_bank_cache_bytes and the fine-tune list take the shared lock themselves, so they
 * need none (a thread that holds it may call them: a second read lock of a POSIX read-write lock, which
 * std::shared_mutex is on Linux). The accessors (count, names, shape, dtype, numel, dp_bank_tensor) take no
 * lock: a tensor's name, shape, dtype and buffer address never change. dp_bank_close: no other thread may use
 * the bank. */

/* Reads every tensor of base model `path` (a .safetensors file or a Hugging Face directory) into memory.
 * NULL on failure. */
DELTAPACK_API dp_bank* dp_bank_open(const char* path);
/* Frees the bank and its buffers (NULL is allowed); a shared lock this thread still holds is released first.
 * Pointers from dp_bank_tensor are invalid afterwards. */
DELTAPACK_API void dp_bank_close(dp_bank* bank);

/* Registers fine-tune `name` (a new name) from the delta file at `delta_path`, read into memory: its
 * CRC-32Cs, and, unless force, that the bank's base is the one it was made from (names, dtypes, shapes and
 * CRC-32C of every tensor: "this is not the delta's base" naming the first difference). Refused for a delta
 * that adds, removes, resizes or retypes tensors. On failure the bank is unchanged. */
DELTAPACK_API int dp_bank_add(dp_bank* bank, const char* name, const char* delta_path, int force);
/* Forgets fine-tune `name` (refused while it is in the active mix) and the memory only it needed. */
DELTAPACK_API int dp_bank_remove(dp_bank* bank, const char* name);
/* The fine-tunes added: count (0 for NULL) and the i-th name in sorted order, snprintf-style (-1 if
 * out of range). */
DELTAPACK_API size_t dp_bank_fine_tune_count(const dp_bank* bank);
DELTAPACK_API int64_t dp_bank_fine_tune_name(const dp_bank* bank, size_t i, char* buf, size_t buf_size);

/* Makes the live buffers hold the mix names[0..n) with alphas[0..n) (alphas NULL: all 1; n 0, names may
 * then be NULL: the base, bit for bit). Unknown names and non-finite alphas fail before anything is written;
 * if a rebuild fails midway the buffers hold the previous mix again. The same mix as the active one writes
 * nothing. */
DELTAPACK_API int dp_bank_activate(dp_bank* bank, size_t n, const char* const* names, const float* alphas,
                                   int threads);
/* Which tensors the last dp_bank_activate wrote (to copy only those to a device, say): flags[i] = 1 for
 * the i-th tensor (dp_bank_tensor_name order) if it was rewritten, else 0. flags_size must be
 * dp_bank_count(bank) exactly. Returns the number rewritten, or -1. */
DELTAPACK_API int64_t dp_bank_last_rewritten(const dp_bank* bank, uint8_t* flags, size_t flags_size);

/* The base's tensors, which are the bank's: count (0 for NULL), the i-th name (data-offset order)
 * snprintf-style (-1 if out of range), and per name the shape (as dp_file_shape), dtype (enum dp_dtype, as
 * an int; -1 on failure) and number of elements (-1 on failure). */
DELTAPACK_API size_t dp_bank_count(const dp_bank* bank);
DELTAPACK_API int64_t dp_bank_tensor_name(const dp_bank* bank, size_t i, char* buf, size_t buf_size);
DELTAPACK_API int dp_bank_shape(const dp_bank* bank, const char* tensor, int64_t* dims, size_t max_dims);
DELTAPACK_API int dp_bank_dtype(const dp_bank* bank, const char* tensor);
DELTAPACK_API int64_t dp_bank_numel(const dp_bank* bank, const char* tensor);
/* The live buffer of `tensor`: *data its address (the same for the bank's life; dense, the base's dtype and
 * shape) and, if nbytes is not NULL, *nbytes its size in bytes. Its contents are those of the last
 * dp_bank_activate; read them under dp_bank_lock_shared if another thread may switch. Do not write into it:
 * the bank rebuilds from its own copies and would not know. */
DELTAPACK_API int dp_bank_tensor(const dp_bank* bank, const char* tensor, const void** data, size_t* nbytes);

/* Tensor `tensor` as the mix (n, names, alphas; as dp_bank_activate) has it, the bytes dp_bank_activate
 * would write, into out: out_size = the tensor's size in the base's dtype exactly. The live buffers are
 * not touched. */
DELTAPACK_API int dp_bank_rebuild(const dp_bank* bank, size_t n, const char* const* names, const float* alphas,
                                  const char* tensor, void* out, size_t out_size, int threads);

/* Whether fine-tune `fine_tune` changes tensor `tensor`: 1 or 0; -1 on failure. */
DELTAPACK_API int dp_bank_touches(const dp_bank* bank, const char* fine_tune, const char* tensor);
/* Mixed batches. With D the delta of `tensor` in fine-tune `fine_tune` as a (rows, cols) matrix (cols the
 * last dimension, rows the product of the others; a 1-d tensor is one row): y (batch x rows, f32) += alpha *
 * x (batch x cols, f32) times D transposed, the fine-tune's part of a linear layer's output, computed from
 * the packed delta without rebuilding the weights (delta_product: f32 sums, the same bits on every SIMD
 * path). x_count must be batch * cols and y_count batch * rows exactly (counts of floats); x and y may be
 * NULL only when their count is 0. Nothing is added when the fine-tune leaves the tensor unchanged. The
 * base's part (x times the live buffer, transposed) is the caller's, with the buffers at the base. */
DELTAPACK_API int dp_bank_product(const dp_bank* bank, const char* fine_tune, const char* tensor, const float* x,
                                  size_t x_count, int64_t batch, float alpha, float* y, size_t y_count, int threads);
/* A whole mixed batch in one call: for each batch row i, y[i] += alpha * x[i] times the delta of `tensor` in
 * fine-tune names[which[i]] (which[i] = -1: the base, nothing added), transposed; each fine-tune's rows are
 * gathered and its packed delta read once. which holds which_count = batch entries, each in [-1, n_names);
 * every name must be added; x and y as dp_bank_product. Everything is checked before y is written. */
DELTAPACK_API int dp_bank_mixed_product(const dp_bank* bank, const char* tensor, size_t n_names,
                                        const char* const* names, const int32_t* which, size_t which_count,
                                        const float* x, size_t x_count, int64_t batch, float alpha, float* y,
                                        size_t y_count, int threads);
/* out (n x cols, f32; out_count = n * cols exactly) = alpha * rows rows[0..n) of D (an embedding's rows for
 * a batch's tokens); zeros when the fine-tune leaves the tensor unchanged. Every row index must be in
 * [0, rows). */
DELTAPACK_API int dp_bank_delta_rows(const dp_bank* bank, const char* fine_tune, const char* tensor,
                                     const int64_t* rows, size_t n, float alpha, float* out, size_t out_count);

/* ------------------------------------------------------------------------------ CUDA (docs/cuda.md) */

/* The rebuild and the mixed-batch products on a GPU, with the CPU's numerics: the same bits as dp_apply,
 * dp_decode and dp_bank_mixed_product. Buffers passed to these functions are device memory of the delta's GPU
 * (host memory for DP_HOST_EMULATION); their sizes are still given, and checked, in bytes. `stream` is a
 * cudaStream_t (NULL: the default stream). One call at a time per dp_device_delta. */
typedef struct dp_device_delta dp_device_delta;  /* one delta tensor's components copied to one GPU */

/* The device number that runs the kernels' bodies on the CPU over host memory (host emulation: tests). */
#define DP_HOST_EMULATION (-1)
/* 1 when the library was built with the CUDA kernels, else 0. */
DELTAPACK_API int dp_cuda_built(void);
/* Visible GPUs: 0 when not built with CUDA, or without a driver or device. */
DELTAPACK_API int dp_cuda_device_count(void);
/* Copies tensor `name` of f to GPU `device` (its CRC-32C checked first when verify is non-zero; validated as
 * dp_apply validates it); the copy is complete on return. NULL on failure. */
DELTAPACK_API dp_device_delta* dp_device_delta_open(const dp_file* f, const char* name, int device, int verify,
                                                    void* stream);
DELTAPACK_API void dp_device_delta_close(dp_device_delta* d);
/* As dp_apply, on the device (params.threads and params.verify are not used). Waits for the stream, so that
 * a damaged delta is reported (-1 and dp_last_error, as dp_apply). */
DELTAPACK_API int dp_device_apply(const dp_device_delta* d, const void* base, size_t base_size,
                                  enum dp_dtype base_dtype, void* out, size_t out_size, enum dp_dtype out_dtype,
                                  struct dp_apply_params params, void* stream);
/* out (float32, out_size = numel * 4 bytes) = the decoded delta. Queued on the stream; returns at once. */
DELTAPACK_API int dp_device_decode(const dp_device_delta* d, float* out, size_t out_size, void* stream);
/* A mixed batch on the device: for each job i < n, y[i] (batch[i] x rows, f32) += alpha * x[i] (batch[i] x
 * cols) times the delta d[i] transposed; every delta of one shape and on one GPU. workspace: device memory of
 * at least dp_device_products_workspace(n, d, batch) bytes (nothing is allocated per call). Queued on the
 * stream; returns at once. */
DELTAPACK_API int64_t dp_device_products_workspace(size_t n, const dp_device_delta* const* d, const int64_t* batch);
DELTAPACK_API int dp_device_products(size_t n, const dp_device_delta* const* d, const float* const* x,
                                     const int64_t* batch, float* const* y, float alpha, void* workspace,
                                     size_t workspace_size, void* stream);

/* Keeps the rebuilt tensors of recently activated mixes up to `bytes` in all (least recently used dropped
 * first), so switching back to one copies them instead of rebuilding; 0 (the default) keeps none. */
DELTAPACK_API int dp_bank_set_cache_budget(dp_bank* bank, uint64_t bytes);
/* Bytes the cache holds now; -1 on failure. */
DELTAPACK_API int64_t dp_bank_cache_bytes(const dp_bank* bank);

/* A reader's lock: while a thread holds it, dp_bank_activate (and add, remove, set_cache_budget) on other
 * threads wait, so the live buffers keep one state. May be taken several times; each take needs its unlock
 * on the same thread. dp_bank_unlock_shared without a lock this thread holds fails. */
DELTAPACK_API int dp_bank_lock_shared(const dp_bank* bank);
DELTAPACK_API int dp_bank_unlock_shared(const dp_bank* bank);

#ifdef __cplusplus
}
#endif

#endif /* DELTAPACK_C_H */
