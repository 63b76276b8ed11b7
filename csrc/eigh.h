// Input checks shared by the CPU (csrc/eigh.cpp) and CUDA (csrc/cuda/eigh_cuda.cu) implementations of
// fop_kernels::eigh, damped_inverse and eigh_refresh. Host-only: shapes, dtypes and devices, never values
// (value checks -- finite, symmetric -- run inside each implementation, next to the data).
#pragma once

#include <ATen/ATen.h>

#include "eigh_small.h"

#include <tuple>
#include <vector>

namespace fop_kernels {

// |M - M^T| must stay within this fraction of max|M| (the same rule as fop_kernels/ops/eigh.py).
constexpr double kSymmetryRtol = 1e-4;

// Every entry a square float32/float64 matrix, all of one dtype and device; errors name `name[i]`.
inline void check_square_list(at::TensorList mats, const char* op, const char* name) {
  TORCH_CHECK(!mats.empty(), op, ": ", name, " is empty; expected at least one matrix");
  const auto dtype = mats[0].scalar_type();
  const auto device = mats[0].device();
  for (size_t i = 0; i < mats.size(); ++i) {
    const at::Tensor& m = mats[i];
    TORCH_CHECK(m.dim() == 2, op, ": ", name, "[", i, "] must be 2-D, got shape ", m.sizes());
    TORCH_CHECK(m.size(0) == m.size(1), op, ": ", name, "[", i, "] is not square: shape ", m.sizes());
    TORCH_CHECK(m.size(0) > 0, op, ": ", name, "[", i, "] is empty (0 x 0)");
    TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble, op, ": ", name, "[", i,
                "] has unsupported dtype ", m.scalar_type(), "; expected float32 or float64");
    TORCH_CHECK(m.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ", m.scalar_type(), " but ", name,
                "[0] has ", dtype, "; use one dtype");
    TORCH_CHECK(m.device() == device, op, ": ", name, "[", i, "] is on ", m.device(), " but ", name, "[0] is on ",
                device);
  }
}

// `others[i]` must match `mats[i]` in dtype and device and have shape n (vectors) or n x n (matrices).
inline void check_companion_list(at::TensorList mats, at::TensorList others, const char* op, const char* name,
                                 bool vectors) {
  TORCH_CHECK(others.size() == mats.size(), op, ": ", name, " holds ", others.size(), " tensors for ", mats.size(),
              " matrices");
  for (size_t i = 0; i < mats.size(); ++i) {
    const int64_t n = mats[i].size(0);
    const at::Tensor& t = others[i];
    const bool shape_ok = vectors ? (t.dim() == 1 && t.size(0) == n)
                                  : (t.dim() == 2 && t.size(0) == n && t.size(1) == n);
    TORCH_CHECK(shape_ok, op, ": ", name, "[", i, "] has shape ", t.sizes(), ", expected ",
                vectors ? "(n,)" : "(n, n)", " with n = ", n, " like mats[", i, "]");
    TORCH_CHECK(t.scalar_type() == mats[i].scalar_type(), op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                " but mats[", i, "] has ", mats[i].scalar_type());
    TORCH_CHECK(t.device() == mats[i].device(), op, ": ", name, "[", i, "] is on ", t.device(), " but mats[", i,
                "] is on ", mats[i].device());
  }
}

// Batched eigenbasis refresh on (k, n, n) matrices M and previous eigenvectors Q (pure ATen: CPU and CUDA).
// `iters` steps of subspace iteration from Q0, columns ordered by decreasing Rayleigh quotient before each QR
// (so that the dominant directions are orthogonalized first), then l = diag(Q^T M Q), sorted ascending.
inline std::tuple<at::Tensor, at::Tensor> refresh_batch(const at::Tensor& m, at::Tensor q, int64_t iters) {
  for (int64_t it = 0; it < iters; ++it) {
    at::Tensor mq = at::matmul(m, q);
    const at::Tensor order = (q * mq).sum(-2).argsort(/*dim=*/-1, /*descending=*/true);
    mq = mq.gather(-1, order.unsqueeze(-2).expand_as(mq));
    q = std::get<0>(at::linalg_qr(mq));
  }
  const at::Tensor rq = (q * at::matmul(m, q)).sum(-2);
  auto [l, order] = rq.sort(/*dim=*/-1);
  return {l, q.gather(-1, order.unsqueeze(-2).expand_as(q))};
}

}  // namespace fop_kernels
