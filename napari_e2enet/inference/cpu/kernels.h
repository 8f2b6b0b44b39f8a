/* napari-e2enet CPU kernels: the exported functions and the layout they share with Python.

   The Python bindings (bindings.py, SIGNATURES) declare the same parameter lists; a test parses
   this header and compares them, so a change here that is not made there fails the test suite
   instead of crashing a process. Bump E2E_ABI_VERSION whenever a signature or the layout changes.

   Layout "PP" (padded planar), one sample: a channel is D planes of (H+2) rows x P floats,
   P % 16 == 0, P >= W+1; voxel (d,h,w) sits at d*(H+2)*P + (h+1)*P + w; rows 0 and H+1 and
   columns W..P-1 of every row are zero, so the left neighbour of column 0 is the zero padding of
   the row above. Every PP buffer is 64-byte aligned, has E2E_PAD_FLOATS zero floats before its
   first plane and slack after its last (read, never used). */
#ifndef NAPARI_E2ENET_KERNELS_H
#define NAPARI_E2ENET_KERNELS_H

#include <stdint.h>

#define E2E_ABI_VERSION 10
#define E2E_PAD_FLOATS 16

/* E2E_ABI_VERSION of the compiled library. */
int e2e_abi_version(void);

/* Rows per sconv133 tile in this build: 8 with AVX-512, else 4 (PP buffers carry slack for 8). */
int e2e_row_block(void);

/* Sparse (1,3,3) convolution with per-input-channel depth offsets (the restricted depth shift). */
void e2e_sconv133(int I, int O, int D, int d0, int d1, int H, int W, int P,
                  const int64_t *chan, const int *dshift,
                  const float *ia, const float *ib, const float *is,
                  const int *colptr, const int *rowidx, const float *wts,
                  float *out, int64_t ostride, double *stats, int nt, int nthreads);

/* e2e_sconv133 whose input channels [u0, u1) are computed in the kernel: channel u0 + c is output
   umap[c] (-1: unread) of a ConvTranspose3d, kernel == stride == (2, 2, 2), no bias, CSR by output
   (urowptr, ucolidx, uwts: 8 taps per kernel) of the PP tensor deep (channel stride dstride, Hl
   rows, pitch Pl, D / 2 planes) read through its lazy norm (da, db, ds; NULL: as stored); chan[u0 ..
   u1) are not read. Values bit-identical to e2e_convt into a buffer, then e2e_sconv133. Returns 0;
   1 where a thread could not allocate its up strip (out is then incomplete); 2 where W is not a
   multiple of 16, H != 2 Hl, D is odd or [u0, u1) is not within [0, I). */
int e2e_sconv133_up(int I, int O, int D, int d0, int d1, int H, int W, int P,
                    const int64_t *chan, const int *dshift,
                    const float *ia, const float *ib, const float *is,
                    const int *colptr, const int *rowidx, const float *wts,
                    float *out, int64_t ostride, double *stats, int nt, int nthreads,
                    int u0, int u1, const int *umap, const float *deep, int Hl, int Pl, int64_t dstride,
                    const float *da, const float *db, const float *ds,
                    const int *urowptr, const int *ucolidx, const float *uwts);

/* 1 where this build has e2e_sconv133_bf16 (AVX-512 with a compiler that knows AVX512-BF16). */
int e2e_bf16_built(void);

/* e2e_sconv133 with bf16 products and fp32 sums: the inputs are rounded to bf16 (after the lazy
   norm) and the weights come as bf16 pairs, 12 uint32 per kernel (low half the first element):
   (q0,q3) (q1,q4) (q2,q5) (q6,0) (q7,0) (q8,0) for even tile rows, (0,q0) (0,q1) (0,q2) (q3,q6)
   (q4,q7) (q5,q8) for odd ones, q the row-major taps. Returns 0, or 2 where it was not built.
   Call it only on a CPU with AVX512-BF16. */
int e2e_sconv133_bf16(int I, int O, int D, int d0, int d1, int H, int W, int P,
                      const int64_t *chan, const int *dshift,
                      const float *ia, const float *ib, const float *is,
                      const int *colptr, const int *rowidx, const uint32_t *wpairs,
                      float *out, int64_t ostride, double *stats, int nt, int nthreads);

/* 1x1x1 head (no bias) from a PP tensor into dense (K, D, H, W) logits. */
void e2e_head(int C, int D, int H, int W, int P, const float *x, int64_t cstride,
              const float *ia, const float *ib, const float *is, int K, const float *wh, float *out,
              int nthreads);

/* Sparse ConvTranspose3d with kernel == stride, PP in and out. */
void e2e_convt(int Ci, int O, int Dl, int Hl, int Wl, int Pl, int kd, int kh, int kw,
               const float *in, int64_t istride, const float *ia, const float *iib, const float *is,
               const int *rowptr, const int *colidx, const float *wts,
               float *out, int P, int64_t ostride, int nt, int nthreads);

/* Channels-last (D, H, W, C) float32, or bfloat16 where xbf16 -> PP (C, D, H, W) float32. */
void e2e_cl_to_pp(int D, int H, int W, int C, const void *x, int xbf16, float *out, int P, int64_t ostride,
                  int nthreads);

/* Channels-last depth shift (and depth stride) with an optional fused affine + LeakyReLU. */
/* x and out float32, or bfloat16 where xbf16 / obf16 (rounded to nearest even). */
void e2e_cl_shift(int Dout, int Din, int64_t HW, int C, const void *x, int xbf16, void *out, int obf16, int nrun,
                  const int *rs, const int *rdelta, int sd, const float *scale, const float *shift,
                  float slope, int nthreads);

/* Channels-last per-channel sum and sum of squares (double) of float32 (bfloat16 where xbf16) x. */
void e2e_cl_stats(int64_t P, int C, const void *x, int xbf16, double *stats, int nthreads);

/* Channels-last, in place: x = leaky_relu(x * scale[c] + shift[c], slope). */
void e2e_cl_norm_act(int64_t P, int C, float *x, const float *scale, const float *shift, float slope,
                     int nthreads);

/* Max pool with kernel == stride, PP in and out. */
void e2e_maxpool(int C, int D, int H, int W, int Pi, int kd, int kh, int kw,
                 const float *in, int64_t istride, const float *ia, const float *ib, const float *is,
                 float *out, int P, int64_t ostride, int nthreads);

/* Training kernels (kernels_train.c), the (1,3,3) conv with "same" padding on (N, C, D, H, W)
   float32 data given as address tables: xa / ya / dya (N * C,) int64, entry n * C + c the address
   of channel c of sample n, a contiguous (D, H, W) volume (the channels may lie in several
   tensors: a concatenation that is never built). ishift (I,) or NULL: input channel c is read at
   slice d + ishift[c] (zero outside), the restricted depth shift. Both return 0, or 1 when a
   thread could not allocate its scratch. */

/* y[n, o, d + oshift[o]] = sum over active (o, i) of conv3x3(x_shifted[n, i, d], wts[k]); oshift
   (O,) or NULL (the adjoint of a depth shift: dX is this call on dY with the transposed, flipped
   weights). The kernel-sparse weight in CSC order within groups of OG outputs: ptr[(g * I + i) ..
   + 1] are the active kernels of input i among outputs g * OG .. g * OG + OG - 1, idx[k] their
   output channel, wts[k * 9 ..] their taps (row-major). */
int e2e_tconv_fwd(int N, int I, int O, int D, int H, int W, const int64_t *xa, const int *ishift, int OG,
                  const int *ptr, const int *idx, const float *wts, const int64_t *ya, const int *oshift,
                  int nthreads);

/* dw[k * 9 + tap] = sum over n, d, h, w of dy[n, o_k, d, h, w] * x_shifted[n, idx[k], d, h + kh - 1, w + kw - 1]
   (float64, overwritten) for the active kernels only, given in chunked CSR order: inputs grouped
   in chunks of CH channels, ptr[(chunk * O + o) .. + 1] the active kernels of output o among the
   chunk's inputs, idx[k] their input channel. */
int e2e_tconv_dw(int N, int I, int O, int D, int H, int W, const int64_t *xa, const int *ishift,
                 const int64_t *dya, int CH, const int *ptr, const int *idx, double *dw, int nthreads);

/* The up ConvTranspose3d with kernel == stride (kd, kh, kw), K = kd * kh * kw <= 8 taps, on
   contiguous tensors: x (N, I, D, H, W) low-res, y / dy (N, O, D*kd, H*kh, W*kw). An (in, out)
   kernel mask in CSR order: ptr (O + 1) / idx (nnz) the active inputs of each output, wts
   (nnz, K) their taps ((a * kh + b) * kw + c); for dX the transposed CSR ptr_t (I + 1) / idx_t
   (nnz) of the active outputs of each input with wts_t (nnz, K) in that order. All return 0,
   1 when a thread could not allocate its scratch, 2 for K outside [1, 8]. */
int e2e_upconv_fwd(int N, int I, int O, int D, int H, int W, int kd, int kh, int kw, const float *x,
                   const int *ptr, const int *idx, const float *wts, float *y, int nthreads);
int e2e_upconv_dx(int N, int I, int O, int D, int H, int W, int kd, int kh, int kw, const float *dy,
                  const int *ptr_t, const int *idx_t, const float *wts_t, float *dx, int nthreads);
/* dw[k * K + q] (float64, overwritten) = sum over n, d, h, w of x[n, idx[k], d, h, w] * dy at tap q. */
int e2e_upconv_dw(int N, int I, int O, int D, int H, int W, int kd, int kh, int kw, const float *x,
                  const float *dy, const int *ptr, const int *idx, double *dw, int nthreads);

#endif
