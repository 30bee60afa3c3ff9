"""The original DGX Spark nanochat's flag spellings: underscores or hyphens, `--flag=value` or `--flag value`,
a launcher's `--`, pretrain.sh's short forms. Its README's "Customizing Training" line runs as written."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_shard
from nanochat.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
README_LINE = 'torchrun --standalone --nproc_per_node=1 -m scripts.base_train -- --depth=20 --run="nanochat-dgx" --device_batch_size=32 --sample_every=100'
ENTRY_POINTS = sorted(f"scripts.{p.stem}" for p in (ROOT / "scripts").glob("*.py") if p.stem != "__init__") + [
    "upload_to_hf", "view_identity_data", "web_chat"]


@pytest.mark.parametrize("depth", [pytest.param("", marks=pytest.mark.slow, id="depth-20"), pytest.param("--depth=2", id="depth-2")])
def test_the_original_readme_line_runs_as_written(depth, base_dir):
    """The line as its README prints it, then flags in the same spelling that make the model narrow (4 wide per
    layer) and the run one step. At depth 20 the memory measurement before step 1 alone takes 15 s on 2 cores,
    so the default run appends --depth=2 too (test_the_originals_spellings_parse_as_ours checks the 20)."""
    Tokenizer({bytes([i]): i for i in range(256)}).save(base_dir / "tokenizer")
    for shard in range(2):  # the last shard is the validation split
        write_shard(base_dir / "base_data" / f"shard_{shard:05d}.parquet", [f"document {d} of shard {shard}. " * 12 for d in range(60)])
    tiny = f"--aspect_ratio=4 --head_dim=8 --max_seq_len=16 --total_batch_size=512 --num_iterations=1 --eval_tokens=512 {depth}"
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run(["bash", "-c", f"{README_LINE} {tiny}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    said = out.stdout + out.stderr
    assert out.returncode == 0, said[-3000:]
    layers = 2 if depth else 20
    assert f"model: {layers} layers, width {4 * layers}" in said and "512 = 32 rows x 16 tokens" in said, said[-3000:]
    assert "step 000001/000001" in said and "sample |" in said
    if importlib.util.find_spec("wandb") is None:
        assert "run 'nanochat-dgx' logs to the console only" in said
    assert list((base_dir / "base_checkpoints" / f"d{layers}").glob("step_000001"))


def test_the_originals_spellings_parse_as_ours():
    from scripts import base_train

    theirs = base_train.parse_args(["--", "--depth=20", "--run=nanochat-dgx", "--device_batch_size=32", "--sample_every=100"])
    ours = base_train.parse_args(["--depth", "20", "--run", "nanochat-dgx", "--device-batch-size", "32", "--sample-every", "100"])
    assert vars(theirs) == vars(ours)
    assert (ours.depth, ours.run, ours.device_batch_size, ours.sample_every) == (20, "nanochat-dgx", 32, 100)
    assert base_train.parse_args(["--device_batch=8"]).device_batch_size == 8  # an abbreviation, as argparse allows


def test_values_are_never_rewritten():
    from scripts import base_train, chat_cli, import_nanochat

    args = base_train.parse_args(["--run=my_run_name", "--model_tag", "d_20", "--data_dir=/x/base_data"])
    assert (args.run, args.model_tag, args.data_dir) == ("my_run_name", "d_20", "/x/base_data")
    args = chat_cli.parse_args(["--prompt=--max_tokens", "--top_k=3"])
    assert (args.prompt, args.max_tokens, args.top_k) == ("--max_tokens", 512, 3)
    # after a separator everything is an argument, left as it is
    args = import_nanochat.parse_args(["--model_tag=x", "--", "--some_folder"])
    assert (args.model_tag, args.path) == ("x", "--some_folder")


def test_an_unknown_option_is_reported_as_typed(capsys):
    from scripts import base_train

    with pytest.raises(SystemExit) as stopped:
        base_train.parse_args(["--depth=4", "--bogus_flag=1"])
    assert stopped.value.code == 2 and "--bogus_flag=1" in capsys.readouterr().err


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_takes_both_spellings_and_shows_one(module, capsys):
    path = ROOT / (module.replace(".", "/") + ".py")
    source = path.read_text()
    if "parse_args" not in source:
        pytest.skip(f"{module} takes no flags")
    assert "FlagParser(" in source and "argparse.ArgumentParser(" not in source
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(module).parse_args(["--help"])
    shown = capsys.readouterr().out
    assert stopped.value.code == 0 and "--help" in shown
    assert not re.findall(r"--[a-z0-9]+_[a-z0-9_]*", shown)


def bash(*command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *command], cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)


def test_canonical_flags_renames_options_and_nothing_else():
    out = bash("-c", 'source scripts/flags.sh; canonical_flags --device_batch_size=32 --run=my_run -d 20 --data a_b= --x '
                     '-- --num_iterations=1; printf "%s\\n" "${FLAGS[@]}"')
    assert out.stdout.splitlines() == ["--device-batch-size", "32", "--run", "my_run", "-d", "20", "--data", "a_b=", "--x",
                                       "--", "--num_iterations=1"]


def test_stage_scripts_take_the_originals_spellings_and_short_forms(tmp_path):
    env = {"NANOCHAT_BASE_DIR": str(tmp_path)}
    pretrain = bash("pretrain.sh", "-d", "20", "-b", "16", "--run=nanochat-dgx", "--gpus=1", env=env)
    said = pretrain.stdout + pretrain.stderr
    # the flags are taken and passed on; base_train then stops for want of a tokenizer
    assert "pretraining: depth 20, device batch 16, 1 process(es)" in said and "no usable tokenizer" in said, said
    assert pretrain.returncode == 2 and "unknown option" not in said
    mid = bash("midtrain.sh", "--batch_size=2", "-d", "3", "--gpus=1", "--no_eval", "--eval_problems=2", env=env)
    assert mid.returncode == 2 and "unknown option" not in mid.stderr and "no usable tokenizer" in mid.stdout + mid.stderr
    prepare = bash("prepare.sh", "--no_wandb", "--offline", env=env)
    assert prepare.returncode == 1 and "--offline needs --from PATH" in prepare.stderr
    speedrun = bash("speedrun.sh", "-d", "4", "--force=bogus", env=env)
    assert speedrun.returncode == 2 and "--force takes one of" in speedrun.stderr
    chat = bash("chat_cli.sh", "--model_tag=d2", "--max_tokens=4", "--top_k", "5", "-p", "hi", env=env)
    assert chat.returncode == 2 and "unrecognized" not in chat.stderr and "no usable tokenizer" in chat.stderr, chat.stderr
    setup = bash("setup.sh", "--bogus_flag")
    assert setup.returncode == 2 and "unknown option" in setup.stderr
