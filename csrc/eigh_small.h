// The small-matrix symmetric eigensolver of csrc/eigh_small.cpp (plain C++, no ATen).
#pragma once

#include <cstdint>

namespace fop_kernels {

// One symmetric n x n matrix `a` (row-major, finite, n <= kSmallMaxN) -> ascending eigenvalues and the
// eigenvectors as columns of `evecs` (row-major n x n); `work` holds 3 n^2 + 4 n values. False if the QL
// iteration did not converge (csrc/eigh_small.cpp).
constexpr int64_t kSmallMaxN = 64;
bool eigh_small_matrix(const float* a, int64_t n, float* evals, float* evecs, float* work);
bool eigh_small_matrix(const double* a, int64_t n, double* evals, double* evecs, double* work);
inline int64_t eigh_small_work(int64_t n) { return 3 * n * n + 4 * n; }

}  // namespace fop_kernels
