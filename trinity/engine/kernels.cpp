// The engine's native CPU kernels, built by trinity/engine/gemv.py (`python -m trinity.engine`):
// the one-row matmul (gemv), and the fused ops of a decode step (trinity/engine/fast_decode.py)
// with a whole step in one call, so a step is not ~20 dispatched torch ops per layer.
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

// ---- gemv: one weight row after another (one sequential stream for the prefetchers) ----

// 64 partial sums per row so the compiler keeps several vector accumulators in flight.
static void rows_f32(const float* w, const float* x, float* y, int64_t n, int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
        const float* wr = w + o * n;
        float acc[64] = {0};
        int64_t i = 0;
        for (; i + 64 <= n; i += 64) {
#pragma omp simd
            for (int64_t j = 0; j < 64; ++j) acc[j] += wr[i + j] * x[i + j];
        }
        float a = 0;
        for (int64_t j = 0; j < 64; ++j) a += acc[j];
        for (; i < n; ++i) a += wr[i] * x[i];
        y[o] = a;
    }
}

// bf16 weights and input: with AVX512-BF16, pairs of bf16 products summed into fp32 lanes
// (vdpbf16ps); otherwise each bf16 widened to fp32 by a shift.
static void rows_bf16(const uint16_t* w, const uint16_t* x, float* y, int64_t n, int64_t b,
                      int64_t e) {
    for (int64_t o = b; o < e; ++o) {
        const uint16_t* wr = w + o * n;
        int64_t i = 0;
        float a = 0;
#if defined(__AVX512BF16__)
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (; i + 64 <= n; i += 64) {
            acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(wr + i),
                                    (__m512bh)_mm512_loadu_si512(x + i));
            acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(wr + i + 32),
                                    (__m512bh)_mm512_loadu_si512(x + i + 32));
        }
        a = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
        float acc[64] = {0};
        for (; i + 64 <= n; i += 64) {
#pragma omp simd
            for (int64_t j = 0; j < 64; ++j) acc[j] += widen(wr[i + j]) * widen(x[i + j]);
        }
        for (int64_t j = 0; j < 64; ++j) a += acc[j];
#endif
        for (; i < n; ++i) a += widen(wr[i]) * widen(x[i]);
        y[o] = a;
    }
}

// x [1, n] and w [out, n] contiguous, both fp32 or both bf16; returns x @ w.T in their dtype.
Tensor gemv(Tensor x, Tensor w) {
    const int64_t n = w.size(1), out = w.size(0);
    auto y = torch::empty({1, out}, x.options().dtype(torch::kFloat32));
    float* yp = y.data_ptr<float>();
    // At least 64 rows per thread: smaller chunks cost more to hand out than they share.
    at::parallel_for(0, out, 64, [&](int64_t b, int64_t e) {
        if (is_bf16(w))
            rows_bf16(data<uint16_t>(w), data<uint16_t>(x), yp, n, b, e);
        else
            rows_f32(w.data_ptr<float>(), x.data_ptr<float>(), yp, n, b, e);
    });
    return is_bf16(w) ? y.to(torch::kBFloat16) : y;
}

// ---- rmsnorm, with the residual add before it ----

// One row: x += delta (in place, when given), then out = w * (x * rsqrt(mean(x^2) + eps)), the
// statistics in fp32 and the normed row rounded to T before the weight (fast_decode._rms_norm).
template <class T>
static void norm_row(T* x, const T* delta, const T* w, T* out, int64_t n, float eps) {
    if (delta != nullptr) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) x[i] = store<T>(f32(x[i]) + f32(delta[i]));
    }
    float squares = 0;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < n; ++i) squares += f32(x[i]) * f32(x[i]);
    const float inv = 1.0f / std::sqrt(squares / float(n) + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = store<T>(f32(w[i]) * rnd<T>(f32(x[i]) * inv));
}

template <class T>
static void norm_rows(const Tensor& x, const Tensor* delta, const Tensor& w, const Tensor& out,
                      double eps) {
    const int64_t n = x.size(1);
    at::parallel_for(0, x.size(0), 16, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
            norm_row<T>(data<T>(x) + r * n, delta ? data<T>(*delta) + r * n : nullptr,
                        data<T>(w), data<T>(out) + r * n, n, float(eps));
    });
}

static void norm_into(const Tensor& x, const Tensor* delta, const Tensor& w, const Tensor& out,
                      double eps) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && out.is_contiguous());
    TORCH_CHECK(w.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type());
    TORCH_CHECK(delta == nullptr || (delta->is_contiguous() && delta->sizes() == x.sizes() &&
                                     delta->scalar_type() == x.scalar_type()));
    if (is_bf16(x))
        norm_rows<uint16_t>(x, delta, w, out, eps);
    else
        norm_rows<float>(x, delta, w, out, eps);
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
                      const Tensor& keys, const Tensor& values, int64_t column, int64_t heads) {
    const int64_t kv = keys.size(1), D = keys.size(3), half = D / 2;
    // Strides read once: each TensorBase::stride is a call, which also stops vectorization.
    const int64_t qs = qkv.stride(0), cs = cos.stride(0), ss = sin.stride(0);
    const int64_t kb = keys.stride(0), kh = keys.stride(1), vb = values.stride(0),
                  vh = values.stride(1);
    T *q = data<T>(qkv), *kp = data<T>(keys) + column * keys.stride(2),
      *vp = data<T>(values) + column * values.stride(2);
    const T *c = data<T>(cos), *s = data<T>(sin);
    at::parallel_for(0, qkv.size(0), 16, [&](int64_t b0, int64_t b1) {
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

void rope_write(Tensor qkv, Tensor cos, Tensor sin, Tensor keys, Tensor values, int64_t column,
                int64_t heads) {
    const int64_t kv = keys.size(1), D = keys.size(3);
    TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (heads + 2 * kv) * D);
    TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1 && D % 2 == 0);
    TORCH_CHECK(cos.stride(1) == 1 && sin.stride(1) == 1 && cos.size(1) == D);
    TORCH_CHECK(0 <= column && column < keys.size(2));
    for (const Tensor* t : {&cos, &sin, &keys, &values})
        TORCH_CHECK(t->scalar_type() == qkv.scalar_type());
    if (is_bf16(qkv))
        rope_rows<uint16_t>(qkv, cos, sin, keys, values, column, heads);
    else
        rope_rows<float>(qkv, cos, sin, keys, values, column, heads);
}

// ---- one-query attention over each row's cached prefix (GQA) ----

#if defined(__AVX512F__)
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const uint16_t* p) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
#endif

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

template <class T> static void silu_mul_rows(const Tensor& gu, const Tensor& out) {
    const int64_t inner = out.size(1), gs = gu.stride(0);
    const T* gp = data<T>(gu);
    T* op = data<T>(out);
    at::parallel_for(0, gu.size(0), 8, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
            const T* g = gp + r * gs;
            const T* u = g + inner;
            T* o = op + r * inner;
#pragma omp simd
            for (int64_t i = 0; i < inner; ++i) {
                const float x = f32(g[i]);
                o[i] = store<T>(rnd<T>(x / (1.0f + exp_approx(-x))) * f32(u[i]));
            }
        }
    });
}

// gu [B, 2 I] (gate, then up) -> silu(gate) * up [B, I], the SiLU rounded to T first.
Tensor silu_mul(Tensor gu) {
    TORCH_CHECK(gu.dim() == 2 && gu.stride(1) == 1 && gu.size(1) % 2 == 0);
    auto out = torch::empty({gu.size(0), gu.size(1) / 2}, gu.options());
    if (is_bf16(gu))
        silu_mul_rows<uint16_t>(gu, out);
    else
        silu_mul_rows<float>(gu, out);
    return out;
}

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

// ---- a whole decode step ----

// x @ w.T (+ bias) (+ the masked low-rank term ((x A^T) * mask) B^T), as fast_decode._apply:
// one row by the gemv (the bias added after its rounding), more by at::linear.
static Tensor project(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor* lora) {
    Tensor out;
    if (x.size(0) == 1 && w.is_contiguous() && x.scalar_type() == w.scalar_type() &&
        (w.scalar_type() == torch::kFloat32 || is_bf16(w))) {
        out = gemv(x.contiguous(), w);
        if (bias.numel() > 0) out = out + bias;
    } else {
        out = at::linear(x, w, bias.numel() > 0 ? std::optional<Tensor>(bias) : std::nullopt);
    }
    if (lora != nullptr && lora[0].numel() > 0) {  // an empty mask: every row has the adapter
        Tensor low = at::linear(x, lora[0]);
        if (lora[2].numel() > 0) low = low * lora[2];
        out.add_(at::linear(low, lora[1]).to(out.scalar_type()));
    }
    return out;
}

// The logits [B, V] of one token per row, every layer in this one call. x [B, H]: the embedded
// tokens (the residual stream, updated in place). weights: per layer norm1, qkv w, qkv bias,
// o w, o bias, norm2, gate-up w, gate-up bias, down w, down bias; then the final norm, head w,
// head bias (an absent bias: an empty tensor). lora: none at all, or (A, B, row mask) per
// projection (4 per layer, then the head; empty tensors where a projection has none).
// keys / values [L, B, kv, T, D]: this step's k / v written at ``column``, attention over the
// columns < mask.size(1) where mask [B, n] is set. cos / sin [B, D] in x's dtype.
Tensor decode_step(Tensor x, std::vector<Tensor> weights, std::vector<Tensor> lora, Tensor keys,
                   Tensor values, Tensor cos, Tensor sin, Tensor mask, int64_t column,
                   int64_t heads, double eps) {
    at::NoGradGuard no_grad;
    const int64_t layers = keys.size(0), kv = keys.size(2), D = keys.size(4);
    TORCH_CHECK(weights.size() == size_t(10 * layers + 3), "decode_step: weights per layer");
    TORCH_CHECK(lora.empty() || lora.size() == size_t(3 * (4 * layers + 1)), "decode_step: lora");
    auto lora_of = [&](int64_t p) { return lora.empty() ? nullptr : &lora[3 * p]; };
    cos = cos.contiguous();
    sin = sin.contiguous();
    Tensor h = torch::empty_like(x), down;
    for (int64_t l = 0; l < layers; ++l) {
        const Tensor* w = &weights[10 * l];
        norm_into(x, down.defined() ? &down : nullptr, w[0], h, eps);
        Tensor qkv = project(h, w[1], w[2], lora_of(4 * l));
        Tensor k = keys.select(0, l), v = values.select(0, l);
        TORCH_CHECK(qkv.size(1) == (heads + 2 * kv) * D && qkv.is_contiguous());
        rope_write(qkv, cos, sin, k, v, column, heads);
        Tensor att = attend(qkv, k, v, mask, mask.size(1), heads);
        Tensor o = project(att, w[3], w[4], lora_of(4 * l + 1));
        norm_into(x, &o, w[5], h, eps);
        Tensor act = silu_mul(project(h, w[6], w[7], lora_of(4 * l + 2)));
        down = project(act, w[8], w[9], lora_of(4 * l + 3)).contiguous();
    }
    const Tensor* w = &weights[10 * layers];
    norm_into(x, down.defined() ? &down : nullptr, w[0], h, eps);
    return project(h, w[1], w[2], lora_of(4 * layers));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("gemv", &gemv);
    m.def("rms_norm", &rms_norm);
    m.def("add_rms_norm", &add_rms_norm);
    m.def("rope_write", &rope_write);
    m.def("attend", &attend);
    m.def("silu_mul", &silu_mul);
    m.def("decode_step", &decode_step);
    m.def("sample", &sample);
}
