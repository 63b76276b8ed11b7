// CUDA implementations of fop_kernels::eigh, damped_inverse and eigh_refresh (schemas in csrc/eigh.cpp).
//
// The matrices are grouped by size; each group is stacked into one (k, n, n) buffer and decomposed by cuSOLVER
// on the current stream: batched Jacobi (syevjBatched, one call for the whole group) for n <= 32, divide and
// conquer (syevd, one call per matrix, one workspace per group) for larger n. Nothing waits for the device
// between matrices: input checks (finite, symmetric), cuSOLVER's info codes and the output checks are all
// written to device flags, read back once at the very end of the op -- the op's single host sync -- and turned
// into errors that name the matrix index. A NaN is never returned silently.
//
// damped_inverse fuses the eigenvalue function into the reconstruction: one kernel forms
// Q diag((max(l, 0) + damping)^power) (and flags non-finite factors), one batched GEMM multiplies by Q^T.
//
// Outputs of one size group are views into one group tensor (no per-matrix copy kernels).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cusolverDn.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "../eigh.h"

namespace fop_kernels {
namespace {

using TensorVec = std::vector<at::Tensor>;

// Largest size decomposed by the batched Jacobi solver (cuSOLVER's syevjBatched limit).
constexpr int64_t kJacobiMaxN = 32;

#define FOP_CUSOLVER_CHECK(expr)                                                                 \
  do {                                                                                           \
    const cusolverStatus_t fop_status_ = (expr);                                                 \
    TORCH_CHECK(fop_status_ == CUSOLVER_STATUS_SUCCESS, "cuSOLVER call ", #expr, " failed with ", \
                static_cast<int>(fop_status_));                                                  \
  } while (0)

// Per-matrix device flags, one column each; read back once at the end of the op.
enum Flag : int64_t { kNonFiniteInput = 0, kAsymmetric, kSolverFailed, kNonFiniteOutput, kSingular, kBadDamping, kNumFlags };

struct Group {
  int64_t n;
  std::vector<int64_t> idx;  // positions in the op's input list
};

std::vector<Group> group_by_size(at::TensorList mats) {
  std::map<int64_t, std::vector<int64_t>> by_size;
  for (size_t i = 0; i < mats.size(); ++i) by_size[mats[i].size(0)].push_back(static_cast<int64_t>(i));
  std::vector<Group> groups;
  for (auto it = by_size.rbegin(); it != by_size.rend(); ++it) groups.push_back({it->first, it->second});
  return groups;  // largest first
}

at::Tensor stack_group(at::TensorList ts, const Group& g) {
  TensorVec parts;
  parts.reserve(g.idx.size());
  for (int64_t i : g.idx) parts.push_back(ts[i]);
  return at::stack(parts).contiguous();
}

// (k, kNumFlags) int32 flags of a group, all zero.
at::Tensor new_flags(const Group& g, const at::Tensor& like) {
  return at::zeros({static_cast<int64_t>(g.idx.size()), kNumFlags}, like.options().dtype(at::kInt));
}

void set_flag(at::Tensor& flags, Flag f, const at::Tensor& per_matrix_bool) {
  flags.select(1, f).bitwise_or_(per_matrix_bool.to(at::kInt));
}

// Device-side input checks of a (k, n, n) group: non-finite entries, max|M - M^T| > rtol max|M|.
void flag_inputs(at::Tensor& flags, const at::Tensor& a) {
  set_flag(flags, kNonFiniteInput, at::logical_not(at::isfinite(a).flatten(1).all(1)));
  const at::Tensor amax = a.abs().amax({1, 2});
  set_flag(flags, kAsymmetric, (a - a.mT()).abs().amax({1, 2}) > amax * kSymmetryRtol);
}

void flag_nonfinite(at::Tensor& flags, Flag f, const at::Tensor& t) {
  set_flag(flags, f, at::logical_not(at::isfinite(t).flatten(1).all(1)));
}

// The op's one host sync: read every group's flags and raise for the first flagged matrix.
void raise_on_flags(const std::vector<Group>& groups, const TensorVec& flags, const char* op) {
  const at::Tensor host = at::cat(flags).cpu();
  const auto f = host.accessor<int, 2>();
  int64_t row = 0;
  for (const Group& g : groups) {
    for (int64_t i : g.idx) {
      const char* sep = ": mats[";
      TORCH_CHECK(!f[row][kNonFiniteInput], op, sep, i, "] contains non-finite values (NaN or inf)");
      TORCH_CHECK(!f[row][kAsymmetric], op, sep, i, "] (", g.n, "x", g.n, ") is not symmetric: max|M - M^T| > ",
                  kSymmetryRtol, " * max|M|");
      TORCH_CHECK(!f[row][kBadDamping], op, ": damping must be a finite value >= 0");
      TORCH_CHECK(!f[row][kSolverFailed], op, sep, i, "] (", g.n, "x", g.n,
                  "): cuSOLVER reported failure (info != 0: no convergence)");
      TORCH_CHECK(!f[row][kSingular], op, sep, i,
                  "] is singular: (max(l, 0) + damping)^power is not finite; pass damping > 0");
      TORCH_CHECK(!f[row][kNonFiniteOutput], op, sep, i, "] produced non-finite values (inputs non-finite?)");
      ++row;
    }
  }
}

// One cuSOLVER handle per (thread, device), bound to the current stream at every use. Our own rather than ATen's
// pool: at::cuda::getCurrentCUDASolverDnHandle lives in libtorch_cuda_linalg.so, which torch loads lazily.
// The handles live until the process exits (destroying them in thread-exit order could outlive the context).
cusolverDnHandle_t solver_handle() {
  static thread_local std::unordered_map<c10::DeviceIndex, cusolverDnHandle_t> handles;
  cusolverDnHandle_t& handle = handles[c10::cuda::current_device()];
  if (handle == nullptr) FOP_CUSOLVER_CHECK(cusolverDnCreate(&handle));
  FOP_CUSOLVER_CHECK(cusolverDnSetStream(handle, c10::cuda::getCurrentCUDAStream().stream()));
  return handle;
}

// ---- cuSOLVER wrappers, float and double ----------------------------------------------------------------------

// Batched Jacobi settings (default tolerance and sweeps, eigenvalues sorted ascending).
struct SyevjParams {
  syevjInfo_t p = nullptr;
  SyevjParams() {
    FOP_CUSOLVER_CHECK(cusolverDnCreateSyevjInfo(&p));
    FOP_CUSOLVER_CHECK(cusolverDnXsyevjSetSortEig(p, 1));  // ascending eigenvalues
  }
  ~SyevjParams() { cusolverDnDestroySyevjInfo(p); }
  SyevjParams(const SyevjParams&) = delete;
  SyevjParams& operator=(const SyevjParams&) = delete;
};

#define FOP_SOLVER_OVERLOADS(T, P)                                                                                  \
  cusolverStatus_t syevj_batched_buffer(cusolverDnHandle_t h, int n, const T* a, const T* w, int* lwork,            \
                                        syevjInfo_t params, int batch) {                                            \
    return cusolverDn##P##syevjBatched_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w,  \
                                                  lwork, params, batch);                                            \
  }                                                                                                                 \
  cusolverStatus_t syevj_batched(cusolverDnHandle_t h, int n, T* a, T* w, T* work, int lwork, int* info,           \
                                 syevjInfo_t params, int batch) {                                                   \
    return cusolverDn##P##syevjBatched(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, work, lwork, \
                                       info, params, batch);                                                        \
  }                                                                                                                 \
  cusolverStatus_t syevd_buffer(cusolverDnHandle_t h, int n, const T* a, const T* w, int* lwork) {                 \
    return cusolverDn##P##syevd_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, lwork); \
  }                                                                                                                 \
  cusolverStatus_t syevd(cusolverDnHandle_t h, int n, T* a, T* w, T* work, int lwork, int* info) {                  \
    return cusolverDn##P##syevd(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, work, lwork, info); \
  }

FOP_SOLVER_OVERLOADS(float, S)
FOP_SOLVER_OVERLOADS(double, D)
#undef FOP_SOLVER_OVERLOADS

// Decomposes a contiguous (k, n, n) symmetric batch in place. cuSOLVER works column-major, so on return the
// buffer read row-major holds Q^T per matrix; returns (l (k, n), Q (k, n, n) as a transposed view) and sets the
// solver-failure flag from cuSOLVER's per-matrix info.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> decompose_group(at::Tensor a, at::Tensor& flags) {
  const int64_t k = a.size(0), n = a.size(1);
  TORCH_CHECK(n <= std::numeric_limits<int>::max() / n, "fop_kernels.eigh: matrix size ", n, " too large for cuSOLVER");
  at::Tensor w = at::empty({k, n}, a.options());
  at::Tensor info = at::zeros({k}, a.options().dtype(at::kInt));
  cusolverDnHandle_t handle = solver_handle();
  scalar_t* a_ptr = a.data_ptr<scalar_t>();
  scalar_t* w_ptr = w.data_ptr<scalar_t>();
  int lwork = 0;
  if (n <= kJacobiMaxN) {
    static thread_local SyevjParams params;  // host-side settings, kept alive for every launch that used them
    FOP_CUSOLVER_CHECK(syevj_batched_buffer(handle, n, a_ptr, w_ptr, &lwork, params.p, static_cast<int>(k)));
    at::Tensor work = at::empty({std::max(1, lwork)}, a.options());
    FOP_CUSOLVER_CHECK(syevj_batched(handle, n, a_ptr, w_ptr, work.data_ptr<scalar_t>(), lwork,
                                     info.data_ptr<int>(), params.p, static_cast<int>(k)));
  } else {
    FOP_CUSOLVER_CHECK(syevd_buffer(handle, n, a_ptr, w_ptr, &lwork));
    at::Tensor work = at::empty({std::max(1, lwork)}, a.options());  // reused: the calls are ordered on one stream
    for (int64_t j = 0; j < k; ++j) {
      FOP_CUSOLVER_CHECK(syevd(handle, n, a_ptr + j * n * n, w_ptr + j * n, work.data_ptr<scalar_t>(), lwork,
                               info.data_ptr<int>() + j));
    }
  }
  set_flag(flags, kSolverFailed, info.ne(0));
  return {w, a.mT()};
}

std::tuple<at::Tensor, at::Tensor> decompose(const at::Tensor& a, at::Tensor& flags) {
  return AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fop_kernels_eigh_cuda",
                                    [&] { return decompose_group<scalar_t>(a, flags); });
}

// ---- fused eigenvalue function and column scaling ----------------------------------------------------------------

// out[b, r, c] = q[b, r, c] * (max(l[b, c], 0) + damping)^power, for a contiguous (k, n, n) q. damping is read from
// device memory when `damping_dev` is set (no host sync), else `damping_host`. Flags per matrix b: bit 0 a
// non-finite factor (singular with damping 0), bit 1 a negative or non-finite damping.
template <typename scalar_t>
__global__ void scale_columns_by_power_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ l,
                                              const double* __restrict__ damping_dev, double damping_host,
                                              double power, scalar_t* __restrict__ out, int* __restrict__ status,
                                              int64_t n, int64_t total) {
  const double damping = damping_dev != nullptr ? damping_dev[0] : damping_host;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t b = idx / (n * n);
    const int64_t c = idx % n;
    const double lam = static_cast<double>(l[b * n + c]);
    const double h = pow((lam > 0.0 ? lam : 0.0) + damping, power);
    const scalar_t hs = static_cast<scalar_t>(h);
    if (!isfinite(hs)) atomicOr(status + b, 1);
    if (!(damping >= 0.0) || !isfinite(damping)) atomicOr(status + b, 2);
    out[idx] = q[idx] * hs;
  }
}

// Q diag((max(l, 0) + damping)^power) Q^T for a group: (k, n) l and (k, n, n) Q (any strides).
at::Tensor reconstruct(const at::Tensor& l, const at::Tensor& q, const at::Tensor& damping, double power,
                       at::Tensor& flags) {
  const at::Tensor qc = q.contiguous();
  const at::Tensor lc = l.contiguous();
  at::Tensor scaled = at::empty_like(qc);
  at::Tensor status = at::zeros({qc.size(0)}, qc.options().dtype(at::kInt));
  const bool on_device = damping.is_cuda();
  const at::Tensor damping_dev = on_device ? damping.to(at::kDouble).reshape({1}) : at::Tensor();
  const double damping_host = on_device ? 0.0 : damping.item<double>();  // a CPU scalar: no device sync
  const int64_t n = qc.size(1), total = qc.numel();
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 65535));
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "fop_kernels_scale_columns", [&] {
    scale_columns_by_power_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        qc.data_ptr<scalar_t>(), lc.data_ptr<scalar_t>(), on_device ? damping_dev.data_ptr<double>() : nullptr,
        damping_host, power, scaled.data_ptr<scalar_t>(), status.data_ptr<int>(), n, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  set_flag(flags, kSingular, status.bitwise_and(1).ne(0));
  set_flag(flags, kBadDamping, status.bitwise_and(2).ne(0));
  return at::bmm(scaled, qc.mT());
}

void check_cuda_inputs(at::TensorList mats, const char* op) {
  check_square_list(mats, op, "mats");
  TORCH_CHECK(mats[0].is_cuda(), op, ": mats[0] is on ", mats[0].device(), "; the CUDA kernel needs CUDA tensors");
}

void scatter_group(const Group& g, const at::Tensor& group_out, TensorVec& out) {
  const auto views = group_out.unbind(0);
  for (size_t j = 0; j < g.idx.size(); ++j) out[g.idx[j]] = views[j];
}

// ---- the ops -----------------------------------------------------------------------------------------------------

std::tuple<TensorVec, TensorVec> eigh_cuda(at::TensorList mats, bool clamp) {
  constexpr const char* op = "fop_kernels.eigh";
  check_cuda_inputs(mats, op);
  const c10::cuda::CUDAGuard guard(mats[0].device());
  const auto groups = group_by_size(mats);
  TensorVec evals(mats.size()), evecs(mats.size()), flags;
  for (const Group& g : groups) {
    at::Tensor a = stack_group(mats, g);
    flags.push_back(new_flags(g, a));
    flag_inputs(flags.back(), a);
    auto [l, q] = decompose(a, flags.back());
    if (clamp) l.clamp_min_(0);
    q = q.contiguous();
    flag_nonfinite(flags.back(), kNonFiniteOutput, at::cat({l, q.flatten(1)}, 1));
    scatter_group(g, l, evals);
    scatter_group(g, q, evecs);
  }
  raise_on_flags(groups, flags, op);
  return {std::move(evals), std::move(evecs)};
}

TensorVec damped_inverse_cuda(at::TensorList mats, const at::Tensor& damping, double power,
                              std::optional<at::TensorList> evals_in, std::optional<at::TensorList> evecs_in) {
  constexpr const char* op = "fop_kernels.damped_inverse";
  check_cuda_inputs(mats, op);
  TORCH_CHECK(damping.numel() == 1, op, ": damping must hold one value, got shape ", damping.sizes());
  TORCH_CHECK(damping.is_cpu() || damping.device() == mats[0].device(), op, ": damping is on ", damping.device(),
              " but the matrices are on ", mats[0].device());
  TORCH_CHECK(std::isfinite(power), op, ": power must be finite, got ", power);
  TORCH_CHECK(evals_in.has_value() == evecs_in.has_value(), op, ": pass both evals and evecs, or neither");
  const bool reuse = evals_in.has_value();
  if (reuse) {
    check_companion_list(mats, *evals_in, op, "evals", /*vectors=*/true);
    check_companion_list(mats, *evecs_in, op, "evecs", /*vectors=*/false);
  }
  const c10::cuda::CUDAGuard guard(mats[0].device());
  const auto groups = group_by_size(mats);
  TensorVec out(mats.size()), flags;
  for (const Group& g : groups) {
    at::Tensor l, q;
    if (reuse) {
      l = stack_group(*evals_in, g);
      q = stack_group(*evecs_in, g);
      flags.push_back(new_flags(g, q));
      flag_nonfinite(flags.back(), kNonFiniteInput, at::cat({l, q.flatten(1)}, 1));
    } else {
      at::Tensor a = stack_group(mats, g);
      flags.push_back(new_flags(g, a));
      flag_inputs(flags.back(), a);
      std::tie(l, q) = decompose(a, flags.back());
    }
    at::Tensor r = reconstruct(l, q, damping, power, flags.back());
    flag_nonfinite(flags.back(), kNonFiniteOutput, r);
    scatter_group(g, r, out);
  }
  raise_on_flags(groups, flags, op);
  return out;
}

std::tuple<TensorVec, TensorVec> eigh_refresh_cuda(at::TensorList mats, at::TensorList prev_evecs, int64_t iters,
                                                   bool clamp) {
  constexpr const char* op = "fop_kernels.eigh_refresh";
  check_cuda_inputs(mats, op);
  check_companion_list(mats, prev_evecs, op, "prev_evecs", /*vectors=*/false);
  TORCH_CHECK(iters >= 1, op, ": iters must be >= 1, got ", iters);
  const c10::cuda::CUDAGuard guard(mats[0].device());
  const auto groups = group_by_size(mats);
  TensorVec evals(mats.size()), evecs(mats.size()), flags;
  for (const Group& g : groups) {
    at::Tensor a = stack_group(mats, g);
    at::Tensor q0 = stack_group(prev_evecs, g);
    flags.push_back(new_flags(g, a));
    flag_inputs(flags.back(), a);
    flag_nonfinite(flags.back(), kNonFiniteInput, q0);
    auto [l, q] = refresh_batch(a, q0, iters);
    if (clamp) l.clamp_min_(0);
    flag_nonfinite(flags.back(), kNonFiniteOutput, at::cat({l, q.flatten(1)}, 1));
    scatter_group(g, l, evals);
    scatter_group(g, q, evecs);
  }
  raise_on_flags(groups, flags, op);
  return {std::move(evals), std::move(evecs)};
}

}  // namespace
}  // namespace fop_kernels

TORCH_LIBRARY_IMPL(fop_kernels, CUDA, m) {
  m.impl("eigh", &fop_kernels::eigh_cuda);
  m.impl("damped_inverse", &fop_kernels::damped_inverse_cuda);
  m.impl("eigh_refresh", &fop_kernels::eigh_refresh_cuda);
}
