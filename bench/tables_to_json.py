"""Write the tables of bench/RESULTS.md that carry a JSON marker to bench/results/tables/ as JSON.

A marker is one line right above a table, ``<!-- json {"file": ..., "command": ..., "date": ..., "load": ...} -->``.
The file gets those keys, the section the table sits under, its "columns" and its "rows": one object per row,
column name -> cell text exactly as in the table (bold marks and ``\\|`` escapes removed; nothing parsed or rounded).
A repeated column name gets " #2", " #3" appended. ``--check`` writes nothing and exits 1 when a file differs or
has no marked table.

    python bench/tables_to_json.py [--check]
"""

import argparse
import json
import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MARKER = re.compile(r"^<!-- json (\{.*\}) -->$")
KEYS = ("file", "command", "date", "load")


def _cells(line: str) -> list[str]:
    inner = line.strip()
    if not (inner.startswith("|") and inner.endswith("|")):
        raise ValueError(f"not a table row: {line!r}")
    parts = re.split(r"(?<!\\)\|", inner[1:-1])
    return [p.strip().replace("\\|", "|").replace("**", "") for p in parts]


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return out


def tables(markdown: str) -> dict[str, dict]:
    """Map each marked table's file name to its JSON object."""
    lines = markdown.splitlines()
    out: dict[str, dict] = {}
    section: list[str] = []
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"^(#{2,4}) (.*)$", line)
        if heading:
            level = len(heading.group(1)) - 2
            section = section[:level] + [heading.group(2)]
            continue
        m = MARKER.match(line)
        if not m:
            continue
        meta = json.loads(m.group(1))
        missing = [k for k in KEYS if not meta.get(k)]
        if missing:
            raise ValueError(f"line {i + 1}: marker lacks {missing}")
        if meta["file"] in out:
            raise ValueError(f"line {i + 1}: {meta['file']} is marked twice")
        body = []
        for row in lines[i + 1:]:
            if not row.strip().startswith("|"):
                break
            body.append(row)
        if len(body) < 3 or not set(body[1].replace("|", "").split()) <= {"---"}:
            raise ValueError(f"line {i + 1}: no table (header, separator, rows) after the marker")
        columns = _unique(_cells(body[0]))
        rows = []
        for row in body[2:]:
            cells = _cells(row)
            if len(cells) != len(columns):
                raise ValueError(f"line {i + 1}: a row has {len(cells)} cells for {len(columns)} columns: {row!r}")
            rows.append(dict(zip(columns, cells)))
        out[meta["file"]] = {
            "source": "bench/RESULTS.md",
            "section": " / ".join(section),
            **{k: meta[k] for k in KEYS[1:]},
            **{k: v for k, v in meta.items() if k not in KEYS},
            "columns": columns,
            "rows": rows,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "tables")
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args()
    found = tables(args.results.read_text())
    stale = [str(p) for p in sorted(args.out.glob("*.json")) if p.name not in found] if args.check else []
    for name, data in found.items():
        path = args.out / name
        text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for path in stale:
        print(f"differs from bench/RESULTS.md or has no table there: {path}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
