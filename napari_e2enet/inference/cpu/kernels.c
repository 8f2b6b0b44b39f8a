/* napari-e2enet sparse inference kernels (see kernels.h for the layout and docs/cpu-fast-path.md
   for the design and the measurements). Portable C with GCC/Clang vector extensions: v16 is 16
   floats; the compiler maps it to one AVX-512 register, two AVX2 registers or four SSE/NEON
   ones. OpenMP where the compiler has it (-fopenmp), sharing PyTorch's libgomp. */
#include "kernels.h"

#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#define TID() omp_get_thread_num()
#define OMP_ONLY(x) ((void)0)
#else
#define TID() 0
#define OMP_ONLY(x) ((void)(x)) /* without OpenMP the thread count is not used */
#endif

/* GCC warns that passing 64-byte vectors by value changes the ABI without AVX-512; every function
   that does so is static inline in this file, so no ABI crosses a library boundary. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int i16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32))); /* one AVX2 register */
#if defined(__clang__)
#define ILO(e, f) __builtin_shufflevector(e, f, 0,16,1,17,2,18,3,19,4,20,5,21,6,22,7,23)
#define IHI(e, f) __builtin_shufflevector(e, f, 8,24,9,25,10,26,11,27,12,28,13,29,14,30,15,31)
#else
#define ILO(e, f) __builtin_shuffle(e, f, (i16){0,16,1,17,2,18,3,19,4,20,5,21,6,22,7,23})
#define IHI(e, f) __builtin_shuffle(e, f, (i16){8,24,9,25,10,26,11,27,12,28,13,29,14,30,15,31})
#endif
#define LDU(p) (*(const v16u *)(p))
#define LDA(p) (*(const v16 *)(p))
#define BC(s) ((v16){0} + (float)(s))
#if defined(__AVX512F__)
#define RB 8
#else
#define RB 4
#endif
/* bf16 dot products (AVX512-BF16, Zen 4 / Cooper Lake and later) for e2e_sconv133_bf16: compiled
   into the AVX-512 build as functions of their own target, called only where the CPU has the
   flag (the bindings check /proc/cpuinfo); GCC >= 10 and Clang >= 9 know the intrinsics. */
#if defined(__AVX512F__) && ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10))
#define E2E_BF16 1
#define BF16_TARGET __attribute__((target("avx512bf16")))
#else
#define E2E_BF16 0
#endif

/* Dynamic scheduling: on a shared machine one thread may get less CPU than the other; static
   partitions would then wait for it at the barrier. Chunks keep neighbouring tiles together. */
#ifdef E2E_STATIC
#define SCHED(n) static
#else
#define SCHED(n) dynamic, (n)
#endif

#ifndef E2E_PF
#define E2E_PF 32 /* floats ahead of the tile: the line the next tile of this row reads first */
#endif

int e2e_abi_version(void) { return E2E_ABI_VERSION; }
int e2e_row_block(void) { return RB; }
int e2e_bf16_built(void) { return E2E_BF16; }

/* C11 aligned_alloc wants a size that is a multiple of the alignment (glibc does not mind,
   AddressSanitizer does: it found the cl_stats scratch of 2C+32 floats). */
static inline void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

static inline void store_n(float *dst, const float *src16, int n) {
    memcpy(dst, src16, sizeof(float) * (size_t)n);
}

static inline void store_v(float *dst, v16 v, int n, int nt) {
    if (n >= 16) {
#if defined(__AVX512F__)
        if (nt) { _mm512_stream_ps(dst, (__m512)v); return; }
#else
        (void)nt; /* streaming stores are AVX-512 only */
#endif
        *(v16u *)dst = v;
        return;
    }
    float tmp[16] __attribute__((aligned(64)));
    *(v16 *)tmp = v;
    store_n(dst, tmp, n);
}

static inline v16 vmax(v16 a, v16 b) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    /* two vmaxps (a > b ? a : b, as below): GCC turns the mask form into compare + and + andnot + or
       per ymm half, which made the lazy norm's leaky ReLU and e2e_maxpool 4x the work on AVX2 */
    v16 r;
    const __m256 *pa = (const __m256 *)&a, *pb = (const __m256 *)&b;
    __m256 *pr = (__m256 *)&r;
    pr[0] = _mm256_max_ps(pa[0], pb[0]);
    pr[1] = _mm256_max_ps(pa[1], pb[1]);
    return r;
#else
    const i16 g = a > b;
    return (v16)((g & (i16)a) | (~g & (i16)b));
#endif
}

static inline void fence(void) {
#if defined(__AVX512F__) || defined(__AVX2__)
    _mm_sfence(); /* order the streaming stores before the threads join */
#endif
}

/* bfloat16 as stored by PyTorch (the high half of a float32): widening is exact; narrowing rounds
   to nearest even, as torch's .to(torch.bfloat16) does, and keeps NaN a NaN. */
static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* "Lazy" instance norm: a PP tensor may hold a conv's raw output while its consumers read
   leaky(a[c] * x + b[c], s[c]) (the InstanceNorm affine and LeakyReLU of that conv): the
   normalisation costs no pass of its own. ia == NULL means every channel is read as stored. */
static inline v16 xform(v16 x, float a, float b, float s) {
    const v16 v = BC(a) * x + BC(b);
    return vmax(v, BC(s) * v); /* leaky ReLU for 0 <= s <= 1 */
}

static inline int is_identity(const float *ia, const float *ib, const float *is, int i) {
    return ia == NULL || (ia[i] == 1.f && ib[i] == 0.f && is[i] == 1.f);
}

#if !(defined(__AVX2__) && !defined(__AVX512F__))
#define STAT_LANES 1
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
/* AVX2 sconv133 (see docs/cpu-fast-path.md, "AVX2 profile"). The kernels read each tap's input
   straight from RB + 2 row pointers with unaligned loads (L1) instead of from a copy of three
   shifted vectors per row: for channels read as stored the rows are the PP tensor's own (its
   zero halo rows and padding columns are the convolution's zero padding), for channels read
   through the lazy norm they are rows of a small per-thread buffer normalised once per (channel,
   tile). The v16 copy (30 vectors, the norm applied three times per row through a v16 vmax that
   GCC spilled to the stack) was 46 % of the kernel's cycles at 128^3 (perf, 2026-12-07). */
#define STAT_LANES 4 /* double lanes per channel statistic (sconv_store_avx2) */
#define NROW_PITCH 32 /* floats per normalised row: [7] column w0-1, [8..23] w0..w0+15, [24] w0+16 */

static inline float leaky1(float x, float a, float b, float s) {
    const float v = a * x + b;
    return v > s * v ? v : s * v;
}

/* rows h0-1 .. h0+RB of one input channel through the lazy norm, zero outside the image */
static inline void norm_rows_avx2(float *T, const float *rp, int P, int h0, int H, int w0, int W, int ncol,
                                  float a, float b, float s)
{
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vs = _mm256_set1_ps(s);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    /* all-ones where the column is inside the image: and, not multiply (0 * inf is nan) */
    const __m256 keep0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(ncol), lane));
    const __m256 keep1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(ncol - 8), lane));
    for (int j = 0; j < RB + 2; j++) {
        float *t = T + NROW_PITCH * j;
        const int hh = h0 + j - 1;
        if (hh < 0 || hh >= H) {
            for (int c = 0; c < NROW_PITCH; c += 8) _mm256_store_ps(t + c, _mm256_setzero_ps());
            continue;
        }
        const float *r = rp + (size_t)j * P;
        __m256 v0 = _mm256_fmadd_ps(va, _mm256_load_ps(r), vb);
        __m256 v1 = _mm256_fmadd_ps(va, _mm256_load_ps(r + 8), vb);
        v0 = _mm256_max_ps(v0, _mm256_mul_ps(vs, v0));
        v1 = _mm256_max_ps(v1, _mm256_mul_ps(vs, v1));
        _mm256_store_ps(t + 8, _mm256_and_ps(v0, keep0));
        _mm256_store_ps(t + 16, _mm256_and_ps(v1, keep1));
        t[7] = w0 > 0 ? leaky1(r[-1], a, b, s) : 0.f;
        t[24] = w0 + 16 < W ? leaky1(r[16], a, b, s) : 0.f;
    }
}

/* The tile's outputs from acc (O x RB rows x 16 columns) to out (row h0+1, column w0 of output
   channel 0; columns past the image are stored as zeros, then `tail` more zeros to the row's end),
   the statistics as 4 double lanes per channel (st[4o..], st[4(O+o)..]). The v16 form summed 32
   lanes in scalar per channel and tile: a fifth of the kernel at 96 -> 48, density 0.1. */
static inline void sconv_store_avx2(const float *acc, int O, int nrow, int ncol, float *out, int64_t ostride,
                                    int P, int tail, double *st, int nt)
{
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 keep0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(ncol), lane));
    const __m256 keep1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(ncol - 8), lane));
    for (int o = 0; o < O; o++) {
        float *pl = out + (size_t)o * ostride;
        __m256 s = _mm256_setzero_ps(), s2 = _mm256_setzero_ps();
        for (int j = 0; j < nrow; j++) {
            __m256 a = _mm256_load_ps(acc + ((size_t)o * RB + j) * 16), b = _mm256_load_ps(acc + ((size_t)o * RB + j) * 16 + 8);
            if (ncol < 16) { a = _mm256_and_ps(a, keep0); b = _mm256_and_ps(b, keep1); }
            float *row = pl + (size_t)j * P;
            if (nt) { /* a full 64-byte line, 64-byte aligned: no read for ownership */
                _mm256_stream_ps(row, a);
                _mm256_stream_ps(row + 8, b);
            } else {
                _mm256_storeu_ps(row, a);
                _mm256_storeu_ps(row + 8, b);
            }
            if (tail > 0) memset(row + 16, 0, sizeof(float) * (size_t)tail);
            s = _mm256_add_ps(s, _mm256_add_ps(a, b));
            s2 = _mm256_fmadd_ps(a, a, _mm256_fmadd_ps(b, b, s2));
        }
        if (st) {
            double *so = st + 4 * (size_t)o, *qo = st + 4 * ((size_t)O + o);
            const __m256d s4 = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(s)), _mm256_cvtps_pd(_mm256_extractf128_ps(s, 1)));
            const __m256d q4 = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(s2)), _mm256_cvtps_pd(_mm256_extractf128_ps(s2, 1)));
            _mm256_storeu_pd(so, _mm256_add_pd(_mm256_loadu_pd(so), s4));
            _mm256_storeu_pd(qo, _mm256_add_pd(_mm256_loadu_pd(qo), q4));
        }
    }
}

/* acc[o] (RB rows x 16 columns) += the active kernels k0 .. k1 of one input channel, whose rows
   h0-1 .. h0+RB start at R[0 .. RB+1] (column w0; columns w0-1 and w0+16 readable). One tap at a
   time: one broadcast, RB rows x 2 halves = 8 independent ymm accumulators, the inputs as memory
   operands: no spill in 16 ymm registers. */
static inline void sconv_taps_avx2(const float *const *R, float *acc, const int *rowidx, const float *wts,
                                   int k0, int k1)
{
    for (int k = k0; k < k1; k++) {
        float *acc_o = acc + (size_t)rowidx[k] * RB * 16;
        const float *q = wts + 9 * (size_t)k;
        __m256 A0[RB], A1[RB];
#pragma GCC unroll 16
        for (int j = 0; j < RB; j++) {
            A0[j] = _mm256_load_ps(acc_o + 16 * j);
            A1[j] = _mm256_load_ps(acc_o + 16 * j + 8);
        }
#pragma GCC unroll 3
        for (int dy = 0; dy < 3; dy++) {
#pragma GCC unroll 3
            for (int dx = 0; dx < 3; dx++) {
                const __m256 w = _mm256_broadcast_ss(q + 3 * dy + dx);
#pragma GCC unroll 16
                for (int j = 0; j < RB; j++) {
                    A0[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(R[j + dy] + dx - 1), A0[j]);
                    A1[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(R[j + dy] + dx + 7), A1[j]);
                }
            }
        }
#pragma GCC unroll 16
        for (int j = 0; j < RB; j++) {
            _mm256_store_ps(acc_o + 16 * j, A0[j]);
            _mm256_store_ps(acc_o + 16 * j + 8, A1[j]);
        }
    }
}
#endif

/* Up-sampled input channels computed where the fusion conv reads them (e2e_sconv133_up): input
   channels [u0, u1) of the conv are a ConvTranspose3d, kernel == stride == (2, 2, 2), of a deeper
   PP tensor; channel u0 + c is the transposed conv's output umap[c] (-1: no kernels read it).
   Instead of a whole up-sampled tensor in memory (48 channels of 128^3 at level 0 of the paper
   network: the transposed conv wrote ~2.9 GB a forward and the fusion conv read it back), each
   thread fills a strip of RB + 2 rows per up channel when it starts a row block. */
typedef struct {
    int u0, u1;
    const int *umap;
    const float *deep;      /* channel 0, plane 0, row 0 of the deeper PP tensor */
    int Hl, Pl;
    int64_t dstride;        /* floats between deeper channels */
    const float *da, *db, *ds; /* the deeper tensor's lazy norm, NULL: as stored */
    const int *rowptr, *colidx;
    const float *wts;       /* 8 taps per kernel, (depth, row, column) parity order */
} UpSrc;

/* One up-sampled row (image row y, slice z) of transposed-conv output m into row[0 .. W): the same
   sums in the same order as e2e_convt, so the values are bit-identical to it. W / 2 a multiple of 8. */
static void up_row(const UpSrc *u, int m, int z, int y, float *row, int W)
{
    const int Wl = W / 2, tap = ((z & 1) * 2 + (y & 1)) * 2;
    const size_t off = (size_t)(z >> 1) * (size_t)(u->Hl + 2) * u->Pl + (size_t)((y >> 1) + 1) * u->Pl;
    const int k0 = u->rowptr[m], k1 = u->rowptr[m + 1];
#if defined(__AVX2__)
    for (int g = 0; g < Wl; g += 32) {
        const int nv = Wl - g < 32 ? (Wl - g) / 8 : 4;
        __m256 A0[4], A1[4];
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++) { A0[v] = _mm256_setzero_ps(); A1[v] = _mm256_setzero_ps(); }
        for (int k = k0; k < k1; k++) {
            const int j = u->colidx[k];
            const float *src = u->deep + (size_t)j * u->dstride + off + g;
            const __m256 w0 = _mm256_broadcast_ss(u->wts + 8 * (size_t)k + tap);
            const __m256 w1 = _mm256_broadcast_ss(u->wts + 8 * (size_t)k + tap + 1);
            const int id = is_identity(u->da, u->db, u->ds, j);
            const __m256 va = _mm256_set1_ps(id ? 1.f : u->da[j]), vb = _mm256_set1_ps(id ? 0.f : u->db[j]);
            const __m256 vs = _mm256_set1_ps(id ? 1.f : u->ds[j]);
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) {
                if (v >= nv) break;
                __m256 x = _mm256_load_ps(src + 8 * v);
                if (!id) {
                    x = _mm256_fmadd_ps(va, x, vb);
                    x = _mm256_max_ps(x, _mm256_mul_ps(vs, x));
                }
                A0[v] = _mm256_fmadd_ps(w0, x, A0[v]);
                A1[v] = _mm256_fmadd_ps(w1, x, A1[v]);
            }
        }
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++) {
            if (v >= nv) break;
            const __m256 lo = _mm256_unpacklo_ps(A0[v], A1[v]), hi = _mm256_unpackhi_ps(A0[v], A1[v]);
            _mm256_store_ps(row + 2 * (g + 8 * v), _mm256_permute2f128_ps(lo, hi, 0x20));
            _mm256_store_ps(row + 2 * (g + 8 * v) + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
        }
    }
#else
    for (int x = 0; x < Wl; x++) {
        float a0 = 0.f, a1 = 0.f;
        for (int k = k0; k < k1; k++) {
            const int j = u->colidx[k];
            float v = u->deep[(size_t)j * u->dstride + off + x];
            if (!is_identity(u->da, u->db, u->ds, j)) {
                v = u->da[j] * v + u->db[j];
                v = v > u->ds[j] * v ? v : u->ds[j] * v;
            }
            a0 += u->wts[8 * (size_t)k + tap] * v;
            a1 += u->wts[8 * (size_t)k + tap + 1] * v;
        }
        row[2 * x] = a0;
        row[2 * x + 1] = a1;
    }
#endif
}

/* The strip rows h0-1 .. h0+RB of every up channel read at output slice d (its depth shift
   applied); rows outside the image are zero, and so are the padding columns W .. P-1 (set once).
   next: the strip holds the row block above (same slice), whose last 2 rows are this one's first 2
   (moved, not computed again: a third of the ConvT work). */
static void up_fill(const UpSrc *u, float *strip, size_t slab, int d, int h0, int D, int H, int W, int P,
                    const int *dshift, const int *colptr, int next)
{
    for (int i = u->u0; i < u->u1; i++) {
        const int m = u->umap[i - u->u0], z = d + dshift[i];
        if (m < 0 || colptr[i] == colptr[i + 1] || z < 0 || z >= D) continue;
        float *base = strip + (size_t)(i - u->u0) * slab + 16;
        if (next) memcpy(base, base + (size_t)RB * P, sizeof(float) * 2 * (size_t)P);
        for (int j = next ? 2 : 0; j < RB + 2; j++) {
            const int y = h0 + j - 1;
            if (y < 0 || y >= H) memset(base + (size_t)j * P, 0, sizeof(float) * (size_t)W);
            else up_row(u, m, z, y, base + (size_t)j * P, W);
        }
    }
}

/* Sparse (1,3,3) convolution, stride 1, zero padding (0,1,1), with a per-input-channel depth
   offset (the restricted depth shift: channel i reads slice d + dshift[i], zero outside).
   chan[i]: address of input channel i (plane 0, row 0, column 0) in a PP tensor of shape (D,H,W),
   read through the lazy norm (ia, ib, is). Weights in CSC by input channel: outputs
   rowidx[colptr[i]..colptr[i+1]), taps wts[9k..9k+9).
   out: O channels PP (64-byte aligned), channel stride ostride floats; raw conv output, interior
   and halo written, for the output depths [d0, d1) only (a caller may feed the input in depth
   pieces: only slices d0-1 .. d1 of each input channel are read).
   stats (optional): stats[o] += sum, stats[O+o] += sum of squares.
   nt: use streaming stores for the output (large outputs). */
#if E2E_BF16
/* One input channel's visit of a tile in bf16 (e2e_sconv133_bf16). A dot-product lane j takes two
   bf16 products, so the 3 x 3 taps are paired vertically: E[3p + s] interleaves tile rows 2p and
   2p + 1 at column shift s (lane j: both rows at column j), and output row j reads E[3p .. 3p + 5]
   (p = j / 2, rows 2p .. 2p + 3) with 6 weight pairs, wp[0..5] for even rows and wp[6..11] for
   odd ones (bindings: the packing). 48 dot products per kernel and tile instead of 72 FMAs; the
   pairs are rounded (RNE) once per visit and feed all of the channel's active kernels.
   noinline: it is the only code of its target, called from a function that is not. */
static BF16_TARGET __attribute__((noinline)) void sconv_channel_bf16(const v16 *X, float *acc, const int *rowidx,
                                                                     const uint32_t *wp, int k0, int k1)
{
    static const short interleave[32] __attribute__((aligned(64))) = {
        0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i il = _mm512_load_si512((const void *)interleave);
    __m512bh E[3 * (RB / 2 + 1)];
#pragma GCC unroll 16
    for (int p = 0; p <= RB / 2; p++)
#pragma GCC unroll 3
        for (int s = 0; s < 3; s++) {
            const __m512bh t = _mm512_cvtne2ps_pbh((__m512)X[3 * (2 * p + 1) + s], (__m512)X[3 * (2 * p) + s]);
            E[3 * p + s] = (__m512bh)_mm512_permutexvar_epi16(il, (__m512i)t);
        }
    for (int k = k0; k < k1; k++) {
        float *a = acc + (size_t)rowidx[k] * RB * 16;
        const uint32_t *w = wp + 12 * (size_t)k;
        __m512bh Wt[12];
#pragma GCC unroll 12
        for (int q = 0; q < 12; q++) Wt[q] = (__m512bh)_mm512_set1_epi32((int)w[q]);
#pragma GCC unroll 16
        for (int j = 0; j < RB; j++) {
            const __m512bh *e = E + 3 * (j / 2), *wj = Wt + 6 * (j & 1);
            /* two chains of 3 dot products: one chain of 6 left the stores waiting on its latency */
            __m512 A = _mm512_load_ps(a + 16 * j), B = _mm512_setzero_ps();
#pragma GCC unroll 3
            for (int t = 0; t < 3; t++) { A = _mm512_dpbf16_ps(A, e[t], wj[t]); B = _mm512_dpbf16_ps(B, e[t + 3], wj[t + 3]); }
            _mm512_store_ps(a + 16 * j, _mm512_add_ps(A, B));
        }
    }
}
#endif

/* The body of e2e_sconv133 and e2e_sconv133_bf16: wpairs NULL runs the fp32 kernel, else the
   bf16 channel visit above on the same tiles, loads and epilogue (AVX-512 builds only). */
static inline __attribute__((always_inline)) int sconv133_tiles(
    int I, int O, int D, int d0, int d1, int H, int W, int P, const int64_t *chan, const int *dshift,
    const float *ia, const float *ib, const float *is, const int *colptr, const int *rowidx,
    const float *wts, const uint32_t *wpairs, float *out, int64_t ostride, double *stats, int nt, int nthreads,
    const UpSrc *up)
{
    (void)wpairs; /* AVX2 and generic builds have no bf16 visit */
    const int nwb = (W + 15) / 16, nhb = (H + RB - 1) / RB;
    const int ntask = (d1 - d0) * nhb * nwb;
    const size_t plane = (size_t)(H + 2) * P;
    /* Row blocks per scheduling chunk: as many as leave 8 chunks a thread. A row block shares 2 input
       rows with the next; in one chunk they are read again from this core's L2. One row block a
       chunk sent neighbours to different cores, and each core fetched 6 rows per 4 from memory or
       the other core: 96 -> 48 over 32 x 128 x 128, density 0.1, 2 threads, 0.93-0.96x the time
       with whole slices a chunk (benchmarks/kernel_ab.py sconv, Zen 3). */
    const int per_thread = (d1 - d0) * nhb / (8 * nthreads);
    const int chunk = nwb * (per_thread < 1 ? 1 : per_thread > nhb ? nhb : per_thread);
    (void)chunk; /* a build without OpenMP ignores the schedule */
    const int l1_next = colptr[I] >= 8 * I;
    (void)l1_next;
    double *tst = stats ? calloc((size_t)nthreads * 2 * O * STAT_LANES, sizeof(double)) : NULL;
    int failed = 0; /* a thread could not allocate its up strip: its tiles are skipped, 1 returned */
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *acc = alloc64(sizeof(float) * (size_t)O * RB * 16);
        double *st = tst ? tst + (size_t)TID() * 2 * O * STAT_LANES : NULL;
        /* up channel c's strip: 16 zero floats (row 0's column -1), then RB + 2 rows of pitch P */
        const size_t slab = (size_t)(RB + 2) * P + 16;
        float *strip = up ? alloc64(sizeof(float) * slab * (size_t)(up->u1 - up->u0)) : NULL;
        if (strip) memset(strip, 0, sizeof(float) * slab * (size_t)(up->u1 - up->u0));
        if (up && !strip) failed = 1;
        int filled_d = -1, filled_hb = -1;
#if defined(__AVX2__) && !defined(__AVX512F__)
        float *T = alloc64(sizeof(float) * NROW_PITCH * (RB + 2));
#endif
#pragma omp for schedule(SCHED(chunk))
        for (int task = 0; task < ntask; task++) {
            if (up && !strip) continue; /* its up channels would be read from nowhere */
            const int wb = task % nwb, hb = (task / nwb) % nhb, d = d0 + task / (nwb * nhb);
            const int h0 = hb * RB, w0 = wb * 16;
            const int nrow = H - h0 < RB ? H - h0 : RB, ncol = W - w0 < 16 ? W - w0 : 16;
#if !(defined(__AVX2__) && !defined(__AVX512F__))
            v16 lanes, mleft, mright;
            for (int t = 0; t < 16; t++) lanes[t] = t < ncol ? 1.f : 0.f;
            for (int t = 0; t < 16; t++) {
                mleft[t] = (w0 + t - 1 >= 0) ? 1.f : 0.f;  /* column w-1 inside the image */
                mright[t] = (w0 + t + 1 < W) ? 1.f : 0.f;  /* column w+1 inside the image */
            }
#endif
            memset(acc, 0, sizeof(float) * (size_t)O * RB * 16);
            if (strip && (d != filled_d || hb != filled_hb)) {
                up_fill(up, strip, slab, d, h0, D, H, W, P, dshift, colptr, d == filled_d && hb == filled_hb + 1);
                filled_d = d;
                filled_hb = hb;
            }
            for (int i = 0; i < I; i++) {
                const int k0 = colptr[i], k1 = colptr[i + 1];
                if (k0 == k1) continue;
                const int ds = d + dshift[i];
                if (ds < 0 || ds >= D) continue;
                const float *rp = strip && i >= up->u0 && i < up->u1
                                      ? strip + (size_t)(i - up->u0) * slab + 16 + w0
                                      : (const float *)(intptr_t)chan[i] + (size_t)ds * plane + (size_t)h0 * P + w0;
                {   /* prefetch the lines this thread's next tile reads from this channel */
                    const float *np = wb + 1 < nwb ? rp + E2E_PF : rp + (size_t)RB * P - w0;
                    for (int j = 0; j < RB + 2; j++) __builtin_prefetch(np + (size_t)j * P, 0, 2);
                }
#if !(defined(__AVX2__) && !defined(__AVX512F__))
                /* This tile's rows of the next channel with kernels, into L1, where a visit has
                   enough work to hide them (>= 8 kernels per input on average). A/B on Zen 4, bf16,
                   1 / 2 threads: 240 -> 96 0.94 / 0.93x, 480 -> 192 0.98 / 0.92x, 832 -> 320 0.84 /
                   0.89x; at 96 -> 48 (4.8 per input, bandwidth-bound) it cost 1.01-1.06x, hence the
                   rule. (On AVX2, Zen 3, an L1 prefetch four channels ahead was 0.85-1.07x.) */
                if (l1_next) {
                    int n = i + 1;
                    while (n < I && colptr[n] == colptr[n + 1]) n++;
                    const int dn = n < I ? d + dshift[n] : -1;
                    if (dn >= 0 && dn < D) {
                        const float *q = (const float *)(intptr_t)chan[n] + (size_t)dn * plane + (size_t)h0 * P + w0;
                        for (int j = 0; j < RB + 2; j++) {
                            __builtin_prefetch(q + (size_t)j * P - 1, 0, 3);
                            __builtin_prefetch(q + (size_t)j * P, 0, 3);
                            __builtin_prefetch(q + (size_t)j * P + 16, 0, 3);
                        }
                    }
                }
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
                const float *R[RB + 2];
                if (is_identity(ia, ib, is, i)) {
                    for (int j = 0; j < RB + 2; j++) R[j] = rp + (size_t)j * P;
                } else {
                    norm_rows_avx2(T, rp, P, h0, H, w0, W, ncol, ia[i], ib[i], is[i]);
                    for (int j = 0; j < RB + 2; j++) R[j] = T + NROW_PITCH * j + 8;
                }
                sconv_taps_avx2(R, acc, rowidx, wts, k0, k1);
#else
                v16 X[3 * (RB + 2)];
                if (is_identity(ia, ib, is, i)) {
#pragma GCC unroll 16
                    for (int j = 0; j < RB + 2; j++) {
                        const float *r = rp + (size_t)j * P;
                        X[3 * j] = LDU(r - 1); X[3 * j + 1] = LDA(r); X[3 * j + 2] = LDU(r + 1);
                    }
                } else {
                    const float a = ia[i], b = ib[i], sl = is[i];
                    for (int j = 0; j < RB + 2; j++) {
                        const int hh = h0 + j - 1;
                        if (hh < 0 || hh >= H) { X[3 * j] = X[3 * j + 1] = X[3 * j + 2] = (v16){0}; continue; }
                        const float *r = rp + (size_t)j * P;
                        X[3 * j] = xform(LDU(r - 1), a, b, sl) * mleft;
                        X[3 * j + 1] = xform(LDA(r), a, b, sl);
                        X[3 * j + 2] = xform(LDU(r + 1), a, b, sl) * mright;
                    }
                }
#if E2E_BF16
                if (wpairs) { sconv_channel_bf16(X, acc, rowidx, wpairs, k0, k1); continue; }
#endif
                for (int k = k0; k < k1; k++) {
                    float *acc_o = acc + (size_t)rowidx[k] * RB * 16;
                    const float *q = wts + 9 * (size_t)k;
                    const v16 q0 = BC(q[0]), q1 = BC(q[1]), q2 = BC(q[2]), q3 = BC(q[3]), q4 = BC(q[4]),
                              q5 = BC(q[5]), q6 = BC(q[6]), q7 = BC(q[7]), q8 = BC(q[8]);
                    v16 A[RB], B[RB];
#pragma GCC unroll 16
                    for (int j = 0; j < RB; j++) { A[j] = LDA(acc_o + 16 * j); B[j] = (v16){0}; }
#pragma GCC unroll 16
                    for (int j = 0; j < RB + 2; j++) {
                        const v16 xl = X[3 * j], xc = X[3 * j + 1], xr = X[3 * j + 2];
                        /* one FMA per tap; three independent accumulator chains per input row */
                        if (j < RB) A[j] += q0 * xl;
                        if (j >= 1 && j - 1 < RB) B[j - 1] += q3 * xl;
                        if (j >= 2) A[j - 2] += q6 * xl;
                        if (j < RB) A[j] += q1 * xc;
                        if (j >= 1 && j - 1 < RB) B[j - 1] += q4 * xc;
                        if (j >= 2) A[j - 2] += q7 * xc;
                        if (j < RB) A[j] += q2 * xr;
                        if (j >= 1 && j - 1 < RB) B[j - 1] += q5 * xr;
                        if (j >= 2) A[j - 2] += q8 * xr;
                    }
#pragma GCC unroll 16
                    for (int j = 0; j < RB; j++) *(v16 *)(acc_o + 16 * j) = A[j] + B[j];
                }
#endif
            }
            const int c0 = w0, c1 = wb == nwb - 1 ? P : w0 + ncol;
#if defined(__AVX2__) && !defined(__AVX512F__)
            sconv_store_avx2(acc, O, nrow, ncol, out + (size_t)d * plane + (size_t)(h0 + 1) * P + w0, ostride, P,
                             wb == nwb - 1 ? P - w0 - 16 : 0, st, nt);
            for (int o = 0; o < O; o++) {
                float *pl = out + (size_t)o * ostride + (size_t)d * plane;
                if (hb == 0) memset(pl + c0, 0, sizeof(float) * (size_t)(c1 - c0));
                if (hb == nhb - 1) memset(pl + (size_t)(H + 1) * P + c0, 0, sizeof(float) * (size_t)(c1 - c0));
            }
#else
            for (int o = 0; o < O; o++) {
                float *pl = out + (size_t)o * ostride + (size_t)d * plane;
                v16 s = (v16){0}, s2 = (v16){0};
                for (int j = 0; j < nrow; j++) {
                    v16 v = LDA(acc + ((size_t)o * RB + j) * 16);
                    float *row = pl + (size_t)(h0 + j + 1) * P;
                    if (ncol < 16) v *= lanes;
                    store_v(row + w0, v, ncol, nt);
                    s += v; s2 += v * v;
                    if (wb == nwb - 1 && P > w0 + ncol) memset(row + w0 + ncol, 0, sizeof(float) * (size_t)(P - w0 - ncol));
                }
                if (hb == 0) memset(pl + c0, 0, sizeof(float) * (size_t)(c1 - c0));
                if (hb == nhb - 1) memset(pl + (size_t)(H + 1) * P + c0, 0, sizeof(float) * (size_t)(c1 - c0));
                if (st) {
                    float sa = 0.f, sb = 0.f;
                    for (int t = 0; t < 16; t++) { sa += s[t]; sb += s2[t]; }
                    st[o] += sa; st[O + o] += sb;
                }
            }
#endif
        }
        free(acc);
        free(strip);
#if defined(__AVX2__) && !defined(__AVX512F__)
        free(T);
#endif
        fence();
    }
    if (stats) {
        for (int t = 0; t < nthreads; t++)
            for (int j = 0; j < 2 * O; j++)
                for (int l = 0; l < STAT_LANES; l++) stats[j] += tst[((size_t)t * 2 * O + j) * STAT_LANES + l];
        free(tst);
    }
    return failed;
}

void e2e_sconv133(int I, int O, int D, int d0, int d1, int H, int W, int P,
                  const int64_t *chan, const int *dshift,
                  const float *ia, const float *ib, const float *is,
                  const int *colptr, const int *rowidx, const float *wts,
                  float *out, int64_t ostride, double *stats, int nt, int nthreads)
{
    (void)sconv133_tiles(I, O, D, d0, d1, H, W, P, chan, dshift, ia, ib, is, colptr, rowidx, wts, NULL, out, ostride,
                         stats, nt, nthreads, NULL);
}

int e2e_sconv133_up(int I, int O, int D, int d0, int d1, int H, int W, int P,
                    const int64_t *chan, const int *dshift,
                    const float *ia, const float *ib, const float *is,
                    const int *colptr, const int *rowidx, const float *wts,
                    float *out, int64_t ostride, double *stats, int nt, int nthreads,
                    int u0, int u1, const int *umap, const float *deep, int Hl, int Pl, int64_t dstride,
                    const float *da, const float *db, const float *ds,
                    const int *urowptr, const int *ucolidx, const float *uwts)
{
    if (W % 16 || H != 2 * Hl || D % 2 || u0 < 0 || u1 < u0 || u1 > I) return 2;
    const UpSrc up = {u0, u1, umap, deep, Hl, Pl, dstride, da, db, ds, urowptr, ucolidx, uwts};
    return sconv133_tiles(I, O, D, d0, d1, H, W, P, chan, dshift, ia, ib, is, colptr, rowidx, wts, NULL, out,
                          ostride, stats, nt, nthreads, &up);
}

int e2e_sconv133_bf16(int I, int O, int D, int d0, int d1, int H, int W, int P,
                      const int64_t *chan, const int *dshift,
                      const float *ia, const float *ib, const float *is,
                      const int *colptr, const int *rowidx, const uint32_t *wpairs,
                      float *out, int64_t ostride, double *stats, int nt, int nthreads)
{
#if E2E_BF16
    (void)sconv133_tiles(I, O, D, d0, d1, H, W, P, chan, dshift, ia, ib, is, colptr, rowidx, NULL, wpairs, out,
                         ostride, stats, nt, nthreads, NULL);
    return 0;
#else
    (void)I; (void)O; (void)D; (void)d0; (void)d1; (void)H; (void)W; (void)P; (void)chan; (void)dshift;
    (void)ia; (void)ib; (void)is; (void)colptr; (void)rowidx; (void)wpairs; (void)out; (void)ostride;
    (void)stats; (void)nt; (void)nthreads;
    return 2;
#endif
}

/* 1x1x1 head without bias on a PP tensor read through the lazy norm: out[k, d, h, w] =
   sum_c wh[k*C + c] * x'[c, d, h, w]; out is a dense (K, D, H, W) float32 array. */
#if defined(__AVX2__) /* AVX-512 builds too: 1.4x the v16 form on Zen 4 (head and convt, level 0) */
/* AVX2: 4 classes x 16 columns = 8 ymm accumulators; per channel 2 input loads and 4 broadcasts
   for 8 FMAs. The v16 form below (8 classes x v16 = 16 ymm accumulators, the norm through a v16
   vmax) spilled on every FMA: 2 GMAC/s, 0.85 s of a 12 s 128^3 forward (2026-12-07). Weights are
   transposed to (C, K rounded up to 4), zero-padded, so the class loop needs no bounds test.
   One task is one image row: each channel's row is read whole (sequential lines the hardware
   prefetcher follows) and normalised into xs (C x 16-column blocks); 16-column tasks read one
   line from each of C channel planes and ran at a third of the memory bandwidth. */
void e2e_head(int C, int D, int H, int W, int P, const float *x, int64_t cstride,
              const float *ia, const float *ib, const float *is, int K, const float *wh, float *out, int nthreads)
{
    OMP_ONLY(nthreads);
    const int nwb = (W + 15) / 16, ntask = D * H, Kp = (K + 3) / 4 * 4;
    const size_t plane = (size_t)(H + 2) * P, ostride = (size_t)D * H * W;
    float *wt = alloc64(sizeof(float) * (size_t)C * Kp);
    for (int c = 0; c < C; c++)
        for (int k = 0; k < Kp; k++) wt[(size_t)c * Kp + k] = k < K ? wh[(size_t)k * C + c] : 0.f;
#pragma omp parallel num_threads(nthreads)
    {
        float *xs = alloc64(sizeof(float) * 16 * (size_t)nwb * (size_t)C); /* [wb][c][16] */
#pragma omp for schedule(SCHED(4))
        for (int task = 0; task < ntask; task++) {
            const int h = task % H, d = task / H;
            const float *xb = x + (size_t)d * plane + (size_t)(h + 1) * P;
            for (int c = 0; c < C; c++) {
                const float *r = xb + (size_t)c * cstride;
                const int id = is_identity(ia, ib, is, c);
                const __m256 a = _mm256_set1_ps(id ? 1.f : ia[c]), b = _mm256_set1_ps(id ? 0.f : ib[c]);
                const __m256 sl = _mm256_set1_ps(id ? 1.f : is[c]);
                for (int wb = 0; wb < nwb; wb++) {
                    /* the same line 8 rows on (a task soon after): C channel streams are more than
                       the hardware prefetchers follow; 48 x 64 x 128^2 on Zen 4, 2 threads: 26.9 /
                       30.1 -> 21.0 / 24.1 ms (4 rows on: 21.5 / 28.1) */
                    __builtin_prefetch(r + (size_t)8 * P + 16 * wb, 0, 1);
                    __m256 v0 = _mm256_load_ps(r + 16 * wb), v1 = _mm256_load_ps(r + 16 * wb + 8);
                    if (!id) {
                        v0 = _mm256_fmadd_ps(a, v0, b);
                        v1 = _mm256_fmadd_ps(a, v1, b);
                        v0 = _mm256_max_ps(v0, _mm256_mul_ps(sl, v0));
                        v1 = _mm256_max_ps(v1, _mm256_mul_ps(sl, v1));
                    }
                    float *t = xs + ((size_t)wb * C + c) * 16;
                    _mm256_store_ps(t, v0);
                    _mm256_store_ps(t + 8, v1);
                }
            }
            for (int wb = 0; wb < nwb; wb++) {
                const int w0 = wb * 16, ncol = W - w0 < 16 ? W - w0 : 16;
                const float *xw = xs + (size_t)wb * C * 16;
                float *ob = out + ((size_t)d * H + h) * W + w0;
                for (int k0 = 0; k0 < K; k0 += 4) {
                    __m256 A0[4], A1[4];
#pragma GCC unroll 4
                    for (int k = 0; k < 4; k++) { A0[k] = _mm256_setzero_ps(); A1[k] = _mm256_setzero_ps(); }
                    for (int c = 0; c < C; c++) {
                        const __m256 x0 = _mm256_load_ps(xw + 16 * (size_t)c), x1 = _mm256_load_ps(xw + 16 * (size_t)c + 8);
                        const float *q = wt + (size_t)c * Kp + k0;
#pragma GCC unroll 4
                        for (int k = 0; k < 4; k++) {
                            const __m256 w = _mm256_broadcast_ss(q + k);
                            A0[k] = _mm256_fmadd_ps(w, x0, A0[k]);
                            A1[k] = _mm256_fmadd_ps(w, x1, A1[k]);
                        }
                    }
                    for (int k = 0; k < 4 && k0 + k < K; k++) {
                        float *o = ob + (size_t)(k0 + k) * ostride;
                        if (ncol == 16) {
                            _mm256_storeu_ps(o, A0[k]);
                            _mm256_storeu_ps(o + 8, A1[k]);
                        } else {
                            float tmp[16] __attribute__((aligned(32)));
                            _mm256_store_ps(tmp, A0[k]);
                            _mm256_store_ps(tmp + 8, A1[k]);
                            store_n(o, tmp, ncol);
                        }
                    }
                }
            }
        }
        free(xs);
    }
    free(wt);
}
#else
void e2e_head(int C, int D, int H, int W, int P, const float *x, int64_t cstride,
              const float *ia, const float *ib, const float *is, int K, const float *wh, float *out, int nthreads)
{
    OMP_ONLY(nthreads);
    const int nwb = (W + 15) / 16, ntask = D * H * nwb;
    const size_t plane = (size_t)(H + 2) * P, ostride = (size_t)D * H * W;
#pragma omp parallel num_threads(nthreads)
    {
        v16 *xs = alloc64(sizeof(v16) * (size_t)C);
#pragma omp for schedule(SCHED(4 * nwb))
        for (int task = 0; task < ntask; task++) {
            const int wb = task % nwb, h = (task / nwb) % H, d = task / (nwb * H);
            const int w0 = wb * 16, ncol = W - w0 < 16 ? W - w0 : 16;
            const float *xb = x + (size_t)d * plane + (size_t)(h + 1) * P + w0;
            for (int c = 0; c < C; c++) {
                const v16 v = LDA(xb + (size_t)c * cstride);
                xs[c] = is_identity(ia, ib, is, c) ? v : xform(v, ia[c], ib[c], is[c]);
            }
            float *ob = out + ((size_t)d * H + h) * W + w0;
            for (int k0 = 0; k0 < K; k0 += 8) {
                const int kn = K - k0 < 8 ? K - k0 : 8;
                v16 A[8];
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) A[k] = (v16){0};
                for (int c = 0; c < C; c++) {
                    const v16 v = xs[c];
#pragma GCC unroll 8
                    for (int k = 0; k < 8; k++) if (k < kn) A[k] += BC(wh[(size_t)(k0 + k) * C + c]) * v;
                }
                for (int k = 0; k < kn; k++) store_v(ob + (size_t)(k0 + k) * ostride, A[k], ncol, 0);
            }
        }
        free(xs);
    }
}

#endif

static inline __attribute__((always_inline)) void convt_acc(const int KK, const int NV, v16 *acc, const float *ib,
                                                            int64_t bstride, const int *colidx, const float *wts,
                                                            int k0, int k1)
{
    v16 A[8], B[8];
#pragma GCC unroll 8
    for (int p = 0; p < KK; p++) { A[p] = (v16){0}; B[p] = (v16){0}; }
    for (int k = k0; k < k1; k++) {
        const float *xp = ib + (size_t)colidx[k] * bstride;
        const v16 x0 = LDA(xp), x1 = NV > 1 ? LDA(xp + 16) : (v16){0};
        const float *q = wts + (size_t)KK * k;
#pragma GCC unroll 8
        for (int p = 0; p < KK; p++) {
            const v16 w = BC(q[p]);
            A[p] += w * x0;
            if (NV > 1) B[p] += w * x1;
        }
    }
#pragma GCC unroll 8
    for (int p = 0; p < KK; p++) { acc[p] = A[p]; acc[8 + p] = B[p]; }
}

#if defined(__AVX2__)
/* n (0..8) floats of v to dst: a plain store when n == 8, else a masked one */
static inline void store8n(float *dst, __m256 v, int n, int nt) {
    if (n >= 8) {
        if (nt) _mm256_stream_ps(dst, v); /* 32-byte aligned here; no read for ownership */
        else _mm256_storeu_ps(dst, v);
        return;
    }
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_ps(dst, m, v);
}

/* AVX2: one output channel of a tile, 8 low-res columns at a time: KK ymm accumulators (one per
   tap), one input vector, one broadcast, no spill (the v16 form's 2 x KK v16 = 32 ymm spilled on
   every FMA: ~0.15 GMAC/s on the bundled MNI model's up-sampling, 2026-12-07). The taps go
   straight from the registers to the output rows: rows[ab] is output row (a, b) at column kw*w0;
   kw == 2 interleaves the two column taps with unpack + permute (a scalar loop of 2 x 32 stores
   per row was a third of the kernel). */
static inline __attribute__((always_inline)) void convt_o_avx2(const int KK, const int kw, int ncol,
                                                               float *const *rows, const float *ib, int64_t bstride,
                                                               const int *colidx, const float *wts, int k0, int k1,
                                                               int nt)
{
    for (int g = 0; 8 * g < ncol; g++) {
        __m256 A[8];
#pragma GCC unroll 8
        for (int p = 0; p < KK; p++) A[p] = _mm256_setzero_ps();
        for (int k = k0; k < k1; k++) {
            const __m256 x = _mm256_load_ps(ib + (size_t)colidx[k] * bstride + 8 * g);
            const float *q = wts + (size_t)KK * k;
#pragma GCC unroll 8
            for (int p = 0; p < KK; p++) A[p] = _mm256_fmadd_ps(_mm256_broadcast_ss(q + p), x, A[p]);
        }
        const int n = ncol - 8 * g < 8 ? ncol - 8 * g : 8;
        for (int ab = 0; ab < KK / kw; ab++) {
            if (kw == 1) { store8n(rows[ab] + 8 * g, A[ab], n, nt); continue; }
            const __m256 lo = _mm256_unpacklo_ps(A[2 * ab], A[2 * ab + 1]), hi = _mm256_unpackhi_ps(A[2 * ab], A[2 * ab + 1]);
            store8n(rows[ab] + 16 * g, _mm256_permute2f128_ps(lo, hi, 0x20), 2 * n, nt);
            store8n(rows[ab] + 16 * g + 8, _mm256_permute2f128_ps(lo, hi, 0x31), 2 * n - 8, nt);
        }
    }
}
#endif

/* Sparse ConvTranspose3d with kernel == stride == (kd,kh,kw), kw in {1,2}, no bias.
   in: Ci channels PP (Dl, Hl, Wl, pitch Pl), channel c at in + c*istride, read through the lazy
   norm (ia, iib, is). CSR by output channel: inputs colidx[rowptr[o]..rowptr[o+1]), taps
   wts[K*k..K*k+K) in (a,b,c) order, K = kd*kh*kw <= 8. Tiles of one low-res row x 32 voxels.
   out: O channels PP (Dl*kd, Hl*kh, Wl*kw, pitch P), channel stride ostride; halo written. */
void e2e_convt(int Ci, int O, int Dl, int Hl, int Wl, int Pl, int kd, int kh, int kw,
               const float *in, int64_t istride, const float *ia, const float *iib, const float *is,
               const int *rowptr, const int *colidx, const float *wts,
               float *out, int P, int64_t ostride, int nt, int nthreads)
{
    OMP_ONLY(nthreads);
    const int K = kd * kh * kw, H = Hl * kh, W = Wl * kw;
    const int nwb = (Wl + 31) / 32, ntask = Dl * Hl * nwb;
    const size_t iplane = (size_t)(Hl + 2) * Pl, oplane = (size_t)(H + 2) * P;
#pragma omp parallel num_threads(nthreads)
    {
        v16 *acc = alloc64(sizeof(v16) * 16);
        v16 *xt = alloc64(sizeof(v16) * 2 * (size_t)(Ci > 0 ? Ci : 1));
#pragma omp for schedule(SCHED(2 * nwb))
        for (int task = 0; task < ntask; task++) {
            const int wb = task % nwb, hl = (task / nwb) % Hl, dl = task / (nwb * Hl);
            const int w0 = wb * 32, ncol = Wl - w0 < 32 ? Wl - w0 : 32, nv = ncol > 16 ? 2 : 1;
            (void)nv; /* the v16 path's vector count */
            const int oc0 = kw * w0, oc1 = wb == nwb - 1 ? P : kw * (w0 + ncol);
            const float *src = in + (size_t)dl * iplane + (size_t)(hl + 1) * Pl + w0;
            const float *ib = src;
            int64_t bstride = istride;
            if (ia != NULL) {  /* apply the lazy norm once per tile and input channel */
#if defined(__AVX2__)
                /* __m256 (the v16 xform's vmax went through the stack on AVX2) */
                for (int c = 0; c < Ci; c++) {
                    const float *r = src + (size_t)c * istride;
                    float *t = (float *)(xt + 2 * (size_t)c);
                    const int id = is_identity(ia, iib, is, c);
                    const __m256 va = _mm256_set1_ps(ia[c]), vb = _mm256_set1_ps(iib[c]), vs = _mm256_set1_ps(is[c]);
                    for (int v = 0; v < (ncol + 7) / 8; v++) {
                        __m256 x = _mm256_load_ps(r + 8 * v);
                        if (!id) {
                            x = _mm256_fmadd_ps(va, x, vb);
                            x = _mm256_max_ps(x, _mm256_mul_ps(vs, x));
                        }
                        _mm256_store_ps(t + 8 * v, x);
                    }
                }
#else
                for (int c = 0; c < Ci; c++) {
                    for (int v = 0; v < nv; v++) {
                        const v16 x = LDA(src + (size_t)c * istride + 16 * v);
                        xt[2 * c + v] = is_identity(ia, iib, is, c) ? x : xform(x, ia[c], iib[c], is[c]);
                    }
                }
#endif
                ib = (const float *)xt;
                bstride = 32;
            }
#if defined(__AVX2__)
            for (int o = 0; o < O; o++) {
                const int k0 = rowptr[o], k1 = rowptr[o + 1];
                float *ob = out + (size_t)o * ostride;
                float *rows[8];
                for (int a = 0; a < kd; a++)
                    for (int b = 0; b < kh; b++)
                        rows[a * kh + b] = ob + (size_t)(kd * dl + a) * oplane + (size_t)(kh * hl + b + 1) * P + kw * w0;
                if (kw == 2) {
                    if (K == 8) convt_o_avx2(8, 2, ncol, rows, ib, bstride, colidx, wts, k0, k1, nt);
                    else if (K == 4) convt_o_avx2(4, 2, ncol, rows, ib, bstride, colidx, wts, k0, k1, nt);
                    else convt_o_avx2(2, 2, ncol, rows, ib, bstride, colidx, wts, k0, k1, nt);
                } else {
                    if (K == 4) convt_o_avx2(4, 1, ncol, rows, ib, bstride, colidx, wts, k0, k1, nt);
                    else if (K == 2) convt_o_avx2(2, 1, ncol, rows, ib, bstride, colidx, wts, k0, k1, nt);
                    else convt_o_avx2(1, 1, ncol, rows, ib, bstride, colidx, wts, k0, k1, nt);
                }
                for (int a = 0; a < kd; a++) {
                    float *pl = ob + (size_t)(kd * dl + a) * oplane;
                    for (int b = 0; b < kh; b++) {
                        const int h = kh * hl + b;
                        float *row = pl + (size_t)(h + 1) * P;
                        if (wb == nwb - 1) memset(row + W, 0, sizeof(float) * (size_t)(P - W));
                        if (h == 0) memset(pl + oc0, 0, sizeof(float) * (size_t)(oc1 - oc0));
                        if (h == H - 1) memset(pl + (size_t)(H + 1) * P + oc0, 0, sizeof(float) * (size_t)(oc1 - oc0));
                    }
                }
            }
#else
            for (int o = 0; o < O; o++) {
                const int k0 = rowptr[o], k1 = rowptr[o + 1];
                if (K == 8) { if (nv == 2) convt_acc(8, 2, acc, ib, bstride, colidx, wts, k0, k1); else convt_acc(8, 1, acc, ib, bstride, colidx, wts, k0, k1); }
                else if (K == 4) { if (nv == 2) convt_acc(4, 2, acc, ib, bstride, colidx, wts, k0, k1); else convt_acc(4, 1, acc, ib, bstride, colidx, wts, k0, k1); }
                else if (K == 2) { if (nv == 2) convt_acc(2, 2, acc, ib, bstride, colidx, wts, k0, k1); else convt_acc(2, 1, acc, ib, bstride, colidx, wts, k0, k1); }
                else convt_acc(1, 2, acc, ib, bstride, colidx, wts, k0, k1);
                float *ob = out + (size_t)o * ostride;
                for (int a = 0; a < kd; a++) {
                    float *pl = ob + (size_t)(kd * dl + a) * oplane;
                    for (int b = 0; b < kh; b++) {
                        const int h = kh * hl + b;
                        float *row = pl + (size_t)(h + 1) * P;
                        for (int v = 0; v < nv; v++) {
                            const int n = ncol - 16 * v < 16 ? ncol - 16 * v : 16;
                            float *dst = row + kw * (w0 + 16 * v);
                            if (kw == 1) store_v(dst, acc[8 * v + a * kh + b], n, nt);
                            else {
                                const v16 e = acc[8 * v + (a * kh + b) * 2], f = acc[8 * v + (a * kh + b) * 2 + 1];
                                store_v(dst, ILO(e, f), 2 * n, nt);
                                if (2 * n > 16) store_v(dst + 16, IHI(e, f), 2 * n - 16, nt);
                            }
                        }
                        if (wb == nwb - 1) memset(row + W, 0, sizeof(float) * (size_t)(P - W));
                        if (h == 0) memset(pl + oc0, 0, sizeof(float) * (size_t)(oc1 - oc0));
                        if (h == H - 1) memset(pl + (size_t)(H + 1) * P + oc0, 0, sizeof(float) * (size_t)(oc1 - oc0));
                    }
                }
            }
#endif
        }
        free(acc);
        free(xt);
        fence();
    }
}

#if defined(__AVX2__)
/* dst[k * dstride + j] = src[j * sstride + k] for j, k < 8 */
static inline void transpose8(const float *src, int64_t sstride, float *dst, int64_t dstride)
{
    __m256 r[8], t[8];
    for (int j = 0; j < 8; j++) r[j] = _mm256_loadu_ps(src + (size_t)j * sstride);
    for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
        t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
    }
    for (int j = 0; j < 8; j += 4) {
        r[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44);
        r[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
        r[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44);
        r[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
    }
    for (int k = 0; k < 4; k++) {
        _mm256_storeu_ps(dst + (size_t)k * dstride, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
        _mm256_storeu_ps(dst + (size_t)(k + 4) * dstride, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
    }
}
#endif

#if defined(__AVX2__)
/* transpose8 of 8 x 8 bf16 values (rows of 8 at src + j * sstride), widened to float32 */
static inline void transpose8_bf16(const uint16_t *src, int64_t sstride, float *dst, int64_t dstride)
{
    float tmp[64] __attribute__((aligned(32)));
    for (int j = 0; j < 8; j++) {
        const __m128i h = _mm_loadu_si128((const __m128i *)(src + (size_t)j * sstride));
        _mm256_store_ps(tmp + 8 * j, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
    transpose8(tmp, 8, dst, dstride);
}
#endif

/* Channels-last (D, H, W, C) float32 (or bfloat16 where xbf16) -> PP (C, D, H, W) float32 with
   halo; out channel stride ostride. */
void e2e_cl_to_pp(int D, int H, int W, int C, const void *x, int xbf16, float *out, int P, int64_t ostride,
                  int nthreads)
{
    OMP_ONLY(nthreads);
    const size_t plane = (size_t)(H + 2) * P;
    const float *xf = (const float *)x;
    const uint16_t *xh = (const uint16_t *)x;
#pragma omp parallel for num_threads(nthreads) schedule(SCHED(8))
    for (int dh = 0; dh < D * H; dh++) {
        const int d = dh / H, h = dh % H;
        const size_t src = (size_t)dh * W * C;
        int cv = 0;
#if defined(__AVX2__)
        /* 8 x 8 register transposes (the scalar gather below ran at ~2 GB/s) */
        for (; cv + 8 <= C; cv += 8) {
            float *rows = out + (size_t)cv * ostride + (size_t)d * plane + (size_t)(h + 1) * P;
            int w = 0;
            for (; w + 8 <= W; w += 8) {
                if (xbf16) transpose8_bf16(xh + src + (size_t)w * C + cv, C, rows + w, ostride);
                else transpose8(xf + src + (size_t)w * C + cv, C, rows + w, ostride);
            }
            for (; w < W; w++)
                for (int k = 0; k < 8; k++) {
                    const size_t at = src + (size_t)w * C + cv + k;
                    rows[(size_t)k * ostride + w] = xbf16 ? bf16_to_f32(xh[at]) : xf[at];
                }
        }
#endif
        for (int c = 0; c < C; c++) {
            float *pl = out + (size_t)c * ostride + (size_t)d * plane;
            float *row = pl + (size_t)(h + 1) * P;
            if (c >= cv)
                for (int w = 0; w < W; w++) {
                    const size_t at = src + (size_t)w * C + c;
                    row[w] = xbf16 ? bf16_to_f32(xh[at]) : xf[at];
                }
            memset(row + W, 0, sizeof(float) * (size_t)(P - W));
            if (h == 0) memset(pl, 0, sizeof(float) * (size_t)P);
            if (h == H - 1) memset(pl + (size_t)(H + 1) * P, 0, sizeof(float) * (size_t)P);
        }
    }
}

#if defined(__AVX2__)
/* o[c] = f(i[c]) for c in [c0, c1), f as in e2e_cl_shift; masked loads and stores for the tail */
static inline void shift_run_avx2(float *o, const float *i, int c0, int c1, const float *scale,
                                  const float *shift, float slope)
{
    const __m256 vs = _mm256_set1_ps(slope), zero = _mm256_setzero_ps();
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int c = c0; c < c1; c += 8) {
        const int n = c1 - c;
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
        __m256 v = n >= 8 ? _mm256_loadu_ps(i + c) : _mm256_maskload_ps(i + c, m);
        if (scale) {
            const __m256 a = n >= 8 ? _mm256_loadu_ps(scale + c) : _mm256_maskload_ps(scale + c, m);
            const __m256 b = n >= 8 ? _mm256_loadu_ps(shift + c) : _mm256_maskload_ps(shift + c, m);
            v = _mm256_fmadd_ps(v, a, b);
            v = _mm256_blendv_ps(_mm256_mul_ps(v, vs), v, _mm256_cmp_ps(v, zero, _CMP_GT_OQ));
        }
        if (n >= 8) _mm256_storeu_ps(o + c, v);
        else _mm256_maskstore_ps(o + c, m, v);
    }
}
#endif

/* One run of e2e_cl_shift with bf16 on either side (float32 both sides: shift_run_avx2). Plain
   loops over restrict pointers, one per combination, which GCC vectorises. */
static void shift_run_bf16(void *restrict o, const void *restrict i, int c0, int c1, const float *scale,
                           const float *shift, float slope, int ibf16, int obf16)
{
#define SHIFT_LOOP(LOAD, STORE)                                                                   \
    do {                                                                                          \
        if (scale)                                                                                \
            for (int c = c0; c < c1; c++) {                                                       \
                const float v = (LOAD) * scale[c] + shift[c];                                     \
                STORE(v > 0.f ? v : v * slope);                                                   \
            }                                                                                     \
        else                                                                                      \
            for (int c = c0; c < c1; c++) STORE(LOAD);                                            \
    } while (0)
#define TO_F32(v) ((float *)o)[c] = (v)
#define TO_BF16(v) ((uint16_t *)o)[c] = f32_to_bf16(v)
    if (ibf16 && obf16) SHIFT_LOOP(bf16_to_f32(((const uint16_t *)i)[c]), TO_BF16);
    else if (ibf16) SHIFT_LOOP(bf16_to_f32(((const uint16_t *)i)[c]), TO_F32);
    else SHIFT_LOOP(((const float *)i)[c], TO_BF16); /* float32 in, bf16 out */
#undef SHIFT_LOOP
#undef TO_F32
#undef TO_BF16
}

/* Channels-last depth shift with optional fused affine + LeakyReLU:
   out[d', p, c] = f(x[sd*d' + delta_r, p, c]) for channels c in run r = [rs[r], rs[r+1]),
   zero where the source depth is outside [0, Din); f(v) = leaky(v*scale[c] + shift[c], slope),
   or f(v) = v when scale is NULL. x: Din x HW rows of C values, float32 or (xbf16) bfloat16;
   out: Dout x HW rows of C, float32 or (obf16) bfloat16 (rounded to nearest even). */
void e2e_cl_shift(int Dout, int Din, int64_t HW, int C, const void *x, int xbf16, void *out, int obf16, int nrun,
                  const int *rs, const int *rdelta, int sd, const float *scale, const float *shift,
                  float slope, int nthreads)
{
    OMP_ONLY(nthreads);
    const int64_t blk = 64, nb = (HW + blk - 1) / blk;
    const size_t isz = xbf16 ? 2 : 4, osz = obf16 ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) schedule(SCHED(64))
    for (int64_t t = 0; t < (int64_t)Dout * nb; t++) {
        const int d = (int)(t / nb);
        const int64_t p0 = (t % nb) * blk, p1 = p0 + blk < HW ? p0 + blk : HW;
        for (int r = 0; r < nrun; r++) {
            const int c0 = rs[r], c1 = rs[r + 1], ds = sd * d + rdelta[r];
            for (int64_t p = p0; p < p1; p++) {
                char *o = (char *)out + ((size_t)d * HW + p) * C * osz;
                if (ds < 0 || ds >= Din) { memset(o + (size_t)c0 * osz, 0, osz * (size_t)(c1 - c0)); continue; }
                const char *i = (const char *)x + ((size_t)ds * HW + p) * C * isz;
                if (xbf16 || obf16) { shift_run_bf16(o, i, c0, c1, scale, shift, slope, xbf16, obf16); continue; }
#if defined(__AVX2__)
                /* explicit vectors: GCC left this loop scalar (o and i may alias as far as it
                   knows), 1.3 GB/s against 17 GB/s for torch's copy_ of the same tensor */
                shift_run_avx2((float *)o, (const float *)i, c0, c1, scale, shift, slope);
#else
                float *of = (float *)o;
                const float *xi = (const float *)i;
                if (scale) for (int c = c0; c < c1; c++) { float v = xi[c] * scale[c] + shift[c]; of[c] = v > 0.f ? v : v * slope; }
                else for (int c = c0; c < c1; c++) of[c] = xi[c];
#endif
            }
        }
    }
}

/* Channels-last statistics: x is P rows of C floats (bfloat16 where xbf16; row stride C); stats[c] = sum over rows,
   stats[C+c] = sum of squares (float partial sums over 256 rows, accumulated in double). */
void e2e_cl_stats(int64_t P, int C, const void *x, int xbf16, double *stats, int nthreads)
{
    const int64_t nblk = (P + 255) / 256;
    double *tst = calloc((size_t)nthreads * 2 * C, sizeof(double));
#pragma omp parallel num_threads(nthreads)
    {
        double *st = tst + (size_t)TID() * 2 * C;
        float *a = alloc64(sizeof(float) * (size_t)(2 * C + 32));
        float *b = a + C + 16;
#pragma omp for schedule(SCHED(16))
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t r0 = blk * 256, r1 = r0 + 256 < P ? r0 + 256 : P;
            for (int c = 0; c < C; c++) { a[c] = 0.f; b[c] = 0.f; }
            for (int64_t r = r0; r < r1; r++) {
                if (xbf16) {
                    const uint16_t *row = (const uint16_t *)x + (size_t)r * C;
                    for (int c = 0; c < C; c++) { const float v = bf16_to_f32(row[c]); a[c] += v; b[c] += v * v; }
                } else {
                    const float *row = (const float *)x + (size_t)r * C;
                    for (int c = 0; c < C; c++) { const float v = row[c]; a[c] += v; b[c] += v * v; }
                }
            }
            for (int c = 0; c < C; c++) { st[c] += a[c]; st[C + c] += b[c]; }
        }
        free(a);
    }
    for (int c = 0; c < 2 * C; c++) stats[c] = 0.0;
    for (int t = 0; t < nthreads; t++)
        for (int c = 0; c < 2 * C; c++) stats[c] += tst[(size_t)t * 2 * C + c];
    free(tst);
}

/* Channels-last, in place: x = leaky_relu(x * scale[c] + shift[c], slope) on P rows of C floats. */
void e2e_cl_norm_act(int64_t P, int C, float *x, const float *scale, const float *shift, float slope, int nthreads)
{
    OMP_ONLY(nthreads);
    const int64_t nblk = (P + 63) / 64;
#pragma omp parallel for num_threads(nthreads) schedule(SCHED(64))
    for (int64_t blk = 0; blk < nblk; blk++) {
        const int64_t r0 = blk * 64, r1 = r0 + 64 < P ? r0 + 64 : P;
        for (int64_t r = r0; r < r1; r++) {
            float *row = x + (size_t)r * C;
            for (int c = 0; c < C; c++) { float v = row[c] * scale[c] + shift[c]; row[c] = v > 0.f ? v : v * slope; }
        }
    }
}

/* Max pool with kernel == stride == (kd,kh,kw): PP in (C, D, H, W, pitch Pi), read through the
   lazy norm (ia, ib, is) -> PP out (C, D/kd, H/kh, W/kw, pitch P), stored normalised; halo written. */
void e2e_maxpool(int C, int D, int H, int W, int Pi, int kd, int kh, int kw,
                 const float *in, int64_t istride, const float *ia, const float *ib, const float *is,
                 float *out, int P, int64_t ostride, int nthreads)
{
    OMP_ONLY(nthreads);
    const int Do = D / kd, Ho = H / kh, Wo = W / kw;
    const size_t iplane = (size_t)(H + 2) * Pi, oplane = (size_t)(Ho + 2) * P;
    const int nrows = C * Do * (Ho + 2);
#pragma omp parallel for num_threads(nthreads) schedule(SCHED(16))
    for (int r = 0; r < nrows; r++) {
        const int c = r / (Do * (Ho + 2)), rem = r % (Do * (Ho + 2)), d = rem / (Ho + 2), hr = rem % (Ho + 2);
        float *row = out + (size_t)c * ostride + (size_t)d * oplane + (size_t)hr * P;
        if (hr == 0 || hr == Ho + 1) { memset(row, 0, sizeof(float) * (size_t)P); continue; }
        const int h = hr - 1;
        const float *base = in + (size_t)c * istride + (size_t)(kd * d) * iplane + (size_t)(kh * h + 1) * Pi;
        const int idn = is_identity(ia, ib, is, c);
        const float fa = idn ? 1.f : ia[c], fb = idn ? 0.f : ib[c], fs = idn ? 1.f : is[c];
#if defined(__AVX2__) && !defined(__AVX512F__)
        if (kw == 2) {
            /* AVX2: 8 outputs from 16 inputs per step with in-lane shuffles (the 32-lane v16
               deinterleave below lowers to a long shuffle sequence on 256-bit registers) */
            const __m256 va = _mm256_set1_ps(fa), vb = _mm256_set1_ps(fb), vs = _mm256_set1_ps(fs);
            for (int w0 = 0; w0 < Wo; w0 += 8) {
                __m256 m = _mm256_set1_ps(-__builtin_inff());
                for (int a = 0; a < kd; a++)
                    for (int b = 0; b < kh; b++) {
                        const float *src = base + (size_t)a * iplane + (size_t)b * Pi + 2 * w0;
                        __m256 e = _mm256_load_ps(src), f = _mm256_load_ps(src + 8);
                        if (!idn) {
                            e = _mm256_fmadd_ps(va, e, vb);
                            e = _mm256_max_ps(e, _mm256_mul_ps(vs, e));
                            f = _mm256_fmadd_ps(va, f, vb);
                            f = _mm256_max_ps(f, _mm256_mul_ps(vs, f));
                        }
                        /* [e0 e2 f0 f2 | e4 e6 f4 f6] and the odd columns: pair maxima in lane order */
                        const __m256 ev = _mm256_shuffle_ps(e, f, 0x88), od = _mm256_shuffle_ps(e, f, 0xDD);
                        m = _mm256_max_ps(m, _mm256_max_ps(ev, od));
                    }
                m = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(m), 0xD8)); /* 64-bit pairs 0 2 1 3 */
                const int n = Wo - w0 < 8 ? Wo - w0 : 8;
                if (n == 8) _mm256_storeu_ps(row + w0, m);
                else {
                    float tmp[8] __attribute__((aligned(32)));
                    _mm256_store_ps(tmp, m);
                    store_n(row + w0, tmp, n);
                }
            }
        } else
#endif
        if (kw == 2) {
            for (int w0 = 0; w0 < Wo; w0 += 16) {
                v16 m = BC(-__builtin_inff());
                for (int a = 0; a < kd; a++)
                    for (int b = 0; b < kh; b++) {
                        const float *src = base + (size_t)a * iplane + (size_t)b * Pi + 2 * w0;
                        v16 e = LDA(src), f = LDA(src + 16);
                        if (!idn) { e = xform(e, fa, fb, fs); f = xform(f, fa, fb, fs); }
#if defined(__clang__)
                        const v16 ev = __builtin_shufflevector(e, f, 0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30);
                        const v16 od = __builtin_shufflevector(e, f, 1,3,5,7,9,11,13,15,17,19,21,23,25,27,29,31);
#else
                        const v16 ev = __builtin_shuffle(e, f, (i16){0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30});
                        const v16 od = __builtin_shuffle(e, f, (i16){1,3,5,7,9,11,13,15,17,19,21,23,25,27,29,31});
#endif
                        m = vmax(m, vmax(ev, od));
                    }
                store_v(row + w0, m, Wo - w0 < 16 ? Wo - w0 : 16, 0);
            }
        } else {
            for (int w = 0; w < Wo; w++) {
                float m = -__builtin_inff();
                for (int a = 0; a < kd; a++)
                    for (int b = 0; b < kh; b++) {
                        const float *src = base + (size_t)a * iplane + (size_t)b * Pi + (size_t)kw * w;
                        for (int e = 0; e < kw; e++) {
                            float v = src[e] * fa + fb;
                            v = v > 0.f ? v : v * fs;
                            m = v > m ? v : m;
                        }
                    }
                row[w] = m;
            }
        }
        memset(row + Wo, 0, sizeof(float) * (size_t)(P - Wo));
    }
}
