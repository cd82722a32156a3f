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
// fmax/fmin as comparisons, which vectorise (the library calls do not): a NaN operand is
// ignored, as C's and NumPy's fmax/fmin do. (Between +0 and -0 either may come back; NumPy
// itself answers differently for short and long arrays.)
template <typename T>
static inline __attribute__((always_inline)) T gpuopt_fmax(const T a, const T b) { return a > b || b != b ? a : b; }
template <typename T>
static inline __attribute__((always_inline)) T gpuopt_fmin(const T a, const T b) { return a < b || b != b ? a : b; }
static inline __attribute__((always_inline)) float fmaxf(const float a, const float b) { return gpuopt_fmax(a, b); }
static inline __attribute__((always_inline)) double fmax(const double a, const double b) { return gpuopt_fmax(a, b); }
static inline __attribute__((always_inline)) float fminf(const float a, const float b) { return gpuopt_fmin(a, b); }
static inline __attribute__((always_inline)) double fmin(const double a, const double b) { return gpuopt_fmin(a, b); }
