// Kronecker-factor accumulation on CPU (formulas in fop_kernels/reference/factor.py). ATen headers only.
//
//   accumulate_factor_(F, X, decay, coef)       F <- (1-decay) F + coef X^T X
//   accumulate_factor_diag_(f, X, decay, coef)  f <- (1-decay) f + coef sum_n X_n^2
//   accumulate_conv_factor_(F, x, decay, coef, kernel_size, stride, padding, dilation, bias)
//                                               F <- (1-decay) F + coef P^T P, P the im2col patches (+ bias column)
//   accumulate_conv_factor_diag_(f, x, ...)     f <- (1-decay) f + coef sum over patches of P^2, without im2col
//
// X^T X is a tiled syrk: only the upper-triangle tiles are computed (one GEMM each, in one parallel region) and
// mirrored, so about half the flops of a full GEMM for large d. decay == 1 never reads the state (BLAS beta = 0). Accumulation in float32, float64 when the
// state or the input is float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace {

at::ScalarType accumulation_type(const at::Tensor& state, const at::Tensor& x) {
  return (state.scalar_type() == at::kDouble || x.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

// dst <- beta dst + alpha G (dst not read when beta == 0).
void ema_block(at::Tensor dst, const at::Tensor& G, double beta, double alpha) {
  if (beta == 0.0) {
    dst.copy_(G);
    dst.mul_(alpha);
  } else {
    dst.mul_(beta).add_(G, alpha);
  }
}

// F[i0 + a, j0 + b] <- beta F[..] + alpha G[a, b] and, when mirror, F[j0 + b, i0 + a] likewise (G: bi x bj,
// contiguous). F is not read when beta == 0.
template <typename scalar_t>
void tile_ema(scalar_t* F, int64_t s0, int64_t s1, const scalar_t* G, int64_t i0, int64_t j0, int64_t bi, int64_t bj,
              double beta, double alpha, bool mirror) {
  const scalar_t b = static_cast<scalar_t>(beta), a = static_cast<scalar_t>(alpha);
  for (int64_t r = 0; r < bi; ++r) {
    for (int64_t c = 0; c < bj; ++c) {
      const scalar_t g = a * G[r * bj + c];
      scalar_t& up = F[(i0 + r) * s0 + (j0 + c) * s1];
      up = beta == 0.0 ? g : b * up + g;
      if (mirror) {
        scalar_t& low = F[(j0 + c) * s0 + (i0 + r) * s1];
        low = beta == 0.0 ? g : b * low + g;
      }
    }
  }
}

// F <- beta F + alpha X^T X over the upper-triangle tiles (bi <= bj) only, each mirrored into (bj, bi): about half
// the flops of a full GEMM. One parallel region over the tiles; each tile is one single-threaded GEMM (N x b x b)
// into a thread-local buffer followed by the EMA, so there is one fork/join per call (a loaded 2-core machine
// punishes a fork/join per block).
void syrk_ema(at::Tensor& F, const at::Tensor& X, double beta, double alpha) {
  const int64_t d = X.size(1);
  const int64_t block = d >= 2048 ? 256 : 128;
  const int64_t tiles = (d + block - 1) / block;
  if (tiles == 1) {  // one tile: let BLAS use every thread
    F.addmm_(X.t(), X, beta, alpha);
    return;
  }
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t j = 0; j < tiles; ++j)
    for (int64_t i = 0; i <= j; ++i) pairs.emplace_back(i, j);
  const at::ScalarType state_type = F.scalar_type();
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = pairs[t].first * block, j0 = pairs[t].second * block;
      const int64_t bi = std::min(block, d - i0), bj = std::min(block, d - j0);
      auto G = at::mm(X.narrow(1, i0, bi).t(), X.narrow(1, j0, bj)).to(state_type).contiguous();
      AT_DISPATCH_FLOATING_TYPES(state_type, "fop_kernels_tile_ema", [&] {
        tile_ema<scalar_t>(F.data_ptr<scalar_t>(), F.stride(0), F.stride(1), G.const_data_ptr<scalar_t>(), i0, j0,
                           bi, bj, beta, alpha, i0 != j0);
      });
    }
  });
}

void check_state(const at::Tensor& state, const char* name) {
  TORCH_CHECK(state.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(state.scalar_type() == at::kFloat || state.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", state.scalar_type());
}

void accumulate_factor_(at::Tensor F, const at::Tensor& X, double decay, double coef) {
  check_state(F, "F");
  TORCH_CHECK(X.dim() == 2 && F.dim() == 2 && F.size(0) == X.size(1) && F.size(1) == X.size(1),
              "F must be d x d for X of shape N x d");
  if (X.size(1) == 0) return;
  const auto Xa = X.to(accumulation_type(F, X));
  if (F.scalar_type() == Xa.scalar_type()) {
    syrk_ema(F, Xa, 1.0 - decay, coef);
  } else {  // float64 input into a float32 state: the single-tile path would need one dtype
    auto G = at::zeros({Xa.size(1), Xa.size(1)}, Xa.options());
    syrk_ema(G, Xa, 0.0, 1.0);
    ema_block(F, G, 1.0 - decay, coef);
  }
}

// out[j] = sum_n X[n, j]^2 in acc_t; row blocks in parallel, per-thread partial vectors.
template <typename scalar_t, typename acc_t>
void column_sumsq(const at::Tensor& X, acc_t* out) {
  const int64_t N = X.size(0), d = X.size(1), sn = X.stride(0), sd = X.stride(1);
  const scalar_t* x = X.const_data_ptr<scalar_t>();
  const int nthreads = at::get_num_threads();
  std::vector<acc_t> partial(static_cast<size_t>(nthreads) * d, acc_t(0));
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    acc_t* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * d;
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = x + n * sn;
      for (int64_t j = 0; j < d; ++j) {
        const acc_t v = static_cast<acc_t>(row[j * sd]);
        acc[j] += v * v;
      }
    }
  });
  for (int64_t j = 0; j < d; ++j) out[j] = acc_t(0);
  for (int t = 0; t < nthreads; ++t)
    for (int64_t j = 0; j < d; ++j) out[j] += partial[static_cast<size_t>(t) * d + j];
}

// f <- beta f + alpha sums (f not read when beta == 0).
template <typename acc_t>
void ema_vector(at::Tensor& f, const acc_t* sums, int64_t count, double beta, double alpha) {
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "fop_kernels_ema_vector", [&] {
    scalar_t* out = f.data_ptr<scalar_t>();
    const int64_t stride = f.stride(0);
    for (int64_t j = 0; j < count; ++j) {
      const double old = beta == 0.0 ? 0.0 : beta * static_cast<double>(out[j * stride]);
      out[j * stride] = static_cast<scalar_t>(old + alpha * static_cast<double>(sums[j]));
    }
  });
}

void accumulate_factor_diag_(at::Tensor f, const at::Tensor& X, double decay, double coef) {
  check_state(f, "f");
  TORCH_CHECK(X.dim() == 2 && f.dim() == 1 && f.size(0) == X.size(1), "f must have length d for X of shape N x d");
  const int64_t d = X.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "fop_kernels_factor_diag", [&] {
    if (accumulation_type(f, X) == at::kDouble) {
      std::vector<double> sums(d);
      column_sumsq<scalar_t, double>(X, sums.data());
      ema_vector(f, sums.data(), d, 1.0 - decay, coef);
    } else {
      std::vector<float> sums(d);
      column_sumsq<scalar_t, float>(X, sums.data());
      ema_vector(f, sums.data(), d, 1.0 - decay, coef);
    }
  });
}

struct Geometry {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
};

Geometry geometry(const at::Tensor& x, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d) {
  TORCH_CHECK(k.size() == 2 && s.size() == 2 && p.size() == 2 && d.size() == 2, "conv geometry must be pairs");
  Geometry g{k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1], 0, 0};
  g.oh = (x.size(2) + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.ow = (x.size(3) + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.oh >= 1 && g.ow >= 1, "the kernel does not fit the padded input");
  return g;
}

void accumulate_conv_factor_(at::Tensor F, const at::Tensor& x, double decay, double coef, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool bias) {
  check_state(F, "F");
  TORCH_CHECK(x.dim() == 4, "x must be N x C x H x W");
  const Geometry g = geometry(x, kernel_size, stride, padding, dilation);
  const int64_t D = x.size(1) * g.kh * g.kw, N = x.size(0), L = g.oh * g.ow;
  TORCH_CHECK(F.dim() == 2 && F.size(0) == D + bias && F.size(1) == D + bias, "F must be (C kh kw [+1])^2");
  auto xa = x.to(accumulation_type(F, x));
  auto cols = at::im2col(xa, {g.kh, g.kw}, {g.dh, g.dw}, {g.ph, g.pw}, {g.sh, g.sw});  // N x D x L
  auto P = cols.transpose(1, 2).reshape({N * L, D});
  auto FD = F.narrow(0, 0, D).narrow(1, 0, D);
  accumulate_factor_(FD, P, decay, coef);
  if (bias) {  // P^T 1 = column sums of the patches; 1^T 1 = N L
    auto colsum = P.sum(0);
    ema_block(F.narrow(0, D, 1).squeeze(0).narrow(0, 0, D), colsum, 1.0 - decay, coef);
    ema_block(F.narrow(1, D, 1).squeeze(1).narrow(0, 0, D), colsum, 1.0 - decay, coef);
    auto corner = F.narrow(0, D, 1).narrow(1, D, 1);
    const double old = decay == 1.0 ? 0.0 : (1.0 - decay) * corner.item<double>();
    corner.fill_(old + coef * static_cast<double>(N * L));
  }
}

// sums[c kh kw + i kw + j] = sum_n sum_{oh, ow} x[n, c, oh sh - ph + i dh, ow sw - pw + j dw]^2 (inside the image):
// the per-channel image of sum_n x^2, summed over the window each kernel tap sees. No im2col.
template <typename scalar_t, typename acc_t>
void conv_diag_sums(const at::Tensor& x, const Geometry& g, acc_t* sums) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sq(static_cast<size_t>(H * W));
    for (int64_t c = begin; c < end; ++c) {
      std::fill(sq.begin(), sq.end(), acc_t(0));
      for (int64_t n = 0; n < N; ++n)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) {
            const acc_t v = static_cast<acc_t>(xp[n * sn + c * sc + h * sh + w * sw]);
            sq[h * W + w] += v * v;
          }
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j) {
          acc_t total = 0;
          for (int64_t oh = 0; oh < g.oh; ++oh) {
            const int64_t ih = oh * g.sh - g.ph + i * g.dh;
            if (ih < 0 || ih >= H) continue;
            for (int64_t ow = 0; ow < g.ow; ++ow) {
              const int64_t iw = ow * g.sw - g.pw + j * g.dw;
              if (iw >= 0 && iw < W) total += sq[ih * W + iw];
            }
          }
          sums[(c * g.kh + i) * g.kw + j] = total;
        }
    }
  });
}

void accumulate_conv_factor_diag_(at::Tensor f, const at::Tensor& x, double decay, double coef,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, bool bias) {
  check_state(f, "f");
  TORCH_CHECK(x.dim() == 4, "x must be N x C x H x W");
  const Geometry g = geometry(x, kernel_size, stride, padding, dilation);
  const int64_t D = x.size(1) * g.kh * g.kw;
  TORCH_CHECK(f.dim() == 1 && f.size(0) == D + bias, "f must have length C kh kw [+1]");
  const double bias_sum = static_cast<double>(x.size(0) * g.oh * g.ow);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fop_kernels_conv_diag", [&] {
    if (accumulation_type(f, x) == at::kDouble) {
      std::vector<double> sums(D + bias);
      conv_diag_sums<scalar_t, double>(x, g, sums.data());
      if (bias) sums[D] = bias_sum;
      ema_vector(f, sums.data(), D + bias, 1.0 - decay, coef);
    } else {
      std::vector<float> sums(D + bias);
      conv_diag_sums<scalar_t, float>(x, g, sums.data());
      if (bias) sums[D] = static_cast<float>(bias_sum);
      ema_vector(f, sums.data(), D + bias, 1.0 - decay, coef);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fop_kernels, m) {
  m.def("accumulate_factor_(Tensor(a!) F, Tensor X, float decay, float coef) -> ()");
  m.def("accumulate_factor_diag_(Tensor(a!) f, Tensor X, float decay, float coef) -> ()");
  m.def(
      "accumulate_conv_factor_(Tensor(a!) F, Tensor x, float decay, float coef, int[] kernel_size, int[] stride, "
      "int[] padding, int[] dilation, bool bias) -> ()");
  m.def(
      "accumulate_conv_factor_diag_(Tensor(a!) f, Tensor x, float decay, float coef, int[] kernel_size, "
      "int[] stride, int[] padding, int[] dilation, bool bias) -> ()");
}

TORCH_LIBRARY_IMPL(fop_kernels, CPU, m) {
  m.impl("accumulate_factor_", &accumulate_factor_);
  m.impl("accumulate_factor_diag_", &accumulate_factor_diag_);
  m.impl("accumulate_conv_factor_", &accumulate_conv_factor_);
  m.impl("accumulate_conv_factor_diag_", &accumulate_conv_factor_diag_);
}
