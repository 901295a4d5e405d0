/* mu's native CPU kernels (built by mu/model/native.py): int8 products on AVX2 CPUs without VNNI (this part), fp32
   and bf16 GEMVs on CPUs with AVX-512 (compiled only where the compiler targets AVX-512), and a whole decode step
   (the end of the file: AVX-512 or AVX2 with FMA).

   The int8 GEMV (a few rows: decode) quantizes each row to 8-bit codes and streams the packed weights once, with a
   software prefetch ahead of each panel. The GEMM (many rows: prefill) multiplies 7-bit activation codes (0..127,
   one scale and zero point per row) by 7-bit weight codes (|w| <= 63, one scale per output channel). AVX2
   multiplies u8 x s8 with vpmaddubsw, which sums pairs of products in int16, then widens pairs of those with
   vpmaddwd: two multiply uops per 32 multiply-adds. With 7-bit activations four products fit int16 (4 x 127 x 63
   = 32004 < 32767), so two vpmaddubsw results are added in int16 first and one vpmaddwd widens both: three
   multiply uops per 64 multiply-adds, which is why this kernel beats the libraries' 8-bit ones on such CPUs
   (docs/efficiency.md, round 9). Weights are packed once, for both kernels. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#include <math.h>
#include <immintrin.h>
#include <omp.h>

#define MR 2        /* rows of a register tile */
#define NV 2        /* 8-column vectors of a register tile */
#define NR (8 * NV) /* columns of a register tile: the panel width of the packed weights */
#define K_MULTIPLE 8 /* the packed weights' inner dimension is padded to a multiple of it (native.py's) */
#define MC 64       /* rows of the activation block kept in L2 while the panels stream by */

/* w (n x k, int8) into panels of NR output channels; for each k-quad t (k = 4t..4t+3) NV vectors of 8 channels x
   4 codes: out[((p * k_pad / 4 + t) * NV + h) * 32 + c * 4 + j] = w[NR p + 8 h + c, 4 t + j]; zero padded to
   n_pad (a multiple of NR) x k_pad (a multiple of 8). */
void mu_pack_weights(const int8_t *w, int64_t n, int64_t k, int64_t n_pad, int64_t k_pad, int8_t *out) {
    for (int64_t p = 0; p < n_pad / NR; p++)
        for (int64_t t = 0; t < k_pad / 4; t++)
            for (int h = 0; h < NV; h++)
                for (int c = 0; c < 8; c++)
                    for (int j = 0; j < 4; j++) {
                        int64_t row = NR * p + 8 * h + c, col = 4 * t + j;
                        out[((p * (k_pad / 4) + t) * NV + h) * 32 + c * 4 + j] =
                            row < n && col < k ? w[row * k + col] : 0;
                    }
}

/* exp(t) for t in [-87, 87] to ~2 ulp (Cephes' polynomial after a two-part ln 2 reduction) */
static inline __m256 exp_ps(__m256 t) {
    t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), t);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* tanh-GELU as x * sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3): the function of mu.model.layers.gelu_tanh */
static inline __m256 gelu_ps(__m256 x) {
    __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    __m256 z2 = _mm256_mul_ps(_mm256_fmadd_ps(x3, _mm256_set1_ps(0.044715f), x), _mm256_set1_ps(-1.5957691216057308f));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(z2)));
}

static inline float hmin(__m256 v) {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_min_ss(m, _mm_shuffle_ps(m, m, 1)));
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

/* *lo = min(0, min row), *hi = max(0, max row) over cols values */
static inline void row_range(const float *row, int64_t cols, float *lo, float *hi) {
    __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
        __m256 v = _mm256_loadu_ps(row + j);
        vlo = _mm256_min_ps(vlo, v);
        vhi = _mm256_max_ps(vhi, v);
    }
    float l = hmin(vlo), h = hmax(vhi);
    for (; j < cols; j++) { l = fminf(l, row[j]); h = fmaxf(h, row[j]); }
    *lo = l;
    *hi = h;
}

/* o[j] = clamp(rint(row[j] / s) + z, 0, qmax) for j < cols, zero for cols <= j < ldo, with the scale s and zero point
   z that map lo..hi (lo <= 0 <= hi) onto 0..qmax (into *s, *z) */
static inline void quantize_row(const float *row, int64_t cols, float lo, float hi, float qmax, uint8_t *o,
                                int64_t ldo, float *s, float *z) {
    float scale = (hi - lo) / qmax;
    if (!(scale > 0.0f && scale < FLT_MAX)) { scale = 1.0f; lo = 0.0f; }  /* all zeros (or non-finite: garbage) */
    float zero = fminf(qmax, fmaxf(0.0f, rintf(-lo / scale))), inv = 1.0f / scale;
    *s = scale;
    *z = zero;
    const __m256 vinv = _mm256_set1_ps(inv), vzero = _mm256_set1_ps(zero);
    const __m256 vmax = _mm256_set1_ps(qmax), vmin = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= cols; j += 32) {
        __m256i q[4];
        for (int u = 0; u < 4; u++) {
            __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(row + j + 8 * u), vinv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q[u] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, vzero), vmin), vmax));
        }
        __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  /* undo the lane order */
        _mm256_storeu_si256((__m256i *)(o + j), b);
    }
    for (; j < cols; j++) o[j] = (uint8_t)(int32_t)fminf(fmaxf(rintf(row[j] * inv) + zero, 0.0f), qmax);
    for (; j < ldo; j++) o[j] = 0;
}

/* 7-bit codes of each row of x (rows x cols, row stride ld) with the row's own scale and zero point over
   min(x, 0)..max(x, 0), or over ranges[2 r], ranges[2 r + 1] when given (a producer that knows them):
   out[r, j] = clamp(rint(x[r, j] / sx[r]) + zx[r], 0, 127), zero for cols <= j < ldo */
void mu_codes_u7(const float *x, int64_t rows, int64_t cols, int64_t ld, const float *ranges, uint8_t *out,
                 int64_t ldo, float *sx, float *zx, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        float lo, hi;
        if (ranges) {
            lo = fminf(ranges[2 * i], 0.0f);
            hi = fmaxf(ranges[2 * i + 1], 0.0f);
        } else {
            row_range(x + i * ld, cols, &lo, &hi);
        }
        quantize_row(x + i * ld, cols, lo, hi, 127.0f, out + i * ldo, ldo, sx + i, zx + i);
    }
}

static inline void tile(const uint8_t *a, int64_t lda, const int8_t *b, int64_t k_pad, int rows, float *c,
                        int64_t ldc, const float *wscale, const float *bias, const float *wsum, const float *sx,
                        const float *zx, int gelu, float *ranges) {
    __m256i acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int h = 0; h < NV; h++) acc[r][h] = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t t = 0; t < k_pad / 4; t += 2) {
        __m256i b0[NV], b1[NV];
        for (int h = 0; h < NV; h++) {
            b0[h] = _mm256_load_si256((const __m256i *)(b + (t * NV + h) * 32));
            b1[h] = _mm256_load_si256((const __m256i *)(b + ((t + 1) * NV + h) * 32));
        }
        for (int r = 0; r < MR; r++) {
            int32_t q0, q1;
            memcpy(&q0, a + r * lda + 4 * t, 4);
            memcpy(&q1, a + r * lda + 4 * t + 4, 4);
            __m256i a0 = _mm256_set1_epi32(q0), a1 = _mm256_set1_epi32(q1);
            for (int h = 0; h < NV; h++) {
                __m256i s = _mm256_adds_epi16(_mm256_maddubs_epi16(a0, b0[h]), _mm256_maddubs_epi16(a1, b1[h]));
                acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(s, ones));
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        const __m256 s = _mm256_set1_ps(sx[r]), sz = _mm256_set1_ps(sx[r] * zx[r]);
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
        for (int h = 0; h < NV; h++) {
            __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][h]), s);
            y = _mm256_fmadd_ps(y, _mm256_loadu_ps(wscale + 8 * h), _mm256_loadu_ps(bias + 8 * h));
            y = _mm256_fnmadd_ps(sz, _mm256_loadu_ps(wsum + 8 * h), y);
            if (gelu) {
                y = gelu_ps(y);
                lo = _mm256_min_ps(lo, y);
                hi = _mm256_max_ps(hi, y);
            }
            _mm256_storeu_ps(c + r * ldc + 8 * h, y);
        }
        if (gelu) {
            ranges[2 * r] = fminf(ranges[2 * r], hmin(lo));
            ranges[2 * r + 1] = fmaxf(ranges[2 * r + 1], hmax(hi));
        }
    }
}

/* c[i, n] = (sum_k a[i, k] w[n, k]) sx[i] wscale[n] + bias[n] - sx[i] zx[i] wsum[n] for i < m, n < n_pad (c's
   row stride ldc >= n_pad; wscale, bias and wsum of n_pad; wsum: the dequantized weights' row sums): a holds each
   row's 7-bit codes (mu_codes_u7; m rows of k_pad, readable up to a multiple of MR rows), wp mu_pack_weights'
   panels. gelu: tanh-GELU applied, and each row's output range (with 0) into ranges[2 i], ranges[2 i + 1];
   scratch: nt x m x 2 floats (each thread's ranges over its panels). */
void mu_gemm_u7s7(const uint8_t *a, int64_t m, int64_t k_pad, const int8_t *wp, int64_t n_pad, const float *wscale,
                  const float *bias, const float *wsum, const float *sx, const float *zx, float *c, int64_t ldc,
                  int gelu, float *ranges, float *scratch, int nt) {
    int64_t panels = n_pad / NR;
    if (gelu)
        for (int64_t i = 0; i < 2 * m * nt; i++) scratch[i] = 0.0f;
    #pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        int64_t p0 = panels * tid / nth, p1 = panels * (tid + 1) / nth;
        float *part = gelu ? scratch + 2 * m * tid : NULL;
        for (int64_t i0 = 0; i0 < m; i0 += MC) {
            int64_t i1 = i0 + MC < m ? i0 + MC : m;
            for (int64_t p = p0; p < p1; p++) {
                const int8_t *b = wp + p * (k_pad / 4) * 32 * NV;
                for (int64_t i = i0; i < i1; i += MR) {
                    int rows = i1 - i < MR ? (int)(i1 - i) : MR;
                    tile(a + i * k_pad, k_pad, b, k_pad, rows, c + i * ldc + NR * p, ldc, wscale + NR * p,
                         bias + NR * p, wsum + NR * p, sx + i, zx + i, gelu, gelu ? part + 2 * i : NULL);
                }
            }
        }
    }
    if (gelu)
        for (int64_t i = 0; i < m; i++) {
            float lo = 0.0f, hi = 0.0f;
            for (int t = 0; t < nt; t++) {
                lo = fminf(lo, scratch[2 * (m * t + i)]);
                hi = fmaxf(hi, scratch[2 * (m * t + i) + 1]);
            }
            ranges[2 * i] = lo;
            ranges[2 * i + 1] = hi;
        }
}

#define GEMV_ROWS 8      /* rows quantized and multiplied per pass over the weights */
#define PREFETCH 4096    /* bytes ahead of the panel being read */

/* codes[r, :] = 8-bit codes of x[r, :] (one scale and zero point per row over min(x, 0)..max(x, 0)), zero
   padded to k_pad; sx, zx: the rows' scales and zero points */
static void quantize_rows_u8(const float *x, int64_t rows, int64_t k, int64_t k_pad, uint8_t *codes, float *sx,
                             float *zx) {
    for (int64_t r = 0; r < rows; r++) {
        float lo, hi;
        row_range(x + r * k, k, &lo, &hi);
        quantize_row(x + r * k, k, lo, hi, 255.0f, codes + r * k_pad, k_pad, sx + r, zx + r);
    }
}

/* out[r, n] = x[r] . w[n] for a few rows (contiguous fp32 x, rows x k): each row's own 8-bit codes (u8 x s7
   pair sums fit int16: 2 x 255 x 63 < 32767), then acc sx wscale[n] + bias[n] - sx zx wsum[n] (wsum: the
   dequantized weights' row sums); n < n_pad, out's row stride ldo; scratch: GEMV_ROWS x k_pad bytes */
static void gemv_u8s7(const float *x, int64_t rows, int64_t k, const int8_t *wp, int64_t k_pad, int64_t n_pad,
                      const float *wscale, const float *bias, const float *wsum, float *out, int64_t ldo,
                      uint8_t *scratch, int nt) {
    int64_t panels = n_pad / NR;
    for (int64_t r0 = 0; r0 < rows; r0 += GEMV_ROWS) {
        int64_t nr = rows - r0 < GEMV_ROWS ? rows - r0 : GEMV_ROWS;
        float sx[GEMV_ROWS], zx[GEMV_ROWS];
        quantize_rows_u8(x + r0 * k, nr, k, k_pad, scratch, sx, zx);
        #pragma omp parallel num_threads(nt)
        {
            int tid = omp_get_thread_num(), nth = omp_get_num_threads();
            int64_t p0 = panels * tid / nth, p1 = panels * (tid + 1) / nth;
            const __m256i ones = _mm256_set1_epi16(1);
            for (int64_t p = p0; p < p1; p++) {
                const int8_t *b = wp + p * (k_pad / 4) * 32 * NV;
                for (int64_t r = 0; r < nr; r++) {
                    const uint8_t *cr = scratch + r * k_pad;
                    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                                      _mm256_setzero_si256()};
                    for (int64_t t = 0; t < k_pad / 4; t += 2) {
                        const __m256i *bb = (const __m256i *)(b + t * NV * 32);
                        _mm_prefetch((const char *)bb + PREFETCH, _MM_HINT_T0);
                        _mm_prefetch((const char *)bb + PREFETCH + 64, _MM_HINT_T0);
                        int32_t q0, q1;
                        memcpy(&q0, cr + 4 * t, 4);
                        memcpy(&q1, cr + 4 * t + 4, 4);
                        __m256i a0 = _mm256_set1_epi32(q0), a1 = _mm256_set1_epi32(q1);
                        for (int h = 0; h < NV; h++) {
                            acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(
                                _mm256_maddubs_epi16(a0, _mm256_load_si256(bb + h)), ones));
                            acc[NV + h] = _mm256_add_epi32(acc[NV + h], _mm256_madd_epi16(
                                _mm256_maddubs_epi16(a1, _mm256_load_si256(bb + NV + h)), ones));
                        }
                    }
                    const __m256 s = _mm256_set1_ps(sx[r]), sz = _mm256_set1_ps(sx[r] * zx[r]);
                    for (int h = 0; h < NV; h++) {
                        int64_t n = NR * p + 8 * h;
                        __m256 y = _mm256_cvtepi32_ps(_mm256_add_epi32(acc[h], acc[NV + h]));
                        y = _mm256_fmadd_ps(_mm256_mul_ps(y, s), _mm256_loadu_ps(wscale + n),
                                            _mm256_loadu_ps(bias + n));
                        y = _mm256_fnmadd_ps(sz, _mm256_loadu_ps(wsum + n), y);
                        _mm256_storeu_ps(out + (r0 + r) * ldo + n, y);
                    }
                }
            }
        }
    }
}

/* one layer's constant GEMV arguments, built once (mu.model.native.Layer): a decode call passes five arguments */
typedef struct {
    const int8_t *wp;
    int64_t k, k_pad, n_pad;
    const float *wscale, *bias, *wsum;
} mu_layer;

void mu_gemv_layer(const mu_layer *layer, const float *x, int64_t rows, float *out, int nt) {
    uint8_t *scratch = aligned_alloc(64, (size_t)(GEMV_ROWS * layer->k_pad + 63) / 64 * 64);
    if (!scratch) return;
    gemv_u8s7(x, rows, layer->k, layer->wp, layer->k_pad, layer->n_pad, layer->wscale, layer->bias, layer->wsum,
                 out, layer->n_pad, scratch, nt);
    free(scratch);
}

/* this thread's share [*c0, *c1) of n output channels, in blocks of 16 */
static inline void share(int64_t n, int tid, int nth, int64_t *c0, int64_t *c1) {
    int64_t blocks = (n + 15) / 16, b0 = blocks * tid / nth, b1 = blocks * (tid + 1) / nth;
    *c0 = 16 * b0 < n ? 16 * b0 : n;
    *c1 = 16 * b1 < n ? 16 * b1 : n;
}

/* Where the products' input vectors start: X_SKEW bytes past a 64-byte boundary. Each multiply-add of a dot product
   loads 64 bytes of the input and 64 of a weight row (rows start on 64-byte boundaries); with the input on a 64-byte
   (or 32-byte) boundary too, a GEMV read the weights at 0.7-0.75 of a streaming read's rate when the memory ran fast
   (~50 GB/s), 4-16 bytes past one at ~1.0 (Zen 4, 2 threads, fp32 and bf16; docs/efficiency.md, round 12): the two
   loads meet in the same L1 banks, it seems. */
#define X_SKEW 4

static inline char *skewed(char *p) {  /* the first address X_SKEW bytes past a 64-byte boundary at or after p */
    return p + ((64 - (uintptr_t)p % 64) % 64) + X_SKEW;
}

/* ---- elements and vectors of fp32 or bf16 arrays (the fp32 dot product's and the decode step's) ---- */

static inline float get_el(const void *p, int64_t i, int bf) {
    if (!bf) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_bits(float f) {  /* round to nearest even, as PyTorch's conversion */
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float rnd(float f, int bf) {  /* f rounded to the model's dtype */
    if (!bf) return f;
    uint32_t u = (uint32_t)bf16_bits(f) << 16;
    memcpy(&f, &u, 4);
    return f;
}

static inline void put_el(void *p, int64_t i, float f, int bf) {
    if (bf) ((uint16_t *)p)[i] = bf16_bits(f);
    else ((float *)p)[i] = f;
}

/* Vectors of VW fp32 lanes, 16 with AVX-512 (F, BW, VL), 8 with AVX2 and FMA; v_load and v_put move the
   elements i .. min(i + VW, n) of an array of the model's dtype (fp32, or bf16 where bf is set: widened exactly,
   stored rounded to nearest even, as PyTorch's conversion), zeros past n. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VW 16
typedef __m512 vec;

static inline __mmask16 first(int64_t i, int64_t n) {  /* lanes of elements i .. min(i + 16, n) (none past n) */
    return n - i >= 16 ? (__mmask16)0xffff : n <= i ? (__mmask16)0 : (__mmask16)((1u << (n - i)) - 1);
}

static inline __m512 load_f32(const void *p, __mmask16 valid) { return _mm512_maskz_loadu_ps(valid, p); }

static inline __m512 load_bf16x16(const void *p, __mmask16 valid) {  /* bf16 widened to fp32 (no BF16 unit needed) */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, p)), 16));
}

static inline vec v_zero(void) { return _mm512_setzero_ps(); }
static inline vec v_set1(float f) { return _mm512_set1_ps(f); }
static inline vec v_add(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec v_sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec v_mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec v_fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float v_sum(vec v) { return _mm512_reduce_add_ps(v); }
static inline vec v_full(const float *p) { return _mm512_loadu_ps(p); }  /* VW fp32 values */

static inline vec v_load(const void *p, int64_t i, int64_t n, int bf) {
    __mmask16 m = first(i, n);
    return bf ? load_bf16x16((const uint16_t *)p + i, m) : load_f32((const float *)p + i, m);
}

static inline vec v_rnd(vec v, int bf) {  /* v rounded to the model's dtype (bf16: as rnd, lane by lane) */
    if (!bf) return v;
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), u, _mm512_set1_epi32(0x400000));  /* NaN */
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)));
}

static inline void v_put(void *p, int64_t i, int64_t n, vec v, int bf) {
    __mmask16 m = first(i, n);
    if (!bf) {
        _mm512_mask_storeu_ps((float *)p + i, m, v);
        return;
    }
    __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v_rnd(v, 1)), 16));
    _mm256_mask_storeu_epi16((uint16_t *)p + i, m, h);
}

static inline vec v_zero_where_ninf(vec e, vec s) {  /* e, with zeros in the lanes where s is -inf */
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), e);
}

static inline vec v_max(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline float v_hmax(vec v) { return _mm512_reduce_max_ps(v); }

static inline vec v_ninf_where_not(vec v, const uint8_t *valid) {  /* v, with -inf in the lanes where !valid[i] */
    __m512i ok = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)valid));
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(ok, ok), _mm512_set1_ps(-INFINITY), v);
}

/* lane i = v_sum(a[i]), in its order (halves, quarters, pairs), for the 16 vectors of a */
static inline vec v_sums(const vec *a) {
    vec b[8], c[4];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 8], 0xee));
    for (int i = 0; i < 4; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[i], b[i + 4], 0x88), _mm512_shuffle_f32x4(b[i], b[i + 4], 0xdd));
    vec t0 = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
    vec t1 = _mm512_add_ps(_mm512_unpacklo_ps(c[2], c[3]), _mm512_unpackhi_ps(c[2], c[3]));
    vec r = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xee));
    return _mm512_shuffle_f32x4(r, r, 0xd8);  /* lanes of a[0..3], a[8..11], a[4..7], a[12..15] put in order */
}

/* f (an 8-lane function above: exp_ps, gelu_ps) on 16 lanes, as two halves: one polynomial for both widths */
static inline vec halves(__m256 (*f)(__m256), vec v) {
    __m256 lo = f(_mm512_castps512_ps256(v));
    __m256 hi = f(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}
static inline vec v_exp(vec v) { return halves(exp_ps, v); }
static inline vec v_gelu(vec v) { return halves(gelu_ps, v); }

#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vec;

static inline vec v_zero(void) { return _mm256_setzero_ps(); }
static inline vec v_set1(float f) { return _mm256_set1_ps(f); }
static inline vec v_add(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec v_sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec v_mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec v_fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec v_exp(vec v) { return exp_ps(v); }
static inline vec v_gelu(vec v) { return gelu_ps(v); }
static inline vec v_full(const float *p) { return _mm256_loadu_ps(p); }  /* VW fp32 values */

static inline float v_sum(vec v) {  /* halves, quarters, pairs: the order of AVX-512's _mm512_reduce_add_ps */
    __m128 q = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}

static inline vec v_load(const void *p, int64_t i, int64_t n, int bf) {
    if (n - i >= 8) {
        if (!bf) return _mm256_loadu_ps((const float *)p + i);
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    }
    float t[8] = {0};
    for (int64_t j = i; j < n; j++) t[j - i] = get_el(p, j, bf);
    return _mm256_loadu_ps(t);
}

static inline vec v_rnd(vec v, int bf) {  /* v rounded to the model's dtype (bf16: as rnd, lane by lane) */
    if (!bf) return v;
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
}

static inline void v_put(void *p, int64_t i, int64_t n, vec v, int bf) {
    if (n - i >= 8 && !bf) {
        _mm256_storeu_ps((float *)p + i, v);
        return;
    }
    float t[8];
    _mm256_storeu_ps(t, v);
    for (int64_t j = i; j < n && j < i + 8; j++) put_el(p, j, t[j - i], bf);
}

static inline vec v_zero_where_ninf(vec e, vec s) {  /* e, with zeros in the lanes where s is -inf */
    return _mm256_and_ps(e, _mm256_cmp_ps(s, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ));
}

static inline vec v_max(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline float v_hmax(vec v) { return hmax(v); }

static inline vec v_ninf_where_not(vec v, const uint8_t *valid) {  /* v, with -inf in the lanes where !valid[i] */
    __m256i no = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)valid)),
                                    _mm256_setzero_si256());
    return _mm256_blendv_ps(v, _mm256_set1_ps(-INFINITY), _mm256_castsi256_ps(no));
}

/* lane i = v_sum(a[i]), in its order (halves, pairs, then the pair's two), for the 8 vectors of a */
static inline vec v_sums(const vec *a) {
    vec b[4];
    for (int i = 0; i < 4; i++)
        b[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[i], a[i + 4], 0x31),
                             _mm256_permute2f128_ps(a[i], a[i + 4], 0x20));
    vec c0 = _mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], 0xee), _mm256_shuffle_ps(b[0], b[1], 0x44));
    vec c1 = _mm256_add_ps(_mm256_shuffle_ps(b[2], b[3], 0xee), _mm256_shuffle_ps(b[2], b[3], 0x44));
    return _mm256_add_ps(_mm256_shuffle_ps(c0, c1, 0x88), _mm256_shuffle_ps(c0, c1, 0xdd));
}
#endif

#ifdef VW
/* x . w over k fp32 values: four vector accumulators, the tail's lanes in the first, then v_sum of their sum */
static inline float dot_f32(const void *xv, const void *wv, int64_t k) {
    const float *x = xv, *w = wv;
    vec a0 = v_zero(), a1 = v_zero(), a2 = v_zero(), a3 = v_zero();
    int64_t j = 0;
    for (; j + 4 * VW <= k; j += 4 * VW) {
        a0 = v_fma(v_full(x + j), v_full(w + j), a0);
        a1 = v_fma(v_full(x + j + VW), v_full(w + j + VW), a1);
        a2 = v_fma(v_full(x + j + 2 * VW), v_full(w + j + 2 * VW), a2);
        a3 = v_fma(v_full(x + j + 3 * VW), v_full(w + j + 3 * VW), a3);
    }
    for (; j < k; j += VW) a0 = v_fma(v_load(x, j, k, 0), v_load(w, j, k, 0), a0);
    return v_sum(v_add(v_add(a0, a1), v_add(a2, a3)));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* ---- fp32 and bf16 products of a few rows (a decode), on CPUs with AVX-512 (bf16: with AVX-512-BF16) ----
   Each output channel's dot product runs over its weight row with four vector accumulators, so a thread reads its
   contiguous range of the model's own weights (n x k, row-major: no packed copy) front to back, one sequential stream
   that the hardware prefetcher follows at the memory's streaming rate (docs/efficiency.md, round 10); 16 channels at
   a time, each block read from memory for the first row of x and from cache for the others. */

static inline void store_f32(void *p, __m512 y, __mmask16 valid) { _mm512_mask_storeu_ps(p, valid, y); }

/* rows x k by n x k (element size `size`), plus the bias (n, may be NULL), into out (rows x n): dot, load and store
   are the element type's (the OpenMP region is outlined once for both types, so they are indirect calls there: one
   per output channel, nothing beside its 2-4 KiB of weights; measured level with a copy written out for bf16) */
static inline void gemv_rows(const char *x, int64_t rows, int64_t k, const char *w, int64_t n, const char *bias,
                             char *out, int nt, size_t size, float (*dot)(const void *, const void *, int64_t),
                             __m512 (*load)(const void *, __mmask16), void (*store)(void *, __m512, __mmask16)) {
    char *raw = malloc((size_t)(rows * k) * size + 128);
    if (raw) {  /* (else read x where it is: slower, same numbers) */
        x = memcpy(skewed(raw), x, (size_t)(rows * k) * size);
    }
    #pragma omp parallel num_threads(nt)
    {
        int64_t first, last;
        share(n, omp_get_thread_num(), omp_get_num_threads(), &first, &last);
        for (int64_t c0 = first; c0 < last; c0 += 16) {
            int nb = last - c0 < 16 ? (int)(last - c0) : 16;
            __mmask16 valid = (__mmask16)((1u << nb) - 1);
            __m512 start = bias ? load(bias + c0 * size, valid) : _mm512_setzero_ps();
            for (int64_t r = 0; r < rows; r++) {
                float y[16] = {0};
                for (int j = 0; j < nb; j++) y[j] = dot(x + r * k * size, w + (c0 + j) * k * size, k);
                store(out + (r * n + c0) * size, _mm512_add_ps(_mm512_loadu_ps(y), start), valid);
            }
        }
    }
    free(raw);
}

/* out[r, c] = x[r] . w[c] + bias[c] (bias may be NULL) for r < rows, c < n; x rows x k and out rows x n contiguous */
void mu_gemv_f32(const float *x, int64_t rows, int64_t k, const float *w, int64_t n, const float *bias, float *out,
                 int nt) {
    gemv_rows((const char *)x, rows, k, (const char *)w, n, (const char *)bias, (char *)out, nt, 4, dot_f32, load_f32,
              store_f32);
}

/* ---- a prefill's activation codes for oneDNN's int8 matmul (mu.model.quantize._u8_codes), on CPUs with AVX-512 ----
   out = 8-bit codes of the n fp32 values of x with one scale and zero point over min(x, 0)..max(x, 0): *scale =
   (hi - lo) / 255 (1 with lo = 0 where that is not a positive number: all zeros, or non-finite values), *zero =
   round(-lo / scale) in 0..255 (double, nearest even), each code clamp(rint(x * (1 / scale) + zero), 0, 255) in one
   fused multiply-add, as torch.quantize_per_tensor rounds them. Two passes by nt threads over their shares of x (the
   range, then the codes), where PyTorch makes an aminmax, a sync and a quantized tensor. */
void mu_codes_u8(const float *x, int64_t n, uint8_t *out, double *scale, int64_t *zero, int nt) {
    float lo[nt], hi[nt];
    #pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        int64_t i0, i1;
        share(n, tid, nth, &i0, &i1);
        row_range(x + i0, i1 - i0, &lo[tid], &hi[tid]);
        #pragma omp barrier
        #pragma omp single
        {
            float a = 0.0f, b = 0.0f;
            for (int t = 0; t < nth; t++) a = fminf(a, lo[t]), b = fmaxf(b, hi[t]);
            double s = ((double)b - (double)a) / 255.0;
            if (!(isfinite(s) && s > 0.0)) s = 1.0, a = 0.0f;
            double z = nearbyint(-(double)a / s);
            *scale = s;
            *zero = z < 0.0 ? 0 : z > 255.0 ? 255 : (int64_t)z;
        }
        const __m512 inv = _mm512_set1_ps(1.0f / (float)*scale), zp = _mm512_set1_ps((float)*zero);
        const __m512 top = _mm512_set1_ps(255.0f), none = _mm512_setzero_ps();
        for (int64_t i = i0; i < i1; i += 16) {
            __mmask16 valid = first(i, i1);
            __m512 c = _mm512_roundscale_ps(_mm512_fmadd_ps(load_f32(x + i, valid), inv, zp),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            c = _mm512_min_ps(_mm512_max_ps(c, none), top);
            _mm_mask_storeu_epi8(out + i, valid, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c)));
        }
    }
}

#endif

/* ---- a decode step of one sequence, as one call (mu.model.fast.NativeDecoder) ----
   The decoder for one new token: each block of mu.model.layers.DecoderBlock (RMSNorm, q/k/v, RoPE, the token's K/V
   written into the cache, attention over the cached keys, out projection and residual; RMSNorm, the cross-attention's
   q, attention over the encoder's K/V, out projection and residual; RMSNorm, fc1, tanh-GELU, fc2 and residual), or
   of a decoder-only model's SelfAttentionBlock (no cross-attention), then the final RMSNorm and the vocabulary
   projection. One OpenMP region for all of it (barriers between the phases) instead of a call, a region and a tensor
   per op: in the products the threads take every weight's output channels 16 at a time (gemv_part), each its own
   range front to back and then half of what another has left (product), the attention splits the keys between the
   threads. Values are rounded to the model's dtype where PyTorch's ops round them (bf16: each op's output; the math
   in between in fp32). An int8 model's decoder (fp32 activations, 7-bit weight codes with a scale per output channel:
   mu.model.quantize.Int8Linear) runs the same way: each product's input gets 8-bit codes (one scale and zero point
   over min(x, 0)..max(x, 0)); with AVX-512 VNNI dot products over the weights' codes row by row as they lie, on AVX2
   CPUs over the panels of mu_pack_weights (panel_part). A step starts from the token's id (its embedding row, RoPE's
   rows, its cache slot marked, the position advanced: decoder_step) and ends with the greedy pick; decoder_steps runs
   a sequence's greedy steps in one call. The code is written once over `vec`, VW fp32 lanes: AVX-512's 16 or AVX2's
   8 (no bf16 step there). */

#ifdef VW
int mu_step_lanes(void) { return VW; }  /* the step's vector width: 16 reads row-major int8 codes, 8 packed ones */

typedef struct {
    const void *ln1, *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo;  /* self-attention: norm weight, q/k/v, out */
    const void *ln2, *cwq, *cbq, *cwo, *cbo;                   /* cross-attention: norm weight, q, out */
    const void *ln3, *w1, *b1, *w2, *b2;                       /* MLP: norm weight, fc1, fc2 */
    int64_t d, n_head, n_kv, hd, hidden, interleaved;
    float eps;
    /* int8 weights only (else NULL): per output channel, the scale and the dequantized weights' row sum, of q, k,
       v, out, cross q, cross out, fc1, fc2 in that order */
    const float *scale[8], *wsum[8];
} mu_block;

enum { P_Q, P_K, P_V, P_O, P_CQ, P_CO, P_W1, P_W2 };

typedef float (*dot_fn)(const void *, const void *, int64_t);

/* x[c] = rnd(x[c] + y[c]) for c in [c0, c1) (the residual stream, fp32 holding the dtype's values) */
static inline void add_residual(float *x, const float *y, int64_t c0, int64_t c1, int bf) {
    for (int64_t c = c0; c < c1; c += VW) {
        v_put(x, c, c1, v_rnd(v_add(v_load(x, c, c1, 0), v_load(y, c, c1, 0)), bf), 0);
    }
}

#if VW == 8
/* y[c] for c in [c0, c1) (c0 a multiple of NR) of 8-bit codes x (k, zero padded to K_MULTIPLE) times 7-bit weight
   codes packed by mu_pack_weights (wp; scale, bias (may be NULL) and wsum padded to its panels), in gemv_u8s7's
   arithmetic: the numbers of the layer's own GEMV (mu.model.quantize's native kernels on AVX2 CPUs). Without that
   GEMV's software prefetch: AVX2 code on a Zen 4 ran whole steps 1.05x faster without it (docs/efficiency.md, round
   13; the GEMV's was measured on a Zen 3, round 9) */
static void panel_part(const uint8_t *x, int64_t k, const int8_t *wp, const float *bias, float *y, int64_t c0,
                       int64_t c1, const float *scale, const float *wsum, float sx, float zx) {
    const int64_t k_pad = (k + K_MULTIPLE - 1) / K_MULTIPLE * K_MULTIPLE;
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256 s = _mm256_set1_ps(sx), sz = _mm256_set1_ps(sx * zx);
    for (int64_t p = c0 / NR; p * NR < c1; p++) {
        const int8_t *b = wp + p * (k_pad / 4) * 32 * NV;
        __m256i acc[2 * NV];
        for (int h = 0; h < 2 * NV; h++) acc[h] = _mm256_setzero_si256();
        for (int64_t t = 0; t < k_pad / 4; t += 2) {
            const __m256i *bb = (const __m256i *)(b + t * NV * 32);
            int32_t q0, q1;
            memcpy(&q0, x + 4 * t, 4);
            memcpy(&q1, x + 4 * t + 4, 4);
            __m256i a0 = _mm256_set1_epi32(q0), a1 = _mm256_set1_epi32(q1);
            for (int h = 0; h < NV; h++) {
                acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_load_si256(bb + h)),
                                                                    ones));
                acc[NV + h] = _mm256_add_epi32(acc[NV + h], _mm256_madd_epi16(
                    _mm256_maddubs_epi16(a1, _mm256_load_si256(bb + NV + h)), ones));
            }
        }
        for (int h = 0; h < NV; h++) {
            int64_t n = NR * p + 8 * h;
            __m256 v = _mm256_cvtepi32_ps(_mm256_add_epi32(acc[h], acc[NV + h]));
            v = _mm256_fmadd_ps(_mm256_mul_ps(v, s), _mm256_loadu_ps(scale + n),
                                bias ? _mm256_loadu_ps(bias + n) : _mm256_setzero_ps());
            v_put(y, n, c1, _mm256_fnmadd_ps(sz, _mm256_loadu_ps(wsum + n), v), 0);
        }
    }
}
#endif

/* y[c] = rnd(x . w[c] + bias[c]) for c in [c0, c1): one rounding of the fp32 sum, as mu_gemv_*; with int8 weights
   (scale given: x is the input's 8-bit codes, sx and zx their scale and zero point) y[c] = sx scale[c] (x . w[c]) -
   sx zx wsum[c] + bias[c], in fp32 (with AVX2: panel_part's, over packed weights) */
static inline void gemv_part(const void *x, int64_t k, const void *w, const void *bias, float *y, int64_t c0,
                             int64_t c1, int bf, dot_fn dot, const float *scale, const float *wsum, float sx,
                             float zx) {
#if VW == 8
    if (scale) {
        panel_part(x, k, w, bias, y, c0, c1, scale, wsum, sx, zx);
        return;
    }
#endif
    size_t row = (size_t)k * (scale ? 1 : bf ? 2 : 4);
    for (int64_t c = c0; c < c1; c++) {
        float s = dot(x, (const char *)w + c * row, k), b = bias ? get_el(bias, c, bf) : 0.0f;
        y[c] = scale ? s * sx * scale[c] - sx * zx * wsum[c] + b : rnd(s + b, bf);
    }
}

/* codes = 8-bit codes of v (k fp32 values) over min(v, 0)..max(v, 0), their scale and zero point into *sx, *zx */
static void input_codes(const float *v, int64_t k, uint8_t *codes, float *sx, float *zx) {
    float lo, hi;
    row_range(v, k, &lo, &hi);
    quantize_row(v, k, lo, hi, 255.0f, codes, (k + K_MULTIPLE - 1) / K_MULTIPLE * K_MULTIPLE, sx, zx);
}

/* out = rnd(rnd(x * rsqrt(mean(x^2) + eps)) * weight) (bf16: RMSNorm in fp32, cast, then scaled), in the dtype */
static void rms_norm(const float *x, int64_t d, const void *weight, float eps, void *out, int bf) {
    vec ss = v_zero();
    for (int64_t i = 0; i < d; i += VW) {
        vec v = v_load(x, i, d, 0);
        ss = v_fma(v, v, ss);
    }
    vec r = v_set1(1.0f / sqrtf(v_sum(ss) / (float)d + eps));
    for (int64_t i = 0; i < d; i += VW)
        v_put(out, i, d, v_mul(v_rnd(v_mul(v_load(x, i, d, 0), r), bf), v_load(weight, i, d, bf)), bf);
}

/* v (hd, already rounded) rotated by RoPE in place: rnd(rnd(v cos) + rotate_half(v) sin) */
static void rope(float *v, int64_t hd, const void *cos, const void *sin, int bf) {
    float t[hd];
    int64_t half = hd / 2;
    for (int64_t i = 0; i < hd; i++) {
        float rot = i < half ? -v[i + half] : v[i - half];
        t[i] = rnd(rnd(v[i] * get_el(cos, i, bf), bf) + rot * get_el(sin, i, bf), bf);
    }
    memcpy(v, t, sizeof(float) * hd);
}

/* the weights a thread reads next, fetched into its L2 cache a few lines per key while it attends (the memory would
   idle otherwise): `per` lines from `at` on each call, up to `end` */
typedef struct {
    const char *at, *end;
    int64_t per;
} ahead;

static inline void fetch(ahead *a) {
    for (int64_t i = 0; i < a->per && a->at < a->end; i++, a->at += 64) _mm_prefetch(a->at, _MM_HINT_T1);
}

/* `next` for a thread's share [c0, c1) of the rows (`row` bytes each) of w, its first AHEAD_BYTES at most (with
   the keys and values the attention reads, they must fit the L2 cache: an fp32 out projection's share is 768 KiB at
   330m), spread over `keys` calls (at most AHEAD_LINES a call) */
#define AHEAD_LINES 8
#define AHEAD_BYTES (256 << 10)
static inline ahead ahead_of(const void *w, int64_t c0, int64_t c1, size_t row, int64_t keys) {
    ahead a = {(const char *)w + c0 * row, (const char *)w + c1 * row, 0};
    if (a.end - a.at > AHEAD_BYTES) a.end = a.at + AHEAD_BYTES;
    int64_t lines = (a.end - a.at + 63) / 64;
    a.per = keys > 0 ? (lines + keys - 1) / keys : 0;
    a.per = a.per < AHEAD_LINES ? a.per : AHEAD_LINES;
    return a;
}

#define V_VECTORS (64 / VW)  /* the attention's output vectors (of VW dimensions) summed over one pass of V's rows */

/* One thread's part of an attention over keys s0..s1-1 of K, V (rows of hd, the dtype; those with valid[s] when
   given): *m = the max of q . K[s] / sqrt(hd), *l = the sum of exp(score - *m), acc (hd, fp32) = the sum of exp(score
   - *m) V[s] (not divided by *l); *m = -inf, *l = 0, acc = 0 where no key is valid. combine() makes the threads'
   parts the softmax's output. scores: s1 - s0 */
static void attend_part(const float *q, const void *K, const void *V, int64_t s0, int64_t s1, int64_t hd,
                        const uint8_t *valid, float *scores, float *acc, float *m, float *l, int bf, ahead *next) {
    const size_t row = (size_t)hd * (bf ? 2 : 4);
    const int64_t n = s1 - s0;
    const float scale = 1.0f / sqrtf((float)hd);
    int64_t s = 0;
    vec top = v_set1(-INFINITY);
    for (; s + VW <= n; s += VW) {  /* VW keys at a time: one transposed sum for their VW dot products */
        vec dots[VW];
        for (int i = 0; i < VW; i++) {  /* key by key, each row front to back: one stream through K */
            fetch(next);
            dots[i] = v_zero();
            for (int64_t j = 0; j < hd; j += VW)
                dots[i] = v_fma(v_load(q, j, hd, 0), v_load((const char *)K + (s0 + s + i) * row, j, hd, bf), dots[i]);
        }
        vec sc = v_mul(v_sums(dots), v_set1(scale));
        if (valid) sc = v_ninf_where_not(sc, valid + s0 + s);
        v_put(scores, s, n, sc, 0);
        top = v_max(top, sc);
    }
    float mx = v_hmax(top);
    for (; s < n; s++) {
        fetch(next);
        if (valid && !valid[s0 + s]) { scores[s] = -INFINITY; continue; }
        vec dot = v_zero();
        for (int64_t j = 0; j < hd; j += VW)
            dot = v_fma(v_load(q, j, hd, 0), v_load((const char *)K + (s0 + s) * row, j, hd, bf), dot);
        scores[s] = v_sum(dot) * scale;
        mx = fmaxf(mx, scores[s]);
    }
    *m = mx;
    *l = 0.0f;
    for (int64_t j = 0; j < hd; j += VW) v_put(acc, j, hd, v_zero(), 0);
    if (mx == -INFINITY) return;
    vec total = v_zero();
    for (s = 0; s + VW <= n; s += VW) {
        vec sc = v_load(scores, s, n, 0), e = v_zero_where_ninf(v_exp(v_sub(sc, v_set1(mx))), sc);
        v_put(scores, s, n, e, 0);
        total = v_add(total, e);
    }
    float sum = v_sum(total);
    for (; s < n; s++) {
        scores[s] = scores[s] == -INFINITY ? 0.0f : expf(scores[s] - mx);
        sum += scores[s];
    }
    *l = sum;
    for (int64_t j0 = 0; j0 < hd; j0 += VW * V_VECTORS) {  /* V's rows front to back, once per V_VECTORS vectors */
        vec sums[V_VECTORS];  /* (in registers: every index a constant) */
        for (int c = 0; c < V_VECTORS; c++) sums[c] = v_zero();
        for (int64_t t = 0; t < n; t++) {
            if (scores[t] == 0.0f) continue;
            const vec p = v_set1(scores[t]);
            const char *v = (const char *)V + (s0 + t) * row;
            for (int c = 0; c < V_VECTORS; c++) sums[c] = v_fma(p, v_load(v, j0 + VW * c, hd, bf), sums[c]);
        }
        for (int c = 0; c < V_VECTORS; c++) v_put(acc, j0 + VW * c, hd, sums[c], 0);
    }
}

/* out (hd, the dtype) = the softmax's output from nth threads' parts (attend_part's acc, then *m, *l: hd + 2 floats
   each, `stride` apart): each part rescaled to the largest max (flash-decoding's split of the keys) */
static void combine(const float *part, int64_t stride, int nth, int64_t hd, void *out, int bf) {
    float mx = -INFINITY, sum = 0.0f, w[nth];
    for (int t = 0; t < nth; t++) mx = fmaxf(mx, part[t * stride + hd]);
    for (int t = 0; t < nth; t++) {
        w[t] = expf(part[t * stride + hd] - mx);  /* (0 for a part without valid keys) */
        sum += w[t] * part[t * stride + hd + 1];
    }
    const vec inv = v_set1(1.0f / sum);
    for (int64_t j = 0; j < hd; j += VW) {
        vec o = v_zero();
        for (int t = 0; t < nth; t++) o = v_fma(v_set1(w[t]), v_load(part + t * stride, j, hd, 0), o);
        v_put(out, j, hd, v_mul(o, inv), bf);
    }
}

static inline int64_t query_head(const mu_block *b, int64_t g, int64_t i) {  /* the i-th that reads KV head g */
    return b->interleaved ? g * (b->n_head / b->n_kv) + i : i * b->n_kv + g;
}

/* what every decoder block of a step shares: the decoder's layout in the caches, the head, and the scratch the
   threads share (allocated once per step) */
typedef struct {
    const mu_block *blocks;        /* n of them, in order */
    int64_t n;
    const void *norm;              /* the final RMSNorm's weight (its eps: eps) */
    const void *head;              /* the vocabulary projection (vocab x d; an int8 model's: codes, head_scale set) */
    const float *head_scale, *head_wsum;
    int64_t vocab;
    float eps;
    void *const *kc, *const *vc;   /* per block, its self-attention cache (n_kv x max_len x hd) */
    int64_t max_len;
    const void *const *ck, *const *cv;  /* per block, the cross-attention K/V (n_kv x S x hd), or NULL: no encoder */
    int64_t S;
    int64_t cross_bf16;            /* ck, cv hold bf16 values (a bf16 model's, or an int8 model's copies), else fp32 */
    const uint8_t *cross_valid;    /* S: the encoder positions attended, or NULL: all */
    const void *emb;               /* the token embedding (rows x d, the dtype) */
    int64_t rows;
    const void *cos, *sin;         /* RoPE's tables, max_len x hd each (the dtype) */
    uint8_t *valid;                /* the cache's slots that may be attended (max_len): each step writes its own */
    int64_t *position;             /* the sequence's next RoPE position: each step reads and advances it */
    int64_t pad;                   /* the pad token's id: its keys are masked */
} mu_decoder;

typedef struct {
    float *x, *y, *scores;  /* fp32: the residual stream (d), the products' outputs, each thread's scores */
    float *part;            /* each thread's attend_part of each head: hd + 2 floats per head (qd + 2 H a thread) */
    void *in, *o;           /* the dtype's: the next product's input, the attention's output (qd) */
    uint8_t *codes;         /* int8: the next product's input codes */
    float sx, zx;           /* their scale and zero point */
    int64_t keys;           /* scores per thread */
    uint64_t *turns;        /* per thread, 64 bytes apart: its blocks of the current product left (see take) */
} work;

/* A product's output channels in blocks of 16 are shared out as the threads go: each thread takes its own range's
   blocks front to back (one sequential stream through the weights); a thread whose range is done takes the back
   half of another's range left, as its own range (so a thread the host slows does less). A turn word packs the
   product's number (16 bits) and the blocks [lo, hi) left (24 bits each), changed by compare-and-swap. */
static inline uint64_t pack_turn(uint64_t g, int64_t lo, int64_t hi) {
    return (g & 0xffff) << 48 | (uint64_t)lo << 24 | (uint64_t)hi;
}

/* begins the thread's turn of the next product (n channels); returns the product's number */
static inline uint64_t begin_turn(work *w, int64_t n, int tid, int nth) {
    uint64_t *t = w->turns + 8 * tid, g = (__atomic_load_n(t, __ATOMIC_RELAXED) >> 48) + 1;
    int64_t blocks = (n + 15) / 16;
    __atomic_store_n(t, pack_turn(g, blocks * tid / nth, blocks * (tid + 1) / nth), __ATOMIC_RELEASE);
    return g;
}

/* the next block of product g for the thread into *b; 0 when none is left */
static inline int take(work *w, int tid, int nth, uint64_t g, int64_t *b) {
    uint64_t *own = w->turns + 8 * tid, old = __atomic_load_n(own, __ATOMIC_ACQUIRE);
    for (;;) {  /* the front of its own range */
        int64_t lo = (int64_t)(old >> 24 & 0xffffff), hi = (int64_t)(old & 0xffffff);
        if (old >> 48 != (g & 0xffff) || lo >= hi) break;
        if (__atomic_compare_exchange_n(own, &old, pack_turn(g, lo + 1, hi), 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            *b = lo;
            return 1;
        }
    }
    for (int i = 1; i < nth; i++) {  /* else the back half of another's */
        uint64_t *t = w->turns + 8 * ((tid + i) % nth), v = __atomic_load_n(t, __ATOMIC_ACQUIRE);
        for (;;) {
            int64_t lo = (int64_t)(v >> 24 & 0xffffff), hi = (int64_t)(v & 0xffffff), mid = lo + (hi - lo) / 2;
            if (v >> 48 != (g & 0xffff) || lo >= hi) break;
            if (__atomic_compare_exchange_n(t, &v, pack_turn(g, lo, mid), 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                __atomic_store_n(own, pack_turn(g, mid + 1, hi), __ATOMIC_RELEASE);
                *b = mid;
                return 1;
            }
        }
    }
    return 0;
}

/* y = the product of x and w (n channels; gemv_part's arguments) by the threads in turns; resid (may be NULL) +=
   y, block by block as they are done */
static void product(work *w, int tid, int nth, const void *x, int64_t k, const void *wt, const void *bias, float *y,
                    int64_t n, int bf, dot_fn dot, const float *scale, const float *wsum, float *resid) {
    uint64_t g = begin_turn(w, n, tid, nth);
    int64_t b;
    while (take(w, tid, nth, g, &b)) {
        int64_t c0 = 16 * b, c1 = 16 * b + 16 < n ? 16 * b + 16 : n;
        gemv_part(x, k, wt, bias, y, c0, c1, bf, dot, scale, wsum, w->sx, w->zx);
        if (resid) add_residual(resid, y, c0, c1, bf);
    }
}

/* w->in (and, for int8 products, q8, w->codes) = the residual stream (d) normed by `weight`, by one thread of the
   region */
static void norm_input(work *w, int64_t d, const void *weight, float eps, int q8, int bf) {
    #pragma omp single
    {
        rms_norm(w->x, d, weight, eps, w->in, bf);
        if (q8) input_codes(w->in, d, w->codes, &w->sx, &w->zx);
    }
}

/* an attention and its out projection, by every thread of the region: each thread takes its share of the keys
   0..L-1 of K, V (n_kv x stride x hd, bf16 where kvbf, else fp32; those with valid[s] when given: at least one, as
   mu.model.layers' masks leave) and attends to it with every query head (queries in w->y, head h at h hd; each KV
   head's rows read from memory once, by one thread), fetching its share of wo meanwhile; one thread combines the
   parts into w->o (the dtype); then the residual stream += the out projection (wo, bo: product p) of w->o */
static void attend_out(const mu_block *b, work *w, const void *K, const void *V, int kvbf, int64_t stride,
                       int64_t L, const uint8_t *valid, const void *wo, const void *bo, int p, int tid, int nth, int bf,
                       dot_fn dot) {
    const int64_t H = b->n_head, hd = b->hd, qd = H * hd, per = b->n_head / b->n_kv;
    const size_t es = bf ? 2 : 4, row = (size_t)qd * (b->scale[0] ? 1 : es);
    int64_t c0, c1, s0, s1;
    share(b->d, tid, nth, &c0, &c1);
    share(L, tid, nth, &s0, &s1);
    ahead next = ahead_of(wo, c0, c1, row, H * (s1 - s0));
    float *part = w->part + (int64_t)tid * (qd + 2 * H);
    for (int64_t g = 0; g < b->n_kv; g++) {  /* a KV head's query heads in turn: the second finds its rows in cache */
        size_t at = (size_t)g * stride * hd * (kvbf ? 2 : 4);
        for (int64_t i = 0; i < per; i++) {
            int64_t h = query_head(b, g, i);
            float *ph = part + h * (hd + 2);
            attend_part(w->y + h * hd, (const char *)K + at, (const char *)V + at, s0, s1, hd, valid,
                        w->scores + (int64_t)tid * w->keys, ph, ph + hd, ph + hd + 1, kvbf, &next);
        }
    }
    #pragma omp barrier
    #pragma omp single
    {
        for (int64_t h = 0; h < H; h++)
            combine(w->part + h * (hd + 2), qd + 2 * H, nth, hd, (char *)w->o + h * hd * es, bf);
        if (b->scale[0]) input_codes(w->o, qd, w->codes, &w->sx, &w->zx);
    }
    product(w, tid, nth, b->scale[0] ? (const void *)w->codes : w->o, qd, wo, bo, w->y, b->d, bf, dot, b->scale[p],
            b->wsum[p], w->x);
    #pragma omp barrier
}

/* the block applied to w->x (d, fp32: rounded to the dtype) at cache slot `slot`, by every thread of the enclosing
   parallel region (thread tid of nth): the token's K/V go into kc, vc there, self-attention reads slots 0..slot
   (those with self_valid[s] when given), cross-attention reads ck, cv (bf16 values where cross_bf16; positions with
   cross_valid[s] when given; none when the block has no cross-attention, cwq NULL: a decoder-only block, whose MLP
   norm is ln3) */
static void block_step(const mu_block *b, work *w, const void *cos, const void *sin, void *kc, void *vc,
                       int64_t max_len, int64_t slot, const uint8_t *self_valid, const void *ck, const void *cv,
                       int cross_bf16, int64_t S, const uint8_t *cross_valid, int tid, int nth, int bf, dot_fn dot) {
    const int64_t d = b->d, H = b->n_head, KV = b->n_kv, hd = b->hd, qd = H * hd, kvd = KV * hd, F = b->hidden;
    const int q8 = b->scale[0] != NULL;
    float *x = w->x, *y = w->y;
    void *in = w->in;
    const void *from_in = q8 ? (const void *)w->codes : in;
    int64_t c0, c1;

    /* self-attention */
    norm_input(w, d, b->ln1, b->eps, q8, bf);
    product(w, tid, nth, from_in, d, b->wq, b->bq, y, qd, bf, dot, b->scale[P_Q], b->wsum[P_Q], NULL);
    product(w, tid, nth, from_in, d, b->wk, b->bk, y + qd, kvd, bf, dot, b->scale[P_K], b->wsum[P_K], NULL);
    product(w, tid, nth, from_in, d, b->wv, b->bv, y + qd + kvd, kvd, bf, dot, b->scale[P_V], b->wsum[P_V], NULL);
    #pragma omp barrier
    #pragma omp single
    for (int64_t h = 0; h < H + KV; h++) {  /* q and k heads rotated; the token's K/V into the cache */
        rope(y + h * hd, hd, cos, sin, bf);
        if (h >= H)
            for (int64_t i = 0; i < hd; i++) {
                int64_t at = ((h - H) * max_len + slot) * hd + i;
                put_el(kc, at, y[h * hd + i], bf);
                put_el(vc, at, y[qd + kvd + (h - H) * hd + i], bf);
            }
    }
    attend_out(b, w, kc, vc, bf, max_len, slot + 1, self_valid, b->wo, b->bo, P_O, tid, nth, bf, dot);

    if (b->cwq) {  /* cross-attention (a decoder-only block has none) */
        norm_input(w, d, b->ln2, b->eps, q8, bf);
        product(w, tid, nth, from_in, d, b->cwq, b->cbq, y, qd, bf, dot, b->scale[P_CQ], b->wsum[P_CQ], NULL);
        #pragma omp barrier
        attend_out(b, w, ck, cv, cross_bf16, S, S, cross_valid, b->cwo, b->cbo, P_CO, tid, nth, bf, dot);
    }

    /* MLP: tanh-GELU as x sigmoid(2z) (mu.model.layers.gelu_tanh) */
    norm_input(w, d, b->ln3, b->eps, q8, bf);
    product(w, tid, nth, from_in, d, b->w1, b->b1, y, F, bf, dot, b->scale[P_W1], b->wsum[P_W1], NULL);
    #pragma omp barrier  /* (`in` is read by every thread's fc1 before anyone writes fc2's input into it) */
    share(F, tid, nth, &c0, &c1);
    for (int64_t c = c0; c < c1; c += VW) v_put(in, c, c1, v_gelu(v_load(y, c, c1, 0)), bf);
    #pragma omp barrier
    if (q8) {
        #pragma omp single
        input_codes(in, F, w->codes, &w->sx, &w->zx);
    }
    product(w, tid, nth, from_in, F, b->w2, b->b2, y, d, bf, dot, b->scale[P_W2], b->wsum[P_W2], x);
    #pragma omp barrier
}

/* the largest of v[c0..c1) (the dtype) and its first index into *where (-1 when empty): torch.argmax's pick, NaN the
   largest */
static float first_max(const void *v, int64_t c0, int64_t c1, int bf, int64_t *where) {
    *where = c0 < c1 ? c0 : -1;
    float best = c0 < c1 ? get_el(v, c0, bf) : -INFINITY;
    for (int64_t c = c0 + 1; c < c1 && best == best; c++) {
        float x = get_el(v, c, bf);
        if (!(x <= best)) best = x, *where = c;
    }
    return best;
}

/* logits (vocab, the dtype; an int8 model's: fp32) of the token xin (d, the dtype) at cache slot `slot`, and their
   greedy pick into *pick: every block of s in turn (block_step), the final RMSNorm and the vocabulary projection,
   in one parallel region. Returns 0, or -1 if out of memory. */
static int run_step(const mu_decoder *s, const void *xin, void *logits, int64_t *pick, const void *cos,
                    const void *sin, int64_t slot, const uint8_t *self_valid, int nt, int bf, dot_fn dot) {
    const size_t es = bf ? 2 : 4;
    const int64_t d = s->blocks[0].d, L = slot + 1;
    int64_t wide = d, qd = 0, parts = 0;  /* the widest product output (or input), attention output, attend_parts */
    for (int64_t i = 0; i < s->n; i++) {
        const mu_block *b = &s->blocks[i];
        int64_t q = b->n_head * b->hd, qkv = q + 2 * b->n_kv * b->hd;
        wide = wide > b->hidden ? wide : b->hidden;
        wide = wide > qkv ? wide : qkv;
        qd = qd > q ? qd : q;
        parts = parts > q + 2 * b->n_head ? parts : q + 2 * b->n_head;
    }
    work w = {.keys = L > s->S ? L : s->S};
    int64_t ny = wide > s->vocab ? wide : s->vocab;
    w.x = malloc(sizeof(float) * (size_t)(d + ny + (int64_t)nt * (w.keys + parts)) + es * (size_t)(wide + qd) +
                 (size_t)wide + K_MULTIPLE + 3 * 128);
    w.turns = aligned_alloc(64, (size_t)nt * 64);
    if (!w.x || !w.turns) {
        free(w.x);
        free(w.turns);
        return -1;
    }
    memset(w.turns, 0, (size_t)nt * 64);
    w.y = w.x + d;
    w.scores = w.y + ny;
    w.part = w.scores + (int64_t)nt * w.keys;
    w.in = skewed((char *)(w.part + (int64_t)nt * parts));  /* the products' inputs, skewed (X_SKEW) */
    w.o = skewed((char *)w.in + es * wide);
    w.codes = (uint8_t *)skewed((char *)w.o + es * qd);
    const int q8 = s->head_scale != NULL;
    for (int64_t i = 0; i < d; i++) w.x[i] = get_el(xin, i, bf);
    float top[nt];  /* each thread's largest logit and where (-1: none), of the `used` threads */
    int64_t at[nt];
    int used = 1;
    #pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        for (int64_t i = 0; i < s->n; i++)
            block_step(&s->blocks[i], &w, cos, sin, s->kc[i], s->vc[i], s->max_len, slot, self_valid,
                       s->ck ? s->ck[i] : NULL, s->cv ? s->cv[i] : NULL, (int)s->cross_bf16, s->S, s->cross_valid, tid,
                       nth, bf, dot);
        norm_input(&w, d, s->norm, s->eps, q8, bf);
        product(&w, tid, nth, q8 ? (const void *)w.codes : w.in, d, s->head, NULL, w.y, s->vocab, bf, dot,
                s->head_scale, s->head_wsum, NULL);
        #pragma omp barrier
        int64_t c0, c1;
        share(s->vocab, tid, nth, &c0, &c1);
        for (int64_t c = c0; c < c1; c += VW) v_put(logits, c, c1, v_load(w.y, c, c1, 0), bf);
        top[tid] = first_max(logits, c0, c1, bf, &at[tid]);
        if (tid == 0) used = nth;
    }
    free(w.x);
    free(w.turns);
    *pick = at[0];
    for (int i = 1; i < used && top[0] == top[0]; i++)  /* the first thread's pick unless a later one is larger */
        if (at[i] >= 0 && !(top[i] <= top[0])) top[0] = top[i], *pick = at[i];
    return 0;
}

/* the logits of the token *token at cache slot `slot` and their greedy pick (*pick), with what a step does beside
   the layers: the token's embedding row, RoPE at *s->position (then advanced), the slot marked valid unless the
   token is the pad; the keys masked by s->valid when `masked` or the token is the pad. Returns 0, 1 when the token
   was the pad, -1 if out of memory, -2 for a token id outside the embedding, -3 for a slot or position outside the
   cache. */
static int decoder_step(const mu_decoder *s, const int64_t *token, void *logits, int64_t *pick, int64_t slot,
                        int masked, int nt, int bf, dot_fn dot) {
    const int64_t t = *token, at = *s->position, d = s->blocks[0].d, hd = s->blocks[0].hd;
    const size_t es = bf ? 2 : 4;
    if (t < 0 || t >= s->rows) return -2;
    if (slot < 0 || slot >= s->max_len || at < 0 || at >= s->max_len) return -3;
    const int pad = t == s->pad;
    s->valid[slot] = !pad;
    const size_t row = (size_t)(at * hd) * es;
    int rc = run_step(s, (const char *)s->emb + (size_t)(t * d) * es, logits, pick, (const char *)s->cos + row,
                      (const char *)s->sin + row, slot, masked || pad ? s->valid : NULL, nt, bf, dot);
    if (rc) return rc;
    *s->position = at + 1;
    return pad;
}

/* up to n greedy steps of one sequence in one call, from the token *token at cache slot `slot`: each
   decoder_step's pick (into out) is the next step's token; the last is eos where one is given (eos >= 0) and picked.
   logits (vocab, the dtype) holds the last step's. on_token (may be NULL) is called with each token's index in out
   as it is picked, and stops the steps by returning nonzero. *pads = 1 if a token fed was the pad. Returns the number
   of steps, or decoder_step's error (n = 1: one step, its logits and pick) */
typedef int (*token_fn)(int64_t);

static int64_t decoder_steps(const mu_decoder *s, const int64_t *token, int64_t slot, int masked, int64_t n,
                             int64_t eos, token_fn on_token, void *logits, int64_t *out, int64_t *pads, int nt, int bf,
                             dot_fn dot) {
    int64_t t = *token, i = 0;
    *pads = 0;
    while (i < n) {
        int rc = decoder_step(s, &t, logits, &out[i], slot + i, masked, nt, bf, dot);
        if (rc < 0) return rc;
        if (rc == 1) masked = 1, *pads = 1;
        t = out[i];
        int stop = (on_token && on_token(i)) || t == eos;
        i++;
        if (stop) break;
    }
    return i;
}

/* decoder_steps for each kind of model: fp32, int8 (fp32 activations), bf16 */
#define DECODER_STEPS(kind, bf, dot)                                                                                \
    int64_t mu_decoder_steps_##kind(const mu_decoder *s, const int64_t *token, int64_t slot, int masked, int64_t n, \
                                    int64_t eos, token_fn on_token, void *logits, int64_t *out, int64_t *pads,      \
                                    int nt) {                                                                       \
        return decoder_steps(s, token, slot, masked, n, eos, on_token, logits, out, pads, nt, bf, dot);             \
    }

DECODER_STEPS(f32, 0, dot_f32)

#if VW == 16 && defined(__AVX512VNNI__)
/* the u8 x s8 dot product of k codes (vpdpbusd: four products into each int32 lane; 255 x 63 x 4 fits), as a float */
static inline float dot_u8s8(const void *xv, const void *wv, int64_t k) {
    const uint8_t *x = xv;
    const int8_t *w = wv;
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512(), a2 = _mm512_setzero_si512(),
            a3 = _mm512_setzero_si512();
    int64_t j = 0;
    for (; j + 256 <= k; j += 256) {
        a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(x + j), _mm512_loadu_si512(w + j));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(x + j + 64), _mm512_loadu_si512(w + j + 64));
        a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512(x + j + 128), _mm512_loadu_si512(w + j + 128));
        a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512(x + j + 192), _mm512_loadu_si512(w + j + 192));
    }
    for (; j < k; j += 64) {
        __mmask64 m = k - j >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k - j)) - 1);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_maskz_loadu_epi8(m, x + j), _mm512_maskz_loadu_epi8(m, w + j));
    }
    return (float)_mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
}

/* an int8 model's decoder: fp32 activations, the products over 7-bit weight codes (`scale`, `wsum`, `head_scale`,
   `head_wsum` set) */
DECODER_STEPS(i8, 0, dot_u8s8)
#elif VW == 8
/* an int8 model's decoder on AVX2 CPUs (panel_part: the layers' packed codes, `scale`, `wsum`, `head_scale`,
   `head_wsum` set and padded to the panels) */
DECODER_STEPS(i8, 0, NULL)
#endif


#if VW == 16 && defined(__AVX512BF16__)
/* vdpbf16ps multiplies pairs of bf16 values and adds both products into an fp32 lane */
static inline __m512bh load_bf16(const uint16_t *p, int64_t left) {
    if (left >= 32) return (__m512bh)_mm512_loadu_si512(p);
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << left) - 1), p);
}

static inline float dot_bf16(const void *xv, const void *wv, int64_t k) {
    const uint16_t *x = xv, *w = wv;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 128 <= k; j += 128) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + j), (__m512bh)_mm512_loadu_si512(w + j));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + j + 32), (__m512bh)_mm512_loadu_si512(w + j + 32));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(x + j + 64), (__m512bh)_mm512_loadu_si512(w + j + 64));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(x + j + 96), (__m512bh)_mm512_loadu_si512(w + j + 96));
    }
    for (; j < k; j += 32) a0 = _mm512_dpbf16_ps(a0, load_bf16(x + j, k - j), load_bf16(w + j, k - j));
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

static inline void store_bf16x16(void *p, __m512 y, __mmask16 valid) {  /* rounded to nearest even */
    _mm256_mask_storeu_epi16(p, valid, (__m256i)_mm512_cvtneps_pbh(y));
}

/* the same in bf16: fp32 sums, rounded to bf16 once */
void mu_gemv_bf16(const uint16_t *x, int64_t rows, int64_t k, const uint16_t *w, int64_t n, const uint16_t *bias,
                  uint16_t *out, int nt) {
    gemv_rows((const char *)x, rows, k, (const char *)w, n, (const char *)bias, (char *)out, nt, 2, dot_bf16,
              load_bf16x16, store_bf16x16);
}

DECODER_STEPS(bf16, 1, dot_bf16)
#endif
#endif
