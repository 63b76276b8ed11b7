// Damped Cholesky inverses on CPU (formula in fop_kernels/reference/eigh.py):
//
//   damped_cholesky_inverse(M, lam) -> (inv, info)   inv_b = (M_b + lam_b I)^-1 for a (B, n, n) stack of symmetric
//                                                    matrices; info_b > 0 where M_b + lam_b I has no Cholesky factor
//                                                    (inv_b is then unspecified)
//   damped_cholesky_inverse_(M, lam) -> info         the same in place: M (contiguous) is overwritten with the
//                                                    inverses, for a caller whose M is a scratch stack
//
// One copy of the input with the damping added to its diagonal, LAPACK potrf and potri in place on it, and the
// computed triangle mirrored: one output-sized buffer in all (none for the in-place op). torch's cholesky_ex +
// cholesky_inverse makes four (the copy, the factor, its tril, the inverse), and on a 2-core VM whose fresh pages are
// slow that was half the time of three 2304-wide inverses (bench/RESULTS.md). LAPACK is the one torch itself links (MKL or OpenBLAS inside
// libtorch_cpu), found at load time; where it is not exported, the op runs torch's own path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace {

// Fortran LAPACK: integers are passed as int64_t holding non-negative values, which reads correctly as a 32-bit
// integer (little-endian, LP64 LAPACK) and as a 64-bit one (ILP64); info is zeroed first and only tested for != 0.
template <typename T>
using PotrfFn = void (*)(const char* uplo, const int64_t* n, T* a, const int64_t* lda, int64_t* info);

struct Lapack {
  PotrfFn<float> spotrf = nullptr, spotri = nullptr;
  PotrfFn<double> dpotrf = nullptr, dpotri = nullptr;
  bool found() const { return spotrf && spotri && dpotrf && dpotri; }
};

const Lapack& lapack() {
  static const Lapack l = [] {
    Lapack r;
    void* lib = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) return r;
    r.spotrf = reinterpret_cast<PotrfFn<float>>(dlsym(lib, "spotrf_"));
    r.spotri = reinterpret_cast<PotrfFn<float>>(dlsym(lib, "spotri_"));
    r.dpotrf = reinterpret_cast<PotrfFn<double>>(dlsym(lib, "dpotrf_"));
    r.dpotri = reinterpret_cast<PotrfFn<double>>(dlsym(lib, "dpotri_"));
    return r;
  }();
  return l;
}

// A (n x n, row-major) <- its upper triangle mirrored into the lower one, in 64 x 64 tiles.
template <typename T>
void mirror_upper(T* a, int64_t n) {
  constexpr int64_t kTile = 64;
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti)
      for (int64_t tj = 0; tj <= ti; ++tj)
        for (int64_t i = ti * kTile; i < std::min(n, (ti + 1) * kTile); ++i)
          for (int64_t j = tj * kTile; j < std::min(i, (tj + 1) * kTile); ++j) a[i * n + j] = a[j * n + i];
  });
}

template <typename T>
void invert_in_place(T* a, int64_t n, PotrfFn<T> potrf, PotrfFn<T> potri, int32_t* info) {
  // Row-major A is column-major A^T = A: uplo 'L' works on the column-major lower triangle, the row-major upper one.
  const char uplo = 'L';
  int64_t status = 0;
  potrf(&uplo, &n, a, &n, &status);
  if (status == 0) potri(&uplo, &n, a, &n, &status);
  *info = status == 0 ? 0 : 1;
  if (status == 0) mirror_upper(a, n);
}

void check_inputs(const at::Tensor& M, const at::Tensor& lam) {
  TORCH_CHECK(M.device().is_cpu() && lam.device().is_cpu(), "M and lam must be CPU tensors");
  TORCH_CHECK(M.dim() == 3 && M.size(1) == M.size(2), "M must be a (B, n, n) stack of square matrices, got ",
              M.sizes());
  TORCH_CHECK(M.scalar_type() == at::kFloat || M.scalar_type() == at::kDouble, "M must be float32 or float64, got ",
              M.scalar_type());
  TORCH_CHECK(lam.dim() == 1 && lam.size(0) == M.size(0), "lam must hold one damping per matrix (", M.size(0),
              "), got shape ", lam.sizes());
}

// inv (contiguous, B x n x n) <- (inv + lam I)^-1 per matrix; info_b = 1 where the Cholesky fails
at::Tensor invert_stack_in_place(at::Tensor& inv, const at::Tensor& lam) {
  inv.diagonal(0, 1, 2).add_(lam.to(inv.scalar_type()).unsqueeze(1));
  const int64_t B = inv.size(0), n = inv.size(1);
  auto info = at::zeros({B}, inv.options().dtype(at::kInt));
  int32_t* status = info.data_ptr<int32_t>();
  const Lapack& l = lapack();
  for (int64_t b = 0; b < B; ++b) {
    if (inv.scalar_type() == at::kFloat)
      invert_in_place(inv[b].data_ptr<float>(), n, l.spotrf, l.spotri, status + b);
    else
      invert_in_place(inv[b].data_ptr<double>(), n, l.dpotrf, l.dpotri, status + b);
  }
  return info;
}

// torch's own path where LAPACK is not exported: the same results
std::tuple<at::Tensor, at::Tensor> torch_damped_inverse(const at::Tensor& M, const at::Tensor& lam) {
  auto damped = M.clone();
  damped.diagonal(0, 1, 2).add_(lam.to(M.scalar_type()).unsqueeze(1));
  auto [L, info] = at::linalg_cholesky_ex(damped);
  return {at::cholesky_inverse(L).mT().contiguous(), info.to(at::kInt)};
}

std::tuple<at::Tensor, at::Tensor> damped_cholesky_inverse_cpu(const at::Tensor& M, const at::Tensor& lam) {
  check_inputs(M, lam);
  if (!lapack().found()) return torch_damped_inverse(M, lam);
  auto inv = M.contiguous().clone();
  auto info = invert_stack_in_place(inv, lam);
  return {inv, info};
}

at::Tensor damped_cholesky_inverse_in_place_cpu(at::Tensor& M, const at::Tensor& lam) {
  check_inputs(M, lam);
  TORCH_CHECK(M.is_contiguous(), "M must be contiguous to be inverted in place");
  if (!lapack().found()) {
    auto [inv, info] = torch_damped_inverse(M, lam);
    M.copy_(inv);
    return info;
  }
  return invert_stack_in_place(M, lam);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fop_kernels, m) {
  m.def("damped_cholesky_inverse(Tensor M, Tensor lam) -> (Tensor, Tensor)");
  m.def("damped_cholesky_inverse_(Tensor(a!) M, Tensor lam) -> Tensor");
}

TORCH_LIBRARY_IMPL(fop_kernels, CPU, m) {
  m.impl("damped_cholesky_inverse", &damped_cholesky_inverse_cpu);
  m.impl("damped_cholesky_inverse_", &damped_cholesky_inverse_in_place_cpu);
}
