// Batched float32 matmul for XLA:CPU through the XLA FFI, computed by Intel oneMKL's CBLAS
// (libmkl_rt, from the `mkl` wheel; linked when llada_jax/cpu_blas.py builds this file).
//
// c[i] = op(a[i]) @ op(b[i]) for i < batch, op = transpose where the attribute says so. Operands
// are row-major (batch, rows, cols); a batch of 1 is one cblas_sgemm call, more is one
// cblas_sgemm_batch_strided call, which MKL spreads over its threads.
#include <cstdint>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The CBLAS entry points, declared here so that no MKL headers are needed (the `mkl` wheel ships
// only libraries). LP64 interface: integers are 32-bit.
extern "C" {
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
void cblas_sgemm_batch_strided(int layout, int trans_a, int trans_b, int m, int n, int k,
                               float alpha, const float* a, int lda, int stride_a,
                               const float* b, int ldb, int stride_b, float beta, float* c,
                               int ldc, int stride_c, int batch);
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// XLA runs independent thunks concurrently (a backward's dX and dW matmuls); two MKL calls
// whose thread teams each expect all the cores would oversubscribe them, so calls take turns.
std::mutex mkl_turn;

ffi::Error BatchedMatmul(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                         ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 3 || bd.size() != 3 || cd.size() != 3) {
    return ffi::Error::InvalidArgument("cpu_blas: operands must be rank 3 (batch, rows, cols)");
  }
  const int64_t batch = ad[0], m = cd[1], n = cd[2];
  const int64_t k = trans_a ? ad[1] : ad[2];
  if (bd[0] != batch || cd[0] != batch || (trans_a ? ad[2] : ad[1]) != m ||
      (trans_b ? bd[1] : bd[2]) != n || (trans_b ? bd[2] : bd[1]) != k) {
    return ffi::Error::InvalidArgument("cpu_blas: operand shapes do not match");
  }
  const int lda = static_cast<int>(ad[2]), ldb = static_cast<int>(bd[2]);
  const int ta = trans_a ? kTrans : kNoTrans, tb = trans_b ? kTrans : kNoTrans;
  std::lock_guard<std::mutex> turn(mkl_turn);
  if (batch == 1) {
    cblas_sgemm(kRowMajor, ta, tb, m, n, k, 1.0f, a.typed_data(), lda, b.typed_data(), ldb, 0.0f,
                c->typed_data(), n);
  } else {
    cblas_sgemm_batch_strided(kRowMajor, ta, tb, m, n, k, 1.0f, a.typed_data(), lda,
                              static_cast<int>(ad[1] * ad[2]), b.typed_data(), ldb,
                              static_cast<int>(bd[1] * bd[2]), 0.0f, c->typed_data(), n,
                              static_cast<int>(m * n), static_cast<int>(batch));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LladaMklMatmul, BatchedMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
