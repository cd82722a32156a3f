// gpuopt kernel library: loads, stores and reductions shared by every kernel.
//
// The generator (gpuopt/backends/cuda_source.py) puts, before this file, the type
// definitions of one rule or chain (gpuopt_param_t, gpuopt_grad_t, gpuopt_state_t,
// gpuopt_compute_t, GPUOPT_SLOTS, ...), the sizes shared with the host code (GPUOPT_VEC,
// elements per thread per iteration; GPUOPT_CHUNK; GPUOPT_MAX_THREADS; GPUOPT_TABLE_WIDTH) and
// its element-wise functions gpuopt_step(), gpuopt_new_param() (x - d, or the new master copy
// of MixedPrecision) and/or gpuopt_terms(), printed from the rule definitions. Nothing here
// knows any rule's math.

template <typename T>
struct alignas(sizeof(T) * GPUOPT_VEC) gpuopt_vec {
    T v[GPUOPT_VEC];
};

template <typename T>
__device__ __forceinline__ bool gpuopt_aligned(const T* p) {
    return reinterpret_cast<unsigned long long>(p) % (sizeof(T) * GPUOPT_VEC) == 0;
}

// Elements [i, i + VEC) clipped to n; one vector access when `vector` (aligned and whole).
template <typename T>
__device__ __forceinline__ void gpuopt_load(const T* p, long long i, long long n, bool vector,
                                            T (&out)[GPUOPT_VEC]) {
    if (vector) {
        const gpuopt_vec<T> v = *reinterpret_cast<const gpuopt_vec<T>*>(p + i);
#pragma unroll
        for (int e = 0; e < GPUOPT_VEC; ++e) out[e] = v.v[e];
    } else {
#pragma unroll
        for (int e = 0; e < GPUOPT_VEC; ++e)
            if (i + e < n) out[e] = p[i + e];
    }
}

template <typename T>
__device__ __forceinline__ void gpuopt_store(T* p, long long i, long long n, bool vector,
                                             const T (&in)[GPUOPT_VEC]) {
    if (vector) {
        gpuopt_vec<T> v;
#pragma unroll
        for (int e = 0; e < GPUOPT_VEC; ++e) v.v[e] = in[e];
        *reinterpret_cast<gpuopt_vec<T>*>(p + i) = v;
    } else {
#pragma unroll
        for (int e = 0; e < GPUOPT_VEC; ++e)
            if (i + e < n) p[i + e] = in[e];
    }
}

// Whether every array of one tensor allows vector access (its base is VEC-aligned).
__device__ __forceinline__ bool gpuopt_all_aligned(const gpuopt_param_t* x, const gpuopt_grad_t* g,
                                                   const gpuopt_param_t* out,
                                                   gpuopt_state_t* const (&slots)[GPUOPT_SLOTS_ALLOC]) {
    bool ok = gpuopt_aligned(x) && gpuopt_aligned(g) && (!GPUOPT_APPLY || gpuopt_aligned(out));
#pragma unroll
    for (int k = 0; k < GPUOPT_SLOTS; ++k) ok = ok && gpuopt_aligned(slots[k]);
    return ok;
}

// Loads one group of elements of x, g and every state slot, in compute precision.
struct gpuopt_group {
    gpuopt_compute_t x[GPUOPT_VEC];
    gpuopt_compute_t g[GPUOPT_VEC];
    gpuopt_compute_t s[GPUOPT_VEC][GPUOPT_SLOTS_ALLOC];
};

__device__ __forceinline__ void gpuopt_load_group(gpuopt_group& grp, long long i, long long n, bool vector,
                                                  const gpuopt_param_t* x, const gpuopt_grad_t* g,
                                                  gpuopt_state_t* const (&slots)[GPUOPT_SLOTS_ALLOC]) {
    gpuopt_param_t xs[GPUOPT_VEC] = {};
    gpuopt_grad_t gs[GPUOPT_VEC] = {};
    gpuopt_load(x, i, n, vector, xs);
    gpuopt_load(g, i, n, vector, gs);
#pragma unroll
    for (int e = 0; e < GPUOPT_VEC; ++e) {
        grp.x[e] = gpuopt_from_param(xs[e]);
        grp.g[e] = gpuopt_from_grad(gs[e]);
    }
#pragma unroll
    for (int k = 0; k < GPUOPT_SLOTS; ++k) {
        gpuopt_state_t ss[GPUOPT_VEC] = {};
        gpuopt_load(slots[k], i, n, vector, ss);
#pragma unroll
        for (int e = 0; e < GPUOPT_VEC; ++e) grp.s[e][k] = ss[e];
    }
}

// One group of the fused update: x -= d (or out = d when applying), state written back.
__device__ __forceinline__ void gpuopt_update_group(long long i, long long n, bool vector, gpuopt_param_t* x,
                                                    const gpuopt_grad_t* g, gpuopt_param_t* out,
                                                    gpuopt_state_t* const (&slots)[GPUOPT_SLOTS_ALLOC],
                                                    const gpuopt_compute_t* h, const double* totals) {
    gpuopt_group grp;
    gpuopt_load_group(grp, i, n, vector, x, g, slots);
    gpuopt_param_t xs[GPUOPT_VEC];
#pragma unroll
    for (int e = 0; e < GPUOPT_VEC; ++e) {
        const gpuopt_compute_t d = gpuopt_step(grp.x[e], grp.g[e], grp.s[e], h, totals);
        xs[e] = gpuopt_to_param(GPUOPT_APPLY ? d : gpuopt_new_param(grp.x[e], d, grp.s[e]));
    }
#pragma unroll
    for (int k = 0; k < GPUOPT_SLOTS; ++k) {
        gpuopt_state_t ss[GPUOPT_VEC];
#pragma unroll
        for (int e = 0; e < GPUOPT_VEC; ++e) ss[e] = grp.s[e][k];
        gpuopt_store(slots[k], i, n, vector, ss);
    }
    gpuopt_store(GPUOPT_APPLY ? out : x, i, n, vector, xs);
}

#ifdef GPUOPT_HAS_TERMS
// One group's contribution to the sums of reduction pass `level` (reads only).
__device__ __forceinline__ void gpuopt_terms_group(int level, long long i, long long n, bool vector, const gpuopt_param_t* x,
                                                   const gpuopt_grad_t* g,
                                                   gpuopt_state_t* const (&slots)[GPUOPT_SLOTS_ALLOC],
                                                   const gpuopt_compute_t* h, const double* totals,
                                                   double (&acc)[GPUOPT_TERMS]) {
    gpuopt_group grp;
    gpuopt_load_group(grp, i, n, vector, x, g, slots);
#pragma unroll
    for (int e = 0; e < GPUOPT_VEC; ++e)
        if (i + e < n) gpuopt_terms(level, grp.x[e], grp.g[e], grp.s[e], h, totals, acc);
}

// Sums acc over the block in a fixed order (so results repeat bit for bit); thread 0
// gets the block's sums. blockDim.x must be a power of two, at most GPUOPT_MAX_THREADS.
__device__ __forceinline__ void gpuopt_block_sum(double (&acc)[GPUOPT_TERMS]) {
    __shared__ double shared[GPUOPT_TERMS][GPUOPT_MAX_THREADS];
#pragma unroll
    for (int k = 0; k < GPUOPT_TERMS; ++k) shared[k][threadIdx.x] = acc[k];
    __syncthreads();
    for (unsigned int width = blockDim.x / 2; width > 0; width /= 2) {
        if (threadIdx.x < width) {
#pragma unroll
            for (int k = 0; k < GPUOPT_TERMS; ++k) shared[k][threadIdx.x] += shared[k][threadIdx.x + width];
        }
        __syncthreads();
    }
#pragma unroll
    for (int k = 0; k < GPUOPT_TERMS; ++k) acc[k] = shared[k][0];
    __syncthreads();  // shared is reused by the caller's next sum
}

// Called by every thread of a block after its sums for `part` are in acc. Writes the block's
// partial sums; the block that finishes last among the `count` parts starting at `first`
// adds them all up in part order, stores the totals of pass `level` and resets `done`.
__device__ __forceinline__ void gpuopt_finish_parts(int level, double (&acc)[GPUOPT_TERMS], double* partials,
                                                    long long part, long long first, long long count,
                                                    unsigned int* done, double* totals) {
    __shared__ bool last;
    gpuopt_block_sum(acc);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int k = 0; k < GPUOPT_TERMS; ++k) partials[part * GPUOPT_TERMS + k] = acc[k];
        __threadfence();  // the partials are visible before this block is counted
        last = atomicAdd(done, 1u) == (unsigned int)(count - 1);
    }
    __syncthreads();
    if (last) {
        __threadfence();
        double sum[GPUOPT_TERMS];
#pragma unroll
        for (int k = 0; k < GPUOPT_TERMS; ++k) sum[k] = 0.0;
        for (long long p = threadIdx.x; p < count; p += blockDim.x) {
#pragma unroll
            for (int k = 0; k < GPUOPT_TERMS; ++k)
                sum[k] += ((volatile double*)partials)[(first + p) * GPUOPT_TERMS + k];
        }
        gpuopt_block_sum(sum);
        if (threadIdx.x == 0) {
            gpuopt_store_terms(level, totals, sum);
            *done = 0;  // ready for the next launch
        }
    }
    __syncthreads();
}
#endif
