"""Session fixtures shared by several test files."""

from __future__ import annotations

import pytest

from gklcli.cli import main


@pytest.fixture(scope="session")
def smoke_out(tmp_path_factory):
    """`gkl reproduce table3 --smoke --seeds 2` then `table1 --smoke` into one output folder (≈ 1 min on CPU)."""
    out = tmp_path_factory.mktemp("reproduce")
    for args in (["table3", "--seeds", "2"], ["table1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["reproduce", *args, "--smoke", "--quiet", "--out", str(out), "--device", "cpu"])
        assert (exit_info.value.code or 0) == 0
    return out
