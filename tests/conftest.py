"""Session fixtures shared by several test files, and the device of the device-aware tests.

GKL_TEST_DEVICE (default ``cpu``) is the device of the tests that take the ``device`` fixture; they
carry the ``device`` marker, so ``-m device`` selects them (the device-sensitive part of the suite).

* ``cpu``: the suite is the CPU suite on every machine. CUDA is hidden from this process and its
  subprocesses (CUDA_VISIBLE_DEVICES=""), so on a GPU machine no code path picks ``cuda`` implicitly
  (`pick_device(None)`, `init_distributed(None)`) and every number is the one the CPU machines check.
* ``cuda`` or ``cuda:N``: the device-aware tests run there, and tests that assert CPU-exact numbers
  (bit-identical resume, the AT/KD recipe sweeps, the DDP gloo run) keep an explicit CPU device.
  ``GKL_TEST_DEVICE=cuda python -m pytest -q -m device`` is the GPU part; the unmarked rest of the
  suite is written for the CPU and belongs to the default run.

Every test runs with fp32 as fp32 (no TF32 in matmuls or cuDNN convolutions, which PyTorch allows
by default for convolutions on Ampere and newer) and cuDNN's deterministic, non-benchmarked
algorithms; the previous settings are restored afterwards (the engine turns benchmarking on).
"""

from __future__ import annotations

import os

TEST_DEVICE = os.environ.get("GKL_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if TEST_DEVICE == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA; inherited by subprocesses
if os.path.isdir("/sys/class/net/lo"):
    # gloo (the CPU DDP tests) over loopback, whatever the machine's host name resolves to
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import pytest  # noqa: E402
import torch  # noqa: E402

from gklcli.cli import main  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "device: device-aware test, runs on GKL_TEST_DEVICE (cpu by default); -m device selects them")
    if TEST_DEVICE != "cpu":
        if TEST_DEVICE != "cuda" and not (TEST_DEVICE.startswith("cuda:") and TEST_DEVICE[5:].isdigit()):
            raise pytest.UsageError(f"GKL_TEST_DEVICE={TEST_DEVICE}: expected cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"GKL_TEST_DEVICE={TEST_DEVICE}, but torch {torch.__version__} sees no CUDA device")


def pytest_report_header(config):
    name = torch.cuda.get_device_name(torch.device(TEST_DEVICE)) if TEST_DEVICE != "cpu" else "CUDA hidden"
    return f"gkl test device (GKL_TEST_DEVICE): {TEST_DEVICE} ({name})"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of device-aware tests: GKL_TEST_DEVICE, cpu by default."""
    if TEST_DEVICE == "cuda":
        return torch.device("cuda", torch.cuda.current_device())  # an index: DDP, set_device and comparisons need one
    return torch.device(TEST_DEVICE)


def _exact_float32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


@pytest.fixture(scope="session", autouse=True)
def _exact_float32_session():
    """Before the session fixtures (they train models) as well as before each test."""
    _exact_float32()
    yield


@pytest.fixture(autouse=True)
def _exact_float32_test():
    b = torch.backends
    saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic)
    _exact_float32()
    yield
    b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic = saved


@pytest.fixture(scope="session")
def smoke_out(tmp_path_factory):
    """`gkl reproduce table3 --smoke --seeds 2` then `table1 --smoke` into one output folder (≈ 1 min on CPU)."""
    out = tmp_path_factory.mktemp("reproduce")
    for args in (["table3", "--seeds", "2"], ["table1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["reproduce", *args, "--smoke", "--quiet", "--out", str(out), "--device", "cpu"])
        assert (exit_info.value.code or 0) == 0
    return out
