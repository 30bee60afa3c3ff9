"""The optimizer-step loop every training stage shares (pretraining, midtraining, SFT).

A stage supplies a model, its optimizers, a batch source (an iterator of
(inputs, targets) with a `state_dict()` that says where it stands) and hooks
for evaluation and samples; this loop does gradient accumulation, the LR and
momentum schedules, one progress line per step with ETA, checkpoints (every
`save_every` steps, on SIGINT/SIGTERM, and at the end before the final
evaluation) and resuming. On the master rank it appends every step and evaluation to the run's
metrics.jsonl and redraws the stage's curves in the report folder at each checkpoint and at the
end (nanochat.curves).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from nanochat.checkpoint import CheckpointError, agree, agreed_step, load_checkpoint, save_checkpoint, step_dir_name
from nanochat.budget import BudgetError
from nanochat.common import DataError, DistInfo, compute_cleanup, compute_init, print0
from nanochat.curves import METRICS_FILE, MetricsLog, curve_name, draw, stage_of
from nanochat.energy import EnergyReport, PowerMeter, cost_usd, format_energy, sum_over_nodes
from nanochat.memory import explain_out_of_memory, memory_in_use, peak_memory_line
from nanochat.progress import StepTimer, format_duration
from nanochat.report import report_dir
from nanochat.runtime import MemoryRefusal, release_cached_memory
from nanochat.schedule import PlanError, lr_multiplier, muon_momentum, weight_decay_multiplier
from nanochat.tokenizer import TokenizerError


def add_checkpoint_args(group, *, save_every: int, keep_last: int) -> None:
    """How often the loop checkpoints and how many it keeps (LoopSettings.save_every, keep_last)."""
    group.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N steps; 0 for only at the end (default %(default)s)")
    group.add_argument("--keep-last", type=int, default=keep_last, help="checkpoints to keep (default %(default)s)")


@dataclass
class LoopSettings:
    num_iterations: int
    grad_accum_steps: int
    warmdown_ratio: float = 0.2
    eval_every: int = 0  # 0: only at the end
    sample_every: int = 0
    save_every: int = 0
    keep_last: int = 3
    warm_momentum: bool = True  # Muon momentum 0.85 -> 0.95 over the first steps (pretraining)
    cost: dict = field(default_factory=dict)  # price_per_kwh / hardware_price / lifetime_years for EnergyReport


@dataclass
class Hooks:
    evaluate: Callable[[int], dict] | None = None  # step -> metrics to log and store
    sample: Callable[[], None] | None = None
    step_metrics: Callable[[], dict] | None = None  # more numbers for each step's record (RL: its mean reward)


@dataclass
class Resumed:
    step: int = 0
    data_state: dict | None = None
    meta: dict = field(default_factory=dict)


def cost_settings(price_per_kwh: float, hardware_price: float, hardware_lifetime_years: float) -> dict:
    """The EnergyReport cost figures from add_cost_args' values."""
    return {"price_per_kwh": price_per_kwh, "hardware_price": hardware_price, "lifetime_years": hardware_lifetime_years}


def resume_from(tag_dir: Path, model, optimizers, info: DistInfo) -> Resumed:
    """Load the checkpoint of `tag_dir` that every rank can continue (nanochat.checkpoint.agreed_step) into
    model and optimizers; a rank that cannot load it stops every rank with one error."""
    step = agreed_step(tag_dir, info.rank)
    ckpt = agree(lambda: _load_to_resume(tag_dir, step, info))
    model.load_state_dict(ckpt.model_state)
    for opt, state in zip(optimizers, ckpt.optim_state):
        opt.load_state_dict(state)
    print0(f"resumed from {ckpt.path} (step {ckpt.step:,})")
    return Resumed(ckpt.step, ckpt.data_state, ckpt.meta)


def _load_to_resume(tag_dir: Path, step: int, info: DistInfo):
    ckpt = load_checkpoint(tag_dir, step, rank=info.rank, device=info.device)
    saved_world = ckpt.meta.get("world_size", 1)
    if saved_world != info.world_size:
        raise CheckpointError(f"{ckpt.path} was written by {saved_world} rank(s); resume it with the same number (now {info.world_size})")
    return ckpt


class TrainLoop:
    def __init__(self, *, model, optimizers, batches, settings: LoopSettings, info: DistInfo, tag_dir: Path,
                 meta: dict, hooks: Hooks | None = None, step_model=None, tracker=None, peak_flops: float | None = None,
                 resumed: Resumed | None = None, loss_fn: Callable | None = None, memory_estimate: int | None = None):
        self.model, self.optimizers, self.batches, self.settings = model, optimizers, batches, settings
        self.step_model = model if step_model is None else step_model  # "or" would ask a compiled module its len()
        # (model, batch) -> scalar loss; batches are (inputs, targets) unless a stage says otherwise (RL)
        self.loss_fn = loss_fn or (lambda m, batch: m(*batch))
        self.info, self.tag_dir, self.meta, self.hooks = info, Path(tag_dir), meta, hooks or Hooks()
        self.tracker, self.peak = tracker, peak_flops
        self.memory_estimate = memory_estimate  # bytes, printed next to the measured peak after the first step
        self.flops_per_token = model.estimate_flops()
        resumed = resumed or Resumed()
        self.start_step = resumed.step
        self.metrics: dict = resumed.meta.get("metrics", {})
        self.smooth_loss = resumed.meta.get("smooth_loss", 0.0)
        self.timer = StepTimer(settings.num_iterations, first_step=resumed.step, elapsed=resumed.meta.get("train_seconds", 0.0))
        # One meter per node (local rank 0) reads every GPU of that node; sum_over_nodes adds the nodes up at
        # each checkpoint and evaluation. The job's energy before a resume (all nodes) is added once, to the sum.
        self.energy_before = resumed.meta.get("energy_kwh", 0.0) if resumed.step else 0.0
        self.power = PowerMeter.autodetect() if info.local_rank == 0 else None
        self.energy: tuple[float | None, float | None] = (None, None)  # (job kWh, this run's mean W), all nodes
        self.history = MetricsLog(self.tag_dir / METRICS_FILE, keep_through=self.start_step) if info.is_master else None

    def energy_items(self) -> dict:
        """Energy, cost and depreciation of the training up to the last checkpoint or evaluation, all nodes
        together, for report sections ("n/a" without a sensor); no collective, so the master alone may ask."""
        return EnergyReport(*self.energy, self.timer.elapsed, **self.settings.cost).items()

    def sum_energy(self) -> tuple[float | None, float | None]:
        """(the job's kWh, this run's mean watts) over all nodes, kept for energy_items; a collective."""
        power = self.power
        if power:
            power.sample()  # so the count runs to now, not to the last of the once-a-second samples
        kwh, watts = sum_over_nodes(power.kwh if power else None, power.mean_watts if power else None,
                                    power is not None, self.info.device)
        total = None if kwh is None or self.energy_before is None else self.energy_before + kwh
        self.energy = (total, watts)
        return self.energy

    def run(self) -> int:
        """Train to the last step; returns the process exit code (128+signal when stopped early)."""
        if self.power:
            self.power.start()
        try:
            with StopRequest() as stop:
                return self._run(stop)
        finally:
            if self.power:
                self.power.stop()

    def _run(self, stop: StopRequest) -> int:
        s, last = self.settings, self.settings.num_iterations
        for step in range(self.start_step, last):
            self.train_step(step)
            done = step + 1
            if step == self.start_step:
                self.report_peak_memory(done)
            if _due(s.eval_every, done) and done < last:
                self.evaluate(done)
            if _due(s.sample_every, done) and done < last and self.hooks.sample:
                self.hooks.sample()
            if stop.agreed(self.info.device):
                self.save(done)
                print0(f"stopped at step {done:,}; run the same command again to continue")
                return stop.exit_code
            if _due(s.save_every, done) and done < last:
                self.save(done)
        if self.start_step < last or not (self.tag_dir / step_dir_name(last)).exists():
            self.save(last)  # before any final evaluation, so a crash there loses no training
        self.evaluate(last)
        if self.hooks.sample:
            self.hooks.sample()
        self.draw_curves(last)
        print0(f"training done: {last:,} steps in {format_duration(self.timer.elapsed)}; checkpoint in {self.tag_dir}")
        return 0

    def train_step(self, step: int) -> None:
        self.timer.start()
        total, tokens = 0.0, 0
        accum = self.settings.grad_accum_steps
        for _ in range(accum):
            batch = next(self.batches)
            loss = self.loss_fn(self.step_model, batch)
            (loss / accum).backward()
            total += loss.detach()
            tokens += batch[0].numel()
        lrm = lr_multiplier(step, self.settings.num_iterations, self.settings.warmdown_ratio)
        wdm = weight_decay_multiplier(step, self.settings.num_iterations)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                group["weight_decay"] = group.get("initial_weight_decay", 0.0) * wdm
                if "momentum" in group and self.settings.warm_momentum:
                    group["momentum"] = muon_momentum(step)
            opt.step()
        self.model.zero_grad(set_to_none=True)
        train_loss = (total / accum).item()  # syncs, so the timer sees the real step time
        self.log_step(step + 1, train_loss, lrm, self.timer.stop(), tokens * self.info.world_size)

    def report_peak_memory(self, done: int) -> None:
        """What the first step really took on a GPU, next to what was estimated before it."""
        line = peak_memory_line(self.info.device, self.memory_estimate)
        if line:
            print0(f"step {done:06d} | {line}")

    def log_step(self, done: int, train_loss: float, lrm: float, dt: float, tokens: int) -> None:
        beta = 0.9
        self.smooth_loss = beta * self.smooth_loss + (1 - beta) * train_loss
        debiased = self.smooth_loss / (1 - beta**done)
        tok_per_s = tokens / dt
        mfu = f"{100 * self.flops_per_token * tok_per_s / (self.peak * self.info.world_size):.1f}%" if self.peak else "n/a"
        total = self.settings.num_iterations
        print0(
            f"step {done:06d}/{total:06d} ({100 * done / total:5.1f}%) | loss {debiased:.4f} | lrm {lrm:.3f} | "
            f"dt {dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f} | mfu {mfu} | elapsed {format_duration(self.timer.elapsed)} | eta {self.timer.eta()}"
        )
        extra = self.hooks.step_metrics() if self.hooks.step_metrics else {}
        if self.history:
            self.history.append({"step": done, "loss": debiased, "lrm": lrm, "tok_per_s": tok_per_s, "dt_s": dt,
                                 **memory_in_use(self.info.device).metrics(), **extra})
        if self.tracker:
            self.tracker.log({"train/loss": debiased, "train/lrm": lrm, "train/tok_per_sec": tok_per_s, "train/dt": dt,
                              **{f"train/{key}": value for key, value in extra.items()}}, step=done)

    def evaluate(self, step: int) -> None:
        if not self.hooks.evaluate:
            return
        release_cached_memory(self.info.device)
        self.model.eval()
        try:
            metrics = self.hooks.evaluate(step)
        finally:
            self.model.train()
        self.metrics.update(metrics)
        if self.history:
            self.history.append({"step": step, "eval": metrics})
        print0(f"step {step:06d} | memory in use: {memory_in_use(self.info.device).describe()}")
        kwh, _ = self.sum_energy()
        if kwh is not None:
            price = self.settings.cost.get("price_per_kwh")
            cost = cost_usd(kwh, price) if price is not None else cost_usd(kwh)
            print0(f"step {step:06d} | energy so far, all nodes: {format_energy(kwh, cost)}")
            metrics = {**metrics, "energy_kwh": kwh}
        if self.tracker:
            self.tracker.log(metrics, step=step)

    def save(self, step: int) -> None:
        t0 = time.perf_counter()
        meta = {**self.meta, "metrics": self.metrics, "smooth_loss": self.smooth_loss, "train_seconds": self.timer.elapsed,
                "energy_kwh": self.sum_energy()[0]}
        path = save_checkpoint(
            self.tag_dir, step, model_state=self.model.state_dict(), optim_state=[o.state_dict() for o in self.optimizers],
            data_state=self.batches.state_dict(), meta=meta, keep_last=self.settings.keep_last,
        )
        print0(f"step {step:06d} | checkpoint saved to {path} in {time.perf_counter() - t0:.1f}s")
        self.draw_curves(step)

    def draw_curves(self, step: int) -> None:
        """The stage's curves so far, as report/curves-<stage>.png (master rank only)."""
        if not self.history:
            return
        stage = stage_of(self.tag_dir)
        path = draw(self.history.path, f"{stage} {self.tag_dir.name}, step {step:,}", report_dir() / curve_name(stage))
        if path:
            print0(f"step {step:06d} | curves drawn to {path}")


# ---------------------------------------------------------------- how a stage process ends: the exit-code policy

# Errors a user can act on (no checkpoint, tokenizer or data; settings that do not fit together): one line, exit 2.
USER_ERRORS = (CheckpointError, TokenizerError, PlanError, BudgetError, DataError, FileNotFoundError)
EXIT_USER_ERROR = 2
EXIT_OUT_OF_MEMORY = 3  # MemoryRefusal before step 1, torch.OutOfMemoryError during a step


def run_guarded(work: Callable[[DistInfo], int], *, device: str | None, seed: int = 42,
                device_batch: Callable[[], int] | None = None) -> int:
    """Join the process group, return work(info)'s exit code, leave the group: how every stage ends (base_train,
    the post-training stages, the chat evaluation). USER_ERRORS exit 2 and memory EXIT_OUT_OF_MEMORY, each as
    one line saying what to do (device_batch(): the batch an out-of-memory error happened at); anything else
    is a bug and keeps its traceback. Every rank prints its own error, naming itself under torchrun, and a
    failing rank leaves at once instead of waiting for its peers in the cleanup barrier: their next collective
    then fails, or torchrun stops them, within seconds."""
    info = compute_init(device, seed=seed)
    finished = False
    try:
        code = work(info)
        finished = True
        return code
    except USER_ERRORS as exc:
        _say_error(info, str(exc))
        return EXIT_USER_ERROR
    except MemoryRefusal as exc:
        _say_error(info, str(exc))
        return EXIT_OUT_OF_MEMORY
    except torch.OutOfMemoryError:  # by type: the text differs between CUDA, MPS and the CPU allocator
        _say_error(info, explain_out_of_memory(info.device, device_batch()) if device_batch else
                   "out of memory: run again with a smaller --device-batch-size (it continues from the last checkpoint)")
        return EXIT_OUT_OF_MEMORY
    except Exception as exc:
        _say_error(info, f"{type(exc).__name__}: {exc} (a bug: traceback below)")
        raise
    finally:
        compute_cleanup(orderly=finished)


def _say_error(info: DistInfo, message: str) -> None:
    """On every rank (not print0: the failing rank may not be rank 0), flushed, so the line is out before the process is."""
    prefix = f"[rank {info.rank}/{info.world_size}] " if info.world_size > 1 else ""
    print(f"{prefix}error: {message}", flush=True)


def _due(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


# ---------------------------------------------------------------- graceful stops: SIGINT/SIGTERM ask the loop to checkpoint and exit

class StopRequest:
    """Set by SIGINT/SIGTERM inside its `with` block; `agreed()` makes every rank stop at the same step.

    Leaving the block puts back the handlers it replaced, so a caller that runs
    training in-process (a test, a notebook) gets its own Ctrl-C back.
    """

    def __init__(self):
        self.signum: int | None = None
        self._replaced: dict = {}

    def __enter__(self) -> StopRequest:
        self._replaced = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._replaced.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:  # a second Ctrl-C means: now
            raise KeyboardInterrupt
        self.signum = signum
        print0(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step (again to abort)")

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop; every rank then takes that signal (the highest), so a rank
        that got none exits with the code of the one that did."""
        flag = torch.tensor([self.signum or 0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.signum = int(flag.item())
        return bool(flag.item())

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)
