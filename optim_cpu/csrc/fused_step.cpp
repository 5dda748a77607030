// Fused single-pass CPU optimizer steps (AdamW, Adam, Lion) over fp32 master params.
// One call updates elements [begin, end) of one parameter on the calling thread; threads,
// pinning and pacing belong to optim_cpu.scheduler, so nothing here starts a thread.
//
// Every element is read once and written once: the fp32 param, the moments, the grad (fp32,
// bf16 or fp16) and, when asked, the half-precision copy of the updated param. The AVX-512 body
// handles its tail with masked loads and stores, so it has no scalar tail and an element's result
// never depends on where a chunk starts; the portable body is compiled with -ffp-contract=off and
// uses std::fma exactly where the vector body uses fmadd, so both give the same bits.
#include <torch/extension.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <string>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define OPTIM_CPU_AVX512 1
#endif

namespace {

// Scalars derived once per call, in double and then rounded to float, the way
// torch.optim.Adam(W) turns its Python-float hyper-parameters into tensor-op scalars.
struct AdamScalars {
  float lr_decay;       // 1 - lr * wd (AdamW), 1 when the decay is coupled
  float l2;             // wd for Adam's L2 term, 0 for AdamW
  float one_minus_b1;
  float b2;
  float one_minus_b2;
  float neg_step_size;  // -lr / (1 - b1^t)
  float inv_bc2_sqrt;   // 1 / sqrt(1 - b2^t): a multiply, since the divider is the AVX-512 bottleneck
  float eps;
};

struct LionScalars {
  float lr_decay;
  float neg_lr;
  float b1;
  float one_minus_b1;
  float b2;
  float one_minus_b2;
};

struct NoOut {};

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

inline void put(NoOut*, int64_t, float) {}
inline void put(c10::BFloat16* out, int64_t i, float x) { out[i] = c10::BFloat16(x); }
inline void put(c10::Half* out, int64_t i, float x) { out[i] = c10::Half(x); }

#ifdef OPTIM_CPU_AVX512
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {
  const __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

inline void store16(NoOut*, int64_t, __mmask16, __m512) {}
// Round to nearest even with integer ops, as c10::BFloat16 does; VCVTNEPS2BF16 would flush
// denormals and so disagree with param.to(torch.bfloat16).
inline void store16(c10::BFloat16* p, int64_t i, __mmask16 k, __m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
  __m512i hi = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  hi = _mm512_mask_mov_epi32(hi, nan, _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p + i, k, _mm512_cvtepi32_epi16(hi));
}
inline void store16(c10::Half* p, int64_t i, __mmask16 k, __m512 x) {
  _mm256_mask_storeu_epi16(p + i, k, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}
#endif

template <typename G, typename O>
void adam_range(float* p, const G* g, float* m, float* v, O* out, int64_t n, const AdamScalars& s) {
#ifdef OPTIM_CPU_AVX512
  const __m512 lr_decay = _mm512_set1_ps(s.lr_decay), l2 = _mm512_set1_ps(s.l2);
  const __m512 w1 = _mm512_set1_ps(s.one_minus_b1), b2 = _mm512_set1_ps(s.b2);
  const __m512 w2 = _mm512_set1_ps(s.one_minus_b2), neg_step = _mm512_set1_ps(s.neg_step_size);
  const __m512 inv_bc2 = _mm512_set1_ps(s.inv_bc2_sqrt), eps = _mm512_set1_ps(s.eps);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(n - i);
    __m512 gi = load16(g + i, k);
    __m512 pi = _mm512_maskz_loadu_ps(k, p + i);
    __m512 mi = _mm512_maskz_loadu_ps(k, m + i);
    __m512 vi = _mm512_maskz_loadu_ps(k, v + i);
    gi = _mm512_fmadd_ps(l2, pi, gi);
    pi = _mm512_mul_ps(pi, lr_decay);
    mi = _mm512_fmadd_ps(w1, _mm512_sub_ps(gi, mi), mi);
    vi = _mm512_add_ps(_mm512_mul_ps(vi, b2), _mm512_mul_ps(_mm512_mul_ps(w2, gi), gi));
    const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vi), inv_bc2), eps);
    pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(neg_step, mi), denom));
    _mm512_mask_storeu_ps(p + i, k, pi);
    _mm512_mask_storeu_ps(m + i, k, mi);
    _mm512_mask_storeu_ps(v + i, k, vi);
    store16(out, i, k, pi);
  }
#else
  for (int64_t i = 0; i < n; ++i) {
    float pi = p[i];
    const float gi = std::fma(s.l2, pi, to_float(g[i]));
    pi = pi * s.lr_decay;
    const float mi = std::fma(s.one_minus_b1, gi - m[i], m[i]);
    const float vi = v[i] * s.b2 + (s.one_minus_b2 * gi) * gi;
    const float denom = std::sqrt(vi) * s.inv_bc2_sqrt + s.eps;
    pi = pi + (s.neg_step_size * mi) / denom;
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    put(out, i, pi);
  }
#endif
}

template <typename G, typename O>
void lion_range(float* p, const G* g, float* m, O* out, int64_t n, const LionScalars& s) {
#ifdef OPTIM_CPU_AVX512
  const __m512 lr_decay = _mm512_set1_ps(s.lr_decay), neg_lr = _mm512_set1_ps(s.neg_lr);
  const __m512 b1 = _mm512_set1_ps(s.b1), w1 = _mm512_set1_ps(s.one_minus_b1);
  const __m512 b2 = _mm512_set1_ps(s.b2), w2 = _mm512_set1_ps(s.one_minus_b2);
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(n - i);
    const __m512 gi = load16(g + i, k);
    __m512 pi = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + i), lr_decay);
    __m512 mi = _mm512_maskz_loadu_ps(k, m + i);
    const __m512 c = _mm512_fmadd_ps(gi, w1, _mm512_mul_ps(mi, b1));
    const __mmask16 pos = _mm512_cmp_ps_mask(c, zero, _CMP_GT_OQ);
    const __mmask16 neg = _mm512_cmp_ps_mask(c, zero, _CMP_LT_OQ);
    const __m512 sign = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(pos, one), neg, _mm512_set1_ps(-1.0f));
    pi = _mm512_fmadd_ps(sign, neg_lr, pi);
    mi = _mm512_fmadd_ps(gi, w2, _mm512_mul_ps(mi, b2));
    _mm512_mask_storeu_ps(p + i, k, pi);
    _mm512_mask_storeu_ps(m + i, k, mi);
    store16(out, i, k, pi);
  }
#else
  for (int64_t i = 0; i < n; ++i) {
    const float gi = to_float(g[i]);
    const float c = std::fma(gi, s.one_minus_b1, m[i] * s.b1);
    const float sign = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
    const float pi = std::fma(sign, s.neg_lr, p[i] * s.lr_decay);
    m[i] = std::fma(gi, s.one_minus_b2, m[i] * s.b2);
    p[i] = pi;
    put(out, i, pi);
  }
#endif
}

void check_range(const at::Tensor& param, int64_t begin, int64_t end) {
  TORCH_CHECK(param.device().is_cpu() && param.scalar_type() == at::kFloat && param.is_contiguous(),
              "param must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(0 <= begin && begin <= end && end <= param.numel(), "range [", begin, ", ", end,
              ") is outside a param of ", param.numel(), " elements");
}

void check_like(const at::Tensor& param, const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.numel() == param.numel(), what,
              " must be a contiguous CPU tensor with as many elements as its param");
}

// Calls fn(grad_ptr, out_ptr) with the element types that grad and out hold.
template <typename Fn>
void dispatch(const at::Tensor& grad, const c10::optional<at::Tensor>& out, int64_t begin,
              Fn&& fn) {
  auto with_out = [&](auto* g) {
    if (!out.has_value()) {
      fn(g, static_cast<NoOut*>(nullptr));
    } else if (out->scalar_type() == at::kBFloat16) {
      fn(g, out->data_ptr<c10::BFloat16>() + begin);
    } else if (out->scalar_type() == at::kHalf) {
      fn(g, out->data_ptr<c10::Half>() + begin);
    } else {
      TORCH_CHECK(false, "out must be bfloat16 or float16, got ", out->scalar_type());
    }
  };
  switch (grad.scalar_type()) {
    case at::kFloat: with_out(grad.data_ptr<float>() + begin); break;
    case at::kBFloat16: with_out(grad.data_ptr<c10::BFloat16>() + begin); break;
    case at::kHalf: with_out(grad.data_ptr<c10::Half>() + begin); break;
    default: TORCH_CHECK(false, "grad must be float32, bfloat16 or float16, got ", grad.scalar_type());
  }
}

void adam_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
               const at::Tensor& exp_avg_sq, const c10::optional<at::Tensor>& out, int64_t begin,
               int64_t end, double lr, double beta1, double beta2, double eps, double weight_decay,
               int64_t step, bool decoupled) {
  check_range(param, begin, end);
  check_like(param, grad, "grad");
  check_like(param, exp_avg, "exp_avg");
  check_like(param, exp_avg_sq, "exp_avg_sq");
  if (out.has_value()) check_like(param, *out, "out");
  TORCH_CHECK(step >= 1, "step must be >= 1, got ", step);
  AdamScalars s;
  s.lr_decay = decoupled ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  s.l2 = decoupled ? 0.0f : static_cast<float>(weight_decay);
  s.one_minus_b1 = static_cast<float>(1.0 - beta1);
  s.b2 = static_cast<float>(beta2);
  s.one_minus_b2 = static_cast<float>(1.0 - beta2);
  s.neg_step_size = static_cast<float>(-(lr / (1.0 - std::pow(beta1, static_cast<double>(step)))));
  s.inv_bc2_sqrt = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  s.eps = static_cast<float>(eps);
  float* p = param.data_ptr<float>() + begin;
  float* m = exp_avg.data_ptr<float>() + begin;
  float* v = exp_avg_sq.data_ptr<float>() + begin;
  dispatch(grad, out, begin, [&](auto* g, auto* o) { adam_range(p, g, m, v, o, end - begin, s); });
}

void lion_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
               const c10::optional<at::Tensor>& out, int64_t begin, int64_t end, double lr,
               double beta1, double beta2, double weight_decay) {
  check_range(param, begin, end);
  check_like(param, grad, "grad");
  check_like(param, exp_avg, "exp_avg");
  if (out.has_value()) check_like(param, *out, "out");
  LionScalars s;
  s.lr_decay = static_cast<float>(1.0 - lr * weight_decay);
  s.neg_lr = static_cast<float>(-lr);
  s.b1 = static_cast<float>(beta1);
  s.one_minus_b1 = static_cast<float>(1.0 - beta1);
  s.b2 = static_cast<float>(beta2);
  s.one_minus_b2 = static_cast<float>(1.0 - beta2);
  float* p = param.data_ptr<float>() + begin;
  float* m = exp_avg.data_ptr<float>() + begin;
  dispatch(grad, out, begin, [&](auto* g, auto* o) { lion_range(p, g, m, o, end - begin, s); });
}

std::string isa() {
#ifdef OPTIM_CPU_AVX512
  return "avx512";
#else
  return "portable";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused single-pass CPU AdamW/Adam/Lion steps over a range of one fp32 parameter";
  m.def("adam_step", &adam_step, py::call_guard<py::gil_scoped_release>());
  m.def("lion_step", &lion_step, py::call_guard<py::gil_scoped_release>());
  m.def("isa", &isa);
}
