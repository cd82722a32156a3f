// CPU stand-in for CUDA's __half: IEEE binary16 storage, round-to-nearest conversions.
#pragma once
struct __half {
    _Float16 v;
    __half() = default;
    // CUDA's __half (and CuPy's float16, which the strided kernels get) convert from and to
    // float, rounding to nearest.
    __half(float f) : v(static_cast<_Float16>(f)) {}
    operator float() const { return static_cast<float>(v); }
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) {
    __half h;
    h.v = static_cast<_Float16>(f);
    return h;
}
