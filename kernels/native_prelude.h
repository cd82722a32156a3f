// gpuopt native CPU modules: what the printed step needs from CUDA, for a C++ compiler.
//
// A native module is this file, then the generated part of the CUDA module (types, sizes,
// gpuopt_step() and gpuopt_terms(), printed once from the rule definitions), then
// kernels/native.cpp. The CUDA qualifiers become plain inline functions, and the maths
// functions the printer spells are the compilers' built-ins (no maths headers: a module
// compiles in a fraction of a second). The built-ins are IEEE-exact, as NumPy's ufuncs are.

#define __device__
#define __forceinline__ inline __attribute__((always_inline))

static inline __attribute__((always_inline)) float sqrtf(const float a) { return __builtin_sqrtf(a); }
static inline __attribute__((always_inline)) double sqrt(const double a) { return __builtin_sqrt(a); }
static inline __attribute__((always_inline)) float fabsf(const float a) { return __builtin_fabsf(a); }
static inline __attribute__((always_inline)) double fabs(const double a) { return __builtin_fabs(a); }
static inline __attribute__((always_inline)) float fmaxf(const float a, const float b) { return __builtin_fmaxf(a, b); }
static inline __attribute__((always_inline)) double fmax(const double a, const double b) { return __builtin_fmax(a, b); }
static inline __attribute__((always_inline)) float fminf(const float a, const float b) { return __builtin_fminf(a, b); }
static inline __attribute__((always_inline)) double fmin(const double a, const double b) { return __builtin_fmin(a, b); }
