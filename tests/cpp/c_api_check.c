/* Exercises the C API from plain C: apply one tensor of a delta file to a raw base buffer.
 *   c_api_check DELTA TENSOR BASE.raw DTYPE(0=f32,1=f16,2=bf16) OUT.raw ALPHA
 * Exit 0 on success; on failure prints dp_last_error() and exits 1. */
#include <stdio.h>
#include <stdlib.h>

#include "deltapack/deltapack_c.h"

int main(int argc, char** argv) {
    if (argc != 7) return 2;
    dp_file* f = dp_file_open(argv[1]);
    if (!f) { fprintf(stderr, "%s\n", dp_last_error()); return 1; }
    int64_t dims[8];
    int rank = dp_file_shape(f, argv[2], dims, 8);
    if (rank < 0) { fprintf(stderr, "%s\n", dp_last_error()); dp_file_close(f); return 1; }
    size_t numel = 1;
    for (int i = 0; i < rank; ++i) numel *= (size_t)dims[i];
    enum dp_dtype t = (enum dp_dtype)atoi(argv[4]);
    size_t esize = t == DP_F32 ? 4 : 2;
    void* buf = malloc(numel * esize + 1);
    FILE* in = fopen(argv[3], "rb");
    if (!in || fread(buf, esize, numel, in) != numel) { fprintf(stderr, "cannot read base\n"); return 1; }
    fclose(in);
    struct dp_apply_params p = dp_apply_default_params();
    p.alpha = (float)atof(argv[6]);
    if (dp_apply(f, argv[2], buf, t, buf, t, p) != 0) {  /* in place */
        fprintf(stderr, "%s\n", dp_last_error());
        return 1;
    }
    FILE* out = fopen(argv[5], "wb");
    fwrite(buf, esize, numel, out);
    fclose(out);
    printf("%zu tensors, simd %s\n", dp_file_count(f), dp_simd());
    free(buf);
    dp_file_close(f);
    return 0;
}
