"""The device kit's one command on a borrowed GPU machine: install what the machine
lacks from the kit's wheels, offline, then report versions, run bench/gpu_check.py's
kit checks and a real pretraining run that is killed after a checkpoint and resumed;
one PASS/FAIL line per step and one JSON of figures.

    python3 bench/device_run.py --out DIR                        # on the GPU machine (budget 8 min, H100 untested)
    python3 bench/device_run.py --device cpu --smoke --out DIR   # the same steps at toy sizes on a CPU, ~1-2 min
    python3 bench/device_run.py --steps train,resume --out DIR   # rerun some steps

The kit is the folder `device_kit/` in the repository root, as
`python bench/device_kit.py prepare` writes it (--kit for another): wheels/,
base/tokenizer/, data/ (shard_00000 train, shard_00001 validation), kit.json.

Steps, in this order, each printed as `STATUS name seconds message`:

  install          pip install --no-index --no-deps --target SITE (a scratch folder of this
                   run), for each kit wheel whose distribution this interpreter lacks; then
                   one child imports every module they hold
  versions         python, platform, the distributions in VERSIONS (package metadata, no
                   import) and nvidia-smi's GPU name and driver, read once
  gpu_check.NAME   one line per check of `bench/gpu_check.py --only KIT_CHECKS`
  train            scripts.base_train at depth 12, seq 1024, 30 steps, evaluation and a
                   checkpoint every 10, killed with SIGKILL (as a crash or a pre-empted machine
                   would stop it) once the step-20 checkpoint is saved
  resume           the same command again: must continue from step 20 and finish at 30

Children see SITE and the repository on PYTHONPATH; the training runs log
recompilations (TORCH_LOGS=recompiles), counted per run, and reaching dynamo's
recompile limit is a FAIL. Each step gets its own time cap, cut to what is left of
--budget; a step past its time is killed and FAILs, and the next step still runs.

Written to --out: device_run.json (rewritten after each step: header, steps with
status, seconds, message and numeric figures), install.log, install.import.log, gpu_check.json,
gpu_check.log, train.log, resume.log. Exit status: 0 when no step FAILed, 1 when
one did, 2 for bad usage (no kit).

Only the standard library is imported here, so the run still reports when torch or
the project does not import.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_KIT = ROOT / "device_kit"
STATUSES = ("PASS", "FAIL", "SKIP")

# What scripts.base_train prints (nanochat/training.py, scripts/base_train.py); bench/gpu_check.py reads these too.
VAL_BPB_RE = re.compile(r"^step (\d+) \| validation bits per byte: ([\d.]+)$", re.MULTILINE)
DONE_RE = re.compile(r"^training done: ([\d,]+) steps", re.MULTILINE)
STEP_RE = re.compile(r"^step (\d+)/\d+ .*\| dt (\d+)ms \| tok/s ([\d,]+) \| mfu ([\d.]+%|n/a) \|", re.MULTILINE)
CHECKPOINT_RE = re.compile(r"^step (\d+) \| checkpoint saved to .* in ([\d.]+)s$", re.MULTILINE)
RESUMED_RE = re.compile(r"^resumed from .* \(step ([\d,]+)\)$", re.MULTILINE)
# What TORCH_LOGS=recompiles and dynamo's limit print (torch/_dynamo/guards.py, convert_frame.py; torch 2.13).
RECOMPILE_RE = re.compile(r"Recompiling function")
RECOMPILE_LIMIT_RE = re.compile(r"hit config\.(recompile_limit|cache_size_limit)")

# The gpu_check checks the kit runs: the card, the attention kernel, the bf16 and chunked head
# paths, the compiled head at 1/4/16 chunks and depth-20 memory against the estimate. Left out for
# time: engine_vs_transformers, compile_vs_eager and d20_decode (seconds to a minute each), and
# d20_compiled and recipe_ab (minutes; the training steps below measure the real loop instead).
KIT_CHECKS = ("bf16_matmul", "attention_kernel", "bf16_vs_fp32", "chunked_loss", "compiled_head", "d20_eager_memory")
# Printed by `versions`: what the borrowed machines are said to have (issue 26) and what the kit adds.
VERSIONS = ("torch", "triton", "transformers", "tiktoken", "numpy", "pyarrow", "safetensors", "huggingface_hub",
            "rustbpe", "matplotlib", "requests")
STEP_NAMES = ("install", "versions", "gpu_check", "train", "resume")


@dataclass(frozen=True)
class TrainSizes:
    flags: tuple[str, ...]  # model and batch flags of scripts.base_train
    steps: int
    every: int  # evaluation and checkpoint interval
    kill_at: int  # the checkpoint after which the first run is killed
    eval_tokens: int


@dataclass(frozen=True)
class Plan:
    """Every size and time cap: FULL on a GPU, SMOKE with --smoke. Caps are seconds."""

    train: TrainSizes
    caps: dict[str, int]
    budget: int  # seconds for all steps together


# Depth 12 at seq 1024, batch 2^18 tokens (8 micro-steps of 32 rows): ~15 s of steps per run at the
# ~400k tok/s gpu_check's recipe_ab assumes for depth 12 on an H100 (an estimate, not yet measured);
# the rest of each cap is start-up, the fit check, the compile (about a minute, a guess) and up to
# three checkpoints of ~2 GB (185M fp32 weights, AdamW's two states for the embedding and head,
# Muon's momentum for the blocks).
FULL = Plan(train=TrainSizes(flags=("--depth", "12", "--max-seq-len", "1024", "--total-batch-size", "262144"),
                             steps=30, every=10, kill_at=20, eval_tokens=2**19),
            caps={"install": 60, "versions": 20, "gpu_check": 200, "train": 150, "resume": 120}, budget=480)
SMOKE = Plan(train=TrainSizes(flags=("--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
                                     "--device-batch-size", "4", "--total-batch-size", "512"),
                              steps=6, every=2, kill_at=4, eval_tokens=1024),
             caps={"install": 120, "versions": 20, "gpu_check": 300, "train": 180, "resume": 180}, budget=900)


@dataclass
class Step:
    name: str
    status: str
    message: str
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Run:
    """What one run step shares: the kit, where to write, the plan and the clock."""

    kit: Path
    out: Path
    device: str | None
    smoke: bool
    plan: Plan
    deadline: float
    work: Path  # scratch, removed at the end: SITE, the training runs' base dir
    steps: list[Step] = field(default_factory=list)
    header: dict = field(default_factory=dict)

    @property
    def site(self) -> Path:
        return self.work / "site"

    def cap(self, name: str) -> float:
        return max(1.0, min(self.plan.caps[name], self.deadline - time.monotonic()))

    def env(self, **extra: str) -> dict:
        paths = [str(self.site), str(ROOT), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1", **extra}
        if self.smoke and self.device == "cpu":
            env["OMP_NUM_THREADS"] = "1"  # toy matrices gain nothing from threads on a shared CPU
        return env

    def device_flags(self) -> list[str]:
        return (["--device", self.device] if self.device else []) + (["--smoke"] if self.smoke else [])


# ---------------------------------------------------------------- children


@dataclass
class Child:
    code: int  # the exit status; negative: the signal that ended it
    seconds: float
    output: str
    killed_on_cue: bool  # killed on purpose, at the line it waited for
    timed_out: bool  # killed at its time

    def ending(self) -> str:
        """How it ended, in words."""
        if self.timed_out:
            return f"was stopped past its time ({self.seconds:.0f} s)"
        if self.killed_on_cue:
            return f"was killed on its cue after {self.seconds:.0f} s"
        return f"died of signal {-self.code}" if self.code < 0 else f"exited {self.code}"


def run_child(cmd: list[str], env: dict, log: Path, timeout: float, kill_on: re.Pattern | None = None) -> Child:
    """Run cmd in the repository root in its own process group, stdout and stderr into `log`
    as they come; kill the group at `timeout` seconds, or at the first line `kill_on` matches."""
    t0 = time.monotonic()
    lines: list[str] = []
    cued, late = threading.Event(), threading.Event()
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)
        timer = threading.Timer(timeout, lambda: (late.set(), kill_group(proc)))
        timer.start()
        try:
            for line in proc.stdout:
                sink.write(line)
                sink.flush()
                lines.append(line)
                if kill_on is not None and not cued.is_set() and kill_on.search(line):
                    cued.set()
                    kill_group(proc)
            code = proc.wait()
        finally:
            timer.cancel()
            kill_group(proc)
    return Child(code, time.monotonic() - t0, "".join(lines), killed_on_cue=cued.is_set(), timed_out=late.is_set())


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tail(output: str, lines: int = 6) -> str:
    kept = [line.strip() for line in output.splitlines() if set(line) - set(" ^~")]
    return " // ".join(kept[-lines:]) or "(no output)"


# ---------------------------------------------------------------- install and versions


def kit_wheels(kit: Path) -> list[Path]:
    return sorted((kit / "wheels").glob("*.whl"))


def wheel_distribution(wheel: Path) -> str:
    """The distribution a wheel holds, from its file name (PEP 427: name-version-...)."""
    return wheel.name.split("-")[0]


def installed(distribution: str, path: list[str] | None = None) -> str | None:
    """The version of `distribution` found on `path` (default sys.path), or None."""
    found = next(iter(importlib.metadata.distributions(name=distribution, path=path or sys.path)), None)
    return found.version if found is not None else None


def step_install(run: Run) -> Step:
    wheels = kit_wheels(run.kit)
    if not wheels:
        return Step("install", "FAIL", f"no wheels in {run.kit / 'wheels'}; run `python bench/device_kit.py prepare` first")
    wanted = [w for w in wheels if installed(wheel_distribution(w)) is None]
    here = sorted(f"{wheel_distribution(w)} {installed(wheel_distribution(w))}" for w in wheels if w not in wanted)
    shutil.rmtree(run.site, ignore_errors=True)
    run.site.mkdir(parents=True)
    figures = {"wheels": len(wheels), "installed": len(wanted), "already_here": len(here)}
    words = f"already here: {', '.join(here) or 'none'}"
    if not wanted:
        return Step("install", "PASS", f"nothing to install; {words}", figures)
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--target", str(run.site), *map(str, wanted)]
    child = run_child(cmd, run.env(), run.out / "install.log", run.cap("install"))
    missing = [wheel_distribution(w) for w in wanted if installed(wheel_distribution(w), [str(run.site)]) is None]
    if child.code != 0 or missing:
        return Step("install", "FAIL", f"pip {child.ending()} ({', '.join(missing) or 'all'} not in {run.site}): "
                                       f"{tail(child.output)}", figures)
    modules = sorted({m for w in wanted for m in wheel_modules(w)})
    load = run_child([sys.executable, "-c", f"import {', '.join(modules)}"], run.env(), run.out / "install.import.log",
                     run.cap("install"))
    if load.code != 0:
        return Step("install", "FAIL", f"installed, but importing {', '.join(modules)} {load.ending()}: {tail(load.output)}",
                    figures)
    names = ", ".join(f"{wheel_distribution(w)} {installed(wheel_distribution(w), [str(run.site)])}" for w in wanted)
    return Step("install", "PASS", f"installed offline and imported ({', '.join(modules)}): {names}; {words}", figures)


def wheel_modules(wheel: Path) -> set[str]:
    """The top-level modules and packages a wheel installs (its entries outside .dist-info, .data, .libs)."""
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    return {top.split(".")[0] for top in tops if not top.endswith((".dist-info", ".data", ".libs"))}


def nvidia_smi() -> str:
    """GPU name, driver and memory from one nvidia-smi call, or why there are none."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi on PATH"
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "nvidia-smi did not answer in 15 s"
    return done.stdout.strip() or f"nvidia-smi exited {done.returncode}: {done.stderr.strip()[:200]}"


def step_versions(run: Run) -> Step:
    path = [str(run.site), *sys.path]
    versions = {name: installed(name, path) or "not installed" for name in VERSIONS}
    run.header.update({"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
                       "gpus": nvidia_smi(), **versions})
    missing = [name for name in VERSIONS if versions[name] == "not installed"]
    message = ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; python {platform.python_version()}; {run.header['gpus']}"
    return Step("versions", "FAIL" if "torch" in missing else "PASS", message, {"missing": len(missing)})


# ---------------------------------------------------------------- gpu_check


def step_gpu_check(run: Run) -> list[Step]:
    """One Step per check from gpu_check's JSON; a FAIL for the checks it never reached."""
    out = run.out / "gpu_check.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "bench/gpu_check.py", "--only", ",".join(KIT_CHECKS), "--out", str(out), *run.device_flags()]
    child = run_child(cmd, run.env(), run.out / "gpu_check.log", run.cap("gpu_check"))
    data = json.loads(out.read_text()) if out.is_file() else {"checks": []}
    run.header["gpu_check"] = data.get("header", {})
    steps = [Step(f"gpu_check.{c['name']}", c["status"], c["message"], c["figures"], c["seconds"]) for c in data["checks"]]
    done = {c["name"] for c in data["checks"]}
    for name in KIT_CHECKS:
        if name not in done:
            steps.append(Step(f"gpu_check.{name}", "FAIL", f"not reached: gpu_check {child.ending()} "
                                                            f"(log gpu_check.log): {tail(child.output)}"))
    return steps


# ---------------------------------------------------------------- training, killed and resumed


def train_command(run: Run, data: Path) -> list[str]:
    t = run.plan.train
    return [sys.executable, "-m", "scripts.base_train", *t.flags, "--num-iterations", str(t.steps),
            "--eval-every", str(t.every), "--save-every", str(t.every), "--eval-tokens", str(t.eval_tokens),
            "--sample-every", "0", "--data-dir", str(data), *(["--device", run.device] if run.device else [])]


def log_figures(output: str) -> dict:
    """Speed, evaluations, checkpoints and recompilations read from a base_train log."""
    steps = STEP_RE.findall(output)
    speeds = [float(tok.replace(",", "")) for _, _, tok, _ in steps[1:]]  # the first step compiles
    mfus = [float(m.rstrip("%")) for _, _, _, m in steps[1:] if m != "n/a"]
    evaluations = [float(bpb) for _, bpb in VAL_BPB_RE.findall(output)]
    saves = [float(s) for _, s in CHECKPOINT_RE.findall(output)]
    figures = {"steps_logged": len(steps), "evaluations": len(evaluations), "checkpoints": len(saves),
               "recompiles": len(RECOMPILE_RE.findall(output)), "recompile_limit_hit": bool(RECOMPILE_LIMIT_RE.search(output))}
    if steps:
        figures["first_step_s"] = int(steps[0][1]) / 1000
    if speeds:
        figures["tok_per_s"] = statistics.median(speeds)
    if mfus:
        figures["mfu_percent"] = statistics.median(mfus)
    if evaluations:
        figures["last_bpb"] = evaluations[-1]
    if saves:
        figures["checkpoint_s_max"] = max(saves)
    return figures


def describe(figures: dict) -> str:
    parts = [f"{figures['tok_per_s']:,.0f} tok/s" if "tok_per_s" in figures else "no step after the first",
             f"MFU {figures['mfu_percent']:.1f}%" if "mfu_percent" in figures else "MFU n/a",
             f"first step {figures.get('first_step_s', math.nan):.1f} s",
             f"{figures['evaluations']} evaluation(s), last {figures.get('last_bpb', math.nan):.4f} bpb",
             f"{figures['checkpoints']} checkpoint(s), slowest {figures.get('checkpoint_s_max', math.nan):.1f} s",
             f"{figures['recompiles']} recompile(s)" + (", dynamo's recompile limit HIT" if figures["recompile_limit_hit"] else "")]
    return "; ".join(parts)


def step_train(run: Run) -> Step:
    """The first run, killed right after the checkpoint at kill_at."""
    t = run.plan.train
    base = run.work / "base"
    shutil.copytree(run.kit / "base" / "tokenizer", base / "tokenizer", dirs_exist_ok=True)
    cue = re.compile(rf"^step {t.kill_at:06d} \| checkpoint saved to ")
    env = run.env(NANOCHAT_BASE_DIR=str(base), TORCH_LOGS="recompiles")
    child = run_child(train_command(run, run.kit / "data"), env, run.out / "train.log", run.cap("train"), kill_on=cue)
    figures = log_figures(child.output)
    bpbs = [float(b) for _, b in VAL_BPB_RE.findall(child.output)]
    checks = {f"killed after the step-{t.kill_at} checkpoint": child.killed_on_cue,
              f"{t.kill_at // t.every} finite evaluations": len(bpbs) >= t.kill_at // t.every and all(map(math.isfinite, bpbs)),
              "recompile limit not hit": not figures["recompile_limit_hit"]}
    return verdict_step("train", checks, child, figures, "train.log")


def step_resume(run: Run) -> Step:
    """The same command again: it must continue from the kill_at checkpoint and finish."""
    t = run.plan.train
    base = run.work / "base"
    if not (base / "tokenizer").is_dir():
        return Step("resume", "SKIP", "the train step did not run, so there is nothing to resume")
    env = run.env(NANOCHAT_BASE_DIR=str(base), TORCH_LOGS="recompiles")
    child = run_child([*train_command(run, run.kit / "data"), "--resume"], env, run.out / "resume.log", run.cap("resume"))
    figures = log_figures(child.output)
    resumed = RESUMED_RE.search(child.output)
    done = DONE_RE.search(child.output)
    figures["resumed_at"] = int(resumed.group(1).replace(",", "")) if resumed else -1
    checks = {f"resumed at step {t.kill_at}": figures["resumed_at"] == t.kill_at,
              f"finished {t.steps} steps": bool(done) and int(done.group(1).replace(",", "")) == t.steps,
              "exit 0": child.code == 0, "a finite final bpb": math.isfinite(figures.get("last_bpb", math.nan)),
              "recompile limit not hit": not figures["recompile_limit_hit"]}
    return verdict_step("resume", checks, child, figures, "resume.log")


def verdict_step(name: str, checks: dict[str, bool], child: Child, figures: dict, log: str) -> Step:
    """PASS when every named condition holds; else FAIL naming those that do not, how the run ended and its last lines."""
    failed = [what for what, ok in checks.items() if not ok]
    if not failed:
        return Step(name, "PASS", f"{'; '.join(checks)} ({child.seconds:.0f} s): {describe(figures)}", figures)
    return Step(name, "FAIL", f"not {', not '.join(failed)}: it {child.ending()} (log {log}); {describe(figures)}; "
                              f"{tail(child.output)}", figures)


# ---------------------------------------------------------------- running


def numeric(figures: dict) -> dict:
    return {k: (int(v) if isinstance(v, bool) else v) for k, v in figures.items() if isinstance(v, (int, float))}


def write_json(run: Run, started: float) -> None:
    """Written aside and renamed, so a reader (or a run cut short) never sees half a file."""
    data = {"header": run.header, "total_seconds": round(time.monotonic() - started, 1),
            "steps": [{"name": s.name, "status": s.status, "seconds": round(s.seconds, 2), "message": s.message,
                       "figures": numeric(s.figures)} for s in run.steps]}
    aside = run.out / "device_run.json.tmp"
    aside.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(aside, run.out / "device_run.json")


def perform(run: Run, name: str) -> list[Step]:
    """One step (gpu_check: one Step per check); an exception is that step's FAIL, never the run's end."""
    t0 = time.monotonic()
    try:
        if name == "gpu_check":
            return step_gpu_check(run)
        found = {"install": step_install, "versions": step_versions, "train": step_train, "resume": step_resume}[name](run)
    except Exception as err:  # noqa: BLE001 -- one broken step must not stop the others
        found = Step(name, "FAIL", f"{type(err).__name__}: {err}")
    found.seconds = time.monotonic() - t0
    return [found]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The device kit's run: install offline, versions, gpu_check, train and resume.")
    p.add_argument("--kit", type=Path, default=DEFAULT_KIT, help="the kit folder (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="where the JSON and the logs go (on the device tool: $OUT)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="passed to gpu_check and base_train (default: theirs)")
    p.add_argument("--smoke", action="store_true", help="toy sizes, for a CPU")
    p.add_argument("--steps", default=",".join(STEP_NAMES), help="comma-separated steps to run, in the usual order "
                   "(default: all of %(default)s); install runs whenever train, resume or gpu_check do")
    p.add_argument("--budget", type=float, default=None, help="seconds for all steps (default: 480, or 900 with --smoke)")
    return p.parse_args(argv)


def selected_steps(spec: str) -> list[str]:
    wanted = {s.strip() for s in spec.split(",") if s.strip()}
    unknown = wanted - set(STEP_NAMES)
    if unknown:
        raise ValueError(f"unknown step(s) {', '.join(sorted(unknown))}; known: {', '.join(STEP_NAMES)}")
    if wanted & {"gpu_check", "train", "resume"}:
        wanted.add("install")  # the children import what it installs
    if "resume" in wanted:
        wanted.add("train")  # a resume needs the killed run's checkpoint, which lives in this run's scratch folder
    return [name for name in STEP_NAMES if name in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        names = selected_steps(args.steps)
        if not (args.kit / "kit.json").is_file():
            raise ValueError(f"{args.kit} holds no kit.json: make the kit with `python bench/device_kit.py prepare` "
                             "and carry its folder over with the repository")
    except ValueError as err:
        print(f"device_run: {err}", file=sys.stderr)
        return 2
    plan = SMOKE if args.smoke else FULL
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="device_run_") as work:
        run = Run(args.kit.resolve(), args.out.resolve(), args.device, args.smoke, plan,
                  deadline=started + (args.budget or plan.budget), work=Path(work))
        run.header["kit"] = json.loads((args.kit / "kit.json").read_text())
        for name in names:
            for found in perform(run, name):
                run.steps.append(found)
                print(f"{found.status:<4} {found.name:<28} {found.seconds:6.1f} s  {found.message}", flush=True)
            write_json(run, started)
    counts = {status: sum(s.status == status for s in run.steps) for status in STATUSES}
    print(f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in {time.monotonic() - started:.0f} s; "
          f"results in {run.out / 'device_run.json'}")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
