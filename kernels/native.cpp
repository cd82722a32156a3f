// gpuopt native CPU driver: the printed step of one rule or chain over NumPy arrays.
//
// Before this file: kernels/native_prelude.h, then the generated part of the CUDA module
// (types, GPUOPT_* sizes, gpuopt_step() and gpuopt_terms()). The entry points do what the
// CUDA kernels of the same names do (elementwise.cu, multi_tensor.cu) and read the same
// arguments, passed as one array of 8-byte words (integers, arrays, and host scalars as
// doubles), after the number of threads to use and how arrays are given: where `objects` is
// not negative, an array's word is the address of its NumPy object and its data pointer is
// read `objects` bytes into it (the field after the object header: asking NumPy for the
// pointer from Python costs more than an update of a thousand elements); else the word is
// the data pointer. They keep nothing between calls, so any number of threads may call them
// at once (and a forked child may too); each returns 0, or 1 when memory ran out.
//
// Threads: work is cut into chunks that the calling thread and up to `threads - 1` helper
// threads, started for the call, claim one at a time. The caller waits only for chunks a
// helper has claimed, never for a helper to start: on a busy machine a helper that gets no
// CPU in time finds nothing left to do, and the call costs what one thread costs (a
// fork-join team, as OpenMP's, would wait for it).
//
// Results equal the NumPy executor's bit for bit: the same operations in the same precision
// (built without fast-math and without FMA contraction), and each reduction summed in its
// order: per chunk of GPUOPT_CHUNK elements (= numpy_backend.BLOCK) NumPy's pairwise sum of the
// terms as doubles, then the chunks one after another, starting from 0.0.
//
// Vectorisation (GCC 12, -fopt-info-vec, checked once on an AVX-512 EPYC): the update loop of
// gpuopt_update_range and the terms loop of gpuopt_pairwise are vectorised with 64-byte
// vectors for float32 and float64 (fmax/fmin too: see native_prelude.h); float16 loops are not (GCC 12 has no vector type for
// _Float16 without AVX512-FP16), so float16 converts one element at a time.

#include <pthread.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

typedef unsigned long long gpuopt_word;

// Less memory traffic per thread than this: fewer threads. Starting a helper costs ~20 us, and
// two threads moved memory ~1.5x as fast as one. Measured on the 2-core EPYC VM, one array,
// float32, one thread against two (interleaved; quiet / lightly loaded): ADAM 2^19 (15 MB)
// 0.75x / 0.92x, ADAM 2^18 (7 MB) 0.97x / 1.04x, Momentum 2^19 (10 MB) 1.04x lightly
// loaded, Descent 2^20 (13 MB) 0.91x / 1.16x. (A busy machine, where another job holds
// the second core, made two threads slower at every size.)
#define GPUOPT_THREAD_MIN_BYTES (6LL << 20)

// Bytes one update moves for `elements` elements: the parameter read and written, the
// gradient read, each state slot read and written.
static inline long long gpuopt_traffic(const long long elements) {
    return elements * (long long)(2 * sizeof(gpuopt_param_t) + sizeof(gpuopt_grad_t) +
                                  2 * GPUOPT_SLOTS * sizeof(gpuopt_state_t));
}

static inline gpuopt_word gpuopt_array_word(const gpuopt_word w, const long long objects) {
    return objects < 0 ? w : *reinterpret_cast<const gpuopt_word*>(w + objects);
}

static inline gpuopt_compute_t gpuopt_scalar_word(const gpuopt_word w) {
    double value;
    __builtin_memcpy(&value, &w, sizeof value);
    return gpuopt_compute_t(value);
}

// The host scalars of tensor t: its own row when step counts differ, else the shared ones.
static inline void gpuopt_scalars_of(const int t, const int per_tensor, const gpuopt_compute_t* scalars,
                                     const gpuopt_compute_t (&shared)[GPUOPT_SCALARS_ALLOC],
                                     gpuopt_compute_t (&h)[GPUOPT_SCALARS_ALLOC]) {
    for (int j = 0; j < GPUOPT_SCALARS_ALLOC; ++j)
        h[j] = per_tensor ? scalars[(long long)t * GPUOPT_SCALARS_ALLOC + j] : shared[j];
}

// Elements [begin, end) of one tensor: x -= d (or out = d), state written back. Iterations
// are independent (a parameter may be its own gradient: x[i] is read before it is written).
__attribute__((noinline)) static void gpuopt_update_range(const gpuopt_tensor& r, const long long begin, const long long end,
                                const gpuopt_compute_t (&h_in)[GPUOPT_SCALARS_ALLOC], const double* totals_in) {
    gpuopt_param_t* const x = r.x;
    const gpuopt_grad_t* const g = r.g;
    gpuopt_param_t* const dst = GPUOPT_APPLY ? r.out : r.x;
    gpuopt_state_t* slots[GPUOPT_SLOTS_ALLOC];
    for (int k = 0; k < GPUOPT_SLOTS_ALLOC; ++k) slots[k] = r.slots[k];
    gpuopt_compute_t h[GPUOPT_SCALARS_ALLOC];  // local copies: no store in the loop can change them
    for (int j = 0; j < GPUOPT_SCALARS_ALLOC; ++j) h[j] = h_in[j];
    double totals[GPUOPT_TOTALS_ALLOC];
    for (int j = 0; j < GPUOPT_TOTALS_ALLOC; ++j) totals[j] = totals_in[j];
#pragma omp simd
    for (long long i = begin; i < end; ++i) {
        gpuopt_compute_t s[GPUOPT_SLOTS_ALLOC];
        for (int k = 0; k < GPUOPT_SLOTS; ++k) s[k] = slots[k][i];
        const gpuopt_compute_t xi = gpuopt_from_param(x[i]);
        const gpuopt_compute_t d = gpuopt_step(xi, gpuopt_from_grad(g[i]), s, h, totals);
        for (int k = 0; k < GPUOPT_SLOTS; ++k) slots[k][i] = s[k];
        dst[i] = gpuopt_to_param(GPUOPT_APPLY ? d : gpuopt_new_param(xi, d, s));  // x - d, or the master copy
    }
}

// How many threads for `bytes` of traffic: at most `threads`, each with GPUOPT_THREAD_MIN_BYTES or more.
static inline int gpuopt_team(const int threads, const long long bytes) {
    const long long most = bytes / GPUOPT_THREAD_MIN_BYTES;
    return (int)(most < 1 ? 1 : (most < threads ? most : threads));
}

// One call's chunks, shared by its caller and helpers. It lives on the heap until the last of
// them lets go: a helper may start after the caller has returned (and then does nothing).
struct gpuopt_job {
    void (*run)(const void* context, long long chunk);
    const void* context;  // the caller's: read only by whoever claimed a chunk, before it is finished
    long long total, next, finished;
    int holders;
};

static void gpuopt_claim_chunks(gpuopt_job* job) {
    for (;;) {
        const long long c = __atomic_fetch_add(&job->next, 1, __ATOMIC_ACQ_REL);
        if (c >= job->total) return;
        job->run(job->context, c);
        __atomic_fetch_add(&job->finished, 1, __ATOMIC_RELEASE);
    }
}

static void gpuopt_let_go(gpuopt_job* job) {
    if (__atomic_sub_fetch(&job->holders, 1, __ATOMIC_ACQ_REL) == 0) __builtin_free(job);
}

static void* gpuopt_helper(void* job) {
    gpuopt_claim_chunks(static_cast<gpuopt_job*>(job));
    gpuopt_let_go(static_cast<gpuopt_job*>(job));
    return nullptr;
}

// run(context, c) for every chunk c < total, on `team` threads at most (the caller among them).
static void gpuopt_run_chunks(const int team, const long long total, void (*run)(const void*, long long),
                              const void* context) {
    gpuopt_job* job = team > 1 && total > 1 ? static_cast<gpuopt_job*>(__builtin_malloc(sizeof(gpuopt_job))) : nullptr;
    if (!job) {  // one thread (or no memory for the job): the caller does it all
        for (long long c = 0; c < total; ++c) run(context, c);
        return;
    }
    job->run = run;
    job->context = context;
    job->total = total;
    job->next = job->finished = 0;
    const int helpers = (long long)(team - 1) < total - 1 ? team - 1 : (int)(total - 1);
    job->holders = 1 + helpers;
    pthread_attr_t detached;
    pthread_attr_init(&detached);
    pthread_attr_setdetachstate(&detached, PTHREAD_CREATE_DETACHED);
    for (int k = 0; k < helpers; ++k) {
        pthread_t thread;
        if (pthread_create(&thread, &detached, gpuopt_helper, job) != 0) gpuopt_let_go(job);
    }
    pthread_attr_destroy(&detached);
    gpuopt_claim_chunks(job);
    while (__atomic_load_n(&job->finished, __ATOMIC_ACQUIRE) < total) sched_yield();  // claimed, being run
    gpuopt_let_go(job);
}

#define GPUOPT_ARRAY(type, i) reinterpret_cast<type>(gpuopt_array_word(a[i], objects))

extern "C" int gpuopt_elementwise(const int threads, const long long objects, const gpuopt_word* a) {
    gpuopt_tensor r;
    const long long n = (long long)a[0];
    r.x = GPUOPT_ARRAY(gpuopt_param_t*, 1);
    r.g = GPUOPT_ARRAY(const gpuopt_grad_t*, 2);
    r.out = GPUOPT_ARRAY(gpuopt_param_t*, 3);
    r.n = n;
    const double* totals = GPUOPT_ARRAY(const double*, 4);
    r.slots[0] = nullptr;
    for (int k = 0; k < GPUOPT_SLOTS; ++k) r.slots[k] = GPUOPT_ARRAY(gpuopt_state_t*, 5 + k);
    gpuopt_compute_t h[GPUOPT_SCALARS_ALLOC] = {};
    for (int j = 0; j < GPUOPT_SCALARS; ++j) h[j] = gpuopt_scalar_word(a[5 + GPUOPT_SLOTS + j]);
    const int team = gpuopt_team(threads, gpuopt_traffic(n));
    if (team == 1) {
        gpuopt_update_range(r, 0, n, h, totals);
        return 0;
    }
    struct context_t {
        const gpuopt_tensor* r;
        const gpuopt_compute_t (*h)[GPUOPT_SCALARS_ALLOC];
        const double* totals;
    } context = {&r, &h, totals};
    gpuopt_run_chunks(team, (n + GPUOPT_CHUNK - 1) / GPUOPT_CHUNK, [](const void* p, long long c) {
        const context_t& k = *static_cast<const context_t*>(p);
        const long long end = (c + 1) * GPUOPT_CHUNK < k.r->n ? (c + 1) * GPUOPT_CHUNK : k.r->n;
        gpuopt_update_range(*k.r, c * GPUOPT_CHUNK, end, *k.h, k.totals);
    }, &context);
    return 0;
}

static inline long long gpuopt_table_elements(const gpuopt_word* table, const int tensors) {
    long long total = 0;
    for (int t = 0; t < tensors; ++t) total += (long long)table[(long long)t * GPUOPT_TABLE_WIDTH + 3];
    return total;
}

// The table arguments common to the multi-tensor entry points, and one chunk opened from them.
struct gpuopt_table_args {
    int tensors, per_tensor;
    const gpuopt_word* table;
    const long long* chunk_start;
    const gpuopt_compute_t* scalars;
    gpuopt_compute_t shared[GPUOPT_SCALARS_ALLOC];  // the scalars passed by value
    const double* totals;
};

struct gpuopt_native_chunk {
    int t;
    gpuopt_tensor r;
    gpuopt_compute_t h[GPUOPT_SCALARS_ALLOC];
    long long begin, end;
    const double* totals;  // this tensor's reduction results
};

static inline gpuopt_native_chunk gpuopt_open_chunk(const gpuopt_table_args& k, const long long c) {
    gpuopt_native_chunk ch;
    ch.t = gpuopt_tensor_of(c, k.chunk_start, k.tensors);
    ch.r = gpuopt_read_row(k.table, ch.t);
    gpuopt_scalars_of(ch.t, k.per_tensor, k.scalars, k.shared, ch.h);
    gpuopt_chunk_range(c, k.chunk_start, ch.t, ch.r.n, ch.begin, ch.end);
    ch.totals = k.totals + (long long)ch.t * GPUOPT_TOTALS_ALLOC;
    return ch;
}

extern "C" int gpuopt_multi_tensor(const int threads, const long long objects, const gpuopt_word* a) {
    const long long chunks = (long long)a[1];
    gpuopt_table_args args = {(int)a[0], (int)a[4], GPUOPT_ARRAY(const gpuopt_word*, 2),
                              GPUOPT_ARRAY(const long long*, 3), GPUOPT_ARRAY(const gpuopt_compute_t*, 5), {},
                              GPUOPT_ARRAY(const double*, 6)};
    for (int j = 0; j < GPUOPT_SCALARS; ++j) args.shared[j] = gpuopt_scalar_word(a[7 + j]);
    const int team = chunks > 1 ? gpuopt_team(threads, gpuopt_traffic(gpuopt_table_elements(args.table, args.tensors))) : 1;
    gpuopt_run_chunks(team, chunks, [](const void* p, long long c) {
        const gpuopt_native_chunk ch = gpuopt_open_chunk(*static_cast<const gpuopt_table_args*>(p), c);
        gpuopt_update_range(ch.r, ch.begin, ch.end, ch.h, ch.totals);
    }, &args);
    return 0;
}

#ifdef GPUOPT_HAS_TERMS
#define GPUOPT_PAIRWISE_LEAF 128  // NumPy's PW_BLOCKSIZE

// Elements [begin, begin + n) of one tensor: the sums of pass `level`'s terms, each added
// up as NumPy's pairwise summation adds up an array of doubles.
static void gpuopt_pairwise(const int level, const gpuopt_tensor& r, const long long begin, const long long n,
                            const gpuopt_compute_t (&h)[GPUOPT_SCALARS_ALLOC], const double* totals,
                            double (&sum)[GPUOPT_TERMS]) {
    if (n > GPUOPT_PAIRWISE_LEAF) {
        long long half = n / 2;
        half -= half % 8;
        double right[GPUOPT_TERMS];
        gpuopt_pairwise(level, r, begin, half, h, totals, sum);
        gpuopt_pairwise(level, r, begin + half, n - half, h, totals, right);
        for (int k = 0; k < GPUOPT_TERMS; ++k) sum[k] += right[k];
        return;
    }
    double terms[GPUOPT_TERMS][GPUOPT_PAIRWISE_LEAF];
#pragma omp simd
    for (long long e = 0; e < n; ++e) {
        const long long i = begin + e;
        gpuopt_compute_t s[GPUOPT_SLOTS_ALLOC];
        for (int k = 0; k < GPUOPT_SLOTS; ++k) s[k] = r.slots[k][i];
        double one[GPUOPT_TERMS];
        for (int k = 0; k < GPUOPT_TERMS; ++k) one[k] = 0.0;
        gpuopt_terms(level, gpuopt_from_param(r.x[i]), gpuopt_from_grad(r.g[i]), s, h, totals, one);
        for (int k = 0; k < GPUOPT_TERMS; ++k) terms[k][e] = one[k];
    }
    for (int k = 0; k < GPUOPT_TERMS; ++k) {
        const double* v = terms[k];
        double res = 0.0;
        long long i = 0;
        if (n >= 8) {
            double p[8];
            for (int j = 0; j < 8; ++j) p[j] = v[j];
            for (i = 8; i < n - (n % 8); i += 8)
                for (int j = 0; j < 8; ++j) p[j] += v[i + j];
            res = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
        }
        for (; i < n; ++i) res += v[i];
        sum[k] = res;
    }
}

extern "C" int gpuopt_multi_reduce(const int threads, const long long objects, const gpuopt_word* a) {
    const int level = (int)a[0];
    const int tensors = (int)a[1];
    const long long chunks = (long long)a[2];
    const long long* chunk_start = GPUOPT_ARRAY(const long long*, 4);
    double* totals = GPUOPT_ARRAY(double*, 7);  // (a[8], a[9]: the GPU's partial sums, unused)
    double* partial = static_cast<double*>(__builtin_malloc(sizeof(double) * GPUOPT_TERMS * (__SIZE_TYPE__)(chunks > 0 ? chunks : 1)));
    if (!partial) return 1;
    struct context_t {
        gpuopt_table_args args;
        int level;
        double* partial;
    } context = {{tensors, (int)a[5], GPUOPT_ARRAY(const gpuopt_word*, 3), chunk_start,
                  GPUOPT_ARRAY(const gpuopt_compute_t*, 6), {}, totals}, level, partial};
    for (int j = 0; j < GPUOPT_SCALARS; ++j) context.args.shared[j] = gpuopt_scalar_word(a[10 + j]);
    const int team = chunks > 1 ? gpuopt_team(threads, gpuopt_traffic(gpuopt_table_elements(context.args.table, tensors))) : 1;
    gpuopt_run_chunks(team, chunks, [](const void* p, long long c) {
        const context_t& k = *static_cast<const context_t*>(p);
        const gpuopt_native_chunk ch = gpuopt_open_chunk(k.args, c);
        double sum[GPUOPT_TERMS];
        gpuopt_pairwise(k.level, ch.r, ch.begin, ch.end - ch.begin, ch.h, ch.totals, sum);
        for (int j = 0; j < GPUOPT_TERMS; ++j) k.partial[c * GPUOPT_TERMS + j] = sum[j];
    }, &context);
    for (int t = 0; t < tensors; ++t) {  // each tensor's chunks in order, from 0.0
        double sum[GPUOPT_TERMS];
        for (int k = 0; k < GPUOPT_TERMS; ++k) sum[k] = 0.0;
        for (long long c = chunk_start[t]; c < chunk_start[t + 1]; ++c)
            for (int k = 0; k < GPUOPT_TERMS; ++k) sum[k] += partial[c * GPUOPT_TERMS + k];
        gpuopt_store_terms(level, totals + (long long)t * GPUOPT_TOTALS_ALLOC, sum);
    }
    __builtin_free(partial);
    return 0;
}
#endif

// Bytes [begin, end) of a copy. On x86-64 the stores bypass the cache (non-temporal): a
// plain store first reads each destination line (write-allocate), so a copy of N bytes moves
// 3N while the benchmark counts 2N, and its "copy bandwidth" came out at about 2/3 of the rate
// the updates reach (which read every line they write, and so pay no such extra read). Four
// runs of each piece are copied at once: one stream per thread stayed below the bandwidth that
// the updates' several streams reach (measured: 50 -> 58 GB/s on the 2-core EPYC VM).
static void gpuopt_copy_range(char* dst, const char* src, long long begin, const long long end) {
#if defined(__SSE2__)
    while (begin < end && ((unsigned long long)(dst + begin) & 15)) {  // to a 16-byte boundary of dst
        dst[begin] = src[begin];
        ++begin;
    }
    const long long quarter = ((end - begin) / 4) & ~15LL;
    for (long long i = 0; i < quarter; i += 16)
        for (int q = 0; q < 4; ++q)
            _mm_stream_si128(reinterpret_cast<__m128i*>(dst + begin + q * quarter + i),
                             _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + begin + q * quarter + i)));
    begin += 4 * quarter;
    for (; begin + 16 <= end; begin += 16)
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + begin), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + begin)));
    _mm_sfence();  // (the streamed stores are visible before the chunk counts as finished)
#endif
    __builtin_memcpy(dst + begin, src + begin, (__SIZE_TYPE__)(end - begin));
}

// A copy of `bytes` bytes with the same threads as the updates: the benchmark's reference
// bandwidth for the CPU.
extern "C" int gpuopt_copy(const int threads, const long long objects, const gpuopt_word* a) {
    char* dst = GPUOPT_ARRAY(char*, 0);
    const char* src = GPUOPT_ARRAY(const char*, 1);
    const long long bytes = (long long)a[2];
    struct context_t {
        char* dst;
        const char* src;
        long long bytes;
    } context = {dst, src, bytes};
    const long long piece = 1 << 20;
    gpuopt_run_chunks(gpuopt_team(threads, 2 * bytes), (bytes + piece - 1) / piece, [](const void* p, long long c) {
        const context_t& k = *static_cast<const context_t*>(p);
        const long long begin = c * (1 << 20), end = begin + (1 << 20) < k.bytes ? begin + (1 << 20) : k.bytes;
        gpuopt_copy_range(k.dst, k.src, begin, end);
    }, &context);
    return 0;
}
