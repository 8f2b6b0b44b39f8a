/* napari-e2enet training kernels: the kernel-sparse (1,3,3) convolution of the DSFF-masked fusion
   convs, forward and backward, on plain contiguous (N, C, D, H, W) float32 tensors (what autograd
   hands around), with the restricted depth shift folded in. See kernels.h for the contract and
   napari_e2enet/training/sparse_conv.py for the autograd function that calls them.

   Work is proportional to the active (out, in) kernels. Inputs and outputs are given as tables of
   channel addresses (N x C, each the start of a (D, H, W) volume), so the input can be the channel
   concatenation of several tensors that is never built (a fused node's forward, up and down
   parts) and each part's gradient lands in a tensor of its own. One (sample, slice) is one task: its
   input channels are copied once into a zero-padded scratch plane stack (the depth shift is
   applied by reading slice d + shift[c]; the halo replaces bounds checks). The tiles of 4 rows x
   16 columns are then input-stationary, as the inference kernel's: per tile, each input's 6 rows
   are read once (from L2 into L1) and feed all of its active kernels, each accumulating into its
   output's block of 8 vectors in a per-thread accumulator (outputs in groups of OG, so that the
   block of a group, OG x 256 B, stays in L1 with the rows). The previous, output-stationary order
   re-read an input's rows from L2 for every output that uses it: 30-34 GMAC/s on two threads
   against ~43 on one for the inference kernel (AMD EPYC, AVX2).
   The same function computes dX (the transposed mask, flipped taps, shift applied on the way
   out); the weight gradient of the active kernels is 9 dot products per kernel and slice.

   Portable C with GCC/Clang vector extensions (v8: 8 floats: one AVX2 register, two SSE/NEON
   ones) and OpenMP where the compiler has it. */
#include "kernels.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#define T_OMP_ONLY(x) ((void)0)
#else
#define T_OMP_ONLY(x) ((void)(x)) /* without OpenMP the thread count is not used */
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
#define T_LDU(p) (*(const v8u *)(p))
#define T_STU(p, v) (*(v8u *)(p) = (v))
/* a broadcast (not {0} + s: without -ffast-math GCC must add the zero, a vaddss per use) */
static inline v8 T_BC(float s) {
    v8 v = {s, s, s, s, s, s, s, s};
    return v;
}
#define T_TR 4  /* tile rows */
#define T_TC 16 /* tile columns */
#define T_CHAN(a) ((float *)(intptr_t)(a)) /* a channel address of an address table */

static int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

static float *scratch(int64_t floats) {
    /* 64-byte aligned, zeroed: the halo rows and columns of the padded planes stay zero. */
    size_t bytes = (size_t)round_up(floats * (int64_t)sizeof(float), 64);
    float *p = aligned_alloc(64, bytes);
    if (p) memset(p, 0, bytes);
    return p;
}

/* Slice d of the channels at xa (C addresses of (D, H, W) volumes), shifted by sh (channel c read
   at slice d + sh[c], zero outside), into the interior of xp (C planes of pl floats, rows of Wp:
   voxel (h, w) at (h + 1) * Wp + w + 1). Only the interior is written; the halo is zero from scratch(). */
static void pad_slice(int C, int D, int H, int W, int Wp, int64_t pl, const int64_t *xa, const int *sh, int d,
                      float *xp) {
    for (int c = 0; c < C; c++) {
        float *o = xp + c * pl + Wp + 1;
        int ds = d + (sh ? sh[c] : 0);
        if (ds < 0 || ds >= D) {
            for (int h = 0; h < H; h++) memset(o + (int64_t)h * Wp, 0, sizeof(float) * (size_t)W);
            continue;
        }
        const float *s = T_CHAN(xa[c]) + (int64_t)ds * H * W;
        for (int h = 0; h < H; h++) memcpy(o + (int64_t)h * Wp, s + (int64_t)h * W, sizeof(float) * (size_t)W);
    }
}

/* acc (kernels' outputs o - o0, each T_TR rows x T_TC columns) += the active kernels kb..ke-1 of one
   input, whose padded rows start at x (row h0 - 1 of the image, column c0 - 1; rows of Wp). Per
   kernel: its output's 8 accumulator vectors are loaded from and stored to acc (L1), the 36 input
   vectors are loaded once and each feeds up to 3 rows x 1 tap (72 FMAs). */
static inline void taps(const float *x, int Wp, int kb, int ke, const int *idx, int o0, const float *wts,
                        float *acc) {
#if defined(__AVX2__) && defined(__FMA__)
    /* Tap by tap, as the inference kernel's sconv_taps_avx2: one broadcast, then 8 FMAs on 8
       independent accumulators. The input's 36 vectors (6 rows x 3 column shifts x 2 halves) are
       copied once per (input, tile) into an aligned block on the stack, which all its kernels read
       as memory operands: straight from the rows, a third of the loads split a cache line
       (~22 GMAC/s per core against ~33 for this form, AMD EPYC). The portable form below is the
       same arithmetic; GCC compiled it with its 36 input addresses on the stack and spilled
       accumulators (~16 GMAC/s per core). */
    __m256 X[T_TR + 2][3][2];
#pragma GCC unroll 6
    for (int r = 0; r < T_TR + 2; r++)
#pragma GCC unroll 3
        for (int kw = 0; kw < 3; kw++) {
            X[r][kw][0] = _mm256_loadu_ps(x + (int64_t)r * Wp + kw);
            X[r][kw][1] = _mm256_loadu_ps(x + (int64_t)r * Wp + kw + 8);
        }
    for (int k = kb; k < ke; k++) {
        float *ao = acc + (int64_t)(idx[k] - o0) * T_TR * T_TC;
        const float *w = wts + 9 * (int64_t)k;
        __m256 A0[T_TR], A1[T_TR];
#pragma GCC unroll 4
        for (int j = 0; j < T_TR; j++) {
            A0[j] = _mm256_load_ps(ao + j * T_TC);
            A1[j] = _mm256_load_ps(ao + j * T_TC + 8);
        }
#pragma GCC unroll 3
        for (int kh = 0; kh < 3; kh++) {
#pragma GCC unroll 3
            for (int kw = 0; kw < 3; kw++) {
                const __m256 s = _mm256_broadcast_ss(w + kh * 3 + kw);
#pragma GCC unroll 4
                for (int j = 0; j < T_TR; j++) {
                    A0[j] = _mm256_fmadd_ps(s, X[j + kh][kw][0], A0[j]);
                    A1[j] = _mm256_fmadd_ps(s, X[j + kh][kw][1], A1[j]);
                }
            }
        }
#pragma GCC unroll 4
        for (int j = 0; j < T_TR; j++) {
            _mm256_store_ps(ao + j * T_TC, A0[j]);
            _mm256_store_ps(ao + j * T_TC + 8, A1[j]);
        }
    }
#else
    for (int k = kb; k < ke; k++) {
        float *ao = acc + (int64_t)(idx[k] - o0) * T_TR * T_TC;
        const float *w = wts + 9 * (int64_t)k;
        v8 a[T_TR][2];
        for (int j = 0; j < T_TR; j++) {
            a[j][0] = *(const v8 *)(ao + j * T_TC);
            a[j][1] = *(const v8 *)(ao + j * T_TC + 8);
        }
#pragma GCC unroll 6
        for (int r = 0; r < T_TR + 2; r++) {
#pragma GCC unroll 3
            for (int kw = 0; kw < 3; kw++) {
                v8 A = T_LDU(x + (int64_t)r * Wp + kw), B = T_LDU(x + (int64_t)r * Wp + kw + 8);
#pragma GCC unroll 4
                for (int j = 0; j < T_TR; j++) {
                    int kh = r - j;
                    if (kh < 0 || kh > 2) continue;
                    v8 s = T_BC(w[kh * 3 + kw]);
                    a[j][0] += s * A;
                    a[j][1] += s * B;
                }
            }
        }
        for (int j = 0; j < T_TR; j++) {
            *(v8 *)(ao + j * T_TC) = a[j][0];
            *(v8 *)(ao + j * T_TC + 8) = a[j][1];
        }
    }
#endif
}

/* The tile's accumulators (outputs o0 .. o0 + on - 1) into their rows of y, slice dd of each
   output (d + oshift: the adjoint of reading slice d + shift), nrow x ncol of the tile inside
   the image. */
static void store_tile(const float *acc, int o0, int on, const int64_t *ya, const int *oshift, int d, int D,
                       int64_t HW, int W, int h0, int c0, int nrow, int ncol) {
    for (int o = 0; o < on; o++) {
        int dd = d + (oshift ? oshift[o0 + o] : 0);
        if (dd < 0 || dd >= D) continue;
        float *yo = T_CHAN(ya[o0 + o]) + dd * HW + (int64_t)h0 * W + c0;
        for (int j = 0; j < nrow; j++) {
            const float *ar = acc + ((int64_t)o * T_TR + j) * T_TC;
            if (ncol == T_TC) {
                T_STU(yo + (int64_t)j * W, *(const v8 *)ar);
                T_STU(yo + (int64_t)j * W + 8, *(const v8 *)(ar + 8));
            } else {
                memcpy(yo + (int64_t)j * W, ar, sizeof(float) * (size_t)ncol);
            }
        }
    }
}

int e2e_tconv_fwd(int N, int I, int O, int D, int H, int W, const int64_t *xa, const int *ishift, int OG,
                  const int *ptr, const int *idx, const float *wts, const int64_t *ya, const int *oshift,
                  int nthreads) {
    int Hq = (int)round_up(H, T_TR), Wq = (int)round_up(W, T_TC), Wp = (int)round_up(Wq + 2, 16);
    int64_t pl = (int64_t)(Hq + 2) * Wp, HW = (int64_t)H * W;
    int ngroups = (O + OG - 1) / OG, tasks = N * D, failed = 0;
    T_OMP_ONLY(nthreads);
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *xp = scratch(I * pl), *acc = scratch((int64_t)OG * T_TR * T_TC);
        if (!xp || !acc) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < tasks; t++) {
            if (!xp || !acc) continue;
            int n = t / D, d = t % D;
            pad_slice(I, D, H, W, Wp, pl, xa + (int64_t)n * I, ishift, d, xp);
            for (int g = 0; g < ngroups; g++) {
                int o0 = g * OG, on = O - o0 < OG ? O - o0 : OG;
                for (int h0 = 0; h0 < H; h0 += T_TR)
                    for (int c0 = 0; c0 < W; c0 += T_TC) {
                        memset(acc, 0, sizeof(float) * (size_t)on * T_TR * T_TC);
                        for (int i = 0; i < I; i++) {
                            int kb = ptr[g * I + i], ke = ptr[g * I + i + 1];
                            if (kb == ke) continue;
                            const float *x = xp + i * pl + (int64_t)h0 * Wp + c0;
                            /* the lines the next tile reads first from this input (the slice is
                               larger than L2: without this its rows came from L3 at every tile) */
                            const float *nx = c0 + T_TC < W ? x + 2 * T_TC : x + (int64_t)T_TR * Wp - c0;
                            for (int r = 0; r < T_TR + 2; r++) __builtin_prefetch(nx + (int64_t)r * Wp, 0, 2);
                            taps(x, Wp, kb, ke, idx, o0, wts, acc);
                        }
                        store_tile(acc, o0, on, ya + (int64_t)n * O, oshift, d, D, HW, W, h0, c0,
                                   H - h0 < T_TR ? H - h0 : T_TR, W - c0 < T_TC ? W - c0 : T_TC);
                    }
            }
        }
        free(xp);
        free(acc);
    }
    if (oshift) { /* slices no computed slice lands on (an edge of the shifted groups) are zero */
        for (int n = 0; n < N; n++)
            for (int o = 0; o < O; o++) {
                int s = oshift[o];
                for (int dd = 0; dd < D; dd++)
                    if (dd - s < 0 || dd - s >= D) memset(T_CHAN(ya[(int64_t)n * O + o]) + dd * HW, 0, sizeof(float) * (size_t)HW);
            }
    }
    return failed; /* 1: a thread could not allocate its scratch (the result is incomplete) */
}

int e2e_tconv_dw(int N, int I, int O, int D, int H, int W, const int64_t *xa, const int *ishift,
                 const int64_t *dya, int CH, const int *ptr, const int *idx, double *dw, int nthreads) {
    int Wq = (int)round_up(W, 8), Wp = (int)round_up(Wq + 2, 16);
    int64_t pl = (int64_t)(H + 2) * Wp, HW = (int64_t)H * W, gplane = (int64_t)H * Wq;
    int nch = (I + CH - 1) / CH, tasks = N * D, failed = 0;
    int64_t nnz = ptr[nch * O];
    T_OMP_ONLY(nthreads);
    /* One float64 accumulator per thread, a static schedule and the sum in thread order after the
       loop: the result depends on the thread count only, not on timing (exact resume needs it). */
    int team = nthreads < 1 ? 1 : nthreads;
    double *acc = calloc((size_t)team * (size_t)(9 * nnz + 1), sizeof(double));
    if (!acc) return 1;
#pragma omp parallel num_threads(team) reduction(| : failed)
    {
#ifdef _OPENMP
        double *mine = acc + (size_t)omp_get_thread_num() * (size_t)(9 * nnz + 1);
#else
        double *mine = acc;
#endif
        float *xp = scratch(I * pl), *gp = scratch(gplane);
        if (!xp || !gp) failed = 1;
#pragma omp for schedule(static)
        for (int t = 0; t < tasks; t++) {
            if (!xp || !gp) continue;
            int n = t / D, d = t % D;
            pad_slice(I, D, H, W, Wp, pl, xa + (int64_t)n * I, ishift, d, xp);
            for (int o = 0; o < O; o++) {
                const float *g = T_CHAN(dya[(int64_t)n * O + o]) + d * HW;
                if (Wq != W) { /* rows of Wq with zero tails: every vector load stays in the row */
                    for (int h = 0; h < H; h++) memcpy(gp + (int64_t)h * Wq, g + (int64_t)h * W, sizeof(float) * (size_t)W);
                    g = gp;
                }
                for (int ch = 0; ch < nch; ch++)
                    for (int k = ptr[ch * O + o]; k < ptr[ch * O + o + 1]; k++) {
                        const float *xb = xp + idx[k] * pl;
                        v8 a[9];
                        for (int q = 0; q < 9; q++) a[q] = (v8){0};
                        for (int h = 0; h < H; h++) {
                            const float *xr = xb + (int64_t)h * Wp;
                            const float *gr = g + (int64_t)h * Wq;
                            for (int c = 0; c < Wq; c += 8) {
                                v8 G = T_LDU(gr + c);
#pragma GCC unroll 3
                                for (int kh = 0; kh < 3; kh++)
#pragma GCC unroll 3
                                    for (int kw = 0; kw < 3; kw++)
                                        a[kh * 3 + kw] += G * T_LDU(xr + (int64_t)kh * Wp + c + kw);
                            }
                        }
                        for (int q = 0; q < 9; q++) {
                            double sum = 0;
                            for (int l = 0; l < 8; l++) sum += a[q][l];
                            mine[9 * (int64_t)k + q] += sum;
                        }
                    }
            }
        }
        free(xp);
        free(gp);
    }
    for (int64_t q = 0; q < 9 * nnz; q++) {
        double sum = 0;
        for (int t = 0; t < team; t++) sum += acc[(size_t)t * (size_t)(9 * nnz + 1) + (size_t)q];
        dw[q] = sum;
    }
    free(acc);
    return failed;
}

/* ---------------------------------------------------------------------------------------------
   The up-sampling ConvTranspose3d of a fused node with kernel == stride (kd, kh, kw), K = kd*kh*kw
   <= 8 taps, and an (in, out) kernel mask. Each low-res voxel maps to its own K output voxels, so
   the layer is a per-voxel (O*K) x I matrix product over the active (i, o) kernels only:
     y[n, o, d*kd + a, h*kh + b, w*kw + c] = sum_{i active for o} x[n, i, d, h, w] * wts[k(o, i), (a*kh + b)*kw + c].
   One (sample, low-res slice) is one task. Vectors run along w over 8 low-res voxels; the K taps
   of one kernel are K accumulators (one FMA each per loaded input vector), interleaved into the
   high-res rows on the way out (forward) or de-interleaved once per row on the way in (dX, dW). */

#define U_MAXK 8

/* Rows h0..h0+hn-1 of the high-res slab of dy for (n, o), low-res slice d, de-interleaved into
   g[(q * hn + r) * Wq + w] = dy[n, o, d*kd + a, (h0 + r)*kh + b, w*kw + c] (zero for w >= W). */
static void up_split(int kd, int kh, int kw, int H, int W, int Wq, const float *dyo, int d, int h0, int hn,
                     float *g) {
    int64_t Wo = (int64_t)W * kw, plane = (int64_t)H * kh * Wo;
    for (int a = 0; a < kd; a++)
        for (int b = 0; b < kh; b++)
            for (int c = 0; c < kw; c++) {
                int q = (a * kh + b) * kw + c;
                for (int r = 0; r < hn; r++) {
                    const float *s = dyo + ((int64_t)d * kd + a) * plane + ((int64_t)(h0 + r) * kh + b) * Wo + c;
                    float *o = g + ((int64_t)q * hn + r) * Wq;
                    for (int w = 0; w < W; w++) o[w] = s[(int64_t)w * kw];
                }
            }
}

int e2e_upconv_fwd(int N, int I, int O, int D, int H, int W, int kd, int kh, int kw, const float *x,
                   const int *ptr, const int *idx, const float *wts, float *y, int nthreads) {
    int K = kd * kh * kw, Wq = (int)round_up(W, 8), tasks = N * D, failed = 0;
    if (K < 1 || K > U_MAXK) return 2;
    int64_t vol = (int64_t)D * H * W, Wo = (int64_t)W * kw, Ho = (int64_t)H * kh, ovol = (int64_t)D * kd * Ho * Wo;
    T_OMP_ONLY(nthreads);
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *xr = scratch((int64_t)I * Wq), *buf = scratch(U_MAXK * 8);
        if (!xr || !buf) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < tasks; t++) {
            if (!xr || !buf) continue;
            int n = t / D, d = t % D;
            for (int h = 0; h < H; h++) {
                for (int i = 0; i < I; i++) /* row h of every input, zero tail: whole-vector loads */
                    memcpy(xr + (int64_t)i * Wq, x + ((int64_t)n * I + i) * vol + ((int64_t)d * H + h) * W,
                           sizeof(float) * (size_t)W);
                for (int o = 0; o < O; o++) {
                    float *yo = y + ((int64_t)n * O + o) * ovol;
                    for (int wb = 0; wb < W; wb += 8) {
                        v8 acc[U_MAXK];
                        for (int q = 0; q < K; q++) acc[q] = (v8){0};
                        for (int k = ptr[o]; k < ptr[o + 1]; k++) {
                            v8 X = T_LDU(xr + (int64_t)idx[k] * Wq + wb);
                            const float *wk = wts + (int64_t)K * k;
                            for (int q = 0; q < K; q++) acc[q] += T_BC(wk[q]) * X;
                        }
                        for (int q = 0; q < K; q++) T_STU(buf + 8 * q, acc[q]);
                        int wn = W - wb < 8 ? W - wb : 8;
                        for (int a = 0; a < kd; a++)
                            for (int b = 0; b < kh; b++) {
                                float *row = yo + ((int64_t)d * kd + a) * Ho * Wo + ((int64_t)h * kh + b) * Wo
                                             + (int64_t)wb * kw;
                                const float *src = buf + 8 * (a * kh + b) * kw;
                                for (int l = 0; l < wn; l++)
                                    for (int c = 0; c < kw; c++) row[l * kw + c] = src[8 * c + l];
                            }
                    }
                }
            }
        }
        free(xr);
        free(buf);
    }
    return failed;
}

int e2e_upconv_dx(int N, int I, int O, int D, int H, int W, int kd, int kh, int kw, const float *dy,
                  const int *ptr_t, const int *idx_t, const float *wts_t, float *dx, int nthreads) {
    int K = kd * kh * kw, Wq = (int)round_up(W, 8), tasks = N * D, failed = 0;
    if (K < 1 || K > U_MAXK) return 2;
    int64_t vol = (int64_t)D * H * W, ovol = (int64_t)D * kd * H * kh * W * kw;
    T_OMP_ONLY(nthreads);
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *g = scratch((int64_t)O * K * Wq), *buf = scratch(8);
        if (!g || !buf) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < tasks; t++) {
            if (!g || !buf) continue;
            int n = t / D, d = t % D;
            for (int h = 0; h < H; h++) {
                for (int o = 0; o < O; o++)
                    up_split(kd, kh, kw, H, W, Wq, dy + ((int64_t)n * O + o) * ovol, d, h, 1, g + (int64_t)o * K * Wq);
                for (int i = 0; i < I; i++) {
                    float *row = dx + ((int64_t)n * I + i) * vol + ((int64_t)d * H + h) * W;
                    for (int wb = 0; wb < W; wb += 8) {
                        v8 acc = (v8){0};
                        for (int k = ptr_t[i]; k < ptr_t[i + 1]; k++) {
                            const float *go = g + (int64_t)idx_t[k] * K * Wq + wb;
                            const float *wk = wts_t + (int64_t)K * k;
                            for (int q = 0; q < K; q++) acc += T_BC(wk[q]) * T_LDU(go + (int64_t)q * Wq);
                        }
                        if (W - wb >= 8) {
                            T_STU(row + wb, acc);
                        } else {
                            T_STU(buf, acc);
                            memcpy(row + wb, buf, sizeof(float) * (size_t)(W - wb));
                        }
                    }
                }
            }
        }
        free(g);
        free(buf);
    }
    return failed;
}

int e2e_upconv_dw(int N, int I, int O, int D, int H, int W, int kd, int kh, int kw, const float *x,
                  const float *dy, const int *ptr, const int *idx, double *dw, int nthreads) {
    int K = kd * kh * kw, Wq = (int)round_up(W, 8), tasks = N * D, failed = 0;
    if (K < 1 || K > U_MAXK) return 2;
    /* Row blocks of about 256 low-res voxels: the float sums stay short before going to float64,
       and a block's de-interleaved dy of all outputs stays in L2 at the paper's channel counts. */
    int HB = (256 + Wq - 1) / Wq;
    if (HB > H) HB = H;
    int64_t vol = (int64_t)D * H * W, ovol = (int64_t)D * kd * H * kh * W * kw, nnz = ptr[O];
    int64_t blk = (int64_t)HB * Wq;
    T_OMP_ONLY(nthreads);
    int team = nthreads < 1 ? 1 : nthreads;
    /* Per-thread float64 sums, static schedule, reduced in thread order: deterministic for a
       thread count (as e2e_tconv_dw). */
    double *acc = calloc((size_t)team * (size_t)(K * nnz + 1), sizeof(double));
    if (!acc) return 1;
#pragma omp parallel num_threads(team) reduction(| : failed)
    {
#ifdef _OPENMP
        double *mine = acc + (size_t)omp_get_thread_num() * (size_t)(K * nnz + 1);
#else
        double *mine = acc;
#endif
        float *xs = scratch((int64_t)I * blk), *g = scratch((int64_t)O * K * blk);
        if (!xs || !g) failed = 1;
#pragma omp for schedule(static)
        for (int t = 0; t < tasks; t++) {
            if (!xs || !g) continue;
            int n = t / D, d = t % D;
            for (int h0 = 0; h0 < H; h0 += HB) {
                int hn = H - h0 < HB ? H - h0 : HB;
                int64_t len = (int64_t)hn * Wq;
                for (int i = 0; i < I; i++)
                    for (int r = 0; r < hn; r++)
                        memcpy(xs + (int64_t)i * blk + (int64_t)r * Wq,
                               x + ((int64_t)n * I + i) * vol + ((int64_t)d * H + h0 + r) * W, sizeof(float) * (size_t)W);
                for (int o = 0; o < O; o++)
                    up_split(kd, kh, kw, H, W, Wq, dy + ((int64_t)n * O + o) * ovol, d, h0, hn, g + (int64_t)o * K * blk);
                for (int o = 0; o < O; o++)
                    for (int k = ptr[o]; k < ptr[o + 1]; k++) {
                        const float *xb = xs + (int64_t)idx[k] * blk;
                        const float *gb = g + (int64_t)o * K * blk;
                        v8 a[U_MAXK];
                        for (int q = 0; q < K; q++) a[q] = (v8){0};
                        for (int64_t v = 0; v < len; v += 8) {
                            v8 X = T_LDU(xb + v);
                            for (int q = 0; q < K; q++) a[q] += X * T_LDU(gb + (int64_t)q * len + v);
                        }
                        for (int q = 0; q < K; q++) {
                            double sum = 0;
                            for (int l = 0; l < 8; l++) sum += a[q][l];
                            mine[(int64_t)K * k + q] += sum;
                        }
                    }
            }
        }
        free(xs);
        free(g);
    }
    for (int64_t q = 0; q < K * nnz; q++) {
        double sum = 0;
        for (int t = 0; t < team; t++) sum += acc[(size_t)t * (size_t)(K * nnz + 1) + (size_t)q];
        dw[q] = sum;
    }
    free(acc);
    return failed;
}
