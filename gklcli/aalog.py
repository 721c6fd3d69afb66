"""Reading pyautoattack as it runs: the points each attack removed, and live progress.

pyautoattack reports its stages only as DEBUG log lines ("apgd-t - 2/4 - 31 out of 500
successfully perturbed"). `StageCounter` turns them into per-attack counts and progress text, and
refuses counts that do not add up to the attack's own result, so a change of its log format stops
an evaluation instead of silently corrupting the per-stage table. `EvalProgress` shows that text.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable, Optional

from gklcli.errors import GKLError

AA_STAGE = re.compile(r"^(\S+) - (\d+)/(\d+) - (\d+) out of \d+ successfully perturbed")
AA_DONE = re.compile(r"^robust accuracy after (\S+):")
AA_INITIAL = re.compile(r"^initial accuracy: ([\d.]+)%$")


class StageCounter(logging.Handler):
    """Follows pyautoattack's DEBUG log: the points each attack removed, and a progress line per batch.

    `on_stage(text, finished)` gets "apgd-t batch 2/4: 312/500 robust, 45 s" after each batch and
    "apgd-t done: …" when the attack ends (`finished`), so a long chunk shows where it is. The counts
    come from log text, so `verify` checks that they add up to the attack's own result."""

    def __init__(self, n: int, on_stage: Optional[Callable[[str, bool], None]] = None):
        super().__init__(logging.DEBUG)
        self.removed: dict[str, int] = {}
        self.order: list[str] = []
        self.initial: Optional[float] = None  # pyautoattack's clean accuracy (%) of the points it attacks
        self.robust, self.n, self.tick = n, n, time.perf_counter()
        self.on_stage = on_stage

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        match, done, initial = AA_STAGE.match(message), AA_DONE.match(message), AA_INITIAL.match(message)
        if initial:
            self.initial = float(initial.group(1))
            self.robust = round(self.initial * self.n / 100)
        elif match:
            attack, batch, batches, removed = match.group(1), match.group(2), match.group(3), int(match.group(4))
            if attack not in self.removed:
                self.order.append(attack)
                self.removed[attack] = 0
            self.removed[attack] += removed
            self.robust -= removed
            self._report(f"{attack} batch {batch}/{batches}", False)
        elif done:
            self._report(f"{done.group(1).lower()} done", True)

    def _report(self, what: str, finished: bool) -> None:
        if self.on_stage is not None:
            self.on_stage(f"{what}: {self.robust}/{self.n} robust, {time.perf_counter() - self.tick:.1f} s", finished)

    def verify(self, robust_end: int) -> None:
        """Refuse per-attack counts that do not add up: pyautoattack's log format changed."""
        from pyautoattack import __version__ as aa_version

        if self.initial is None:
            raise GKLError(f"pyautoattack {aa_version}: its log no longer reports 'initial accuracy: …', so gkl cannot count "
                           "the points each attack removed; refusing rather than reporting wrong per-attack numbers")
        removed = sum(self.removed.values())
        start = self.initial * self.n / 100  # printed to 0.01 %: exact to half an image up to 10,000 images
        if abs(start - removed - robust_end) > 0.5 + 5e-5 * self.n:
            raise GKLError(f"pyautoattack {aa_version}: the per-attack counts read from its log ({removed} removed) do not add up "
                           f"to its result ({start:.0f} → {robust_end} robust); its log format changed, refusing to report")


class EvalProgress:
    """What eval-aa shows while it works, fed by chunk completions and pyautoattack's attack log.

    With a console: a rich bar over images (img/s) whose text follows the current attack batch by
    batch (attack, images still robust, elapsed). Quiet: one line per finished attack and chunk, for
    log files. Without a console: nothing."""

    def __init__(self, console: Any, quiet: bool = False):
        self.console, self.quiet = console, quiet
        self.bar: Any = None
        self.task: Any = None
        self.tick = time.perf_counter()
        self.done = 0
        self.first: Optional[int] = None  # images already done when this process started (a resume)

    def __enter__(self) -> "EvalProgress":
        if self.console is not None and not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("AutoAttack"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                TimeElapsedColumn(), console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("aa", total=None, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _print(self, text: str) -> None:
        from rich.markup import escape

        if self.console is not None and self.quiet:
            self.console.print(escape(text), highlight=False)

    def note(self, text: str) -> None:
        from rich.markup import escape

        if self.console is not None:
            self.console.print(f"[yellow]note:[/] {escape(text)}")

    def stage(self, text: str, finished: bool) -> None:
        """An attack's progress inside a chunk."""
        if self.bar is not None:
            self.bar.update(self.task, info=f"{self._rate()} {text}")
        elif finished:
            self._print(f"AutoAttack {text}")

    def chunk(self, done: int, total: int, text: str) -> None:
        """Images finished (this shard's) out of `total`."""
        self.done = done
        if self.first is None:
            self.first = done
        if self.bar is not None:
            self.bar.update(self.task, total=total, completed=done, info=f"{self._rate()} {text}")
        else:
            self._print(f"AutoAttack {done}/{total} images | {text}")

    def _rate(self) -> str:
        return f"{(self.done - (self.first or 0)) / max(time.perf_counter() - self.tick, 1e-9):.1f} img/s"
