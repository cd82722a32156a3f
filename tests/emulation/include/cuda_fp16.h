// CPU stand-in for CUDA's __half: IEEE binary16 storage, round-to-nearest conversions.
#pragma once
struct __half {
    _Float16 v;
    __half() = default;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) {
    __half h;
    h.v = static_cast<_Float16>(f);
    return h;
}
