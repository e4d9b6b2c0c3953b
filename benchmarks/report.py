"""What every benchmark prints and saves beside its table: the command that produced it, and JSON."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path


def command_line(argv: list[str] | None, module: str) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m", module, *(shlex.quote(a) for a in args)])


def save(path: str | None, command: str, results: list[dict]) -> None:
    if path:
        Path(path).write_text(json.dumps({"command": command, "results": results}, indent=2))
