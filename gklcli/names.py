"""User strings that become file names or code: checked whole, with one rule each.

`re.fullmatch` and not `re.match(...$)`: `$` also matches before a final newline, so "Foo\n" would
pass and become a file name ending in a newline (and a zoo entry that does not parse)."""

from __future__ import annotations

import re

from gklcli.errors import GKLError, show

MAX_NAME = 100
# a RobustBench model ID: a Python-safe key of the zoo dict and a file name <dir>/<dataset>/<threat>/<ID>.pt
MODEL_ID = re.compile(rf"[A-Za-z][A-Za-z0-9_\-]{{0,{MAX_NAME - 1}}}")
# a run name (meta.name): the folder runs/<name>
RUN_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.+\-]{{0,{MAX_NAME - 1}}}")
RULES = {
    MODEL_ID: "a letter, then letters, digits, '_' or '-'",
    RUN_NAME: "a letter or digit, then letters, digits, '_', '.', '+' or '-'",
}


def check_name(value: str, what: str, pattern: re.Pattern[str], why: str) -> str:
    """`value` if the whole of it matches `pattern`; else one line naming `what` and the rule."""
    if pattern.fullmatch(value):
        return value
    size = f" ({len(value)} characters)" if len(value) > MAX_NAME else ""
    raise GKLError(f"{what} {show(value)}{size}: must be {RULES[pattern]}, at most {MAX_NAME} characters ({why})")
