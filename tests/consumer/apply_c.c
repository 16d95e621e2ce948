/* A consumer of an installed deltapack through the C API (tests/test_install.py builds it with CMake and
 * with pkg-config): rebuilds one tensor from a base .safetensors file and a delta file.
 *   apply_c BASE.safetensors DELTA.dpk TENSOR OUT.raw ALPHA    OUT.raw: the tensor in the base's dtype */
#include <stdio.h>
#include <stdlib.h>

#include "deltapack/deltapack_c.h"

int main(int argc, char** argv) {
    dp_base* base;
    dp_file* delta;
    struct dp_apply_params params = dp_apply_default_params();
    int dtype;
    int64_t numel;
    size_t size;
    void* out;
    FILE* file;
    if (argc != 6) {
        fprintf(stderr, "usage: apply_c BASE.safetensors DELTA.dpk TENSOR OUT.raw ALPHA\n");
        return 2;
    }
    base = dp_base_open(argv[1]);
    delta = dp_file_open(argv[2]);
    if (!base || !delta) {
        fprintf(stderr, "%s\n", dp_last_error());
        return 1;
    }
    dtype = dp_base_dtype(base, argv[3]);
    numel = dp_file_numel(delta, argv[3]);
    if (dtype < 0 || numel < 0) {
        fprintf(stderr, "%s\n", dp_last_error());
        return 1;
    }
    size = (size_t)numel * dp_dtype_size((enum dp_dtype)dtype);
    out = malloc(size ? size : 1);
    params.alpha = (float)atof(argv[5]);
    if (dp_apply_from_base(delta, base, argv[3], out, size, (enum dp_dtype)dtype, params) != 0) {
        fprintf(stderr, "%s\n", dp_last_error());
        return 1;
    }
    file = fopen(argv[4], "wb");
    if (!file || fwrite(out, 1, size, file) != size || fclose(file) != 0) {
        fprintf(stderr, "cannot write %s\n", argv[4]);
        return 1;
    }
    printf("deltapack %s (C API): %s rebuilt\n", dp_version(), argv[3]);
    free(out);
    dp_file_close(delta);
    dp_base_close(base);
    return 0;
}
