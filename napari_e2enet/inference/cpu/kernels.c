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
#if defined(__AVX512F__)
    _mm_sfence();
#endif
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
void e2e_sconv133(int I, int O, int D, int d0, int d1, int H, int W, int P,
                  const int64_t *chan, const int *dshift,
                  const float *ia, const float *ib, const float *is,
                  const int *colptr, const int *rowidx, const float *wts,
                  float *out, int64_t ostride, double *stats, int nt, int nthreads)
{
    const int nwb = (W + 15) / 16, nhb = (H + RB - 1) / RB;
    const int ntask = (d1 - d0) * nhb * nwb;
    const size_t plane = (size_t)(H + 2) * P;
    double *tst = stats ? calloc((size_t)nthreads * 2 * O, sizeof(double)) : NULL;
#pragma omp parallel num_threads(nthreads)
    {
        float *acc = alloc64(sizeof(float) * (size_t)O * RB * 16);
        double *st = tst ? tst + (size_t)TID() * 2 * O : NULL;
#pragma omp for schedule(SCHED(nwb))
        for (int task = 0; task < ntask; task++) {
            const int wb = task % nwb, hb = (task / nwb) % nhb, d = d0 + task / (nwb * nhb);
            const int h0 = hb * RB, w0 = wb * 16;
            const int nrow = H - h0 < RB ? H - h0 : RB, ncol = W - w0 < 16 ? W - w0 : 16;
            v16 lanes, mleft, mright;
            for (int t = 0; t < 16; t++) {
                lanes[t] = t < ncol ? 1.f : 0.f;
                mleft[t] = (w0 + t - 1 >= 0) ? 1.f : 0.f;  /* column w-1 inside the image */
                mright[t] = (w0 + t + 1 < W) ? 1.f : 0.f;  /* column w+1 inside the image */
            }
            memset(acc, 0, sizeof(float) * (size_t)O * RB * 16);
            for (int i = 0; i < I; i++) {
                const int k0 = colptr[i], k1 = colptr[i + 1];
                if (k0 == k1) continue;
                const int ds = d + dshift[i];
                if (ds < 0 || ds >= D) continue;
                const float *rp = (const float *)(intptr_t)chan[i] + (size_t)ds * plane + (size_t)h0 * P + w0;
                {   /* prefetch the lines this thread's next tile reads from this channel */
                    const float *np = wb + 1 < nwb ? rp + E2E_PF : rp + (size_t)RB * P - w0;
                    for (int j = 0; j < RB + 2; j++) __builtin_prefetch(np + (size_t)j * P, 0, 2);
                }
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
#if defined(__AVX2__) && !defined(__AVX512F__)
                /* AVX2 has 16 ymm registers and a v16 is two of them: the AVX-512 order below (9
                   broadcast taps + 2 × RB v16 accumulators = 34 ymm) spilled on every FMA and ran at
                   ~2 % of the FMA peak (0.6 vs oneDNN's 8 GMAC/s, 2026-12-07). Here one tap at a time:
                   one broadcast, RB rows × 2 halves = 8 independent ymm accumulators, the inputs as
                   memory operands (X is in L1): 9 + 8 registers' worth, no spill. */
                const v8 *X8 = (const v8 *)X;
                for (int k = k0; k < k1; k++) {
                    float *acc_o = acc + (size_t)rowidx[k] * RB * 16;
                    const float *q = wts + 9 * (size_t)k;
                    v8 A0[RB], A1[RB];
#pragma GCC unroll 16
                    for (int j = 0; j < RB; j++) {
                        A0[j] = *(const v8 *)(acc_o + 16 * j);
                        A1[j] = *(const v8 *)(acc_o + 16 * j + 8);
                    }
#pragma GCC unroll 3
                    for (int dy = 0; dy < 3; dy++) {
#pragma GCC unroll 3
                        for (int dx = 0; dx < 3; dx++) {
                            const v8 w = (v8){0} + q[3 * dy + dx];
#pragma GCC unroll 16
                            for (int j = 0; j < RB; j++) {
                                A0[j] += w * X8[2 * (3 * (j + dy) + dx)];
                                A1[j] += w * X8[2 * (3 * (j + dy) + dx) + 1];
                            }
                        }
                    }
#pragma GCC unroll 16
                    for (int j = 0; j < RB; j++) {
                        *(v8 *)(acc_o + 16 * j) = A0[j];
                        *(v8 *)(acc_o + 16 * j + 8) = A1[j];
                    }
                }
#else
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
        }
        free(acc);
        fence();
    }
    if (stats) {
        for (int t = 0; t < nthreads; t++)
            for (int j = 0; j < 2 * O; j++) stats[j] += tst[(size_t)t * 2 * O + j];
        free(tst);
    }
}

/* 1x1x1 head without bias on a PP tensor read through the lazy norm: out[k, d, h, w] =
   sum_c wh[k*C + c] * x'[c, d, h, w]; out is a dense (K, D, H, W) float32 array. */
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

#if defined(__AVX2__) && !defined(__AVX512F__)
/* AVX2: the tile's KK taps for one output channel, 8 low-res columns at a time (KK ymm accumulators,
   one input vector, one broadcast: no spill; convt_acc's 2 × KK v16 = 32 ymm spilled on every FMA
   and, with its v16 interleaving shuffles, ran the bundled MNI model's up-sampling at ~0.15 GMAC/s,
   30x slower than a dense matmul, 2026-12-07). tile[p][c]: tap p, low-res column c of the tile. */
static inline __attribute__((always_inline)) void convt_seg8(const int KK, float (*tile)[32], int nseg, const float *ib,
                                                             int64_t bstride, const int *colidx, const float *wts,
                                                             int k0, int k1)
{
    for (int g = 0; g < nseg; g++) {
        v8 A[8];
#pragma GCC unroll 8
        for (int p = 0; p < KK; p++) A[p] = (v8){0};
        for (int k = k0; k < k1; k++) {
            const v8 x = *(const v8 *)(ib + (size_t)colidx[k] * bstride + 8 * g);
            const float *q = wts + (size_t)KK * k;
#pragma GCC unroll 8
            for (int p = 0; p < KK; p++) A[p] += ((v8){0} + q[p]) * x;
        }
#pragma GCC unroll 8
        for (int p = 0; p < KK; p++) *(v8 *)&tile[p][8 * g] = A[p];
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
            const int oc0 = kw * w0, oc1 = wb == nwb - 1 ? P : kw * (w0 + ncol);
            const float *src = in + (size_t)dl * iplane + (size_t)(hl + 1) * Pl + w0;
            const float *ib = src;
            int64_t bstride = istride;
            if (ia != NULL) {  /* apply the lazy norm once per tile and input channel */
                for (int c = 0; c < Ci; c++) {
                    for (int v = 0; v < nv; v++) {
                        const v16 x = LDA(src + (size_t)c * istride + 16 * v);
                        xt[2 * c + v] = is_identity(ia, iib, is, c) ? x : xform(x, ia[c], iib[c], is[c]);
                    }
                }
                ib = (const float *)xt;
                bstride = 32;
            }
#if defined(__AVX2__) && !defined(__AVX512F__)
            for (int o = 0; o < O; o++) {
                const int k0 = rowptr[o], k1 = rowptr[o + 1], nseg = (ncol + 7) / 8;
                float tile[8][32] __attribute__((aligned(32)));
                if (K == 8) convt_seg8(8, tile, nseg, ib, bstride, colidx, wts, k0, k1);
                else if (K == 4) convt_seg8(4, tile, nseg, ib, bstride, colidx, wts, k0, k1);
                else if (K == 2) convt_seg8(2, tile, nseg, ib, bstride, colidx, wts, k0, k1);
                else convt_seg8(1, tile, nseg, ib, bstride, colidx, wts, k0, k1);
                float *ob = out + (size_t)o * ostride;
                for (int a = 0; a < kd; a++) {
                    float *pl = ob + (size_t)(kd * dl + a) * oplane;
                    for (int b = 0; b < kh; b++) {
                        const int h = kh * hl + b;
                        float *row = pl + (size_t)(h + 1) * P, *dst = row + kw * w0;
                        const float *t0 = tile[(a * kh + b) * kw];
                        if (kw == 1) memcpy(dst, t0, sizeof(float) * (size_t)ncol);
                        else {
                            const float *t1 = tile[(a * kh + b) * kw + 1];
                            for (int c = 0; c < ncol; c++) { dst[2 * c] = t0[c]; dst[2 * c + 1] = t1[c]; }
                        }
                        if (wb == nwb - 1) memset(row + W, 0, sizeof(float) * (size_t)(P - W));
                        if (h == 0) memset(pl + oc0, 0, sizeof(float) * (size_t)(oc1 - oc0));
                        if (h == H - 1) memset(pl + (size_t)(H + 1) * P + oc0, 0, sizeof(float) * (size_t)(oc1 - oc0));
                    }
                }
            }
            (void)nt;
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

/* Channels-last (D, H, W, C) float32 -> PP (C, D, H, W) with halo; out channel stride ostride. */
void e2e_cl_to_pp(int D, int H, int W, int C, const float *x, float *out, int P, int64_t ostride, int nthreads)
{
    OMP_ONLY(nthreads);
    const size_t plane = (size_t)(H + 2) * P;
#pragma omp parallel for num_threads(nthreads) schedule(SCHED(8))
    for (int dh = 0; dh < D * H; dh++) {
        const int d = dh / H, h = dh % H;
        const float *src = x + (size_t)dh * W * C;
        for (int c = 0; c < C; c++) {
            float *pl = out + (size_t)c * ostride + (size_t)d * plane;
            float *row = pl + (size_t)(h + 1) * P;
            for (int w = 0; w < W; w++) row[w] = src[(size_t)w * C + c];
            memset(row + W, 0, sizeof(float) * (size_t)(P - W));
            if (h == 0) memset(pl, 0, sizeof(float) * (size_t)P);
            if (h == H - 1) memset(pl + (size_t)(H + 1) * P, 0, sizeof(float) * (size_t)P);
        }
    }
}

/* Channels-last depth shift with optional fused affine + LeakyReLU:
   out[d', p, c] = f(x[sd*d' + delta_r, p, c]) for channels c in run r = [rs[r], rs[r+1]),
   zero where the source depth is outside [0, Din); f(v) = leaky(v*scale[c] + shift[c], slope),
   or f(v) = v when scale is NULL. x: Din x HW rows of C floats; out: Dout x HW rows of C. */
void e2e_cl_shift(int Dout, int Din, int64_t HW, int C, const float *x, float *out, int nrun,
                  const int *rs, const int *rdelta, int sd, const float *scale, const float *shift,
                  float slope, int nthreads)
{
    OMP_ONLY(nthreads);
    const int64_t blk = 64, nb = (HW + blk - 1) / blk;
#pragma omp parallel for num_threads(nthreads) schedule(SCHED(64))
    for (int64_t t = 0; t < (int64_t)Dout * nb; t++) {
        const int d = (int)(t / nb);
        const int64_t p0 = (t % nb) * blk, p1 = p0 + blk < HW ? p0 + blk : HW;
        for (int r = 0; r < nrun; r++) {
            const int c0 = rs[r], c1 = rs[r + 1], ds = sd * d + rdelta[r];
            for (int64_t p = p0; p < p1; p++) {
                float *o = out + ((size_t)d * HW + p) * C;
                if (ds < 0 || ds >= Din) { memset(o + c0, 0, sizeof(float) * (size_t)(c1 - c0)); continue; }
                const float *i = x + ((size_t)ds * HW + p) * C;
                if (scale) for (int c = c0; c < c1; c++) { float v = i[c] * scale[c] + shift[c]; o[c] = v > 0.f ? v : v * slope; }
                else for (int c = c0; c < c1; c++) o[c] = i[c];
            }
        }
    }
}

/* Channels-last statistics: x is P rows of C floats (row stride C); stats[c] = sum over rows,
   stats[C+c] = sum of squares (float partial sums over 256 rows, accumulated in double). */
void e2e_cl_stats(int64_t P, int C, const float *x, double *stats, int nthreads)
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
                const float *row = x + (size_t)r * C;
                for (int c = 0; c < C; c++) { const float v = row[c]; a[c] += v; b[c] += v * v; }
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
