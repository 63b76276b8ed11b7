// Batched symmetric eigendecomposition of many matrices of mixed sizes on the CPU, and what is built on it:
//
//   fop_kernels::eigh(mats, clamp)                 M_i = Q_i diag(l_i) Q_i^T, l_i ascending (clamped at 0)
//   fop_kernels::damped_inverse(mats, damping, power, evals?, evecs?)
//                                                  Q_i diag((max(l_i, 0) + damping)^power) Q_i^T
//   fop_kernels::eigh_refresh(mats, prev_evecs, iters, clamp)
//                                                  `iters` subspace-iteration steps Q <- qr(M Q) from the
//                                                  previous eigenvectors, then Rayleigh quotients l = diag(Q^T M Q)
//
// LAPACK (syevd) through ATen. The matrices are cut into work items -- one large matrix, or a chunk of
// equal-size small ones decomposed by one batched ATen call. Every item that goes to LAPACK (wider than
// kSmallMaxN) runs one by one with LAPACK on all threads (concurrent syevd calls inside the parallel region gave
// wrong eigenvectors: runs_inline); eigh's items for its own solver, sorted largest first, are pulled from a
// shared counter by at::parallel_for's threads (dynamic longest-first scheduling). Every input is checked for
// finiteness and symmetry inside its work item, and every output for finiteness: errors name the matrix index; a
// NaN is never returned.
//
// ATen and torch/library.h only (no torch/extension.h): this unit compiles in seconds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "eigh.h"

namespace fop_kernels {
namespace {

using TensorVec = std::vector<at::Tensor>;

// Matrices at least this large are decomposed one per work item; smaller ones of equal size are batched.
constexpr int64_t kBatchMaxN = 160;
// Equal-size groups are cut into about this many chunks per thread, so that the dynamic schedule balances.
constexpr int64_t kChunksPerThread = 4;
// Chunks of matrices for eigh_small_batch hold a multiple of its widest lane group (16 floats per vector).
constexpr int64_t kSmallGroup = 16;

bool runs_inline(int64_t n, bool small_solver);

struct WorkItem {
  std::vector<int64_t> idx;  // matrices of one size
  int64_t n;                 // their size
  double cost;               // ~ count * n^3
};

std::vector<WorkItem> plan_work(at::TensorList mats, bool small_solver) {
  std::map<int64_t, std::vector<int64_t>> by_size;
  for (size_t i = 0; i < mats.size(); ++i) by_size[mats[i].size(0)].push_back(static_cast<int64_t>(i));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<WorkItem> items;
  for (const auto& [n, idx] : by_size) {
    const int64_t count = static_cast<int64_t>(idx.size());
    int64_t chunk =
        n >= kBatchMaxN ? 1 : std::max<int64_t>(1, (count + kChunksPerThread * threads - 1) / (kChunksPerThread * threads));
    if (n <= kSmallMaxN) chunk = (chunk + kSmallGroup - 1) / kSmallGroup * kSmallGroup;  // whole lane groups
    for (int64_t s = 0; s < count; s += chunk) {
      WorkItem w;
      w.idx.assign(idx.begin() + s, idx.begin() + std::min(count, s + chunk));
      w.n = n;
      w.cost = static_cast<double>(w.idx.size()) * static_cast<double>(n) * n * n;
      items.push_back(std::move(w));
    }
  }
  // The items run_work takes inline first, then the rest largest first.
  std::stable_sort(items.begin(), items.end(), [small_solver](const WorkItem& a, const WorkItem& b) {
    const bool ta = runs_inline(a.n, small_solver), tb = runs_inline(b.n, small_solver);
    return ta != tb ? ta : a.cost > b.cost;
  });
  return items;
}

// Whether an item runs inline, outside the parallel region: every item that goes to LAPACK (all of them unless
// `small_solver`: eigh's items of n <= kSmallMaxN, which its own solver decomposes), on all threads. Two syevd calls
// running concurrently inside the region gave wrong 512-wide eigenvectors (residual 0.25-3.7, float64) once
// torch.set_num_threads had been called, even with MKL held to one thread per caller (mkl_set_num_threads_local);
// from two Python threads the same calls are right. So no LAPACK call runs inside the region.
bool runs_inline(int64_t n, bool small_solver) { return !small_solver || n > kSmallMaxN; }

// Runs fn(item) for every item (sorted inline items first, then largest first): the items that run inline
// (runs_inline) one by one, where ATen/LAPACK uses all threads on each; the rest through a shared counter so that
// each thread takes the largest item still waiting (inline too when only one is left).
template <class F>
void run_work(const std::vector<WorkItem>& items, bool small_solver, const F& fn) {
  size_t first = 0;
  while (first < items.size() && runs_inline(items[first].n, small_solver)) fn(items[first++]);
  const size_t rest = items.size() - first;
  if (rest <= 1) {
    if (rest == 1) fn(items[first]);
    return;
  }
  std::atomic<size_t> next{first};
  const int64_t workers = std::min<int64_t>(std::max(1, at::get_num_threads()), static_cast<int64_t>(rest));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (size_t k = next.fetch_add(1); k < items.size(); k = next.fetch_add(1)) fn(items[k]);
  });
}

// One pass over a contiguous square matrix: every entry finite, and max|M - M^T| <= kSymmetryRtol max|M|.
template <typename scalar_t>
void check_values(const at::Tensor& m, const char* op, int64_t index) {
  const int64_t n = m.size(0);
  const scalar_t* a = m.const_data_ptr<scalar_t>();
  double amax = 0.0, asym = 0.0;
  bool finite = true;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c <= r; ++c) {
      const double x = a[r * n + c], y = a[c * n + r];
      finite = finite && std::isfinite(x) && std::isfinite(y);
      amax = std::max(amax, std::max(std::abs(x), std::abs(y)));
      asym = std::max(asym, std::abs(x - y));
    }
  }
  TORCH_CHECK(finite, op, ": mats[", index, "] contains non-finite values (NaN or inf)");
  TORCH_CHECK(asym <= kSymmetryRtol * amax, op, ": mats[", index, "] (", n, "x", n,
              ") is not symmetric: max|M - M^T| = ", asym, " > ", kSymmetryRtol, " * max|M| = ", kSymmetryRtol * amax);
}

void check_input(const at::Tensor& m, const char* op, int64_t index) {
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "fop_kernels_check_values", [&] { check_values<scalar_t>(m, op, index); });
}

bool all_finite(const at::Tensor& t) { return t.numel() == 0 || at::isfinite(t).all().item<bool>(); }

std::string index_list(const std::vector<int64_t>& idx) {
  std::string s;
  for (size_t j = 0; j < idx.size(); ++j) s += (j ? ", " : "") + std::to_string(idx[j]);
  return s;
}

// The inputs of one work item as a contiguous (k, n, n) batch, each checked.
at::Tensor gather_checked(at::TensorList mats, const WorkItem& w, const char* op) {
  TensorVec parts;
  parts.reserve(w.idx.size());
  for (int64_t i : w.idx) {
    at::Tensor m = mats[i].contiguous();
    check_input(m, op, i);
    parts.push_back(std::move(m));
  }
  return parts.size() == 1 ? parts[0].unsqueeze(0) : at::stack(parts);
}

at::Tensor gather(at::TensorList ts, const WorkItem& w) {
  TensorVec parts;
  parts.reserve(w.idx.size());
  for (int64_t i : w.idx) parts.push_back(ts[i]);
  return parts.size() == 1 ? parts[0].unsqueeze(0) : at::stack(parts);
}

// eigh_small on each matrix of a contiguous (k, n, n) batch, n <= kSmallMaxN.
std::tuple<at::Tensor, at::Tensor> eigh_small_item(const at::Tensor& a, const WorkItem& w, const char* op) {
  const int64_t k = a.size(0), n = a.size(1);
  at::Tensor l = at::empty({k, n}, a.options());
  at::Tensor q = at::empty({k, n, n}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fop_kernels_eigh_small", [&] {
    const int64_t bad = eigh_small_batch(a.const_data_ptr<scalar_t>(), k, n, l.mutable_data_ptr<scalar_t>(),
                                         q.mutable_data_ptr<scalar_t>());
    TORCH_CHECK(bad < 0, op, ": eigendecomposition of mats[", bad < 0 ? 0 : w.idx[bad],
                "] failed: the QL iteration did not converge");
  });
  return {l, q};
}

// A (k, n, n) batch: eigh_small up to kSmallMaxN when `small`, else LAPACK through ATen (a failure re-raised
// naming the matrices). damped_inverse keeps LAPACK: with damping 0 its singularity check reads the sign of
// eigenvalues at rounding level, which differs between the two solvers.
std::tuple<at::Tensor, at::Tensor> eigh_batch(const at::Tensor& a, const WorkItem& w, const char* op, bool small) {
  if (small && a.size(-1) <= kSmallMaxN) return eigh_small_item(a, w, op);
  std::string error;
  try {
    return at::linalg_eigh(a);
  } catch (const c10::Error& e) {
    error = e.what_without_backtrace();
  }
  TORCH_CHECK(false, op, ": eigendecomposition of mats[", index_list(w.idx), "] failed: ", error);
  return {};
}

void allocate_decomposition(at::TensorList mats, TensorVec& evals, TensorVec& evecs) {
  evals.reserve(mats.size());
  evecs.reserve(mats.size());
  for (const at::Tensor& m : mats) {
    evals.push_back(at::empty({m.size(0)}, m.options()));
    evecs.push_back(at::empty({m.size(0), m.size(0)}, m.options()));
  }
}

template <typename scalar_t>
bool finite_span(const scalar_t* p, int64_t count) {
  bool ok = true;
  for (int64_t i = 0; i < count; ++i) ok = ok && std::isfinite(p[i]);
  return ok;
}

// Copies the decomposition of each matrix of a work item into its outputs, each checked to be finite.
void scatter(const WorkItem& w, const at::Tensor& l, const at::Tensor& q, TensorVec& evals, TensorVec& evecs,
             const char* op) {
  const at::Tensor lc = l.contiguous(), qc = q.contiguous();
  const int64_t n = lc.size(-1);
  AT_DISPATCH_FLOATING_TYPES(lc.scalar_type(), "fop_kernels_scatter", [&] {
    for (size_t j = 0; j < w.idx.size(); ++j) {
      const int64_t i = w.idx[j];
      const scalar_t* lj = lc.const_data_ptr<scalar_t>() + j * n;
      const scalar_t* qj = qc.const_data_ptr<scalar_t>() + j * n * n;
      TORCH_CHECK(finite_span(lj, n) && finite_span(qj, n * n), op, ": mats[", i,
                  "] produced non-finite eigenvalues or eigenvectors");
      std::copy(lj, lj + n, evals[i].mutable_data_ptr<scalar_t>());
      std::copy(qj, qj + n * n, evecs[i].mutable_data_ptr<scalar_t>());
    }
  });
}

std::tuple<TensorVec, TensorVec> eigh_cpu(at::TensorList mats, bool clamp) {
  constexpr const char* op = "fop_kernels.eigh";
  check_square_list(mats, op, "mats");
  TensorVec evals, evecs;
  allocate_decomposition(mats, evals, evecs);
  run_work(plan_work(mats, true), true, [&](const WorkItem& w) {
    auto [l, q] = eigh_batch(gather_checked(mats, w, op), w, op, /*small=*/true);
    if (clamp) l.clamp_min_(0);
    scatter(w, l, q, evals, evecs, op);
  });
  return {std::move(evals), std::move(evecs)};
}

double damping_value(const at::Tensor& damping, const char* op) {
  TORCH_CHECK(damping.numel() == 1, op, ": damping must hold one value, got shape ", damping.sizes());
  TORCH_CHECK(damping.device().is_cpu(), op, ": damping is on ", damping.device(), " but the matrices are on cpu");
  const double d = damping.item<double>();
  TORCH_CHECK(std::isfinite(d) && d >= 0, op, ": damping must be a finite value >= 0, got ", d);
  return d;
}

TensorVec damped_inverse_cpu(at::TensorList mats, const at::Tensor& damping, double power,
                             std::optional<at::TensorList> evals_in,
                             std::optional<at::TensorList> evecs_in) {
  constexpr const char* op = "fop_kernels.damped_inverse";
  check_square_list(mats, op, "mats");
  const double d = damping_value(damping, op);
  TORCH_CHECK(std::isfinite(power), op, ": power must be finite, got ", power);
  const bool reuse = evals_in.has_value() || evecs_in.has_value();
  TORCH_CHECK(evals_in.has_value() == evecs_in.has_value(), op, ": pass both evals and evecs, or neither");
  TensorVec given_l, given_q;
  if (reuse) {
    given_l = evals_in->vec();
    given_q = evecs_in->vec();
    check_companion_list(mats, given_l, op, "evals", /*vectors=*/true);
    check_companion_list(mats, given_q, op, "evecs", /*vectors=*/false);
  }
  TensorVec out;
  out.reserve(mats.size());
  for (const at::Tensor& m : mats) out.push_back(at::empty_like(m, at::MemoryFormat::Contiguous));
  run_work(plan_work(mats, false), false, [&](const WorkItem& w) {
    at::Tensor l, q;
    if (reuse) {
      l = gather(given_l, w);
      q = gather(given_q, w);
      for (int64_t i : w.idx)
        TORCH_CHECK(all_finite(given_l[i]) && all_finite(given_q[i]), op, ": the decomposition of mats[", i,
                    "] (evals/evecs) contains non-finite values");
    } else {
      std::tie(l, q) = eigh_batch(gather_checked(mats, w, op), w, op, /*small=*/false);
    }
    const at::Tensor h = (l.clamp_min(0) + d).pow(power);  // (k, n)
    for (size_t j = 0; j < w.idx.size(); ++j) {
      TORCH_CHECK(all_finite(h[j]), op, ": mats[", w.idx[j], "] is singular: (max(l, 0) + damping)^", power,
                  " is not finite with damping = ", d, "; pass damping > 0");
    }
    const at::Tensor r = at::matmul(q * h.unsqueeze(-2), q.mT());
    for (size_t j = 0; j < w.idx.size(); ++j) out[w.idx[j]].copy_(r[j]);
  });
  return out;
}

std::tuple<TensorVec, TensorVec> eigh_refresh_cpu(at::TensorList mats, at::TensorList prev_evecs, int64_t iters,
                                                  bool clamp) {
  constexpr const char* op = "fop_kernels.eigh_refresh";
  check_square_list(mats, op, "mats");
  check_companion_list(mats, prev_evecs, op, "prev_evecs", /*vectors=*/false);
  TORCH_CHECK(iters >= 1, op, ": iters must be >= 1, got ", iters);
  TensorVec evals, evecs;
  allocate_decomposition(mats, evals, evecs);
  run_work(plan_work(mats, false), false, [&](const WorkItem& w) {
    const at::Tensor m = gather_checked(mats, w, op);
    const at::Tensor q0 = gather(prev_evecs, w);
    for (size_t j = 0; j < w.idx.size(); ++j)
      TORCH_CHECK(all_finite(q0[j]), op, ": prev_evecs[", w.idx[j], "] contains non-finite values");
    auto [l, q] = refresh_batch(m, q0, iters);
    if (clamp) l.clamp_min_(0);
    scatter(w, l, q, evals, evecs, op);
  });
  return {std::move(evals), std::move(evecs)};
}

}  // namespace
}  // namespace fop_kernels

TORCH_LIBRARY_FRAGMENT(fop_kernels, m) {
  m.def("eigh(Tensor[] mats, bool clamp=False) -> (Tensor[], Tensor[])");
  m.def(
      "damped_inverse(Tensor[] mats, Tensor damping, float power=-1., Tensor[]? evals=None, "
      "Tensor[]? evecs=None) -> Tensor[]");
  m.def("eigh_refresh(Tensor[] mats, Tensor[] prev_evecs, int iters=1, bool clamp=False) -> (Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(fop_kernels, CPU, m) {
  m.impl("eigh", &fop_kernels::eigh_cpu);
  m.impl("damped_inverse", &fop_kernels::damped_inverse_cpu);
  m.impl("eigh_refresh", &fop_kernels::eigh_refresh_cpu);
}
