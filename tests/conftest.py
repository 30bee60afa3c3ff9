"""Fixtures shared by the test files: an isolated base dir, one torch thread, and parquet shard builders."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch) -> Path:
    """Every test gets its own $NANOCHAT_BASE_DIR, so nothing touches ~/.cache."""
    base = tmp_path / "nanochat_base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


@pytest.fixture(autouse=True)
def fresh_nanochat_logger():
    """Undo setup_logging() between tests: it stops propagation, which would hide records from caplog."""
    yield
    logger = logging.getLogger("nanochat")
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test, as in the OMP_NUM_THREADS=1 children: a stage run in-process then
    computes the same bits as one run as a child, and toy matrices lose nothing (while other work holds a
    core, a second thread costs several times over)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_shard(path: Path, texts: list[str], rows_per_group: int = 1024) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), path, row_group_size=rows_per_group)
    return path


def make_shards(directory: Path, num_shards: int, docs_per_shard: int, rows_per_group: int) -> list[list[str]]:
    """Shards of uniquely named documents; returns the documents of each shard."""
    contents = []
    for s in range(num_shards):
        docs = [f"shard {s} document {d} " + "lorem ipsum " * (d % 7) for d in range(docs_per_shard)]
        write_shard(directory / f"shard_{s:05d}.parquet", docs, rows_per_group)
        contents.append(docs)
    return contents
