// RMSNorm and RoPE for CPU inference, one op each.
//
// Why: in eager PyTorch, Meta's RMSNorm is about nine ops (cast, pow, mean, add, rsqrt, mul, cast,
// mul) and its interleaved RoPE about fifteen, each a dispatch of a few microseconds on a vector of
// 4096 values.  A 7B decode step has 65 norms and 64 rotations: about 10 ms of dispatch in a step
// of about 150 ms.  These ops do the same arithmetic, in the same precision, in one pass.
//
// Ops (namespace llama_adapter):
// - rms_norm(x [..., D], weight [D], eps) -> [..., D]: n = x * rsqrt(mean(x^2) + eps) in fp32, rounded
//   to x's dtype, times weight; the result has the promoted dtype of x and weight (as ``n * weight``).
// - rope(x [B, T, H, d], cos [B|1, T, d/2], sin [B|1, T, d/2]) -> [B, T, H, d] in x's dtype: each pair
//   (x[2i], x[2i+1]) rotated, (x0 cos - x1 sin, x0 sin + x1 cos) in fp32.
// Float32 or bfloat16; any strides for x's leading dimensions, a contiguous last one.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

using at::Tensor;

bool float_or_bf16(const Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; }

// Rounded as a cast to T rounds (bf16: to nearest even).
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename X, typename W, typename O>
void norm_rows(const Tensor& x, const Tensor& weight, double eps, const Tensor& out) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  const Tensor x2 = x.reshape({rows, D});
  const X* xp = x2.data_ptr<X>();
  const int64_t row_stride = x2.stride(0);
  const W* wp = weight.data_ptr<W>();
  O* op = out.data_ptr<O>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const X* xr = xp + r * row_stride;
      float ss = 0.f;
      for (int64_t i = 0; i < D; ++i) {
        const float v = static_cast<float>(xr[i]);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      for (int64_t i = 0; i < D; ++i) {
        const float n = round_to<X>(static_cast<float>(xr[i]) * inv);
        op[r * D + i] = static_cast<O>(n * static_cast<float>(wp[i]));
      }
    }
  });
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "x and weight must be CPU tensors");
  TORCH_CHECK(float_or_bf16(x) && float_or_bf16(weight), "x and weight must be float32 or bfloat16");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.is_contiguous(),
              "weight must be a contiguous vector of x's last dimension, ", x.size(-1));
  TORCH_CHECK(x.size(-1) > 0 && x.stride(-1) == 1, "x needs a non-empty, contiguous last dimension");
  const at::ScalarType out_type = c10::promoteTypes(x.scalar_type(), weight.scalar_type());
  Tensor out = at::empty(x.sizes(), x.options().dtype(out_type));
  if (x.numel() == 0) return out;
  const bool xb = x.scalar_type() == at::kBFloat16, wb = weight.scalar_type() == at::kBFloat16;
  if (xb && wb) {
    norm_rows<at::BFloat16, at::BFloat16, at::BFloat16>(x, weight, eps, out);
  } else if (xb) {
    norm_rows<at::BFloat16, float, float>(x, weight, eps, out);
  } else if (wb) {
    norm_rows<float, at::BFloat16, float>(x, weight, eps, out);
  } else {
    norm_rows<float, float, float>(x, weight, eps, out);
  }
  return out;
}

template <typename T>
void rotate(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& out) {
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), d = x.size(3), half = d / 2;
  const T* xp = x.data_ptr<T>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t table_batch = cos.size(0) == 1 ? 0 : S * half;
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * S, 4, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / S, s = p % S;
      const float* c = cp + b * table_batch + s * half;
      const float* sn = sp + b * table_batch + s * half;
      for (int64_t h = 0; h < H; ++h) {
        const T* xh = xp + b * x.stride(0) + s * x.stride(1) + h * x.stride(2);
        T* oh = op + ((b * S + s) * H + h) * d;
        for (int64_t i = 0; i < half; ++i) {
          const float x0 = static_cast<float>(xh[2 * i]), x1 = static_cast<float>(xh[2 * i + 1]);
          // Each product rounded on its own, as the eager formula's separate ops round them.
          const float a = x0 * c[i], bsn = x1 * sn[i], e = x0 * sn[i], f = x1 * c[i];
          oh[2 * i] = static_cast<T>(a - bsn);
          oh[2 * i + 1] = static_cast<T>(e + f);
        }
      }
    }
  });
}

Tensor rope(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), "x, cos and sin must be CPU tensors");
  TORCH_CHECK(float_or_bf16(x), "x must be float32 or bfloat16");
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0 && x.stride(3) == 1, "x must be [B, T, heads, head_dim] with an even, contiguous head_dim");
  const int64_t B = x.size(0), S = x.size(1), half = x.size(3) / 2;
  for (const Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && (t->size(0) == 1 || t->size(0) == B) &&
                    t->size(1) == S && t->size(2) == half,
                "cos and sin must be contiguous float32 [B or 1, T, head_dim / 2]");
  }
  TORCH_CHECK(cos.sizes() == sin.sizes(), "cos and sin differ in shape");
  Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  if (x.scalar_type() == at::kFloat) {
    rotate<float>(x, cos, sin, out);
  } else {
    rotate<at::BFloat16>(x, cos, sin, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama_adapter, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_adapter, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("rope", rope);
}
