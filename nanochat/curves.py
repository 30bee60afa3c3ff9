"""Training curves: each run's per-step metrics in one JSON lines file, drawn as a PNG for the report.

The file is `metrics.jsonl` in the run's checkpoint folder (e.g. base_checkpoints/d20/metrics.jsonl),
written by the training loop (nanochat.training) on the master rank, one JSON object a line,
appended and flushed as training goes:

    {"step": 12, "loss": 3.91, "lrm": 1.0, "tok_per_s": 41230.5, "dt_s": 0.41, "memory_gib": 7.2}
    {"step": 12, "loss": 0.02, ..., "reward": 0.25}      RL adds the step's mean reward
    {"step": 250, "eval": {"val_bpb": 1.02}}             an evaluation (RL: {"pass@1": ..., "pass@4": ...})

"step" counts the optimizer steps done; "loss" is the smoothed training loss the progress line
shows, "lrm" the learning-rate multiplier, "memory_gib" what nanochat.memory.memory_in_use
measures (null where it cannot; on CUDA also "allocated_gib" and "reserved_gib"). A run resumed from its checkpoint of step S first drops every
line after step S, which the resumed run trains again, so no point is counted twice; a step
evaluated twice (the final evaluation of a run resumed at its end) keeps its newest values.

The loop redraws `$NANOCHAT_BASE_DIR/report/curves-<stage>.png` at every checkpoint and at the
end, so the report card (nanochat.report) and the chat page (GET /report/curves) show a run as
it goes. Drawing uses matplotlib's Agg canvas directly: no display, no global backend switch.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

from nanochat.stages import stage_of_folder
from nanochat.fileio import atomic_write

METRICS_FILE = "metrics.jsonl"
CURVE_RE = re.compile(r"^curves-[a-z0-9_-]+\.png$")
# (panel title, where the values are: a training-record key, or a test on evaluation keys)
PANELS = (
    ("training loss (smoothed)", "loss"),
    ("validation bits per byte", lambda key: "bpb" in key),
    ("learning rate (x the stage's base rate)", "lrm"),
    ("tokens/s", "tok_per_s"),
    ("memory in use (GiB)", "memory_gib"),
    ("mean reward per step", "reward"),
    ("pass@k on held-out questions", lambda key: key.startswith("pass@")),
)


class MetricsLog:
    """Appends records to one run's metrics.jsonl, after dropping those a resume trains again."""

    def __init__(self, path: Path, keep_through: int):
        self.path = Path(path)
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if (record := _parse(line)) is not None and record["step"] <= keep_through]
            if kept != lines:
                atomic_write(self.path, "".join(line + "\n" for line in kept))

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(_finite(record), allow_nan=False)  # NaN is not JSON: a diverged loss is stored as null
        # one short write per line, flushed on close: a crash can tear only the line being written
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _finite(value):
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _parse(line: str) -> dict | None:
    """One line's record, or None for a line that is not one (torn by a crash)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int)
    return record if ok else None


def read_records(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a metrics file, each by step, the newest of a step winning."""
    train, evals = {}, {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        record = _parse(line)
        if record is None:
            continue
        (evals if isinstance(record.get("eval"), dict) else train)[record["step"]] = record
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def panels(train: list[dict], evals: list[dict]) -> list[tuple[str, dict[str, tuple[list, list]]]]:
    """(title, {series label: (steps, values)}) for each panel that has at least one finite value."""
    found = []
    for title, source in PANELS:
        series = {}
        if isinstance(source, str):
            series[source] = _points([(r["step"], r.get(source)) for r in train])
        else:
            keys = sorted({key for r in evals for key in r["eval"] if source(key)})
            for key in keys:
                series[key] = _points([(r["step"], r["eval"].get(key)) for r in evals])
        series = {label: xy for label, xy in series.items() if xy[0]}
        if series:
            found.append((title, series))
    return found


def _points(pairs: list[tuple[int, object]]) -> tuple[list, list]:
    kept = [(s, float(v)) for s, v in pairs if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return [s for s, _ in kept], [v for _, v in kept]


def draw(metrics_path: Path, title: str, out: Path) -> Path | None:
    """Draw every panel of a metrics file into the PNG `out` (written aside, then renamed); None if nothing to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: only drawing needs it
    from matplotlib.figure import Figure

    found = panels(*read_records(metrics_path)) if Path(metrics_path).exists() else []
    if not found:
        return None
    cols = min(3, len(found))
    rows = math.ceil(len(found) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    for k, (panel_title, series) in enumerate(found):
        ax = fig.add_subplot(rows, cols, k + 1)
        for label, (steps, values) in series.items():
            # few points (evaluations, short runs) get markers, or a single one would not show
            ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, linewidth=1.2, label=label)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, png.getvalue())
    return out


def stage_of(tag_dir: Path) -> str:
    """The stage whose checkpoint folder holds `tag_dir` (base, mid, sft, rl); else that folder's name."""
    parent = Path(tag_dir).parent.name
    return stage_of_folder(parent) or parent


def curve_name(stage: str) -> str:
    return f"curves-{re.sub(r'[^a-z0-9_-]', '-', stage.lower())}.png"


def list_curves(report: Path) -> list[str]:
    """Names of the report's curve PNGs, newest first."""
    if not report.is_dir():
        return []
    found = [p for p in report.iterdir() if CURVE_RE.match(p.name) and p.is_file() and not p.is_symlink()]
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def curve_file(report: Path, name: str) -> Path | None:
    """The curve PNG `name` directly inside `report`, or None: other names, links and anything outside are refused."""
    if not CURVE_RE.match(name):
        return None
    path = report / name
    if path.is_symlink() or not path.is_file() or path.resolve().parent != report.resolve():
        return None
    return path
