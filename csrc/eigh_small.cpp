// Symmetric eigendecomposition of many small dense matrices of one size (n <= kSmallMaxN), in L1/L2 cache:
//
//   A = 2^s A'                       exact power-of-two scaling, max|A'| in [1, 2)
//   A' = Q T Q^T                     Householder tridiagonalization, H_k = I - tau_k v_k v_k^T
//   T = S diag(l) S^T                implicit QL with Wilkinson shifts and Givens rotations
//   A = (Q S) diag(2^s l) (Q S)^T    eigenvalues sorted ascending
//
// 16 (float) or 8 (double) matrices are decomposed together, one per lane of a 512-bit vector (entry (i, j) of
// the group is one contiguous vector), so every step -- the reflections, the accumulation of Q, the QL
// rotations and their application to Q's columns -- is a vector operation over the group whatever n is, and the
// latency of each rotation's sqrt and division is paid once per group. The QL sweeps run in lockstep, a lane
// outside its unreduced block applying the identity. Deflation: |e_m| <= eps max_i(|d_i| + |e_i|) (norm-wise,
// as EISPACK's tql2), so the decomposition is backward stable in the 2-norm like LAPACK's syevd.
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

// Lane layout: entry (i, j) of the L matrices of a group is the contiguous vector x[(i * n + j) * L + 0 .. L).
// Every loop below runs over lanes innermost (`#pragma omp simd`), so it is one vector operation whatever n is.

// Householder tridiagonalization of L symmetric matrices (upper triangle of `a` read and overwritten): d the
// diagonal, e[k] = T[k, k+1]; row k of `a` right of the diagonal keeps v_k, tau[k] its factor (0: H_k = I).
template <typename T, int L>
FOPK_INLINE void tridiagonalize(int64_t n, T* __restrict a, T* __restrict d, T* __restrict e, T* __restrict tau,
                                T* __restrict p) {
  auto A = [&](int64_t i, int64_t j) { return a + (i * n + j) * L; };
  for (int64_t k = 0; k + 1 < n; ++k) {
    const int64_t m = n - k - 1;
    T* x0 = A(k, k + 1);  // x_j = A(k, k+1+j): the column below the diagonal, read as the row right of it
    T tail[L] = {};
    for (int64_t j = 1; j < m; ++j) {
      const T* xj = x0 + j * L;
#pragma omp simd
      for (int b = 0; b < L; ++b) tail[b] += xj[b] * xj[b];
    }
    T* t = tau + k * L;
#pragma omp simd
    for (int b = 0; b < L; ++b) {
      d[k * L + b] = A(k, k)[b];
      const T x = x0[b], norm = std::sqrt(x * x + tail[b]);
      const T alpha = x >= 0 ? -norm : norm;  // H_k x = alpha e_1
      const T v0 = x - alpha;                 // |v0| = |x| + norm: no cancellation
      const bool reflect = tail[b] != 0;
      e[k * L + b] = reflect ? alpha : x;
      t[b] = reflect ? -1 / (alpha * v0) : T(0);  // 2 / (v^T v)
      x0[b] = reflect ? v0 : x;
    }
    // A22 <- H A22 H = A22 - v w^T - w v^T with p = t A22 v, w = p - (t/2)(p^T v) v; upper triangle only
    std::fill(p, p + m * L, T(0));
    for (int64_t i = 0; i < m; ++i) {
      const T* xi = x0 + i * L;
      const T* row = A(k + 1 + i, k + 1 + i);
      T acc[L];
#pragma omp simd
      for (int b = 0; b < L; ++b) acc[b] = row[b] * xi[b];
      for (int64_t j = i + 1; j < m; ++j) {
        const T* aij = row + (j - i) * L;
        const T* xj = x0 + j * L;
        T* pj = p + j * L;
#pragma omp simd
        for (int b = 0; b < L; ++b) {
          acc[b] += aij[b] * xj[b];
          pj[b] += aij[b] * xi[b];
        }
      }
      T* pi = p + i * L;
#pragma omp simd
      for (int b = 0; b < L; ++b) pi[b] += acc[b];
    }
    T pv[L] = {};
    for (int64_t j = 0; j < m; ++j) {
      T* pj = p + j * L;
      const T* xj = x0 + j * L;
#pragma omp simd
      for (int b = 0; b < L; ++b) {
        pj[b] *= t[b];
        pv[b] += pj[b] * xj[b];
      }
    }
#pragma omp simd
    for (int b = 0; b < L; ++b) pv[b] *= T(0.5) * t[b];
    for (int64_t j = 0; j < m; ++j) {
      T* pj = p + j * L;
      const T* xj = x0 + j * L;
#pragma omp simd
      for (int b = 0; b < L; ++b) pj[b] -= pv[b] * xj[b];
    }
    for (int64_t i = 0; i < m; ++i) {
      const T* xi = x0 + i * L;
      const T* wi = p + i * L;
      T* row = A(k + 1 + i, k + 1);
      for (int64_t j = i; j < m; ++j) {
        const T* xj = x0 + j * L;
        const T* wj = p + j * L;
        T* aij = row + j * L;
#pragma omp simd
        for (int b = 0; b < L; ++b) aij[b] -= xi[b] * wj[b] + wi[b] * xj[b];
      }
    }
  }
#pragma omp simd
  for (int b = 0; b < L; ++b) {
    d[(n - 1) * L + b] = a[((n - 1) * n + n - 1) * L + b];
    e[(n - 1) * L + b] = 0;
  }
}

// q <- Q = H_0 H_1 ... H_{n-2} by backward accumulation (v_k, tau from tridiagonalize).
template <typename T, int L>
FOPK_INLINE void form_q(int64_t n, const T* __restrict a, const T* __restrict tau, T* __restrict q,
                        T* __restrict u) {
  std::fill(q, q + n * n * L, T(0));
  for (int64_t i = 0; i < n; ++i)
    for (int b = 0; b < L; ++b) q[(i * n + i) * L + b] = 1;
  for (int64_t k = n - 2; k >= 0; --k) {
    const int64_t m = n - k - 1;
    const T* v = a + (k * n + k + 1) * L;
    const T* t = tau + k * L;
    std::fill(u, u + m * L, T(0));  // u_j = sum_i v_i Q(k+1+i, k+1+j)
    for (int64_t i = 0; i < m; ++i) {
      const T* vi = v + i * L;
      const T* row = q + ((k + 1 + i) * n + k + 1) * L;
      for (int64_t j = 0; j < m; ++j) {
        T* uj = u + j * L;
        const T* qij = row + j * L;
#pragma omp simd
        for (int b = 0; b < L; ++b) uj[b] += vi[b] * qij[b];
      }
    }
    for (int64_t i = 0; i < m; ++i) {  // Q(k+1+i, k+1+j) -= tau v_i u_j
      T tv[L];
#pragma omp simd
      for (int b = 0; b < L; ++b) tv[b] = t[b] * v[i * L + b];
      T* row = q + ((k + 1 + i) * n + k + 1) * L;
      for (int64_t j = 0; j < m; ++j) {
        const T* uj = u + j * L;
        T* qij = row + j * L;
#pragma omp simd
        for (int b = 0; b < L; ++b) qij[b] -= tv[b] * uj[b];
      }
    }
  }
}

// The rotations of one QL sweep: pairs (i, i+1) for i = top-1 down to lo; rotation i of lane b is
// (cs, sn)[(i - lo) * L + b] in the log's arrays from offset `at`.
struct Sweep {
  int64_t lo, top, at;
};

// Applies the logged sweeps, in order, to the columns of R consecutive rows of q (R rows stay in L1 while the
// log streams past; within a sweep hi = q(r, i+1) after the rotations above it is carried in registers).
template <typename T, int L, int R>
FOPK_INLINE void rotate_rows(T* __restrict rows, int64_t n, const std::vector<Sweep>& sweeps,
                             const T* __restrict cs, const T* __restrict sn) {
  for (const Sweep& w : sweeps) {
    T carry[R][L];
    for (int k = 0; k < R; ++k)
#pragma omp simd
      for (int b = 0; b < L; ++b) carry[k][b] = rows[(k * n + w.top) * L + b];
    for (int64_t i = w.top - 1; i >= w.lo; --i) {
      const T* ci = cs + w.at + (i - w.lo) * L;
      const T* si = sn + w.at + (i - w.lo) * L;
      for (int k = 0; k < R; ++k) {
        T* qi = rows + (k * n + i) * L;
#pragma omp simd
        for (int b = 0; b < L; ++b) {
          const T lo = qi[b];
          qi[L + b] = si[b] * lo + ci[b] * carry[k][b];
          carry[k][b] = ci[b] * lo - si[b] * carry[k][b];
        }
      }
    }
    for (int k = 0; k < R; ++k)
#pragma omp simd
      for (int b = 0; b < L; ++b) rows[(k * n + w.lo) * L + b] = carry[k][b];
  }
}

// Implicit QL on L tridiagonal problems at once (d, e in lane layout). Each lane b works on its own eigenvalue
// l_b (the top of its unreduced block l_b..m_b); a sweep runs over the union of the lanes' blocks, a lane outside
// its block applying the identity, so the serial chain of each rotation (sqrt, division) is shared by L matrices.
// The rotations are logged (cs, sn, sweeps) and applied to q afterwards (rotate_rows). Returns the first lane
// whose eigenvalues took over 30 n sweeps, or -1.
template <typename T, int L>
FOPK_INLINE int tridiagonal_ql(int64_t n, T* __restrict d, T* __restrict e, std::vector<Sweep>& sweeps,
                               std::vector<T>& cs, std::vector<T>& sn) {
  T tol[L], s[L], c[L], p[L], g[L];
  int64_t l[L], m[L], count[L];
  bool on[L], broke[L];
  for (int b = 0; b < L; ++b) {
    T tnorm = 0;
    for (int64_t i = 0; i < n; ++i) tnorm = std::max(tnorm, std::abs(d[i * L + b]) + std::abs(e[i * L + b]));
    tol[b] = std::numeric_limits<T>::epsilon() * tnorm;
    count[b] = 0;
    l[b] = 0;
  }
  sweeps.clear();
  cs.clear();
  sn.clear();
  for (;;) {
    int64_t lo = n, top = 0;
    for (int b = 0; b < L; ++b) {  // advance l_b past converged eigenvalues; m_b: the end of its block
      int64_t mb = l[b];
      for (;;) {
        mb = l[b];
        while (mb + 1 < n && std::abs(e[mb * L + b]) > tol[b]) ++mb;
        if (mb != l[b] || l[b] + 1 >= n) break;
        ++l[b];
      }
      m[b] = mb;
      on[b] = mb != l[b];
      broke[b] = false;
      if (!on[b]) continue;
      if (++count[b] > 30 * n) return b;
      lo = std::min(lo, l[b]);
      top = std::max(top, mb);
    }
    if (lo >= top) break;
    for (int b = 0; b < L; ++b) {
      const int64_t lb = on[b] ? l[b] : 0;
      const T dl = d[lb * L + b], el = e[lb * L + b];
      const T gb = on[b] ? (d[(lb + 1) * L + b] - dl) / (2 * el) : T(0);
      const T r = std::sqrt(gb * gb + 1);
      g[b] = on[b] ? d[m[b] * L + b] - dl + el / (gb + (gb >= 0 ? r : -r)) : T(0);  // Wilkinson shift
      s[b] = 1;
      c[b] = 1;
      p[b] = 0;
    }
    const int64_t at = static_cast<int64_t>(cs.size());
    sweeps.push_back({lo, top, at});
    cs.resize(at + (top - lo) * L);
    sn.resize(at + (top - lo) * L);
    for (int64_t i = top - 1; i >= lo; --i) {
      T* __restrict ei = e + i * L;
      T* __restrict di = d + i * L;
      T* __restrict ci = cs.data() + at + (i - lo) * L;
      T* __restrict si = sn.data() + at + (i - lo) * L;
#pragma omp simd
      for (int b = 0; b < L; ++b) {
        const bool act = on[b] && !broke[b] && i < m[b] && i >= l[b];
        const T f = s[b] * ei[b], bb = c[b] * ei[b];
        const T r = std::sqrt(f * f + g[b] * g[b]);
        const bool rot = act && r != 0;
        const T inv = rot ? 1 / r : T(0);
        const T sb = f * inv, cb = g[b] * inv;
        const T gg = di[L + b] - p[b];
        const T rr = (di[b] - gg) * sb + 2 * cb * bb;
        const T pp = sb * rr;
        if (act) ei[L + b] = r;
        di[L + b] = rot ? gg + pp : (act ? di[L + b] - p[b] : di[L + b]);  // r == 0: underflow, deflate here
        broke[b] = broke[b] || (act && !rot);
        s[b] = rot ? sb : s[b];
        c[b] = rot ? cb : c[b];
        p[b] = rot ? pp : p[b];
        g[b] = rot ? cb * rr - bb : g[b];
        ci[b] = rot ? cb : T(1);
        si[b] = rot ? sb : T(0);
      }
    }
    for (int b = 0; b < L; ++b) {
      if (!on[b]) continue;
      if (!broke[b]) {
        d[l[b] * L + b] -= p[b];
        e[l[b] * L + b] = g[b];
      }
      e[m[b] * L + b] = 0;
    }
  }
  return -1;
}

// k matrices of size n (contiguous, row-major) in groups of L lanes; -1 or the index of a matrix that failed.
template <typename T>
FOPK_INLINE int64_t eigh_small(const T* __restrict in, int64_t k, int64_t n, T* __restrict evals,
                               T* __restrict evecs) {
  constexpr int L = 64 / sizeof(T);  // one 512-bit vector of lanes
  std::vector<T> buf(L * (2 * n * n + 4 * n)), cs, sn;
  std::vector<Sweep> sweeps;
  T* a = buf.data();
  T* q = a + L * n * n;
  T* d = q + L * n * n;
  T* e = d + L * n;
  T* tau = e + L * n;
  T* tmp = tau + L * n;
  std::vector<int64_t> order(n);
  for (int64_t g0 = 0; g0 < k; g0 += L) {
    const int used = static_cast<int>(std::min<int64_t>(L, k - g0));
    int shift[L] = {};
    for (int b = 0; b < L; ++b) {  // lane b <- 2^-shift M_b^T (exact; the upper triangle of a is M's lower one,
                                   // as LAPACK's uplo = 'L'); a zero matrix or an unused lane stays 0
      const T* mb = in + (g0 + b) * n * n;
      T amax = 0;
      if (b < used) {
#pragma omp simd reduction(max : amax)
        for (int64_t i = 0; i < n * n; ++i) amax = std::max(amax, std::abs(mb[i]));
      }
      if (amax == 0) {
        for (int64_t i = 0; i < n * n; ++i) a[i * L + b] = 0;
        continue;
      }
      shift[b] = std::ilogb(amax);
      const T s1 = std::ldexp(T(1), -shift[b] / 2), s2 = std::ldexp(T(1), -shift[b] + shift[b] / 2);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < n; ++i) a[(j * n + i) * L + b] = mb[i * n + j] * s1 * s2;
    }
    tridiagonalize<T, L>(n, a, d, e, tau, tmp);
    form_q<T, L>(n, a, tau, q, tmp);
    const int bad = tridiagonal_ql<T, L>(n, d, e, sweeps, cs, sn);
    if (bad >= 0) return g0 + bad;
    int64_t r = 0;
    for (; r + 8 <= n; r += 8) rotate_rows<T, L, 8>(q + r * n * L, n, sweeps, cs.data(), sn.data());
    for (; r < n; ++r) rotate_rows<T, L, 1>(q + r * n * L, n, sweeps, cs.data(), sn.data());
    for (int b = 0; b < used; ++b) {
      std::iota(order.begin(), order.end(), int64_t(0));
      std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return d[x * L + b] < d[y * L + b]; });
      T* l = evals + (g0 + b) * n;
      T* v = evecs + (g0 + b) * n * n;
      for (int64_t j = 0; j < n; ++j) l[j] = std::ldexp(d[order[j] * L + b], shift[b]);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < n; ++j) v[r * n + j] = q[(r * n + order[j]) * L + b];
    }
  }
  return -1;
}

}  // namespace

FOPK_CLONES int64_t eigh_small_batch(const float* a, int64_t k, int64_t n, float* evals, float* evecs) {
  return eigh_small(a, k, n, evals, evecs);
}

FOPK_CLONES int64_t eigh_small_batch(const double* a, int64_t k, int64_t n, double* evals, double* evecs) {
  return eigh_small(a, k, n, evals, evecs);
}

}  // namespace fop_kernels
