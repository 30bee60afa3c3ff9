"""Two "nodes" on one host: two torchrun launchers with --nnodes 2 and one process each (gloo, 127.0.0.1),
once with a base dir of their own each (machines with their own disks) and once sharing one (a shared home
folder). Saving, resuming after one node's newest step is gone, --fresh, Ctrl-C, pretrain.sh's CORE
decision and a fault on rank 1 all end with every rank at the same step, within a bounded time.

The runs are scripts.base_train on the tiny model and data of tests/test_base_train.py."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from child import Child
from test_base_train import ROWS, SEQ, TINY, workspace  # noqa: F401 (workspace: the fixture, used by name)
from two_ranks import free_port

ROOT = Path(__file__).resolve().parents[1]
TAG = "mn"
STEPS = ["--total-batch-size", str(2 * ROWS * SEQ), "--eval-every", "0", "--packing", "concat", "--model-tag", TAG]
RUN_TIMEOUT = 240  # seconds for one two-node run of the tiny model on a busy 2-core machine


def _env(base: Path) -> dict:
    return {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _launcher(node: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
            "--master-addr=127.0.0.1", f"--master-port={port}"]


def _start(bases: tuple[Path, Path], *target: str) -> list[Child]:
    port = free_port()
    return [Child(_launcher(node, port) + list(target), cwd=ROOT, env=_env(base)) for node, base in enumerate(bases)]


def _finish(nodes: list[Child], timeout: float = RUN_TIMEOUT) -> tuple[list[int], list[str]]:
    try:
        codes = [node.finish(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            node.__exit__()
    return codes, [node.output for node in nodes]


def _train(bases: tuple[Path, Path], *args: str) -> list[str]:
    codes, outputs = _finish(_start(bases, "-m", "scripts.base_train", *TINY, *STEPS, *args))
    assert codes == [0, 0], "\n---- node 1 ----\n".join(out[-3000:] for out in outputs)
    return outputs


def _steps(base: Path, tag: str = TAG) -> list[str]:
    return sorted(p.name for p in (base / "base_checkpoints" / tag).glob("step_*"))


def _weights(base: Path, step: str) -> dict:
    return load_file(str(base / "base_checkpoints" / TAG / step / "model.safetensors"))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def two_disks(workspace, tmp_path):  # noqa: F811 (the fixture imported above)
    """Node 0's base dir and a copy for node 1: the tokenizer and shards on each machine's own disk."""
    other = tmp_path / "node1_base"
    shutil.copytree(workspace, other)
    return workspace, other


@pytest.mark.slow  # ~90 s: four two-node runs; `pytest -m slow`
def test_disks_of_their_own_each_node_keeps_a_copy_and_they_resume_fresh_and_stop_together(two_disks):
    node0, node1 = two_disks
    _train(two_disks, "--num-iterations", "4", "--save-every", "2")
    for node, base in enumerate(two_disks):
        assert _steps(base) == ["step_000002", "step_000004"]
        files = {p.name for p in (base / "base_checkpoints" / TAG / "step_000004").iterdir()}
        assert files == {"model.safetensors", "meta.json", f"optim_rank{node}.pt", f"data_rank{node}.json"}  # its own ranks'
        assert not list((base / "base_checkpoints").glob(".writer-*"))  # the detection's markers are gone
    assert _same_weights(_weights(node0, "step_000004"), _weights(node1, "step_000004"))

    # node 1's newest step is lost: both nodes go back to the step each still has, not each to its own newest
    shutil.rmtree(node1 / "base_checkpoints" / TAG / "step_000004")
    outputs = _train(two_disks, "--num-iterations", "6", "--save-every", "2")
    for out in outputs:
        assert "every rank resumes step 2" in out, out[-3000:]
    assert f"resumed from {node0 / 'base_checkpoints' / TAG / 'step_000002'} (step 2)" in outputs[0]
    assert _steps(node0) == _steps(node1) == ["step_000002", "step_000004", "step_000006"]
    assert _same_weights(_weights(node0, "step_000006"), _weights(node1, "step_000006"))

    # --fresh: each node's writer moves its own copy aside, under the same name
    outputs = _train(two_disks, "--num-iterations", "2", "--save-every", "0", "--fresh")
    asides = [[p.name for p in (base / "base_checkpoints").glob(f"{TAG}.old-*")] for base in two_disks]
    assert len(asides[0]) == 1 and asides[0] == asides[1]
    assert all("--fresh: moved the old run aside" in out for out in outputs)
    assert _steps(node0) == _steps(node1) == ["step_000002"]

    # Ctrl-C on node 1 only: every rank stops after the same step and both copies hold it
    nodes = _start(two_disks, "-m", "scripts.base_train", *TINY, *STEPS, "--num-iterations", "500", "--save-every", "0")
    nodes[0].wait_for("step 000005/", timeout=RUN_TIMEOUT)
    nodes[1].proc.send_signal(signal.SIGINT)
    codes, outputs = _finish(nodes, timeout=120)
    assert all(code != 0 for code in codes)
    stopped = re.search(r"^stopped at step (\d+);", outputs[0], re.MULTILINE)
    assert stopped, outputs[0][-3000:]
    newest = f"step_{int(stopped.group(1)):06d}"
    assert _steps(node0)[-1] == _steps(node1)[-1] == newest
    assert _same_weights(_weights(node0, newest), _weights(node1, newest))


@pytest.mark.slow  # ~60 s: three two-node runs; `pytest -m slow`
def test_one_shared_disk_has_one_writer_and_a_broken_file_of_one_rank_takes_both_back(workspace):  # noqa: F811
    shared = (workspace, workspace)
    _train(shared, "--num-iterations", "4", "--save-every", "2")
    assert _steps(workspace) == ["step_000002", "step_000004"]
    newest = workspace / "base_checkpoints" / TAG / "step_000004"
    assert {f"optim_rank{r}.pt" for r in (0, 1)} | {f"data_rank{r}.json" for r in (0, 1)} <= {p.name for p in newest.iterdir()}
    assert not list((workspace / "base_checkpoints").glob(".*"))  # no temporary folder or marker left by a second writer

    (newest / "optim_rank1.pt").write_bytes(b"damaged")  # only rank 1 cannot use step 4
    outputs = _train(shared, "--num-iterations", "6", "--save-every", "2")
    assert "every rank resumes step 2" in outputs[0] and "(step 2)" in outputs[0], outputs[0][-3000:]
    assert _steps(workspace) == ["step_000002", "step_000004", "step_000006"]

    outputs = _train(shared, "--num-iterations", "2", "--save-every", "0", "--fresh")
    assert len(list((workspace / "base_checkpoints").glob(f"{TAG}.old-*"))) == 1  # moved once, by rank 0
    assert _steps(workspace) == ["step_000002"]


def test_the_core_step_is_decided_by_node_0_for_every_node(tmp_path):
    """pretrain.sh's node0_has with the eval bundle on node 0 only: both nodes run CORE (asked each its own
    disk, node 1 would skip the step and leave node 0 at its rendezvous)."""
    bases = (tmp_path / "node0", tmp_path / "node1")
    (bases[0] / "eval_bundle").mkdir(parents=True)
    bases[1].mkdir()
    script = 'source scripts/common.sh; node0_has "$NANOCHAT_BASE_DIR/eval_bundle" && echo CORE || echo skip'
    port = free_port()
    procs = [subprocess.Popen(["bash", "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**_env(base), "NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)}) for node, base in enumerate(bases)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [out.strip().splitlines()[-1] for out in outs] == ["CORE", "CORE"], outs


def test_several_nodes_need_the_master_address_and_a_node_rank_in_range():
    for flags, said in ((["--nnodes", "2", "--node-rank", "1"], "--nnodes 2 needs --master-addr"),
                        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "10.0.0.1"], "--node-rank must be 0 to 1"),
                        (["--nnodes", "two"], "--nnodes must be a positive whole number")):
        out = subprocess.run(["bash", "pretrain.sh", *flags], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and said in out.stderr, out.stderr


FAULT = """
import os, sys
from nanochat import training

if os.environ["RANK"] == "1":  # rank 1 fails in its third step; rank 0 is then waiting in that step's collectives
    train_step = training.TrainLoop.train_step

    def failing(self, step):
        if step == 2:
            raise RuntimeError("injected fault")
        return train_step(self, step)

    training.TrainLoop.train_step = failing

from scripts import base_train
sys.exit(base_train.main(sys.argv[1:]))
"""


@pytest.mark.slow  # ~25 s: one two-rank run; `pytest -m slow`
def test_a_fault_on_rank_1_is_loud_and_ends_the_run_within_seconds(workspace, tmp_path):  # noqa: F811
    script = tmp_path / "fault.py"
    script.write_text(FAULT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), *TINY, *STEPS,
               "--num-iterations", "50", "--save-every", "0"]
    with Child(command, cwd=ROOT, env=_env(workspace)) as run:
        run.wait_for("step 000002/", timeout=RUN_TIMEOUT)
        failed_at = time.monotonic()
        code = run.finish(timeout=60)
        took = time.monotonic() - failed_at
    assert code != 0 and took < 60
    assert "[rank 1/2] error: RuntimeError: injected fault (a bug: traceback below)" in run.output, run.output[-3000:]
    assert "step 000004/" not in run.output  # rank 0 did not train on alone
