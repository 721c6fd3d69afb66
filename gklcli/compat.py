"""The one place where gkl works around third-party packaging problems.

robustbench 1.1.1 (PyPI) depends on `pyautoattack` but still imports the git package's name:
``from autoattack import AutoAttack`` and ``from autoattack.state import EvaluationState`` in
`robustbench/eval.py`, which `robustbench/__init__.py` imports, so a plain ``import robustbench``
fails with ``ModuleNotFoundError: No module named 'autoattack'``. `import_robustbench` registers
`pyautoattack` under the old name before importing it. The module layouts are the same (`state.py` is
byte-identical); only `robustbench.eval.benchmark` would still fail (it passes the git API's
`log_path=`/`bs=`), and gkl never calls it — it runs pyautoattack itself.

`tests/test_compat.py` fails as soon as a robustbench release imports without this shim: delete the
shim then. (robustbench 1.1.1 also imports `pkg_resources`, hence `setuptools<81` in pyproject.)
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

from gklcli.errors import GKLError


def alias_autoattack() -> None:
    """Make `import autoattack` resolve to pyautoattack unless a real `autoattack` is installed."""
    if "autoattack" in sys.modules:
        return
    try:
        importlib.import_module("autoattack")
        return
    except ModuleNotFoundError:
        pass
    try:
        pyautoattack = importlib.import_module("pyautoattack")
        state = importlib.import_module("pyautoattack.state")
    except ModuleNotFoundError as err:
        raise GKLError("pyautoattack is not installed: pip install pyautoattack") from err
    sys.modules["autoattack"] = pyautoattack
    sys.modules["autoattack.state"] = state


def import_robustbench() -> ModuleType:
    """`import robustbench`, working around its 1.1.1 import of `autoattack`."""
    alias_autoattack()
    with warnings.catch_warnings():
        # pkg_resources' and torch.jit's deprecation warnings are robustbench's, not the user's.
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        try:
            return importlib.import_module("robustbench")
        except ModuleNotFoundError as err:
            raise GKLError(f"robustbench cannot be imported ({err}); reinstall gkl's dependencies") from err
