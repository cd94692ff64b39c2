// Attention for one query per row (decoding) on CPU, reading the KV cache where it lies.
//
// Why: a decode step attends one query over every cached position, which is a read of the cache
// and little arithmetic.  torch's SDPA kernel is built for many queries, and its batched matmuls
// copy a cache slice (strided: the cache is preallocated to the longest context) into contiguous
// memory first; in the 7B model these copies cost more than the reads (at 160 positions, about 1 ms
// per layer against 0.1 ms).  This kernel reads each cached key and value once, in place, in fp32
// arithmetic, for all the query heads that share it (grouped-query attention).
//
// Op (namespace llama_adapter):
// - one_query_attention(q [B, H, 1, d], k [B, KVH, S, d], v [B, KVH, S, d], mask bool [B, S] or None)
//   -> [B, H, 1, d] in q's dtype: softmax(q k^T / sqrt(d), masked where mask is False) v.
//   float32 or bfloat16 (all three alike); any strides but a contiguous last dimension; H a multiple
//   of KVH.  A row whose mask is all False gets zeros.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LA_AVX512 1
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

#ifdef LA_AVX512

// 16 values (fewer where ``lanes`` says) as fp32; bf16 widens by a shift of its bits.
template <typename T>
inline __m512 load16(const T* p, __mmask16 lanes);

template <>
inline __m512 load16<float>(const float* p, __mmask16 lanes) {
  return _mm512_maskz_loadu_ps(lanes, p);
}

template <>
inline __m512 load16<at::BFloat16>(const at::BFloat16* p, __mmask16 lanes) {
  const __m256i bits = _mm256_maskz_loadu_epi16(lanes, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

inline void store(float* out, const float* acc, int64_t d) { std::memcpy(out, acc, d * sizeof(float)); }

inline void store(at::BFloat16* out, const float* acc, int64_t d) {
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<at::BFloat16>(acc[i]);  // round to nearest even
}

constexpr int64_t kBlock = 64;  // positions per block: their keys (or values) stay in L1 while each query head passes

// One (row, key/value head): the G query heads that share it.  C chunks of 16 lanes cover the head
// dimension d (lanes past d load as zeros), so q and the output accumulators live in registers.
template <typename T, int C>
struct Head {
  const T* k;
  const T* v;
  int64_t k_step, v_step;
  const bool* mask;
  __mmask16 lanes[C];

  Head(const T* k, const T* v, int64_t k_step, int64_t v_step, int64_t d, const bool* mask)
      : k(k), v(v), k_step(k_step), v_step(v_step), mask(mask) {
    for (int c = 0; c < C; ++c) {
      const int64_t n = std::clamp<int64_t>(d - 16 * c, 0, 16);
      lanes[c] = static_cast<__mmask16>((1u << n) - 1);
    }
  }

  // Scaled scores of one query head ``q`` over positions s0..s1 into p; returns their max.
  float scores(const T* q, float scale, int64_t s0, int64_t s1, float* p) const {
    __m512 qv[C];
    for (int c = 0; c < C; ++c) qv[c] = _mm512_mul_ps(load16(q + 16 * c, lanes[c]), _mm512_set1_ps(scale));
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = s0; s < s1; ++s) {
      if (mask && !mask[s]) {
        p[s] = -std::numeric_limits<float>::infinity();
        continue;
      }
      const T* ks = k + s * k_step;
      __m512 acc = _mm512_mul_ps(qv[0], load16(ks, lanes[0]));
      for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qv[c], load16(ks + 16 * c, lanes[c]), acc);
      p[s] = _mm512_reduce_add_ps(acc);
      mx = std::max(mx, p[s]);
    }
    return mx;
  }

  // out [d] += sum over positions s0..s1 of p[s] v[s].
  void accumulate(const float* p, int64_t s0, int64_t s1, float* out) const {
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_maskz_loadu_ps(lanes[c], out + 16 * c);
    for (int64_t s = s0; s < s1; ++s) {
      if (p[s] == 0.0f) continue;  // masked (or underflowed): its value is never read
      const T* vs = v + s * v_step;
      const __m512 w = _mm512_set1_ps(p[s]);
      for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(w, load16(vs + 16 * c, lanes[c]), acc[c]);
    }
    for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(out + 16 * c, lanes[c], acc[c]);
  }
};

template <typename T, int C>
void attend(const Tensor& q, const Tensor& k, const Tensor& v, const bool* mask, int64_t mask_row, const Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), d = q.size(3), KVH = k.size(1), S = k.size(2), G = H / KVH;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * KVH, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(G * S), mx(G), acc(G * 16 * C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / KVH, kvh = t % KVH;
      const Head<T, C> head(k.data_ptr<T>() + b * k.stride(0) + kvh * k.stride(1), v.data_ptr<T>() + b * v.stride(0) + kvh * v.stride(1),
                            k.stride(2), v.stride(2), d, mask ? mask + b * mask_row : nullptr);
      const T* qb = qp + b * q.stride(0) + kvh * G * q.stride(1);
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
      for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
        for (int64_t g = 0; g < G; ++g) {
          mx[g] = std::max(mx[g], head.scores(qb + g * q.stride(1), scale, s0, std::min(S, s0 + kBlock), p.data() + g * S));
        }
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t g = 0; g < G; ++g) {  // softmax, unnormalised: the sum divides the output
        float* pg = p.data() + g * S;
        if (mx[g] == -std::numeric_limits<float>::infinity()) {
          std::fill(pg, pg + S, 0.0f);  // nothing to attend to: zeros, not NaN
          continue;
        }
        for (int64_t s = 0; s < S; ++s) pg[s] = std::exp(pg[s] - mx[g]);
      }
      for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
        for (int64_t g = 0; g < G; ++g) head.accumulate(p.data() + g * S, s0, std::min(S, s0 + kBlock), acc.data() + g * 16 * C);
      }
      for (int64_t g = 0; g < G; ++g) {
        const float* pg = p.data() + g * S;
        const float sum = std::accumulate(pg, pg + S, 0.0f);
        float* row = acc.data() + g * 16 * C;
        if (sum > 0.0f) {
          for (int64_t i = 0; i < d; ++i) row[i] /= sum;
        }
        store(op + (b * H + kvh * G + g) * d, row, d);
      }
    }
  });
}

#endif

Tensor one_query_attention(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "q, k and v must be CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k and v must be 4-D: [B, heads, positions, head_dim]");
  TORCH_CHECK(q.size(2) == 1, "one_query_attention takes one query per row, not ", q.size(2));
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v differ in shape: ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), "k's batch or head_dim differs from q's");
  TORCH_CHECK(k.size(2) > 0, "no cached positions to attend to");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "q's ", q.size(1), " heads are not a multiple of k's ", k.size(1));
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "q, k and v must all be float32 or all bfloat16");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k and v need a contiguous last dimension");
  const bool* mask_ptr = nullptr;
  int64_t mask_row = 0;
  if (mask.has_value()) {
    const Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == q.size(0) &&
                    m.size(1) == k.size(2) && (m.size(1) <= 1 || m.stride(1) == 1),
                "mask must be a bool CPU tensor [B, S] with a contiguous last dimension");
    mask_ptr = m.data_ptr<bool>();
    mask_row = m.stride(0);
  }
  Tensor out = at::empty({q.size(0), q.size(1), 1, q.size(3)}, q.options());
#ifdef LA_AVX512
  const int64_t chunks = (q.size(3) + 15) / 16;
  TORCH_CHECK(chunks <= 16, "one_query_attention takes head_dim up to 256, not ", q.size(3));
  const auto run = [&](auto typed) {
    using T = decltype(typed);
    if (chunks <= 1) return attend<T, 1>(q, k, v, mask_ptr, mask_row, out);
    if (chunks <= 2) return attend<T, 2>(q, k, v, mask_ptr, mask_row, out);
    if (chunks <= 4) return attend<T, 4>(q, k, v, mask_ptr, mask_row, out);
    if (chunks <= 8) return attend<T, 8>(q, k, v, mask_ptr, mask_row, out);
    return attend<T, 16>(q, k, v, mask_ptr, mask_row, out);
  };
  if (q.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(at::BFloat16{});
  }
  return out;
#else
  TORCH_CHECK(false, "llama_adapter's CPU kernels were built without AVX-512");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama_adapter, m) {
  m.def("one_query_attention(Tensor q, Tensor k, Tensor v, Tensor? mask=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_adapter, CPU, m) {
  m.impl("one_query_attention", one_query_attention);
}
