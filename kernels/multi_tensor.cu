// Multi-tensor fused update: every tensor of one dtype group in one launch.
//
// The host builds, once per set of arrays, a table with one row per non-empty tensor:
//   table[t * GPUOPT_TABLE_WIDTH + 0..3]  x, g, out (pointers) and the element count n
//   table[t * GPUOPT_TABLE_WIDTH + 4 + k] state slot k (pointer)
//   chunk_start[t]                        first chunk of tensor t; chunk_start[tensors] = chunks
//   scalars[t * GPUOPT_SCALARS_ALLOC + j] host scalar j of tensor t, read when per_tensor is
//                                         set (step counts differ); else every tensor uses
//                                         the scalars passed by value, as the single-array kernel

//   totals[t * GPUOPT_TOTALS_ALLOC + j]   reduction result j of tensor t
// Tensors are cut into chunks of GPUOPT_CHUNK elements; blocks walk the chunks grid-stride
// and find their tensor by binary search, so one launch covers any number of tensors.

#define GPUOPT_CHUNK 65536  // a multiple of GPUOPT_VEC, so vector groups never straddle chunks
#define GPUOPT_TABLE_WIDTH (4 + GPUOPT_SLOTS)

__device__ __forceinline__ int gpuopt_tensor_of(long long chunk, const long long* chunk_start, int tensors) {
    int lo = 0, hi = tensors - 1;  // the last tensor whose first chunk is <= chunk
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
    }
    return lo;
}

struct gpuopt_tensor {
    gpuopt_param_t* x;
    const gpuopt_grad_t* g;
    gpuopt_param_t* out;
    long long n;
    gpuopt_state_t* slots[GPUOPT_SLOTS_ALLOC];
};

__device__ __forceinline__ gpuopt_tensor gpuopt_read_row(const unsigned long long* table, int t) {
    const unsigned long long* row = table + (long long)t * GPUOPT_TABLE_WIDTH;
    gpuopt_tensor r;
    r.x = reinterpret_cast<gpuopt_param_t*>(row[0]);
    r.g = reinterpret_cast<const gpuopt_grad_t*>(row[1]);
    r.out = reinterpret_cast<gpuopt_param_t*>(row[2]);
    r.n = (long long)row[3];
    r.slots[0] = nullptr;
#pragma unroll
    for (int k = 0; k < GPUOPT_SLOTS; ++k) r.slots[k] = reinterpret_cast<gpuopt_state_t*>(row[4 + k]);
    return r;
}

extern "C" __global__ void gpuopt_multi_tensor(const int tensors, const long long chunks,
                                               const unsigned long long* table, const long long* chunk_start,
                                               const int per_tensor, const gpuopt_compute_t* scalars,
                                               const double* totals GPUOPT_SCALAR_PARAMS) {
    const gpuopt_compute_t shared_h[GPUOPT_SCALARS_ALLOC] = GPUOPT_SCALAR_LIST;
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        const int t = gpuopt_tensor_of(c, chunk_start, tensors);
        const gpuopt_tensor r = gpuopt_read_row(table, t);
        const bool aligned = gpuopt_all_aligned(r.x, r.g, r.out, r.slots);
        const long long begin = (c - chunk_start[t]) * GPUOPT_CHUNK;
        const long long end = begin + GPUOPT_CHUNK < r.n ? begin + GPUOPT_CHUNK : r.n;
        gpuopt_compute_t h[GPUOPT_SCALARS_ALLOC];  // a local copy, so it can live in registers
#pragma unroll
        for (int j = 0; j < GPUOPT_SCALARS_ALLOC; ++j)
            h[j] = per_tensor ? scalars[(long long)t * GPUOPT_SCALARS_ALLOC + j] : shared_h[j];
        const double* tot = totals + (long long)t * GPUOPT_TOTALS_ALLOC;
        for (long long i = begin + (long long)threadIdx.x * GPUOPT_VEC; i < end;
             i += (long long)blockDim.x * GPUOPT_VEC)
            gpuopt_update_group(i, end, aligned && i + GPUOPT_VEC <= end, r.x, r.g, r.out, r.slots, h, tot);
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
        const int t = gpuopt_tensor_of(c, chunk_start, tensors);
        const gpuopt_tensor r = gpuopt_read_row(table, t);
        const bool aligned = gpuopt_all_aligned(r.x, r.g, r.x, r.slots);
        const long long begin = (c - chunk_start[t]) * GPUOPT_CHUNK;
        const long long end = begin + GPUOPT_CHUNK < r.n ? begin + GPUOPT_CHUNK : r.n;
        gpuopt_compute_t h[GPUOPT_SCALARS_ALLOC];  // a local copy, so it can live in registers
#pragma unroll
        for (int j = 0; j < GPUOPT_SCALARS_ALLOC; ++j)
            h[j] = per_tensor ? scalars[(long long)t * GPUOPT_SCALARS_ALLOC + j] : shared_h[j];
        double* tot = totals + (long long)t * GPUOPT_TOTALS_ALLOC;
        double acc[GPUOPT_TERMS];
#pragma unroll
        for (int k = 0; k < GPUOPT_TERMS; ++k) acc[k] = 0.0;
        for (long long i = begin + (long long)threadIdx.x * GPUOPT_VEC; i < end;
             i += (long long)blockDim.x * GPUOPT_VEC)
            gpuopt_terms_group(level, i, end, aligned && i + GPUOPT_VEC <= end, r.x, r.g, r.slots, h, tot, acc);
        gpuopt_finish_parts(level, acc, partials, c, chunk_start[t], chunk_start[t + 1] - chunk_start[t], done + t, tot);
    }
}
#endif
