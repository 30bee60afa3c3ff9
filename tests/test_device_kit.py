"""bench/device_kit.py and bench/device_run.py: which distributions the kit carries,
wheels repacked from what is installed and installed offline again, shards cut to
size, a kit over its size refused with the old one kept, the run's steps (install
into the kit's site folder, a broken wheel, children killed on a cue or at their
time, a base_train log read into figures), usage errors; and, in the slow set, the
whole kit: prepared offline, installed into a fresh environment that lacks the
kit's distributions as the borrowed machines do, and run with --device cpu --smoke."""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_shard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ holds scripts, not an installed package

from bench import device_kit, device_run  # noqa: E402

LOCAL_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def corpus(folder: Path, shards: int = 3, docs: int = 300) -> Path:
    """Shards of short sentences over a small vocabulary: enough for a 300-token tokenizer and a toy run."""
    words = "the cat sat on a mat and dog ran far away from home".split()
    for s in range(shards):
        texts = [" ".join(words[(s + d * 7 + i * i) % len(words)] for i in range(10 + d % 50)) for d in range(docs)]
        write_shard(folder / f"shard_{s:05d}.parquet", texts, rows_per_group=50)
    return folder


def pip_install(wheels: list[Path], target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                           "--disable-pip-version-check", "--target", str(target), *map(str, wheels)],
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- device_kit: what it carries


def test_the_kit_carries_what_the_device_lacks_and_nothing_it_has():
    wanted = device_kit.kit_distributions(device_kit.DEVICE_PYTHON)
    assert {"rustbpe", "matplotlib", "pillow"} <= set(wanted)
    # numpy and packaging: matplotlib needs them, but torch and transformers bring them to the device
    assert not {"numpy", "packaging", "torch", "requests"} & set(wanted)
    assert all(version == importlib.metadata.version(name) for name, version in wanted.items())  # pinned to here


def test_a_repacked_wheel_installs_offline_and_imports_the_same_files(tmp_path):
    wheel = device_kit.repack_installed("cycler", tmp_path)  # small, pure Python
    assert wheel.name.startswith(f"cycler-{importlib.metadata.version('cycler')}-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        record = archive.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
    assert not any("__pycache__" in n or n.endswith("INSTALLER") for n in names)
    done = pip_install([wheel], tmp_path / "site")
    assert done.returncode == 0, done.stderr
    here = Path(importlib.metadata.distribution("cycler").locate_file("cycler"))
    there = tmp_path / "site" / "cycler"
    assert sorted(p.name for p in there.glob("*.py")) == sorted(p.name for p in here.glob("*.py"))
    assert (there / "__init__.py").read_bytes() == (here / "__init__.py").read_bytes()
    assert f"cycler/__init__.py,{device_kit.record_hash((here / '__init__.py').read_bytes())}" in record


def test_a_large_shard_is_cut_to_its_first_row_groups(tmp_path):
    source = write_shard(tmp_path / "big.parquet", [f"document {i} " + "words " * 200 for i in range(400)],
                         rows_per_group=50)
    limit = source.stat().st_size // 3
    cut = device_kit.copy_shard(source, tmp_path / "cut.parquet", limit)
    assert cut["cut"] and 0 < cut["rows"] < 400 and cut["rows"] % 50 == 0
    table = pq.read_table(tmp_path / "cut.parquet")
    assert table.column("text").to_pylist() == [f"document {i} " + "words " * 200 for i in range(cut["rows"])]
    whole = device_kit.copy_shard(source, tmp_path / "whole.parquet", source.stat().st_size)
    assert not whole["cut"] and whole["rows"] == 400


def test_a_kit_over_its_size_is_refused_and_the_old_one_kept(tmp_path):
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "kit.json").write_text('{"old": true}')
    with pytest.raises(device_kit.KitError, match=r"over 0 MiB; largest: "):
        device_kit.prepare(kit, corpus(tmp_path / "corpus"), "installed", vocab_size=300, max_bytes=1)
    assert json.loads((kit / "kit.json").read_text()) == {"old": True}


def test_prepare_without_a_corpus_is_a_usage_error(tmp_path, capsys):
    assert device_kit.main(["prepare", "--kit", str(tmp_path / "kit"), "--corpus", str(tmp_path)]) == 2
    assert "holds 0 shard_NNNNN.parquet file(s)" in capsys.readouterr().err
    assert not (tmp_path / "kit").exists()


# ---------------------------------------------------------------- device_run: its steps


def fake_wheel(folder: Path, name: str, body: str = "VALUE = 42\n") -> Path:
    """A one-module wheel of a distribution nothing here has installed."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}.py", body)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", f"{name}.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return wheel


def tiny_kit(tmp_path: Path, *wheels: tuple[str, str]) -> Path:
    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)
    (kit / "kit.json").write_text("{}")
    for name, body in wheels:
        fake_wheel(kit / "wheels", name, body)
    return kit


def run_steps(kit: Path, out: Path, steps: str) -> tuple[int, dict]:
    code = device_run.main(["--kit", str(kit), "--out", str(out), "--device", "cpu", "--smoke", "--steps", steps])
    return code, json.loads((out / "device_run.json").read_text())


def test_install_puts_only_the_missing_wheels_where_children_import_them(tmp_path, capsys):
    kit = tiny_kit(tmp_path, ("kit_probe_a", "VALUE = 42\n"))
    fake_wheel(kit / "wheels", "cycler")  # installed here already: left alone
    code, data = run_steps(kit, tmp_path / "out", "install,versions")
    assert code == 0, capsys.readouterr().out
    install, versions = data["steps"]
    assert (install["name"], install["status"]) == ("install", "PASS")
    assert install["figures"] == {"wheels": 2, "installed": 1, "already_here": 1}
    assert "imported (kit_probe_a): kit_probe_a 1.0" in install["message"] and "already here: cycler" in install["message"]
    assert versions["status"] == "PASS" and f"torch {importlib.metadata.version('torch')}" in versions["message"]


def test_a_wheel_that_installs_but_does_not_import_fails_install(tmp_path):
    kit = tiny_kit(tmp_path, ("kit_probe_c", "raise ImportError('built for another machine')\n"))
    code, data = run_steps(kit, tmp_path / "out", "install")
    [install] = data["steps"]
    assert code == 1 and install["status"] == "FAIL"
    assert "importing kit_probe_c exited 1" in install["message"] and "built for another machine" in install["message"]


def test_a_broken_wheel_fails_install_and_the_next_step_still_runs(tmp_path, capsys):
    kit = tiny_kit(tmp_path)
    (kit / "wheels" / "kit_probe_b-1.0-py3-none-any.whl").write_bytes(b"not a zip file")
    code, data = run_steps(kit, tmp_path / "out", "install,versions")
    assert code == 1
    install, versions = data["steps"]
    assert install["status"] == "FAIL" and "pip exited" in install["message"] and "kit_probe_b" in install["message"]
    assert versions["status"] == "PASS"
    assert re.search(r"^FAIL install ", capsys.readouterr().out, re.MULTILINE)


@pytest.mark.parametrize("argv, says", [
    (["--steps", "install,nonsense"], "unknown step(s) nonsense"),
    ([], "holds no kit.json"),
], ids=["unknown-step", "no-kit"])
def test_usage_errors_exit_2(tmp_path, capsys, argv, says):
    assert device_run.main(["--kit", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"), *argv]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_steps_bring_the_steps_they_depend_on():
    assert device_run.selected_steps("resume") == ["install", "train", "resume"]
    assert device_run.selected_steps("versions") == ["versions"]


def test_a_child_is_killed_on_its_cue_or_at_its_time(tmp_path):
    script = "import time\nfor i in range(5): print(f'line {i}', flush=True)\ntime.sleep(60)\n"
    cued = device_run.run_child([sys.executable, "-c", script], {}, tmp_path / "a.log", timeout=60,
                                kill_on=re.compile(r"^line 2$"))
    assert cued.killed_on_cue and not cued.timed_out and cued.code == -9 and cued.seconds < 30
    assert cued.ending().startswith("was killed on its cue")
    assert (tmp_path / "a.log").read_text().startswith("line 0\nline 1\nline 2\n")
    late = device_run.run_child([sys.executable, "-c", script], {}, tmp_path / "b.log", timeout=2)
    assert late.timed_out and not late.killed_on_cue and late.code == -9 and late.seconds < 30
    assert late.ending().startswith("was stopped past its time")
    assert "line 4" in late.output


def test_figures_are_read_from_a_base_train_log():
    log = "\n".join([
        "step 000001/000030 (  3.3%) | loss 11.0000 | lrm 1.000 | dt 61000ms | tok/s 4,300 | mfu 1.0% | elapsed 1m01s | eta 0m30s",
        "step 000002/000030 (  6.7%) | loss 10.0000 | lrm 1.000 | dt 650ms | tok/s 403,000 | mfu 38.5% | elapsed 1m02s | eta 0m20s",
        "step 000003/000030 ( 10.0%) | loss 9.0000 | lrm 1.000 | dt 640ms | tok/s 409,000 | mfu 39.5% | elapsed 1m02s | eta 0m20s",
        "V1207 [0/1] [__recompiles] Recompiling function forward in gpt.py:300",
        "step 000010 | validation bits per byte: 1.2345",
        "step 000010 | checkpoint saved to /x/base_checkpoints/d12/step_000010 in 2.5s",
        "W1207 [0/8] torch._dynamo hit config.recompile_limit (8)",
    ])
    f = device_run.log_figures(log)
    assert f["tok_per_s"] == 406_000 and f["mfu_percent"] == 39.0 and f["first_step_s"] == 61.0  # first step left out
    assert (f["evaluations"], f["last_bpb"], f["checkpoints"], f["checkpoint_s_max"]) == (1, 1.2345, 1, 2.5)
    assert f["recompiles"] == 1 and f["recompile_limit_hit"] is True
    assert "dynamo's recompile limit HIT" in device_run.describe(f)


# ---------------------------------------------------------------- the whole kit, as on a borrowed machine


def device_like_environment(folder: Path, lacking: set[str]) -> Path:
    """A fresh virtual environment that sees this one's packages except the distributions in
    `lacking` (through a folder of links and a .pth), as a borrowed machine has torch but no
    rustbpe: its python."""
    view = folder / "view"
    view.mkdir(parents=True)
    hidden = set()
    for name in lacking:
        for f in importlib.metadata.distribution(name).files or []:
            hidden.add(f.parts[0])
    for packages in site.getsitepackages():
        for entry in Path(packages).iterdir():
            if entry.name not in hidden and not (view / entry.name).exists():
                (view / entry.name).symlink_to(entry)
    env = folder / "env"
    venv.EnvBuilder(with_pip=False).create(env)
    [env_site] = env.glob("lib/python*/site-packages")
    (env_site / "device_view.pth").write_text(f"import site; site.addsitedir({str(view)!r})\n")
    return env / "bin" / "python"


@pytest.mark.slow  # ~2-3 min: repacking matplotlib and pillow, pip, gpu_check's kit checks, two base_train runs
def test_the_kit_installs_offline_into_a_fresh_environment_and_its_run_passes(tmp_path):
    kit = tmp_path / "kit"
    assert device_kit.main(["prepare", "--kit", str(kit), "--corpus", str(corpus(tmp_path / "corpus")),
                            "--wheels", "installed", "--vocab-size", "300"]) == 0
    manifest = json.loads((kit / "kit.json").read_text())
    carried = set(manifest["versions"])
    assert {"rustbpe", "matplotlib"} <= carried and manifest["python"] == LOCAL_PYTHON
    assert sorted(p.name for p in (kit / "data").iterdir()) == ["shard_00000.parquet", "shard_00001.parquet"]
    python = device_like_environment(tmp_path / "device", carried | {"nanochat-spark"})
    lacks = subprocess.run([str(python), "-c", "import torch, rustbpe"], capture_output=True, text=True)
    assert "No module named 'rustbpe'" in lacks.stderr  # the environment lacks what the kit brings, as the device does

    out = tmp_path / "out"
    done = subprocess.run([str(python), "bench/device_run.py", "--kit", str(kit), "--out", str(out), "--device", "cpu",
                           "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads((out / "device_run.json").read_text())
    steps = {s["name"]: s for s in data["steps"]}
    expected = ["install", "versions", *(f"gpu_check.{c}" for c in device_run.KIT_CHECKS), "train", "resume"]
    assert [s["name"] for s in data["steps"]] == expected
    assert all(s["status"] == "PASS" for s in data["steps"]), done.stdout
    assert steps["install"]["figures"]["installed"] == len(manifest["wheels"])  # every kit wheel, from the kit
    assert steps["resume"]["figures"]["resumed_at"] == device_run.SMOKE.train.kill_at
    assert all(math.isfinite(v) for s in data["steps"] for v in s["figures"].values())
    for line in expected:
        assert re.search(rf"^PASS {re.escape(line)} ", done.stdout, re.MULTILINE), done.stdout
    for log in ("install.log", "gpu_check.json", "gpu_check.log", "train.log", "resume.log"):
        assert (out / log).is_file()


def test_a_failed_condition_is_named_with_how_the_run_ended():
    child = device_run.Child(code=1, seconds=3.0, output="Traceback\nValueError: no shards in /kit/data\n",
                             killed_on_cue=False, timed_out=False)
    figures = device_run.log_figures(child.output)
    step = device_run.verdict_step("train", {"killed after the step-20 checkpoint": False, "recompile limit not hit": True},
                                   child, figures, "train.log")
    assert step.status == "FAIL"
    assert step.message.startswith("not killed after the step-20 checkpoint: it exited 1 (log train.log)")
    assert step.message.endswith("ValueError: no shards in /kit/data")
