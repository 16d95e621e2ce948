/* Every function of the C API (deltapack_c.h) from plain C99, with every error path, against files a
 * Python fixture writes (tests/test_kernels_native.py, write_c_api_fixture: the names, shapes, metadata
 * and reference outputs below are defined there):
 *   c_api_check DIR     DIR holds delta.dpk, base.safetensors, the checkpoint and bank fixtures and the
 *                       reference outputs *.raw
 * Without DIR it exits 77 (CTest: skipped). Exit 0 = every check passed; else each failure is printed. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deltapack/deltapack_c.h"

#ifndef EXPECTED_VERSION
#error "EXPECTED_VERSION (the CMake project version) must be defined"
#endif

static int failures = 0;
static const char* dir = ".";

#define CHECK(cond)                                                                 \
    do {                                                                            \
        if (!(cond)) {                                                              \
            failures++;                                                             \
            printf("FAILED line %d: %s (last error: %s)\n", __LINE__, #cond, dp_last_error()); \
        }                                                                           \
    } while (0)

/* A failure: the return value says so and dp_last_error() contains `part`. */
#define CHECK_ERROR(failed, part)                                                   \
    do {                                                                            \
        CHECK(failed);                                                              \
        if (!strstr(dp_last_error(), (part))) {                                     \
            failures++;                                                             \
            printf("FAILED line %d: error '%s' lacks '%s'\n", __LINE__, dp_last_error(), (part)); \
        }                                                                           \
    } while (0)

/* A whole reference file, its size in *size. */
static void* slurp(const char* name, size_t* size) {
    char path[4096];
    FILE* in;
    long n;
    void* buf;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    in = fopen(path, "rb");
    if (!in) { printf("cannot open %s\n", path); exit(1); }
    fseek(in, 0, SEEK_END);
    n = ftell(in);
    fseek(in, 0, SEEK_SET);
    buf = malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, in) != (size_t)n) { printf("cannot read %s\n", path); exit(1); }
    fclose(in);
    *size = (size_t)n;
    return buf;
}

static char* path_of(const char* name) {
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return path;
}

static void check_library(void) {
    CHECK(strcmp(dp_version(), EXPECTED_VERSION) == 0);
    CHECK(strcmp(dp_dtype_name(DP_F32), "f32") == 0 && strcmp(dp_dtype_name(DP_BF16), "bf16") == 0);
    CHECK(strcmp(dp_dtype_name(DP_I32), "i32") == 0 && strcmp(dp_dtype_name(DP_F8_E5M2), "f8_e5m2") == 0);
    CHECK(dp_dtype_size(DP_F32) == 4 && dp_dtype_size(DP_F16) == 2 && dp_dtype_size(DP_BF16) == 2);
    CHECK(dp_dtype_size(DP_I64) == 8 && dp_dtype_size(DP_U8) == 1);
    CHECK(*dp_last_error() == '\0');  /* a success clears the message */
    CHECK_ERROR(dp_dtype_name((enum dp_dtype)99) == NULL, "unknown dp_dtype 99");
    CHECK_ERROR(dp_dtype_size((enum dp_dtype)-1) == 0, "unknown dp_dtype -1");
    {
        struct dp_apply_params p = dp_apply_default_params();
        CHECK(p.alpha == 1.0f && p.threads == 0 && p.verify != 0 && p.rounding == DP_ROUNDING_AUTO);
    }
    CHECK(strlen(dp_simd()) > 0);
    CHECK(dp_set_simd("scalar") == 0 && strcmp(dp_simd(), "scalar") == 0);
    CHECK_ERROR(dp_set_simd("no-such-path") == -1, "no-such-path");
    CHECK(dp_set_simd(NULL) == 0 && strlen(dp_simd()) > 0);  /* NULL: "auto", the best path */
}

static const char* const delta_names[] = {"w", "b", "q", "s", "i", "missing"};

static void check_file_accessors(dp_file* f) {
    char buf[64];
    int64_t dims[4] = {0, 0, 0, 0};
    size_t i;
    CHECK(dp_file_count(f) == 6 && dp_file_count(NULL) == 0);
    for (i = 0; i < 6; ++i) {
        CHECK(dp_file_name(f, i, buf, sizeof buf) == (int64_t)strlen(delta_names[i]));
        CHECK(strcmp(buf, delta_names[i]) == 0);
    }
    CHECK(dp_file_name(f, 5, buf, 4) == 7 && strcmp(buf, "mis") == 0);  /* truncated, full length returned */
    CHECK(dp_file_name(f, 5, NULL, 0) == 7);                           /* a length query */
    CHECK_ERROR(dp_file_name(f, 5, NULL, 8) == -1, "buf is NULL");
    CHECK_ERROR(dp_file_name(f, 6, buf, sizeof buf) == -1, "out of range");
    CHECK_ERROR(dp_file_name(NULL, 0, buf, sizeof buf) == -1, "f is NULL");

    CHECK(dp_file_shape(f, "w", dims, 4) == 2 && dims[0] == 37 && dims[1] == 70);
    CHECK(dp_file_shape(f, "q", NULL, 0) == 3);  /* a rank query */
    CHECK(dp_file_shape(f, "q", dims, 3) == 3 && dims[0] == 3 && dims[1] == 4 && dims[2] == 50);
    dims[0] = -7;
    CHECK_ERROR(dp_file_shape(f, "q", dims, 2) == -1, "rank 3 does not fit in dims of 2");
    CHECK(dims[0] == -7);  /* nothing written */
    CHECK_ERROR(dp_file_shape(f, "q", NULL, 3) == -1, "dims is NULL");
    CHECK_ERROR(dp_file_shape(f, "nope", dims, 4) == -1, "no tensor 'nope'");
    CHECK_ERROR(dp_file_shape(NULL, "w", dims, 4) == -1, "f is NULL");
    CHECK_ERROR(dp_file_shape(f, NULL, dims, 4) == -1, "name is NULL");

    CHECK(dp_file_numel(f, "w") == 37 * 70 && dp_file_numel(f, "q") == 600 && dp_file_numel(f, "b") == 70);
    CHECK_ERROR(dp_file_numel(f, "nope") == -1, "no tensor 'nope'");
    CHECK(dp_file_dtype(f, "w") == DP_F32 && dp_file_dtype(f, "b") == DP_F16 && dp_file_dtype(f, "q") == DP_BF16);
    CHECK_ERROR(dp_file_dtype(f, "nope") == -1, "no tensor 'nope'");
    CHECK_ERROR(dp_file_dtype(NULL, "w") == -1, "f is NULL");
    CHECK(dp_file_codec(f, "w", buf, sizeof buf) == 4 && strcmp(buf, "sign") == 0);
    CHECK(dp_file_codec(f, "q", buf, sizeof buf) == 5 && strcmp(buf, "quant") == 0);
    CHECK(dp_file_codec(f, "b", buf, 3) == 5 && strcmp(buf, "de") == 0);
    CHECK_ERROR(dp_file_codec(f, "nope", buf, sizeof buf) == -1, "no tensor 'nope'");

    CHECK(dp_file_metadata(f, "task", buf, sizeof buf) == 7 && strcmp(buf, "\"gsm8k\"") == 0);
    CHECK(dp_file_metadata(f, "steps", buf, sizeof buf) == 1 && strcmp(buf, "3") == 0);
    CHECK(dp_file_metadata(f, "nested", buf, sizeof buf) == 13 && strcmp(buf, "{\"a\":[1,2.5]}") == 0);
    CHECK(dp_file_metadata(f, "nested", buf, 5) == 13 && strcmp(buf, "{\"a\"") == 0);
    CHECK(dp_file_metadata(f, "nested", NULL, 0) == 13);
    CHECK_ERROR(dp_file_metadata(f, "nope", buf, sizeof buf) == -1, "no metadata key 'nope'");
    CHECK_ERROR(dp_file_metadata(f, NULL, buf, sizeof buf) == -1, "key is NULL");
    {
        int64_t n = dp_file_manifest(f, NULL, 0);
        char* manifest = malloc((size_t)n + 1);
        CHECK(n > 0 && dp_file_manifest(f, manifest, (size_t)n + 1) == n);
        CHECK(manifest[0] == '{' && manifest[n - 1] == '}' && strlen(manifest) == (size_t)n);
        CHECK(strstr(manifest, "\"format\":\"deltapack\"") != NULL && strstr(manifest, "\"gsm8k\"") != NULL);
        free(manifest);
        CHECK_ERROR(dp_file_manifest(NULL, buf, sizeof buf) == -1, "f is NULL");
    }
}

/* The bit patterns of two buffers of the same size agree. */
static int same_bytes(const void* a, const void* b, size_t n) { return memcmp(a, b, n) == 0; }

static void check_apply_and_decode(dp_file* f) {
    size_t base_size, ref_size, ref32_size, dec_size;
    uint16_t* base = slurp("base_w.raw", &base_size);        /* bf16 [37, 70] */
    void* ref = slurp("ref_w_bf16.raw", &ref_size);          /* dp.apply(base, enc, alpha=0.5) */
    void* ref32 = slurp("ref_w_f32.raw", &ref32_size);       /* numpy: f32(base) + f32(0.5) * decode */
    float* dec = slurp("decode_w.raw", &dec_size);           /* dp.decode(enc) */
    const size_t n = 37 * 70;
    uint16_t* out = malloc(n * 2);
    float* out32 = malloc(n * 4);
    float* zeros = calloc(n, 4);
    struct dp_apply_params p = dp_apply_default_params();
    size_t i;
    int same = 1;
    p.alpha = 0.5f;
    CHECK(base_size == n * 2 && ref_size == n * 2 && ref32_size == n * 4 && dec_size == n * 4);

    CHECK(dp_apply(f, "w", base, n * 2, DP_BF16, out, n * 2, DP_BF16, p) == 0 && same_bytes(out, ref, n * 2));
    CHECK(dp_apply(f, "w", base, n * 2, DP_BF16, out32, n * 4, DP_F32, p) == 0 && same_bytes(out32, ref32, n * 4));
    p.threads = 1;
    p.verify = 0;
    memcpy(out, base, n * 2);
    CHECK(dp_apply(f, "w", out, n * 2, DP_BF16, out, n * 2, DP_BF16, p) == 0 && same_bytes(out, ref, n * 2));  /* in place */
    /* base 0, alpha 1: the decoded delta itself (compared as values: 0 + -0 is +0) */
    p.alpha = 1.0f;
    CHECK(dp_apply(f, "w", zeros, n * 4, DP_F32, out32, n * 4, DP_F32, p) == 0);
    for (i = 0; i < n; ++i) same &= out32[i] == dec[i];
    CHECK(same);
    memset(out32, 0, n * 4);
    CHECK(dp_decode(f, "w", out32, n * 4, 0) == 0 && same_bytes(out32, dec, n * 4));

    /* wrong sizes, dtypes, names and NULLs: -1, a message, nothing written */
    memset(out, 0xAB, n * 2);
    CHECK_ERROR(dp_apply(f, "w", base, n * 2 - 2, DP_BF16, out, n * 2, DP_BF16, p) == -1,
                "tensor 'w': base holds 5178 bytes, expected 5180 ([37, 70] bf16)");
    CHECK_ERROR(dp_apply(f, "w", base, n * 2, DP_BF16, out, n * 2, DP_F32, p) == -1,
                "tensor 'w': out holds 5180 bytes, expected 10360 ([37, 70] f32)");
    CHECK_ERROR(dp_apply(f, "w", base, n * 2, DP_F32, out, n * 2, DP_BF16, p) == -1, "base holds 5180 bytes, expected 10360");
    CHECK(out[0] == 0xABAB && out[n - 1] == 0xABAB);
    CHECK(strstr(dp_last_error(), "delta.dpk") != NULL);  /* the message names the file */
    CHECK_ERROR(dp_apply(f, "w", base, n * 2, DP_I16, out, n * 2, DP_BF16, p) == -1, "base dtype i16 is not f32, f16 or bf16");
    CHECK_ERROR(dp_apply(f, "w", base, n * 2, DP_BF16, out, n * 2, (enum dp_dtype)42, p) == -1, "unknown dp_dtype 42");
    CHECK_ERROR(dp_apply(f, "nope", base, n * 2, DP_BF16, out, n * 2, DP_BF16, p) == -1, "no tensor 'nope'");
    CHECK_ERROR(dp_apply(NULL, "w", base, n * 2, DP_BF16, out, n * 2, DP_BF16, p) == -1, "f is NULL");
    CHECK_ERROR(dp_apply(f, NULL, base, n * 2, DP_BF16, out, n * 2, DP_BF16, p) == -1, "name is NULL");
    CHECK_ERROR(dp_apply(f, "w", NULL, n * 2, DP_BF16, out, n * 2, DP_BF16, p) == -1, "base is NULL");
    CHECK_ERROR(dp_apply(f, "w", base, n * 2, DP_BF16, NULL, n * 2, DP_BF16, p) == -1, "out is NULL");
    CHECK_ERROR(dp_decode(f, "w", out32, n * 4 + 4, 0) == -1, "out holds 10364 bytes, expected 10360");
    CHECK_ERROR(dp_decode(f, "nope", out32, n * 4, 0) == -1, "no tensor 'nope'");
    CHECK_ERROR(dp_decode(f, "w", NULL, n * 4, 0) == -1, "out is NULL");
    CHECK(out[0] == 0xABAB && out[n - 1] == 0xABAB);
    free(base); free(ref); free(ref32); free(dec); free(out); free(out32); free(zeros);
}

/* The CUDA entry points through the host emulation (the same code as on a GPU; tests/test_cuda.py runs them on a
 * GPU through Python): dp_device_apply and dp_device_decode give dp_apply's and dp_decode's bytes. */
static void check_device(dp_file* f) {
    size_t base_size, ref_size, dec_size;
    uint16_t* base = slurp("base_w.raw", &base_size);
    void* ref = slurp("ref_w_bf16.raw", &ref_size);
    float* dec = slurp("decode_w.raw", &dec_size);
    const size_t n = 37 * 70;
    uint16_t* out = malloc(n * 2);
    float* out32 = malloc(n * 4);
    float x[2 * 70], y[2 * 37] = {0}, want[2 * 37];
    int64_t batch = 2;
    unsigned char workspace[4096];
    struct dp_apply_params p = dp_apply_default_params();
    dp_device_delta* d = dp_device_delta_open(f, "w", DP_HOST_EMULATION, 1, NULL);
    const dp_device_delta* ds[1];
    const float* xs[1];
    float* ys[1];
    size_t i, j, need;
    int close = 1;
    p.alpha = 0.5f;
    CHECK(d != NULL);
    if (!d) return;
    CHECK(dp_cuda_built() == 0 || dp_cuda_built() == 1);
    CHECK(dp_cuda_device_count() >= 0);
    CHECK(dp_device_apply(d, base, n * 2, DP_BF16, out, n * 2, DP_BF16, p, NULL) == 0 && same_bytes(out, ref, n * 2));
    CHECK(dp_device_decode(d, out32, n * 4, NULL) == 0 && same_bytes(out32, dec, n * 4));
    for (i = 0; i < 2 * 70; ++i) x[i] = (float)((int)(i * 37 % 11) - 5) / 4.0f;
    for (i = 0; i < 2; ++i)
        for (j = 0; j < 37; ++j) {
            double s = 0;
            size_t c;
            for (c = 0; c < 70; ++c) s += (double)x[i * 70 + c] * dec[j * 70 + c];
            want[i * 37 + j] = (float)(0.75 * s);
        }
    ds[0] = d, xs[0] = x, ys[0] = y;
    need = (size_t)dp_device_products_workspace(1, ds, &batch);
    CHECK(need == 0);  /* a sign delta's products read only its bits and scales */
    CHECK(dp_device_products(1, ds, xs, &batch, ys, 0.75f, workspace, need, NULL) == 0);
    for (i = 0; i < 2 * 37; ++i) close &= fabs(y[i] - want[i]) <= 1e-5 * (1.0 + fabs(want[i]));
    CHECK(close);
    CHECK_ERROR(dp_device_apply(d, base, n * 2 - 2, DP_BF16, out, n * 2, DP_BF16, p, NULL) == -1,
                "tensor 'w': base holds 5178 bytes, expected 5180");
    CHECK_ERROR(dp_device_products(1, ds, xs, &batch, NULL, 0.75f, workspace, sizeof workspace, NULL) == -1,
                "y is NULL");
    CHECK_ERROR(dp_device_decode(NULL, out32, n * 4, NULL) == -1, "d is NULL");
    CHECK_ERROR(dp_device_delta_open(f, "nope", DP_HOST_EMULATION, 1, NULL) == NULL, "no tensor 'nope'");
    if (dp_cuda_device_count() == 0)
        CHECK_ERROR(dp_device_delta_open(f, "w", 0, 1, NULL) == NULL, dp_cuda_built() ? "is not visible" : "without CUDA");
    dp_device_delta_close(d);
    dp_device_delta_close(NULL);
    free(base); free(ref); free(dec); free(out); free(out32);
}

static const char* const base_names[] = {"w", "b", "q", "s", "i", "extra"};

static void check_base(dp_file* f) {
    char buf[64];
    int64_t dims[4];
    size_t i, j, size, base_w_size;
    void* base_w = slurp("base_w.raw", &base_w_size);
    uint16_t* out = malloc(37 * 70 * 4);
    struct dp_apply_params p = dp_apply_default_params();
    dp_base* b;

    CHECK_ERROR(dp_base_open(NULL) == NULL, "path is NULL");
    CHECK_ERROR(dp_base_open(dir) == NULL, "no model.safetensors or model.safetensors.index.json");
    CHECK_ERROR(dp_base_open(path_of("no-such-file.safetensors")) == NULL, "no-such-file.safetensors");
    b = dp_base_open(path_of("base.safetensors"));
    CHECK(b != NULL);
    if (!b) return;
    CHECK(dp_base_count(b) == 6 && dp_base_count(NULL) == 0);
    for (i = 0; i < 6; ++i) {  /* every expected name once, in whatever order the file stores them */
        int found = 0;
        for (j = 0; j < 6; ++j) found += dp_base_name(b, j, buf, sizeof buf) >= 0 && strcmp(buf, base_names[i]) == 0;
        CHECK(found == 1);
    }
    CHECK(dp_base_name(b, 0, NULL, 0) >= 1);
    CHECK_ERROR(dp_base_name(b, 6, buf, sizeof buf) == -1, "out of range");
    CHECK_ERROR(dp_base_name(NULL, 0, buf, sizeof buf) == -1, "b is NULL");
    CHECK(dp_base_shape(b, "q", dims, 4) == 3 && dims[0] == 3 && dims[1] == 4 && dims[2] == 50);
    CHECK(dp_base_shape(b, "s", NULL, 0) == 2);
    CHECK_ERROR(dp_base_shape(b, "q", dims, 1) == -1, "rank 3 does not fit in dims of 1");
    CHECK_ERROR(dp_base_shape(b, "nope", dims, 4) == -1, "no tensor 'nope'");
    CHECK(dp_base_dtype(b, "w") == DP_BF16 && dp_base_dtype(b, "b") == DP_F32 && dp_base_dtype(b, "q") == DP_F16);
    CHECK(dp_base_dtype(b, "i") == DP_I32 && dp_base_dtype(b, "extra") == DP_U8);
    CHECK_ERROR(dp_base_dtype(b, "nope") == -1, "no tensor 'nope'");
    CHECK(dp_base_read(b, "w", out, base_w_size) == 0 && same_bytes(out, base_w, base_w_size));
    CHECK_ERROR(dp_base_read(b, "w", out, base_w_size + 2) == -1, "out holds 5182 bytes, expected 5180 ([37, 70] bf16)");
    CHECK_ERROR(dp_base_read(b, "w", NULL, base_w_size) == -1, "out is NULL");

    {   /* apply straight from the base, into each float dtype */
        void* ref = slurp("ref_w_bf16.raw", &size);
        p.alpha = 0.5f;
        CHECK(dp_apply_from_base(f, b, "w", out, size, DP_BF16, p) == 0 && same_bytes(out, ref, size));
        free(ref);
        ref = slurp("ref_w_f32.raw", &size);
        CHECK(dp_apply_from_base(f, b, "w", out, size, DP_F32, p) == 0 && same_bytes(out, ref, size));
        free(ref);
        p.alpha = 1.0f;
        ref = slurp("ref_q_f16.raw", &size);
        CHECK(dp_apply_from_base(f, b, "q", out, size, DP_F16, p) == 0 && same_bytes(out, ref, size));
        free(ref);
        ref = slurp("ref_b_f32.raw", &size);
        CHECK(dp_apply_from_base(f, b, "b", out, size, DP_F32, p) == 0 && same_bytes(out, ref, size));
        free(ref);
    }
    CHECK_ERROR(dp_apply_from_base(f, b, "s", out, 80, DP_F32, p) == -1, "the delta's shape [4, 5] differs from the base's [5, 4]");
    CHECK_ERROR(dp_apply_from_base(f, b, "i", out, 24, DP_F32, p) == -1, "tensor 'i': base dtype i32 is not f32, f16 or bf16");
    CHECK_ERROR(dp_apply_from_base(f, b, "missing", out, 8, DP_F32, p) == -1, "base.safetensors: no tensor 'missing'");
    CHECK_ERROR(dp_apply_from_base(f, b, "extra", out, 10, DP_F32, p) == -1, "no tensor 'extra' in this delta file");
    CHECK_ERROR(dp_apply_from_base(f, b, "w", out, 37 * 70 * 2, DP_F32, p) == -1, "out holds 5180 bytes, expected 10360");
    CHECK_ERROR(dp_apply_from_base(f, b, "w", out, 37 * 70 * 2, DP_U8, p) == -1, "out dtype u8 is not f32, f16 or bf16");
    CHECK_ERROR(dp_apply_from_base(NULL, b, "w", out, 37 * 70 * 2, DP_BF16, p) == -1, "f is NULL");
    CHECK_ERROR(dp_apply_from_base(f, NULL, "w", out, 37 * 70 * 2, DP_BF16, p) == -1, "b is NULL");
    CHECK_ERROR(dp_apply_from_base(f, b, NULL, out, 37 * 70 * 2, DP_BF16, p) == -1, "name is NULL");
    CHECK_ERROR(dp_apply_from_base(f, b, "w", NULL, 37 * 70 * 2, DP_BF16, p) == -1, "out is NULL");
    dp_base_close(b);
    dp_base_close(NULL);
    free(base_w);
    free(out);
}

/* A checkpoint delta over a sharded base directory (write_checkpoint_fixture): every kind of tensor. */
static const char* const ck_names[] = {"w", "emb", "pos", "added", "n"};
static const int ck_kinds[] = {DP_DELTA, DP_RESIZED, DP_UNCHANGED, DP_REPLACED, DP_UNCHANGED};
static const int ck_dtypes[] = {DP_F32, DP_BF16, DP_I64, DP_F32, DP_BF16};
static const char* const ck_sources[] = {"w", "emb", "pos", "", "n"};

static void check_checkpoint(dp_file* plain) {
    char buf[64], rawname[64];
    int64_t dims[4];
    size_t i, size, wsize;
    dp_file* f = dp_file_open(path_of("ckpt.dpk"));
    dp_base* b = dp_base_open(path_of("ckpt_base"));  /* a directory: shards + index */
    dp_base* other = dp_base_open(path_of("base.safetensors"));
    struct dp_apply_params p = dp_apply_default_params();
    dp_checkpoint* c;
    float* out = malloc(64 * 64 * 4);
    float* w = malloc(16 * 12 * 4);
    void *ref, *ref_w = slurp("ck_w.raw", &wsize);

    CHECK(f != NULL && b != NULL && other != NULL);
    if (!f || !b || !other) return;
    CHECK(dp_base_count(b) == 5 && dp_base_dtype(b, "old") == DP_F16);
    CHECK_ERROR(dp_checkpoint_open(NULL, b, 0) == NULL, "f is NULL");
    CHECK_ERROR(dp_checkpoint_open(plain, b, 0) == NULL, "not a checkpoint delta");
    CHECK_ERROR(dp_checkpoint_open(f, other, 0) == NULL, "this is not the delta's base");
    c = dp_checkpoint_open(f, b, 0);
    CHECK(c != NULL);
    if (!c) return;
    CHECK(dp_checkpoint_count(c) == 5 && dp_checkpoint_count(NULL) == 0);
    for (i = 0; i < 5; ++i) {
        const char* n = ck_names[i];
        CHECK(dp_checkpoint_name(c, i, buf, sizeof buf) == (int64_t)strlen(n) && strcmp(buf, n) == 0);
        CHECK(dp_checkpoint_kind(c, n) == ck_kinds[i] && dp_checkpoint_dtype(c, n) == ck_dtypes[i]);
        CHECK(dp_checkpoint_source(c, n, buf, sizeof buf) == (int64_t)strlen(ck_sources[i]) && strcmp(buf, ck_sources[i]) == 0);
        snprintf(rawname, sizeof rawname, "ck_%s.raw", n);
        ref = slurp(rawname, &size);
        memset(out, 0xAB, size);
        CHECK(dp_checkpoint_rebuild(c, n, out, size, (enum dp_dtype)ck_dtypes[i], p) == 0 && same_bytes(out, ref, size));
        free(ref);
    }
    CHECK(dp_checkpoint_shape(c, "emb", dims, 4) == 2 && dims[0] == 24 && dims[1] == 8);
    ref = slurp("ck_emb_f32.raw", &size);  /* another output dtype */
    CHECK(dp_checkpoint_rebuild(c, "emb", out, size, DP_F32, p) == 0 && same_bytes(out, ref, size));
    free(ref);
    CHECK_ERROR(dp_checkpoint_rebuild(c, "emb", out, 24 * 8 * 2 + 2, DP_BF16, p) == -1, "holds 386 bytes, need 384");
    CHECK_ERROR(dp_checkpoint_rebuild(c, "pos", out, 5 * 4, DP_F32, p) == -1, "cannot be rebuilt as F32");
    CHECK_ERROR(dp_checkpoint_rebuild(c, "nope", out, 4, DP_F32, p) == -1, "no tensor 'nope'");
    CHECK_ERROR(dp_checkpoint_rebuild(c, NULL, out, 4, DP_F32, p) == -1, "name is NULL");
    CHECK_ERROR(dp_checkpoint_kind(NULL, "w") == -1, "c is NULL");
    CHECK_ERROR(dp_checkpoint_name(c, 5, buf, sizeof buf) == -1, "out of range");

    /* From the caller's own copy of the base tensor: into another buffer, in place, and a damaged copy. */
    CHECK(dp_base_read(b, "w", w, 16 * 12 * 4) == 0);
    CHECK(dp_checkpoint_rebuild_from(c, "w", w, 16 * 12 * 4, DP_F32, out, wsize, DP_F32, p) == 0 &&
          same_bytes(out, ref_w, wsize));
    CHECK(dp_checkpoint_rebuild_from(c, "w", w, 16 * 12 * 4, DP_F32, w, wsize, DP_F32, p) == 0 &&
          same_bytes(w, ref_w, wsize));
    CHECK_ERROR(dp_checkpoint_rebuild_from(c, "w", w, 16 * 12 * 4, DP_F32, out, wsize, DP_F32, p) == -1,
                "has different contents");  /* w now holds the fine-tune, not the base */
    CHECK_ERROR(dp_checkpoint_rebuild_from(c, "w", w, 16 * 12 * 2, DP_F16, out, wsize, DP_F32, p) == -1,
                "the delta was made against F32");
    CHECK_ERROR(dp_checkpoint_rebuild_from(c, "w", w, 100, DP_F32, out, wsize, DP_F32, p) == -1, "holds 100 bytes, need 768");
    ref = slurp("ck_added.raw", &size);
    CHECK(dp_checkpoint_rebuild_from(c, "added", NULL, 0, DP_F32, out, size, DP_F32, p) == 0 && same_bytes(out, ref, size));
    free(ref);
    dp_checkpoint_close(c);
    dp_checkpoint_close(NULL);

    /* Without a base (own weight storage): the fingerprint still checks what the caller passes. */
    c = dp_checkpoint_open(f, NULL, 0);
    CHECK(c != NULL);
    if (c) {
        CHECK(dp_base_read(b, "w", w, 16 * 12 * 4) == 0);
        CHECK(dp_checkpoint_rebuild_from(c, "w", w, 16 * 12 * 4, DP_F32, w, wsize, DP_F32, p) == 0 &&
              same_bytes(w, ref_w, wsize));
        CHECK_ERROR(dp_checkpoint_rebuild(c, "w", out, wsize, DP_F32, p) == -1, "no base model was given");
        dp_checkpoint_close(c);
    }
    /* force skips the fingerprint, not the shapes the record needs */
    CHECK_ERROR(dp_checkpoint_open(f, other, 1) == NULL, "shape differs from base tensor 'w'");

    /* The whole fine-tune, as deltapack apply writes it. */
    {
        char base_dir[4096], delta[4096], out_dir[4096], out2[4096];
        snprintf(base_dir, sizeof base_dir, "%s", path_of("ckpt_base"));
        snprintf(delta, sizeof delta, "%s", path_of("ckpt.dpk"));
        snprintf(out_dir, sizeof out_dir, "%s", path_of("ckpt_out"));
        snprintf(out2, sizeof out2, "%s", path_of("ckpt_out2"));
        CHECK(dp_apply_checkpoint(base_dir, delta, out_dir, NULL, p, 0, 1) == 0);
        CHECK_ERROR(dp_apply_checkpoint(base_dir, delta, out_dir, NULL, p, 0, 0) == -1, "already exists");
        CHECK_ERROR(dp_apply_checkpoint(base_dir, delta, out2, "f8", p, 0, 0) == -1, "use bf16, f16 or f32");
        CHECK_ERROR(dp_apply_checkpoint(NULL, delta, out2, NULL, p, 0, 0) == -1, "base is NULL");
        /* The output rules of `deltapack apply` (check_output): never an input, nor the directory holding one, even
         * with overwrite; an earlier output is replaced with overwrite. And alpha must be finite. */
        CHECK_ERROR(dp_apply_checkpoint(base_dir, delta, base_dir, NULL, p, 0, 1) == -1, "is the input");
        CHECK_ERROR(dp_apply_checkpoint(base_dir, delta, dir, NULL, p, 0, 1) == -1, "holds the input");
        CHECK(dp_apply_checkpoint(base_dir, delta, out_dir, NULL, p, 0, 1) == 0);
        {
            struct dp_apply_params bad = p;
            bad.alpha = NAN;
            CHECK_ERROR(dp_apply_checkpoint(base_dir, delta, out2, NULL, bad, 0, 0) == -1, "alpha nan is invalid");
        }
    }
    dp_base_close(other);
    other = dp_base_open(path_of("ckpt_out"));
    CHECK(other != NULL && dp_base_count(other) == 5);
    if (other) {
        ref = slurp("ck_emb.raw", &size);
        CHECK(dp_base_read(other, "emb", out, size) == 0 && same_bytes(out, ref, size));
        free(ref);
    }
    dp_base_close(other);
    dp_base_close(b);
    dp_file_close(f);
    free(out); free(w); free(ref_w);
}

/* The bank (write_bank_fixture): a base directory, fine-tunes "a" (emb, w1, w2, norm: sign) and "b" (w1 quant,
 * w2 lowrank, b dense), references per state (base, a, b, mix = a 1.0 then b 0.5) and per tensor. */
static const char* const bank_tensors[] = {"emb", "w1", "w2", "b", "norm", "pos"};
static const int bank_dtypes[] = {DP_BF16, DP_BF16, DP_F32, DP_F16, DP_BF16, DP_I64};
static const int64_t bank_numels[] = {24 * 16, 32 * 16, 16 * 32, 32, 16, 5};
static const char* const names_a[] = {"a"};
static const char* const names_b[] = {"b"};
static const char* const names_ab[] = {"a", "b"};
static const float alphas_mix[] = {1.0f, 0.5f};

/* The live buffers hold `state` (every tensor, bit for bit). */
static int bank_holds(const dp_bank* b, const char* state) {
    char rawname[64];
    size_t i, size, nbytes;
    int same = 1;
    for (i = 0; i < 6; ++i) {
        const void* data = NULL;
        void* ref;
        snprintf(rawname, sizeof rawname, "bank_%s_%s.raw", state, bank_tensors[i]);
        ref = slurp(rawname, &size);
        same &= dp_bank_tensor(b, bank_tensors[i], &data, &nbytes) == 0 && nbytes == size && same_bytes(data, ref, size);
        free(ref);
    }
    return same;
}

/* dp_bank_rebuild of the mix gives `state` for every tensor. */
static int bank_rebuilds(const dp_bank* b, size_t n, const char* const* names, const float* alphas, const char* state) {
    char rawname[64];
    size_t i, size;
    int same = 1;
    for (i = 0; i < 6; ++i) {
        void *ref, *out;
        snprintf(rawname, sizeof rawname, "bank_%s_%s.raw", state, bank_tensors[i]);
        ref = slurp(rawname, &size);
        out = malloc(size);
        memset(out, 0xAB, size);
        same &= dp_bank_rebuild(b, n, names, alphas, bank_tensors[i], out, size, 0) == 0 && same_bytes(out, ref, size);
        free(ref);
        free(out);
    }
    return same;
}

/* The flags of dp_bank_last_rewritten for tensors named in `expected` (a space-separated list), the rest 0. */
static int rewrote(const dp_bank* b, const char* expected) {
    uint8_t flags[6];
    char name[64], padded[80], list[80];
    size_t i, count = 0;
    int64_t n = dp_bank_last_rewritten(b, flags, 6);
    int ok = n >= 0;
    snprintf(list, sizeof list, " %s ", expected);
    for (i = 0; i < 6 && ok; ++i) {
        dp_bank_tensor_name(b, i, name, sizeof name);
        snprintf(padded, sizeof padded, " %s ", name);
        ok &= flags[i] == (strstr(list, padded) != NULL);
        count += flags[i];
    }
    return ok && (int64_t)count == n;
}

/* y0 + 0.75 * x times fine-tune `ft`'s delta of `tensor`, transposed, within the f32 bound of the reference. */
static int product_within(dp_bank* b, const char* ft, const char* tensor, int64_t rows, int64_t cols) {
    char rawname[64];
    size_t size, i;
    float *x, *y;
    double *want, *tol;
    int ok;
    snprintf(rawname, sizeof rawname, "bank_x_%s.raw", tensor);
    x = slurp(rawname, &size);
    snprintf(rawname, sizeof rawname, "bank_y0_%s.raw", tensor);
    y = slurp(rawname, &size);
    snprintf(rawname, sizeof rawname, "bank_prod_%s_%s.raw", ft, tensor);
    want = slurp(rawname, &size);
    snprintf(rawname, sizeof rawname, "bank_tol_%s_%s.raw", ft, tensor);
    tol = slurp(rawname, &size);
    ok = dp_bank_product(b, ft, tensor, x, (size_t)(3 * cols), 3, 0.75f, y, (size_t)(3 * rows), 0) == 0;
    for (i = 0; ok && i < (size_t)(3 * rows); ++i) {
        const double diff = (double)y[i] - want[i];
        ok = (diff < 0 ? -diff : diff) <= tol[i];
    }
    free(x); free(y); free(want); free(tol);
    return ok;
}

/* One call for a batch whose rows use a, the base and b: each row within the bound of its own reference. */
static int mixed_product_within(dp_bank* b) {
    size_t size, i;
    float *x = slurp("bank_x_w1.raw", &size), *y = slurp("bank_y0_w1.raw", &size), *y0 = slurp("bank_y0_w1.raw", &size);
    double *want_a = slurp("bank_prod_a_w1.raw", &size), *tol_a = slurp("bank_tol_a_w1.raw", &size);
    double *want_b = slurp("bank_prod_b_w1.raw", &size), *tol_b = slurp("bank_tol_b_w1.raw", &size);
    const int32_t which[3] = {0, -1, 1};
    int ok = dp_bank_mixed_product(b, "w1", 2, names_ab, which, 3, x, 3 * 16, 3, 0.75f, y, 3 * 32, 0) == 0;
    for (i = 0; ok && i < 32; ++i) {
        const double da = (double)y[i] - want_a[i], db = (double)y[64 + i] - want_b[64 + i];
        ok = (da < 0 ? -da : da) <= tol_a[i] && (db < 0 ? -db : db) <= tol_b[64 + i] && y[32 + i] == y0[32 + i];
    }
    free(x); free(y); free(y0); free(want_a); free(tol_a); free(want_b); free(tol_b);
    return ok;
}

static void check_bank(void) {
    char buf[64];
    int64_t dims[4];
    size_t i, size, nbytes;
    const void* data;
    const void* data2;
    dp_bank* b;
    dp_bank* other;
    uint8_t flags[6];
    float* out = malloc(64 * 64 * 4);
    float x[3 * 32], y[3 * 32];
    const int64_t rows[3] = {3, 0, 23}, bad_rows[2] = {0, 24};
    const char* const names_nope[] = {"a", "nope"};
    const char* const names_null[] = {"a", NULL};
    const float alpha_nan[] = {0.0f / 0.0f};
    void* ref;

    CHECK_ERROR(dp_bank_open(NULL) == NULL, "dp_bank_open: path is NULL");
    CHECK_ERROR(dp_bank_open(path_of("no-such-dir")) == NULL, "no-such-dir");
    b = dp_bank_open(path_of("bank_base"));
    CHECK(b != NULL);
    if (!b) return;

    /* the tensors: names (every expected one once), shapes, dtypes, sizes, the live buffers (the base) */
    CHECK(dp_bank_count(b) == 6 && dp_bank_count(NULL) == 0);
    for (i = 0; i < 6; ++i) {
        size_t j;
        int found = 0;
        for (j = 0; j < 6; ++j) found += dp_bank_tensor_name(b, j, buf, sizeof buf) >= 0 && strcmp(buf, bank_tensors[i]) == 0;
        CHECK(found == 1);
        CHECK(dp_bank_dtype(b, bank_tensors[i]) == bank_dtypes[i] && dp_bank_numel(b, bank_tensors[i]) == bank_numels[i]);
        CHECK(dp_bank_tensor(b, bank_tensors[i], &data, &nbytes) == 0 &&
              nbytes == (size_t)bank_numels[i] * dp_dtype_size((enum dp_dtype)bank_dtypes[i]));
    }
    CHECK(dp_bank_tensor_name(b, 0, NULL, 0) >= 1);
    CHECK_ERROR(dp_bank_tensor_name(b, 6, buf, sizeof buf) == -1, "tensor index 6 out of range (6 tensors)");
    CHECK_ERROR(dp_bank_tensor_name(NULL, 0, buf, sizeof buf) == -1, "bank is NULL");
    CHECK(dp_bank_shape(b, "w2", dims, 4) == 2 && dims[0] == 16 && dims[1] == 32);
    CHECK(dp_bank_shape(b, "b", NULL, 0) == 1);
    CHECK_ERROR(dp_bank_shape(b, "w1", dims, 1) == -1, "rank 2 does not fit in dims of 1");
    CHECK_ERROR(dp_bank_shape(b, "nope", dims, 4) == -1, "no tensor 'nope' in the bank");
    CHECK_ERROR(dp_bank_dtype(b, "nope") == -1, "no tensor 'nope' in the bank");
    CHECK_ERROR(dp_bank_numel(b, NULL) == -1, "tensor is NULL");
    CHECK_ERROR(dp_bank_numel(NULL, "w1") == -1, "bank is NULL");
    CHECK_ERROR(dp_bank_tensor(b, "w1", NULL, &nbytes) == -1, "data is NULL");
    CHECK_ERROR(dp_bank_tensor(b, "nope", &data, &nbytes) == -1, "no tensor 'nope'");
    CHECK(dp_bank_tensor(b, "w1", &data, NULL) == 0);  /* the size is optional */
    CHECK(bank_holds(b, "base"));

    /* fine-tunes: the two of this base; refusals leave the bank as it was */
    CHECK(dp_bank_fine_tune_count(b) == 0 && dp_bank_fine_tune_count(NULL) == 0);
    CHECK(dp_bank_add(b, "b", path_of("bank_b.dpk"), 0) == 0);
    CHECK(dp_bank_add(b, "a", path_of("bank_a.dpk"), 0) == 0);
    CHECK_ERROR(dp_bank_add(b, "a", path_of("bank_b.dpk"), 0) == -1, "a fine-tune named 'a' is already added");
    CHECK_ERROR(dp_bank_add(b, "o", path_of("bank_other.dpk"), 0) == -1,
                "this is not the delta's base: tensor 'w2' has different contents");
    CHECK_ERROR(dp_bank_add(b, "o", path_of("ckpt.dpk"), 0) == -1, "this is not the delta's base");
    CHECK_ERROR(dp_bank_add(b, "o", path_of("delta.dpk"), 0) == -1, "not a checkpoint delta");
    CHECK_ERROR(dp_bank_add(b, "o", path_of("no-such-file.dpk"), 0) == -1, "no-such-file.dpk");
    CHECK_ERROR(dp_bank_add(b, NULL, path_of("bank_a.dpk"), 0) == -1, "name is NULL");
    CHECK_ERROR(dp_bank_add(b, "o", NULL, 0) == -1, "delta_path is NULL");
    CHECK_ERROR(dp_bank_add(NULL, "o", path_of("bank_a.dpk"), 0) == -1, "bank is NULL");
    CHECK(dp_bank_fine_tune_count(b) == 2);
    CHECK(dp_bank_fine_tune_name(b, 0, buf, sizeof buf) == 1 && strcmp(buf, "a") == 0);  /* sorted */
    CHECK(dp_bank_fine_tune_name(b, 1, buf, sizeof buf) == 1 && strcmp(buf, "b") == 0);
    CHECK_ERROR(dp_bank_fine_tune_name(b, 2, buf, sizeof buf) == -1, "fine-tune index 2 out of range (2 fine-tunes)");
    CHECK_ERROR(dp_bank_fine_tune_name(NULL, 0, buf, sizeof buf) == -1, "bank is NULL");
    CHECK(dp_bank_add(b, "o", path_of("bank_other.dpk"), 1) == 0);  /* force: accepted, then removed */
    CHECK(dp_bank_remove(b, "o") == 0 && dp_bank_fine_tune_count(b) == 2);
    CHECK(bank_holds(b, "base"));
    other = dp_bank_open(path_of("ckpt_base"));  /* a fine-tune with a resized and an added tensor: refused */
    CHECK(other != NULL);
    CHECK_ERROR(dp_bank_add(other, "ck", path_of("ckpt.dpk"), 0) == -1, "the bank serves fine-tunes with the base's tensors only");
    CHECK(dp_bank_fine_tune_count(other) == 0);
    dp_bank_close(other);

    CHECK(dp_bank_touches(b, "a", "emb") == 1 && dp_bank_touches(b, "b", "emb") == 0 && dp_bank_touches(b, "b", "b") == 1);
    CHECK_ERROR(dp_bank_touches(b, "nope", "emb") == -1, "no fine-tune named 'nope'");
    CHECK_ERROR(dp_bank_touches(b, "a", "nope") == -1, "no tensor 'nope'");
    CHECK_ERROR(dp_bank_touches(NULL, "a", "emb") == -1, "bank is NULL");

    /* switches: a, b, the base, a, the mix; each bit-identical to its reference, only touched tensors written */
    CHECK(dp_bank_activate(b, 1, names_a, NULL, 0) == 0 && bank_holds(b, "a") && rewrote(b, "emb w1 w2 norm"));
    CHECK(dp_bank_activate(b, 1, names_b, NULL, 1) == 0 && bank_holds(b, "b") && rewrote(b, "emb w1 w2 norm b"));
    CHECK(dp_bank_activate(b, 0, NULL, NULL, 0) == 0 && bank_holds(b, "base") && rewrote(b, "w1 w2 b"));
    CHECK(dp_bank_activate(b, 1, names_a, NULL, 0) == 0 && bank_holds(b, "a"));
    CHECK(dp_bank_activate(b, 1, names_a, NULL, 0) == 0 && bank_holds(b, "a") && rewrote(b, ""));  /* the same mix */
    CHECK(dp_bank_activate(b, 2, names_ab, alphas_mix, 0) == 0 && bank_holds(b, "mix"));
    CHECK(dp_bank_tensor(b, "w1", &data2, NULL) == 0 && dp_bank_tensor(b, "w1", &data, NULL) == 0 && data == data2);

    /* failed switches: nothing changes */
    CHECK_ERROR(dp_bank_activate(b, 2, names_nope, NULL, 0) == -1, "no fine-tune named 'nope' (add it first)");
    CHECK_ERROR(dp_bank_activate(b, 1, names_a, alpha_nan, 0) == -1, "is not finite");
    CHECK_ERROR(dp_bank_activate(b, 1, NULL, NULL, 0) == -1, "names is NULL but n is 1");
    CHECK_ERROR(dp_bank_activate(b, 2, names_null, NULL, 0) == -1, "names[1] is NULL");
    CHECK_ERROR(dp_bank_activate(NULL, 0, NULL, NULL, 0) == -1, "bank is NULL");
    CHECK(bank_holds(b, "mix"));
    CHECK_ERROR(dp_bank_last_rewritten(b, flags, 5) == -1, "flags holds 5 bytes, expected 6 (one per tensor)");
    CHECK_ERROR(dp_bank_last_rewritten(b, NULL, 6) == -1, "flags is NULL");
    CHECK_ERROR(dp_bank_last_rewritten(NULL, flags, 6) == -1, "bank is NULL");

    /* remove: refused while active */
    CHECK_ERROR(dp_bank_remove(b, "b") == -1, "fine-tune 'b' is active");
    CHECK_ERROR(dp_bank_remove(b, "nope") == -1, "no fine-tune named 'nope'");
    CHECK_ERROR(dp_bank_remove(b, NULL) == -1, "name is NULL");
    CHECK_ERROR(dp_bank_remove(NULL, "b") == -1, "bank is NULL");

    /* into caller memory: every state, the live buffers untouched */
    CHECK(dp_bank_rebuild(b, 1, names_a, NULL, "w1", out, 32 * 16 * 2, 0) == 0);
    CHECK(bank_rebuilds(b, 0, NULL, NULL, "base") && bank_rebuilds(b, 1, names_a, NULL, "a"));
    CHECK(bank_rebuilds(b, 1, names_b, NULL, "b") && bank_rebuilds(b, 2, names_ab, alphas_mix, "mix"));
    CHECK(bank_holds(b, "mix"));
    memset(out, 0xAB, 64);
    CHECK_ERROR(dp_bank_rebuild(b, 1, names_a, NULL, "w1", out, 32 * 16 * 2 - 2, 0) == -1,
                "bank_base: tensor 'w1': out holds 1022 bytes, expected 1024 ([32, 16] bf16)");
    CHECK_ERROR(dp_bank_rebuild(b, 1, names_a, NULL, "w2", out, 16 * 32 * 2, 0) == -1,
                "out holds 1024 bytes, expected 2048 ([16, 32] f32)");
    CHECK_ERROR(dp_bank_rebuild(b, 2, names_nope, NULL, "w1", out, 32 * 16 * 2, 0) == -1, "no fine-tune named 'nope'");
    CHECK_ERROR(dp_bank_rebuild(b, 1, NULL, NULL, "w1", out, 32 * 16 * 2, 0) == -1, "names is NULL but n is 1");
    CHECK_ERROR(dp_bank_rebuild(b, 1, names_a, NULL, "nope", out, 4, 0) == -1, "no tensor 'nope'");
    CHECK_ERROR(dp_bank_rebuild(b, 1, names_a, NULL, "w1", NULL, 32 * 16 * 2, 0) == -1, "out is NULL");
    CHECK_ERROR(dp_bank_rebuild(NULL, 1, names_a, NULL, "w1", out, 32 * 16 * 2, 0) == -1, "bank is NULL");
    CHECK(((unsigned char*)out)[0] == 0xAB && ((unsigned char*)out)[63] == 0xAB);

    /* mixed batches, with the buffers at the base: products within the f32 bound, rows exactly */
    CHECK(dp_bank_activate(b, 0, NULL, NULL, 0) == 0 && bank_holds(b, "base"));
    CHECK(product_within(b, "a", "w1", 32, 16) && product_within(b, "b", "w1", 32, 16) && product_within(b, "b", "w2", 16, 32));
    for (i = 0; i < 3 * 32; ++i) { x[i] = (float)i; y[i] = 1.0f; }
    CHECK(dp_bank_product(b, "b", "emb", x, 3 * 16, 3, 1.0f, y, 3 * 24, 0) == 0);  /* b leaves emb unchanged */
    for (i = 0; i < 3 * 24; ++i) CHECK(y[i] == 1.0f);
    CHECK(dp_bank_product(b, "a", "w1", NULL, 0, 0, 1.0f, NULL, 0, 0) == 0);  /* an empty batch */
    CHECK_ERROR(dp_bank_product(b, "a", "w1", x, 3 * 16 - 1, 3, 1.0f, y, 3 * 32, 0) == -1,
                "tensor 'w1': x holds 47 values, expected 48 (batch 3 x 16 f32)");
    CHECK_ERROR(dp_bank_product(b, "a", "w1", x, 3 * 16, 3, 1.0f, y, 3 * 16, 0) == -1,
                "y holds 48 values, expected 96 (batch 3 x 32 f32)");
    CHECK_ERROR(dp_bank_product(b, "a", "w1", x, 3 * 16, -1, 1.0f, y, 3 * 32, 0) == -1, "batch -1 is out of range");
    CHECK_ERROR(dp_bank_product(b, "a", "w1", NULL, 3 * 16, 3, 1.0f, y, 3 * 32, 0) == -1, "x is NULL");
    CHECK_ERROR(dp_bank_product(b, "a", "w1", x, 3 * 16, 3, 1.0f, NULL, 3 * 32, 0) == -1, "y is NULL");
    CHECK_ERROR(dp_bank_product(b, "nope", "w1", x, 3 * 16, 3, 1.0f, y, 3 * 32, 0) == -1, "no fine-tune named 'nope'");
    CHECK_ERROR(dp_bank_product(b, NULL, "w1", x, 3 * 16, 3, 1.0f, y, 3 * 32, 0) == -1, "fine_tune is NULL");
    CHECK_ERROR(dp_bank_product(b, "a", "nope", x, 3 * 16, 3, 1.0f, y, 3 * 32, 0) == -1, "no tensor 'nope'");
    CHECK_ERROR(dp_bank_product(NULL, "a", "w1", x, 3 * 16, 3, 1.0f, y, 3 * 32, 0) == -1, "bank is NULL");
    CHECK(mixed_product_within(b));
    {
        const int32_t which[3] = {0, -1, 1}, bad_which[3] = {0, 2, 1};
        const char* const names_ab_nope[] = {"a", "nope"};
        for (i = 0; i < 3 * 32; ++i) y[i] = 1.0f;
        CHECK(dp_bank_mixed_product(b, "w1", 0, NULL, NULL, 0, NULL, 0, 0, 1.0f, NULL, 0, 0) == 0);  /* empty */
        CHECK_ERROR(dp_bank_mixed_product(b, "w1", 2, names_ab, bad_which, 3, x, 3 * 16, 3, 1.0f, y, 3 * 32, 0) == -1,
                    "tensor 'w1': which[1] is 2, outside [-1, 2)");
        CHECK_ERROR(dp_bank_mixed_product(b, "w1", 2, names_ab, which, 2, x, 3 * 16, 3, 1.0f, y, 3 * 32, 0) == -1,
                    "which holds 2 entries, expected 3 (one per batch row)");
        CHECK_ERROR(dp_bank_mixed_product(b, "w1", 2, names_ab_nope, which, 3, x, 3 * 16, 3, 1.0f, y, 3 * 32, 0) == -1,
                    "no fine-tune named 'nope'");
        CHECK_ERROR(dp_bank_mixed_product(b, "w1", 2, names_null, which, 3, x, 3 * 16, 3, 1.0f, y, 3 * 32, 0) == -1,
                    "names[1] is NULL");
        CHECK_ERROR(dp_bank_mixed_product(b, "w1", 2, NULL, which, 3, x, 3 * 16, 3, 1.0f, y, 3 * 32, 0) == -1,
                    "names is NULL but n_names is 2");
        CHECK_ERROR(dp_bank_mixed_product(b, "w1", 2, names_ab, NULL, 3, x, 3 * 16, 3, 1.0f, y, 3 * 32, 0) == -1,
                    "which is NULL");
        CHECK_ERROR(dp_bank_mixed_product(b, "w1", 2, names_ab, which, 3, x, 3 * 16, 3, 1.0f, y, 3 * 31, 0) == -1,
                    "y holds 93 values, expected 96 (batch 3 x 32 f32)");
        CHECK_ERROR(dp_bank_mixed_product(b, "nope", 2, names_ab, which, 3, x, 3 * 16, 3, 1.0f, y, 3 * 32, 0) == -1,
                    "no tensor 'nope'");
        CHECK_ERROR(dp_bank_mixed_product(NULL, "w1", 2, names_ab, which, 3, x, 3 * 16, 3, 1.0f, y, 3 * 32, 0) == -1,
                    "bank is NULL");
        for (i = 0; i < 3 * 32; ++i) CHECK(y[i] == 1.0f);  /* no failed call wrote anything */
    }
    ref = slurp("bank_rows_a_emb.raw", &size);
    CHECK(dp_bank_delta_rows(b, "a", "emb", rows, 3, 0.75f, out, 3 * 16) == 0 && same_bytes(out, ref, size));
    free(ref);
    CHECK(dp_bank_delta_rows(b, "b", "emb", rows, 3, 0.75f, out, 3 * 16) == 0);
    for (i = 0; i < 3 * 16; ++i) CHECK(out[i] == 0.0f);
    memset(out, 0xAB, 2 * 16 * 4);
    CHECK_ERROR(dp_bank_delta_rows(b, "a", "emb", bad_rows, 2, 1.0f, out, 2 * 16) == -1,
                "tensor 'emb': row 24 (rows[1]) is outside [0, 24)");
    CHECK(((unsigned char*)out)[0] == 0xAB);  /* nothing written, not even row 0 */
    CHECK_ERROR(dp_bank_delta_rows(b, "a", "emb", rows, 3, 1.0f, out, 3 * 16 + 1) == -1,
                "out holds 49 values, expected 48 (3 rows x 16 f32)");
    CHECK_ERROR(dp_bank_delta_rows(b, "a", "emb", NULL, 3, 1.0f, out, 3 * 16) == -1, "rows is NULL");
    CHECK_ERROR(dp_bank_delta_rows(b, "nope", "emb", rows, 3, 1.0f, out, 3 * 16) == -1, "no fine-tune named 'nope'");
    CHECK_ERROR(dp_bank_delta_rows(NULL, "a", "emb", rows, 3, 1.0f, out, 3 * 16) == -1, "bank is NULL");

    /* the cache: a mix switched back to comes from it, the same bytes */
    CHECK(dp_bank_cache_bytes(b) == 0);
    CHECK(dp_bank_set_cache_budget(b, 1 << 20) == 0);
    CHECK(dp_bank_activate(b, 1, names_a, NULL, 0) == 0 && dp_bank_cache_bytes(b) > 0);
    CHECK(dp_bank_activate(b, 1, names_b, NULL, 0) == 0 && dp_bank_activate(b, 1, names_a, NULL, 0) == 0);
    CHECK(bank_holds(b, "a"));
    CHECK(dp_bank_set_cache_budget(b, 0) == 0 && dp_bank_cache_bytes(b) == 0);
    CHECK_ERROR(dp_bank_set_cache_budget(NULL, 0) == -1, "bank is NULL");
    CHECK_ERROR(dp_bank_cache_bytes(NULL) == -1, "bank is NULL");

    /* the reader's lock: switches from the same thread are refused, not deadlocked; reads and rebuilds go on */
    CHECK(dp_bank_lock_shared(b) == 0 && dp_bank_lock_shared(b) == 0);
    CHECK_ERROR(dp_bank_activate(b, 0, NULL, NULL, 0) == -1, "this thread holds the bank's shared lock");
    CHECK_ERROR(dp_bank_add(b, "o", path_of("bank_a.dpk"), 0) == -1, "dp_bank_unlock_shared first");
    CHECK_ERROR(dp_bank_remove(b, "b") == -1, "would wait for itself");
    CHECK_ERROR(dp_bank_set_cache_budget(b, 0) == -1, "would wait for itself");
    CHECK(bank_holds(b, "a") && bank_rebuilds(b, 1, names_b, NULL, "b"));
    CHECK(dp_bank_unlock_shared(b) == 0);
    CHECK_ERROR(dp_bank_activate(b, 0, NULL, NULL, 0) == -1, "holds the bank's shared lock");  /* still one */
    CHECK(dp_bank_unlock_shared(b) == 0);
    CHECK_ERROR(dp_bank_unlock_shared(b) == -1, "this thread holds no shared lock on this bank");
    CHECK_ERROR(dp_bank_lock_shared(NULL) == -1, "bank is NULL");
    CHECK_ERROR(dp_bank_unlock_shared(NULL) == -1, "bank is NULL");

    /* remove once inactive, and add again */
    CHECK(dp_bank_activate(b, 0, NULL, NULL, 0) == 0 && dp_bank_remove(b, "a") == 0 && dp_bank_fine_tune_count(b) == 1);
    CHECK_ERROR(dp_bank_activate(b, 1, names_a, NULL, 0) == -1, "no fine-tune named 'a'");
    CHECK(dp_bank_add(b, "a", path_of("bank_a.dpk"), 0) == 0 && dp_bank_activate(b, 1, names_a, NULL, 0) == 0);
    CHECK(bank_holds(b, "a"));
    CHECK(dp_bank_lock_shared(b) == 0);
    dp_bank_close(b);  /* releases this thread's lock first */
    dp_bank_close(NULL);
    free(out);
}

int main(int argc, char** argv) {
    dp_file* f;
    if (argc < 2 || !*argv[1]) {
        printf("c_api_check: no fixture directory (tests/test_kernels_native.py writes one): skipped\n");
        return 77;
    }
    dir = argv[1];
    check_library();
    CHECK_ERROR(dp_file_open(NULL) == NULL, "dp_file_open: path is NULL");
    CHECK_ERROR(dp_file_open(path_of("no-such-file.dpk")) == NULL, "no-such-file.dpk");
    CHECK_ERROR(dp_file_open(path_of("base.safetensors")) == NULL, "not a deltapack file");
    f = dp_file_open(path_of("delta.dpk"));
    CHECK(f != NULL);
    if (f) {
        check_file_accessors(f);
        check_apply_and_decode(f);
        check_device(f);
        check_base(f);
        check_checkpoint(f);
        dp_file_close(f);
    }
    check_bank();
    dp_file_close(NULL);
    if (failures) {
        printf("%d C API checks failed\n", failures);
        return 1;
    }
    printf("C API: all checks passed\n");
    return 0;
}
