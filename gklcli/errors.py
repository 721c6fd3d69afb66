"""The one exception type for user mistakes.

The CLI turns a `GKLError` into a single red line and exit code 2; anything else is a bug and keeps
its traceback. Messages must name the file, key and value at fault so the user can fix them without
reading code.
"""

import reprlib
from typing import Any

_REPR = reprlib.Repr()  # (keyword arguments need Python 3.12)
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 6, 80, 80


class GKLError(Exception):
    """A mistake in user input (recipe, option, file) rather than a bug in gkl."""


def show(value: Any) -> str:
    """A value as quoted in an error message: repr, bounded in size whatever the value (a YAML bomb
    or a 10,000-character option must not make the message itself the problem)."""
    return _REPR.repr(value)
