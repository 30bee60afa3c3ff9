"""Checkpoints: atomic writes, verification, fallback to the previous one, pruning."""

from __future__ import annotations

import json

import pytest
import torch

from nanochat.checkpoint import CheckpointError, list_steps, load_checkpoint, save_checkpoint, step_dir_name
from two_ranks import on_two_ranks


def _save(tag_dir, step, keep_last=None):
    model = {"w": torch.full((3, 4), float(step)), "b": torch.arange(5.0) * step}
    optim = [{"state": {0: {"exp_avg": torch.ones(2) * step}}, "param_groups": [{"lr": 0.1, "params": [0]}]}]
    return save_checkpoint(tag_dir, step, model_state=model, optim_state=optim, data_state={"position": {"shard": step}, "buffer": [1, 2]},
                           meta={"metrics": {"loss": 1.0 / step}}, keep_last=keep_last)


def test_round_trip(tmp_path):
    _save(tmp_path, 10)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 10 and ckpt.meta["metrics"]["loss"] == 0.1 and ckpt.meta["world_size"] == 1
    assert torch.equal(ckpt.model_state["w"], torch.full((3, 4), 10.0))
    assert torch.equal(ckpt.optim_state[0]["state"][0]["exp_avg"], torch.ones(2) * 10)
    assert ckpt.data_state == {"position": {"shard": 10}, "buffer": [1, 2]}
    assert not list(tmp_path.glob(".*"))  # no temporary folders left


def test_meta_and_path_say_which_checkpoint_was_loaded(tmp_path):
    # the first save of a run goes into a tag folder that does not exist yet
    tag_dir = tmp_path / "base" / "d4"
    _save(tag_dir, 7)
    ckpt = load_checkpoint(tag_dir)
    # the report and the resume log read the step from meta.json and name the folder from path
    assert ckpt.meta["step"] == 7 and ckpt.path == tag_dir / step_dir_name(7)


def test_newest_wins_and_pruning_keeps_last(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=2)
    assert list_steps(tmp_path) == [3, 4]
    assert load_checkpoint(tmp_path).step == 4
    assert load_checkpoint(tmp_path, step=3).step == 3


@pytest.mark.parametrize("damage", ["truncate_model", "flip_byte", "drop_meta", "corrupt_meta", "drop_optim"])
def test_broken_newest_falls_back_to_previous(tmp_path, damage, caplog):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    model = newest / "model.safetensors"
    if damage == "truncate_model":
        model.write_bytes(model.read_bytes()[:-10])
    elif damage == "flip_byte":
        data = bytearray(model.read_bytes()); data[-1] ^= 0xFF; model.write_bytes(bytes(data))
    elif damage == "drop_meta":
        (newest / "meta.json").unlink()
    elif damage == "corrupt_meta":
        (newest / "meta.json").write_text("{not json")
    else:
        (newest / "optim_rank0.pt").unlink()
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 1
    assert "skipping broken checkpoint" in caplog.text and step_dir_name(2) in caplog.text


def test_inference_load_needs_only_weights(tmp_path):
    newest = _save(tmp_path, 5)
    (newest / "optim_rank0.pt").unlink()
    assert load_checkpoint(tmp_path, with_training_state=False).step == 5


def test_nothing_usable_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found in"):
        load_checkpoint(tmp_path / "missing")
    newest = _save(tmp_path, 1)
    (newest / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="half-written"):
        load_checkpoint(tmp_path)


def test_half_written_temp_folder_is_ignored_and_replaced(tmp_path):
    _save(tmp_path, 1)
    stale = tmp_path / ".step_000002.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"junk")
    assert list_steps(tmp_path) == [1]
    _save(tmp_path, 2)
    assert load_checkpoint(tmp_path).step == 2 and not stale.exists()


def test_saving_the_same_step_again_replaces_it(tmp_path):
    _save(tmp_path, 3)
    path = save_checkpoint(tmp_path, 3, model_state={"w": torch.zeros(1)}, optim_state=None, data_state=None, meta={})
    meta = json.loads((path / "meta.json").read_text())
    assert set(meta["files"]) == {"model.safetensors"}
    assert torch.equal(load_checkpoint(tmp_path, with_training_state=False).model_state["w"], torch.zeros(1))


def test_a_leftover_old_folder_from_a_crash_does_not_block_saving_the_step_again(tmp_path):
    # a crash between moving the old step aside and deleting it leaves .step_N.old behind
    _save(tmp_path, 3)
    stale = tmp_path / ".step_000003.old"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"from the crashed save")
    _save(tmp_path, 3)
    assert load_checkpoint(tmp_path).step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003"]


def test_a_meta_without_a_file_table_is_broken_and_each_problem_is_named(tmp_path, caplog):
    first, second = _save(tmp_path, 1), _save(tmp_path, 2)
    meta = json.loads((second / "meta.json").read_text())
    del meta["files"]
    (second / "meta.json").write_text(json.dumps(meta))
    assert load_checkpoint(tmp_path).step == 1
    problem = f"{second}: model.safetensors is not part of this checkpoint"
    assert f"skipping broken checkpoint: {problem}" in caplog.messages
    (first / "meta.json").unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert str(err.value) == f"no usable checkpoint in {tmp_path}: {problem}; {first}: no meta.json (half-written checkpoint)"


def test_saving_inside_a_process_group_gathers_the_file_table(tmp_path):
    # one gloo rank in this process: the distributed path (barriers, the gathered table of every rank's
    # files) runs for real; two ranks writing one checkpoint are tests/test_base_train.py's resume
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        path = _save(tmp_path / "run", 4)
    finally:
        dist.destroy_process_group()
    meta = json.loads((path / "meta.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "optim_rank0.pt", "data_rank0.json"}
    assert load_checkpoint(tmp_path / "run").data_state == {"position": {"shard": 4}, "buffer": [1, 2]}


def _as_two_ranks(rank: int, port: int, root: str) -> None:
    """One of two gloo ranks (spawned): who writes, what each copy holds, the step both resume, failing together."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    from nanochat.checkpoint import agree, agreed_step, find_writers, newest_usable_step

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        shared, own = Path(root) / "shared", Path(root) / f"own{rank}"
        assert find_writers(shared).of == (0, 0) and find_writers(own).of == (0, 1)

        path = _save(shared / "run", 3)  # one copy: rank 0 writes it, with both ranks' files
        assert set(json.loads((path / "meta.json").read_text())["files"]) == {
            "model.safetensors", "optim_rank0.pt", "optim_rank1.pt", "data_rank0.json", "data_rank1.json"}
        for step in (1, 2):  # a copy each: each holds its own rank's files
            path = _save(own / "run", step)
        assert {p.name for p in path.iterdir()} == {"model.safetensors", "meta.json", f"optim_rank{rank}.pt", f"data_rank{rank}.json"}
        assert load_checkpoint(own / "run", rank=rank).data_state == {"position": {"shard": 2}, "buffer": [1, 2]}

        if rank == 1:
            shutil.rmtree(own / "run" / step_dir_name(2))
        assert agreed_step(own / "run", rank) == 1  # rank 0 goes back with rank 1

        nothing_on_rank_1 = own / ("run" if rank == 0 else "nothing")
        with pytest.raises(CheckpointError) as both:  # on rank 0 too, which found its step
            agree(lambda: newest_usable_step(nothing_on_rank_1, rank=rank))
        assert str(both.value) == f"rank 1: no checkpoint found in {Path(root) / 'own1' / 'nothing'}"
        dist.barrier()  # every rank has removed its markers, each its own on its way out of find_writers
        assert not [p for p in shared.iterdir() if p.name.startswith(".writer-")]
    finally:
        dist.destroy_process_group()


def test_two_ranks_find_their_writer_keep_a_copy_each_and_agree_on_the_step(tmp_path):
    on_two_ranks(_as_two_ranks, str(tmp_path))
