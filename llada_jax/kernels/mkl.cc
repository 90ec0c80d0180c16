// float32 kernels for XLA:CPU through the XLA FFI, on Intel oneMKL (libmkl_rt from the `mkl`
// wheel; linked when llada_jax/mkl.py builds this file):
//
// LladaMklMatmul: c = op(a) @ op(b), op = transpose where the attribute says so.
// LladaMklAttention / LladaMklAttentionGrad: softmax(q k^T + bias) v and its gradients, one
//   (batch, kv head) item at a time with the scores of a block of query rows kept in cache
//   (FlashAttention's recomputation: the backward rebuilds the probabilities from q, k and the
//   rows' log-sum-exp instead of reading an L x L map back from memory).
// Operands are row-major.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include <xmmintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The CBLAS entry points, declared here so that no MKL headers are needed (the `mkl` wheel ships
// only libraries). LP64 interface: integers are 32-bit.
extern "C" {
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
void vmsExp(int n, const float* a, float* r, long long mode);
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// vmsExp's mode: VML_LA (a few ulp, faster than VML_HA) | VML_ERRMODE_IGNORE | VML_FTZDAZ_ON.
constexpr long long kVmlMode = 0x1 | 0x100 | 0x280000;
// Exponents below this are raised to it, so that exp never underflows: VML's underflow path is
// ~20x slower, and masked scores (bias -1e30) would take it. exp(-87) = 1.6e-38 is 0 to any sum.
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

// max(x[0], ..., x[n - 1]) over 16 independent lanes, which the compiler vectorizes (a single
// running maximum is a serial dependency chain).
float RowMax(const float* x, int64_t n) {
  float lanes[16];
  for (int l = 0; l < 16; ++l) lanes[l] = x[0];
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int l = 0; l < 16; ++l) lanes[l] = lanes[l] > x[j + l] ? lanes[l] : x[j + l];
  }
  for (; j < n; ++j) lanes[0] = lanes[0] > x[j] ? lanes[0] : x[j];
  return *std::max_element(lanes, lanes + 16);
}

// The attention operands of one call. q, o, do: (N, GL, D) for N = batch * kv heads items, whose
// GL = G * L rows are the G query heads sharing the item's kv head (q already scaled); k, v:
// (N, L, D); bias: (B, LB, L) additive, LB = 1 (one row for every query) or L; lse: (N, GL).
struct AttentionShape {
  int64_t items, rows, length, dim, bias_rows, items_per_batch;
  static constexpr int64_t kBlock = 128;  // query rows whose scores are in cache at once

  // Scores of rows [r0, r0 + n) of `item` with the bias added: s (n, L) = q k^T + bias.
  void Scores(int64_t item, int64_t r0, int64_t n, const float* q, const float* k,
              const float* bias, float* s) const {
    cblas_sgemm(kRowMajor, kNoTrans, kTrans, n, length, dim, 1.0f, q + (item * rows + r0) * dim,
                dim, k + item * length * dim, dim, 0.0f, s, length);
    const float* b = bias + (item / items_per_batch) * bias_rows * length;
    for (int64_t r = 0; r < n; ++r) {
      const float* br = bias_rows == 1 ? b : b + ((r0 + r) % length) * length;
      float* sr = s + r * length;
      for (int64_t j = 0; j < length; ++j) sr[j] += br[j];
    }
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
    std::vector<float> s(AttentionShape::kBlock * a.length);
    for (int64_t r0 = 0; r0 < a.rows; r0 += AttentionShape::kBlock) {
      const int64_t n = std::min(AttentionShape::kBlock, a.rows - r0);
      a.Scores(item, r0, n, qp, kp, bp, s.data());
      for (int64_t r = 0; r < n; ++r) {
        float* sr = s.data() + r * a.length;
        const float m = RowMax(sr, a.length);
        for (int64_t j = 0; j < a.length; ++j) sr[j] = std::max(sr[j] - m, kExpFloor);
        lp[item * a.rows + r0 + r] = m;
      }
      vmsExp(n * a.length, s.data(), s.data(), kVmlMode);
      for (int64_t r = 0; r < n; ++r) {
        float* sr = s.data() + r * a.length;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < a.length; ++j) sum += sr[j];
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < a.length; ++j) sr[j] *= inv;
        lp[item * a.rows + r0 + r] += std::log(sum);
      }
      cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, n, a.dim, a.length, 1.0f, s.data(), a.length,
                  vp + item * a.length * a.dim, a.dim, 0.0f, op + (item * a.rows + r0) * a.dim,
                  a.dim);
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
    std::vector<float> p(AttentionShape::kBlock * a.length), dp(p.size());
    const int64_t kv = item * a.length * a.dim;
    for (int64_t r0 = 0; r0 < a.rows; r0 += AttentionShape::kBlock) {
      const int64_t n = std::min(AttentionShape::kBlock, a.rows - r0);
      const int64_t row = (item * a.rows + r0) * a.dim;
      a.Scores(item, r0, n, qp, kp, bp, p.data());
      for (int64_t r = 0; r < n; ++r) {  // p = exp(s - lse)
        float* pr = p.data() + r * a.length;
        const float l = lp[item * a.rows + r0 + r];
        for (int64_t j = 0; j < a.length; ++j) pr[j] = std::max(pr[j] - l, kExpFloor);
      }
      vmsExp(n * a.length, p.data(), p.data(), kVmlMode);
      // dp = do v^T; ds = p * (dp - rowsum(do * o)), written over dp.
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, n, a.length, a.dim, 1.0f, gp + row, a.dim,
                  vp + kv, a.dim, 0.0f, dp.data(), a.length);
      for (int64_t r = 0; r < n; ++r) {
        const float *gr = gp + row + r * a.dim, *orow = op + row + r * a.dim;
        float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
        for (int64_t c = 0; c < a.dim; ++c) delta += gr[c] * orow[c];
        const float* pr = p.data() + r * a.length;
        float* dr = dp.data() + r * a.length;
        for (int64_t j = 0; j < a.length; ++j) dr[j] = pr[j] * (dr[j] - delta);
      }
      const float beta = r0 == 0 ? 0.0f : 1.0f;  // dk, dv accumulate over the row blocks
      cblas_sgemm(kRowMajor, kTrans, kNoTrans, a.length, a.dim, n, 1.0f, p.data(), a.length,
                  gp + row, a.dim, beta, dvp + kv, a.dim);
      cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, n, a.dim, a.length, 1.0f, dp.data(), a.length,
                  kp + kv, a.dim, 0.0f, dqp + row, a.dim);
      cblas_sgemm(kRowMajor, kTrans, kNoTrans, a.length, a.dim, n, 1.0f, dp.data(), a.length,
                  qp + row, a.dim, beta, dkp + kv, a.dim);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LladaMklMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LladaMklAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LladaMklAttentionGrad, AttentionGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
