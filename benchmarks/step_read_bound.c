/* A decode step's weight bytes read two ways by the threads of one OpenMP region: in one piece, and in the step's
   pieces in order (the weights of each product, or of products that read the same input) with a barrier after
   each, as the step's threads wait for each other before the next product. The threads share each piece's blocks
   out in turns, as the step's products share their rows (a slower thread reads less). No arithmetic
   beyond the loads: the ceiling that the step's order and barriers alone put on its roofline fraction. A library
   for step_read_bound.py, which loads it into a process running torch, so the reads run in torch's OpenMP threads
   as mu's native step does, over a buffer it makes (on huge pages, as a model's weights lie). */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* the 32-bit sums of n bytes from p (n a multiple of 256, p 64-byte aligned): four independent streams of loads */
static __m256i read_bytes(const char *p, size_t n) {
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    for (size_t i = 0; i < n; i += 256) {
        a = _mm256_add_epi32(a, _mm256_add_epi32(_mm256_load_si256((const __m256i *)(p + i)),
                                                 _mm256_load_si256((const __m256i *)(p + i + 32))));
        b = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_load_si256((const __m256i *)(p + i + 64)),
                                                 _mm256_load_si256((const __m256i *)(p + i + 96))));
        c = _mm256_add_epi32(c, _mm256_add_epi32(_mm256_load_si256((const __m256i *)(p + i + 128)),
                                                 _mm256_load_si256((const __m256i *)(p + i + 160))));
        d = _mm256_add_epi32(d, _mm256_add_epi32(_mm256_load_si256((const __m256i *)(p + i + 192)),
                                                 _mm256_load_si256((const __m256i *)(p + i + 224))));
    }
    return _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d));
}

#define BLOCK (16 << 10)

/* The blocks of a piece are shared out as mu's native step shares a product's rows: each thread reads its own range
   front to back; one whose range is done takes the back half of another's range left. turns[8 t] packs thread t's
   range [lo, hi) (32 bits each), changed by compare-and-swap; a piece's ranges are set before a barrier. */
static inline uint64_t range(uint64_t lo, uint64_t hi) { return lo << 32 | hi; }

static int take(uint64_t *turns, int tid, int nth, uint64_t *block) {
    for (int i = 0; i < nth; i++) {
        uint64_t *t = turns + 8 * ((tid + i) % nth), v = __atomic_load_n(t, __ATOMIC_ACQUIRE);
        for (;;) {
            uint64_t lo = v >> 32, hi = v & 0xffffffff, mid = i ? lo + (hi - lo) / 2 : lo;
            if (lo >= hi) break;
            if (__atomic_compare_exchange_n(t, &v, i ? range(lo, mid) : range(lo + 1, hi), 0, __ATOMIC_ACQ_REL,
                                            __ATOMIC_ACQUIRE)) {
                if (i) __atomic_store_n(turns + 8 * tid, range(mid + 1, hi), __ATOMIC_RELEASE);
                *block = mid;
                return 1;
            }
        }
    }
    return 0;
}

/* the n bytes at p (a multiple of 256) read by the threads of the region, sharing its BLOCK-byte blocks out in
   turns; ends with a barrier */
static __m256i share_read(const char *p, size_t n, uint64_t *turns, int tid, int nth) {
    uint64_t blocks = (n + BLOCK - 1) / BLOCK, b;
    __atomic_store_n(turns + 8 * tid, range(blocks * (uint64_t)tid / (uint64_t)nth,
                                            blocks * (uint64_t)(tid + 1) / (uint64_t)nth), __ATOMIC_RELEASE);
    #pragma omp barrier
    __m256i acc = _mm256_setzero_si256();
    while (take(turns, tid, nth, &b)) {
        size_t at = (size_t)b * BLOCK;
        acc = _mm256_add_epi32(acc, read_bytes(p + at, n - at < BLOCK ? n - at : BLOCK));
    }
    #pragma omp barrier
    return acc;
}

/* seconds to read the n pieces (bytes each, multiples of 256) of buf with `threads` threads: in one piece
   (pieces = 0) or piece by piece with a barrier after each (pieces = 1); -1 if out of memory */
double step_read(const char *buf, const int64_t *bytes, int n, int threads, int pieces) {
    uint64_t *turns = aligned_alloc(64, (size_t)threads * 64);
    size_t total = 0;
    if (!turns) return -1;
    for (int i = 0; i < n; i++) total += (size_t)bytes[i];
    volatile int sink = 0;
    double t0 = now();
    #pragma omp parallel num_threads(threads)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        __m256i acc = _mm256_setzero_si256();
        if (!pieces) {
            acc = share_read(buf, total, turns, tid, nth);
        } else {
            size_t at = 0;
            for (int i = 0; i < n; i++) {
                acc = _mm256_add_epi32(acc, share_read(buf + at, (size_t)bytes[i], turns, tid, nth));
                at += (size_t)bytes[i];
            }
        }
        sink += _mm256_extract_epi32(acc, 0);
    }
    double t = now() - t0;
    free(turns);
    return t;
}
