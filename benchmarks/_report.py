"""The shared ending of the benchmark scripts: a rich table on the console and, optionally, JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.table import Table


def report(title: str, columns: list[str], cells: list[list[str]], json_path: Optional[str], payload: dict[str, Any]) -> None:
    """Print `cells` under `columns`; write `payload` to `json_path` when given."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in cells:
        table.add_row(*row)
    Console().print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(payload, indent=2))
