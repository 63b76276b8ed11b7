// C++ test of fop_kernels::eigh, damped_inverse and eigh_refresh through the dispatcher (run by ctest).
// Plain asserts, no test framework: exits non-zero and prints the failed check.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using TensorVec = std::vector<at::Tensor>;
int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
    ++failures;
  }
}

std::tuple<TensorVec, TensorVec> eigh(at::TensorList mats, bool clamp) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fop_kernels::eigh", "")
                       .typed<std::tuple<TensorVec, TensorVec>(at::TensorList, bool)>();
  return op.call(mats, clamp);
}

TensorVec damped_inverse(at::TensorList mats, const at::Tensor& damping, double power,
                         std::optional<at::TensorList> evals, std::optional<at::TensorList> evecs) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fop_kernels::damped_inverse", "")
                       .typed<TensorVec(at::TensorList, const at::Tensor&, double, std::optional<at::TensorList>,
                                        std::optional<at::TensorList>)>();
  return op.call(mats, damping, power, evals, evecs);
}

std::tuple<TensorVec, TensorVec> eigh_refresh(at::TensorList mats, at::TensorList prev, int64_t iters, bool clamp) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fop_kernels::eigh_refresh", "")
                       .typed<std::tuple<TensorVec, TensorVec>(at::TensorList, at::TensorList, int64_t, bool)>();
  return op.call(mats, prev, iters, clamp);
}

TensorVec random_spd(const std::vector<int64_t>& sizes, at::ScalarType dtype) {
  TensorVec mats;
  for (int64_t n : sizes) {
    at::Tensor x = at::randn({n + 2, n}, at::kDouble);
    mats.push_back(at::matmul(x.t(), x).div(n + 2).to(dtype));
  }
  return mats;
}

double max_abs(const at::Tensor& t) { return t.abs().max().item<double>(); }

void test_decomposition(at::ScalarType dtype, double tol) {
  const TensorVec mats = random_spd({1, 5, 64, 64, 64, 130, 200}, dtype);
  auto [evals, evecs] = eigh(mats, false);
  expect(evals.size() == mats.size() && evecs.size() == mats.size(), "one decomposition per matrix");
  for (size_t i = 0; i < mats.size(); ++i) {
    const at::Tensor q = evecs[i].to(at::kDouble), l = evals[i].to(at::kDouble), m = mats[i].to(at::kDouble);
    const double scale = max_abs(m);
    const std::string tag = " (matrix " + std::to_string(i) + ", " + std::string(c10::toString(dtype)) + ")";
    expect(max_abs(at::matmul(q * l, q.t()) - m) <= tol * scale, "reconstruction" + tag);
    expect(max_abs(at::matmul(q.t(), q) - at::eye(m.size(0), at::kDouble)) <= tol, "orthogonality" + tag);
    expect(max_abs(l - at::linalg_eigvalsh(m)) <= tol * scale, "eigenvalues vs eigvalsh" + tag);
    if (l.numel() > 1) expect((l.slice(0, 1) >= l.slice(0, 0, -1)).all().item<bool>(), "ascending" + tag);
  }
  const double damping = 0.05;
  const TensorVec inv = damped_inverse(mats, at::scalar_tensor(damping, at::kDouble), -1.0, evals, evecs);
  for (size_t i = 0; i < mats.size(); ++i) {
    const int64_t n = mats[i].size(0);
    const at::Tensor eye = at::eye(n, at::kDouble);
    const at::Tensor resid = at::matmul(inv[i].to(at::kDouble), mats[i].to(at::kDouble) + damping * eye) - eye;
    expect(max_abs(resid) <= 1e3 * tol, "damped inverse H (M + d I) = I, matrix " + std::to_string(i));
  }
  auto [rl, rq] = eigh_refresh(mats, evecs, 1, false);
  for (size_t i = 0; i < mats.size(); ++i)
    expect(max_abs(rl[i].to(at::kDouble) - evals[i].to(at::kDouble)) <= tol * max_abs(mats[i].to(at::kDouble)),
           "refresh from exact eigenvectors keeps the eigenvalues, matrix " + std::to_string(i));
}

void expect_error(const std::function<void()>& fn, const std::string& needle, const std::string& what) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    expect(msg.find(needle) != std::string::npos, what + ": message lacks '" + needle + "': " + msg);
    return;
  }
  expect(false, what + ": no error raised");
}

void test_errors() {
  TensorVec mats = random_spd({4, 6, 3}, at::kFloat);
  TensorVec asym = mats;
  asym[1] = mats[1].clone();
  asym[1].index_put_({0, 5}, 10.0);
  expect_error([&] { eigh(asym, false); }, "mats[1]", "non-symmetric");
  TensorVec nonfinite = mats;
  nonfinite[2] = mats[2].clone();
  nonfinite[2].index_put_({1, 1}, std::numeric_limits<float>::quiet_NaN());
  expect_error([&] { eigh(nonfinite, false); }, "mats[2] contains non-finite", "NaN input");
  expect_error([&] { eigh(TensorVec{}, false); }, "empty", "empty list");
  expect_error([&] { eigh(TensorVec{mats[0], at::ones({2, 3})}, false); }, "mats[1] is not square", "non-square");
  expect_error([&] { eigh(TensorVec{mats[0], mats[1].to(at::kHalf)}, false); }, "mats[1] has unsupported dtype",
               "half");
  TensorVec singular{at::zeros({3, 3})};
  expect_error([&] { damped_inverse(singular, at::scalar_tensor(0.0, at::kDouble), -1.0, std::nullopt, std::nullopt); },
               "mats[0] is singular", "singular without damping");
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_decomposition(at::kFloat, 1e-4);
  test_decomposition(at::kDouble, 1e-10);
  test_errors();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("test_eigh_cpp: all checks passed\n");
  return 0;
}
