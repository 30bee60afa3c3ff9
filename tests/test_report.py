"""The report card: sections with JSON sidecars, generate (order, summary, total time, copy), reset."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nanochat import report


def leftover_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def write_full_run() -> None:
    """Sections as the stage scripts write them, deliberately out of pipeline order."""
    report.write_section("chat-eval-sft", "Chat eval SFT", {"ARC-Easy": 0.41, "MMLU": 0.31, "GSM8K": 0.05, "ChatCORE": 0.2})
    report.write_section("base-eval", "Base eval", {"CORE": 0.2219, "hellaswag": 0.28, "wall time (s)": 600.0})
    report.write_section("custom-bench", "Custom", {"score": 3})
    report.write_section("tokenizer", "Tokenizer", {"vocab size": 65536, "wall time (s)": 300})
    report.write_section("chat-eval-mid", "Chat eval mid", {"ARC-Easy": 0.35, "ARC-Challenge": 0.28, "HumanEval": 0.06})
    report.write_section("base-loss", "Base loss", {"train bpb": 0.81, "val bpb": 0.82, "wall time (s)": 3 * 3600.0})
    report.write_section("chat-eval-rl", "Chat eval RL", {"GSM8K": 0.0758})


def table_rows(text: str) -> dict[str, list[str]]:
    """Summary table rows as metric -> cells (BASE, MID, SFT, RL)."""
    body = text.split("## Summary", 1)[1]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "Metric":
            rows[cells[0]] = cells[1:]
    return rows


def test_section_and_sidecar(base_dir):
    path = report.write_section("base-eval", "Base eval", {"model": "d20 step 5", "CORE": 0.25, "tasks": 22, "ok": True}, "notes here", metrics={"CORE precise": 0.2512345})
    assert path == base_dir / "report" / "base-eval.md"
    text = path.read_text()
    assert text.startswith("## Base eval\n") and "- CORE: 0.25\n" in text and "- tasks: 22\n" in text and text.endswith("notes here\n")
    sidecar = json.loads((base_dir / "report" / "base-eval.json").read_text())
    # strings and booleans are not metrics; explicit metrics join the numeric items
    assert sidecar["metrics"] == {"CORE": 0.25, "tasks": 22, "CORE precise": 0.2512345}
    assert sidecar["slug"] == "base-eval" and sidecar["title"] == "Base eval"
    assert leftover_temp_files(base_dir) == []


def test_section_replaces_atomically(base_dir, monkeypatch):
    report.write_section("sft-train", "SFT", {"loss": 1.0})
    calls = []
    real_replace = os.replace

    def spying_replace(src, dst):
        calls.append((Path(src), Path(dst)))
        assert Path(src).parent == Path(dst).parent  # same folder, so the rename is atomic
        return real_replace(src, dst)

    monkeypatch.setattr(report.os, "replace", spying_replace)
    report.write_section("sft-train", "SFT", {"loss": 0.5})
    assert [dst.name for _, dst in calls] == ["sft-train.json", "sft-train.md"]
    assert json.loads((base_dir / "report" / "sft-train.json").read_text())["metrics"] == {"loss": 0.5}
    assert leftover_temp_files(base_dir) == []


def test_failed_write_keeps_old_section_and_leaves_no_temp(base_dir, monkeypatch):
    report.write_section("rl-train", "RL", {"reward": 0.1})

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        report.write_section("rl-train", "RL", {"reward": 0.9})
    assert "0.1" in (base_dir / "report" / "rl-train.md").read_text()
    assert leftover_temp_files(base_dir) == []


def test_bad_metrics_and_slugs_are_rejected(base_dir):
    with pytest.raises(ValueError, match="'GSM8K' must be a number"):
        report.write_section("chat-eval-sft", "x", {}, metrics={"GSM8K": "0.5"})
    for slug in ("", "../evil", "report", "archive", ".hidden"):
        with pytest.raises(ValueError, match="slug"):
            report.write_section(slug, "x", {})


def test_non_finite_metric_is_stored_as_null(base_dir):
    report.write_section("mid-train", "Mid", {"loss": float("nan")})
    assert json.loads((base_dir / "report" / "mid-train.json").read_text())["metrics"] == {"loss": None}


def test_generate_orders_sections_fills_summary_and_copies(base_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    write_full_run()
    assert report.main(["generate"]) == 0
    text = (base_dir / "report" / "report.md").read_text()
    assert (work / "report.md").read_text() == text
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == [
        "## Environment", "## Tokenizer", "## Base loss", "## Base eval", "## Chat eval mid",
        "## Chat eval SFT", "## Chat eval RL", "## Custom", "## Summary",
    ]
    assert text.startswith("# nanochat report card\n") and "- torch: " in text and "- code: " in text
    rows = table_rows(text)
    assert list(rows) == ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]
    assert rows["CORE"] == ["0.2219", "-", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "0.3500", "0.4100", "-"]
    assert rows["ARC-Challenge"] == ["-", "0.2800", "-", "-"]
    assert rows["GSM8K"] == ["-", "-", "0.0500", "0.0758"]
    assert rows["HumanEval"] == ["-", "0.0600", "-", "-"]
    assert rows["ChatCORE"] == ["-", "-", "0.2000", "-"]
    # 300 s + 600 s + 3 h
    assert "Total wall-clock time: 3h15m" in text


def test_summary_reads_sidecars_not_markdown(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report.write_section("base-eval", "Base eval", {"CORE": 0.2}, metrics={"CORE": 0.2345678})
    md = base_dir / "report" / "base-eval.md"
    md.write_text(md.read_text().replace("CORE: 0.2", "CORE: 0.9"))
    report.generate()
    assert table_rows((tmp_path / "report.md").read_text())["CORE"][0] == "0.2346"


def test_unreadable_sidecar_is_reported_by_file_and_line(base_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    report.write_section("base-eval", "Base eval", {"CORE": 0.2})
    report.write_section("chat-eval-sft", "SFT eval", {"MMLU": 0.3})
    sidecar = base_dir / "report" / "chat-eval-sft.json"
    sidecar.write_text('{\n  "metrics": {"MMLU": 0.3,,}\n}\n')
    assert report.main(["generate"]) == 1
    assert f"{sidecar}:2: invalid JSON" in capsys.readouterr().err
    text = (tmp_path / "report.md").read_text()
    assert table_rows(text)["CORE"][0] == "0.2000" and table_rows(text)["MMLU"] == ["-"] * 4
    assert "Unreadable metrics" in text


def test_wall_time_formatting():
    # one duration format everywhere: the training log's (nanochat.progress)
    assert report.format_duration(0) == "0m00s"
    assert report.format_duration(59 * 60 + 29) == "59m29s"
    assert report.format_duration(25 * 3600 + 5 * 60) == "1d01h05m"
    assert report.total_wall_time({"a": {"wall time (s)": 60}, "b": {}, "c": {"wall time (s)": None}}) == 60
    assert report.total_wall_time({"a": {}}) is None


def test_generate_with_no_sections_says_empty(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert report.main(["generate"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "The report is empty" in text and "## Summary" not in text


def test_reset_archives_and_starts_a_header(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_full_run()
    report.generate()
    old = sorted(p.name for p in (base_dir / "report").iterdir())
    when = datetime.datetime(2025, 11, 2, 9, 30, 0)
    archive = report.reset(when)
    assert archive == base_dir / "report" / "archive" / "20251102-093000"
    assert sorted(p.name for p in archive.iterdir()) == old
    current = sorted(p.name for p in (base_dir / "report").iterdir() if p.is_file())
    assert current == ["header.json", "header.md"]
    assert "2025-11-02T09:30:00" in (base_dir / "report" / "header.md").read_text()
    # a second reset within the same second gets its own folder
    assert report.reset(when) == base_dir / "report" / "archive" / "20251102-093000-1"
    report.generate()
    text = (tmp_path / "report.md").read_text()
    assert "## Run" in text and "The report is empty" in text


def test_code_size_counts_tracked_files_only(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("x = 1\ny = 2\n")
    (repo / "run.sh").write_text("echo hi\n")
    (repo / "data.txt").write_text("not code\n")
    (repo / "untracked.py").write_text("z = 3\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(git[:5] + ["init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "pkg/a.py", "run.sh", "data.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "init"], check=True)
    assert report.code_size(repo) == {"files": 2, "lines": 3, "characters": 20}
    info = report.git_info(repo)
    assert len(info["commit"]) == 40 and info["dirty"] == "no"
    (repo / "run.sh").write_text("echo changed\n")
    assert report.git_info(repo)["dirty"] == "yes"


def test_code_size_without_git_walks_and_skips_hidden(tmp_path):
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "big.py").write_text("a\n" * 100)
    (tmp_path / "tool.py").write_text("print(1)\n")
    (tmp_path / "README.md").write_text("# hi\n\ntext\n")
    assert report.git_info(tmp_path) == {}
    assert report.code_size(tmp_path) == {"files": 2, "lines": 4, "characters": 20}


def test_cli_help_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as helped:
        report.main(["--help"])
    out = capsys.readouterr().out
    assert helped.value.code == 0 and "generate" in out and "reset" in out
    with pytest.raises(SystemExit) as bad:
        report.main(["publish"])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and "usage:" in err and "invalid choice" in err


def test_stage_times_table_and_section(base_dir, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "prepare.seconds").write_text("13\n")
    (marks / "pretrain.seconds").write_text("209\n")
    (marks / "sft.seconds").write_text("garbage")  # unreadable: left out, not a crash
    table = report.stage_times(marks, ["prepare", "pretrain", "mid", "sft"])
    assert table.splitlines()[2:] == ["| prepare | 0m13s |", "| pretrain | 3m29s |", "| **total** | **3m42s** |"]
    sidecar = json.loads((report.report_dir() / "stage-times.json").read_text())
    assert sidecar["metrics"] == {"prepare (s)": 13, "pretrain (s)": 209, "total (s)": 222}
    assert "| pretrain | 3m29s |" in (report.report_dir() / "stage-times.md").read_text()
