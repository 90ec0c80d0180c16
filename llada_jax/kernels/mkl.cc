// float32 kernels for XLA:CPU through the XLA FFI, on Intel oneMKL (libmkl_rt from the `mkl`
// wheel; linked when llada_jax/mkl.py builds this file):
//
// LladaMklMatmul: c = op(a) @ op(b), op = transpose where the attribute says so.
// LladaMklAttention / LladaMklAttentionGrad: softmax(q k^T + bias) v and its gradients, one
//   (batch, kv head) item at a time with the scores of a block of query rows kept in cache
//   (FlashAttention's recomputation: the backward rebuilds the probabilities from q, k and the
//   rows' log-sum-exp instead of reading an L x L map back from memory). Each query row computes
//   only the keys from the first to the last its bias leaves visible: a packed segment's own,
//   a padded row's valid ones.
// Operands are row-major.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include <xmmintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The CBLAS entry points, declared here so that no MKL headers are needed (the `mkl` wheel ships
// only libraries). LP64 interface: integers are 32-bit.
extern "C" {
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
// MKL's JIT: a GEMM kernel generated for one shape, layout and beta.
typedef void (*JitSgemm)(void* jitter, float* a, float* b, float* c);
int mkl_cblas_jit_create_sgemm(void** jitter, int layout, int trans_a, int trans_b, int m, int n,
                               int k, float alpha, int lda, int ldb, float beta, int ldc);
JitSgemm mkl_jit_get_sgemm_ptr(const void* jitter);
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// Exponents below this are raised to it, so that `Exp` builds a normal float (masked scores, with
// bias -1e30, reach here): exp(-87) = 1.6e-38 is 0 to any sum.
constexpr float kExpFloor = -87.0f;

// XLA runs independent thunks concurrently (a backward's dX and dW matmuls); two MKL calls
// whose thread teams each expect all the cores would oversubscribe them, so calls take turns.
std::mutex mkl_turn;

ffi::Error Matmul(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                  bool trans_a, bool trans_b) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2) {
    return ffi::Error::InvalidArgument("mkl matmul: operands must be matrices");
  }
  const int64_t m = cd[0], n = cd[1], k = trans_a ? ad[0] : ad[1];
  if ((trans_a ? ad[1] : ad[0]) != m || (trans_b ? bd[0] : bd[1]) != n ||
      (trans_b ? bd[1] : bd[0]) != k) {
    return ffi::Error::InvalidArgument("mkl matmul: operand shapes do not match");
  }
  std::lock_guard<std::mutex> turn(mkl_turn);
  cblas_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, 1.0f,
              a.typed_data(), ad[1], b.typed_data(), bd[1], 0.0f, c->typed_data(), n);
  return ffi::Error::Success();
}

// c = op(a) op(b) + beta c (row-major) on one thread, through a kernel MKL's JIT generates for
// this exact shape on first use: on attention's products (e.g. 128 x 256 x 64) 10-15% faster
// than cblas_sgemm. Each thread keeps its own kernels, so that finding one takes no lock; they
// live as long as the thread, one per shape it has met, up to kMaxKernels (attention over packed
// segments meets one per segment length; past the limit, new shapes run cblas_sgemm).
constexpr size_t kMaxKernels = 512;

void SmallGemm(bool trans_a, bool trans_b, int m, int n, int k, const float* a, int lda,
               const float* b, int ldb, float beta, float* c, int ldc) {
  struct Kernel {
    void* jitter = nullptr;
    JitSgemm run = nullptr;
  };
  thread_local std::map<std::array<int, 9>, Kernel> kernels;
  const std::array<int, 9> key{trans_a, trans_b, m, n, k, lda, ldb, ldc,
                               __builtin_bit_cast(int, beta)};
  auto found = kernels.find(key);
  if (found == kernels.end() && kernels.size() >= kMaxKernels) {
    cblas_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k,
                1.0f, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  if (found == kernels.end()) {
    Kernel kernel;
    constexpr int kJitError = 2;  // MKL_JIT_ERROR; MKL_NO_JIT still gives a working kernel
    if (mkl_cblas_jit_create_sgemm(&kernel.jitter, kRowMajor, trans_a ? kTrans : kNoTrans,
                                   trans_b ? kTrans : kNoTrans, m, n, k, 1.0f, lda, ldb, beta,
                                   ldc) != kJitError) {
      kernel.run = mkl_jit_get_sgemm_ptr(kernel.jitter);
    }
    found = kernels.emplace(key, kernel).first;
  }
  if (found->second.run != nullptr) {
    found->second.run(found->second.jitter, const_cast<float*>(a), const_cast<float*>(b), c);
  } else {
    cblas_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k,
                1.0f, a, lda, b, ldb, beta, c, ldc);
  }
}

// Runs body(item) for item < n on the OpenMP threads MKL uses (this file links MKL's libiomp5),
// inside which MKL runs sequentially: the items are independent and each too small to split.
template <typename Body>
void ParallelItems(int64_t n, Body body) {
#pragma omp parallel
  {
    // Denormals flushed, as in XLA's own threads: a subnormal operand slows an FMA ~100x.
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);  // FTZ | DAZ
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < n; ++i) body(i);
    _mm_setcsr(csr);
  }
}

// 16 float32 lanes (GCC / Clang vector extensions): one AVX-512 register where the CPU has them,
// two AVX2 ones elsewhere. The softmax passes below are written with them because the compiler
// does not vectorize an exp it has to build from bit operations on its own.
typedef float Floats __attribute__((vector_size(64)));
typedef int32_t Ints __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

Floats Load(const float* p) {
  Floats v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

void Store(float* p, Floats v) { __builtin_memcpy(p, &v, sizeof(v)); }

// The first n < kLanes floats at p, the other lanes `fill` (a row's last, partial vector).
Floats LoadPartial(const float* p, int64_t n, float fill) {
  Floats v = Floats{} + fill;
  for (int64_t l = 0; l < n; ++l) v[l] = p[l];
  return v;
}

void StorePartial(float* p, Floats v, int64_t n) {
  for (int64_t l = 0; l < n; ++l) p[l] = v[l];
}

float Max(Floats v) {
  float m = v[0];
  for (int64_t l = 1; l < kLanes; ++l) m = m > v[l] ? m : v[l];
  return m;
}

float Sum(Floats v) {
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += v[l];
  return total;
}

// exp(x) lane-wise for x in [kExpFloor, 88): 2^(x log2 e) = 2^n 2^f with n the nearest integer
// (rounded by adding 1.5 * 2^23, which leaves n in the low mantissa bits, whence 2^n's exponent
// bits) and |f| <= 1/2 (Taylor series of degree 7). Relative error about 1e-6 at x = -87
// (float32 rounding of x log2 e), 1e-7 near 0.
Floats Exp(Floats x) {
  const Floats t = x * 1.442695040888963f;
  const Floats rounded = t + 12582912.0f;
  const Floats f = t - (rounded - 12582912.0f);
  Floats p = Floats{} + 1.5252733804059840e-5f;
  p = p * f + 1.5403530393381608e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const Ints exponent = ((Ints)rounded - 0x4B400000 + 127) << 23;
  return p * (Floats)exponent;
}

// s += b over a row of n scores; returns the row's maximum.
float AddBiasMax(float* s, const float* b, int64_t n) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  Floats m = Floats{} - kInf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const Floats v = Load(s + j) + Load(b + j);
    Store(s + j, v);
    m = m > v ? m : v;
  }
  if (j < n) {
    const Floats v = LoadPartial(s + j, n - j, -kInf) + LoadPartial(b + j, n - j, 0.0f);
    StorePartial(s + j, v, n - j);
    m = m > v ? m : v;
  }
  return Max(m);
}

// exp(max(x - shift, kExpFloor)) lane-wise.
Floats ShiftedExp(Floats x, float shift) {
  x -= shift;
  return Exp(x < kExpFloor ? Floats{} + kExpFloor : x);  // a NaN stays NaN
}

// s = exp(s - shift) over a row of n scores, the exponent floored at kExpFloor; returns their sum.
float ShiftedExp(float* s, float shift, int64_t n) {
  Floats sum = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const Floats e = ShiftedExp(Load(s + j), shift);
    Store(s + j, e);
    sum += e;
  }
  if (j < n) {  // a partial last vector: its padding lanes are left out of the sum
    const Floats e = ShiftedExp(LoadPartial(s + j, n - j, 0.0f), shift);
    StorePartial(s + j, e, n - j);
    for (int64_t l = 0; l < n - j; ++l) sum[l] += e[l];
  }
  return Sum(sum);
}

// The attention operands of one call. q, o, do: (N, GL, D) for N = batch * kv heads items, whose
// GL = G * L rows are the G query heads sharing the item's kv head (q already scaled); k, v:
// (N, L, D); bias: (B, LB, L) additive, LB = 1 (one row for every query) or L; lse: (N, GL).
struct AttentionShape {
  int64_t items, rows, length, dim, bias_rows, items_per_batch;
  static constexpr int64_t kBlock = 128;  // query rows whose scores are in cache at once
  // A bias at or below this hides its key: exp(score + bias - max) is floored to exp(kExpFloor),
  // 1e-38, which adds nothing to a sum of at least 1.
  static constexpr float kHidden = -1e29f;

  // Keys [lo, hi) of a query row: from the first to the last key its bias leaves visible (those
  // outside add nothing). A row whose bias hides every key (a padding query) takes all of them
  // with equal weights, its scores set to 0: what the scores plus a bias of -1e30 give in
  // float32, whose log-sum-exp would then lose its log(L).
  struct Keys {
    int64_t lo, hi;
    bool any_visible;
    bool operator==(const Keys& other) const {
      return lo == other.lo && hi == other.hi && any_visible == other.any_visible;
    }
  };

  // The keys of each of `item`'s bias rows (LB of them).
  std::vector<Keys> VisibleKeys(const float* bias, int64_t item) const {
    std::vector<Keys> keys(bias_rows, Keys{0, length, false});
    for (int64_t r = 0; r < bias_rows; ++r) {
      const float* b = bias + ((item / items_per_batch) * bias_rows + r) * length;
      int64_t lo = 0, hi = length;
      while (lo < length && b[lo] <= kHidden) ++lo;
      while (hi > lo && b[hi - 1] <= kHidden) --hi;
      if (lo < hi) keys[r] = Keys{lo, hi, true};
    }
    return keys;
  }

  // The scores plus the bias of the n rows at s (n, hi - lo) from `Scores`, row r0 first; each
  // row's maximum into max_out.
  void AddBias(const float* bias, int64_t item, int64_t r0, int64_t n, const Keys& keys, float* s,
               float* max_out) const {
    const int64_t width = keys.hi - keys.lo;
    for (int64_t r = 0; r < n; ++r) {
      float* sr = s + r * width;
      if (keys.any_visible) {
        max_out[r] = AddBiasMax(sr, BiasRow(bias, item, r0 + r, keys.lo), width);
      } else {
        std::fill(sr, sr + width, 0.0f);
        max_out[r] = 0.0f;
      }
    }
  }

  // The keys of query row r, from `VisibleKeys`.
  const Keys& RowKeys(const std::vector<Keys>& keys, int64_t r) const {
    return keys[bias_rows == 1 ? 0 : r % length];
  }

  // The rows [r0, r0 + n) that share row r0's keys, n <= kBlock.
  int64_t RunOfRows(const std::vector<Keys>& keys, int64_t r0) const {
    int64_t n = 1;
    while (n < kBlock && r0 + n < rows && RowKeys(keys, r0 + n) == RowKeys(keys, r0)) ++n;
    return n;
  }

  // s (n, hi - lo) = q k^T for rows [r0, r0 + n) of `item` and its keys [lo, hi), without the
  // bias.
  void Scores(int64_t item, int64_t r0, int64_t n, const Keys& keys, const float* q,
              const float* k, float* s) const {
    const int64_t width = keys.hi - keys.lo;
    SmallGemm(false, true, n, width, dim, q + (item * rows + r0) * dim, dim,
              k + (item * length + keys.lo) * dim, dim, 0.0f, s, width);
  }

  // The bias row of row r of `item`, from key lo.
  const float* BiasRow(const float* bias, int64_t item, int64_t r, int64_t lo) const {
    const float* b = bias + (item / items_per_batch) * bias_rows * length + lo;
    return bias_rows == 1 ? b : b + (r % length) * length;
  }
};

// The shape of an attention call; false if the operands do not fit together.
bool CheckAttention(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                    ffi::Buffer<ffi::F32>& bias, AttentionShape* shape) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), bd = bias.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || bd.size() != 3 || kd[0] != qd[0] ||
      vd[0] != qd[0] || kd[2] != qd[2] || vd[1] != kd[1] || vd[2] != qd[2] || qd[1] % kd[1] ||
      bd[2] != kd[1] || (bd[1] != 1 && bd[1] != kd[1]) || bd[0] == 0 || qd[0] % bd[0]) {
    return false;
  }
  *shape = AttentionShape{qd[0], qd[1], kd[1], qd[2], bd[1], qd[0] / bd[0]};
  return true;
}

ffi::Error Attention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                     ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> o,
                     ffi::ResultBuffer<ffi::F32> lse) {
  AttentionShape a;
  if (!CheckAttention(q, k, v, bias, &a)) {
    return ffi::Error::InvalidArgument("mkl attention: operand shapes do not match");
  }
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(),
              *bp = bias.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  std::lock_guard<std::mutex> turn(mkl_turn);
  ParallelItems(a.items, [&](int64_t item) {
    std::vector<float> s(AttentionShape::kBlock * a.length), inv(AttentionShape::kBlock),
        m(AttentionShape::kBlock);
    const std::vector<AttentionShape::Keys> keys = a.VisibleKeys(bp, item);
    for (int64_t r0 = 0, n; r0 < a.rows; r0 += n) {
      n = a.RunOfRows(keys, r0);
      const AttentionShape::Keys& kr = a.RowKeys(keys, r0);
      const int64_t width = kr.hi - kr.lo;
      a.Scores(item, r0, n, kr, qp, kp, s.data());
      a.AddBias(bp, item, r0, n, kr, s.data(), m.data());
      for (int64_t r = 0; r < n; ++r) {  // unnormalized p = exp(s - max), one pass
        const float sum = ShiftedExp(s.data() + r * width, m[r], width);
        lp[item * a.rows + r0 + r] = m[r] + std::log(sum);
        inv[r] = 1.0f / sum;
      }
      float* out = op + (item * a.rows + r0) * a.dim;
      SmallGemm(false, false, n, a.dim, width, s.data(), width,
                vp + (item * a.length + kr.lo) * a.dim, a.dim, 0.0f, out, a.dim);
      // Normalized here, on D columns rather than on p's L.
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t c = 0; c < a.dim; ++c) out[r * a.dim + c] *= inv[r];
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error AttentionGrad(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias,
                         ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                         ffi::Buffer<ffi::F32> d_o, ffi::ResultBuffer<ffi::F32> dq,
                         ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  AttentionShape a;
  if (!CheckAttention(q, k, v, bias, &a)) {
    return ffi::Error::InvalidArgument("mkl attention: operand shapes do not match");
  }
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(),
              *bp = bias.typed_data(), *op = o.typed_data(), *lp = lse.typed_data(),
              *gp = d_o.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  std::lock_guard<std::mutex> turn(mkl_turn);
  ParallelItems(a.items, [&](int64_t item) {
    std::vector<float> p(AttentionShape::kBlock * a.length), dp(p.size()),
        m(AttentionShape::kBlock);
    const std::vector<AttentionShape::Keys> keys = a.VisibleKeys(bp, item);
    const int64_t kv = item * a.length * a.dim;
    // dk, dv accumulate over the row runs, each into its keys only.
    std::fill(dkp + kv, dkp + kv + a.length * a.dim, 0.0f);
    std::fill(dvp + kv, dvp + kv + a.length * a.dim, 0.0f);
    for (int64_t r0 = 0, n; r0 < a.rows; r0 += n) {
      n = a.RunOfRows(keys, r0);
      const AttentionShape::Keys& kr = a.RowKeys(keys, r0);
      const int64_t width = kr.hi - kr.lo, keys_at = kv + kr.lo * a.dim;
      const int64_t row = (item * a.rows + r0) * a.dim;
      a.Scores(item, r0, n, kr, qp, kp, p.data());
      a.AddBias(bp, item, r0, n, kr, p.data(), m.data());
      for (int64_t r = 0; r < n; ++r) {  // p = exp(s + bias - lse)
        ShiftedExp(p.data() + r * width, lp[item * a.rows + r0 + r], width);
      }
      // dp = do v^T; ds = p * (dp - rowsum(do * o)), written over dp.
      SmallGemm(false, true, n, width, a.dim, gp + row, a.dim, vp + keys_at, a.dim, 0.0f,
                dp.data(), width);
      for (int64_t r = 0; r < n; ++r) {
        const float *gr = gp + row + r * a.dim, *orow = op + row + r * a.dim;
        float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
        for (int64_t c = 0; c < a.dim; ++c) delta += gr[c] * orow[c];
        const float* pr = p.data() + r * width;
        float* dr = dp.data() + r * width;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) dr[j] = pr[j] * (dr[j] - delta);
      }
      SmallGemm(true, false, width, a.dim, n, p.data(), width, gp + row, a.dim, 1.0f,
                dvp + keys_at, a.dim);
      SmallGemm(false, false, n, a.dim, width, dp.data(), width, kp + keys_at, a.dim, 0.0f,
                dqp + row, a.dim);
      SmallGemm(true, false, width, a.dim, n, dp.data(), width, qp + row, a.dim, 1.0f,
                dkp + keys_at, a.dim);
    }
  });
  return ffi::Error::Success();
}

// `binding` with kArgs float32 buffer arguments, then kRets float32 buffer results (at least one
// of either). Each step returns the bound prvalue itself: XLA's Binding cannot be moved.
template <int kArgs, int kRets, typename Binding>
auto F32Buffers(Binding&& binding) {
  using F32 = ffi::Buffer<ffi::F32>;
  if constexpr (kArgs + kRets == 1) {
    if constexpr (kArgs == 1) {
      return std::move(binding).template Arg<F32>();
    } else {
      return std::move(binding).template Ret<F32>();
    }
  } else if constexpr (kArgs > 0) {
    return F32Buffers<kArgs - 1, kRets>(std::move(binding).template Arg<F32>());
  } else {
    return F32Buffers<0, kRets - 1>(std::move(binding).template Ret<F32>());
  }
}

}  // namespace

// The macro's argument is parenthesized: its template argument list holds a comma.
XLA_FFI_DEFINE_HANDLER_SYMBOL(LladaMklMatmul, Matmul,
                              (F32Buffers<2, 1>(ffi::Ffi::Bind())
                                   .Attr<bool>("trans_a")
                                   .Attr<bool>("trans_b")));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LladaMklAttention, Attention, (F32Buffers<4, 2>(ffi::Ffi::Bind())));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LladaMklAttentionGrad, AttentionGrad,
                              (F32Buffers<7, 3>(ffi::Ffi::Bind())));
