/* A decode step's weight bytes read two ways by `threads` OpenMP threads, alternating, `samples` times: in one
   piece, and in the step's pieces in order (the weights of each product, or of products that read the same input)
   with a barrier after each, as the step's threads wait for each other before the next product. The threads take
   CHUNK bytes at a time, as they come (a slower thread reads less, as the step's products share their rows out in
   turns). No arithmetic beyond the loads: the ceiling that the step's order and barriers alone put on its roofline
   fraction. Prints one line per sample: GB/s in one piece, GB/s in pieces. Driven by step_read_bound.py.

       step_read_bound threads samples bytes...
*/
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

#define CHUNK (64 << 10)

/* the n bytes at p (a multiple of 256) read by the threads of the region, CHUNK at a time as they come; *next: the
   region's shared counter, 0 on entry, left at n */
static __m256i share_read(const char *p, size_t n, size_t *next) {
    __m256i acc = _mm256_setzero_si256();
    for (;;) {
        size_t at = __atomic_fetch_add(next, CHUNK, __ATOMIC_RELAXED);
        if (at >= n) return acc;
        acc = _mm256_add_epi32(acc, read_bytes(p + at, n - at < CHUNK ? n - at : CHUNK));
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s threads samples bytes...\n", argv[0]);
        return 2;
    }
    const int threads = atoi(argv[1]), samples = atoi(argv[2]), n = argc - 3;
    size_t *piece = malloc(sizeof(size_t) * (size_t)n), *next = calloc((size_t)n + 1, sizeof(size_t)), total = 0;
    if (!piece || !next || threads < 1) return 1;
    for (int i = 0; i < n; i++) {
        piece[i] = (strtoull(argv[3 + i], NULL, 10) + 255) / 256 * 256;
        total += piece[i];
    }
    char *buf = aligned_alloc(4096, total);
    if (!buf) return 1;
    memset(buf, 1, total);
    volatile int sink = 0;
    for (int s = 0; s < samples; s++) {
        double t[2];
        for (int pieces = 0; pieces < 2; pieces++) {
            memset(next, 0, sizeof(size_t) * ((size_t)n + 1));
            double t0 = now();
            #pragma omp parallel num_threads(threads)
            {
                __m256i acc = _mm256_setzero_si256();
                if (!pieces) {
                    acc = share_read(buf, total, &next[n]);
                } else {
                    size_t at = 0;
                    for (int i = 0; i < n; i++) {
                        acc = _mm256_add_epi32(acc, share_read(buf + at, piece[i], &next[i]));
                        at += piece[i];
                        #pragma omp barrier
                    }
                }
                sink += _mm256_extract_epi32(acc, 0);
            }
            t[pieces] = now() - t0;
        }
        printf("%.2f %.2f\n", (double)total / t[0] / 1e9, (double)total / t[1] / 1e9);
    }
    free(buf);
    free(piece);
    free(next);
    return 0;
}
