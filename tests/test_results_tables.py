"""bench/tables_to_json.py: the JSON in bench/results/tables/ is what the marked tables of bench/RESULTS.md say, and
the parser keeps cells as printed (escaped pipes, bold marks, repeated column names) and refuses malformed tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "tables_to_json.py"


@pytest.fixture(scope="module")
def t2j():
    return load_script(SCRIPT, "tables_to_json")


def test_committed_json_matches_results(t2j):
    found = t2j.tables((ROOT / "bench" / "RESULTS.md").read_text())
    out = ROOT / "bench" / "results" / "tables"
    assert found, "no marked table in bench/RESULTS.md"
    assert sorted(p.name for p in out.glob("*.json")) == sorted(found)
    for name, data in found.items():
        assert json.loads((out / name).read_text()) == data, name


MARK = '<!-- json {"file": "x.json", "command": "run it", "date": "2026-12-02", "load": "1.0"} -->'


def test_cells_kept_as_printed(t2j):
    md = "\n".join(["## Top", "### Sub", "```", "## a shell comment, not a heading", "```", "", MARK,
                    "| a | ratio | ratio |", "| --- | --- | --- |", "| s \\| t | **1.50x** (1.2-1.6) | 0.9x |",
                    "", "after"])
    data = t2j.tables(md)["x.json"]
    assert data["section"] == "Top / Sub"
    assert (data["command"], data["date"], data["load"]) == ("run it", "2026-12-02", "1.0")
    assert data["columns"] == ["a", "ratio", "ratio #2"]
    assert data["rows"] == [{"a": "s | t", "ratio": "1.50x (1.2-1.6)", "ratio #2": "0.9x"}]


@pytest.mark.parametrize("body, message", [
    (["| a | b |", "| --- | --- |", "| 1 |"], "cells"),
    (["| a | b |", "| 1 | 2 |"], "no table"),
    (["text"], "no table"),
])
def test_malformed_table_is_refused(t2j, body, message):
    with pytest.raises(ValueError, match=message):
        t2j.tables("\n".join([MARK, *body]))


def test_marker_needs_command_date_and_load(t2j):
    with pytest.raises(ValueError, match="lacks"):
        t2j.tables('<!-- json {"file": "x.json", "date": "d"} -->\n| a |\n| --- |\n| 1 |')
