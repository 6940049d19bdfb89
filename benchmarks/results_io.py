"""Where the benchmark scripts put their results: the command that made them, and the files."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def command_line(module: str, argv: list[str] | None) -> str:
    """``python -m <module> <args>`` as it was run, for the header of a results table."""
    return " ".join(["python -m", module, *(argv if argv is not None else sys.argv[1:])])


def write_json(path: str | Path, data) -> None:
    """``data`` as indented JSON at ``path`` (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def write_results(out: Path, data, table: str) -> None:
    """``<out>.json`` (the raw rows) and ``<out>.md`` (the table)."""
    write_json(out.with_suffix(".json"), data)
    out.with_suffix(".md").write_text(table)
