/* Every function of the C API (deltapack_c.h) from plain C99, with every error path, against files a
 * Python fixture writes (tests/test_kernels_native.py, write_c_api_fixture: the names, shapes, metadata
 * and reference outputs below are defined there):
 *   c_api_check DIR     DIR holds delta.dpk, base.safetensors and the reference outputs *.raw
 * Without DIR it exits 77 (CTest: skipped). Exit 0 = every check passed; else each failure is printed. */
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
        CHECK(p.alpha == 1.0f && p.threads == 0 && p.verify != 0);
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
        check_base(f);
        check_checkpoint(f);
        dp_file_close(f);
    }
    dp_file_close(NULL);
    if (failures) {
        printf("%d C API checks failed\n", failures);
        return 1;
    }
    printf("C API: all checks passed\n");
    return 0;
}
