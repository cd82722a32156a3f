// CPU stand-in for CUDA's __nv_bfloat16: the top 16 bits of a float32; conversions from
// float round to nearest even (NaN stays NaN), as __float2bfloat16_rn does.
#pragma once
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 {
    std::uint16_t bits;
    __nv_bfloat16() = default;
};
inline float __bfloat162float(__nv_bfloat16 h) {
    const std::uint32_t wide = std::uint32_t(h.bits) << 16;
    float f;
    std::memcpy(&f, &wide, sizeof f);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    __nv_bfloat16 h;
    if (f != f) {
        h.bits = 0x7FC0;
    } else {
        h.bits = std::uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
    return h;
}
