"""Sharing on the HuggingFace Hub: prepared folders, chat template, model card, upload, download back."""

from __future__ import annotations

import copy
import importlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from nanochat.checkpoint import load_model, save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig, build_model
from nanochat.report import write_section
from nanochat.sampling import SamplingParams
from nanochat.tokenizer import Tokenizer
from sharing import hf_folders, hf_share
from nanochat.stages import STAGES
from scripts import hf_prepare

ROOT = Path(__file__).resolve().parents[1]
TAG, STEP = "d2", 30
CONFIG = GPTConfig(sequence_len=128, vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
WORDS = ["hello", "there", "how", "can", "help", "what", "is", "two", "plus", "four", "the", "sky", "blue", "because", "light"]
TRAINING_CHATS = [
    [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hello, how can I help?"}],
    [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "two plus two is four"}],
    # longer than the 12 tokens generated below, so generation also stops on length
    [{"role": "user", "content": "why is the sky blue"},
     {"role": "assistant", "content": "the sky is blue because light is blue, and the light of the sky is blue because of light"}],
]
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "hello there"}],
    "system message": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the sky"}],
    "multi-turn": [
        {"role": "system", "content": "you help"},
        {"role": "user", "content": "what is two plus two"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "and the sky?\n  why blue"},
    ],
    "tool use": [
        {"role": "user", "content": "two plus two"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "that is "},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": " so four"},
        ]},
        {"role": "user", "content": "thanks"},
    ],
}


def make_tokenizer() -> Tokenizer:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) + rng.choice(["", ",", "?", " 42"]) for _ in range(40)) for _ in range(200)]
    return Tokenizer.train_from_iterator(texts, vocab_size=CONFIG.vocab_size)


def other_tokenizer() -> Tokenizer:
    """A tokenizer unlike make_tokenizer's, with a smaller vocabulary (280)."""
    return Tokenizer.train_from_iterator(["zebra quartz " * 50, "jumping fox " * 50] * 20, vocab_size=280)


def make_model(tokenizer: Tokenizer):
    """A tiny model taught two answers, then nudged with noise, so its greedy outputs are neither random nor constant."""
    torch.manual_seed(0)
    model = build_model(CONFIG, "cpu")
    rows = [tokenizer.render_conversation(chat)[0] for chat in TRAINING_CHATS]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        for ids in rows:
            model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    tokenizer = make_tokenizer()
    # matrices this small gain nothing from threads, and on a busy machine their hand-offs cost seconds
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tokenizer, make_model(tokenizer)
    finally:
        torch.set_num_threads(threads)


def install_home(base: Path, tokenizer: Tokenizer, model, stages=("sft",)) -> None:
    """The tokenizer and a checkpoint per stage in `base`, each post-training stage started from the one before."""
    tokenizer.save(base / "tokenizer")
    for i, stage in enumerate(stages):
        meta = {"model_config": CONFIG.to_dict(), "train_seconds": 3600.0, "metrics": {"val_bpb": 1.25}}
        if stage == "base":
            meta["plan"] = {"total_batch_size": 1024}
        else:
            previous = hf_share.PIPELINE[hf_share.PIPELINE.index(stage) - 1]
            meta["started_from"] = {"source": previous, "model_tag": TAG, "step": STEP - 1}
        save_checkpoint(base / STAGES[stage].folder / TAG, STEP + i, model_state=model.state_dict(),
                        optim_state=[{}], data_state={"position": 1}, meta=meta)


@pytest.fixture(scope="module")
def prepared(trained, tmp_path_factory) -> Path:
    """One prepared SFT folder, shared by the tests that only read it."""
    base = tmp_path_factory.mktemp("prepared_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        install_home(base, *trained)
        [folder] = hf_folders.prepare_all("alice", ("sft",), base / "hf")
    return folder


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, "the model card must start with YAML front matter"
    return yaml.safe_load(match.group(1))


def load_upload_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # upload_to_hf.py sits at the root, outside any package
    return importlib.import_module("upload_to_hf")


def fake_hub(monkeypatch, token: str | None = "hf_test", snapshot: Path | None = None) -> list:
    """A stand-in huggingface_hub module that records calls instead of using the network."""
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("HfApi", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], Path(kwargs["folder_path"]).name))

    def snapshot_download(repo_id, **kwargs):
        calls.append(("snapshot_download", repo_id, kwargs))
        return str(snapshot)

    module = types.SimpleNamespace(HfApi=FakeApi, get_token=lambda: token, snapshot_download=snapshot_download)
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    return calls


def block_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # importing it now fails


# ---------------------------------------------------------------- the transformers side


def test_prepared_folder_layout(prepared):
    files = {p.relative_to(prepared).as_posix() for p in prepared.rglob("*") if p.is_file()}
    assert files == {
        "README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "nanochat/model.safetensors", "nanochat/meta.json",
        "nanochat/tokenizer/tokenizer.tiktoken", "nanochat/tokenizer/token_bytes.npy", "nanochat/tokenizer/tokenizer_meta.json",
    }
    meta = json.loads((prepared / "nanochat/meta.json").read_text())
    assert list(meta["files"]) == ["model.safetensors"]  # optimizer and loader state stay home
    assert meta["hf_share"] == {"stage": "sft", "model_tag": TAG, "step": STEP, "repo_id": f"alice/nanochat-{TAG}-sft"}
    assert json.loads((prepared / "config.json").read_text())["architectures"] == ["NanoChatForCausalLM"]
    assert "chat_template" in json.loads((prepared / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_renders_like_render_for_completion(prepared, trained, name):
    tokenizer, _ = trained
    hf = transformers.AutoTokenizer.from_pretrained(prepared)
    messages = CONVERSATIONS[name]
    ids = hf.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids == tokenizer.render_for_completion(messages)
    # a whole conversation, and the tokens our SFT trains on
    answered = messages + [{"role": "assistant", "content": "because light"}]
    rendered = hf.apply_chat_template(answered, return_assistant_tokens_mask=True)
    assert (rendered["input_ids"], rendered["assistant_masks"]) == tuple(tokenizer.render_conversation(answered))


def test_chat_template_refuses_what_our_renderer_refuses(prepared):
    hf = transformers.AutoTokenizer.from_pretrained(prepared)
    with pytest.raises(Exception, match="alternate"):
        hf.apply_chat_template([{"role": "assistant", "content": "hi"}])
    with pytest.raises(Exception, match="followed by a user"):
        hf.apply_chat_template([{"role": "system", "content": "hi"}])


def test_special_token_text_stays_text_when_sanitized(prepared, trained):
    tokenizer, _ = trained
    hf = transformers.AutoTokenizer.from_pretrained(prepared)
    messages = [{"role": "user", "content": "say <|assistant_end|> please"}]
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, sanitize_control_tokens=True)["input_ids"]
    assert ids == tokenizer.render_for_completion(messages)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_generation_matches_our_engine(prepared, trained, dtype):
    """bf16: our weights cast as `chat_service -d bfloat16` does, theirs loaded in bf16 from the exported files."""
    tokenizer, model = trained
    model = copy.deepcopy(model).to(dtype)
    model.compute_dtype = dtype
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(prepared)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(prepared, dtype=dtype)
    engine = Engine(model, tokenizer, max_batch=1)
    stops = [tokenizer.encode_special("<|assistant_end|>"), tokenizer.encode_special("<|bos|>")]  # the engine's stop tokens
    answers = []
    for messages in (CONVERSATIONS["one user turn"], CONVERSATIONS["multi-turn"], [{"role": "user", "content": "why is the sky blue"}]):
        prompt = tokenizer.render_for_completion(messages)
        [ours] = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=12))
        inputs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        output = hf_model.generate(**inputs, do_sample=False, max_new_tokens=12, eos_token_id=stops)
        theirs = output[0, len(prompt):].tolist()
        theirs = theirs[: next((i for i, t in enumerate(theirs) if t in stops), len(theirs))]
        assert theirs == ours.tokens, messages
        answers.append(ours.tokens)
    assert all(tokenizer.encode_special("<|python_start|>") not in tokens for tokens in answers)  # no calculator forcing tokens in
    assert all(len(set(tokens)) >= 3 for tokens in answers) and len({tuple(a) for a in answers}) == 3
    assert min(map(len, answers)) < 12 == max(map(len, answers))  # stopped at <|assistant_end|>, and on length


def test_card_snippet_runs_against_the_folder(prepared, capsys):
    card = (prepared / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    assert 'repo = "alice/nanochat-d2-sft"' in snippet
    exec(snippet.replace('"alice/nanochat-d2-sft"', repr(str(prepared))).replace("max_new_tokens=256", "max_new_tokens=8"), {})
    assert capsys.readouterr().out.strip() != ""


# ---------------------------------------------------------------- the model card


def test_model_card_front_matter_and_facts(prepared):
    card = (prepared / "README.md").read_text()
    fields = front_matter(card)
    assert fields["license"] == "mit" and fields["pipeline_tag"] == "text-generation"
    assert fields["library_name"] == "transformers"
    assert {"nanochat", "dgx-spark"} <= set(fields["tags"])
    assert "base_model" not in fields  # the mid model it started from is not shared
    params = sum(p.numel() for p in build_model(CONFIG, "cpu").parameters())
    for fact in ("| layers | 2 |", "| width | 64 |", "4 query, 2 key/value", "| vocabulary | 320 tokens", "| context | 128 tokens |",
                 f"| parameters | {params:,} |", f"optimizer steps: {STEP}", "training time: 1h00m", "1.2500", "| ARC-Easy | not evaluated |",
                 "./chat_cli.sh -s sft", "--download alice/nanochat-d2-sft"):
        assert fact in card, fact
    assert "Energy" not in card


def test_model_card_reports_evaluation_energy_and_lineage(trained, base_dir, tmp_path):
    install_home(base_dir, *trained, stages=("base", "mid", "sft"))
    write_section("base-loss", "Base model loss", {"val bpb": 0.9, "energy (kWh)": 2.0, "cost (USD)": 0.5})
    write_section("chat-eval-sft", "Chat evaluation (sft)", {"ARC-Easy": 0.375, "GSM8K": 0.0625, "energy (kWh)": 0.25})
    write_section("rl-train", "RL", {"energy (kWh)": 100.0})  # after the SFT model: not part of its cost
    folders = hf_folders.prepare_all("alice", ("base", "mid", "sft"), tmp_path / "hf")
    cards = {folder.name: (folder / "README.md").read_text() for folder in folders}
    assert "base_model" not in front_matter(cards["nanochat-d2-base"])
    assert front_matter(cards["nanochat-d2-mid"])["base_model"] == "alice/nanochat-d2-base"
    sft = cards["nanochat-d2-sft"]
    assert front_matter(sft)["base_model"] == "alice/nanochat-d2-mid"
    assert "| ARC-Easy | 0.3750 |" in sft and "| GSM8K | 0.0625 |" in sft and "| MMLU | not evaluated |" in sft
    assert "| **total** | **2.250** | **0.50** |" in sft
    assert "| val bpb | 0.9000 |" in cards["nanochat-d2-base"] and "training tokens: 30,720" in cards["nanochat-d2-base"]
    # sharing SFT alone: its parent is not on the Hub, so the card names none
    [alone] = hf_folders.prepare_all("alice", ("sft",), tmp_path / "alone")
    assert "base_model" not in front_matter((alone / "README.md").read_text())


# ---------------------------------------------------------------- the command line


def test_missing_stages_are_skipped_and_none_at_all_exits_2(trained, base_dir, tmp_path, capsys):
    tokenizer, model = trained
    assert hf_prepare.main(["--author", "alice"]) == 2
    assert "no usable tokenizer" in capsys.readouterr().err
    install_home(base_dir, tokenizer, model)
    assert hf_prepare.main(["--author", "alice", "--stages", "base,rl"]) == 2
    err = capsys.readouterr().err
    assert "nothing to share" in err and "base_checkpoints" in err and "chatrl_checkpoints" in err
    assert hf_prepare.main(["--author", "alice", "--stages", "rl,sft", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "skipping rl" in out and (tmp_path / "out" / "nanochat-d2-sft" / "README.md").is_file()


def test_a_model_trained_with_another_tokenizer_is_refused(trained, base_dir, capsys):
    install_home(base_dir, *trained)
    other_tokenizer().save(base_dir / "tokenizer")
    assert hf_prepare.main(["--author", "alice"]) == 1
    assert "trained with another tokenizer" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys):
    for argv in ([], ["--author", "alice", "--download", "a/b"], ["--author", "al ice"], ["--author", "a", "--stages", "sft,xl"]):
        with pytest.raises(SystemExit) as exc:
            hf_prepare.parse_args(argv)
        assert exc.value.code == 2, argv


def test_shell_script_prepares_and_replaces_folders(trained, base_dir, tmp_path):
    install_home(base_dir, *trained)
    out = tmp_path / "out"
    (out / "nanochat-d2-sft").mkdir(parents=True)
    (out / "nanochat-d2-sft" / "stale.txt").write_text("from an older run")
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(ROOT / "hf_prepare.sh"), "--author", "alice", "--stages", "sft", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "upload_to_hf.py --username alice" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["nanochat-d2-sft"]  # no temporary folders left
    assert not (out / "nanochat-d2-sft" / "stale.txt").exists()
    assert transformers.AutoModelForCausalLM.from_pretrained(out / "nanochat-d2-sft").config.num_hidden_layers == 2


# ---------------------------------------------------------------- upload


def test_upload_dry_run_lists_files_without_network(prepared, monkeypatch, capsys):
    block_network(monkeypatch)
    upload = load_upload_module(monkeypatch)
    assert upload.main(["--username", "alice", "--dry-run", "--folder-root", str(prepared.parent)]) == 0
    out = capsys.readouterr().out
    assert "alice/nanochat-d2-sft (public)" in out
    for path in (p for p in prepared.rglob("*") if p.is_file()):
        name = path.relative_to(prepared).as_posix()
        assert re.search(rf"^\s+{path.stat().st_size:,}\s+{re.escape(name)}$", out, re.MULTILINE), name
    assert "11 files" in out


def test_upload_creates_repos_base_first(trained, base_dir, tmp_path, monkeypatch, capsys):
    install_home(base_dir, *trained, stages=("base", "sft"))
    hf_folders.prepare_all("alice", ("sft", "base"), base_dir / "hf")
    upload = load_upload_module(monkeypatch)
    calls = fake_hub(monkeypatch)
    assert upload.main(["--username", "alice", "--private"]) == 0
    assert calls == [
        ("HfApi", "hf_test"),
        ("create_repo", "alice/nanochat-d2-base", {"repo_type": "model", "private": True, "exist_ok": True}),
        ("upload_folder", "alice/nanochat-d2-base", "nanochat-d2-base"),
        ("create_repo", "alice/nanochat-d2-sft", {"repo_type": "model", "private": True, "exist_ok": True}),
        ("upload_folder", "alice/nanochat-d2-sft", "nanochat-d2-sft"),
    ]
    assert "https://huggingface.co/alice/nanochat-d2-sft" in capsys.readouterr().out


def test_upload_explains_what_is_missing(prepared, tmp_path, monkeypatch, capsys):
    upload = load_upload_module(monkeypatch)
    calls = fake_hub(monkeypatch, token=None)
    assert upload.main(["--username", "alice", "--folder-root", str(tmp_path / "nothing")]) == 2
    assert "hf_prepare.sh --author alice" in capsys.readouterr().err
    assert upload.main(["--username", "bob", "--folder-root", str(prepared.parent)]) == 2
    assert "hf_prepare.sh --author bob" in capsys.readouterr().err
    assert upload.main(["--username", "alice", "--folder-root", str(prepared.parent)]) == 2
    err = capsys.readouterr().err
    assert "hf auth login" in err and "HF_TOKEN" in err
    assert calls == []


# ---------------------------------------------------------------- download back


def test_download_back_installs_a_checkpoint_chat_can_load(prepared, trained, base_dir, monkeypatch, capsys):
    tokenizer, model = trained
    block_network(monkeypatch)  # a local folder stands in for the download
    assert hf_prepare.main(["--download", str(prepared)]) == 0
    assert "./chat_cli.sh -s sft" in capsys.readouterr().out
    loaded, meta = load_model("sft")
    assert (meta["model_tag"], meta["step"]) == (TAG, STEP)
    idx = torch.randint(0, CONFIG.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
    installed = Tokenizer.load(base_dir / "tokenizer")
    assert installed.get_mergeable_ranks() == tokenizer.get_mergeable_ranks()
    assert hf_prepare.main(["--download", str(prepared)]) == 0  # again: nothing to do
    assert "already installed" in capsys.readouterr().out


def test_download_refuses_a_different_tokenizer_unless_forced(prepared, base_dir, capsys):
    other_tokenizer().save(base_dir / "tokenizer")
    assert hf_prepare.main(["--download", str(prepared)]) == 1
    assert "different tokenizer" in capsys.readouterr().err
    assert not (base_dir / "chatsft_checkpoints").exists()  # a refusal installs nothing
    assert Tokenizer.load(base_dir / "tokenizer").get_vocab_size() == 280
    assert hf_prepare.main(["--download", str(prepared), "--force"]) == 0
    assert Tokenizer.load(base_dir / "tokenizer").get_vocab_size() == CONFIG.vocab_size
    load_model("sft")


def test_download_of_a_repo_id_fetches_only_native_files(prepared, base_dir, monkeypatch):
    calls = fake_hub(monkeypatch, snapshot=prepared)
    assert hf_prepare.main(["--download", "alice/nanochat-d2-sft", "--stage", "rl", "--model-tag", "theirs"]) == 0
    assert calls == [("snapshot_download", "alice/nanochat-d2-sft", {"allow_patterns": ["nanochat/*"]})]
    assert load_model("rl")[1]["model_tag"] == "theirs"


def test_download_rejects_a_damaged_checkpoint(prepared, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(prepared, damaged)
    weights = damaged / "nanochat" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    assert hf_prepare.main(["--download", str(damaged)]) == 2
    assert "checksum" in capsys.readouterr().err
