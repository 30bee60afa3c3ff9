"""prepare.sh end to end on a local corpus, and on ClimbMix from a local HTTP server: shards, tokenizer,
evaluation, idempotence."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from conftest import make_shards, write_shard
from test_download import ShardServer, closed_port_url

ROOT = Path(__file__).resolve().parents[1]


def _corpus(folder: Path) -> Path:
    rnd = random.Random(0)
    words = ["".join(rnd.choice("etaoinshrdlucmfw") for _ in range(rnd.randint(2, 8))) for _ in range(300)] + ["42", "é"]
    folder.mkdir(parents=True)
    for i in range(40):
        (folder / f"doc{i}.txt").write_text(" ".join(rnd.choice(words) for _ in range(400)), encoding="utf-8")
    return folder


def _prepare(base_dir: Path, *args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), **env_vars}
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


@pytest.mark.slow  # ~45 s on 2 busy cores: ./prepare.sh end to end twice, tokenizer and its evaluation included; `pytest -m slow`
def test_prepare_climbmix_then_the_default_fineweb_each_with_its_tokenizer(tmp_path, base_dir):
    """--dataset climbmix fetches ClimbMix's shard names into base_data_climbmix and trains the tokenizer there;
    --dataset fineweb-edu afterwards goes back to base_data and trains it again. The Hub is a local server."""
    make_shards(tmp_path / "remote", num_shards=2, docs_per_shard=400, rows_per_group=100)
    write_shard(tmp_path / "remote" / "shard_06542.parquet", [f"climbmix validation {d} " * 20 for d in range(100)])
    write_shard(tmp_path / "remote" / "shard_01822.parquet", [f"fineweb validation {d} " * 20 for d in range(100)])
    server = ShardServer(tmp_path / "remote")
    # the evaluation bundle's and word list's servers are behind a closed proxy: refused in seconds, not fatal
    offline = {"NANOCHAT_DATA_URL": server.url,
               "HTTPS_PROXY": closed_port_url(), "https_proxy": closed_port_url(), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    flags = ["--shards", "1", "--total-shards", "0", "--vocab-size", "300", "--no-wandb"]
    try:
        climbmix = _prepare(base_dir, "--dataset", "climbmix", *flags, **offline)
        assert climbmix.returncode == 0, climbmix.stdout[-3000:] + climbmix.stderr[-3000:]
        assert sorted(p.name for p in (base_dir / "base_data_climbmix").iterdir()) == ["shard_00000.parquet", "shard_06542.parquet"]
        assert "characters of base_data_climbmix" in climbmix.stdout
        assert f"data: {base_dir / 'base_data_climbmix'}" in climbmix.stdout
        fineweb = _prepare(base_dir, "--dataset", "fineweb-edu", *flags, **offline)
        assert fineweb.returncode == 0, fineweb.stdout[-3000:] + fineweb.stderr[-3000:]
        assert sorted(p.name for p in (base_dir / "base_data").iterdir()) == ["shard_00000.parquet", "shard_01822.parquet"]
        assert "trained on base_data_climbmix: training it again on base_data" in fineweb.stdout
    finally:
        server.close()
