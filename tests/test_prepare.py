"""prepare.sh end to end on a local corpus: shards, tokenizer, evaluation, idempotence."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _corpus(folder: Path) -> Path:
    rnd = random.Random(0)
    words = ["".join(rnd.choice("etaoinshrdlucmfw") for _ in range(rnd.randint(2, 8))) for _ in range(300)] + ["42", "é"]
    folder.mkdir(parents=True)
    for i in range(40):
        (folder / f"doc{i}.txt").write_text(" ".join(rnd.choice(words) for _ in range(400)), encoding="utf-8")
    return folder


def _prepare(base_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    return subprocess.run(["bash", "prepare.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.slow  # ~27 s: ./prepare.sh end to end on a local corpus; `pytest -m slow`
def test_prepare_from_local_corpus(tmp_path, base_dir):
    source = _corpus(tmp_path / "texts")
    first = _prepare(base_dir, "--from", str(source), "--vocab-size", "400", "--no-wandb", "--offline")
    assert first.returncode == 0, first.stdout + first.stderr
    assert sorted(p.name for p in (base_dir / "base_data").iterdir()) == ["shard_00000.parquet", "shard_00001.parquet"]
    assert (base_dir / "tokenizer" / "tokenizer.tiktoken").is_file()
    assert "bytes/token" in first.stdout or "bytes per token" in first.stdout.lower()
    again = _prepare(base_dir, "--from", str(source), "--vocab-size", "400", "--no-wandb", "--offline")
    assert again.returncode == 0
    assert "already present" in again.stdout and "already trained" in again.stdout


def test_prepare_help_and_bad_flag(base_dir):
    assert "--total-shards" in _prepare(base_dir, "--help").stdout
    assert "needs --from" in _prepare(base_dir, "--offline").stderr
    bad = _prepare(base_dir, "--frobnicate")
    assert bad.returncode != 0 and "unknown option" in bad.stderr
