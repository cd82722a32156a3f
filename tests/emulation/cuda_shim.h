// Just enough of CUDA to compile gpuopt's kernel text, unchanged, with g++ for the CPU, and to
// catch there what a GPU would not forgive.
//
// - Blocks run concurrently on several host threads (workers), taking block indices as they
//   free up, so cross-block code (the last-block reduction's counter, fences, reset) meets
//   real concurrency and an unpredictable finishing order.
// - A block's threads are fibers on its worker, switched at __syncthreads() in an order that
//   changes every phase, so a missing barrier shows as a wrong value. Threads of one block
//   reaching different numbers of barriers is reported. __shared__ is per worker, so per block.
// - Misaligned accesses (a 16-byte vector load from an address that is not 16-byte aligned)
//   are caught by compiling with -fsanitize=alignment: the handler below records them and the
//   launch fails naming the kernel (a GPU faults). The sanitizer build (GPUOPT_SANITIZE, with
//   -fsanitize=address,undefined) uses the real runtime instead, which also catches any read
//   or write outside an allocation.
// - CUDA's atomics order nothing: an atomicAdd must follow a __threadfence() made by the same
//   thread since its last atomic, or the launch fails (the last-block pattern depends on it).
#pragma once  // (also precompiled: see device.py)
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local  // one worker runs one block at a time

struct dim3 {
    unsigned x, y, z;
};
inline thread_local dim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};

// -- errors: the first one of a launch is kept and returned to the host ----------------------
struct gpuopt_emulated_launch {
    std::mutex lock;
    std::string error;  // written once, under the lock; read by the host after the launch
    std::atomic<bool> failed{false};
    void fail(const std::string& message) {
        std::lock_guard<std::mutex> guard(lock);
        if (error.empty()) error = message;
        failed = true;
    }
};
inline thread_local gpuopt_emulated_launch* gpuopt_current_launch = nullptr;

// -- fibers: the threads of one block ---------------------------------------------------------
struct gpuopt_fiber {
    ucontext_t context;
    unsigned barriers = 0;  // __syncthreads() reached so far
    bool done = false;
    bool fenced = false;  // a __threadfence() since this thread's last atomic
};

// Fiber stacks: mapped once (pages are committed only where touched) and reused by later
// workers, so a launch costs no zero-filling of hundreds of stacks.
struct gpuopt_stack_pool {
    static constexpr std::size_t stack_bytes = 256 * 1024;
    std::mutex lock;
    std::vector<std::pair<char*, std::size_t>> free;  // (base, stacks)
    std::pair<char*, std::size_t> take(std::size_t stacks) {
        std::lock_guard<std::mutex> guard(lock);
        for (auto it = free.begin(); it != free.end(); ++it)
            if (it->second >= stacks) {
                auto found = *it;
                free.erase(it);
                return found;
            }
        void* base = mmap(nullptr, stacks * stack_bytes, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        return {static_cast<char*>(base), stacks};
    }
    void give(std::pair<char*, std::size_t> stacks) {
        std::lock_guard<std::mutex> guard(lock);
        free.push_back(stacks);
    }
};
inline gpuopt_stack_pool gpuopt_stacks;

struct gpuopt_worker {
    static constexpr std::size_t stack_bytes = gpuopt_stack_pool::stack_bytes;
    ucontext_t scheduler;
    std::vector<gpuopt_fiber> fibers;
    std::pair<char*, std::size_t> stacks{nullptr, 0};
    gpuopt_fiber* current = nullptr;
    void (*body)(void*) = nullptr;
    void* argument = nullptr;
#if defined(__SANITIZE_ADDRESS__)
    const void* worker_stack = nullptr;
    std::size_t worker_stack_size = 0;
#endif
};
inline thread_local gpuopt_worker* gpuopt_current_worker = nullptr;

// Switches from one context to another (with ASan told which stack is next; a fiber that has
// finished passes `dying`, so ASan drops its fake stack).
inline void gpuopt_switch(ucontext_t* from, ucontext_t* to, const void* stack, std::size_t size, bool dying = false) {
#if defined(__SANITIZE_ADDRESS__)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(dying ? nullptr : &fake, stack, size);
    swapcontext(from, to);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    (void)stack, (void)size, (void)dying;
    swapcontext(from, to);
#endif
}

inline void gpuopt_yield_to_scheduler(bool dying = false) {
    gpuopt_worker* w = gpuopt_current_worker;
#if defined(__SANITIZE_ADDRESS__)
    gpuopt_switch(&w->current->context, &w->scheduler, w->worker_stack, w->worker_stack_size, dying);
#else
    gpuopt_switch(&w->current->context, &w->scheduler, nullptr, 0, dying);
#endif
}

inline void gpuopt_fiber_main() {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);  // the switch into a new fiber ends here
#endif
    gpuopt_worker* w = gpuopt_current_worker;
    w->body(w->argument);
    w->current->done = true;
    gpuopt_yield_to_scheduler(true);  // never resumed
}

inline void __syncthreads() {
    gpuopt_current_worker->current->barriers += 1;
    gpuopt_yield_to_scheduler();
}
inline void __threadfence() {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    gpuopt_current_worker->current->fenced = true;
}
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    gpuopt_fiber* f = gpuopt_current_worker->current;
    if (!f->fenced)
        gpuopt_current_launch->fail("atomicAdd without a __threadfence() before it in the same thread "
                                    "(CUDA atomics do not order the writes made before them)");
    f->fenced = false;
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

// Runs one block: every thread as a fiber, phase by phase (a phase ends at a barrier).
inline void gpuopt_run_block(gpuopt_worker& w, unsigned threads, void (*body)(void*), void* argument) {
    w.fibers.assign(threads, gpuopt_fiber{});
    if (w.stacks.second < threads) {
        if (w.stacks.first != nullptr) gpuopt_stacks.give(w.stacks);
        w.stacks = gpuopt_stacks.take(threads);
    }
    w.body = body;
    w.argument = argument;
    for (unsigned t = 0; t < threads; ++t) {
        gpuopt_fiber& f = w.fibers[t];
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = w.stacks.first + t * gpuopt_worker::stack_bytes;
        f.context.uc_stack.ss_size = gpuopt_worker::stack_bytes;
        f.context.uc_link = nullptr;
        makecontext(&f.context, gpuopt_fiber_main, 0);
    }
    std::vector<unsigned> order(threads);
    for (unsigned phase = 0;; ++phase) {
        // Forward, backward, then odd threads before even ones: whichever thread a missing
        // barrier relies on having run first, some phase runs it after the others.
        for (unsigned i = 0; i < threads; ++i) order[i] = i;
        if (phase % 3 == 1) std::reverse(order.begin(), order.end());
        if (phase % 3 == 2)
            std::stable_partition(order.begin(), order.end(), [](unsigned t) { return t % 2 == 1; });
        bool any = false;
        for (unsigned t : order) {
            gpuopt_fiber& f = w.fibers[t];
            if (f.done) continue;
            any = true;
            w.current = &f;
            threadIdx = {t, 0, 0};
            gpuopt_switch(&w.scheduler, &f.context, f.context.uc_stack.ss_sp, f.context.uc_stack.ss_size);
        }
        if (!any) break;
        if (gpuopt_current_launch->failed) {  // a thread faulted: the launch has failed
            for (gpuopt_fiber& f : w.fibers) f.done = true;
            break;
        }
        unsigned lo = ~0u, hi = 0;
        bool waiting = false;
        for (const gpuopt_fiber& f : w.fibers)
            if (!f.done) lo = std::min(lo, f.barriers), hi = std::max(hi, f.barriers), waiting = true;
        if (waiting && lo != hi) {
            gpuopt_current_launch->fail("threads of one block reached different numbers of __syncthreads()");
            for (gpuopt_fiber& f : w.fibers) f.done = true;  // abandon the block
            break;
        }
    }
    for (const gpuopt_fiber& f : w.fibers)
        if (!gpuopt_current_launch->failed && f.barriers != w.fibers[0].barriers) {
            gpuopt_current_launch->fail("threads of one block reached different numbers of __syncthreads()");
            break;
        }
    w.current = nullptr;
}

template <class... P, std::size_t... I>
void gpuopt_emulated_call(void (*kernel)(P...), void** argv, std::index_sequence<I...>) {
    // argv[i] points at argument i, as cuLaunchKernel's kernelParams do.
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(argv[I])...);
}

// Launches `kernel` on a grid of `grid` blocks of `block` threads, with `workers` host threads
// running blocks at once. Returns 0, or 1 with the first error in `error`.
template <class... P>
int gpuopt_emulate(void (*kernel)(P...), unsigned grid, unsigned block, unsigned workers, void** argv,
                   char* error, std::size_t error_size) {
    gpuopt_emulated_launch launch;
    std::atomic<unsigned> next{0};
    struct call {
        void (*kernel)(P...);
        void** argv;
    } target{kernel, argv};
    auto body = [](void* argument) {
        auto* c = static_cast<call*>(argument);
        gpuopt_emulated_call(c->kernel, c->argv, std::index_sequence_for<P...>{});
    };
    auto work = [&] {
        gpuopt_worker w;
        gpuopt_current_worker = &w;
        gpuopt_current_launch = &launch;
#if defined(__SANITIZE_ADDRESS__)
        pthread_attr_t attributes;
        pthread_getattr_np(pthread_self(), &attributes);
        void* base;
        pthread_attr_getstack(&attributes, &base, &w.worker_stack_size);
        w.worker_stack = base;
        pthread_attr_destroy(&attributes);
#endif
        gridDim = {grid, 1, 1};
        blockDim = {block, 1, 1};
        for (unsigned b = next++; b < grid && !launch.failed; b = next++) {
            blockIdx = {b, 0, 0};
            gpuopt_run_block(w, block, body, &target);
        }
        if (w.stacks.first != nullptr) gpuopt_stacks.give(w.stacks);
        gpuopt_current_worker = nullptr;
        gpuopt_current_launch = nullptr;
    };
    std::vector<std::thread> pool;
    for (unsigned k = 0; k < std::max(1u, std::min(workers, grid)); ++k) pool.emplace_back(work);
    for (auto& thread : pool) thread.join();
    if (!launch.failed) return 0;
    std::snprintf(error, error_size, "%s", launch.error.c_str());
    return 1;
}

#if !defined(GPUOPT_SANITIZE)
// The handler -fsanitize=alignment calls (GCC's and Clang's UBSan ABI); without the sanitizer
// runtime linked in, this one records the fault for the launch instead of aborting Python.
struct gpuopt_source_location {
    const char* file;
    std::uint32_t line, column;
};
struct gpuopt_type_mismatch {
    gpuopt_source_location location;
    const void* type;
    unsigned char log_alignment;
    unsigned char check_kind;
};
extern "C" __attribute__((no_sanitize_undefined)) void __ubsan_handle_type_mismatch_v1(gpuopt_type_mismatch* data,
                                                                                        std::uintptr_t pointer) {
    char message[256];
    const unsigned long alignment = 1ul << data->log_alignment;
    if (pointer == 0)
        std::snprintf(message, sizeof message, "null pointer access at %s:%u", data->location.file,
                      data->location.line);
    else
        std::snprintf(message, sizeof message, "misaligned access: address 0x%lx is not %lu-byte aligned, at %s:%u",
                      (unsigned long)pointer, alignment, data->location.file, data->location.line);
    if (gpuopt_current_launch != nullptr) gpuopt_current_launch->fail(message);
    // The access itself may fault on the CPU too (an aligned SSE/AVX move): like a faulting GPU
    // thread, this thread stops here, and its block is abandoned (see gpuopt_run_block).
    gpuopt_worker* w = gpuopt_current_worker;
    if (w != nullptr && w->current != nullptr) {
        w->current->done = true;
        gpuopt_yield_to_scheduler(true);
    }
}
extern "C" void __ubsan_handle_type_mismatch_v1_abort(gpuopt_type_mismatch* data, std::uintptr_t pointer) {
    __ubsan_handle_type_mismatch_v1(data, pointer);
}
#endif
