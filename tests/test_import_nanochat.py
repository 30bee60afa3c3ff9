"""scripts.import_nanochat on checkpoints in the original nanochat's layout, written here from that layout
(October 2025: <stage>_checkpoints/<tag>/model_NNNNNN.pt + meta_NNNNNN.json, tokenizer/tokenizer.pkl as a
pickled tiktoken Encoding + token_bytes.pt): logits equal a forward pass written here on the original
parameter names; chat, chat_eval, hf_prepare and sft.sh work on the import; malicious pickles, later
nanochat versions and inconsistent shapes are refused before anything is written."""

from __future__ import annotations

import hashlib
import io
import http.server
import json
import math
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tiktoken
import torch

from sharing.original import ORIGINAL_NORM_EPS, TokenizerUnpickler, read_tokenizer
from tasks.sample_data import write_sample_task_files

ROOT = Path(__file__).resolve().parents[1]
# The original's split pattern and special tokens, as its tokenizer.py spelled them.
PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
MERGES = [b"th", b"he", b"the", b"an"]
VOCAB = 256 + len(MERGES) + len(SPECIALS)
CONFIG = {"sequence_len": 128, "vocab_size": VOCAB, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32}
FOLDERS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}


# ---------------------------------------------------------------- the original's files, written from its layout


def original_encoding() -> tiktoken.Encoding:
    ranks = {bytes([i]): i for i in range(256)} | {m: 256 + i for i, m in enumerate(MERGES)}
    return tiktoken.Encoding(name="rustbpe", pat_str=PATTERN, mergeable_ranks=ranks,
                             special_tokens={s: len(ranks) + i for i, s in enumerate(SPECIALS)})


def write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    enc = original_encoding()
    (folder / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    lengths = [len(enc.decode_single_token_bytes(i)) for i in range(256 + len(MERGES))] + [0] * len(SPECIALS)
    torch.save(torch.tensor(lengths, dtype=torch.int32), folder / "token_bytes.pt")


def original_state(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the original's names; the embedding in bf16, as the original keeps it."""
    g = torch.Generator().manual_seed(seed)
    d, kv = config["n_embd"], config["n_kv_head"] * config["n_embd"] // config["n_head"]

    def w(rows, cols):
        return torch.randn(rows, cols, generator=g) * cols**-0.5

    state = {"transformer.wte.weight": torch.randn(config["vocab_size"], d, generator=g).bfloat16()}
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        state |= {p + "attn.c_q.weight": w(d, d), p + "attn.c_k.weight": w(kv, d), p + "attn.c_v.weight": w(kv, d),
                  p + "attn.c_proj.weight": w(d, d), p + "mlp.c_fc.weight": w(4 * d, d), p + "mlp.c_proj.weight": w(d, 4 * d)}
    state["lm_head.weight"] = w(config["vocab_size"], d) * 8
    return state


def write_checkpoint(folder: Path, step: int, state: dict, config: dict, *, compiled: bool = False, optimizer: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({("_orig_mod." if compiled else "") + k: v for k, v in state.items()}, folder / f"model_{step:06d}.pt")
    meta = {"step": step, "val_bpb": 1.5, "model_config": config, "user_config": {"run": "nanochat-dgx", "device_batch_size": 32}}
    (folder / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))
    if optimizer:
        torch.save([{"state": {}, "param_groups": []}], folder / f"optim_{step:06d}.pt")


def write_run(base: Path, stages=("mid", "sft"), step: int = 10, config: dict = CONFIG) -> dict[str, dict]:
    """An original base dir: the tokenizer and one d2 checkpoint per stage; returns each stage's weights."""
    write_tokenizer(base / "tokenizer")
    states = {}
    for n, stage in enumerate(stages):
        states[stage] = original_state(config, seed=n)
        write_checkpoint(base / FOLDERS[stage] / "d2", step, states[stage], config, compiled=n % 2 == 1, optimizer=True)
    return states


def reference_logits(state: dict, config: dict, idx: torch.Tensor) -> torch.Tensor:
    """The original architecture's forward pass on its own parameter names, fp32."""
    eps = torch.finfo(torch.float32).eps  # F.rms_norm's default in fp32

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def w(name):
        return state[name].float()

    B, T = idx.shape
    H, KV = config["n_head"], config["n_kv_head"]
    D = config["n_embd"] // H
    angles = torch.outer(torch.arange(T).float(), 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

    def rotate(x):  # the first half of each head against the second
        a, b = x[..., : D // 2], x[..., D // 2 :]
        return torch.cat([a * cos + b * sin, -a * sin + b * cos], dim=-1)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = rms(w("transformer.wte.weight")[idx])
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        h = rms(x)
        q = rms(rotate((h @ w(p + "attn.c_q.weight").T).view(B, T, H, D)))
        k = rms(rotate((h @ w(p + "attn.c_k.weight").T).view(B, T, KV, D))).repeat_interleave(H // KV, dim=2)
        v = (h @ w(p + "attn.c_v.weight").T).view(B, T, KV, D).repeat_interleave(H // KV, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        y = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), v)
        x = x + y.reshape(B, T, H * D) @ w(p + "attn.c_proj.weight").T
        x = x + torch.relu(rms(x) @ w(p + "mlp.c_fc.weight").T).square() @ w(p + "mlp.c_proj.weight").T
    logits = rms(x) @ w("lm_head.weight").T
    return 15 * torch.tanh(logits / 15)


@pytest.fixture
def importer(capsys, one_torch_thread):
    """import_nanochat.main(args) in this process: (exit code, stdout, stderr)."""
    from scripts import import_nanochat

    def run(*args) -> tuple[int, str, str]:
        capsys.readouterr()
        code = import_nanochat.main([str(a) for a in args])
        printed = capsys.readouterr()
        return code, printed.out, printed.err

    return run


def written(base_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(base_dir)) for p in base_dir.rglob("*")) if base_dir.exists() else []


# ---------------------------------------------------------------- the tokenizer pickle


class RecordingUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        self.names = getattr(self, "names", set()) | {(module, name)}
        return super().find_class(module, name)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_pickled_tiktoken_encoding_needs_only_what_the_unpickler_admits(protocol, tmp_path):
    enc = original_encoding()
    blob = pickle.dumps(enc, protocol=protocol)
    recorder = RecordingUnpickler(io.BytesIO(blob))
    recorder.load()
    assert recorder.names <= set(TokenizerUnpickler.ALLOWED), recorder.names
    (tmp_path / "tokenizer.pkl").write_bytes(blob)
    tokenizer = read_tokenizer(tmp_path)
    text = "the other hand: 12345 <|bos|> é"
    assert tokenizer.encode(text) == enc.encode_ordinary(text) and tokenizer.get_vocab_size() == VOCAB


class Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_tokenizer_pickle_is_refused_and_runs_nothing(tmp_path, base_dir, importer):
    run = tmp_path / "run"
    write_run(run, stages=("mid",))
    marker = tmp_path / "pwned"
    (run / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps({"encoding": Payload(marker)}))
    code, _, err = importer(run)
    assert code == 2 and "system" in err and "refused" in err and "tokenizer.pkl" in err, err
    assert not marker.exists()
    assert not (base_dir / "tokenizer").exists() and not (base_dir / "mid_checkpoints").exists()


def test_a_malicious_model_file_is_refused_by_weights_only_loading(tmp_path, base_dir, importer):
    run = tmp_path / "run"
    write_run(run, stages=("mid",))
    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": Payload(marker)}, run / "mid_checkpoints" / "d2" / "model_000010.pt")
    code, _, err = importer(run)
    assert code == 2 and "weights_only" in err, err
    assert not marker.exists() and written(base_dir) == []


# ---------------------------------------------------------------- converting


def test_imported_logits_equal_the_original_architecture(tmp_path, base_dir, importer):
    from nanochat.checkpoint import load_model

    states = write_run(tmp_path / "run", stages=("mid", "sft"))  # sft's keys carry torch.compile's prefix
    code, out, err = importer(tmp_path / "run")
    assert code == 0, err
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    for stage in ("mid", "sft"):
        model, meta = load_model(stage)
        assert model.config.norm_eps == ORIGINAL_NORM_EPS and model.config.n_kv_head == 2
        with torch.no_grad():
            ours = model(idx)
        expected = reference_logits(states[stage], CONFIG, idx)
        assert expected.std() > 1  # logits that tell a wrong conversion from a right one
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_a_run_imports_every_stage_with_its_tag_step_and_tokenizer(tmp_path, base_dir, importer):
    from nanochat.tokenizer import Tokenizer

    run = tmp_path / "run"
    write_run(run, stages=("base", "mid", "sft"), step=765)
    code, out, _ = importer(run)
    assert code == 0
    for folder in ("base_checkpoints", "mid_checkpoints", "chatsft_checkpoints"):
        meta = json.loads((base_dir / folder / "d2" / "step_000765" / "meta.json").read_text())
        assert meta["step"] == 765 and meta["imported_from"]["meta"]["user_config"]["run"] == "nanochat-dgx"
        assert not list((base_dir / folder / "d2" / "step_000765").glob("optim*"))
    assert out.count("optimizer state is not imported") == 3
    assert "chat with it: ./chat_cli.sh -s sft" in out
    assert Tokenizer.load(base_dir / "tokenizer").encode("the hand") == original_encoding().encode_ordinary("the hand")
    again = importer(run)
    assert again[0] == 0 and again[1].count("already imported") == 3 and "tokenizer" not in again[1].split("\n")[0]


def test_a_run_imports_in_place_when_both_use_the_same_base_dir(base_dir, importer):
    """The original and this project both default to ~/.cache/nanochat: ours go beside its files, which stay."""
    from nanochat.checkpoint import load_model

    states = write_run(base_dir, stages=("mid",))
    originals = written(base_dir)
    code, out, err = importer(base_dir)
    assert code == 0 and "tokenizer (269 tokens)" in out, err
    assert set(originals) <= set(written(base_dir))
    model, meta = load_model("mid")
    assert meta["step"] == 10 and torch.equal(model.lm_head.weight, states["mid"]["lm_head.weight"])
    assert importer(base_dir)[0] == 0


def test_the_step_and_a_single_checkpoint_folder_can_be_chosen(tmp_path, base_dir, importer):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    states = write_run(run, stages=("mid",), step=5)
    write_checkpoint(run / "mid_checkpoints" / "d2", 9, original_state(CONFIG, seed=7), CONFIG)
    assert importer(run / "mid_checkpoints" / "d2", "--step", "5", "--model-tag", "old")[0] == 0
    assert [p.name for p in (base_dir / "mid_checkpoints" / "old").iterdir()] == ["step_000005"]
    weights = load_file(str(base_dir / "mid_checkpoints" / "old" / "step_000005" / "model.safetensors"))
    assert torch.equal(weights["lm_head.weight"], states["mid"]["lm_head.weight"])
    code, _, err = importer(run / "mid_checkpoints" / "d2", "--step", "6")
    assert code == 2 and "no step 6" in err and "5, 9" in err


def test_a_published_model_says_its_stage_by_config_phase_or_name(tmp_path, base_dir, importer):
    published = tmp_path / "nanochat-1.8B-midtrain"
    write_tokenizer(published / "tokenizer")
    write_checkpoint(published, 3000, original_state(CONFIG, seed=3), CONFIG)
    code, out, _ = importer(published)
    assert code == 0 and (base_dir / "mid_checkpoints" / "d2" / "step_003000").is_dir(), out
    unnamed = tmp_path / "download"
    write_tokenizer(unnamed / "tokenizer")
    write_checkpoint(unnamed, 7, original_state(CONFIG, seed=4), CONFIG)
    code, _, err = importer(unnamed)
    assert code == 2 and "--stage" in err
    (unnamed / "config.json").write_text(json.dumps({"model_type": "nanochat", "phase": "sft", "checkpoint_step": 7}))
    assert importer(unnamed)[0] == 0 and (base_dir / "chatsft_checkpoints" / "d2" / "step_000007").is_dir()


# ---------------------------------------------------------------- refusing


def test_a_later_nanochat_is_refused_naming_what_it_has(tmp_path, base_dir, importer):
    run = tmp_path / "run"
    write_run(run, stages=("sft",))
    folder = run / "chatsft_checkpoints" / "d2"
    meta = json.loads((folder / "meta_000010.json").read_text())
    meta["model_config"]["window_pattern"] = "SSSL"
    (folder / "meta_000010.json").write_text(json.dumps(meta))
    code, _, err = importer(run)
    assert code == 2 and "window_pattern" in err and "sliding-window attention" in err
    state = original_state(CONFIG, seed=0) | {"transformer.value_embeds.0.weight": torch.zeros(VOCAB, 16)}
    write_checkpoint(folder, 10, state, CONFIG)
    code, _, err = importer(run)
    assert code == 2 and "value_embeds" in err and "value embeddings" in err
    assert written(base_dir) == []


def test_shapes_that_disagree_with_the_config_leave_nothing_written(tmp_path, base_dir, importer):
    run = tmp_path / "run"
    states = write_run(run, stages=("mid", "sft"))
    wrong = states["sft"] | {"transformer.h.1.attn.c_k.weight": torch.zeros(32, 32)}  # 4 kv heads, config says 2
    write_checkpoint(run / "chatsft_checkpoints" / "d2", 10, wrong, CONFIG)
    code, _, err = importer(run)
    assert code == 2 and "blocks.1.attn.k_proj.weight" in err and "(16, 32)" in err, err
    assert written(base_dir) == []  # not even the valid mid checkpoint or the tokenizer
    write_checkpoint(run / "chatsft_checkpoints" / "d2", 10, {k: v for k, v in states["sft"].items() if "h.1.mlp" not in k}, CONFIG)
    code, _, err = importer(run)
    assert code == 2 and "lacks 2 parameter(s)" in err


def test_a_different_tokenizer_or_checkpoint_at_home_is_kept_unless_forced(tmp_path, base_dir, importer):
    from nanochat.tokenizer import Tokenizer

    Tokenizer({bytes([i]): i for i in range(256)}).save(base_dir / "tokenizer")
    run = tmp_path / "run"
    write_run(run, stages=("mid",))
    code, _, err = importer(run)
    assert code == 1 and "different tokenizer" in err and not (base_dir / "mid_checkpoints").exists()
    assert importer(run, "--force")[0] == 0
    write_checkpoint(run / "mid_checkpoints" / "d2", 10, original_state(CONFIG, seed=9), CONFIG)
    code, _, err = importer(run)
    assert code == 1 and "different step 10" in err
    write_checkpoint(run / "mid_checkpoints" / "d2", 11, original_state(CONFIG, seed=9), CONFIG)
    code, _, err = importer(run)
    assert code == 1 and "--model-tag" in err


class LocalHub(http.server.ThreadingHTTPServer):
    """The few Hub routes huggingface_hub's snapshot_download uses, serving one folder as repo `repo_id`:
    the revision's sha, the file tree, and each file (HEAD for its metadata, GET for its bytes)."""

    SHA = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, folder: Path, repo_id: str):
        self.folder, self.repo_id = folder, repo_id
        self.files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        self.fetched: list[str] = []
        super().__init__(("127.0.0.1", 0), LocalHubHandler)


class LocalHubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def do_GET(self) -> None:
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        hub, path = self.server, self.path.split("?")[0]
        api, resolve = f"/api/models/{hub.repo_id}/", f"/{hub.repo_id}/resolve/{hub.SHA}/"
        if path == api + "revision/main":
            blob = json.dumps({"id": hub.repo_id, "sha": hub.SHA, "siblings": [{"rfilename": f} for f in hub.files]}).encode()
            self.send(blob, "application/json", body)
        elif path.startswith(api + f"tree/{hub.SHA}"):
            tree = [{"type": "file", "path": f, "size": (hub.folder / f).stat().st_size,
                     "oid": hashlib.sha1((hub.folder / f).read_bytes()).hexdigest()} for f in hub.files]
            self.send(json.dumps(tree).encode(), "application/json", body)
        elif path.startswith(resolve) and path[len(resolve):] in hub.files:
            name = path[len(resolve):]
            hub.fetched += [name] if body else []
            self.send((hub.folder / name).read_bytes(), "application/octet-stream", body,
                      {"X-Repo-Commit": hub.SHA, "ETag": f'"{hashlib.sha256((hub.folder / name).read_bytes()).hexdigest()}"'})
        else:
            self.send_error(404)

    def send(self, blob: bytes, kind: str, body: bool, headers: dict | None = None) -> None:
        self.send_response(200)
        for key, value in {"Content-Type": kind, "Content-Length": str(len(blob)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(blob)


def test_a_published_model_is_downloaded_from_the_hub(tmp_path, base_dir):
    """A Hub repo id goes through huggingface_hub, here to a local server in the Hub's place (HF_ENDPOINT)."""
    repo = tmp_path / "repo"
    write_tokenizer(repo / "tokenizer")
    write_checkpoint(repo, 21400, original_state(CONFIG, seed=5), CONFIG, optimizer=True)
    (repo / "config.json").write_text(json.dumps({"model_type": "nanochat", "phase": "sft"}))
    (repo / "README.md").write_text("model card")
    hub = LocalHub(repo, "jasonacox/nanochat-tiny-sft")
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "1"}
    try:
        out = subprocess.run([sys.executable, "-m", "scripts.import_nanochat", "jasonacox/nanochat-tiny-sft"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    finally:
        hub.shutdown()
    assert out.returncode == 0, out.stdout + out.stderr
    assert (base_dir / "chatsft_checkpoints" / "d2" / "step_021400" / "model.safetensors").is_file()
    assert sorted(hub.fetched) == ["config.json", "meta_021400.json", "model_021400.pt", "tokenizer/token_bytes.pt", "tokenizer/tokenizer.pkl"]


def test_neither_folder_nor_repo_id_exits_2(tmp_path, importer):
    code, _, err = importer(tmp_path / "nothing" / "here")
    assert code == 2 and "neither a folder nor a Hub repo id" in err
    code, _, err = importer(tmp_path)
    assert code == 2 and "model_NNNNNN.pt" in err


# ---------------------------------------------------------------- using the import


@pytest.fixture
def imported(tmp_path, base_dir, importer, monkeypatch):
    """import(*stages): an original run of those stages imported into the base dir, with the sample task
    files; returns the environment that selects them."""
    env = write_sample_task_files(tmp_path / "tasks", size=24)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def do(*stages: str) -> dict:
        write_run(tmp_path / "run", stages=stages)
        assert importer(tmp_path / "run")[0] == 0
        return {**os.environ, **env, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}

    return do


def test_chat_cli_and_chat_eval_run_on_the_import(imported, capsys):
    from scripts import chat_cli, chat_eval

    imported("mid", "sft")
    capsys.readouterr()
    assert chat_cli.main(["-p", "Who are you?", "-t", "0", "-m", "6"]) == 0
    assert capsys.readouterr().out.strip()
    assert chat_eval.main(["-i", "sft", "-a", "ARC-Easy", "GSM8K", "--max-problems", "2", "--max-new-tokens", "8"]) == 0
    assert "ChatCORE" in capsys.readouterr().out


def test_hf_prepare_exports_the_import_with_its_norm_epsilon(imported, base_dir, tmp_path, capsys):
    from scripts import hf_prepare

    imported("sft")
    assert hf_prepare.main(["--author", "alice", "--stages", "sft", "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "nanochat-d2-sft" / "config.json").read_text())
    assert config["rms_norm_eps"] == ORIGINAL_NORM_EPS and config["num_key_value_heads"] == 2


@pytest.mark.slow  # 11-15 s on 2 cores: the default run must stay under ~10 min
def test_sft_sh_trains_on_from_an_imported_mid_model_with_the_originals_flags(imported, base_dir):
    env = imported("mid")
    out = subprocess.run(["bash", "sft.sh", "--gpus", "1", "-b", "2", "-d", "2", "--run=imported", "--no_eval", "--",
                          "--num_iterations=1", "--examples_per_step=4", "--max_seq_len=128", "--eval_steps=1", "--max_examples=16"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    said = out.stdout + out.stderr
    assert out.returncode == 0, said[-3000:]
    assert "from mid d2 step 10" in said and "(2 accumulation step(s))" in said and "run 'imported'" in said
    assert (base_dir / "chatsft_checkpoints" / "d2" / "step_000001" / "model.safetensors").is_file()
