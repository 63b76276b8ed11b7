// Batched conjugate gradient for FROG's row-wise systems on CPU (formulas in fop_kernels/reference/cg.py).
// ATen headers only.
//
//   batched_cg(X_s, row_weights, B, damping, iters, tol, x0?) -> (X, residual norms)
//
// Per iteration: two GEMMs over X_s into preallocated buffers (T = (X_s P^T) * w^, Ap = T^T X_s), then one
// parallel loop over rows that does the whole CG vector step of a row while it sits in cache:
//   Ap_r += damping p_r; alpha = rs_r / <p_r, Ap_r>; x_r += alpha p_r; r_r -= alpha Ap_r;
//   beta = |r_r|^2 / rs_r; p_r = r_r + beta p_r; rs_r = |r_r|^2.
// Rows with rs_r <= (tol |b_r|)^2 are frozen (skipped).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

constexpr double kTraceEps = 1e-10;

template <typename T>
void cg_row_steps(T* x, T* r, T* p, T* ap, T* rs, const T* threshold, int64_t rows, int64_t dim, T damping) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (!(rs[row] > threshold[row])) continue;
      T* xr = x + row * dim;
      T* rr = r + row * dim;
      T* pr = p + row * dim;
      T* apr = ap + row * dim;
      T pap = 0;
      for (int64_t j = 0; j < dim; ++j) {
        apr[j] += damping * pr[j];
        pap += pr[j] * apr[j];
      }
      const T alpha = pap > 0 ? rs[row] / pap : T(0);
      T rs_new = 0;
      for (int64_t j = 0; j < dim; ++j) {
        xr[j] += alpha * pr[j];
        rr[j] -= alpha * apr[j];
        rs_new += rr[j] * rr[j];
      }
      const T beta = rs[row] > 0 ? rs_new / rs[row] : T(0);
      for (int64_t j = 0; j < dim; ++j) pr[j] = rr[j] + beta * pr[j];
      rs[row] = rs_new;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> batched_cg(const at::Tensor& X_s_in, const at::Tensor& row_weights,
                                              const at::Tensor& B, double damping, int64_t iters, double tol,
                                              const std::optional<at::Tensor>& x0) {
  TORCH_CHECK(X_s_in.dim() == 2 && row_weights.dim() == 2 && B.dim() == 2, "X_s, row_weights, B must be 2-D");
  const at::ScalarType dt = B.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto X_s = X_s_in.to(dt).contiguous();
  const int64_t s = X_s.size(0), D = X_s.size(1), R = B.size(0);
  TORCH_CHECK(row_weights.size(0) == s && row_weights.size(1) == R && B.size(1) == D, "shape mismatch");
  // w^ = w / (t_r + eps) / s with t_r = sum_n w[n, r] |x_n|^2 / (s D)
  const auto w = row_weights.to(dt);
  const auto t = (w * X_s.square().sum(1).unsqueeze(1)).sum(0) / static_cast<double>(s * D);
  const auto w_hat = (w / (t + kTraceEps) / static_cast<double>(s)).contiguous();
  const auto Bf = B.to(dt).contiguous();
  auto T = at::empty({s, R}, X_s.options());
  auto Ap = at::empty({R, D}, X_s.options());
  at::Tensor x, r;
  if (x0.has_value()) {
    x = x0->to(dt).contiguous().clone();
    at::mm_out(T, X_s, x.t()).mul_(w_hat);
    at::mm_out(Ap, T.t(), X_s);
    r = Bf - Ap - damping * x;
  } else {
    x = at::zeros({R, D}, X_s.options());
    r = Bf.clone();
  }
  auto p = r.clone();
  auto rs = (r * r).sum(1).contiguous();
  const auto threshold = (Bf.norm(2, {1}) * tol).square().contiguous();
  for (int64_t it = 0; it < iters; ++it) {
    at::mm_out(T, X_s, p.t()).mul_(w_hat);
    at::mm_out(Ap, T.t(), X_s);
    AT_DISPATCH_FLOATING_TYPES(dt, "fop_kernels_cg_row_steps", [&] {
      cg_row_steps<scalar_t>(x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
                             Ap.data_ptr<scalar_t>(), rs.data_ptr<scalar_t>(), threshold.const_data_ptr<scalar_t>(),
                             R, D, static_cast<scalar_t>(damping));
    });
  }
  return {x.to(B.scalar_type()), rs.sqrt()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fop_kernels, m) {
  m.def(
      "batched_cg(Tensor X_s, Tensor row_weights, Tensor B, float damping, int iters, float tol, Tensor? x0) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fop_kernels, CPU, m) { m.impl("batched_cg", &batched_cg); }
