"""Collection and reporting of the microbenchmarks (`make bench`, `make bench-smoke`).

- Files `bench_*.py` in this folder are collected (pytest's default pattern is `test_*.py`).
- `--smoke` sets FOP_BENCH_SMOKE=1 before the modules are imported: tiny shapes, one round.
- Within each benchmark function, the rows of one case run together and in the order of their `impl`
  parametrization (reference, plain-torch alternatives, fast backends), so every row's ratios are against rows
  of its own group measured just before it.
- At the end: a summary table (op, shape, dtype, backend, median, ratios). A run in which a collected module
  timed nothing, or nothing was timed at all, fails (so a benchmark that stops running fails CI).
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--smoke", action="store_true", help="tiny shapes, one round (FOP_BENCH_SMOKE=1)")


def pytest_configure(config):
    if config.getoption("--smoke"):
        os.environ["FOP_BENCH_SMOKE"] = "1"


def pytest_collect_file(file_path, parent):
    """bench_*.py files; one named on the command line is collected by pytest itself (not twice)."""
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _case_key(item, first_seen: dict) -> tuple:
    """(function position, indices of the non-impl parameters, index of impl)."""
    fn = first_seen.setdefault((str(item.path), item.originalname), len(first_seen))
    spec = getattr(item, "callspec", None)
    if spec is None:
        return fn, (), 0
    others = tuple(v for k, v in sorted(spec.indices.items()) if k != "impl")
    return fn, others, spec.indices.get("impl", 0)


def pytest_collection_modifyitems(session, config, items):
    first_seen: dict = {}
    keys = {id(item): _case_key(item, first_seen) for item in items}
    items.sort(key=lambda item: keys[id(item)])


def pytest_collection_finish(session):
    """The modules selected to run (after -k/-m deselection)."""
    session.config._fop_bench_modules = sorted({item.nodeid.split("::")[0] for item in session.items})


def _failures(config) -> list[str]:
    from _timing import ROWS

    if config.option.collectonly:
        return []
    modules = getattr(config, "_fop_bench_modules", [])
    if not modules:
        return ["no benchmark was collected"]
    timed = {r.module for r in ROWS}
    return [f"{m}: no benchmark ran" for m in modules if m not in timed]


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0 and _failures(session.config):
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from _timing import ROWS, summary_lines

    if ROWS:
        terminalreporter.section("fop-kernels microbenchmarks (ratios: t_other / t_row, > 1 means this row is faster)")
        for line in summary_lines(ROWS):
            terminalreporter.write_line(line)
    for problem in _failures(config):
        terminalreporter.write_line(f"FAILED: {problem}", red=True)
