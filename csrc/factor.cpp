// Kronecker-factor accumulation on CPU (formulas in fop_kernels/reference/factor.py). ATen headers only.
//
//   accumulate_factor_(F, [X...], decay, coef)  F <- (1-decay) F + coef X^T X, X the rows of all tensors
//   accumulate_factor_diag_(f, X, decay, coef)  f <- (1-decay) f + coef sum_n X_n^2
//   accumulate_conv_factor_(F, x, decay, coef, kernel_size, stride, padding, dilation, bias, method)
//                                               F <- (1-decay) F + coef P^T P, P the im2col patches (+ bias column),
//                                               by shifted correlations (stride 1) or gathered patches
//   accumulate_conv_factor_diag_(f, x, ...)     f <- (1-decay) f + coef sum over patches of P^2, without im2col
//
// X^T X is a tiled syrk: only the upper-triangle tiles are computed (one GEMM each, in one parallel region) and
// mirrored, so about half the flops of a full GEMM for large d. decay == 1 never reads the state (BLAS beta = 0).
// Accumulation in float32, float64 when the state or the input is float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <map>
#include <set>
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

// Bytes of input copied at a time: inputs that must be copied (a dtype change, rows that are not one strided
// matrix, a conv's padded or gathered images) are processed in chunks of about this size, so no temporary the size of
// the input is made. glibc's malloc maps every block above 32 MiB fresh from the kernel and unmaps it on free, so a
// batch-sized temporary is page-faulted in on every call; on the 2-core test machine those faults cost more than the
// GEMMs (bench/RESULTS.md, "Chunked factor inputs").
constexpr int64_t kChunkBytes = int64_t{16} << 20;

// fn(rows) over X (..., d), d > 0, as row matrices in `type`: X itself when it is one strided matrix of that type,
// else consecutive chunks of its first dimension copied into one reused buffer of about kChunkBytes. Called at least
// once (with zero rows for an empty X).
template <typename Fn>
void for_row_chunks(const at::Tensor& X, at::ScalarType type, Fn&& fn) {
  const int64_t d = X.size(-1);
  if (X.scalar_type() == type && X.dim() == 2) return fn(X);
  if (X.scalar_type() == type && X.is_contiguous()) return fn(X.view({-1, d}));
  const int64_t lead = X.size(0), rows_per_lead = lead == 0 ? 0 : X.numel() / lead / d;
  const int64_t lead_bytes = std::max<int64_t>(1, rows_per_lead * d * at::elementSize(type));
  const int64_t step = std::clamp(kChunkBytes / lead_bytes, int64_t{1}, std::max<int64_t>(lead, 1));
  auto buffer = at::empty({std::min(step, lead) * rows_per_lead, d}, X.options().dtype(type));
  for (int64_t s = 0; s == 0 || s < lead; s += step) {
    const auto chunk = X.narrow(0, s, std::min(step, lead - s));
    auto rows = buffer.narrow(0, 0, chunk.size(0) * rows_per_lead);
    rows.view(chunk.sizes()).copy_(chunk);
    fn(rows);
  }
}

// X: the rows, in one or more (..., d) tensors. The Gram of all of them is accumulated before the EMA touches a
// state of another dtype, so a float32 state is rounded once however the rows are split.
void accumulate_factor_(at::Tensor F, at::TensorList X, double decay, double coef) {
  check_state(F, "F");
  TORCH_CHECK(!X.empty(), "X must hold at least one tensor of rows");
  auto type = at::kFloat;
  for (const auto& x : X) {
    TORCH_CHECK(x.dim() >= 2 && F.dim() == 2 && F.size(0) == x.size(-1) && F.size(1) == x.size(-1),
                "F must be d x d for X of shape (..., d)");
    if (accumulation_type(F, x) == at::kDouble) type = at::kDouble;
  }
  const int64_t d = F.size(0);
  if (d == 0) return;
  const bool direct = F.scalar_type() == type;  // else a float64 Gram, then one EMA into the float32 state
  auto target = direct ? F : at::empty({d, d}, F.options().dtype(type));
  bool first = true;
  for (const auto& x : X)
    for_row_chunks(x, type, [&](const at::Tensor& rows) {
      syrk_ema(target, rows, first ? (direct ? 1.0 - decay : 0.0) : 1.0, direct ? coef : 1.0);
      first = false;
    });
  if (!direct) ema_block(F, target, 1.0 - decay, coef);
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

// Whether kernel tap `i` of an axis (first read position i d - p, then every s) reads a pixel inside [0, size) for
// any of the `out` outputs; a tap that never does multiplies zero padding alone: its patch columns are exactly zero.
bool tap_reads_image(int64_t i, int64_t d, int64_t p, int64_t s, int64_t out, int64_t size) {
  for (int64_t o = 0; o < out; ++o) {
    const int64_t q = o * s - p + i * d;
    if (q >= 0 && q < size) return true;
  }
  return false;
}

// A conv factor's Gram as computed: `G` in the factor's (c, i, j) order (D x D), or, when `live` is set, the Gram
// of the patch columns of the taps in `live` alone, in (tap, c) order ((n C) x (n C)); the other taps' rows and
// columns of P^T P are zero.
struct ConvGram {
  at::Tensor G;
  std::vector<int64_t> live;
  bool by_tap = false;

  void add(const ConvGram& part) { G.add_(part.G); }
};

// The Gram of the patch matrix from a channels-last copy of the padded input viewed as (N, oh, ow, kh, kw, C)
// patches: one contiguous gather (no at::im2col, whose N x D x L layout needs a second transposing copy), then the
// tiled syrk over the taps that read the image. Any stride. Taps that see only padding (the off-centre taps of a
// 3x3 conv on a 1x1 map: 8 of 9) have zero columns: the syrk skips them, so the work and the result are
// (live taps x C)^2, not D^2 (by tap: no D x D temporary; ema_conv_gram places the blocks).
ConvGram gram_by_patches(const at::Tensor& x, const Geometry& g) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto xp = at::zeros({N, H + 2 * g.ph, W + 2 * g.pw, C}, x.options());
  xp.narrow(1, g.ph, H).narrow(2, g.pw, W).copy_(x.permute({0, 2, 3, 1}));
  const int64_t sN = xp.stride(0), sH = xp.stride(1), sW = xp.stride(2);
  auto P = xp.as_strided({N, g.oh, g.ow, g.kh, g.kw, C}, {sN, g.sh * sH, g.sw * sW, g.dh * sH, g.dw * sW, 1})
               .reshape({N * g.oh * g.ow, g.kh * g.kw, C});
  ConvGram out;
  out.by_tap = true;
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j)
      if (tap_reads_image(i, g.dh, g.ph, g.sh, g.oh, H) && tap_reads_image(j, g.dw, g.pw, g.sw, g.ow, W))
        out.live.push_back(i * g.kw + j);
  const int64_t n = static_cast<int64_t>(out.live.size());
  out.G = at::empty({n * C, n * C}, x.options());
  if (n == 0) return out;
  const auto rows = n == g.kh * g.kw ? P : P.index_select(1, at::tensor(out.live, x.options().dtype(at::kLong)));
  syrk_ema(out.G, rows.reshape({N * g.oh * g.ow, n * C}), 0.0, 1.0);
  return out;
}

// F (D x D, the factor's (c, i, j) order) <- beta F + alpha P^T P from `gram`; F is not read when beta == 0. A Gram by
// tap is added block by block where its taps go (all taps: one permuted add), the rest of F only scaled.
void ema_conv_gram(at::Tensor F, const ConvGram& gram, int64_t C, int64_t T, double beta, double alpha) {
  if (!gram.by_tap) return ema_block(F, gram.G, beta, alpha);
  if (beta == 0.0)
    F.zero_();
  else if (beta != 1.0)
    F.mul_(beta);
  const int64_t n = static_cast<int64_t>(gram.live.size());
  if (n == 0) return;
  auto Fv = F.view({C, T, C, T});
  const auto Gv = gram.G.view({n, C, n, C});
  if (n == T) {
    Fv.add_(Gv.permute({1, 0, 3, 2}), alpha);
    return;
  }
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = 0; b < n; ++b)
      Fv.select(3, gram.live[b]).select(1, gram.live[a]).add_(Gv.select(2, b).select(0, a), alpha);
}

// [begin, end) of the image rows (or columns) that a stride-1 kernel tap starting at `first` reads for `out` outputs.
std::pair<int64_t, int64_t> tap_window(int64_t first, int64_t out, int64_t size) {
  return {std::clamp(first, int64_t{0}, size), std::clamp(first + out, int64_t{0}, size)};
}

// K[c, c', di + kh - 1, dj + kw - 1] = sum_n sum_{q in [h0, h1) x [w0, w1)} x[n, c, q] x[n, c', q + (di dh, dj dw)]
// (x = 0 outside the image) for every |di| < kh, |dj| < kw at once: the weight gradient of a stride-1 convolution
// whose output gradient is x on the rectangle and whose input is x zero-padded by (kh - 1) dh, (kw - 1) dw around
// it, with a (2 kh - 1) x (2 kw - 1) kernel dilated like the layer's. `padded` is x with that padding.
at::Tensor rect_correlations(const at::Tensor& x, const at::Tensor& padded, const Geometry& g, int64_t h0, int64_t h1,
                             int64_t w0, int64_t w1) {
  const int64_t C = x.size(1), ph = g.dh * (g.kh - 1), pw = g.dw * (g.kw - 1);
  const auto grad_out = x.narrow(2, h0, h1 - h0).narrow(3, w0, w1 - w0);
  const auto input = padded.narrow(2, h0, h1 - h0 + 2 * ph).narrow(3, w0, w1 - w0 + 2 * pw);
  const auto weight = at::empty({C, C, 2 * g.kh - 1, 2 * g.kw - 1}, x.options());
  return std::get<1>(at::convolution_backward(grad_out, input, weight, c10::nullopt, {1, 1}, {0, 0}, {g.dh, g.dw},
                                              false, {0, 0}, 1, {false, true, false}));
}

// The rows (or columns) outside a stride-1 tap's window [begin, end) of an axis of `size`: up to two ranges.
std::vector<std::pair<int64_t, int64_t>> outside(std::pair<int64_t, int64_t> window, int64_t size) {
  std::vector<std::pair<int64_t, int64_t>> out;
  if (window.first > 0) out.emplace_back(0, window.first);
  if (window.second < size) out.emplace_back(std::max(window.second, window.first), size);
  return out;
}

// Stride-1 conv Gram without patches. For kernel taps a = (i, j), b = (i', j') the block
//   (P^T P)[(., a), (., b)] = sum_{q in R_a} x[q]^T x[q + delta],  delta = ((i'-i) dh, (j'-j) dw),
// R_a the pixels tap a reads (a rectangle; x = 0 outside the image I). That is the image-wide correlation
//   C_delta = sum_{q in I} x[q]^T x[q + delta]
// minus the same sum over I \ R_a = (rows outside R_a's rows) u (columns outside its columns), by inclusion-exclusion:
// full-width row strips plus full-height column strips minus their corner rectangles (one or two pixel rows,
// columns and corner pixels for the usual "same" padding). Every C_delta comes from one weight-gradient convolution
// of x with itself (oneDNN on CPU; (2 kh - 1)(2 kw - 1) C^2 multiply-adds per pixel, no patch matrix), and so do
// the corrections of each distinct strip, for all deltas at once; column strips run on the transposed image, where
// they are rows. Returns D x D in (c, i, j) order, symmetrized.
ConvGram gram_by_correlation(const at::Tensor& x, const Geometry& g) {
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), D = C * g.kh * g.kw;
  const int64_t ph = g.dh * (g.kh - 1), pw = g.dw * (g.kw - 1);
  const auto xc = x.contiguous();
  const auto padded = at::constant_pad_nd(xc, {pw, pw, ph, ph});
  const auto full = rect_correlations(xc, padded, g, 0, H, 0, W);
  std::map<std::array<int64_t, 4>, at::Tensor> cache;  // rectangle -> its correlations, computed once
  auto rect = [&](int64_t h0, int64_t h1, int64_t w0, int64_t w1) -> const at::Tensor& {
    auto& k = cache[{h0, h1, w0, w1}];
    if (!k.defined()) k = rect_correlations(xc, padded, g, h0, h1, w0, w1);
    return k;
  };
  at::Tensor xt, padded_t;  // the transposed image, made on the first column strip
  Geometry gt = g;
  std::swap(gt.kh, gt.kw);
  std::swap(gt.dh, gt.dw);
  std::map<std::array<int64_t, 2>, at::Tensor> column_cache;
  auto columns = [&](int64_t w0, int64_t w1) -> const at::Tensor& {
    auto& k = column_cache[{w0, w1}];
    if (!k.defined()) {
      if (!xt.defined()) {
        xt = xc.transpose(2, 3).contiguous();
        padded_t = at::constant_pad_nd(xt, {ph, ph, pw, pw});
      }
      k = rect_correlations(xt, padded_t, gt, w0, w1, 0, H).transpose(2, 3);
    }
    return k;
  };
  auto G = at::empty({C, g.kh, g.kw, C, g.kh, g.kw}, x.options());
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      const auto [t, bt] = tap_window(i * g.dh - g.ph, g.oh, H);
      const auto [l, r] = tap_window(j * g.dw - g.pw, g.ow, W);
      const auto rows_out = outside({t, bt}, H), cols_out = outside({l, r}, W);
      // the deltas b - a for every tap b: a kh x kw window of the (2 kh - 1) x (2 kw - 1) correlations
      auto window = [&](const at::Tensor& k) {
        return k.narrow(2, g.kh - 1 - i, g.kh).narrow(3, g.kw - 1 - j, g.kw);
      };
      auto blk = window(full).clone();  // (C, C, kh, kw): [c, c', i', j']
      for (const auto& [h0, h1] : rows_out) blk.sub_(window(rect(h0, h1, 0, W)));
      for (const auto& [w0, w1] : cols_out) blk.sub_(window(columns(w0, w1)));
      for (const auto& [h0, h1] : rows_out)
        for (const auto& [w0, w1] : cols_out) blk.add_(window(rect(h0, h1, w0, w1)));
      G.select(1, i).select(1, j).copy_(blk);
    }
  const auto flat = G.view({D, D});
  return {(flat + flat.t()).mul_(0.5)};
}

// Cost of the two methods for a stride-1 conv per sample: the correlations ((2 kh - 1)(2 kw - 1) C^2 per pixel of
// the image and of every distinct strip, strips counted 3x for the poorer efficiency of thin convolutions, and the
// whole halved for oneDNN's efficiency against the patch path) against the patch syrk (L (C kh kw)^2 / 2, plus its
// gather). Measured on the ResNet-18 and MNIST-CNN layer shapes, this picks the faster method on each
// (bench/RESULTS.md).
bool correlation_is_cheaper(const at::Tensor& x, const Geometry& g) {
  if (g.sh != 1 || g.sw != 1) return false;
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  std::set<std::array<int64_t, 4>> rects;  // (h0, h1, w0, w1) of every distinct strip and corner
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      const auto rows = outside(tap_window(i * g.dh - g.ph, g.oh, H), H);
      const auto cols = outside(tap_window(j * g.dw - g.pw, g.ow, W), W);
      for (const auto& [h0, h1] : rows) rects.insert({h0, h1, 0, W});
      for (const auto& [w0, w1] : cols) rects.insert({0, H, w0, w1});
      for (const auto& [h0, h1] : rows)
        for (const auto& [w0, w1] : cols) rects.insert({h0, h1, w0, w1});
    }
  double strips = 0.0;
  for (const auto& r : rects) strips += static_cast<double>((r[1] - r[0]) * (r[3] - r[2]));
  const double c = static_cast<double>(C), d = c * static_cast<double>(g.kh * g.kw);
  const double window = static_cast<double>((2 * g.kh - 1) * (2 * g.kw - 1));
  const double correlation = 0.5 * window * c * c * (static_cast<double>(H * W) + 3.0 * strips);
  const double patches = static_cast<double>(g.oh * g.ow) * (0.5 * d * d + 8.0 * d);
  return correlation < patches;
}

// Samples per chunk for about kChunkBytes of the method's largest temporary per chunk: the patch matrix (L rows of
// C kh kw) for patches; for correlations the input padded by the correlation window, counted with its channels
// rounded up to oneDNN's blocks of 16 (a 1-channel image is reordered into 16 channels).
int64_t samples_per_chunk(const at::Tensor& x, const Geometry& g, bool correlation, at::ScalarType type) {
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t per_sample =
      correlation ? (C + 15) / 16 * 16 * (H + 2 * g.dh * (g.kh - 1)) * (W + 2 * g.dw * (g.kw - 1))
                  : g.oh * g.ow * C * g.kh * g.kw + C * (H + 2 * g.ph) * (W + 2 * g.pw);
  return std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, per_sample * at::elementSize(type)));
}

// method: 0 the cheaper of the two by the flop count above, 1 patches, 2 correlations (stride 1 only).
void accumulate_conv_factor_(at::Tensor F, const at::Tensor& x, double decay, double coef, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool bias,
                             int64_t method) {
  check_state(F, "F");
  TORCH_CHECK(x.dim() == 4, "x must be N x C x H x W");
  TORCH_CHECK(method >= 0 && method <= 2, "method must be 0 (auto), 1 (patches) or 2 (correlation)");
  const Geometry g = geometry(x, kernel_size, stride, padding, dilation);
  const int64_t D = x.size(1) * g.kh * g.kw, N = x.size(0), L = g.oh * g.ow;
  TORCH_CHECK(F.dim() == 2 && F.size(0) == D + bias && F.size(1) == D + bias, "F must be (C kh kw [+1])^2");
  TORCH_CHECK(method != 2 || (g.sh == 1 && g.sw == 1), "the correlation method needs stride 1");
  const auto type = accumulation_type(F, x);
  const bool correlation = method == 2 || (method == 0 && correlation_is_cheaper(x, g));
  const int64_t step = samples_per_chunk(x, g, correlation, type);
  ConvGram gram;  // P^T P
  at::Tensor image;  // for the bias: sum_n x
  for (int64_t s = 0; s == 0 || s < N; s += step) {
    const auto xa = x.narrow(0, s, std::min(step, N - s)).to(type);
    auto part = correlation ? gram_by_correlation(xa, g) : gram_by_patches(xa, g);
    if (s == 0)
      gram = std::move(part);
    else
      gram.add(part);
    if (bias) image = s == 0 ? xa.sum(0) : image.add_(xa.sum(0));
  }
  ema_conv_gram(F.narrow(0, 0, D).narrow(1, 0, D), gram, x.size(1), g.kh * g.kw, 1.0 - decay, coef);
  if (bias) {  // P^T 1: per tap the sum of the pixels it reads, from the image of sum_n x
    image = at::constant_pad_nd(image, {g.pw, g.pw, g.ph, g.ph});  // C x (H + 2ph) x (W + 2pw)
    auto colsum = at::empty({x.size(1), g.kh, g.kw}, image.options());
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j)
        colsum.select(1, i).select(1, j).copy_(
            image.narrow(1, i * g.dh, (g.oh - 1) * g.sh + 1).narrow(2, j * g.dw, (g.ow - 1) * g.sw + 1)
                .slice(1, 0, c10::nullopt, g.sh).slice(2, 0, c10::nullopt, g.sw).sum({1, 2}));
    const auto flat = colsum.view({D});
    ema_block(F.narrow(0, D, 1).squeeze(0).narrow(0, 0, D), flat, 1.0 - decay, coef);
    ema_block(F.narrow(1, D, 1).squeeze(1).narrow(0, 0, D), flat, 1.0 - decay, coef);
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
  m.def("accumulate_factor_(Tensor(a!) F, Tensor[] X, float decay, float coef) -> ()");
  m.def("accumulate_factor_diag_(Tensor(a!) f, Tensor X, float decay, float coef) -> ()");
  m.def(
      "accumulate_conv_factor_(Tensor(a!) F, Tensor x, float decay, float coef, int[] kernel_size, int[] stride, "
      "int[] padding, int[] dilation, bool bias, int method=0) -> ()");
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
