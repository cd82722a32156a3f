// Multi-tensor fused update: every tensor of one dtype group in one launch.
//
// The host builds, once per set of arrays, the table of table.cuh, and:
//   scalars[t * GPUOPT_SCALARS_ALLOC + j] host scalar j of tensor t, read when per_tensor is
//                                         set (step counts differ); else every tensor uses
//                                         the scalars passed by value, as the single-array kernel
//   totals[t * GPUOPT_TOTALS_ALLOC + j]   reduction result j of tensor t
// Blocks walk the chunks grid-stride, so one launch covers any number of tensors.

// What a block needs to work on chunk c: its tensor, its element range and its host scalars.
struct gpuopt_chunk {
    int t;
    gpuopt_tensor r;
    long long begin, end;
    bool aligned;
    gpuopt_compute_t h[GPUOPT_SCALARS_ALLOC];  // a local copy, so it can live in registers
};

__device__ __forceinline__ void gpuopt_open_chunk(gpuopt_chunk& k, long long c, int tensors,
                                                  const unsigned long long* table, const long long* chunk_start,
                                                  int per_tensor, const gpuopt_compute_t* scalars,
                                                  const gpuopt_compute_t (&shared_h)[GPUOPT_SCALARS_ALLOC]) {
    k.t = gpuopt_tensor_of(c, chunk_start, tensors);
    k.r = gpuopt_read_row(table, k.t);
    k.aligned = gpuopt_all_aligned(k.r.x, k.r.g, k.r.out, k.r.slots);
    gpuopt_chunk_range(c, chunk_start, k.t, k.r.n, k.begin, k.end);
#pragma unroll
    for (int j = 0; j < GPUOPT_SCALARS_ALLOC; ++j)
        k.h[j] = per_tensor ? scalars[(long long)k.t * GPUOPT_SCALARS_ALLOC + j] : shared_h[j];
}

extern "C" __global__ void gpuopt_multi_tensor(const int tensors, const long long chunks,
                                               const unsigned long long* table, const long long* chunk_start,
                                               const int per_tensor, const gpuopt_compute_t* scalars,
                                               const double* totals GPUOPT_SCALAR_PARAMS) {
    const gpuopt_compute_t shared_h[GPUOPT_SCALARS_ALLOC] = GPUOPT_SCALAR_LIST;
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        gpuopt_chunk k;
        gpuopt_open_chunk(k, c, tensors, table, chunk_start, per_tensor, scalars, shared_h);
        const double* tot = totals + (long long)k.t * GPUOPT_TOTALS_ALLOC;
        for (long long i = k.begin + (long long)threadIdx.x * GPUOPT_VEC; i < k.end;
             i += (long long)blockDim.x * GPUOPT_VEC)
            gpuopt_update_group(i, k.end, k.aligned && i + GPUOPT_VEC <= k.end, k.r.x, k.r.g, k.r.out, k.r.slots,
                                k.h, tot);
    }
}

#ifdef GPUOPT_HAS_TERMS
// Segmented reduction: each chunk's sums go to partials[chunk]; the last chunk of a tensor
// to finish adds that tensor's partials in order. `done` holds one zeroed counter per tensor.
extern "C" __global__ void gpuopt_multi_reduce(const int level, const int tensors, const long long chunks,
                                               const unsigned long long* table, const long long* chunk_start,
                                               const int per_tensor, const gpuopt_compute_t* scalars,
                                               double* totals, double* partials, unsigned int* done
                                               GPUOPT_SCALAR_PARAMS) {
    const gpuopt_compute_t shared_h[GPUOPT_SCALARS_ALLOC] = GPUOPT_SCALAR_LIST;
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        gpuopt_chunk k;
        gpuopt_open_chunk(k, c, tensors, table, chunk_start, per_tensor, scalars, shared_h);
        double* tot = totals + (long long)k.t * GPUOPT_TOTALS_ALLOC;
        double acc[GPUOPT_TERMS];
#pragma unroll
        for (int j = 0; j < GPUOPT_TERMS; ++j) acc[j] = 0.0;
        for (long long i = k.begin + (long long)threadIdx.x * GPUOPT_VEC; i < k.end;
             i += (long long)blockDim.x * GPUOPT_VEC)
            gpuopt_terms_group(level, i, k.end, k.aligned && i + GPUOPT_VEC <= k.end, k.r.x, k.r.g, k.r.slots, k.h,
                               tot, acc);
        const long long first = chunk_start[k.t];
        gpuopt_finish_parts(level, acc, partials, c, first, chunk_start[k.t + 1] - first, done + k.t, tot);
    }
}
#endif
