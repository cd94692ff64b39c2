// Weight-only int8 / int4 products for CPU serving on AVX-512 VNNI integer dot products.
//
// Built on first use for the machine it runs on (``native.py``: -march=native); torch's own
// weight-only kernels stay the fallback, and the load-time probe picks whichever is faster.
//
// Why: a decode step streams every weight once, so it is bound by memory bandwidth, and the
// kernel must consume bytes as fast as the memory delivers them.  Like llama.cpp, we quantize the
// activations to int8 per block (one fp32 scale per block) and multiply with VPDPBUSD, which
// leaves the cores idle enough to keep up with the memory.  torch's weight-only kernels widen
// every weight to float first.
//
// Ops (namespace llama_adapter), x [M, K] float or bf16, results [M, N] in x's dtype (bf16 ones rounded once,
// from the fp32 accumulation, as a cast of an fp32 result would round them):
// - int8_linear(x, weight int8 [N, K], scale float or bf16 [N]): w = q * scale[n]; activation blocks of 32.
// - int4_linear(x, weight uint8 [N/16, K/128, 1024], scales half [N/16, K/128, 2, 16]): the panel layout below,
//   groups of 128, w = q * scale + low; activation blocks of 128 (one per group); any number of tokens.
// - int4_dequantize(weight, scales, out [N, K] float or bf16): writes the full-precision weight into out, for
//   the many-token path (dequantise into scratch, then the GEMM).
// - int8_dequantize(weight int8 [N, K], scale float or bf16 [N], out [N, K] float or bf16): the same for int8,
//   in one pass (torch's copy and multiply make two over the 90 MB of a 7B FFN matrix in bf16).
// - int8_gemm: int8_linear's product (the same arguments, activation blocks and results) for many tokens
//   (prompts, batched decoding), with the lanes along the output instead of along K (see ``panel_gemm``).
// - fp32_linear(x float [M, K], weight float [N, K]): plain x W^T for a few tokens (batched fp32 decoding).
//
// int4 panel layout: rows in panels of 16.  For panel p and group g, 16 chunks of 64 bytes (1 KiB), then the 16
// rows' scales and their lows (float16, 64 bytes); in chunk j, lane i (bytes 4i..4i+3) holds row 16p + i's weights
// 4j..4j+3 of the group in its low nibbles and 64 + 4j..64 + 4j + 3 in its high nibbles.  weight and scales are
// views of that one buffer, so each thread reads one sequential stream (with the scales in an array of their own,
// 10% slower at 50 GB/s), and the product needs no horizontal sum and no per-row scalar work: one VPDPBUSD
// multiplies 4 weights of 16 rows by 4 activations (the row kernel it replaced, lanes along K, ran half as fast on
// cached weights: 35 against 66 GB/s on one core of the bench machine).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__) && defined(__F16C__)
#define LA_VNNI 1
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

constexpr int64_t kInt8Block = 32;    // activation block of int8_linear (llama.cpp's Q8_0 block)
constexpr int64_t kGroup = 128;       // int4 group, and int4_linear's activation block
constexpr int64_t kPanel = 16;        // rows per panel: the int4 layout's, and the lanes of the panel products
constexpr int64_t kPanelStride = kPanel * kGroup / 2 + kPanel * 4;  // int4: a panel's weights and scales of a group
constexpr int64_t kRows = 4;          // rows per pass of the row kernels, for several tokens
constexpr int64_t kTileBytes = 256 << 10;  // weight bytes per parallel task: stays in L2 while every token passes
// Software prefetch this many bytes ahead in a thread's weight stream.  The hardware prefetchers alone left one-token
// products at 70-75% of a plain read's bandwidth on the Xeon VM (int4 and int8); 2-4 KiB ahead gave 80-82% (ad hoc,
// interleaved with the read).
constexpr int64_t kStreamAhead = 2048;

void check_input(const Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
}

// bf16 by round-to-nearest-even on the bits (finite values; the compiler vectorizes it).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

#ifdef LA_VNNI

// Activations [M, K] -> int8 q [M, K] and one scale per block (amax / 127); with sums, also
// scale * sum(q) per block (int4's zero-point term).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const at::BFloat16* p) {  // bf16 widens to fp32 by a shift of its bits
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

template <typename T>
void quantize_activations(const T* x, int64_t M, int64_t K, int64_t block, int8_t* q, int64_t ld, float* scales, float* sums) {
  const int64_t nb = K / block;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < nb; ++b) {
        const T* p = x + m * K + b * block;
        __m512 mx = _mm512_setzero_ps();
        for (int64_t i = 0; i < block; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(load16(p + i)));
        const float amax = _mm512_reduce_max_ps(mx);
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m512i sum = _mm512_setzero_si512();
        for (int64_t i = 0; i < block; i += 16) {
          const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(p + i), inv));  // round to nearest even
          sum = _mm512_add_epi32(sum, v);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(q + m * ld + b * block + i), _mm512_cvtsepi32_epi8(v));
        }
        const float s = amax / 127.f;
        scales[m * nb + b] = s;
        if (sums) sums[m * nb + b] = s * static_cast<float>(_mm512_reduce_add_epi32(sum));
      }
    }
  });
}

struct Activations {
  Tensor q, scales, sums;
  int64_t ld;  // q's row stride
};

// ``pad`` bytes after each row of q: rows 4 KB apart all fall in one L1 set, and the GEMM reads 12 rows at once.
Activations quantized(const Tensor& x, int64_t block, bool with_sums, int64_t pad = 0) {
  const Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), ld = K + pad;
  const auto floats = xc.options().dtype(at::kFloat);
  Activations a{at::empty({M, ld}, floats.dtype(at::kChar)), at::empty({M, K / block}, floats), Tensor(), ld};
  if (with_sums) a.sums = at::empty({M, K / block}, floats);
  float* sums = with_sums ? a.sums.data_ptr<float>() : nullptr;
  if (xc.scalar_type() == at::kBFloat16) {
    quantize_activations(xc.data_ptr<at::BFloat16>(), M, K, block, a.q.data_ptr<int8_t>(), ld, a.scales.data_ptr<float>(), sums);
  } else {
    quantize_activations(xc.data_ptr<float>(), M, K, block, a.q.data_ptr<int8_t>(), ld, a.scales.data_ptr<float>(), sums);
  }
  return a;
}

// Where a tile's results go: the output in x's dtype (bf16 rounded to nearest even).
struct Out {
  void* data;
  bool bf16;

  void put(int64_t i, float v) const {
    if (bf16) {
      static_cast<uint16_t*>(data)[i] = to_bf16(v);
    } else {
      static_cast<float*>(data)[i] = v;
    }
  }
};

Out output_of(const Tensor& y) { return Out{y.data_ptr(), y.scalar_type() == at::kBFloat16}; }

// Row tiles of about kTileBytes each, over the two-level loop (tile of rows, then tokens by up to Tile::kMaxTokens).
//
// With more tokens than one pass takes, the first pass over a tile waits on memory and the later ones read it
// from L2 at the speed of the arithmetic; the second pass prefetches the thread's next tile (``ahead`` bytes on,
// tiles being contiguous), so that the arithmetic and the memory stream overlap instead of taking turns; the other
// passes prefetch kStreamAhead bytes on.
template <typename Tile>
void over_tiles(int64_t M, int64_t N, int64_t row_bytes, Tile tile) {
  const int64_t rows = std::max<int64_t>(kRows, (kTileBytes / row_bytes) / kRows * kRows);
  at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * rows, n1 = std::min(N, n0 + rows);
      int64_t m = 0;  // (the last tile may be short: prefetches past the weight's end are dropped, never fault)
      auto ahead = [&] { return m == Tile::kMaxTokens && t + 1 < t1 ? rows * row_bytes : kStreamAhead; };
      for (; m + 4 <= M; m += 4) tile.template run<4>(m, n0, n1, ahead());
      if (M - m == 3) tile.template run<3>(m, n0, n1, ahead()), m += 3;
      for (; m + 2 <= M; m += 2) tile.template run<2>(m, n0, n1, ahead());
      if (m < M) tile.template run<1>(m, n0, n1, ahead());
    }
  });
}

inline void prefetch_ahead(const void* p, int64_t ahead) { _mm_prefetch(static_cast<const char*>(p) + ahead, _MM_HINT_T1); }

// Two blocks' scales in one vector: lanes 0-7 block b, lanes 8-15 block b + 1 (VPDPBUSD's lanes of a 64-byte chunk).
inline __m512 pair_scales(const float* s) {
  return _mm512_insertf32x8(_mm512_set1_ps(s[0]), _mm256_set1_ps(s[1]), 1);
}

// Rows n0..n1 of a tile for tokens m0..m0+T: four rows per pass for several tokens (their accumulators in registers,
// each token's chunk loaded once for the four), then one at a time; ``Tile::step`` adds one chunk of the weights,
// ``Tile::finish`` scales a row's sum.
template <int T, int R, typename Tile>
void row_pass(const Tile& tile, int64_t m0, int64_t n, int64_t ahead) {
  __m512 acc[R][T];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t c = 0, chunks = tile.chunks(); c < chunks; ++c) tile.template step<T, R>(m0, n, c, ahead, acc);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) tile.y.put((m0 + t) * tile.N + n + r, tile.finish(n + r, _mm512_reduce_add_ps(acc[r][t])));
}

template <int T, typename Tile>
void row_passes(const Tile& tile, int64_t m0, int64_t n0, int64_t n1, int64_t ahead) {
  int64_t n = n0;
  // One token (batch-1 decoding) takes its rows one at a time: each thread then reads one sequential stream, which the
  // memory delivers faster than four rows' streams at once (int8 on 7B shapes: 28 GB/s against 24, 2 cores).
  if constexpr (T > 1)
    for (; n + kRows <= n1; n += kRows) row_pass<T, kRows>(tile, m0, n, ahead);
  for (; n < n1; ++n) row_pass<T, 1>(tile, m0, n, ahead);
}

struct Int8Tile {
  static constexpr int kMaxTokens = 4;  // tokens per pass over a tile of rows
  const int8_t* xq;
  const float* xs;
  const int8_t* w;
  const void* scale;  // float or bf16 (the module's own buffer: no per-call conversion)
  bool scale_bf16;
  Out y;
  int64_t K, N;

  float scale_at(int64_t n) const {
    if (!scale_bf16) return static_cast<const float*>(scale)[n];
    const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(scale)[n]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }

  // sum_k x w = sum_b xs_b dot_b(xq, q); VPDPBUSD wants unsigned x signed: |xq| times q with xq's sign.
  // Chunk c (64 weights) of rows n..n+R into acc[r][t].
  template <int T, int R>
  void step(int64_t m0, int64_t n, int64_t c, int64_t ahead, __m512 (&acc)[R][T]) const {
    const __m512i zero = _mm512_setzero_si512();
    for (int r = 0; r < R; ++r) {
      prefetch_ahead(w + (n + r) * K + c * 64, ahead);
      const __m512i wv = _mm512_loadu_si512(w + (n + r) * K + c * 64);
      for (int t = 0; t < T; ++t) {
        const __m512i xv = _mm512_loadu_si512(xq + (m0 + t) * K + c * 64);
        const __m512i signed_w = _mm512_mask_sub_epi8(wv, _mm512_movepi8_mask(xv), zero, wv);
        const __m512i d = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(xv), signed_w);
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), pair_scales(xs + (m0 + t) * (K / kInt8Block) + 2 * c), acc[r][t]);
      }
    }
  }

  int64_t chunks() const { return K / 64; }
  float finish(int64_t n, float sum) const { return sum * scale_at(n); }

  template <int T>
  void run(int64_t m0, int64_t n0, int64_t n1, int64_t ahead) const {
    row_passes<T>(*this, m0, n0, n1, ahead);
  }
};

// Plain fp32 products for a few tokens (batched decoding): each weight row chunk is read once for up to four
// tokens, whose accumulators stay in registers.
struct F32Tile {
  static constexpr int kMaxTokens = 4;
  const float* x;
  const float* w;
  Out y;
  int64_t K, N;

  // Chunk c (16 weights) of rows n..n+R into acc[r][t]; each token's chunk is loaded once for the R rows.
  template <int T, int R>
  void step(int64_t m0, int64_t n, int64_t c, int64_t ahead, __m512 (&acc)[R][T]) const {
    __m512 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_ps(x + (m0 + t) * K + c * 16);
    for (int r = 0; r < R; ++r) {
      prefetch_ahead(w + (n + r) * K + c * 16, ahead);
      const __m512 wv = _mm512_loadu_ps(w + (n + r) * K + c * 16);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }

  int64_t chunks() const { return K / 16; }
  float finish(int64_t, float sum) const { return sum; }

  template <int T>
  void run(int64_t m0, int64_t n0, int64_t n1, int64_t ahead) const {
    row_passes<T>(*this, m0, n0, n1, ahead);
  }
};

// Products with the lanes along the output: one VPDPBUSD multiplies 4 weights of each of 16 rows (a panel) by a
// token's 4 int8 activations, broadcast to all lanes, so no sum needs a horizontal reduction and a weight chunk
// loaded once serves every token of a tile.  Per activation block b (one scale xs, sum xsum = xs sum(q)):
//   y[t, n] = sum_b A[b, n] xs[t, b] dot_b(u[n], q[t]) + L[b, n] xsum[t, b]
// with int4 u = q, A = scale, L = low (the weights' own layout); int8 u = w + 128, A = 1, L = -128, times the row
// scale at the end (``panel_gemm`` transposes int8's rows into a panel buffer that stays in L2, for prompts).
constexpr int kGemmTokens = 12;  // int8: 12 int32 and 12 fp32 accumulators, the weight chunk and a broadcast: 26 registers
// int4: the nibbles take two more registers, and C sums per token below 4 tokens (``int4_tile``).
constexpr int kInt4Tokens = 8;

inline __mmask16 lanes(int64_t rows) { return static_cast<__mmask16>((1u << rows) - 1); }

inline int32_t four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// run(m0, std::integral_constant<int, T>) over tiles of kMax tokens, then one tile of the rest (T a compile-time count).
template <int kMax, typename Run>
void rest_tile(int64_t left, int64_t m0, Run& run) {
  if constexpr (kMax > 1) {
    if (left == kMax - 1) return run(m0, std::integral_constant<int, kMax - 1>{});
    rest_tile<kMax - 1>(left, m0, run);
  }
}

template <int kMax, typename Run>
void token_tiles(int64_t M, Run&& run) {
  int64_t m = 0;
  for (; m + kMax <= M; m += kMax) run(m, std::integral_constant<int, kMax>{});
  if (m < M) rest_tile<kMax>(M - m, m, run);
}

// o[j] lane i = r[i] lane j: a 16 x 16 transpose of 32-bit values (pairs, then quads within 128-bit lanes, then
// the 128-bit lanes themselves).
inline void transpose16(__m512i (&r)[16], __m512i (&o)[16]) {
  for (int g = 0; g < 4; ++g) {  // rows 4g..4g+3 -> v[c] holds, in 128-bit lane L, their values of column 4L + c
    const __m512i lo01 = _mm512_unpacklo_epi32(r[4 * g], r[4 * g + 1]), hi01 = _mm512_unpackhi_epi32(r[4 * g], r[4 * g + 1]);
    const __m512i lo23 = _mm512_unpacklo_epi32(r[4 * g + 2], r[4 * g + 3]), hi23 = _mm512_unpackhi_epi32(r[4 * g + 2], r[4 * g + 3]);
    r[4 * g] = _mm512_unpacklo_epi64(lo01, lo23);
    r[4 * g + 1] = _mm512_unpackhi_epi64(lo01, lo23);
    r[4 * g + 2] = _mm512_unpacklo_epi64(hi01, hi23);
    r[4 * g + 3] = _mm512_unpackhi_epi64(hi01, hi23);
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c gathers lane L of the four groups' v[c]
    const __m512i s0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), s1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44), s3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    o[c] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    o[4 + c] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    o[8 + c] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    o[12 + c] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
}

// int8 rows n0..n0+rows as w + 128 (w ^ 0x80): 64 bytes of each row, transposed into 16 chunks.  (A gather of 4 bytes
// from each of 16 rows was 2x slower where rows are 4 KB apart: all 16 fall in one L1 set.)
void pack_int8(const int8_t* w, int64_t K, int64_t n0, int64_t rows, __m512i* buf) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t c = 0; c < K / 64; ++c) {
    __m512i r[16], o[16];
    for (int64_t i = 0; i < kPanel; ++i) r[i] = i < rows ? _mm512_loadu_si512(w + (n0 + i) * K + c * 64) : _mm512_setzero_si512();
    transpose16(r, o);
    for (int j = 0; j < 16; ++j) buf[c * 16 + j] = _mm512_xor_si512(o[j], flip);
  }
}

// Tokens m0..m0+T against one packed int8 panel: out[t] gets the 16 rows' sums (before the row scale).
template <int T>
void int8_tile(const __m512i* buf, const Activations& a, int64_t K, int64_t m0, __m512 (&out)[T]) {
  constexpr int64_t steps = kInt8Block / 4;
  const int64_t nb = K / kInt8Block;
  const int8_t* xq = a.q.data_ptr<int8_t>();
  const float* xs = a.scales.data_ptr<float>();
  for (auto& o : out) o = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i acc[T];
    for (auto& v : acc) v = _mm512_setzero_si512();
    const int8_t* xb = xq + m0 * a.ld + b * kInt8Block;
    for (int64_t s = 0; s < steps; ++s) {
      const __m512i wv = _mm512_loadu_si512(buf + b * steps + s);
      for (int t = 0; t < T; ++t) acc[t] = _mm512_dpbusd_epi32(acc[t], wv, _mm512_set1_epi32(four_bytes(xb + t * a.ld + 4 * s)));
    }
    for (int t = 0; t < T; ++t) out[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), _mm512_set1_ps(xs[(m0 + t) * nb + b]), out[t]);
  }
}

// Tokens m0..m0+T against int4 panel wp: out[t] gets the 16 rows' results.  ``ahead``: bytes past
// each chunk to prefetch (the thread's next panel, or kStreamAhead).  With fewer than 4 tokens each token keeps C
// separate sums, or VPDPBUSD's latency would bind instead of the memory.
template <int T>
void int4_tile(const uint8_t* wp, int64_t groups, const Activations& a, int64_t m0, int64_t ahead, __m512 (&out)[T]) {
  constexpr int C = T >= 4 ? 1 : 4 / T;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const int8_t* xq = a.q.data_ptr<int8_t>() + m0 * a.ld;
  const float* xs = a.scales.data_ptr<float>() + m0 * groups;
  const float* xsum = a.sums.data_ptr<float>() + m0 * groups;
  for (auto& o : out) o = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* d = wp + g * kPanelStride;
    __m512i acc[C][T];
    for (auto& c : acc)
      for (auto& v : c) v = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      prefetch_ahead(d + j * 64, ahead);
      const __m512i v = _mm512_loadu_si512(d + j * 64);
      const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      for (int t = 0; t < T; ++t) {
        const int8_t* x = xq + t * a.ld + g * kGroup + 4 * j;
        acc[(2 * j) % C][t] = _mm512_dpbusd_epi32(acc[(2 * j) % C][t], lo, _mm512_set1_epi32(four_bytes(x)));
        acc[(2 * j + 1) % C][t] = _mm512_dpbusd_epi32(acc[(2 * j + 1) % C][t], hi, _mm512_set1_epi32(four_bytes(x + 64)));
      }
    }
    const uint16_t* s = reinterpret_cast<const uint16_t*>(d + kPanel * 64);
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    const __m512 low = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + kPanel)));
    for (int t = 0; t < T; ++t) {
      __m512i sum = acc[0][t];
      for (int c = 1; c < C; ++c) sum = _mm512_add_epi32(sum, acc[c][t]);
      out[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(scale, _mm512_set1_ps(xs[t * groups + g])), out[t]);
      out[t] = _mm512_fmadd_ps(low, _mm512_set1_ps(xsum[t * groups + g]), out[t]);
    }
  }
}

// The row scale (int8) and the output dtype: tile results into y [M, N].
struct PanelOut {
  Out y;
  int64_t N;
  const float* row_scale;  // int8: the rows' scales as float; int4: null
  const float* offset;     // int8: per token 128 sum_b xsum[t, b] (the +128 of u); int4: null

  template <int T>
  void put(int64_t m0, int64_t n0, int64_t rows, __m512 (&out)[T]) const {
    alignas(64) float v[kPanel];
    for (int t = 0; t < T; ++t) {
      __m512 r = out[t];
      if (row_scale) r = _mm512_mul_ps(_mm512_sub_ps(r, _mm512_set1_ps(offset[m0 + t])), _mm512_maskz_loadu_ps(lanes(rows), row_scale + n0));
      _mm512_store_ps(v, r);
      for (int64_t i = 0; i < rows; ++i) y.put((m0 + t) * N + n0 + i, v[i]);
    }
  }
};

// int8 prompts: each thread transposes a panel of 16 rows into a buffer that stays in L2, then every tile of up to
// kGemmTokens tokens passes over it.
void panel_gemm(const int8_t* w, const Activations& a, const PanelOut& o, int64_t M, int64_t N, int64_t K) {
  at::parallel_for(0, (N + kPanel - 1) / kPanel, 1, [&](int64_t p0, int64_t p1) {
    std::vector<__m512i> buf(K / 4);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, rows = std::min(kPanel, N - n0);
      pack_int8(w, K, n0, rows, buf.data());
      token_tiles<kGemmTokens>(M, [&](int64_t m0, auto tokens) {
        __m512 out[decltype(tokens)::value];
        int8_tile(buf.data(), a, K, m0, out);
        o.put(m0, n0, rows, out);
      });
    }
  });
}

// int4, any number of tokens: the first tile over a panel reads it from memory, later ones from L2; the second
// prefetches the thread's next panel, so that the arithmetic and the memory stream overlap instead of taking turns
// (the others prefetch kStreamAhead bytes on).
void int4_panels(const uint8_t* w, const Activations& a, const PanelOut& o, int64_t M, int64_t N, int64_t K) {
  const int64_t groups = K / kGroup, bytes = groups * kPanelStride;
  at::parallel_for(0, N / kPanel, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* wp = w + p * bytes;
      token_tiles<kInt4Tokens>(M, [&](int64_t m0, auto tokens) {
        __m512 out[decltype(tokens)::value];
        int4_tile(wp, groups, a, m0, m0 == kInt4Tokens && p + 1 < p1 ? bytes : kStreamAhead, out);
        o.put(m0, p * kPanel, kPanel, out);
      });
    }
  });
}

#endif  // LA_VNNI

Tensor fp32_linear(const Tensor& x, const Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.is_contiguous(),
              "weight must be a contiguous float32 [N, K] CPU tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) == K,
              "x must be a float32 [M, K] CPU tensor with the weight's K = ", K);
  TORCH_CHECK(K % 16 == 0, "fp32_linear needs K % 16 == 0, got ", K);
#ifdef LA_VNNI
  const Tensor xc = x.contiguous();
  Tensor y = at::empty({x.size(0), N}, x.options());
  const F32Tile tile{xc.data_ptr<float>(), weight.data_ptr<float>(), output_of(y), K, N};
  over_tiles(x.size(0), N, K * 4, tile);
  return y;
#else
  TORCH_CHECK(false, "llama_adapter's CPU kernels were built without AVX-512 VNNI");
#endif
}

// Whether t's dimensions have these strides (a dimension of size 1 may have any).
bool strided(const Tensor& t, at::IntArrayRef strides) {
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) != 1 && t.stride(d) != strides[d]) return false;
  return true;
}

// The panel layout's two views of one buffer: weight [P, G, 1024] and scales [P, G, 2, 16] half right after each
// 1024 bytes.  Returns (N, K).
std::pair<int64_t, int64_t> check_int4(const Tensor& weight, const Tensor& scales) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kByte && weight.dim() == 3 && weight.size(2) == kPanel * 64,
              "int4 weight must be a uint8 [N/16, K/128, 1024] CPU tensor (the panel layout's view, llama_adapter.model.quantize.panel_int4)");
  const int64_t P = weight.size(0), G = weight.size(1);
  TORCH_CHECK(strided(weight, {G * kPanelStride, kPanelStride, 1}), "int4 weight must be the panel layout's view: groups ",
              kPanelStride, " bytes apart");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.sizes() == at::IntArrayRef({P, G, 2, kPanel}) &&
                  strided(scales, {G * kPanelStride / 2, kPanelStride / 2, kPanel, 1}) &&
                  static_cast<const char*>(scales.data_ptr()) == static_cast<const char*>(weight.data_ptr()) + kPanel * 64,
              "int4 scales must be float16 [N/16, K/128, 2, 16], the panel layout's view of the weight's buffer");
  return {P * kPanel, G * kGroup};
}

void check_int8(const Tensor& x, const Tensor& weight, const Tensor& scale) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kChar && weight.dim() == 2 && weight.is_contiguous(),
              "int8 weight must be a contiguous int8 [N, K] CPU tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  check_input(x, K);
  TORCH_CHECK(K % 64 == 0, "the int8 products need K % 64 == 0, got ", K);
  TORCH_CHECK(scale.numel() == N && scale.is_contiguous() && (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16),
              "scale must be a contiguous float32 or bfloat16 tensor of N = ", N, " values");
}

Tensor int8_linear(const Tensor& x, const Tensor& weight, const Tensor& scale) {
  check_int8(x, weight, scale);
  const int64_t N = weight.size(0), K = weight.size(1);
#ifdef LA_VNNI
  const Activations a = quantized(x, kInt8Block, false);
  Tensor y = at::empty({x.size(0), N}, x.options());
  const Int8Tile tile{a.q.data_ptr<int8_t>(), a.scales.data_ptr<float>(), weight.data_ptr<int8_t>(),
                      scale.data_ptr(), scale.scalar_type() == at::kBFloat16, output_of(y), K, N};
  over_tiles(x.size(0), N, K, tile);
  return y;
#else
  TORCH_CHECK(false, "llama_adapter's CPU kernels were built without AVX-512 VNNI");
#endif
}

Tensor int4_linear(const Tensor& x, const Tensor& weight, const Tensor& scales) {
  const auto [N, K] = check_int4(weight, scales);
  check_input(x, K);
#ifdef LA_VNNI
  const Activations a = quantized(x, kGroup, true, 64);
  Tensor y = at::empty({x.size(0), N}, x.options());
  const PanelOut o{output_of(y), N, nullptr, nullptr};
  int4_panels(weight.data_ptr<uint8_t>(), a, o, x.size(0), N, K);
  return y;
#else
  TORCH_CHECK(false, "llama_adapter's CPU kernels were built without AVX-512 VNNI");
#endif
}

Tensor int8_gemm(const Tensor& x, const Tensor& weight, const Tensor& scale) {
  check_int8(x, weight, scale);
  const int64_t N = weight.size(0), K = weight.size(1);
#ifdef LA_VNNI
  const Activations a = quantized(x, kInt8Block, true, 64);
  const Tensor row_scale = scale.to(at::kFloat).contiguous();
  const Tensor offset = a.sums.sum(1).mul_(128.f).contiguous();
  Tensor y = at::empty({x.size(0), N}, x.options());
  const PanelOut o{output_of(y), N, row_scale.data_ptr<float>(), offset.data_ptr<float>()};
  panel_gemm(weight.data_ptr<int8_t>(), a, o, x.size(0), N, K);
  return y;
#else
  TORCH_CHECK(false, "llama_adapter's CPU kernels were built without AVX-512 VNNI");
#endif
}

void int4_dequantize(const Tensor& weight, const Tensor& scales, const Tensor& out) {
  const auto [N, K] = check_int4(weight, scales);
  const int64_t groups = K / kGroup;
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.sizes() == at::IntArrayRef({N, K}) &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "out must be a contiguous float32 or bfloat16 [N, K] CPU tensor");
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  void* base = out.data_ptr();
  at::parallel_for(0, N / kPanel, 1, [&](int64_t p0, int64_t p1) {
    float row[kGroup];
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* d = w + (p * groups + g) * kPanelStride;
        const at::Half* s = reinterpret_cast<const at::Half*>(d + kPanel * 64);
        for (int64_t i = 0; i < kPanel; ++i) {
          const float scale = static_cast<float>(s[i]), low = static_cast<float>(s[kPanel + i]);
          for (int j = 0; j < 16; ++j) {
            for (int b = 0; b < 4; ++b) {
              const uint8_t byte = d[j * 64 + i * 4 + b];
              row[4 * j + b] = static_cast<float>(byte & 15) * scale + low;
              row[64 + 4 * j + b] = static_cast<float>(byte >> 4) * scale + low;
            }
          }
          const int64_t offset = (p * kPanel + i) * K + g * kGroup;
          if (bf16) {
            uint16_t* o = static_cast<uint16_t*>(base) + offset;
            for (int j = 0; j < kGroup; ++j) o[j] = to_bf16(row[j]);
          } else {
            std::memcpy(static_cast<float*>(base) + offset, row, sizeof(row));
          }
        }
      }
    }
  });
}

void int8_dequantize(const Tensor& weight, const Tensor& scale, const Tensor& out) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kChar && weight.dim() == 2 && weight.is_contiguous(),
              "int8 weight must be a contiguous int8 [N, K] CPU tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(scale.numel() == N && scale.is_contiguous() && (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16),
              "scale must be a contiguous float32 or bfloat16 tensor of N = ", N, " values");
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.sizes() == weight.sizes() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "out must be a contiguous float32 or bfloat16 [N, K] CPU tensor");
  const int8_t* w = weight.data_ptr<int8_t>();
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  // The scale in out's dtype, then q * scale rounded once: what copy_(q).mul_(scale.to(out.dtype)) computes.
  const Tensor s = scale.to(out.scalar_type()).to(at::kFloat).contiguous();
  const float* sp = s.data_ptr<float>();
  void* base = out.data_ptr();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* q = w + n * K;
      const float sn = sp[n];
      if (bf16) {
        uint16_t* o = static_cast<uint16_t*>(base) + n * K;
        for (int64_t k = 0; k < K; ++k) o[k] = to_bf16(static_cast<float>(q[k]) * sn);
      } else {
        float* o = static_cast<float*>(base) + n * K;
        for (int64_t k = 0; k < K; ++k) o[k] = static_cast<float>(q[k]) * sn;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(llama_adapter, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("int4_dequantize(Tensor weight, Tensor scales, Tensor(a!) out) -> ()");
  m.def("int8_dequantize(Tensor weight, Tensor scale, Tensor(a!) out) -> ()");
  m.def("fp32_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("int8_gemm(Tensor x, Tensor weight, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_adapter, CPU, m) {
  m.impl("int8_linear", int8_linear);
  m.impl("int4_linear", int4_linear);
  m.impl("int4_dequantize", int4_dequantize);
  m.impl("int8_dequantize", int8_dequantize);
  m.impl("fp32_linear", fp32_linear);
  m.impl("int8_gemm", int8_gemm);
}
