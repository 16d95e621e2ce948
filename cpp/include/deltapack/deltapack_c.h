/* deltapack C API: rebuild fine-tuned weights from a delta file, for C and FFI (ctypes, Rust, Go, C#, ...).
 *
 * Conventions (every function follows them):
 * - Opaque handles (dp_file, dp_base), plain integers and pointers. A handle is read-only once open:
 *   several threads may call functions on the same handle at once. Close every handle you open.
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

typedef struct dp_file dp_file;  /* an open delta file (memory-mapped, read-only) */
typedef struct dp_base dp_base;  /* an open base model: a .safetensors file or a Hugging Face directory */
typedef struct dp_checkpoint dp_checkpoint;  /* a fine-tune as `deltapack compress` recorded it */

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

struct dp_apply_params {
    float alpha;  /* out = base + alpha * delta */
    int threads;  /* 0: all cores */
    int verify;   /* non-zero: check the tensor's CRC-32C before use */
};

/* ------------------------------------------------------------------------------ library */

/* The library version, e.g. "0.1.0". */
DELTAPACK_API const char* dp_version(void);

/* The message of the last failure on this thread ("" after a success). Valid until the next call
 * on this thread. */
DELTAPACK_API const char* dp_last_error(void);

/* Defaults: alpha 1, all cores, verify on. */
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

/* Opens a delta file (every header field, offset and manifest entry is checked); NULL on failure. */
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
 * asked for. NULL on failure. */
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
 * dtype: "f32", "f16", "bf16" or NULL (each tensor's own). */
DELTAPACK_API int dp_apply_checkpoint(const char* base, const char* delta, const char* out, const char* dtype,
                                      struct dp_apply_params params, int force, int overwrite);

#ifdef __cplusplus
}
#endif

#endif /* DELTAPACK_C_H */
