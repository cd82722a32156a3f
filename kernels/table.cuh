// The multi-tensor table, read alike by the GPU kernels (multi_tensor.cu) and the native CPU
// driver (native.cpp): one row per non-empty tensor,
//   table[t * GPUOPT_TABLE_WIDTH + 0..3]  x, g, out (pointers) and the element count n
//   table[t * GPUOPT_TABLE_WIDTH + GPUOPT_TABLE_COLUMNS + k]  state slot k (pointer)
//   chunk_start[t]                        first chunk of tensor t; chunk_start[tensors] = chunks
// Tensors are cut into chunks of GPUOPT_CHUNK elements; a chunk finds its tensor by binary search.

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
    for (int k = 0; k < GPUOPT_SLOTS; ++k)
        r.slots[k] = reinterpret_cast<gpuopt_state_t*>(row[GPUOPT_TABLE_COLUMNS + k]);
    return r;
}

// Elements [begin, end) of tensor t that chunk c covers.
__device__ __forceinline__ void gpuopt_chunk_range(long long c, const long long* chunk_start, int t, long long n,
                                                   long long& begin, long long& end) {
    begin = (c - chunk_start[t]) * GPUOPT_CHUNK;
    end = begin + GPUOPT_CHUNK < n ? begin + GPUOPT_CHUNK : n;
}
