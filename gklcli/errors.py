"""The one exception type for user mistakes.

The CLI turns a `GKLError` into a single red line and exit code 2; anything else is a bug and keeps
its traceback. Messages must name the file, key and value at fault so the user can fix them without
reading code.
"""


class GKLError(Exception):
    """A mistake in user input (recipe, option, file) rather than a bug in gkl."""
