"""One training engine for adversarial training and distillation; the method is a pluggable `Step`.

The engine owns everything that is not the loss: data order, model construction (DDP, SyncBN,
channels_last, torch.compile), the optimizer and lr schedule, weight averaging, checkpoints and
resume, validation and model selection, metrics, progress, and the end-of-run test evaluation.
What needs none of the engine's state lives beside it: `build` (model and optimizer construction),
`meters` (the epoch's sums), `resume` (what a resume refuses), `results` (what a finished run
reports) and `signals` (the stop-request handlers).

Resume guarantee: a checkpoint holds the model, optimizer, averaged weights, the step's state
(class prior …), every RNG state, the meters of the current epoch and the position in the epoch's
batch order. All other randomness is derived from seeds (see `gklcli.data`), so on CPU a run that
is interrupted at any step and resumed ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from rich.console import Console
from torch import Tensor, nn

from gklcli import __version__
from gklcli.errors import GKLError
from gklcli.models import bn_momentum
from gklcli.recipes import Recipe
from gklcli import checkpoint as ckpt
from gklcli.train.averaging import make_averager
from gklcli.train.build import configure_determinism, make_optimizer
from gklcli.distributed import (
    DistEnv, all_equal, barrier, broadcast_buffers, broadcast_flag, device_name, gather_objects, init_distributed,
)
from gklcli.train.logger import EpochProgress, MetricsLog, plot_curves
from gklcli.train.meters import Meters
from gklcli.train.results import add_test_best, epoch_line, run_results, write_results
from gklcli.train.resume import check_resumable, read_training_checkpoint
from gklcli.train.schedule import learning_rate, momentum
from gklcli.train.signals import install_signal_handlers, restore_signal_handlers
from gklcli.train.trackers import RUN_FOLDERS as TRACKER_FOLDERS, STATE_FILE as TRACKER_STATE
from gklcli.train.workload import ImageWorkload, Workload

# The files a run writes in its output folder: their presence is what --resume/--overwrite are asked about.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.csv", "results.json", "summary.md", "curves.png", "recipe.yaml",
             TRACKER_STATE)


class Interrupted(Exception):
    """Training stopped on request (SIGTERM/SIGINT/SIGUSR2 or `interrupt_after_steps`) after a checkpoint;
    `signal` names the signal (None for `interrupt_after_steps`)."""

    def __init__(self, message: str, signal: Optional[str] = None):
        super().__init__(message)
        self.signal = signal


@dataclass
class StepResult:
    """What a step hands back for one batch."""

    loss: Tensor
    metrics: dict[str, Tensor | float]  # batch means, summed over the epoch weighted by `n`
    n: int
    before_update: Optional[Callable[[], None]] = None  # after backward, before optimizer.step()
    after_update: Optional[Callable[[], None]] = None  # after optimizer.step()


class Step(Protocol):
    """The method-specific part of training (adversarial training, distillation)."""

    selection_metric: str  # the validation metric (higher is better) that picks best.pt, e.g. "val_pgd"

    def begin_epoch(self, epoch: int) -> dict[str, float]: ...

    def compute(self, batch: Any, epoch: int) -> StepResult: ...

    def end_epoch(self, epoch: int) -> None: ...

    def evaluate(self, model: nn.Module, loader: Any, prefix: str) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Context:
    """What a step may use from the engine."""

    recipe: Recipe
    model: nn.Module  # the model to train (DDP-wrapped and/or compiled)
    module: nn.Module  # the plain module (parameters, AWP)
    attack_model: nn.Module  # the plain module, compiled when train.compile is on (inner attacks)
    num_classes: int
    env: DistEnv
    autocast: Callable[[], contextlib.AbstractContextManager]
    channels_last: bool
    class_counts: Optional[Tensor] = None  # training images per class (ImageNet-LT groups)
    averager: Any = None  # the weight average (Mean-Teacher's teacher is the EMA of the student), if any


class Engine:
    """Train `recipe` with the step built by `make_step(context)` on the data and model of
    `make_workload(recipe, data_dir, env)` (labelled images and a registry model by default); see `fit`."""

    def __init__(
        self,
        recipe: Recipe,
        make_step: Callable[[Context], Step],
        *,
        out_dir: Path,
        data_dir: Optional[str] = None,
        resume: bool = False,
        quiet: bool = False,
        device: Optional[str] = None,
        console: Optional[Console] = None,
        make_workload: Callable[[Recipe, Optional[str], DistEnv], Workload] = ImageWorkload,
    ):
        self.recipe, self.out_dir, self.resume_requested = recipe, Path(out_dir), resume
        self.env = init_distributed(device)
        self.console = console or Console(stderr=False)
        self.quiet = quiet
        self.main = self.env.is_main
        self.log = MetricsLog(self.out_dir, self.main, recipe.output)  # refuses a missing tracker extra before any data is read
        configure_determinism(recipe, self.env)
        self.workload = make_workload(recipe, data_dir, self.env)
        self.num_classes = self.workload.num_classes
        self.module, self.model, self.attack_model = self.workload.build_model(self.env)
        self.optimizer = make_optimizer(self.module, recipe.optim)
        self.averager = make_averager(recipe.ema, self.module)
        self.eval_module = copy.deepcopy(self.module) if self.averager is not None else self.module
        amp = recipe.train.amp == "bf16"
        device_type = self.env.device.type
        self.context = Context(
            recipe,
            self.model,
            self.module,
            self.attack_model,
            self.num_classes,
            self.env,
            (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext,
            recipe.model.channels_last,
            self.workload.class_counts,
            self.averager,
        )
        self.step = make_step(self.context)
        self.steps_per_epoch = self.workload.steps_per_epoch()
        self.epoch, self.batch, self.global_step = 1, 0, 0
        self.meters = Meters()
        self.best: dict[str, Any] = {}
        self.test_best: dict[str, Any] = {}  # eval.test_every_epochs: the best test epoch so far
        self._stop_requested: str | bool = False

    # ----------------------------------------------------------------------------------- set-up

    def _train_loader(self, epoch: int, start: int) -> Any:
        return self.workload.train_loader(epoch, start)

    # ------------------------------------------------------------------------------ checkpoints

    def _deploy_state(self) -> tuple[dict[str, Tensor], str]:
        """The weights a user evaluates/exports: the average when averaging is on and started."""
        if self.averager is not None and self.averager.state is not None:
            return self.averager.state, "averaged"
        return self.module.state_dict(), "raw"

    def _meta(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "format": ckpt.FORMAT,
            "format_version": ckpt.FORMAT_VERSION,
            "gkl_version": __version__,
            "kind": r.kind,
            **self.workload.meta(),
            "recipe": r.to_dict(),
            "recipe_hash": r.content_hash(),
        }

    def _save_last(self, finished: bool = False) -> None:
        # every rank's RNG (each was seeded with seed + rank: dropout, augmentation draws), gathered by all ranks
        rngs = gather_objects(ckpt.rng_state())
        if not self.main:
            return
        state, weights = self._deploy_state()
        payload = self._meta() | {
            "weights": weights,
            "model": state,
            "epoch": self.epoch - 1 if self.batch == 0 else self.epoch,
            "train_state": {
                "raw_model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "averager": self.averager.state_dict() if self.averager is not None else None,
                "step": self.step.state_dict(),
                "rng": rngs[0],
                "rng_ranks": rngs,
                "epoch": self.epoch,
                "batch": self.batch,
                "global_step": self.global_step,
                "meters": {"sums": dict(self.meters.sums), "count": self.meters.count, "seconds": self.meters.seconds,
                           "steps": self.meters.steps},
                "best": dict(self.best),
                "test_best": dict(self.test_best),
                "finished": finished,
                "world_size": self.env.world_size,
            },
        }
        ckpt.atomic_save(payload, self.out_dir / "last.pt")

    def _save_best(self, epoch: int, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        state, weights = self._deploy_state()
        ckpt.atomic_save(self._meta() | {"weights": weights, "model": state, "epoch": epoch, "metrics": metrics}, self.out_dir / "best.pt")

    def _load(self, path: Path) -> None:
        saved = read_training_checkpoint(path)
        check_resumable(path, saved, self.recipe.to_dict(), self.env.world_size)
        ts = saved["train_state"]
        self.module.load_state_dict(ts["raw_model"])
        self.optimizer.load_state_dict(ts["optimizer"])
        if self.averager is not None and ts["averager"] is not None:
            self.averager.load_state_dict(_to_device(ts["averager"], self.env.device))
        self.step.load_state_dict(ts["step"])
        ranks = ts.get("rng_ranks") or [ts["rng"]]  # checkpoints before rng_ranks: rank 0's RNG for every rank
        ckpt.set_rng_state(ranks[self.env.rank] if len(ranks) == self.env.world_size else ts["rng"])
        self.epoch, self.batch, self.global_step = ts["epoch"], ts["batch"], ts["global_step"]
        m = ts["meters"]
        self.meters = Meters(dict(m["sums"]), int(m["count"]), float(m["seconds"]), int(m.get("steps", 0)))
        self.best = dict(ts["best"])
        self.test_best = dict(ts.get("test_best") or {})
        self.finished = bool(ts["finished"])
        self.log.load(self.epoch - 1)

    def _prepare_output(self) -> bool:
        """Check the output directory; returns True when resuming from last.pt.

        A folder holding any run file is refused without --resume or --overwrite, and a refused
        start writes nothing: recipe.yaml is written by `_write_recipe` once the run is accepted."""
        last = self.out_dir / "last.pt"
        present = [name for name in RUN_FILES if (self.out_dir / name).exists()]
        if last.exists() and not last.is_file():
            raise GKLError(f"{last}: is not a file; move it away (or pass --overwrite after removing it) to use this folder")
        resume = False
        if self.resume_requested and last.is_file():
            resume = True
        elif self.recipe.output.overwrite:
            if self.main:
                for name in present:
                    (self.out_dir / name).unlink(missing_ok=True)
                # the old run's curves would mix with the new one's in TensorBoard (and its tracker files with the new run's)
                for folder in TRACKER_FOLDERS:
                    shutil.rmtree(self.out_dir / folder, ignore_errors=True)
        elif last.is_file():
            state = read_training_checkpoint(last)["train_state"]
            what = "a finished run" if state.get("finished") else f"an unfinished run (epoch {state.get('epoch')})"
            raise GKLError(f"{self.out_dir}: holds {what}; pass --resume to continue it or --overwrite to start over")
        elif present:
            raise GKLError(f"{self.out_dir}: holds run files ({', '.join(present)}) but no last.pt to "
                           f"{'resume from' if self.resume_requested else 'continue'}; pass --overwrite to start over or use a new --out")
        elif self.resume_requested and self.main:
            self.console.print(f"[yellow]note:[/] nothing to resume in {self.out_dir}; starting a new run")
        barrier()
        return resume

    def _write_recipe(self) -> None:
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(self.out_dir / "recipe.yaml", self.recipe.to_yaml())

    # ---------------------------------------------------------------------------------- training

    def _request_stop(self, signum: int, _frame: Any) -> None:
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait for the step to end
        # only set a flag: printing here could re-enter the console mid-print; the loop reports it
        self._stop_requested = signal.Signals(signum).name

    def fit(self, interrupt_after_steps: Optional[int] = None) -> dict[str, Any]:
        """Train to the end (or resume to the end) and return the results.

        `interrupt_after_steps` stops after that many steps of *this call*, as if the job were
        preempted there (used by the resume tests). SIGTERM/SIGINT do the same at the next step end.
        """
        self.finished = False
        lock = ckpt.RunLock(self.out_dir) if self.main else None  # under DDP rank 0 holds it for all
        try:
            refused: Optional[GKLError] = None
            if lock is not None:
                try:
                    lock.acquire()
                except GKLError as error:
                    refused = error
                if lock.note:
                    self.console.print(f"[yellow]note:[/] {lock.note}")
            if broadcast_flag(refused is not None, self.env.device):  # every rank stops, none waits at a barrier
                raise refused or GKLError(f"{self.out_dir}: rank 0 could not lock the output folder")
            resume = self._prepare_output()
            if self.main:  # what a killed writer of this folder left (the lock says none is running)
                removed = ckpt.remove_stale_temps(self.out_dir, RUN_FILES)
                if removed:
                    self.console.print(f"[yellow]note:[/] removed {len(removed)} temporary file(s) a killed run left: "
                                       f"{', '.join(removed[:3])}{' …' if len(removed) > 3 else ''}")
            if resume:
                self._load(self.out_dir / "last.pt")
                if self.finished:
                    return self._finished_results()
            self.log.start(self.recipe.to_dict())  # before recipe.yaml: a tracker that cannot start leaves no run file
            self._write_recipe()
            handlers = install_signal_handlers(self._request_stop)
            try:
                return self._loop(interrupt_after_steps)
            finally:
                restore_signal_handlers(handlers)
        finally:
            self.log.close()
            if lock is not None:
                lock.release()

    def _finished_results(self) -> dict[str, Any]:
        """The finished run's results.json; rebuilt from last.pt and best.pt when missing or damaged.

        The rebuild evaluates the saved weights with the run's own seeds, so it writes the numbers
        the run wrote."""
        try:
            results = ckpt.read_json(self.out_dir / "results.json")
            if self.main:
                self.console.print(f"{self.out_dir}: this run already finished; nothing to do")
            return results
        except GKLError as error:
            if self.main:
                self.console.print(f"[yellow]note:[/] {error}; rebuilding it from last.pt and best.pt")
            return self._finish()

    def _loop(self, interrupt_after_steps: Optional[int]) -> dict[str, Any]:
        r = self.recipe
        epochs = r.schedule.epochs
        steps_this_call = 0
        progress = EpochProgress(self.console, self.main and not self.quiet)
        while self.epoch <= epochs:
            epoch = self.epoch
            info = self.step.begin_epoch(epoch)
            self.model.train()
            progress.begin(epoch, epochs, self.steps_per_epoch, self.batch)
            tick = time.perf_counter()
            loader = self._train_loader(epoch, self.batch)
            # a run stopped right after an epoch's last step resumes with no step left: the loop body
            # does not run, and the epoch-end work below still happens with this lr
            lr = learning_rate(r.optim, r.schedule, epoch, min(self.batch, self.steps_per_epoch - 1), self.steps_per_epoch)
            for batch in loader:
                if self.batch >= self.steps_per_epoch:
                    break
                lr = learning_rate(r.optim, r.schedule, epoch, self.batch, self.steps_per_epoch)
                result = self.train_step(batch, epoch, lr)
                self.batch += 1
                self.global_step += 1
                steps_this_call += 1
                metrics = {k: float(v) for k, v in result.metrics.items()}
                self.meters.add(metrics, result.n)
                accuracy = " ".join(f"{k.removeprefix('acc_')} {v:.1f}%" for k, v in metrics.items() if k.startswith("acc_"))
                rate = progress.advance(result.n * self.env.world_size, f"loss {metrics.get('loss', float('nan')):.4f} {accuracy}")
                if self.main and self.quiet and self.batch % r.train.log_every_steps == 0:
                    self.console.print(
                        f"epoch {epoch} step {self.batch}/{self.steps_per_epoch} | lr {lr:.4g} | "
                        f"loss {metrics.get('loss', float('nan')):.4f} | {rate:,.0f} img/s"
                    )
                stop = broadcast_flag(
                    self._stop_requested or (interrupt_after_steps is not None and steps_this_call >= interrupt_after_steps),
                    self.env.device,
                )
                if stop or (r.train.save_every_steps and self.global_step % r.train.save_every_steps == 0):
                    self.meters.seconds += time.perf_counter() - tick
                    tick = time.perf_counter()
                    self._save_last()
                if stop:
                    progress.end()
                    reason = f"{self._stop_requested} received; " if self._stop_requested else ""
                    raise Interrupted(
                        f"{reason}stopped at epoch {epoch}, step {self.batch}/{self.steps_per_epoch}; "
                        f"checkpoint {self.out_dir / 'last.pt'}; continue with --resume", self._stop_requested or None)
            rate = progress.end()
            self.meters.seconds += time.perf_counter() - tick
            self._end_epoch(epoch, lr, info, rate)
        return self._finish()

    def train_step(self, batch: Any, epoch: int, lr: float) -> StepResult:
        """One optimisation step: the method's loss, backward, update hooks, optimizer, averaging."""
        r = self.recipe
        mom = momentum(r.optim, r.schedule, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise lr decay
            if "momentum" in group:  # SGD (AdamW has betas)
                group["momentum"] = mom
        first = r.model.bn_first_batch_stats and self.global_step == 0
        with bn_momentum(self.module, 1.0) if first else contextlib.nullcontext():
            result = self.step.compute(batch, epoch)
        self._check_finite(result.loss, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        if result.before_update is not None:
            result.before_update()
        self.optimizer.step()
        if result.after_update is not None:
            result.after_update()
        if self.averager is not None:
            # DM-AT's ema_update counts steps from 1, after the optimizer step
            self.averager.update_step(self.module, self.global_step + 1, self.recipe.schedule.epochs * self.steps_per_epoch)
        return result

    def _check_finite(self, loss: Tensor, epoch: int) -> None:
        bad = broadcast_flag(not bool(torch.isfinite(loss.detach()).all()), self.env.device)
        if bad:
            last = self.out_dir / "last.pt"
            kept = f"last good checkpoint: {last}" if last.is_file() else "no checkpoint was written yet"
            raise GKLError(
                f"non-finite loss ({float(loss.detach()):.4g}) at epoch {epoch}, step {self.batch + 1} "
                f"(global step {self.global_step + 1}); training stopped, {kept}"
            )

    def _check_ranks_agree(self, epoch: int) -> None:
        """Under DDP every rank must hold the same weights; a silent divergence would poison results."""
        if not self.env.distributed:
            return
        broadcast_buffers(self.module)
        checksum = sum(float(t.double().sum()) for t in self.module.state_dict().values() if t.is_floating_point())
        if not all_equal(checksum, self.env.device):
            raise GKLError(f"epoch {epoch}: the DDP ranks hold different weights (checksums disagree); stopping")

    def _end_epoch(self, epoch: int, lr: float, info: dict[str, float], rate: float) -> None:
        r = self.recipe
        self.step.end_epoch(epoch)
        self._check_ranks_agree(epoch)
        if self.averager is not None:
            self.averager.update_epoch(self.module, epoch)
        record: dict[str, Any] = {"epoch": epoch, "lr": lr, **info}
        record.update({f"train_{k}": v for k, v in self.meters.means(self.env.device).items()})
        record["img_s"] = self.meters.count * self.env.world_size / max(self.meters.seconds, 1e-9)
        record["seconds"] = self.meters.seconds
        record["s_iter"] = self.meters.seconds / max(self.meters.steps, 1)  # the paper's Table V unit
        if self.workload.val is not None and (epoch % r.eval.every_epochs == 0 or epoch == r.schedule.epochs):
            val = self._evaluate(self.workload.val, r.eval.n_val, "val")
            record.update(val)
            key = self.step.selection_metric
            if key in val and (not self.best or val[key] > self.best["value"]):
                self.best = {"epoch": epoch, "metric": key, "value": val[key]}
                self._save_best(epoch, val)
        every = r.eval.test_every_epochs
        if every and self.workload.test is not None and (epoch % every == 0 or epoch == r.schedule.epochs):
            # mdistiller's protocol: the test set after every epoch and the best over epochs. It selects on
            # the test set, so results.json keeps the last epoch beside it. The RNG is forked: training is unchanged.
            test = self._evaluate(self.workload.test, r.eval.n_test, "test")
            record.update(test)
            key = "test_" + self.step.selection_metric.removeprefix("val_")
            if key in test and (not self.test_best or test[key] > self.test_best["value"]):  # ties: the first epoch
                self.test_best = {"epoch": epoch, "metric": key, "value": test[key], **test}
        self.log.append(record)
        if self.main:
            self.console.print(epoch_line(record, r.schedule.epochs))
            if r.output.plots:
                plot_curves(self.log.records, self.out_dir / "curves.png", f"{r.meta.name}: {r.meta.description}")
        self.epoch, self.batch = epoch + 1, 0
        self.meters = Meters()
        self._save_last()
        self.log.publish()  # the trackers receive an epoch once a checkpoint holds it

    @contextlib.contextmanager
    def _weights(self, state: dict[str, Tensor]):
        """`eval_module` carrying `state` (the average, or best.pt's weights)."""
        if self.eval_module is self.module:
            saved = {k: v.clone() for k, v in self.module.state_dict().items()}
            self.module.load_state_dict(state)
            try:
                yield self.module
            finally:
                self.module.load_state_dict(saved)
        else:
            self.eval_module.load_state_dict(state)
            yield self.eval_module

    def _evaluate(self, source: Any, n: Optional[int], prefix: str, state: Optional[dict[str, Tensor]] = None) -> dict[str, float]:
        """Evaluate the deployable weights (or `state`) with a fixed seed, leaving the training RNG alone."""
        weights = state if state is not None else self._deploy_state()[0]
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self._weights(weights) as model:
            torch.manual_seed(self.recipe.train.seed + 7919 + self.env.rank)
            return self.step.evaluate(model, self.workload.eval_loader(source, n), prefix)

    def _finish(self) -> dict[str, Any]:
        r = self.recipe
        deploy, weights = self._deploy_state()
        results = run_results(r, self.out_dir, weights, self.best, self.log.records, device_name(self.env.device),
                              self.env.world_size)
        best_path = self.out_dir / "best.pt"
        best_state = None
        if self.best:
            barrier()
            best = ckpt.load_file(best_path)
            best_state = _to_device(best["model"], self.env.device)
            results["best"] = {"epoch": self.best["epoch"]} | best["metrics"]
            results["best_sha256"] = ckpt.sha256_file(best_path)  # ties these numbers to that file
        test = self.workload.test
        if r.eval.final_test and test is not None:
            results["last"].update(self._evaluate(test, r.eval.n_test, "test", deploy))
            if best_state is not None:
                results["best"].update(self._evaluate(test, r.eval.n_test, "test", best_state))
        if r.kind == "kd" or self.test_best:
            add_test_best(results, self.step.selection_metric, self.log.records, self.test_best)
        if self.main:  # results first: a checkpoint marked finished always has its results.json
            write_results(self.out_dir, results)
        self._save_last(finished=True)
        self.log.finish(results)
        return results


def run_training(recipe: Recipe, make_step: Callable[[Context], Step], *, out_dir: Any, data_dir: Optional[str] = None,
                 resume: bool = False, quiet: bool = False, device: Optional[str] = None, console: Any = None,
                 interrupt_after_steps: Optional[int] = None,
                 make_workload: Callable[[Recipe, Optional[str], DistEnv], Workload] = ImageWorkload) -> dict[str, Any]:
    """Build the engine, train (or resume) to the end, and always release the process group."""
    from gklcli.distributed import shutdown

    try:
        engine = Engine(recipe, make_step, out_dir=out_dir, data_dir=data_dir, resume=resume, quiet=quiet, device=device,
                        console=console, make_workload=make_workload)
        return engine.fit(interrupt_after_steps)
    finally:
        shutdown()


def _to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    return tree
