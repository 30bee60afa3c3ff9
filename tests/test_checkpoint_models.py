"""Models by stage (nanochat.checkpoint): which folder a stage's checkpoints live in, which tag is
newest, what `--source auto` picks, what load_model returns and what it says when there is nothing
to load; and that an optimizer file cannot run code when loaded.

Every test uses the per-test $NANOCHAT_BASE_DIR (conftest) and a one-layer model, so the file runs
in seconds (tests/mutation.py runs it once per mutant)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from nanochat.checkpoint import (
    CheckpointError, load_checkpoint, load_model, newest_tag, resolve_source, save_checkpoint, stage_dir, step_dir_name,
)
from nanochat.gpt import GPTConfig, build_model
from two_ranks import on_two_ranks

CONFIG = GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)

# the original nanochat's folder names (the README's import section relies on them), spelled out here
# so that a change in nanochat.stages cannot move them unnoticed
FOLDERS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
SCRIPTS = {"base": "./pretrain.sh", "mid": "./midtrain.sh", "sft": "./sft.sh", "rl": "./rl.sh"}

# The first model built on the meta device imports torch's reference ops: seconds on a busy core. Done
# here, at import, the mutation run pays it once: its children fork from a process that imported this.
build_model(CONFIG, "cpu")


def save_model(stage: str, tag: str, step: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A real checkpoint of a freshly initialised model; returns its weights."""
    torch.manual_seed(seed)
    state = build_model(CONFIG, "cpu").state_dict()
    save_checkpoint(stage_dir(stage) / tag, step, model_state=state, optim_state=None, data_state=None,
                    meta={"model_config": CONFIG.to_dict(), "note": f"{stage} {tag}"})
    return state


def make_steps(tag_dir, *step_mtimes: tuple[int, float]) -> None:
    """Bare step folders with chosen modification times (newest_tag reads only names and times)."""
    for step, mtime in step_mtimes:
        path = tag_dir / step_dir_name(step)
        path.mkdir(parents=True)
        os.utime(path, (mtime, mtime))


# ---------------------------------------------------------------- stage_dir


@pytest.mark.parametrize("stage", FOLDERS)
def test_each_stage_has_its_folder_under_the_base_dir(stage, base_dir):
    assert stage_dir(stage) == base_dir / FOLDERS[stage]


def test_an_unknown_stage_is_refused_listing_the_known_ones():
    with pytest.raises(ValueError) as err:
        stage_dir("chat")
    assert str(err.value) == "unknown source 'chat'; expected one of base, mid, sft, rl or auto"


# ---------------------------------------------------------------- newest_tag


def test_no_folder_or_no_checkpoints_means_no_tag(tmp_path):
    assert newest_tag(tmp_path / "missing") is None
    (tmp_path / "empty_tag").mkdir()
    (tmp_path / "a_file").write_text("not a tag")
    (tmp_path / "half" / ".step_000001.tmp").mkdir(parents=True)  # an interrupted save is no checkpoint
    assert newest_tag(tmp_path) is None


def test_the_tag_whose_newest_step_was_written_last_wins(tmp_path):
    # d4's newest step (5) is older than d8's (2), although d4 holds the most recently touched folder
    make_steps(tmp_path / "d4", (1, 3000.0), (5, 1000.0))
    make_steps(tmp_path / "d8", (2, 2000.0))
    make_steps(tmp_path / "d6", (9, 1500.0))
    assert newest_tag(tmp_path) == "d8"
    make_steps(tmp_path / "d6", (10, 2500.0))
    assert newest_tag(tmp_path) == "d6"


def test_a_checkpoint_from_the_epoch_still_counts(tmp_path):
    # an mtime of 0 (a copy that kept no times) is still a checkpoint
    make_steps(tmp_path / "old", (1, 0.0))
    assert newest_tag(tmp_path) == "old"


# ---------------------------------------------------------------- resolve_source


def test_a_named_source_is_taken_as_it_is():
    assert [resolve_source(s) for s in FOLDERS] == list(FOLDERS)


@pytest.mark.parametrize("present, picked", [
    (["base"], "base"), (["base", "mid"], "mid"), (["mid", "sft"], "sft"), (["base", "sft", "rl"], "rl"), (["rl", "base"], "rl"),
])
def test_auto_picks_the_most_advanced_stage_that_has_a_checkpoint(present, picked):
    for stage in present:
        make_steps(stage_dir(stage) / "d4", (1, 1000.0))
    # a stage folder holding only a tag without steps does not count
    (stage_dir("rl") / "empty").mkdir(parents=True, exist_ok=True)
    assert resolve_source("auto") == picked
    assert resolve_source() == picked


def test_auto_without_any_checkpoint_says_where_it_looked_and_what_to_run(base_dir):
    with pytest.raises(CheckpointError) as err:
        resolve_source("auto")
    looked = ", ".join(str(base_dir / FOLDERS[s]) for s in ("rl", "sft", "mid", "base"))
    assert str(err.value) == f"no model found: looked for checkpoints in {looked}; train one with ./pretrain.sh"


# ---------------------------------------------------------------- load_model


def test_load_model_returns_the_saved_weights_in_eval_mode_with_where_they_came_from():
    saved = save_model("mid", "d4", 7)
    model, meta = load_model("mid")
    assert not model.training and model.compute_dtype == torch.float32
    assert model.config == CONFIG
    loaded = model.state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert (meta["source"], meta["model_tag"], meta["step"], meta["note"]) == ("mid", "d4", 7, "mid d4")
    assert meta["model_config"] == CONFIG.to_dict()


def test_load_model_auto_takes_the_newest_stage_tag_and_step():
    save_model("base", "d4", 3, seed=1)
    save_model("sft", "d4", 2, seed=2)
    newest = save_model("sft", "d4", 5, seed=3)
    model, meta = load_model()
    assert (meta["source"], meta["model_tag"], meta["step"]) == ("sft", "d4", 5)
    assert torch.equal(model.state_dict()["lm_head.weight"], newest["lm_head.weight"])


def test_load_model_takes_the_tag_and_step_asked_for():
    first = save_model("rl", "small", 1, seed=4)
    save_model("rl", "small", 2, seed=5)
    save_model("rl", "other", 9, seed=6)
    model, meta = load_model("rl", "small", 1)
    assert (meta["model_tag"], meta["step"]) == ("small", 1)
    assert torch.equal(model.state_dict()["lm_head.weight"], first["lm_head.weight"])


def test_the_step_reported_is_the_folder_loaded_even_when_meta_lacks_it():
    save_model("base", "d4", 4)
    meta_file = stage_dir("base") / "d4" / step_dir_name(4) / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["step"]
    meta_file.write_text(json.dumps(meta))
    assert load_model("base")[1]["step"] == 4


def test_load_model_in_a_dtype_computes_in_it():
    saved = save_model("sft", "d4", 1)
    model, _ = load_model("sft", dtype=torch.bfloat16)
    assert model.compute_dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(model.lm_head.weight.float(), saved["lm_head.weight"], atol=1e-2, rtol=1e-2)
    assert not model.training


def test_no_tag_in_the_stage_says_where_it_looked_and_which_script_makes_one(base_dir):
    folder = base_dir / FOLDERS["sft"]
    with pytest.raises(CheckpointError) as err:
        load_model("sft")
    assert str(err.value) == f"no sft checkpoint: looked for {folder}/<tag>/step_*; ./sft.sh makes one"


@pytest.mark.parametrize("stage", FOLDERS)
def test_a_missing_tag_names_it_and_the_script_that_makes_it(stage, base_dir):
    save_model(stage, "d4", 1)
    with pytest.raises(CheckpointError) as err:
        load_model(stage, "d20")
    assert str(err.value) == f"no {stage} checkpoint: looked for {base_dir / FOLDERS[stage]}/d20; {SCRIPTS[stage]} makes one"


def test_a_broken_checkpoint_says_what_is_wrong_and_which_script_makes_a_new_one():
    save_model("mid", "d4", 3)
    path = stage_dir("mid") / "d4" / step_dir_name(3)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError) as err:
        load_model("mid", "d4")
    message = str(err.value)
    assert message.startswith(f"no usable checkpoint in {path.parent}: {path}: no meta.json (half-written checkpoint)")
    assert message.endswith("; ./midtrain.sh makes a new one")


# ---------------------------------------------------------------- optimizer files run no code

RAN = []


class Payload:
    """What a hostile optimizer file could hold: unpickling it would call RAN.append."""

    def __reduce__(self):
        return RAN.append, ("payload ran",)


def test_an_optimizer_file_holding_code_is_refused_and_never_runs(tmp_path):
    RAN.clear()
    save_checkpoint(tmp_path, 1, model_state={"w": torch.zeros(2)}, optim_state=[{"state": Payload()}], data_state={"at": 0}, meta={})
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path)
    assert RAN == []


# ---------------------------------------------------------------- load_model under torchrun


def _load_on_two_ranks(rank: int, port: int, root: str) -> None:
    """One of two gloo ranks (spawned), each with a base dir of its own as on two machines: rank 1's copy
    has a newer step than rank 0's; both must load rank 0's choice, and fail together when rank 1 lacks it."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    os.environ["NANOCHAT_BASE_DIR"] = str(Path(root) / f"node{rank}")
    for step in (1, 2, 3)[: 2 + rank]:  # before the process group: each rank writes its own copy
        save_model("sft", "d1", step, seed=step)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, meta = load_model("auto")
        assert (meta["source"], meta["model_tag"], meta["step"]) == ("sft", "d1", 2)
        torch.manual_seed(2)
        expected = build_model(CONFIG, "cpu").state_dict()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())

        dist.barrier()
        if rank == 1:
            shutil.rmtree(stage_dir("sft") / "d1" / step_dir_name(2))
        dist.barrier()
        with pytest.raises(CheckpointError) as both:  # rank 0 has its step 2, and stops with rank 1
            load_model("sft")
        assert str(both.value).startswith("rank 1: ")
    finally:
        dist.destroy_process_group()


def test_every_rank_loads_rank_0s_choice_and_a_rank_without_it_stops_them_all(tmp_path):
    on_two_ranks(_load_on_two_ranks, str(tmp_path))
