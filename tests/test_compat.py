"""The robustbench/pyautoattack compatibility shim (gklcli/compat.py) and the reason it exists."""

from __future__ import annotations

import subprocess
import sys

from gklcli.compat import import_robustbench


def test_robustbench_still_needs_the_autoattack_shim():
    """Fails once a robustbench release imports on its own: then delete gklcli/compat.py's shim."""
    proc = subprocess.run([sys.executable, "-c", "import robustbench"], capture_output=True, text=True)
    assert proc.returncode != 0, "robustbench now imports without the shim: remove alias_autoattack"
    assert "No module named 'autoattack'" in proc.stderr


def test_import_robustbench_aliases_pyautoattack():
    import pyautoattack
    import pyautoattack.state

    rb = import_robustbench()
    assert sys.modules["autoattack"] is pyautoattack
    assert sys.modules["autoattack.state"] is pyautoattack.state
    from robustbench.utils import load_model  # noqa: F401  (the part of robustbench gkl uses)

    assert rb.__name__ == "robustbench"
