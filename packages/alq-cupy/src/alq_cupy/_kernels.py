"""CUDA C source of every alq-cupy kernel and their lazily compiled, cached handles.

Nothing is compiled at import: :func:`module` compiles :data:`SOURCE` with NVRTC
the first time a kernel is launched on a device, loads it as a
``cupy.cuda.function.Module`` for that device and keeps the binary in a small
disk cache. It deliberately does not go through ``cupy.RawModule``/``RawKernel``:
CuPy's cached compile path appends ``-ftz=true`` after the caller's options, which
overrides ``--ftz=false`` and flushes float32 subnormals (a scale of 1e-42 became 0).

Arithmetic contract (``alq_core._quantize``), and how the kernels keep it:

* NVRTC runs with ``--prec-div=true --prec-sqrt=true --ftz=false --fmad=false``:
  ``1 / s`` (once per bucket) and ``1 / gap`` (once per level) are correctly rounded float32 divisions, subnormals are kept, and no
  multiply-add is contracted (so ``acc + s * l`` rounds twice, like NumPy);
* L2 scales are ``(float)sqrt(sum((double)x * (double)x))``: every square is exact
  in double, so only the order of the double additions differs from NumPy (a
  difference that could change the float32 result only for a sum within about
  1e-16 relative of a float32 rounding boundary);
* L-inf scales use a NaN-propagating max, so a NaN or Inf bucket gets a
  non-finite scale exactly as NumPy's ``max`` gives;
* clipping: population std in double (mean first, then the mean of squared
  deviations), ``t = (float)(clip * std)``, ``x = fminf(fmaxf(x, -t), t)``;
* ``j`` = number of interior levels ``<= v`` by binary search, ``p`` in float32,
  ``code = j + (u < p)``; a bucket with a non-finite scale gets the scale NaN
  (``0x7fc00000``, NumPy's float32 NaN) and codes 0.

Layout: one thread block per bucket. When ``4 * bucket_size`` bytes fit in shared
memory the bucket is read from global memory once, kept in shared memory, and
quantized and packed from there; larger buckets are read twice. Both hot kernels
have a specialized instance for the common case, chosen at launch:
``alq_quantize_l8b3`` (8 levels at 3 bits: levels in registers, the bracket by
selects) and ``alq_decode_sum_b3`` (3 bits: constant shifts, 32-bit code words).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ._backend import require_cupy
from ._seeds import seed_key

SOURCE = r"""
typedef unsigned long long u64;
typedef long long i64;
typedef unsigned char u8;

#define ALQ_GOLDEN 0x9E3779B97F4A7C15ULL
#define ALQ_NAN_BITS 0x7fc00000u

__device__ __forceinline__ u64 alq_mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* The two uniforms of counter value z = key + (pair + 1) * GOLDEN (mod 2^64): coordinates 2*pair, 2*pair + 1. */
__device__ __forceinline__ void alq_uniform_z(u64 z, float* u0, float* u1) {
    const u64 h = alq_mix64(z);
    *u0 = (float)(unsigned int)(h >> 40) * 5.9604644775390625e-08f;  /* exact: 24-bit integer times 2^-24 */
    *u1 = (float)(unsigned int)((h >> 16) & 0xFFFFFFULL) * 5.9604644775390625e-08f;
}

/* Uniforms of coordinates 2*pair and 2*pair + 1 of the stream with key `key` (see _noise.py). */
__device__ __forceinline__ void alq_uniform_pair(u64 key, u64 pair, float* u0, float* u1) {
    alq_uniform_z(key + (pair + 1ULL) * ALQ_GOLDEN, u0, u1);
}

/* Uniform float32 in [0, 1) for coordinate k. */
__device__ __forceinline__ float alq_uniform(u64 key, u64 k) {
    float u0, u1;
    alq_uniform_pair(key, k >> 1, &u0, &u1);
    return (k & 1ULL) ? u1 : u0;
}

/* max that propagates NaN from either side (NumPy's np.max semantics). */
__device__ __forceinline__ float alq_nanmax(float a, float b) {
    return (a != a || a > b) ? a : b;
}

__device__ __forceinline__ float alq_load_f32(const u8* p) {
    const unsigned int u = (unsigned int)p[0] | ((unsigned int)p[1] << 8) | ((unsigned int)p[2] << 16)
                         | ((unsigned int)p[3] << 24);
    return __uint_as_float(u);
}

__device__ __forceinline__ void alq_store_f32(u8* p, float v) {
    const unsigned int u = __float_as_uint(v);
    p[0] = (u8)(u & 0xFFu); p[1] = (u8)((u >> 8) & 0xFFu); p[2] = (u8)((u >> 16) & 0xFFu); p[3] = (u8)(u >> 24);
}

/* Block-wide sum; every thread receives it. blockDim.x must be a multiple of 32. red: 33 doubles. */
__device__ double alq_block_sum(double v, double* red) {
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned int nwarps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = (lane < nwarps) ? red[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) red[32] = v;
    }
    __syncthreads();
    return red[32];
}

/* Block-wide NaN-propagating max; every thread receives it. red: 33 floats. */
__device__ float alq_block_max(float v, float* red) {
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned int nwarps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = alq_nanmax(__shfl_down_sync(0xffffffffu, v, o), v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = (lane < nwarps) ? red[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v = alq_nanmax(__shfl_down_sync(0xffffffffu, v, o), v);
        if (lane == 0) red[32] = v;
    }
    __syncthreads();
    return red[32];
}

/* Scale of src[0..len) clipped to [-t, t] when clip_on (every thread gets it). src4: the same values as
 * float4 when non-null (a 16-byte aligned bucket in shared memory), read 4 at a time. */
__device__ __forceinline__ float alq_scale(const float* src, const float4* src4, int len, int linf, int clip_on,
                                           float t, double* red, float* redf) {
    const int len4 = (src4 != 0) ? (len >> 2) : 0;
    if (linf) {
        float mx = 0.0f;
        for (int i = threadIdx.x; i < len4; i += blockDim.x) {
            const float4 q = src4[i];
            float v[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if (clip_on) v[k] = fminf(fmaxf(v[k], -t), t);
                mx = alq_nanmax(fabsf(v[k]), mx);
            }
        }
        for (int i = 4 * len4 + threadIdx.x; i < len; i += blockDim.x) {
            float v = src[i];
            if (clip_on) v = fminf(fmaxf(v, -t), t);
            mx = alq_nanmax(fabsf(v), mx);
        }
        return alq_block_max(mx, redf);
    }
    double ss = 0.0;   /* every square is exact in double: fma(dv, dv, ss) is the multiply then the add */
    for (int i = threadIdx.x; i < len4; i += blockDim.x) {
        const float4 q = src4[i];
        float v[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            if (clip_on) v[k] = fminf(fmaxf(v[k], -t), t);
            const double dv = (double)v[k];
            ss = fma(dv, dv, ss);
        }
    }
    for (int i = 4 * len4 + threadIdx.x; i < len; i += blockDim.x) {
        float v = src[i];
        if (clip_on) v = fminf(fmaxf(v, -t), t);
        const double dv = (double)v;
        ss = fma(dv, dv, ss);
    }
    return (float)sqrt(alq_block_sum(ss, red));
}

/* Code of one coordinate: v = x * r (r = 1/s per bucket, 0 where not finite), clamped, j = the number of
 * interior levels <= v, p = (v - l_j) * inv_gap_j, stochastic rounding (alq_core's contract; no fused
 * multiply-add). lg[k] = (level k, 1 / (level k+1 - level k)) in shared memory.
 * LC == 0: L levels known at run time, j by binary search over lg. LC == 8: the levels held in registers
 * (lr), j by a three-step search of selects over l1..l6 and two never-reached slots (the same j: the
 * levels increase), then one gather of (l_j, 1 / gap_j). */
template <int LC>
__device__ __forceinline__ unsigned int alq_code(float xv, float r, const float2* lg, const float* lr, int L, float u) {
    float v = xv * r;
    int j = 0;
    if (LC == 8) {
        v = fminf(fmaxf(v, lr[0]), lr[7]);
        const bool c1 = lr[4] <= v;                                   /* j >= 4 */
        const bool c2 = (c1 ? lr[6] : lr[2]) <= v;                    /* j >= 6, or j >= 2 */
        const float hi = c1 ? __int_as_float(0x7f800000) : lr[3];     /* selects, not branches */
        const float lo = c1 ? lr[5] : lr[1];
        j = (c1 ? 4 : 0) + (c2 ? 2 : 0) + (((c2 ? hi : lo) <= v) ? 1 : 0);
    } else {
        v = fminf(fmaxf(v, lg[0].x), lg[L - 1].x);
        int hi = L - 2;
        while (j < hi) {
            const int mid = (j + hi) >> 1;
            if (lg[1 + mid].x <= v) j = mid + 1; else hi = mid;
        }
    }
    const float2 q = lg[j];
    const float p = (v - q.x) * q.y;
    return (unsigned int)j + ((u < p) ? 1u : 0u);
}

/* The packed word of a group of 8 codes: 32 bits when they fit. */
template <bool NARROW> struct alq_word { typedef u64 type; };
template <> struct alq_word<true> { typedef unsigned int type; };

/*
 * One block per bucket of x[0..m). Writes the scale (NaN for a non-finite bucket) to scales[b]
 * (if non-null) and as little-endian bytes to scale_bytes + 4b (if non-null); codes either
 * unpacked to codes[0..m) (if non-null) or packed LSB-first to packed (requires d % 8 == 0).
 * noise: m uniforms, or null to generate them from `key`. Block 0 copies the 40-byte header.
 * LC, BC: the number of levels and bits when fixed at compile time (0: read L and bits).
 */
#define ALQ_QUANTIZE_PARAMS \
    const float* __restrict__ x, const i64 m, const i64 d, \
    const float* __restrict__ levels, const int L, const int linf, const double clip, const int bits, \
    const float* __restrict__ noise, const u64 key, const int use_smem, const int vec_ok, \
    float* __restrict__ scales, u8* __restrict__ scale_bytes, \
    u8* __restrict__ codes, u8* __restrict__ packed, \
    const u8* __restrict__ header_src, u8* __restrict__ header_dst
#define ALQ_QUANTIZE_ARGS \
    x, m, d, levels, L, linf, clip, bits, noise, key, use_smem, vec_ok, scales, scale_bytes, codes, packed, \
    header_src, header_dst

template <int LC, int BC>
__device__ __forceinline__ void alq_quantize_body(ALQ_QUANTIZE_PARAMS)
{
    static_assert(LC == 0 || LC == 8, "alq_code handles run-time L or 8 levels");
    typedef typename alq_word<(BC > 0 && BC <= 4)>::type word_t;
    extern __shared__ float4 alq_dyn[];
    float* sx = reinterpret_cast<float*>(alq_dyn);
    __shared__ float2 lg[256];
    __shared__ double red[33];
    __shared__ float redf[33];
    const int tid = threadIdx.x, nt = blockDim.x;
    const int nb = (BC > 0) ? BC : bits;
    const i64 base = (i64)blockIdx.x * d;
    const int len = (int)((m - base) < d ? (m - base) : d);
    for (int i = tid; i < 256; i += nt) {
        const float lo = (i < L) ? levels[i] : __uint_as_float(ALQ_NAN_BITS);
        const float ig = (i + 1 < L) ? 1.0f / (levels[i + 1] - levels[i]) : 0.0f;   /* correctly rounded (prec-div) */
        lg[i] = make_float2(lo, ig);
    }
    if (header_dst != 0 && blockIdx.x == 0) {
        for (int i = tid; i < 40; i += nt) header_dst[i] = header_src[i];
    }
    const float* xb = x + base;
    if (use_smem) {
        if (vec_ok) {      /* x + base is 16-byte aligned */
            const float4* xb4 = reinterpret_cast<const float4*>(xb);
            const int len4 = len >> 2;
#pragma unroll 4
            for (int i = tid; i < len4; i += nt) alq_dyn[i] = xb4[i];
            for (int i = 4 * len4 + tid; i < len; i += nt) sx[i] = xb[i];
        } else {
#pragma unroll 4
            for (int i = tid; i < len; i += nt) sx[i] = xb[i];
        }
        __syncthreads();
    }
    const float* src = use_smem ? sx : xb;
    const float4* src4 = (use_smem && vec_ok) ? alq_dyn : 0;

    float s = use_smem ? alq_scale(sx, src4, len, linf, 0, 0.0f, red, redf)   /* shared loads where it is */
                       : alq_scale(xb, 0, len, linf, 0, 0.0f, red, redf);
    const int bad = !isfinite(s);          /* uniform across the block */
    const int clip_on = (clip > 0.0) && !bad;
    float t = 0.0f;
    if (clip_on) {
        double sum = 0.0;
        for (int i = tid; i < len; i += nt) sum += (double)src[i];
        const double mean = alq_block_sum(sum, red) / (double)len;
        double q = 0.0;
        for (int i = tid; i < len; i += nt) {
            const double dv = (double)src[i] - mean;
            q += dv * dv;
        }
        const double sd = sqrt(alq_block_sum(q, red) / (double)len);
        t = (float)(clip * sd);
        s = alq_scale(src, src4, len, linf, 1, t, red, redf);
    }
    __syncthreads();   /* lg[] visible to every thread (also when no reduction ran after loading it) */
    float r = 1.0f / s;                    /* one correctly rounded division per bucket */
    if (!isfinite(r)) r = 0.0f;            /* s == 0, or 1/s overflows: v = 0 */
    if (tid == 0) {
        const float so = bad ? __uint_as_float(ALQ_NAN_BITS) : s;
        if (scales != 0) scales[blockIdx.x] = so;
        if (scale_bytes != 0) alq_store_f32(scale_bytes + 4 * (i64)blockIdx.x, so);
    }
    float lr[LC > 0 ? LC : 1];             /* the levels, in registers when LC > 0 */
#pragma unroll
    for (int k = 0; k < LC; ++k) lr[k] = lg[k].x;

    if (packed != 0) {
        const int ngroups = (len + 7) >> 3;
        u8* pb = packed + (base >> 3) * (i64)nb;
        for (int g = tid; g < ngroups; g += nt) {
            word_t word = 0;
            if (!bad) {
                float xs[8];
                const int i0 = 8 * g;
                const bool full = i0 + 8 <= len;
                if (use_smem && full) {
                    const float4 a = alq_dyn[2 * g], c = alq_dyn[2 * g + 1];
                    xs[0] = a.x; xs[1] = a.y; xs[2] = a.z; xs[3] = a.w;
                    xs[4] = c.x; xs[5] = c.y; xs[6] = c.z; xs[7] = c.w;
                } else {
#pragma unroll
                    for (int e = 0; e < 8; ++e) xs[e] = (i0 + e < len) ? src[i0 + e] : 0.0f;
                }
                float us[8];
                if (noise != 0) {
#pragma unroll
                    for (int e = 0; e < 8; ++e) us[e] = (i0 + e < len) ? noise[base + i0 + e] : 0.0f;
                } else {   /* base + i0 is a multiple of 8: coordinates pair up as (even, odd), counters step by GOLDEN */
                    u64 z = key + ((u64)((base + i0) >> 1) + 1ULL) * ALQ_GOLDEN;
#pragma unroll
                    for (int e = 0; e < 8; e += 2) {
                        alq_uniform_z(z, &us[e], &us[e + 1]);
                        z += ALQ_GOLDEN;
                    }
                }
                if (clip_on) {
#pragma unroll
                    for (int e = 0; e < 8; ++e) xs[e] = fminf(fmaxf(xs[e], -t), t);
                }
#pragma unroll
                for (int e = 0; e < 8; ++e) word |= (word_t)alq_code<LC>(xs[e], r, lg, lr, L, us[e]) << (nb * e);
                if (!full) word &= ((word_t)1 << (nb * (len - i0))) - 1;   /* codes past the end are 0 */
            }
#pragma unroll
            for (int k = 0; k < ((BC > 0) ? BC : 8); ++k) {
                if (BC > 0 || k < nb) pb[(i64)g * nb + k] = (u8)((word >> (8 * k)) & 0xFFu);
            }
        }
    } else {
        for (int i = tid; i < len; i += nt) {
            unsigned int c = 0u;
            if (!bad) {
                float xv = src[i];
                if (clip_on) xv = fminf(fmaxf(xv, -t), t);
                const float u = (noise != 0) ? noise[base + i] : alq_uniform(key, (u64)(base + i));
                c = alq_code<LC>(xv, r, lg, lr, L, u);
            }
            codes[base + i] = (u8)c;
        }
    }
}

/* Any number of levels and bits. */
extern "C" __global__ void __launch_bounds__(512) alq_quantize(ALQ_QUANTIZE_PARAMS) {
    alq_quantize_body<0, 0>(ALQ_QUANTIZE_ARGS);
}

/* 8 levels and 3 bits (a 3-bit level set using every code): levels in registers, 32-bit words. */
extern "C" __global__ void __launch_bounds__(512, 4) alq_quantize_l8b3(ALQ_QUANTIZE_PARAMS) {
    alq_quantize_body<8, 3>(ALQ_QUANTIZE_ARGS);
}

/* Scales only (alq_core.bucket_scales): one block per bucket of x[0..n), no clipping. */
extern "C" __global__ void alq_bucket_scales(const float* __restrict__ x, const i64 n, const i64 d,
                                             const int linf, float* __restrict__ out) {
    __shared__ double red[33];
    __shared__ float redf[33];
    const i64 base = (i64)blockIdx.x * d;
    const int len = (int)((n - base) < d ? (n - base) : d);
    const float s = alq_scale(x + base, 0, len, linf, 0, 0.0f, red, redf);
    /* NaN as NumPy's float32 NaN (GPU arithmetic yields another NaN bit pattern) */
    if (threadIdx.x == 0) out[blockIdx.x] = (s != s) ? __uint_as_float(ALQ_NAN_BITS) : s;
}

/* Full-bucket statistics in double: norm, mean and population std of w = B / ||B|| (0, 0 for a zero bucket). */
extern "C" __global__ void alq_bucket_stats(const float* __restrict__ x, const i64 d,
                                            double* __restrict__ norms, double* __restrict__ means,
                                            double* __restrict__ stds) {
    __shared__ double red[33];
    const float* xb = x + (i64)blockIdx.x * d;
    double ss = 0.0;
    for (i64 i = threadIdx.x; i < d; i += blockDim.x) { const double v = (double)xb[i]; ss += v * v; }
    const double nrm = sqrt(alq_block_sum(ss, red));
    const double div = (nrm == 0.0) ? 1.0 : nrm;
    double sw = 0.0;
    for (i64 i = threadIdx.x; i < d; i += blockDim.x) sw += (double)xb[i] / div;
    const double mean = alq_block_sum(sw, red) / (double)d;
    double q = 0.0;
    for (i64 i = threadIdx.x; i < d; i += blockDim.x) { const double w = (double)xb[i] / div - mean; q += w * w; }
    const double sd = sqrt(alq_block_sum(q, red) / (double)d);
    if (threadIdx.x == 0) { norms[blockIdx.x] = nrm; means[blockIdx.x] = mean; stds[blockIdx.x] = sd; }
}

/* Pack m codes LSB-first: each group of 8 codes becomes `bits` bytes. */
extern "C" __global__ void alq_pack(const u8* __restrict__ codes, const i64 m, const int bits, u8* __restrict__ out) {
    const i64 groups = (m + 7) >> 3;
    for (i64 g = (i64)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += (i64)gridDim.x * blockDim.x) {
        u64 w = 0ULL;
        for (int e = 0; e < 8; ++e) {
            const i64 i = 8 * g + e;
            if (i < m) w |= (u64)codes[i] << (bits * e);
        }
        for (int k = 0; k < bits; ++k) out[g * bits + k] = (u8)((w >> (8 * k)) & 0xFFULL);
    }
}

/* Inverse of alq_pack. */
extern "C" __global__ void alq_unpack(const u8* __restrict__ packed, const i64 m, const int bits, u8* __restrict__ codes) {
    const i64 groups = (m + 7) >> 3;
    const u64 mask = (1ULL << bits) - 1ULL;
    for (i64 g = (i64)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += (i64)gridDim.x * blockDim.x) {
        u64 w = 0ULL;
        for (int k = 0; k < bits; ++k) w |= (u64)packed[g * bits + k] << (8 * k);
        for (int e = 0; e < 8; ++e) {
            const i64 i = 8 * g + e;
            if (i < m) codes[i] = (u8)((w >> (bits * e)) & mask);
        }
    }
}

/* out[i] = scales[i / d] * levels[codes[i]] for i < m (a code >= L decodes to NaN). */
extern "C" __global__ void alq_dequantize(const u8* __restrict__ codes, const float* __restrict__ scales,
                                          const i64 m, const i64 d, const float* __restrict__ levels, const int L,
                                          float* __restrict__ out) {
    __shared__ float lv[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) lv[i] = (i < L) ? levels[i] : __uint_as_float(ALQ_NAN_BITS);
    __syncthreads();
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < m; i += (i64)gridDim.x * blockDim.x) {
        out[i] = scales[i / d] * lv[codes[i]];
    }
}

/*
 * W payloads of `stride` bytes each (same config and n): out[i] = sum_w dequantized_w[i] for the
 * m quantized coordinates and sum_w tail_w[i - m] for the rest, accumulated in float32 in payload
 * order starting from 0, then multiplied by `scale` when apply_scale. err |= 1 for a negative scale,
 * |= 2 for a code >= L. One thread per group of 8 coordinates (or per tail coordinate).
 * dshift: log2(d) when d is a power of two, else -1. vec_out: out is 16-byte aligned.
 * BC: the bits when fixed at compile time (0: read bits).
 */
/* One group of 8 coordinates (t) of decode_sum in full generality: a part group at the end, or a group that
 * crosses buckets (d % 8 != 0). Writes its outputs; returns the error flags. Not inlined: its registers do
 * not count against the common path's. */
__device__ __noinline__ int alq_decode_group(
    const u8* __restrict__ pay, const i64 stride, const int W, const i64 m, const i64 d, const int nb, const int L,
    const i64 off_scales, const i64 off_codes, const i64 t, const i64 b0, const i64 r0, const float* lv,
    const float scale, const int apply_scale, float* __restrict__ out)
{
    const i64 i0 = 8 * t;
    const unsigned int mask = (1u << nb) - 1u;
    int flag = 0;
    float acc[8];
    for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
    for (int w = 0; w < W; ++w) {
        const u8* p = pay + (i64)w * stride;
        const u8* pc = p + off_codes + t * nb;
        u64 word = 0ULL;
        for (int k = 0; k < nb; ++k) word |= (u64)pc[k] << (8 * k);
        float s = alq_load_f32(p + off_scales + 4 * b0);
        if (s < 0.0f) flag |= 1;
        i64 b = b0, r = r0;
        for (int e = 0; e < 8 && i0 + e < m; ++e) {
            if (e > 0 && ++r == d) {     /* the group crosses into the next bucket */
                r = 0;
                s = alq_load_f32(p + off_scales + 4 * (++b));
                if (s < 0.0f) flag |= 1;
            }
            const unsigned int c = (unsigned int)(word >> (nb * e)) & mask;
            if (c >= (unsigned int)L) flag |= 2;
            acc[e] = acc[e] + s * lv[c];
        }
    }
    for (int e = 0; e < 8 && i0 + e < m; ++e) out[i0 + e] = apply_scale ? acc[e] * scale : acc[e];
    return flag;
}

#define ALQ_DECODE_PARAMS \
    const u8* __restrict__ pay, const i64 stride, const int W, const i64 n, const i64 m, const i64 d, \
    const int bits, const int L, const i64 off_scales, const i64 off_codes, const i64 off_tail, \
    const float* __restrict__ levels, const float scale, const int apply_scale, \
    float* __restrict__ out, int* __restrict__ err, const int dshift, const int vec_out
#define ALQ_DECODE_ARGS \
    pay, stride, W, n, m, d, bits, L, off_scales, off_codes, off_tail, levels, scale, apply_scale, out, err, \
    dshift, vec_out

template <int BC>
__device__ __forceinline__ void alq_decode_sum_body(ALQ_DECODE_PARAMS)
{
    typedef typename alq_word<(BC > 0 && BC <= 4)>::type word_t;
    __shared__ float lv[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) lv[i] = (i < L) ? levels[i] : __uint_as_float(ALQ_NAN_BITS);
    __syncthreads();
    const int nb = (BC > 0) ? BC : bits;
    const i64 groups = (m + 7) >> 3;
    const i64 total = groups + (n - m);
    const unsigned int mask = (1u << nb) - 1u;
    const bool check_codes = L < (1 << nb);    /* otherwise every code is a level */
    const bool one_bucket = (d & 7) == 0;       /* the 8 coordinates of a group share a bucket */
    int flag = 0;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        if (t < groups) {
            const i64 i0 = 8 * t;
            const bool full = i0 + 8 <= m;
            i64 b0, r0;                          /* bucket of coordinate i0 and its place in it */
            if (dshift >= 0) {
                b0 = i0 >> dshift;
                r0 = i0 & (d - 1);
            } else if (i0 < 0x7fffffffLL && d < 0x7fffffffLL) {
                b0 = (i64)((unsigned int)i0 / (unsigned int)d);
                r0 = i0 - b0 * d;
            } else {
                b0 = i0 / d;
                r0 = i0 - b0 * d;
            }
            if (full && one_bucket) {            /* every group but the last: no per-coordinate checks */
                float acc[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
                for (int w = 0; w < W; ++w) {
                    const u8* p = pay + (i64)w * stride;
                    const u8* pc = p + off_codes + t * nb;
                    word_t word = 0;
#pragma unroll
                    for (int k = 0; k < ((BC > 0) ? BC : 8); ++k) {
                        if (BC > 0 || k < nb) word |= (word_t)pc[k] << (8 * k);
                    }
                    const float s = alq_load_f32(p + off_scales + 4 * b0);
                    if (s < 0.0f) flag |= 1;
                    if (check_codes) {
#pragma unroll
                        for (int e = 0; e < 8; ++e) {
                            if (((unsigned int)(word >> (nb * e)) & mask) >= (unsigned int)L) flag |= 2;
                        }
                    }
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[e] = acc[e] + s * lv[(unsigned int)(word >> (nb * e)) & mask];
                }
                if (apply_scale) {
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[e] = acc[e] * scale;
                }
                if (vec_out) {
                    float4* o = reinterpret_cast<float4*>(out + i0);
                    o[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
                    o[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; ++e) out[i0 + e] = acc[e];
                }
            } else {
                flag |= alq_decode_group(pay, stride, W, m, d, nb, L, off_scales, off_codes, t, b0, r0, lv, scale,
                                         apply_scale, out);
            }
        } else {
            const i64 j = t - groups;
            float acc = 0.0f;
            for (int w = 0; w < W; ++w) acc = acc + alq_load_f32(pay + (i64)w * stride + off_tail + 4 * j);
            out[m + j] = apply_scale ? acc * scale : acc;
        }
    }
    if (flag) atomicOr(err, flag);
}

/* Any bits. */
extern "C" __global__ void __launch_bounds__(256) alq_decode_sum(ALQ_DECODE_PARAMS) {
    alq_decode_sum_body<0>(ALQ_DECODE_ARGS);
}

/* 3 bits: constant shifts, 32-bit words. */
extern "C" __global__ void __launch_bounds__(256) alq_decode_sum_b3(ALQ_DECODE_PARAMS) {
    alq_decode_sum_body<3>(ALQ_DECODE_ARGS);
}

/* Counter-based noise (same values as alq_uniform inside the quantize kernel). */
extern "C" __global__ void alq_noise(float* __restrict__ out, const i64 m, const u64 key, const i64 start) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < m; i += (i64)gridDim.x * blockDim.x) {
        out[i] = alq_uniform(key, (u64)(start + i));
    }
}

/* The level sketch (alq_core._sketch): per bin of the fixed grid, sum s^2, sum s^2 v, sum s^2 v^2 over the
 * normalized coordinates v = clamp(x * r, -1, 1) that the quantizer rounds (scale, clipping and r = 1/s as in
 * alq_quantize_body). Persistent blocks walk the buckets b = blockIdx.x, + gridDim.x, ... and add into a
 * private histogram in shared memory (double atomics), flushed once per block into hist (global atomics).
 * The bin of v from the bits of |v|: e = bits >> 23, m = 0 if e < EXP0 else min(1 + (e - EXP0) * 32 +
 * ((bits >> 18) & 31), MAG - 1), bin = MAG + m if v >= 0 else MAG - 1 - m. Buckets with a non-finite scale
 * add nothing; their scale is written as NaN (the caller counts them). */
#define ALQ_SK_MAG 641
#define ALQ_SK_NB (2 * ALQ_SK_MAG)
#define ALQ_SK_EXP0 107
extern "C" __global__ void __launch_bounds__(256) alq_sketch(const float* __restrict__ x, const i64 m, const i64 d,
                                                            const int linf, const double clip,
                                                            float* __restrict__ scales, double* __restrict__ hist) {
    __shared__ double h[3 * ALQ_SK_NB];
    __shared__ double red[33];
    __shared__ float redf[33];
    const int tid = threadIdx.x, nt = blockDim.x;
    for (int i = tid; i < 3 * ALQ_SK_NB; i += nt) h[i] = 0.0;
    __syncthreads();
    const i64 nbk = (m + d - 1) / d;
    for (i64 b = blockIdx.x; b < nbk; b += gridDim.x) {
        const i64 base = b * d;
        const int len = (int)((m - base) < d ? (m - base) : d);
        const float* xb = x + base;
        float s = alq_scale(xb, 0, len, linf, 0, 0.0f, red, redf);
        const int bad = !isfinite(s);
        const int clip_on = (clip > 0.0) && !bad;
        float t = 0.0f;
        if (clip_on) {
            double sum = 0.0;
            for (int i = tid; i < len; i += nt) sum += (double)xb[i];
            const double mean = alq_block_sum(sum, red) / (double)len;
            double q = 0.0;
            for (int i = tid; i < len; i += nt) {
                const double dv = (double)xb[i] - mean;
                q += dv * dv;
            }
            const double sd = sqrt(alq_block_sum(q, red) / (double)len);
            t = (float)(clip * sd);
            s = alq_scale(xb, 0, len, linf, 1, t, red, redf);
        }
        if (tid == 0) scales[b] = bad ? __uint_as_float(ALQ_NAN_BITS) : s;
        const double w = bad ? 0.0 : (double)s * (double)s;
        if (!(w > 0.0)) continue;          /* uniform across the block */
        float r = 1.0f / s;
        if (!isfinite(r)) r = 0.0f;
        for (int i = tid; i < len; i += nt) {
            float xv = xb[i];
            if (clip_on) xv = fminf(fmaxf(xv, -t), t);
            const float v = fminf(fmaxf(xv * r, -1.0f), 1.0f);
            const unsigned int a = __float_as_uint(v) & 0x7fffffffu;
            const int e = (int)(a >> 23);
            int mg = 1 + (e - ALQ_SK_EXP0) * 32 + (int)((a >> 18) & 31u);
            mg = (e < ALQ_SK_EXP0) ? 0 : (mg < ALQ_SK_MAG - 1 ? mg : ALQ_SK_MAG - 1);
            const int bin = (v < 0.0f) ? (ALQ_SK_MAG - 1 - mg) : (ALQ_SK_MAG + mg);
            atomicAdd(&h[bin], w);
            if (v != 0.0f) {
                const double v64 = (double)v;
                const double wv = w * v64;
                atomicAdd(&h[ALQ_SK_NB + bin], wv);
                atomicAdd(&h[2 * ALQ_SK_NB + bin], wv * v64);
            }
        }
    }
    __syncthreads();
    for (int i = tid; i < 3 * ALQ_SK_NB; i += nt) {
        if (h[i] != 0.0) atomicAdd(&hist[i], h[i]);
    }
}
"""

#: NVRTC flags that the bit-exactness contract depends on (never add --use_fast_math, never -ftz=true).
OPTIONS = ("--std=c++17", "--prec-div=true", "--prec-sqrt=true", "--ftz=false", "--fmad=false")

#: Largest dynamic shared memory a quantize block may use to hold its bucket (2 blocks per SM stay resident).
SMEM_CAP = 100 * 1024
_THREADS = 512
#: Launch shape of the quantize kernels: groups of 8 coordinates per thread (at most _THREADS threads a block;
#: 8: 128 threads for buckets of 8192, 6 % faster than 2 on the H200, ``gpu_cupy_sweep_h200x1.json``).
TUNING: dict[str, int] = {"quantize_groups_per_thread": 8}
_lock = threading.Lock()
_modules: dict[int, Any] = {}
_functions: dict[tuple[int, str], Any] = {}
_smem_set: dict[tuple[int, str], int] = {}
_optin: dict[int, int] = {}


def _cache_dir() -> Path:
    root = os.environ.get("ALQ_CUPY_CACHE_DIR") or os.environ.get("CUPY_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cupy" / "kernel_cache"


def _cache_key(cp: Any) -> str:
    parts = (
        SOURCE,
        repr(OPTIONS),
        str(cp.cuda.Device().compute_capability),
        repr(cp.cuda.nvrtc.getVersion()),
        str(cp.__version__),
        os.environ.get("CUPY_COMPILE_WITH_PTX", ""),
    )
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def compile_binary() -> bytes:
    """Compile :data:`SOURCE` for the current device with exactly :data:`OPTIONS` (cubin, or PTX).

    Uses ``cupy.cuda.compiler.compile_using_nvrtc``, which adds only the target
    architecture, unlike CuPy's cached path (it appends ``-ftz=true``).
    """
    require_cupy()
    from cupy.cuda import compiler

    res: Any = compiler.compile_using_nvrtc(SOURCE, OPTIONS)
    if isinstance(res, tuple):  # (binary, name mapping) in CuPy >= 9
        res = res[0]
    if isinstance(res, str):
        res = res.encode()
    if not isinstance(res, bytes):  # pragma: no cover - unknown CuPy
        msg = f"internal error: cupy.cuda.compiler.compile_using_nvrtc returned {type(res).__name__}, not bytes"
        raise TypeError(msg)
    return res


def _cache_path(cp: Any) -> Path:
    return _cache_dir() / f"alq_cupy_{_cache_key(cp)}.bin"


def _store(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError:  # a read-only home is fine: compile again next process
        pass


def module() -> Any:
    """The kernels as a ``cupy.cuda.function.Module`` loaded on the current device (compiled once, cached).

    The binary is read from the disk cache when present; a cached binary that
    fails to load is replaced by a fresh compile.
    """
    cp = require_cupy()
    dev = int(cp.cuda.runtime.getDevice())
    with _lock:
        mod = _modules.get(dev)
        if mod is None:
            from cupy.cuda import function

            path = _cache_path(cp)
            try:
                cached: bytes | None = path.read_bytes() or None
            except OSError:
                cached = None
            mod = function.Module()
            if cached is not None:
                try:
                    mod.load(cached)
                except Exception:  # corrupt or foreign cache entry
                    cached = None
                    mod = function.Module()
            if cached is None:
                binary = compile_binary()
                mod.load(binary)
                _store(path, binary)
            _modules[dev] = mod
        return mod


def kernel(name: str) -> Any:
    """One kernel of :data:`SOURCE` on the current device (a ``cupy.cuda.function.Function``, cached).

    Launch it as ``kernel(name)(grid, block, args, shared_mem)`` with ``grid`` and
    ``block`` tuples and ``args`` a tuple of kernel arguments.
    """
    cp = require_cupy()
    key = (int(cp.cuda.runtime.getDevice()), name)
    k = _functions.get(key)
    if k is None:
        k = module().get_function(name)
        _functions[key] = k
    return k


def ptr(a: Any) -> np.uint64:
    """A device pointer as a kernel argument (0 for None)."""
    return np.uint64(0 if a is None else int(a.data.ptr))


def _grid(work: int, threads: int = 256) -> tuple[tuple[int], tuple[int]]:
    """(grid, block) tuples for a grid-stride kernel over ``work`` items."""
    blocks = max(1, min(-(-work // threads), 65535 * 8))
    return (blocks,), (threads,)


def _optin_limit(cp: Any) -> int:
    dev = int(cp.cuda.runtime.getDevice())
    if dev not in _optin:
        try:  # cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
            _optin[dev] = int(cp.cuda.runtime.deviceGetAttribute(97, dev))
        except Exception:  # pragma: no cover - very old runtimes
            _optin[dev] = 48 * 1024
    return _optin[dev]


def smem_bytes_for(bucket_size: int) -> int:
    """Dynamic shared memory a quantize block uses for this bucket size (0: read global memory twice)."""
    cp = require_cupy()
    need = 4 * bucket_size
    limit = min(SMEM_CAP, _optin_limit(cp) - 4096)
    return need if need <= limit else 0


def threads_for(bucket_size: int) -> int:
    """Threads per quantize block: a multiple of 32, at most 512, one per ``TUNING["quantize_groups_per_thread"]``
    groups of 8 coordinates."""
    groups = -(-bucket_size // (8 * TUNING["quantize_groups_per_thread"]))
    return int(min(_THREADS, max(32, 32 * -(-groups // 32))))


def launch_quantize(
    x: Any,
    m: int,
    d: int,
    levels_dev: Any,
    num_levels: int,
    linf: bool,
    clip: float | None,
    bits: int,
    noise: Any,
    seed: int | None,
    *,
    scales: Any = None,
    scale_bytes: Any = None,
    codes: Any = None,
    packed: Any = None,
    header_src: Any = None,
    header_dst: Any = None,
) -> None:
    """Launch ``alq_quantize`` (``alq_quantize_l8b3`` for 8 levels at 3 bits) over the ``ceil(m / d)`` buckets
    of ``x[:m]`` (float32, contiguous)."""
    nb = -(-m // d)
    if nb == 0:
        if header_dst is not None:
            header_dst[: header_src.size] = header_src
        return
    if packed is not None and d % 8:
        msg = "internal error: the fused pack path needs bucket_size % 8 == 0"
        raise AssertionError(msg)
    cp = require_cupy()
    name = "alq_quantize_l8b3" if (num_levels, bits) == (8, 3) else "alq_quantize"
    k = kernel(name)
    smem = smem_bytes_for(d)
    if smem > 48 * 1024:
        key = (int(cp.cuda.runtime.getDevice()), name)
        if _smem_set.get(key, 0) < smem:
            drv = cp.cuda.driver
            drv.funcSetAttribute(k.ptr, drv.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            _smem_set[key] = smem
    key_val = seed_key(seed) if seed is not None else 0
    args = (
        ptr(x),
        np.int64(m),
        np.int64(d),
        ptr(levels_dev),
        np.int32(num_levels),
        np.int32(1 if linf else 0),
        np.float64(clip if clip is not None else 0.0),
        np.int32(bits),
        ptr(noise),
        np.uint64(key_val),
        np.int32(1 if smem else 0),
        np.int32(1 if (int(x.data.ptr) % 16 == 0 and d % 4 == 0) else 0),
        ptr(scales),
        ptr(scale_bytes),
        ptr(codes),
        ptr(packed),
        ptr(header_src),
        ptr(header_dst),
    )
    k((nb,), (threads_for(d),), args, shared_mem=smem)


def launch_bucket_scales(x: Any, d: int, linf: bool) -> Any:
    """Scales of every bucket of flat float32 ``x`` (no clipping), float32 ``(ceil(n/d),)``."""
    cp = require_cupy()
    n = int(x.size)
    nb = -(-n // d)
    out = cp.empty(nb, dtype=cp.float32)
    if nb:
        kernel("alq_bucket_scales")(
            (nb,), (threads_for(d),), (ptr(x), np.int64(n), np.int64(d), np.int32(int(linf)), ptr(out))
        )
    return out


def launch_bucket_stats(x: Any, d: int) -> tuple[Any, Any, Any]:
    """Norms, means and stds (float64) of the full buckets of flat float32 ``x``."""
    cp = require_cupy()
    k = int(x.size) // d
    norms = cp.empty(k, dtype=cp.float64)
    means = cp.empty(k, dtype=cp.float64)
    stds = cp.empty(k, dtype=cp.float64)
    if k:
        kernel("alq_bucket_stats")((k,), (threads_for(d),), (ptr(x), np.int64(d), ptr(norms), ptr(means), ptr(stds)))
    return norms, means, stds


#: Sketch blocks per multiprocessor (persistent blocks; each flushes its shared histogram once).
SKETCH_BLOCKS_PER_SM = 4


def launch_sketch(x: Any, m: int, d: int, linf: bool, clip: float | None) -> tuple[Any, Any]:
    """Sketch sums of the first ``m`` coordinates of flat float32 ``x``: float64 ``(3, 1282)`` and the bucket
    scales (float32 ``(ceil(m/d),)``, NaN where not finite)."""
    cp = require_cupy()
    nb = -(-m // d)
    hist = cp.zeros((3, 1282), dtype=cp.float64)
    scales = cp.empty(nb, dtype=cp.float32)
    if nb:
        sms = int(cp.cuda.Device().attributes["MultiProcessorCount"])
        blocks = max(1, min(nb, SKETCH_BLOCKS_PER_SM * sms))
        kernel("alq_sketch")(
            (blocks,),
            (256,),
            (ptr(x), np.int64(m), np.int64(d), np.int32(int(linf)), np.float64(clip or 0.0), ptr(scales), ptr(hist)),
        )
    return hist, scales


def launch_pack(codes: Any, bits: int, out: Any) -> None:
    """Pack uint8 ``codes`` (contiguous) into ``out`` (``packed_size(m, bits)`` bytes)."""
    m = int(codes.size)
    if m:
        kernel("alq_pack")(*_grid(-(-m // 8)), (ptr(codes), np.int64(m), np.int32(bits), ptr(out)))


def launch_unpack(packed: Any, bits: int, m: int, out: Any) -> None:
    """Unpack ``m`` codes from ``packed`` into uint8 ``out``."""
    if m:
        kernel("alq_unpack")(*_grid(-(-m // 8)), (ptr(packed), np.int64(m), np.int32(bits), ptr(out)))


def launch_dequantize(codes: Any, scales: Any, d: int, levels_dev: Any, num_levels: int, out: Any) -> None:
    """``out[:m] = scales[i // d] * levels[codes[i]]``."""
    m = int(codes.size)
    if m:
        kernel("alq_dequantize")(
            *_grid(m),
            (ptr(codes), ptr(scales), np.int64(m), np.int64(d), ptr(levels_dev), np.int32(num_levels), ptr(out)),
        )


def launch_decode_sum(
    payloads: Any,
    stride: int,
    w: int,
    n: int,
    m: int,
    d: int,
    bits: int,
    num_levels: int,
    offsets: tuple[int, int, int],
    levels_dev: Any,
    scale: float | None,
    out: Any,
    err: Any,
) -> None:
    """Sum (and scale) ``w`` payloads into float32 ``out`` (n,); flags go to int32 ``err`` (1,)."""
    total = -(-m // 8) + (n - m)
    if total == 0:
        return
    kernel("alq_decode_sum_b3" if bits == 3 else "alq_decode_sum")(
        *_grid(total),
        (
            ptr(payloads),
            np.int64(stride),
            np.int32(w),
            np.int64(n),
            np.int64(m),
            np.int64(d),
            np.int32(bits),
            np.int32(num_levels),
            np.int64(offsets[0]),
            np.int64(offsets[1]),
            np.int64(offsets[2]),
            ptr(levels_dev),
            np.float32(1.0 if scale is None else scale),
            np.int32(0 if scale is None else 1),
            ptr(out),
            ptr(err),
            np.int32(d.bit_length() - 1 if d & (d - 1) == 0 else -1),
            np.int32(1 if int(out.data.ptr) % 16 == 0 else 0),
        ),
    )


def launch_noise(m: int, seed: int, start: int = 0) -> Any:
    """Counter-based uniforms ``start .. start + m - 1`` of stream ``seed`` (float32 ``(m,)``)."""
    cp = require_cupy()
    out = cp.empty(m, dtype=cp.float32)
    if m:
        kernel("alq_noise")(*_grid(m), (ptr(out), np.int64(m), np.uint64(seed_key(seed)), np.int64(start)))
    return out
