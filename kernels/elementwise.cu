// Single-array fused update: every element once, grid-stride over groups of GPUOPT_VEC.
// Arguments: element count, x, g, out (used when applying), the reduction results of
// this step, one pointer per state slot, then the host scalars by value.

extern "C" __global__ void gpuopt_elementwise(const long long n, gpuopt_param_t* x, const gpuopt_grad_t* g,
                                              gpuopt_param_t* out, const double* totals
                                              GPUOPT_SLOT_PARAMS GPUOPT_SCALAR_PARAMS) {
    gpuopt_state_t* const slots[GPUOPT_SLOTS_ALLOC] = GPUOPT_SLOT_LIST;
    const gpuopt_compute_t h[GPUOPT_SCALARS_ALLOC] = GPUOPT_SCALAR_LIST;
    const bool aligned = gpuopt_all_aligned(x, g, out, slots);
    const long long groups = (n + GPUOPT_VEC - 1) / GPUOPT_VEC;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long grp = (long long)blockIdx.x * blockDim.x + threadIdx.x; grp < groups; grp += stride) {
        const long long i = grp * GPUOPT_VEC;
        gpuopt_update_group(i, n, aligned && i + GPUOPT_VEC <= n, x, g, out, slots, h, totals);
    }
}
