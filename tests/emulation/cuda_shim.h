// Just enough of CUDA to compile gpuopt's kernel text, unchanged, with g++ for the CPU.
// Blocks run one after another; a block's threads are real threads, so __syncthreads(),
// __shared__ memory and the atomics behave as on a GPU (one block at a time).
#pragma once  // (also precompiled: see device.py)
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
};
inline thread_local dim3 threadIdx{0, 0, 0};
inline dim3 blockIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};
inline std::barrier<>* gpuopt_emulated_barrier = nullptr;

inline void __syncthreads() { gpuopt_emulated_barrier->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

template <class... P, std::size_t... I>
void gpuopt_emulated_call(void (*kernel)(P...), void** argv, std::index_sequence<I...>) {
    // argv[i] points at argument i, as cuLaunchKernel's kernelParams do.
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(argv[I])...);
}

template <class... P>
void gpuopt_emulate(void (*kernel)(P...), unsigned grid, unsigned block, void** argv) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx = {b, 0, 0};
        std::barrier<> barrier(block);
        gpuopt_emulated_barrier = &barrier;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t)
            threads.emplace_back([=] {
                threadIdx = {t, 0, 0};
                gpuopt_emulated_call(kernel, argv, std::index_sequence_for<P...>{});
            });
        for (auto& thread : threads) thread.join();
    }
}
