// The small-matrix symmetric eigensolver of csrc/eigh_small.cpp (plain C++, no ATen).
#pragma once

#include <cstdint>

namespace fop_kernels {

// k symmetric n x n matrices `a` (contiguous, row-major, finite, n <= kSmallMaxN) -> ascending eigenvalues
// `evals` (k x n) and eigenvectors as the columns of each n x n block of `evecs`. Returns -1, or the index of a
// matrix whose QL iteration did not converge (csrc/eigh_small.cpp).
constexpr int64_t kSmallMaxN = 64;
int64_t eigh_small_batch(const float* a, int64_t k, int64_t n, float* evals, float* evecs);
int64_t eigh_small_batch(const double* a, int64_t k, int64_t n, double* evals, double* evecs);

}  // namespace fop_kernels
