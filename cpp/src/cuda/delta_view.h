// What a kernel reads of one validated delta tensor: its packed components and the few numbers that decode them.
// Each codec's RowDecoder::view() fills one from the components prepare() validated, with pointers into the
// file's memory; the CUDA runtime copies the components to the device and points the view there. A plain
// struct: it travels by value in kernel parameters.
#pragma once

#include <cstdint>

#include "deltapack/deltapack.h"

namespace deltapack {

struct DeltaView {
    enum Kind : int32_t { Sign, Levels, Quant, SparseBitmap, SparseGaps, Dense, Lowrank, LowrankQuant };
    static constexpr int kMaxParts = 4;   // components a codec reads
    static constexpr int kMaxBands = 64;  // lowrank bits= bands (the codec's own limit)

    Kind kind = Dense;
    int64_t rows = 0, cols = 0;
    // The components, by codec (null where absent):
    //   Sign          signs u8 [rows, row_bytes], scales f32 (1, rows or rows x ngroups: scope 0, 1, 2)
    //   Levels        signs u8 [rows, row_bytes], table f32 [2^bits], codes u8 [rows, code_bytes] (bits > 0)
    //   Quant         codes u8 [rows, row_bytes], scales f16 [rows, ngroups], times 2^scale_exp
    //   SparseBitmap  rowptr i64 [rows + 1], mask u8 [rows, row_bytes], values (dtype), vscale f32 [rows] (i8)
    //   SparseGaps    rowptr i64 [rows + 1], gaps u8 [entries], values (dtype), vscale f32 [rows] (i8)
    //   Dense         values (dtype) [rows, cols]
    //   Lowrank       u (dtype) [rows, rank], v (dtype) [rank, cols]
    //   LowrankQuant  codes u8 (per direction: u codes, v codes), scales f16 [rank, ugroups + vgroups], s f32 [rank]
    const void* part[kMaxParts] = {nullptr, nullptr, nullptr, nullptr};
    int64_t row_bytes = 0, code_bytes = 0;
    int64_t group = 1, ngroups = 1;
    int32_t scope = 0;      // Sign
    int32_t bits = 0;       // Quant: code width; Levels: code width (bits - 1)
    int32_t scale_exp = 0;  // Quant
    DType dtype = DType::F32;  // Dense values, Lowrank factors, Sparse values (I8: times vscale)
    int64_t rank = 0;
    int32_t nbands = 0;                // LowrankQuant: bands of band_size[b] directions at band_bits[b] bits
    uint8_t band_bits[kMaxBands] = {};
    int32_t band_size[kMaxBands] = {};
};

}  // namespace deltapack
