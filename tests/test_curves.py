"""Training curves: a tiny pretraining run's metrics.jsonl (one line per step and evaluation), the PNG the
loop draws into the report folder and report.md's links to it, resume without duplicated points, and a
file torn by a crash. The route that serves the PNGs is tested with the server (test_server.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import matplotlib.image
import pytest

from nanochat import report
from nanochat.curves import METRICS_FILE, MetricsLog, draw, read_records
from test_base_train import ROWS, SEQ, here, workspace  # noqa: F401  (fixtures: a tokenizer and shards, base_train in-process)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = ["--num-iterations", "12", "--total-batch-size", str(ROWS * SEQ), "--eval-every", "4", "--save-every", "4",
         "--model-tag", "c"]


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)  # decodes the whole image, or raises
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        image.verify()


def steps_of(records: list[dict]) -> list[int]:
    return [r["step"] for r in records]


def test_a_tiny_run_draws_curves_that_report_md_links(workspace, here, tmp_path, monkeypatch):  # noqa: F811
    code, out = here(*STEPS)
    assert code == 0, out
    train, evals = read_records(workspace / "base_checkpoints" / "c" / METRICS_FILE)
    assert steps_of(train) == list(range(1, 13)) and steps_of(evals) == [4, 8, 12]
    assert {"loss", "lrm", "tok_per_s", "dt_s", "memory_gib"} <= set(train[0]) and "val_bpb" in evals[0]["eval"]
    assert train[-1]["lrm"] < train[0]["lrm"] == 1.0  # the warmdown is on the curve
    png = workspace / "report" / "curves-base.png"
    assert_png(png)
    assert f"curves drawn to {png}" in out
    monkeypatch.chdir(tmp_path)
    copy, problems = report.generate()
    card = (workspace / "report" / "report.md").read_text()
    assert "## Training curves" in card and "![base](curves-base.png)" in card
    # the copy elsewhere links the same file, relative to where the copy is
    link = copy.read_text().split("![base](")[1].split(")")[0]
    assert not os.path.isabs(link) and (copy.parent / link).resolve() == png.resolve()


@pytest.mark.slow  # 11-15 s on 2 cores: the default run must stay under ~10 min
def test_resume_does_not_duplicate_points(workspace, here):  # noqa: F811
    assert here(*STEPS)[0] == 0
    log = workspace / "base_checkpoints" / "c" / METRICS_FILE
    # as if killed between the checkpoints of steps 8 and 12: the file has lines for 9-12, the newest checkpoint is 8
    shutil.rmtree(workspace / "base_checkpoints" / "c" / "step_000012")
    code, out = here(*STEPS, "--resume")
    assert code == 0 and "resumed from" in out
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in lines if "eval" not in r] == list(range(1, 13))  # 9-12 once: the old ones were dropped
    assert [r["step"] for r in lines if "eval" in r] == [4, 8, 12]
    # resumed at its end, a run evaluates its last step again: the newest values count, once
    assert here(*STEPS, "--resume")[0] == 0
    train, evals = read_records(log)
    assert steps_of(train) == list(range(1, 13)) and steps_of(evals) == [4, 8, 12]


def test_a_torn_line_and_a_nan_loss(tmp_path):
    path = tmp_path / "run" / METRICS_FILE
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"step": s, "loss": 4.0 - s / 10, "lrm": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    log = MetricsLog(path, keep_through=3)  # resumed at step 3: 4, 5 and the torn line go
    assert steps_of(read_records(path)[0]) == [1, 2, 3]
    log.append({"step": 4, "loss": float("nan"), "lrm": 0.5})
    log.append({"step": 4, "eval": {"val_bpb": 1.5, "pass@1": float("inf")}})
    assert json.loads(path.read_text().splitlines()[-2])["loss"] is None  # strict JSON: null, not NaN
    train, evals = read_records(path)
    assert steps_of(train) == [1, 2, 3, 4] and evals == [{"step": 4, "eval": {"val_bpb": 1.5, "pass@1": None}}]
    out = draw(path, "a title", tmp_path / "report" / "curves-x.png")  # one evaluation point is still drawn
    assert out is not None and not list(out.parent.glob(".*tmp"))
    assert_png(out)
    assert draw(tmp_path / "missing.jsonl", "t", tmp_path / "report" / "curves-y.png") is None


@pytest.mark.parametrize("stage, folder", [("base", "base_checkpoints"), ("rl", "chatrl_checkpoints")])
def test_stage_names_from_checkpoint_folders(stage, folder, tmp_path):
    from nanochat.curves import curve_name, stage_of

    assert curve_name(stage_of(tmp_path / folder / "d4")) == f"curves-{stage}.png"
