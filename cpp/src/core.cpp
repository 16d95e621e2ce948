// Basics: dtypes, arrays, SIMD dispatch, thread count, CRC-32C.
#include <atomic>
#include <cstdlib>
#include <thread>

#include "kernels.h"

#if defined(DELTAPACK_X86)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace deltapack {

const char* dtype_name(DType t) {
    switch (t) {
        case DType::F32: return "f32";
        case DType::F16: return "f16";
        case DType::BF16: return "bf16";
        case DType::F64: return "f64";
        case DType::I64: return "i64";
        case DType::I32: return "i32";
        case DType::I16: return "i16";
        case DType::I8: return "i8";
        case DType::U64: return "u64";
        case DType::U32: return "u32";
        case DType::U16: return "u16";
        case DType::U8: return "u8";
        case DType::BOOL: return "bool";
        case DType::F8_E4M3: return "f8_e4m3";
        case DType::F8_E5M2: return "f8_e5m2";
    }
    return "?";
}

DType dtype_from_name(const std::string& n) {
    if (n == "f32" || n == "F32" || n == "float32") return DType::F32;
    if (n == "f16" || n == "F16" || n == "float16") return DType::F16;
    if (n == "bf16" || n == "BF16" || n == "bfloat16") return DType::BF16;
    if (n == "f64" || n == "F64" || n == "float64") return DType::F64;
    if (n == "i64" || n == "I64" || n == "int64") return DType::I64;
    if (n == "i32" || n == "I32" || n == "int32") return DType::I32;
    if (n == "i8" || n == "I8" || n == "int8") return DType::I8;
    if (n == "u8" || n == "U8" || n == "uint8") return DType::U8;
    if (n == "i16" || n == "I16" || n == "int16") return DType::I16;
    if (n == "u16" || n == "U16" || n == "uint16") return DType::U16;
    if (n == "u32" || n == "U32" || n == "uint32") return DType::U32;
    if (n == "u64" || n == "U64" || n == "uint64") return DType::U64;
    if (n == "bool" || n == "BOOL") return DType::BOOL;
    if (n == "f8_e4m3" || n == "F8_E4M3") return DType::F8_E4M3;
    if (n == "f8_e5m2" || n == "F8_E5M2") return DType::F8_E5M2;
    throw std::invalid_argument("unknown dtype '" + n + "'");
}

size_t dtype_size(DType t) {
    switch (t) {
        case DType::F64: case DType::I64: case DType::U64: return 8;
        case DType::F32: case DType::I32: case DType::U32: return 4;
        case DType::F16: case DType::BF16: case DType::I16: case DType::U16: return 2;
        default: return 1;
    }
}

int64_t ArrayRef::numel() const {
    for (int64_t d : shape)
        if (d == 0) return 0;  // before multiplying: [2^40, 2^40, 0] has no elements, not an overflow
    int64_t n = 1;
    for (int64_t d : shape)
        if (d < 0 || __builtin_mul_overflow(n, d, &n))
            throw FormatError("an array shape has a negative dimension or more than 2^63 elements");
    return n;
}

Array Array::zeros(DType dtype, std::vector<int64_t> shape) {
    Array a;
    a.ref.dtype = dtype;
    a.ref.shape = std::move(shape);
    size_t nbytes = a.ref.nbytes();
    a.storage = std::shared_ptr<uint8_t[]>(new uint8_t[nbytes ? nbytes : 1]());
    a.ref.data = a.storage.get();
    return a;
}

// ---------------------------------------------------------------------------- SIMD dispatch

static bool cpu_has(const std::string& path) {
    if (path == "scalar") return true;
#if defined(DELTAPACK_ARM)
    if (path == "neon") return true;  // Advanced SIMD is mandatory on AArch64
#endif
#if defined(DELTAPACK_X86)
    __builtin_cpu_init();
    if (path == "avx2") {  // F16C by CPUID: not every compiler's __builtin_cpu_supports knows it
        unsigned a, b, c, d;
        return __builtin_cpu_supports("avx2") && __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
    }
    if (path == "avx512")
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl");
#endif
    return false;
}

static const Kernels* table_for(const std::string& path) {
#if defined(DELTAPACK_ARM)
    if (path == "neon") return &kNeonKernels;
#endif
#if defined(DELTAPACK_X86)
    if (path == "avx512") return &kAvx512Kernels;
    if (path == "avx2") return &kAvx2Kernels;
#endif
    if (path == "scalar") return &kScalarKernels;
    return nullptr;
}

std::vector<std::string> simd_available() {
    std::vector<std::string> out;
    for (const char* p : {"scalar", "neon", "avx2", "avx512"})
        if (table_for(p) && cpu_has(p)) out.push_back(p);
    return out;
}

static const Kernels* best() {
    auto avail = simd_available();
    return table_for(avail.back());
}

static std::atomic<const Kernels*> g_active{nullptr};

void set_simd(const std::string& path) {
    if (path == "auto") { g_active = best(); return; }
    const Kernels* k = table_for(path);
    if (!k || !cpu_has(path)) {
        std::string avail;
        for (auto& p : simd_available()) avail += (avail.empty() ? "" : ", ") + p;
        throw std::invalid_argument("SIMD path '" + path + "' is not available here (available: " + avail + ", auto)");
    }
    g_active = k;
}

const Kernels& kernels() {
    const Kernels* k = g_active.load();
    if (!k) {
        const char* env = std::getenv("DELTAPACK_SIMD");
        set_simd(env && *env ? env : "auto");
        k = g_active.load();
    }
    return *k;
}

std::string simd() { return kernels().name; }

void store_fence() {
#if defined(DELTAPACK_X86)
    _mm_sfence();
#endif
}

static std::atomic<int> g_threads{0};
void set_default_threads(int t) {
    if (t < 0) throw std::invalid_argument("threads must be >= 0");
    g_threads = t;
}
int default_threads() {
    int t = g_threads.load();
    if (t > 0) return t;
    unsigned h = std::thread::hardware_concurrency();
    return h ? int(h) : 1;
}

// ---------------------------------------------------------------------------- CRC-32C

static uint32_t crc_table[8][256];
static bool init_table() {
    for (uint32_t i = 0; i < 256; ++i) {
        uint32_t c = i;
        for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
        for (int t = 1; t < 8; ++t) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
    return true;
}

static uint32_t crc32c_soft(uint32_t crc, const uint8_t* p, size_t n) {
    static const bool ready = init_table();
    (void)ready;
    while (n >= 8) {
        uint64_t w;
        std::memcpy(&w, p, 8);
        w ^= crc;
        crc = crc_table[7][w & 0xff] ^ crc_table[6][(w >> 8) & 0xff] ^ crc_table[5][(w >> 16) & 0xff] ^
              crc_table[4][(w >> 24) & 0xff] ^ crc_table[3][(w >> 32) & 0xff] ^ crc_table[2][(w >> 40) & 0xff] ^
              crc_table[1][(w >> 48) & 0xff] ^ crc_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return crc;
}

// CRC arithmetic on the reflected polynomial (bit 31 holds x^0): a·b mod P.
static uint32_t crc_multiply(uint32_t a, uint32_t b) {
    uint32_t p = 0;
    for (uint32_t bit = 0x80000000u; bit; bit >>= 1) {
        if (a & bit) p ^= b;
        b = (b >> 1) ^ (0x82F63B78u & (0u - (b & 1u)));  // b · x
    }
    return p;
}

// x^(8n) mod P: what feeding n zero bytes multiplies a CRC register by.
static uint32_t crc_shift_of(uint64_t n) {
    uint32_t result = 0x80000000u, square = 0x00800000u;  // x^0, x^8
    for (; n; n >>= 1) {
        if (n & 1) result = crc_multiply(result, square);
        square = crc_multiply(square, square);
    }
    return result;
}

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
    return crc_multiply(crc_shift_of(len_b), crc_a) ^ crc_b;
}

#if defined(DELTAPACK_X86)
__attribute__((target("sse4.2"))) static uint64_t crc32c_hw_chain(uint64_t c, const uint8_t* p, size_t n) {
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t w;
        std::memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
    }
    return c;
}

// The crc32 instruction has a latency of 3 cycles and a throughput of 1: three independent streams over
// consecutive stripes keep it busy, and the register feeding zeros is linear, so the stripes' registers
// join as crc(A B) = crc(A) · x^(8|B|) + crc_from_zero(B).
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const uint8_t* p, size_t n) {
    constexpr size_t kStripe = 32 << 10;
    static const uint32_t shift = crc_shift_of(kStripe);
    uint64_t c = crc;
    for (; n >= 3 * kStripe; p += 3 * kStripe, n -= 3 * kStripe) {
        uint64_t a = c, b = 0, d = 0;
        for (size_t i = 0; i < kStripe; i += 8) {
            uint64_t wa, wb, wd;
            std::memcpy(&wa, p + i, 8);
            std::memcpy(&wb, p + kStripe + i, 8);
            std::memcpy(&wd, p + 2 * kStripe + i, 8);
            a = _mm_crc32_u64(a, wa);
            b = _mm_crc32_u64(b, wb);
            d = _mm_crc32_u64(d, wd);
        }
        c = crc_multiply(shift, crc_multiply(shift, uint32_t(a)) ^ uint32_t(b)) ^ uint32_t(d);
    }
    c = crc32c_hw_chain(c, p, n);
    p += n / 8 * 8;
    n %= 8;
    uint32_t c32 = uint32_t(c);
    while (n--) c32 = _mm_crc32_u8(c32, *p++);
    return c32;
}
#endif

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
    const uint8_t* p = static_cast<const uint8_t*>(data);
    crc = ~crc;
#if defined(DELTAPACK_X86)
    static const bool hw = (__builtin_cpu_init(), __builtin_cpu_supports("sse4.2"));
    if (hw) return ~crc32c_hw(crc, p, n);
#endif
    return ~crc32c_soft(crc, p, n);
}

}  // namespace deltapack
