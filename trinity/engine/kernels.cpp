// The engine's native CPU kernels, built by trinity/engine/gemv.py (`python -m trinity.engine`):
// the matmul of a few rows (small_mm: a decode step's batch, where at::linear runs far below the
// machine's bounds), and the fused ops of a decode step (trinity/engine/fast_decode.py) with a
// whole step in one call, so a step is not ~20 dispatched torch ops per layer.
// Rounding: every intermediate that fast_decode's torch ops round to the tensor dtype (T: float
// or bf16 bits) is rounded here too (`rnd`), so the fused step gives the op path's numbers but
// for summation order, exp's last bits and attention (fp32 throughout here).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

using torch::Tensor;

static inline float widen(uint16_t b) { return std::bit_cast<float>(uint32_t(b) << 16); }

// float -> bf16 bits, rounded to nearest even (torch's own conversion).
static inline uint16_t narrow(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float f32(float v) { return v; }
static inline float f32(uint16_t b) { return widen(b); }
template <class T> static inline T store(float f);
template <> inline float store<float>(float f) { return f; }
template <> inline uint16_t store<uint16_t>(float f) { return narrow(f); }
// ``f`` rounded to T and back: where a torch op would round its result to the dtype.
template <class T> static inline float rnd(float f) { return f32(store<T>(f)); }
template <class T> static inline T* data(const Tensor& t) {
    return reinterpret_cast<T*>(t.data_ptr());
}
static inline bool is_bf16(const Tensor& t) { return t.scalar_type() == torch::kBFloat16; }

// exp(x), vectorizable (cephes' expf polynomial, 2^k through the exponent bits, ~1 ulp): libm's
// expf is a call per element, and a batch-64 step needs millions (softmax, SiLU). k is rounded
// by adding and subtracting 1.5 * 2^23: GCC does not vectorize std::floor (without
// -fno-trapping-math), and a loop around it stays scalar.
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * std::bit_cast<float>((int32_t(k) + 127) << 23);
}

// ---- the matmul of a decode step: x [M, K] @ w [O, K]^T for a few rows M ----
// Why: at M = 2..64 at::linear (oneDNN) ran far below both the memory and the compute bound on a
// decode step's shapes (batch 16 on the demo model: the [16, 576] x [576, 49152] head at
// 0.14 TFLOP/s, each LoRA term 17-35 us, mostly call overhead), and at M = 1 its gemv read
// 9-25 GB/s. Here: tiles of TILE_O weight rows x TILE_M x rows of fp32 accumulators, so each
// weight chunk read from memory serves every x row and each x chunk (from L1) several weight
// rows; the tile's horizontal sums once at the end; O split over torch's threads. At M = 1 this
// also replaced the earlier one-row gemv (one weight row at a time): as fast or faster on the
// memory-bound head (2.42 vs 2.61 ms, bf16, 1 thread), 4-7x at a LoRA B's K of 32 or 96 (the
// gemv summed K mod 64 scalar), 10-25 % slower only on cache-resident bf16 weights.
// Where at::linear wins instead (measured, docs/benchmarks.md), per thread of torch's (this
// kernel splits O over them; oneDNN scaled less at these shapes): more than SMALL_M_THREAD rows
// (the demo's [64, 576] x [576, 3072]: 0.92x at::linear's speed on 1 thread, 1.11x on 2), and K
// under SHORT_K (a LoRA B: the per-output sums outweigh K / 32 products) at more than SHORT_K_M
// rows ([16, 64] x [64, 3072]: 121 us on 1 thread, 56 on 2; at::linear 55 on either), or at more
// than one row and SHORT_K_OUTPUTS outputs (2 threads, bf16, us, small_mm vs at::linear: a
// LoRA on the head, K 32 x O 49152, 209 vs 144 at 4 rows, 804 vs 257 at 16, 84 vs 106 at 1;
// K 64 x O 3072, 55 vs 41 at 16 rows, 28 vs 34 at 8; K 96 x O 960 at 16, 22 vs 28). SMALL_M:
// the most rows measured.
constexpr int64_t SMALL_M = 64, SMALL_M_THREAD = 32, SHORT_K = 128, SHORT_K_M = 8;
constexpr int64_t SHORT_K_OUTPUTS = 1 << 15;

static bool small_mm_wins(int64_t M, int64_t K, int64_t O) {
    const int64_t threads = at::get_num_threads();
    return M >= 1 && M <= std::min(SMALL_M, SMALL_M_THREAD * threads) &&
           (K >= SHORT_K || (M <= SHORT_K_M * threads && (M == 1 || M * O <= SHORT_K_OUTPUTS)));
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int TILE_O = 4, TILE_M = 4;

// One K chunk of T as a register, and its products summed into 16 fp32 lanes.
template <class T> struct Chunk;
template <> struct Chunk<float> {
    using R = __m512;
    static constexpr int64_t width = 16;
    static R load(const float* p) { return _mm512_loadu_ps(p); }
    static R load(const float* p, int64_t n) {  // the first n < width, zeros after
        return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p);
    }
    static __m512 madd(__m512 acc, R w, R x) { return _mm512_fmadd_ps(w, x, acc); }
};
template <> struct Chunk<uint16_t> {
    using R = __m512i;
    static constexpr int64_t width = 32;
    static R load(const uint16_t* p) { return _mm512_loadu_si512(p); }
    static R load(const uint16_t* p, int64_t n) {
        return _mm512_maskz_loadu_epi16(__mmask32((uint64_t(1) << n) - 1), p);
    }
    static __m512 madd(__m512 acc, R w, R x) {
#if defined(__AVX512BF16__)
        return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
#else  // the even bf16 of each pair widened by a shift, the odd by masking the low half
        const __m512i high = _mm512_set1_epi32(int32_t(0xffff0000u));
        acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)),
                              _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), acc);
        return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w, high)),
                               _mm512_castsi512_ps(_mm512_and_si512(x, high)), acc);
#endif
    }
};

// The 16 sums of a full tile, transposed: element 4 j + i = the sum of acc[i][j]'s lanes, so
// each 128-bit lane j holds y[m + j, o .. o + 3]. 45 shuffles and adds where 16 separate
// horizontal sums take ~130, which at small K (a LoRA B's rank) were most of the time.
static inline __m512 sum_tile(const __m512 (&acc)[TILE_O][TILE_M]) {
    static_assert(TILE_O == 4 && TILE_M == 4);
    __m512 p[4];  // lane j of p[i]: 4 partial sums of acc[i][j]
    for (int i = 0; i < 4; ++i) {
        const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(acc[i][0], acc[i][1], 0x44),
                                        _mm512_shuffle_f32x4(acc[i][0], acc[i][1], 0xee));
        const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(acc[i][2], acc[i][3], 0x44),
                                        _mm512_shuffle_f32x4(acc[i][2], acc[i][3], 0xee));
        p[i] = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88),
                             _mm512_shuffle_f32x4(ab, cd, 0xdd));
    }
    const __m512 u0 =
        _mm512_add_ps(_mm512_unpacklo_ps(p[0], p[1]), _mm512_unpackhi_ps(p[0], p[1]));
    const __m512 u1 =
        _mm512_add_ps(_mm512_unpacklo_ps(p[2], p[3]), _mm512_unpackhi_ps(p[2], p[3]));
    return _mm512_add_ps(_mm512_shuffle_ps(u0, u1, 0x44), _mm512_shuffle_ps(u0, u1, 0xee));
}

// The tile's outputs, y[j * ys + 0 .. 3] from 128-bit lane j of its sums (rounded to bf16 as
// ``narrow`` does, 16 at a time).
static inline void store_tile(float* y, int64_t ys, __m512 sums) {
    alignas(64) float out[16];
    _mm512_store_ps(out, sums);
    for (int j = 0; j < 4; ++j) std::memcpy(y + j * ys, out + 4 * j, 4 * sizeof(float));
}
static inline void store_tile(uint16_t* y, int64_t ys, __m512 sums) {
    const __m512i u = _mm512_castps_si512(sums);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(sums, sums, _CMP_UNORD_Q),
                              _mm512_set1_epi32(0x7fc0));
    alignas(32) uint16_t out[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(r));
    for (int j = 0; j < 4; ++j) std::memcpy(y + j * ys, out + 4 * j, 4 * sizeof(uint16_t));
}

// y[j * ys + i] = w[i] . x[j] for i < NO, j < NM (w, x, y at the tile's first row / column).
// ``next``: weight rows two tiles on, prefetched into L2 while this tile computes (without it the
// tile's first pass waited on memory: the [16, 576] x [576, 49152] head took 9.8 ms on 1
// thread, with it 6.3).
template <class T, int NO, int NM>
static inline void mm_tile(const T* w, const T* x, T* y, int64_t ys, int64_t K, const T* next) {
    using C = Chunk<T>;
    __m512 acc[NO][NM];
    for (int i = 0; i < NO; ++i)
        for (int j = 0; j < NM; ++j) acc[i][j] = _mm512_setzero_ps();
    auto step = [&](int64_t k, auto load) {
        typename C::R wv[NO];
        for (int i = 0; i < NO; ++i) wv[i] = load(w + i * K + k);
        for (int j = 0; j < NM; ++j) {
            const typename C::R xv = load(x + j * K + k);
            for (int i = 0; i < NO; ++i) acc[i][j] = C::madd(acc[i][j], wv[i], xv);
        }
    };
    int64_t k = 0;
    for (; k + C::width <= K; k += C::width) {  // a chunk is one 64-byte line per weight row
        if (next != nullptr)
            for (int i = 0; i < TILE_O; ++i) __builtin_prefetch(next + i * K + k, 0, 2);
        step(k, [](const T* p) { return C::load(p); });
    }
    if (k < K) step(k, [n = K - k](const T* p) { return C::load(p, n); });
    if constexpr (NO == TILE_O && NM == TILE_M) {
        store_tile(y, ys, sum_tile(acc));
    } else {
        for (int i = 0; i < NO; ++i)
            for (int j = 0; j < NM; ++j) y[j * ys + i] = store<T>(_mm512_reduce_add_ps(acc[i][j]));
    }
}

// NO weight rows against all M x rows (the first pass prefetching ``next``).
template <class T, int NO>
static void mm_rows(const T* w, const T* x, T* y, int64_t ys, int64_t K, int64_t M,
                    const T* next) {
    int64_t m = 0;
    for (; m + TILE_M <= M; m += TILE_M, next = nullptr)
        mm_tile<T, NO, TILE_M>(w, x + m * K, y + m * ys, ys, K, next);
    const T *xm = x + m * K, *wn = next;
    T* ym = y + m * ys;
    switch (M - m) {
        case 3: mm_tile<T, NO, 3>(w, xm, ym, ys, K, wn); break;
        case 2: mm_tile<T, NO, 2>(w, xm, ym, ys, K, wn); break;
        case 1: mm_tile<T, NO, 1>(w, xm, ym, ys, K, wn); break;
    }
}

// Output columns [b, e), BLOCK_O at a time into a small buffer copied out by rows: tiles storing
// straight into y [M, O] wrote M lines O elements apart, which for O a multiple of 2 KB (the
// head: 49152) all fall in one L1 set and evicted each other.
constexpr int64_t BLOCK_O = 64;
template <class T>
static void mm_range(const T* w, const T* x, T* y, int64_t K, int64_t O, int64_t M, int64_t b,
                     int64_t e) {
    std::vector<T> buffer(M * BLOCK_O);
    T* yb = buffer.data();
    for (int64_t ob = b; ob < e; ob += BLOCK_O) {
        const int64_t oe = std::min(e, ob + BLOCK_O);
        int64_t o = ob;
        for (; o + TILE_O <= oe; o += TILE_O) {
            const T* next = o + 3 * TILE_O <= e ? w + (o + 2 * TILE_O) * K : nullptr;
            mm_rows<T, TILE_O>(w + o * K, x, yb + (o - ob), BLOCK_O, K, M, next);
        }
        switch (oe - o) {
            case 3: mm_rows<T, 3>(w + o * K, x, yb + (o - ob), BLOCK_O, K, M, nullptr); break;
            case 2: mm_rows<T, 2>(w + o * K, x, yb + (o - ob), BLOCK_O, K, M, nullptr); break;
            case 1: mm_rows<T, 1>(w + o * K, x, yb + (o - ob), BLOCK_O, K, M, nullptr); break;
        }
        for (int64_t m = 0; m < M; ++m)
            std::memcpy(y + m * O + ob, yb + m * BLOCK_O, (oe - ob) * sizeof(T));
    }
}
#else
constexpr int TILE_O = 1;

// Without AVX-512: one dot product per output, 64 partial sums so the compiler keeps several
// vector accumulators in flight (bf16 widened to fp32 by a shift).
template <class T>
static void mm_range(const T* w, const T* x, T* y, int64_t K, int64_t O, int64_t M, int64_t b,
                     int64_t e) {
    for (int64_t o = b; o < e; ++o)
        for (int64_t m = 0; m < M; ++m) {
            const T *wr = w + o * K, *xr = x + m * K;
            float acc[64] = {0};
            int64_t i = 0;
            for (; i + 64 <= K; i += 64) {
#pragma omp simd
                for (int64_t j = 0; j < 64; ++j) acc[j] += f32(wr[i + j]) * f32(xr[i + j]);
            }
            float a = 0;
            for (int64_t j = 0; j < 64; ++j) a += acc[j];
            for (; i < K; ++i) a += f32(wr[i]) * f32(xr[i]);
            y[m * O + o] = store<T>(a);
        }
}
#endif

// Output columns [TILE_O t0, TILE_O t1) (clipped to w's rows) of y = x @ w.T, fp32 or bf16.
static void mm_tiles(const Tensor& x, const Tensor& w, const Tensor& y, int64_t t0, int64_t t1) {
    const int64_t M = x.size(0), K = x.size(1), O = w.size(0);
    if (t1 <= t0) return;
    t0 *= TILE_O;
    t1 = std::min(O, t1 * TILE_O);
    if (is_bf16(w))
        mm_range(data<uint16_t>(w), data<uint16_t>(x), data<uint16_t>(y), K, O, M, t0, t1);
    else
        mm_range(data<float>(w), data<float>(x), data<float>(y), K, O, M, t0, t1);
}

// x [M, K] and w [O, K] contiguous, both fp32 or both bf16; returns x @ w.T in their dtype (fp32
// sums, rounded once, as F.linear).
Tensor small_mm(Tensor x, Tensor w) {
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1));
    TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.scalar_type() == w.scalar_type());
    TORCH_CHECK(w.scalar_type() == torch::kFloat32 || is_bf16(w));
    const int64_t M = x.size(0), K = w.size(1), O = w.size(0);
    auto y = torch::empty({M, O}, x.options());
    if (M == 0 || K == 0) return y.zero_();
    // Tasks of at least ~64k multiply-adds: smaller ones cost more to hand out than they share.
    const int64_t tiles = (O + TILE_O - 1) / TILE_O;
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / (TILE_O * M * K));
    at::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) { mm_tiles(x, w, y, b, e); });
    return y;
}

// (x @ w.T, x @ a.T): small_mm of both in one parallel region, their tiles one range (a LoRA's
// A beside its base weight: its own region cost more than its work at a decode batch).
static std::pair<Tensor, Tensor> small_mm_pair(const Tensor& x, const Tensor& w, const Tensor& a) {
    const int64_t M = x.size(0), K = x.size(1), O = w.size(0), R = a.size(0);
    auto y = torch::empty({M, O}, x.options()), low = torch::empty({M, R}, x.options());
    const int64_t tiles = (O + TILE_O - 1) / TILE_O, a_tiles = (R + TILE_O - 1) / TILE_O;
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / (TILE_O * M * K));
    at::parallel_for(0, tiles + a_tiles, grain, [&](int64_t b, int64_t e) {
        mm_tiles(x, w, y, b, std::min(e, tiles));
        mm_tiles(x, a, low, std::max(b, tiles) - tiles, e - tiles);
    });
    return {y, low};
}

// ---- the low-rank term of a LoRA'd projection: y += low @ b.T, K the rank ----
// Why: as a matmul (small_mm's dot products, or at::linear) a LoRA B costs its per-output sums
// over a K of 32-96: the demo model's gate-up B, [16, 64] x [64, 3072], took 42 us, the four of
// a layer ~84 us (2 threads, bf16), ~2.5 ms of a batch-16 step. Here as outer products: a tile
// of rows x 64 outputs of fp32 sums in registers, each b chunk loaded once for all the tile's
// rows, ``low`` broadcast; no horizontal sums. ``bp`` is b packed [K / S, O, S]: S = 2 for bf16
// (the pairs ``vdpbf16ps`` multiplies: K even, fast_decode.lora_inputs pads it), 1 for fp32.
// Rounding as fast_decode._apply: the product rounded to T, then the sum with y rounded to T.
template <class T> constexpr int64_t PAIR = sizeof(T) == 2 ? 2 : 1;

#if defined(__AVX512F__)
// 16 fp32 / bf16 values as fp32 (bf16 widened by a shift).
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const uint16_t* p) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int LOW_ROWS = 4, LOW_VECS = 4;  // a tile: 4 rows x 64 outputs

static inline __m512 bcast(const float* p) { return _mm512_set1_ps(*p); }
static inline __m512i bcast(const uint16_t* p) {
    int32_t pair;
    std::memcpy(&pair, p, sizeof(pair));
    return _mm512_set1_epi32(pair);
}
static inline __m512 round16(__m512 v, float) { return v; }
static inline __m512 round16(__m512 v, uint16_t) {  // to bf16 and back, as ``narrow``
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_and_si512(
        _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))),
        _mm512_set1_epi32(int32_t(0xffff0000u)));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                              _mm512_set1_epi32(int32_t(0x7fc00000u)));
    return _mm512_castsi512_ps(r);
}
static inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline void store16(uint16_t* p, __m512 v) {  // v holds bf16 values exactly
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}

template <class T, int NR, int NV>
static inline void low_tile(const T* low, const T* bp, T* y, int64_t K, int64_t O, int64_t o,
                            int64_t k0, int64_t k1) {
    using C = Chunk<T>;
    constexpr int64_t S = PAIR<T>;
    __m512 acc[NR][NV];
    for (int r = 0; r < NR; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; k += S) {
        typename C::R bv[NV];
        for (int v = 0; v < NV; ++v) bv[v] = C::load(bp + ((k / S) * O + o + 16 * v) * S);
        for (int r = 0; r < NR; ++r) {
            const auto a = bcast(low + r * K + k);
            for (int v = 0; v < NV; ++v) acc[r][v] = C::madd(acc[r][v], bv[v], a);
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int v = 0; v < NV; ++v) {
            T* yp = y + r * O + o + 16 * v;
            store16(yp, round16(_mm512_add_ps(load16(yp), round16(acc[r][v], T())), T()));
        }
}

template <class T, int NV>
static void low_rows(const T* low, const T* bp, T* y, int64_t M, int64_t K, int64_t O,
                     int64_t o, int64_t k0, int64_t k1) {
    int64_t m = 0;
    for (; m + LOW_ROWS <= M; m += LOW_ROWS)
        low_tile<T, LOW_ROWS, NV>(low + m * K, bp, y + m * O, K, O, o, k0, k1);
    switch (M - m) {
        case 3: low_tile<T, 3, NV>(low + m * K, bp, y + m * O, K, O, o, k0, k1); break;
        case 2: low_tile<T, 2, NV>(low + m * K, bp, y + m * O, K, O, o, k0, k1); break;
        case 1: low_tile<T, 1, NV>(low + m * K, bp, y + m * O, K, O, o, k0, k1); break;
    }
}
#endif

// Outputs [b, e) of y += low @ b.T over the rank's columns [k0, k1) (the others being zeros
// of b there), the vector tiles where AVX-512 is there, else and for a last partial vector one
// output at a time.
template <class T>
static void low_range(const T* low, const T* bp, T* y, int64_t M, int64_t K, int64_t O,
                      int64_t b, int64_t e, int64_t k0, int64_t k1) {
    constexpr int64_t S = PAIR<T>;
    int64_t o = b;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    for (; o + 16 * LOW_VECS <= e; o += 16 * LOW_VECS)
        low_rows<T, LOW_VECS>(low, bp, y, M, K, O, o, k0, k1);
    for (; o + 16 <= e; o += 16) low_rows<T, 1>(low, bp, y, M, K, O, o, k0, k1);
#endif
    for (int64_t m = 0; m < M; ++m)
        for (int64_t i = o; i < e; ++i) {
            float acc = 0;
            for (int64_t k = k0; k < k1; ++k)
                acc += f32(low[m * K + k]) * f32(bp[((k / S) * O + i) * S + k % S]);
            y[m * O + i] = store<T>(f32(y[m * O + i]) + rnd<T>(acc));
        }
}

// y [M, O] += low [M, K] @ b.T in place, ``bp`` b packed [K / S, O, S] (see above); y, low and
// bp of one dtype (fp32 or bf16), contiguous.
void low_rank_add(Tensor y, Tensor low, Tensor bp) {
    const int64_t M = y.size(0), O = y.size(1), K = low.size(1);
    TORCH_CHECK(y.is_contiguous() && low.is_contiguous() && bp.is_contiguous());
    TORCH_CHECK(y.scalar_type() == low.scalar_type() && y.scalar_type() == bp.scalar_type());
    TORCH_CHECK(y.scalar_type() == torch::kFloat32 || is_bf16(y), "low_rank_add: dtype");
    const int64_t S = is_bf16(y) ? 2 : 1;
    TORCH_CHECK(low.size(0) == M && bp.dim() == 3 && bp.size(0) * S == K && bp.size(1) == O &&
                    bp.size(2) == S,
                "low_rank_add: low [M, K], bp [K / S, O, S] (bf16: S = 2, K even; fp32: S = 1)");
    // Tasks of 64 outputs, at least ~64k multiply-adds each.
    const int64_t blocks = (O + 63) / 64;
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, 64 * M * K));
    at::parallel_for(0, blocks, grain, [&](int64_t b, int64_t e) {
        b *= 64;
        e = std::min(O, e * 64);
        if (is_bf16(y))
            low_range(data<uint16_t>(low), data<uint16_t>(bp), data<uint16_t>(y), M, K, O, b, e,
                      0, K);
        else
            low_range(data<float>(low), data<float>(bp), data<float>(y), M, K, O, b, e, 0, K);
    });
}

// A projection's low-rank term not yet added to its output y [M, O]: low [M, K] (masked), b
// packed as low_rank_add takes it, and ``segments`` [n, 4] (int64 rows: output columns [o0, o1)
// take the rank's columns [k0, k1) only, the block-diagonal B of fused projections; empty: all
// outputs over the whole rank). Why: a decode step added each B product in a parallel region of
// its own over the output columns (and computed each A product in another), 240 regions a step
// for the demo model's adapter, 3.6 ms of a 24.5 ms batch-16 step; here A's rows go with the
// base weight's tiles (``project``) and the B product into the rows the next op works on anyway
// (rotary, the residual add before a norm, SiLU-and-multiply), skipping B's zero blocks.
struct LowTerm {
    Tensor low, bp, segments;
    bool pending() const { return low.defined(); }
};

// Rows [r0, r1) of y [M, O] += their low-rank term (rounded as low_rank_add).
template <class T>
static void add_low_rows(const LowTerm& term, T* y, int64_t O, int64_t r0, int64_t r1) {
    if (!term.pending() || r1 <= r0) return;
    const int64_t K = term.low.size(1);
    const T *low = data<T>(term.low) + r0 * K, *bp = data<T>(term.bp);
    y += r0 * O;
    if (term.segments.numel() == 0) return low_range(low, bp, y, r1 - r0, K, O, 0, O, 0, K);
    const int64_t* seg = term.segments.data_ptr<int64_t>();
    for (int64_t i = 0; i < term.segments.size(0); ++i, seg += 4)
        low_range(low, bp, y, r1 - r0, K, O, seg[0], seg[1], seg[2], seg[3]);
}

// Rows per task of a row-parallel op that also adds a pending term: a low-rank tile's 4 rows,
// so a batch of 16 splits over the threads (without one, a few rows' work is less than a
// parallel region costs).
static inline int64_t row_grain(const LowTerm* term, int64_t grain) {
    return term != nullptr && term->pending() ? 4 : grain;
}

// ---- rmsnorm, with the residual add before it ----

// One row: x += delta (in place, when given), then out = w * (x * rsqrt(mean(x^2) + eps)), the
// statistics in fp32 and the normed row rounded to T before the weight (fast_decode._rms_norm).
// (normed_row: the second part alone, returning 1 / sqrt(mean(x^2) + eps).)
template <class T>
static float normed_row(const T* x, const T* w, T* out, int64_t n, float eps) {
    float squares = 0;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < n; ++i) squares += f32(x[i]) * f32(x[i]);
    const float inv = 1.0f / std::sqrt(squares / float(n) + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = store<T>(f32(w[i]) * rnd<T>(f32(x[i]) * inv));
    return inv;
}

template <class T>
static void norm_row(T* x, const T* delta, const T* w, T* out, int64_t n, float eps) {
    if (delta != nullptr) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) x[i] = store<T>(f32(x[i]) + f32(delta[i]));
    }
    normed_row<T>(x, w, out, n, eps);
}

template <class T>
static void norm_rows(const Tensor& x, const Tensor* delta, const Tensor& w, const Tensor& out,
                      double eps, const LowTerm* term) {
    const int64_t n = x.size(1);
    at::parallel_for(0, x.size(0), row_grain(term, 16), [&](int64_t b, int64_t e) {
        if (term != nullptr && term->pending()) add_low_rows<T>(*term, data<T>(*delta), n, b, e);
        for (int64_t r = b; r < e; ++r)
            norm_row<T>(data<T>(x) + r * n, delta ? data<T>(*delta) + r * n : nullptr,
                        data<T>(w), data<T>(out) + r * n, n, float(eps));
    });
}

// ``term``: delta's pending low-rank term, added before the residual add.
static void norm_into(const Tensor& x, const Tensor* delta, const Tensor& w, const Tensor& out,
                      double eps, const LowTerm* term = nullptr) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && out.is_contiguous());
    TORCH_CHECK(w.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type());
    TORCH_CHECK(delta == nullptr || (delta->is_contiguous() && delta->sizes() == x.sizes() &&
                                     delta->scalar_type() == x.scalar_type()));
    TORCH_CHECK(term == nullptr || !term->pending() || delta != nullptr);
    if (is_bf16(x))
        norm_rows<uint16_t>(x, delta, w, out, eps, term);
    else
        norm_rows<float>(x, delta, w, out, eps, term);
}

// w * rmsnorm(x) [B, H].
Tensor rms_norm(Tensor x, Tensor w, double eps) {
    auto out = torch::empty_like(x);
    norm_into(x, nullptr, w, out, eps);
    return out;
}

// x += delta in place (the residual add), then w * rmsnorm(x).
Tensor add_rms_norm(Tensor x, Tensor delta, Tensor w, double eps) {
    auto out = torch::empty_like(x);
    norm_into(x, &delta, w, out, eps);
    return out;
}

// ---- rotary, and the key / value cache write ----

// qkv [B, (heads + 2 kv) D]: the q heads rotated in place, the k heads rotated into keys
// [B, kv, T, D] at ``column``, the v heads copied into values there. Rotation as fast_decode's
// ``x * cos + rotate_half(x) * sin``, each product and the sum rounded to T.
template <class T>
static void rope_rows(const Tensor& qkv, const Tensor& cos, const Tensor& sin,
                      const Tensor& keys, const Tensor& values, int64_t column, int64_t heads,
                      const LowTerm* term) {
    const int64_t kv = keys.size(1), D = keys.size(3), half = D / 2;
    // Strides read once: each TensorBase::stride is a call, which also stops vectorization.
    const int64_t qs = qkv.stride(0), cs = cos.stride(0), ss = sin.stride(0);
    const int64_t kb = keys.stride(0), kh = keys.stride(1), vb = values.stride(0),
                  vh = values.stride(1);
    T *q = data<T>(qkv), *kp = data<T>(keys) + column * keys.stride(2),
      *vp = data<T>(values) + column * values.stride(2);
    const T *c = data<T>(cos), *s = data<T>(sin);
    at::parallel_for(0, qkv.size(0), row_grain(term, 16), [&](int64_t b0, int64_t b1) {
        if (term != nullptr) add_low_rows<T>(*term, q, qs, b0, b1);
        for (int64_t b = b0; b < b1; ++b) {
            const T *cb = c + b * cs, *sb = s + b * ss;
            for (int64_t h = 0; h < heads + kv; ++h) {
                T* src = q + b * qs + h * D;
                T* dst = h < heads ? src : kp + b * kb + (h - heads) * kh;
#pragma omp simd
                for (int64_t j = 0; j < half; ++j) {
                    const float x1 = f32(src[j]), x2 = f32(src[j + half]);
                    dst[j] = store<T>(rnd<T>(x1 * f32(cb[j])) - rnd<T>(x2 * f32(sb[j])));
                    dst[j + half] = store<T>(rnd<T>(x2 * f32(cb[j + half])) +
                                             rnd<T>(x1 * f32(sb[j + half])));
                }
            }
            for (int64_t h = 0; h < kv; ++h)
                std::memcpy(vp + b * vb + h * vh, q + b * qs + (heads + kv + h) * D, D * sizeof(T));
        }
    });
}

// ``term``: qkv's pending low-rank term, added before the rotation.
static void rope_write_as(const Tensor& qkv, const Tensor& cos, const Tensor& sin,
                          const Tensor& keys, const Tensor& values, int64_t column, int64_t heads,
                          const LowTerm* term) {
    const int64_t kv = keys.size(1), D = keys.size(3);
    TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (heads + 2 * kv) * D);
    TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1 && D % 2 == 0);
    TORCH_CHECK(cos.stride(1) == 1 && sin.stride(1) == 1 && cos.size(1) == D);
    TORCH_CHECK(0 <= column && column < keys.size(2));
    for (const Tensor* t : {&cos, &sin, &keys, &values})
        TORCH_CHECK(t->scalar_type() == qkv.scalar_type());
    TORCH_CHECK(term == nullptr || !term->pending() || qkv.is_contiguous());
    if (is_bf16(qkv))
        rope_rows<uint16_t>(qkv, cos, sin, keys, values, column, heads, term);
    else
        rope_rows<float>(qkv, cos, sin, keys, values, column, heads, term);
}

void rope_write(Tensor qkv, Tensor cos, Tensor sin, Tensor keys, Tensor values, int64_t column,
                int64_t heads) {
    rope_write_as(qkv, cos, sin, keys, values, column, heads, nullptr);
}

// ---- one-query attention over each row's cached prefix (GQA) ----

template <class T> static inline void prefetch_row(const T* row, int64_t D) {
    for (int64_t byte = 0; byte < D * int64_t(sizeof(T)); byte += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(row) + byte);
}

// q . k over d < D. With AVX-512 (D a multiple of 16) one register of lane sums, reduced in
// registers; else 16 lane sums added up as a tree in memory. The ordered sum of 16 lanes that an
// `omp simd reduction` compiles to was most of a column's time, and the in-memory tree still
// half of it (each level reads back part of the previous level's store).
template <class T> static inline float dot(const float* q, const T* k, int64_t D) {
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(k + d), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float part[16] = {};
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
#pragma omp simd
        for (int l = 0; l < 16; ++l) part[l] += q[d + l] * f32(k[d + l]);
    }
    for (; d < D; ++d) part[0] += q[d] * f32(k[d]);
    for (int width = 8; width > 0; width /= 2) {
#pragma omp simd
        for (int l = 0; l < width; ++l) part[l] += part[l + width];
    }
    return part[0];
}

// Per (row b, KV head h), one task: the columns t < n with mask[b, t]; the query heads
// h * group ... of q[b] against them, scaled by 1/sqrt(D); softmax and the weighted sum of the
// values in fp32; the output rounded to T. One pass over the keys, one over the values.
// HEAD_DIM: the head size as a compile-time constant (0: read at run time), so the per-column
// dot products and sums unroll into a few vector instructions (with a run-time size each was a
// vectorized loop with its own prologue, 5x slower).
template <class T, int HEAD_DIM>
static void attend_rows(const Tensor& q, const Tensor& keys, const Tensor& values,
                        const Tensor& mask, int64_t n, int64_t heads, const Tensor& out) {
    const int64_t kv = keys.size(1), head_dim = keys.size(3), group = heads / kv;
    const float scale = 1.0f / std::sqrt(float(head_dim));
    const T *qp = data<T>(q), *kp = data<T>(keys), *vp = data<T>(values);
    const bool* mp = mask.data_ptr<bool>();
    T* op = data<T>(out);
    const int64_t qs = q.stride(0), ms = mask.stride(0), os = out.stride(0);
    const int64_t kb = keys.stride(0), kh = keys.stride(1), kt = keys.stride(2);
    const int64_t vb = values.stride(0), vh = values.stride(1), vt = values.stride(2);
    // Tasks of ~64k multiply-adds or more: a short cache at batch 1 runs on the calling thread.
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / (n * head_dim * (group + 1)));
    at::parallel_for(0, q.size(0) * kv, grain, [&](int64_t i0, int64_t i1) {
        // Here, not outside: a value captured by reference is not a constant to the compiler.
        const int64_t D = HEAD_DIM > 0 ? HEAD_DIM : head_dim;
        std::vector<int64_t> cols(n);
        std::vector<float> qf(group * D), score(group * n), acc(group * D), total(group);
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t b = i / kv, h = i % kv;
            int64_t m = 0;
            for (int64_t t = 0; t < n; ++t)
                if (mp[b * ms + t]) cols[m++] = t;
            const T* qb = qp + b * qs + h * group * D;
            for (int64_t j = 0; j < group * D; ++j) qf[j] = f32(qb[j]);
            const T* krow = kp + b * kb + h * kh;
            const T* vrow = vp + b * vb + h * vh;
            for (int64_t j = 0; j < m; ++j) {
                const T* kr = krow + cols[j] * kt;
                // Keys 8 columns ahead, and this column's values for the second pass: a row's
                // columns are contiguous but cross 4 KB pages often, where the hardware
                // prefetchers stop (without these, a column cost ~100 cycles of waiting).
                if (j + 8 < m) prefetch_row(krow + cols[j + 8] * kt, D);
                prefetch_row(vrow + cols[j] * vt, D);
                for (int64_t g = 0; g < group; ++g)
                    score[g * m + j] = dot(qf.data() + g * D, kr, D) * scale;
            }
            for (int64_t g = 0; g < group; ++g) {
                float* sg = score.data() + g * m;
                float top = -std::numeric_limits<float>::infinity(), sum = 0;
#pragma omp simd reduction(max : top)
                for (int64_t j = 0; j < m; ++j) top = std::max(top, sg[j]);
#pragma omp simd reduction(+ : sum)
                for (int64_t j = 0; j < m; ++j) {
                    sg[j] = exp_approx(sg[j] - top);
                    sum += sg[j];
                }
                total[g] = sum;
            }
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t j = 0; j < m; ++j) {
                const T* vr = vrow + cols[j] * vt;
                for (int64_t g = 0; g < group; ++g) {
                    const float p = score[g * m + j];
                    float* ag = acc.data() + g * D;
#pragma omp simd
                    for (int64_t d = 0; d < D; ++d) ag[d] += p * f32(vr[d]);
                }
            }
            T* ob = op + b * os + h * group * D;
            for (int64_t g = 0; g < group; ++g)
                for (int64_t d = 0; d < D; ++d)
                    ob[g * D + d] = store<T>(acc[g * D + d] / total[g]);
        }
    });
}

template <class T>
static void attend_as(const Tensor& q, const Tensor& keys, const Tensor& values,
                      const Tensor& mask, int64_t n, int64_t heads, const Tensor& out) {
    if (keys.size(3) == 64)
        attend_rows<T, 64>(q, keys, values, mask, n, heads, out);
    else if (keys.size(3) == 128)
        attend_rows<T, 128>(q, keys, values, mask, n, heads, out);
    else
        attend_rows<T, 0>(q, keys, values, mask, n, heads, out);
}

// q [B, >= heads D] (the first heads D columns of each row), keys / values [B, kv, T, D], mask
// [B, >= n] bool; returns [B, heads D].
Tensor attend(Tensor q, Tensor keys, Tensor values, Tensor mask, int64_t n, int64_t heads) {
    const int64_t kv = keys.size(1), D = keys.size(3);
    TORCH_CHECK(q.dim() == 2 && q.stride(1) == 1 && q.size(1) >= heads * D && heads % kv == 0);
    TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1 && values.sizes() == keys.sizes());
    TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.stride(1) == 1);
    TORCH_CHECK(0 < n && n <= mask.size(1) && n <= keys.size(2));
    TORCH_CHECK(keys.scalar_type() == q.scalar_type() && values.scalar_type() == q.scalar_type());
    auto out = torch::empty({q.size(0), heads * D}, q.options());
    if (is_bf16(q))
        attend_as<uint16_t>(q, keys, values, mask, n, heads, out);
    else
        attend_as<float>(q, keys, values, mask, n, heads, out);
    return out;
}

// ---- silu(gate) * up ----

// One row: z = rnd(silu(g)) * u (SiLU rounded to T first, as the torch ops).
template <class T> static void silu_mul_row(const T* g, const T* u, T* z, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const float x = f32(g[i]);
        z[i] = store<T>(rnd<T>(x / (1.0f + exp_approx(-x))) * f32(u[i]));
    }
}

template <class T>
static void silu_mul_rows(const Tensor& gu, const Tensor& out, const LowTerm* term) {
    const int64_t inner = out.size(1), gs = gu.stride(0);
    T* gp = data<T>(gu);
    T* op = data<T>(out);
    at::parallel_for(0, gu.size(0), row_grain(term, 8), [&](int64_t b, int64_t e) {
        if (term != nullptr) add_low_rows<T>(*term, gp, gs, b, e);
        for (int64_t r = b; r < e; ++r)
            silu_mul_row<T>(gp + r * gs, gp + r * gs + inner, op + r * inner, inner);
    });
}

// gu [B, 2 I] (gate, then up) -> silu(gate) * up [B, I], the SiLU rounded to T first;
// ``term``: gu's pending low-rank term, added first.
static Tensor silu_mul_as(const Tensor& gu, const LowTerm* term) {
    TORCH_CHECK(gu.dim() == 2 && gu.stride(1) == 1 && gu.size(1) % 2 == 0);
    TORCH_CHECK(term == nullptr || !term->pending() || gu.is_contiguous());
    auto out = torch::empty({gu.size(0), gu.size(1) / 2}, gu.options());
    if (is_bf16(gu))
        silu_mul_rows<uint16_t>(gu, out, term);
    else
        silu_mul_rows<float>(gu, out, term);
    return out;
}

Tensor silu_mul(Tensor gu) { return silu_mul_as(gu, nullptr); }

// ---- choosing tokens ----

// Per row of logits [B, V] (fp32): the token, and its logprob log_softmax(logits)[token]
// (temperature 1, as sampling._Sampler's callers take it). temperature[b] == 0: the argmax (its
// first occurrence); else inverse-CDF sampling of softmax(logits / temperature) at uniform[b] in
// [0, 1): the first token whose running sum of exp((l - max) / T) exceeds uniform x their total.
// Three passes over a row (max; exps and sums; the search, by 1024-wide blocks; a fourth for the
// logprob's normalizer where T is not 1) where the torch ops made eight (softmax, cumsum,
// log_softmax, ...): less than half their time at batch 64 (docs/benchmarks.md).
std::vector<Tensor> sample(Tensor logits, Tensor temperature, Tensor uniform) {
    TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() &&
                logits.scalar_type() == torch::kFloat32);
    TORCH_CHECK(temperature.scalar_type() == torch::kFloat32 && temperature.is_contiguous());
    TORCH_CHECK(uniform.scalar_type() == torch::kFloat64 && uniform.is_contiguous());
    const int64_t rows = logits.size(0), V = logits.size(1), block = 1024;
    auto tokens = torch::empty({rows}, logits.options().dtype(torch::kLong));
    auto logprobs = torch::empty({rows}, logits.options());
    const float *lp = logits.data_ptr<float>(), *tp = temperature.data_ptr<float>();
    const double* up = uniform.data_ptr<double>();
    int64_t* out_tokens = tokens.data_ptr<int64_t>();
    float* out_logprobs = logprobs.data_ptr<float>();
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
        std::vector<float> e(V), sums((V + block - 1) / block);
        for (int64_t r = r0; r < r1; ++r) {
            const float* l = lp + r * V;
            float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
            for (int64_t i = 0; i < V; ++i) top = std::max(top, l[i]);
            int64_t token = 0;
            while (l[token] != top && token + 1 < V) ++token;
            // exp((l - top) / T) and its block sums (T = 1 for greedy rows: the logprob's
            // normalizer, a pass of its own only where T is not 1).
            const float t = tp[r], inv = t > 0 ? 1.0f / t : 1.0f;
            float scaled = 0;
            for (int64_t k = 0; k * block < V; ++k) {
                const int64_t end = std::min(V, (k + 1) * block);
                float part = 0;
#pragma omp simd reduction(+ : part)
                for (int64_t i = k * block; i < end; ++i) {
                    e[i] = exp_approx((l[i] - top) * inv);
                    part += e[i];
                }
                sums[k] = part;
                scaled += part;
            }
            float total = scaled;
            if (inv != 1.0f) {
                total = 0;
#pragma omp simd reduction(+ : total)
                for (int64_t i = 0; i < V; ++i) total += exp_approx(l[i] - top);
            }
            if (t > 0) {
                // The block where the running sum passes the target, then the token in it; the
                // last token of nonzero weight where rounding leaves the target unreached.
                float target = float(up[r]) * scaled, run = 0;
                int64_t k = 0;
                while (k + 1 < int64_t(sums.size()) && run + sums[k] <= target) run += sums[k++];
                int64_t i = k * block, end = std::min(V, (k + 1) * block), last = i;
                for (; i < end; ++i) {
                    if (e[i] > 1e-30f) last = i;  // exp_approx's floor is ~1e-38
                    run += e[i];
                    if (run > target) break;
                }
                token = i < end ? i : last;
            }
            out_tokens[r] = token;
            out_logprobs[r] = l[token] - top - std::log(total);
        }
    });
    return {tokens, logprobs};
}

// ---- the unembedding's softmax in training (trinity/engine/logprobs.py) ----

// Per row of logits [C, V] (fp32 / bf16): logprob[r] = log_softmax(logits[r])[targets[r]], lse[r]
// = log Z and, where ``entropy`` has rows, the entropy; where ``probs`` has rows (it may be
// ``logits`` itself), the softmax probabilities rounded to its dtype. A row is three passes (the
// max; exp with its sums into an fp32 row that stays in cache; the probabilities) where the torch
// ops made eight over fp32 chunks of ~16 MB, which streamed them through memory and, in bf16,
// took a slow mixed-dtype path for the division (docs/benchmarks.md).
template <class T>
static void softmax_rows_as(const Tensor& logits, const Tensor& targets, const Tensor& probs,
                            const Tensor& logprob, const Tensor& lse, const Tensor& entropy) {
    const int64_t V = logits.size(1), block = 1024;
    const T* lp = data<T>(logits);
    T* pp = probs.numel() ? data<T>(probs) : nullptr;
    const int64_t* tp = targets.data_ptr<int64_t>();
    float *op = logprob.data_ptr<float>(), *zp = lse.data_ptr<float>();
    float* hp = entropy.numel() ? entropy.data_ptr<float>() : nullptr;
    at::parallel_for(0, logits.size(0), 1, [&](int64_t r0, int64_t r1) {
        std::vector<float> e(V);
        for (int64_t r = r0; r < r1; ++r) {
            const T* l = lp + r * V;
            const int64_t target = tp[r];
            TORCH_CHECK(0 <= target && target < V, "target token ", target, " outside the vocabulary of ", V);
            float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
            for (int64_t i = 0; i < V; ++i) top = std::max(top, f32(l[i]));
            // Z = sum e^s and sum e^s s (s = logit - max), by 1024-wide blocks so no fp32
            // accumulator adds up more than 64 terms.
            float z = 0, zs = 0;
            for (int64_t k = 0; k < V; k += block) {
                const int64_t end = std::min(V, k + block);
                float part = 0, part_s = 0;
#pragma omp simd reduction(+ : part, part_s)
                for (int64_t i = k; i < end; ++i) {
                    const float s = f32(l[i]) - top, x = exp_approx(s);
                    e[i] = x;
                    part += x;
                    part_s += x * s;
                }
                z += part;
                zs += part_s;
            }
            const float log_z = std::log(z);
            zp[r] = log_z + top;
            op[r] = f32(l[target]) - zp[r];  // read before the probabilities may overwrite it
            if (hp != nullptr) hp[r] = log_z - zs / z;
            if (pp != nullptr) {
                T* p = pp + r * V;
#pragma omp simd
                for (int64_t i = 0; i < V; ++i) p[i] = store<T>(e[i] / z);
            }
        }
    });
}

void softmax_rows(Tensor logits, Tensor targets, Tensor probs, Tensor logprob, Tensor lse,
                  Tensor entropy) {
    const int64_t C = logits.size(0);
    TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "softmax_rows: logits [C, V]");
    TORCH_CHECK(targets.scalar_type() == torch::kLong && targets.is_contiguous() &&
                targets.numel() == C);
    TORCH_CHECK(probs.numel() == 0 || (probs.sizes() == logits.sizes() && probs.is_contiguous() &&
                                       probs.scalar_type() == logits.scalar_type()));
    for (const Tensor* t : {&logprob, &lse})
        TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == C);
    TORCH_CHECK(entropy.numel() == 0 || (entropy.scalar_type() == torch::kFloat32 &&
                                         entropy.is_contiguous() && entropy.numel() == C));
    if (is_bf16(logits))
        softmax_rows_as<uint16_t>(logits, targets, probs, logprob, lse, entropy);
    else
        softmax_rows_as<float>(logits, targets, probs, logprob, lse, entropy);
}

// The gradient of the target logprobs with respect to the logits of columns [c0, c0 + C), from
// the kept probabilities: out[k, c] = grad[k] (1[c0 + c == targets[k]] - probs[rows[k], c0 + c])
// in fp32, rounded to out's dtype (rows: empty for k itself). One pass where the torch ops made
// four (gather of the rows, product, the targets' add, the cast).
template <class T>
static void logit_grad_as(const Tensor& probs, const Tensor& rows, const Tensor& targets,
                          const Tensor& grad, int64_t c0, const Tensor& out) {
    const int64_t C = out.size(1), V = probs.size(1), os = out.stride(0);
    const T* pp = data<T>(probs);
    const int64_t* rp = rows.numel() ? rows.data_ptr<int64_t>() : nullptr;
    const int64_t* tp = targets.data_ptr<int64_t>();
    const float* gp = grad.data_ptr<float>();
    T* o0 = data<T>(out);
    at::parallel_for(0, out.size(0), 8, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
            const T* p = pp + (rp ? rp[k] : k) * V + c0;
            T* o = o0 + k * os;
            const float g = gp[k], minus_g = -g;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) o[c] = store<T>(f32(p[c]) * minus_g);
            const int64_t t = tp[k] - c0;
            if (0 <= t && t < C) o[t] = store<T>(f32(p[t]) * minus_g + g);
        }
    });
}

void logit_grad(Tensor probs, Tensor rows, Tensor targets, Tensor grad, int64_t c0, Tensor out) {
    const int64_t K = out.size(0);
    TORCH_CHECK(probs.dim() == 2 && probs.is_contiguous() && out.dim() == 2 &&
                    out.stride(1) == 1 && out.scalar_type() == probs.scalar_type(),
                "logit_grad: probs [N, V] and out [K, C] of one dtype");
    TORCH_CHECK(0 <= c0 && c0 + out.size(1) <= probs.size(1));
    TORCH_CHECK(rows.numel() == 0 || (rows.scalar_type() == torch::kLong && rows.is_contiguous() &&
                                      rows.numel() == K));
    TORCH_CHECK(rows.numel() > 0 || K <= probs.size(0));
    TORCH_CHECK(targets.scalar_type() == torch::kLong && targets.is_contiguous() &&
                targets.numel() == K);
    TORCH_CHECK(grad.scalar_type() == torch::kFloat32 && grad.is_contiguous() && grad.numel() == K);
    if (is_bf16(probs))
        logit_grad_as<uint16_t>(probs, rows, targets, grad, c0, out);
    else
        logit_grad_as<float>(probs, rows, targets, grad, c0, out);
}

// ---- rmsnorm and SiLU-and-multiply in training (trinity/engine/fused_layers.py) ----
// Why: Llama's RMSNorm and MLP as torch ops are ~10 dispatched elementwise passes forward and
// backward (casts to fp32 and back, pow, mean, rsqrt, products; silu, its backward, products),
// ~0.3 s of a 900-token GRPO pass of the demo model. Here each is one pass over the rows. The
// roundings are the ops' (products and casts rounded to T where they round), the fp32 reductions
// in another order.

// Per row of x [N, C]: y = w * rnd(x * r), r = 1 / sqrt(mean(x^2) + eps) kept in rstd [N].
template <class T>
static void norm_forward_as(const Tensor& x, const Tensor& w, const Tensor& y, const Tensor& rstd,
                            float eps) {
    const int64_t C = x.size(1);
    const T *xp = data<T>(x), *wp = data<T>(w);
    T* yp = data<T>(y);
    float* rp = rstd.data_ptr<float>();
    at::parallel_for(0, x.size(0), 16, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) rp[n] = normed_row<T>(xp + n * C, wp, yp + n * C, C, eps);
    });
}

std::vector<Tensor> norm_forward(Tensor x, Tensor w, double eps) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && w.numel() == x.size(1) &&
                    w.scalar_type() == x.scalar_type(),
                "norm_forward: x [N, C] and w [C] of one dtype");
    auto y = torch::empty_like(x);
    auto rstd = torch::empty({x.size(0)}, x.options().dtype(torch::kFloat32));
    if (is_bf16(x))
        norm_forward_as<uint16_t>(x, w, y, rstd, float(eps));
    else
        norm_forward_as<float>(x, w, y, rstd, float(eps));
    return {y, rstd};
}

// The gradients of norm_forward: with dn = rnd(dy * w), per row dx = dn r - x r^3 mean(dn x)
// (the mean's and rsqrt's chain as autograd takes it); where dw has elements, dw = the column
// sums of rnd(dy * rnd(x r)) (fp32 partial sums per task, added in order, rounded once).
template <class T>
static void norm_grad_row(const T* g, const T* x, const T* w, float r, T* dx, float* dn,
                          int64_t C) {
    float dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < C; ++i) {
        dn[i] = rnd<T>(f32(g[i]) * f32(w[i]));
        dot += dn[i] * f32(x[i]);
    }
    const float c = -dot * r * r * r / float(C);
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) dx[i] = store<T>(dn[i] * r + c * f32(x[i]));
}

template <class T>
static void norm_weight_grad_row(const T* g, const T* x, float r, float* sums, int64_t C) {
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) sums[i] += rnd<T>(f32(g[i]) * rnd<T>(f32(x[i]) * r));
}

template <class T>
static void norm_backward_as(const Tensor& dy, const Tensor& x, const Tensor& w,
                             const Tensor& rstd, const Tensor& dx, const Tensor& dw) {
    const int64_t N = x.size(0), C = x.size(1), grain = 16;
    const T *gp = data<T>(dy), *xp = data<T>(x), *wp = data<T>(w);
    const float* rp = rstd.data_ptr<float>();
    T* dp = data<T>(dx);
    const bool weight = dw.numel() > 0;
    const int64_t tasks = (N + grain - 1) / grain;
    std::vector<float> partial(weight ? tasks * C : 0, 0.0f);
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
        std::vector<float> dn(C);
        for (int64_t t = t0; t < t1; ++t)
            for (int64_t n = t * grain; n < std::min(N, (t + 1) * grain); ++n) {
                norm_grad_row<T>(gp + n * C, xp + n * C, wp, rp[n], dp + n * C, dn.data(), C);
                if (weight)
                    norm_weight_grad_row<T>(gp + n * C, xp + n * C, rp[n],
                                            partial.data() + t * C, C);
            }
    });
    if (weight) {
        T* wg = data<T>(dw);
        for (int64_t i = 0; i < C; ++i) {
            float sum = 0;
            for (int64_t t = 0; t < tasks; ++t) sum += partial[t * C + i];
            wg[i] = store<T>(sum);
        }
    }
}

// (dx, dw): dw empty unless ``weight_grad``.
std::vector<Tensor> norm_backward(Tensor dy, Tensor x, Tensor w, Tensor rstd, bool weight_grad) {
    TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && x.is_contiguous() &&
                    dy.scalar_type() == x.scalar_type() && rstd.numel() == x.size(0),
                "norm_backward: dy and x [N, C] of one dtype, rstd [N]");
    auto dx = torch::empty_like(x);
    auto dw = weight_grad ? torch::empty_like(w) : torch::empty({0}, w.options());
    if (is_bf16(x))
        norm_backward_as<uint16_t>(dy, x, w, rstd, dx, dw);
    else
        norm_backward_as<float>(dy, x, w, rstd, dx, dw);
    return {dx, dw};
}

// silu(g) * u over [N, I] (g and u row strides may differ from I: views of one fused output).
template <class T>
static void swiglu_forward_as(const Tensor& g, const Tensor& u, const Tensor& z) {
    const int64_t I = z.size(1), gs = g.stride(0), us = u.stride(0);
    const T *gp = data<T>(g), *up = data<T>(u);
    T* zp = data<T>(z);
    at::parallel_for(0, z.size(0), 8, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) silu_mul_row<T>(gp + n * gs, up + n * us, zp + n * I, I);
    });
}

Tensor swiglu_forward(Tensor g, Tensor u) {
    TORCH_CHECK(g.dim() == 2 && g.sizes() == u.sizes() && g.stride(1) == 1 && u.stride(1) == 1 &&
                    g.scalar_type() == u.scalar_type(),
                "swiglu_forward: g and u [N, I] of one dtype, rows contiguous");
    auto z = torch::empty(g.sizes(), g.options());
    if (is_bf16(g))
        swiglu_forward_as<uint16_t>(g, u, z);
    else
        swiglu_forward_as<float>(g, u, z);
    return z;
}

// (dg, du) of z = rnd(silu(g)) * u: du = rnd(dz rnd(silu(g))), dg = rnd(dz u) silu'(g) with
// silu'(g) = s (1 + g (1 - s)), s = sigmoid(g) (silu_backward's form).
template <class T>
static void swiglu_backward_as(const Tensor& dz, const Tensor& g, const Tensor& u,
                               const Tensor& dg, const Tensor& du) {
    const int64_t I = dz.size(1), gs = g.stride(0), us = u.stride(0);
    const T *zp = data<T>(dz), *gp = data<T>(g), *up = data<T>(u);
    T *dgp = data<T>(dg), *dup = data<T>(du);
    at::parallel_for(0, dz.size(0), 8, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
            const T *zr = zp + n * I, *gr = gp + n * gs, *ur = up + n * us;
            T *dgr = dgp + n * I, *dur = dup + n * I;
#pragma omp simd
            for (int64_t i = 0; i < I; ++i) {
                const float x = f32(gr[i]), s = 1.0f / (1.0f + exp_approx(-x));
                const float grad = f32(zr[i]);
                dur[i] = store<T>(grad * rnd<T>(x * s));
                dgr[i] = store<T>(rnd<T>(grad * f32(ur[i])) * (s * (1.0f + x * (1.0f - s))));
            }
        }
    });
}

std::vector<Tensor> swiglu_backward(Tensor dz, Tensor g, Tensor u) {
    TORCH_CHECK(dz.dim() == 2 && dz.is_contiguous() && dz.sizes() == g.sizes() &&
                    g.sizes() == u.sizes() && g.stride(1) == 1 && u.stride(1) == 1 &&
                    dz.scalar_type() == g.scalar_type() && g.scalar_type() == u.scalar_type(),
                "swiglu_backward: dz, g and u [N, I] of one dtype");
    auto dg = torch::empty_like(dz), du = torch::empty_like(dz);
    if (is_bf16(dz))
        swiglu_backward_as<uint16_t>(dz, g, u, dg, du);
    else
        swiglu_backward_as<float>(dz, g, u, dg, du);
    return {dg, du};
}

// ---- a whole decode step ----

static const Tensor no_bias;

// x @ w.T (+ bias): by small_mm where it wins (fp32 / bf16; the bias added after the product's
// rounding, as gemv.linear does), else at::linear (as F.linear).
static Tensor matmul(const Tensor& x, const Tensor& w, const Tensor& bias) {
    const bool biased = bias.defined() && bias.numel() > 0;
    if (small_mm_wins(x.size(0), x.size(1), w.size(0)) && w.is_contiguous() &&
        x.scalar_type() == w.scalar_type() && (w.scalar_type() == torch::kFloat32 || is_bf16(w))) {
        Tensor out = small_mm(x.contiguous(), w);
        return biased ? out + bias : out;
    }
    return at::linear(x, w, biased ? std::optional<Tensor>(bias) : std::nullopt);
}

// x @ w.T (+ bias) (+ the masked low-rank term ((x A^T) * mask) B^T), as fast_decode._apply;
// lora: (A, B packed as low_rank_add takes it, row mask, segments as LowTerm's). With
// ``pending`` the low-rank term is left there for the next op to add (see LowTerm), else added
// here.
static Tensor project(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor* lora,
                      LowTerm* pending) {
    if (pending != nullptr) *pending = LowTerm{};
    if (lora == nullptr || lora[0].numel() == 0) return matmul(x, w, bias);
    const Tensor& a = lora[0];
    Tensor out, low;
    if (small_mm_wins(x.size(0), x.size(1), w.size(0)) &&
        small_mm_wins(x.size(0), x.size(1), a.size(0)) && w.is_contiguous() && a.is_contiguous() &&
        x.scalar_type() == w.scalar_type() && a.scalar_type() == w.scalar_type() &&
        (w.scalar_type() == torch::kFloat32 || is_bf16(w))) {
        std::tie(out, low) = small_mm_pair(x.contiguous(), w, a);
        if (bias.defined() && bias.numel() > 0) out = out + bias;
    } else {
        out = matmul(x, w, bias);
        low = matmul(x, a, no_bias);
    }
    if (lora[2].numel() > 0) low = low * lora[2];  // an empty mask: every row has the adapter
    if (pending != nullptr)
        *pending = LowTerm{low.contiguous(), lora[1], lora[3]};
    else
        low_rank_add(out, low.contiguous(), lora[1]);  // over the whole rank: B's zeros add 0
    return out;
}

// The logits [B, V] of one token per row, every layer in this one call. x [B, H]: the embedded
// tokens (the residual stream, updated in place). weights: per layer norm1, qkv w, qkv bias,
// o w, o bias, norm2, gate-up w, gate-up bias, down w, down bias; then the final norm, head w,
// head bias (an absent bias: an empty tensor). lora: none at all, or (A, packed B, row mask,
// segments) per projection (4 per layer, then the head; empty tensors where a projection has
// none). keys / values [L, B, kv, T, D]: this step's k / v written at ``column``, attention over
// the columns < mask.size(1) where mask [B, n] is set. cos / sin [B, D] in x's dtype. Each
// projection's B product goes into the next op (LowTerm), the head's is added at once.
Tensor decode_step(Tensor x, std::vector<Tensor> weights, std::vector<Tensor> lora, Tensor keys,
                   Tensor values, Tensor cos, Tensor sin, Tensor mask, int64_t column,
                   int64_t heads, double eps) {
    at::NoGradGuard no_grad;
    const int64_t layers = keys.size(0), kv = keys.size(2), D = keys.size(4);
    TORCH_CHECK(weights.size() == size_t(10 * layers + 3), "decode_step: weights per layer");
    TORCH_CHECK(lora.empty() || lora.size() == size_t(4 * (4 * layers + 1)), "decode_step: lora");
    auto lora_of = [&](int64_t p) { return lora.empty() ? nullptr : &lora[4 * p]; };
    cos = cos.contiguous();
    sin = sin.contiguous();
    Tensor h = torch::empty_like(x), down;
    LowTerm term, down_term;  // down's stays pending into the next layer's first norm
    for (int64_t l = 0; l < layers; ++l) {
        const Tensor* w = &weights[10 * l];
        norm_into(x, down.defined() ? &down : nullptr, w[0], h, eps, &down_term);
        Tensor qkv = project(h, w[1], w[2], lora_of(4 * l), &term);
        Tensor k = keys.select(0, l), v = values.select(0, l);
        TORCH_CHECK(qkv.size(1) == (heads + 2 * kv) * D && qkv.is_contiguous());
        rope_write_as(qkv, cos, sin, k, v, column, heads, &term);
        Tensor att = attend(qkv, k, v, mask, mask.size(1), heads);
        Tensor o = project(att, w[3], w[4], lora_of(4 * l + 1), &term);
        norm_into(x, &o, w[5], h, eps, &term);
        Tensor act = silu_mul_as(project(h, w[6], w[7], lora_of(4 * l + 2), &term), &term);
        down = project(act, w[8], w[9], lora_of(4 * l + 3), &down_term);
    }
    const Tensor* w = &weights[10 * layers];
    norm_into(x, down.defined() ? &down : nullptr, w[0], h, eps, &down_term);
    return project(h, w[1], w[2], lora_of(4 * layers), nullptr);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("small_mm", &small_mm);
    m.def("small_mm_wins", &small_mm_wins);
    m.def("low_rank_add", &low_rank_add);
    m.attr("small_m") = SMALL_M;
    m.def("rms_norm", &rms_norm);
    m.def("add_rms_norm", &add_rms_norm);
    m.def("rope_write", &rope_write);
    m.def("attend", &attend);
    m.def("silu_mul", &silu_mul);
    m.def("decode_step", &decode_step);
    m.def("sample", &sample);
    m.def("softmax_rows", &softmax_rows);
    m.def("logit_grad", &logit_grad);
    m.def("norm_forward", &norm_forward);
    m.def("norm_backward", &norm_backward);
    m.def("swiglu_forward", &swiglu_forward);
    m.def("swiglu_backward", &swiglu_backward);
}
