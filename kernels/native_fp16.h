// CUDA's __half for native CPU modules (copied into the build as cuda_fp16.h): IEEE binary16
// storage, converted to and from float with round-to-nearest-even, as NumPy converts.
#pragma once

#if defined(__FLT16_MAX__)  // the compiler has _Float16 (GCC 12+, clang 15+ on x86-64)
struct __half {
    _Float16 v;
};
static inline __attribute__((always_inline)) float __half2float(const __half h) { return static_cast<float>(h.v); }
static inline __attribute__((always_inline)) __half __float2half_rn(const float f) {
    __half h;
    h.v = static_cast<_Float16>(f);
    return h;
}
#else  // bit manipulation, for compilers without _Float16
struct __half {
    unsigned short bits;
};
static inline float gpuopt_float_of_bits(unsigned int u) {
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
static inline unsigned int gpuopt_bits_of_float(float f) {
    unsigned int u;
    __builtin_memcpy(&u, &f, 4);
    return u;
}
static inline float __half2float(const __half h) {
    const unsigned int sign = (h.bits & 0x8000u) << 16, exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
    if (exponent == 0x1f) return gpuopt_float_of_bits(sign | 0x7f800000u | (mantissa << 13));  // inf, nan
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
        const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return gpuopt_float_of_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}
static inline __half __float2half_rn(const float f) {
    const unsigned int u = gpuopt_bits_of_float(f), sign = (u >> 16) & 0x8000u, rest = u & 0x7fffffffu;
    __half h;
    if (rest >= 0x7f800000u) {  // inf or nan (nan keeps a payload bit)
        h.bits = static_cast<unsigned short>(sign | 0x7c00u | (rest > 0x7f800000u ? 0x200u | ((rest >> 13) & 0x3ffu) : 0u));
        return h;
    }
    if (rest >= 0x477ff000u) {  // rounds to infinity (65520 and above)
        h.bits = static_cast<unsigned short>(sign | 0x7c00u);
        return h;
    }
    if (rest < 0x38800000u) {  // below the smallest normal half: round at 2^-24 steps
        const float magnitude = gpuopt_float_of_bits(rest) + 0.5f;  // exact add; rounding to nearest even
        h.bits = static_cast<unsigned short>(sign | (gpuopt_bits_of_float(magnitude) - 0x3f000000u));
        return h;
    }
    const unsigned int odd = (rest >> 13) & 1u;
    h.bits = static_cast<unsigned short>(sign | ((rest + 0xc8000fffu + odd) >> 13));
    return h;
}
#endif
