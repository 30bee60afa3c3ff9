"""nanochat.resume: a restarted run continues only a matching checkpoint; --fresh moves the old run aside."""

import json

import pytest

from nanochat.checkpoint import CheckpointError
from nanochat.resume import decide, mismatches
from two_ranks import on_two_ranks

CONFIG = {"n_layer": 4, "n_embd": 256, "vocab_size": 8192, "sequence_len": 256}
ARGS = {"total_batch_size": 4096, "max_seq_len": 256, "device_batch_size": 16}


def saved_run(tag_dir, steps=(10, 20), config=CONFIG, args=ARGS):
    for step in steps:
        folder = tag_dir / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"model_config": config, "args": args, "step": step}))
    return tag_dir


def test_no_checkpoint_starts_and_resume_insists(tmp_path):
    assert decide(tmp_path / "d4", "auto", CONFIG, ARGS) is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        decide(tmp_path / "d4", "resume", CONFIG, ARGS)


def test_a_matching_run_continues_from_its_newest_readable_step(tmp_path, capsys):
    tag = saved_run(tmp_path / "d4")
    (tag / "step_000030").mkdir()  # a half-written step: no meta.json
    meta = decide(tag, "auto", CONFIG, {**ARGS, "device_batch_size": None})
    assert meta["step"] == 20 and meta["args"]["device_batch_size"] == 16
    assert "continuing the run in" in capsys.readouterr().out


@pytest.mark.parametrize("config, args, said", [
    ({**CONFIG, "n_layer": 6}, ARGS, "model n_layer: 4 -> 6"),
    (CONFIG, {**ARGS, "total_batch_size": 8192}, "--total-batch-size: 4096 -> 8192"),
])
def test_a_run_with_other_settings_is_refused_naming_the_difference(tmp_path, config, args, said):
    tag = saved_run(tmp_path / "d4")
    for mode in ("auto", "resume"):
        with pytest.raises(CheckpointError, match="--fresh") as refused:
            decide(tag, mode, config, args)
        assert said in str(refused.value)
    assert mismatches({"model_config": CONFIG, "args": ARGS}, CONFIG, ARGS) == []


def test_fresh_moves_the_old_run_aside_and_starts(tmp_path, capsys):
    tag = saved_run(tmp_path / "d4")
    assert decide(tag, "fresh", {**CONFIG, "n_layer": 6}, ARGS) is None
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("d4.old-")]
    assert not tag.exists() and len(aside) == 1 and (aside[0] / "step_000020" / "meta.json").is_file()
    assert "moved the old run aside" in capsys.readouterr().out
    assert decide(tag, "fresh", CONFIG, ARGS) is None  # nothing to move: just starts
    with pytest.raises(ValueError, match="unknown resume mode"):
        decide(tag, "sometimes", CONFIG, ARGS)


def _fresh_on_rank(rank: int, port: int, tag: str, world: int = 2) -> None:
    import torch.distributed as dist
    from pathlib import Path

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        assert decide(Path(tag), "fresh", CONFIG, ARGS) is None
    finally:
        dist.destroy_process_group()


def test_fresh_under_two_ranks_moves_the_run_once_and_nobody_waits_alone(tmp_path):

    tag = saved_run(tmp_path / "d4")
    on_two_ranks(_fresh_on_rank, str(tag))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("d4.old-")]
    assert not tag.exists() and len(aside) == 1
