// CUDA's __nv_bfloat16 for native CPU modules (copied into the build as cuda_bf16.h): the top
// 16 bits of a float32; from float, round to nearest even, a NaN staying a (quiet) NaN.
#pragma once

struct __nv_bfloat16 {
    unsigned short bits;
};
static inline __attribute__((always_inline)) float __bfloat162float(const __nv_bfloat16 h) {
    const unsigned int wide = (unsigned int)h.bits << 16;
    float f;
    __builtin_memcpy(&f, &wide, sizeof f);
    return f;
}
static inline __attribute__((always_inline)) __nv_bfloat16 __float2bfloat16_rn(const float f) {
    unsigned int u;
    __builtin_memcpy(&u, &f, sizeof u);
    __nv_bfloat16 h;
    h.bits = f != f ? (unsigned short)0x7FC0 : (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return h;
}
