"""Stop requests from outside: the SIGTERM/SIGINT/SIGUSR2 handlers a training run installs and restores.

Its own module because it touches process-wide state (the signal table) that the engine must hand
back unchanged however the run ends; the engine's handler only sets a flag that the loop checks.
"""

from __future__ import annotations

import signal
from typing import Any, Callable


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


def install_signal_handlers(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """SIGTERM (cluster preemption), SIGINT and SIGUSR2 (the pre-timeout signal submitit asks Slurm
    for) stop at the next step end with a checkpoint."""
    previous = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside some test runners)
            pass
    return previous


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
