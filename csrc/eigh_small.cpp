// Symmetric eigendecomposition of one small dense matrix (n <= kSmallMaxN), in registers and L1/L2 cache:
//
//   A = 2^s A'                       exact power-of-two scaling, max|A'| in [1, 2)
//   A' = Q T Q^T                     Householder tridiagonalization, H_k = I - tau_k v_k v_k^T
//   T = S diag(l) S^T                implicit QL with Wilkinson shifts and Givens rotations
//   A = (Q S) diag(2^s l) (Q S)^T    eigenvalues sorted ascending
//
// The rotations act on rows of Z = (Q S)^T, so every inner loop (trailing update, Q accumulation, rotation)
// runs along a contiguous row and vectorizes. Deflation: |e_m| <= eps max_i(|d_i| + |e_i|) (norm-wise, as
// EISPACK's tql2), so the decomposition is backward stable in the 2-norm like LAPACK's syevd. At n = 64 it skips
// the per-call overhead and level-2 BLAS calls of syevd (sytrd + stedc + ormtr) that dominate at this size.
// Compiled for AVX-512, AVX2 and baseline x86-64 (target_clones; one binary, dispatched at load time).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "eigh_small.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FOPK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FOPK_CLONES
#endif
#if defined(__GNUC__)
#define FOPK_INLINE inline __attribute__((always_inline))
#else
#define FOPK_INLINE inline
#endif

namespace fop_kernels {
namespace {

// y[0:m] += a x[0:m]
template <typename T>
FOPK_INLINE void axpy(int64_t m, T a, const T* __restrict x, T* __restrict y) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) y[j] += a * x[j];
}

template <typename T>
FOPK_INLINE T dot(int64_t m, const T* __restrict x, const T* __restrict y) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) s += x[j] * y[j];
  return s;
}

// Householder tridiagonalization of the full symmetric n x n matrix `a` (row-major, overwritten): d the diagonal,
// e[k] = T[k, k+1]; row k of `a` right of the diagonal keeps v_k (v_k[0] unnormalized), tau[k] its factor.
template <typename T>
FOPK_INLINE void tridiagonalize(int64_t n, T* __restrict a, T* __restrict d, T* __restrict e, T* __restrict tau,
                                T* __restrict p) {
  for (int64_t k = 0; k + 1 < n; ++k) {
    const int64_t m = n - k - 1;
    T* x = a + k * n + k + 1;  // row k = column k below the diagonal (the trailing block is kept symmetric)
    d[k] = a[k * n + k];
    const T tail = m > 1 ? dot(m - 1, x + 1, x + 1) : T(0);
    if (tail == 0) {  // already tridiagonal in this column: H_k = I
      e[k] = x[0];
      tau[k] = 0;
      continue;
    }
    const T norm = std::sqrt(x[0] * x[0] + tail);
    const T alpha = x[0] >= 0 ? -norm : norm;  // H_k x = alpha e_1
    const T v0 = x[0] - alpha;                 // |v0| = |x0| + norm: no cancellation
    x[0] = v0;
    const T t = -1 / (alpha * v0);  // 2 / (v^T v)
    e[k] = alpha;
    tau[k] = t;
    // A22 <- H A22 H = A22 - v w^T - w v^T with p = t A22 v, w = p - (t/2)(p^T v) v
    T* a22 = a + (k + 1) * n + k + 1;
    std::fill(p, p + m, T(0));
    for (int64_t j = 0; j < m; ++j) axpy(m, t * x[j], a22 + j * n, p);
    const T half = T(0.5) * t * dot(m, p, x);
    axpy(m, -half, x, p);
    for (int64_t i = 0; i < m; ++i) {
      T* row = a22 + i * n;
      const T vi = x[i], wi = p[i];
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) row[j] -= vi * p[j] + wi * x[j];
    }
  }
  d[n - 1] = a[(n - 1) * n + n - 1];
  e[n - 1] = 0;
}

// z <- Q^T, Q = H_0 H_1 ... H_{n-2} (backward accumulation into q, then transposed into z).
template <typename T>
FOPK_INLINE void form_qt(int64_t n, const T* __restrict a, const T* __restrict tau, T* __restrict q,
                         T* __restrict z, T* __restrict u) {
  std::fill(q, q + n * n, T(0));
  for (int64_t i = 0; i < n; ++i) q[i * n + i] = 1;
  for (int64_t k = n - 2; k >= 0; --k) {
    if (tau[k] == 0) continue;
    const int64_t m = n - k - 1;
    const T* v = a + k * n + k + 1;
    T* qs = q + (k + 1) * n + k + 1;  // Q[k+1:, k+1:] <- H_k Q[k+1:, k+1:]
    std::fill(u, u + m, T(0));
    for (int64_t i = 0; i < m; ++i) axpy(m, v[i], qs + i * n, u);
    for (int64_t i = 0; i < m; ++i) axpy(m, -tau[k] * v[i], u, qs + i * n);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) z[j * n + i] = q[i * n + j];
}

// Implicit QL on (d, e) with the rotations applied to rows of z; false if an eigenvalue took over 30 n sweeps.
template <typename T>
FOPK_INLINE bool tridiagonal_ql(int64_t n, T* __restrict d, T* __restrict e, T* __restrict z) {
  T tnorm = 0;
  for (int64_t i = 0; i < n; ++i) tnorm = std::max(tnorm, std::abs(d[i]) + std::abs(e[i]));
  const T tol = std::numeric_limits<T>::epsilon() * tnorm;
  int64_t budget = 30 * n;
  for (int64_t l = 0; l < n; ++l) {
    for (;;) {
      int64_t m = l;
      while (m + 1 < n && std::abs(e[m]) > tol) ++m;
      if (m == l) break;
      if (budget-- == 0) return false;
      T g = (d[l + 1] - d[l]) / (2 * e[l]);
      T r = std::sqrt(g * g + 1);
      g = d[m] - d[l] + e[l] / (g + (g >= 0 ? r : -r));  // Wilkinson shift
      T s = 1, c = 1, p = 0;
      int64_t i = m - 1;
      for (; i >= l; --i) {
        const T f = s * e[i], b = c * e[i];
        r = std::sqrt(f * f + g * g);
        e[i + 1] = r;
        if (r == 0) {  // underflow: deflate here and restart
          d[i + 1] -= p;
          e[m] = 0;
          break;
        }
        const T inv = 1 / r;
        s = f * inv;
        c = g * inv;
        g = d[i + 1] - p;
        r = (d[i] - g) * s + 2 * c * b;
        p = s * r;
        d[i + 1] = g + p;
        g = c * r - b;
        T* __restrict zi = z + i * n;
        T* __restrict zj = zi + n;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          const T lo = zi[k], hi = zj[k];
          zj[k] = s * lo + c * hi;
          zi[k] = c * lo - s * hi;
        }
      }
      if (r == 0 && i >= l) continue;
      d[l] -= p;
      e[l] = g;
      e[m] = 0;
    }
  }
  return true;
}

template <typename T>
FOPK_INLINE bool eigh_small(const T* __restrict in, int64_t n, T* __restrict evals, T* __restrict evecs,
                            T* __restrict work) {
  T* a = work;
  T* q = a + n * n;
  T* z = q + n * n;
  T* d = z + n * n;
  T* e = d + n;
  T* tau = e + n;
  T* tmp = tau + n;
  T amax = 0;
  for (int64_t i = 0; i < n * n; ++i) amax = std::max(amax, std::abs(in[i]));
  if (amax == 0) {
    std::fill(evals, evals + n, T(0));
    std::fill(evecs, evecs + n * n, T(0));
    for (int64_t i = 0; i < n; ++i) evecs[i * n + i] = 1;
    return true;
  }
  const int shift = std::ilogb(amax);
  const T s1 = std::ldexp(T(1), -shift / 2), s2 = std::ldexp(T(1), -shift + shift / 2);  // each in range
#pragma omp simd
  for (int64_t i = 0; i < n * n; ++i) a[i] = in[i] * s1 * s2;
  tridiagonalize(n, a, d, e, tau, tmp);
  form_qt(n, a, tau, q, z, tmp);
  if (!tridiagonal_ql(n, d, e, z)) return false;
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return d[x] < d[y]; });
  for (int64_t j = 0; j < n; ++j) {
    evals[j] = std::ldexp(d[order[j]], shift);
    const T* zr = z + order[j] * n;
    for (int64_t r = 0; r < n; ++r) evecs[r * n + j] = zr[r];
  }
  return true;
}

}  // namespace

FOPK_CLONES bool eigh_small_matrix(const float* a, int64_t n, float* evals, float* evecs, float* work) {
  return eigh_small(a, n, evals, evecs, work);
}

FOPK_CLONES bool eigh_small_matrix(const double* a, int64_t n, double* evals, double* evecs, double* work) {
  return eigh_small(a, n, evals, evecs, work);
}

}  // namespace fop_kernels
