/* deltapack C API: rebuild weights from a delta file, for FFI (C, Rust, Go, C#, ...).
 *
 * Opaque handles, plain integers and pointers. Every function that can fail returns 0 on success
 * and -1 on failure; dp_last_error() then describes the failure (file, tensor, problem).
 * Arrays are dense, row-major, in the dtypes of enum dp_dtype.
 */
#ifndef DELTAPACK_C_H
#define DELTAPACK_C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dp_file dp_file;  /* an open delta file (memory-mapped, read-only) */

enum dp_dtype { DP_F32 = 0, DP_F16 = 1, DP_BF16 = 2 };

struct dp_apply_params {
    float alpha;  /* out = base + alpha * delta */
    int threads;  /* 0: all cores */
    int verify;   /* non-zero: check the tensor's CRC-32C before use */
};

/* Defaults: alpha 1, all cores, verify on. */
struct dp_apply_params dp_apply_default_params(void);

/* The message of the last failure on this thread ("" if none). */
const char* dp_last_error(void);

/* Opens a delta file; NULL on failure. */
dp_file* dp_file_open(const char* path);
/* Closes it (NULL is allowed). */
void dp_file_close(dp_file* f);

/* Number of delta tensors, and the i-th name (valid while the file is open). */
size_t dp_file_count(const dp_file* f);
const char* dp_file_name(const dp_file* f, size_t i);

/* The shape of tensor `name`: writes up to `max_dims` dimensions, returns the rank, -1 if unknown. */
int dp_file_shape(const dp_file* f, const char* name, int64_t* dims, int max_dims);

/* out = base + alpha * delta for tensor `name`; base and out hold numel elements of their dtypes
 * (out may equal base for in-place). */
int dp_apply(const dp_file* f, const char* name, const void* base, enum dp_dtype base_dtype, void* out,
             enum dp_dtype out_dtype, struct dp_apply_params params);

/* The SIMD path in use ("scalar", "avx2", "avx512", "neon"); dp_set_simd forces one ("auto" = best). */
const char* dp_simd(void);
int dp_set_simd(const char* path);

#ifdef __cplusplus
}
#endif

#endif /* DELTAPACK_C_H */
