"""CORE: the bundle on disk, prompt rendering, per-example scoring against a direct
computation with a tiny real model, centering and aggregation, and scripts.base_eval."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanochat import eval_bundle
from nanochat.checkpoint import save_checkpoint
from nanochat.core_eval import (
    centered_accuracy,
    continuation_rows,
    core_metric,
    crop_left,
    evaluate_core,
    evaluate_task,
    example_correct,
    option_losses,
    rank_indices,
    render_prompts,
    sample_fewshot,
    shuffled,
)
from nanochat.eval_bundle import BundleError, TaskSpec, fetch_eval_bundle, load_task_specs, resolve_bundle_dir
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import Tokenizer
from scripts import base_eval

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 36  # short enough that some few-shot prompts get cropped

COLORS = ["blue", "green", "loud", "seven", "round", "happy"]
MC_DATA = [
    {"query": f"Question: which word is number {i} in the list?", "choices": [COLORS[(i + j) % 6] for j in range(4)], "gold": i % 4}
    for i in range(8)
]
NAMES = [("trophy", "suitcase"), ("cat", "mouse"), ("river", "bridge"), ("teacher", "student"), ("apple", "basket"), ("storm", "house")]
SCHEMA_DATA = [
    {"context_options": [f"The {a} did not fit in the {b} because the {a}", f"The {a} did not fit in the {b} because the {b}"],
     "continuation": "was too big.", "gold": i % 2}
    for i, (a, b) in enumerate(NAMES)
]
LM_DATA = [
    {"context": f"The capital of country {c} is  ", "continuation": city}
    for c, city in zip("ABCDEF", ["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Bern"])
]
TASKS = [  # label, type, uri, shots, delimiter, baseline percent, data
    ("toy_mc", "multiple_choice", "world/toy_mc.jsonl", 2, "\nAnswer: ", 25.0, MC_DATA),
    ("toy_schema", "schema", "reasoning/toy_schema.jsonl", 1, " ", 50.0, SCHEMA_DATA),
    ("toy_lm", "language_modeling", "world/toy_lm.jsonl", 1, " ", 0.0, LM_DATA),
]
SPECS = {label: TaskSpec(label, kind, uri, shots, delim, base) for label, kind, uri, shots, delim, base, _ in TASKS}
DATA = {label: data for label, *_, data in TASKS}


def write_bundle(root: Path) -> Path:
    """A three-task bundle in the real layout (core.yaml, eval_meta_data.csv, eval_data/)."""
    lines = ["icl_tasks:"]
    for label, kind, uri, shots, delim, _, data in TASKS:
        lines += [f"- label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}", f"  continuation_delimiter: {json.dumps(delim)}"]
        path = root / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in data), encoding="utf-8")
    (root / "core.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    csv_rows = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description"]
    csv_rows += [f'{label},toy,{kind},{shots},{len(data)},{base},,"a toy, with a comma"' for label, kind, _, shots, _, base, data in TASKS]
    (root / "eval_meta_data.csv").write_text("\n".join(csv_rows) + "\n", encoding="utf-8")
    return root


def corpus() -> list[str]:
    """The tasks' own text, so the tokenizer merges whole words (with their leading space) as a real one does."""
    texts = [item["query"] + "\nAnswer: " + choice for item in MC_DATA for choice in item["choices"]]
    texts += [context + " " + item["continuation"] for item in SCHEMA_DATA for context in item["context_options"]]
    texts += [item["context"].strip() + " " + item["continuation"] for item in LM_DATA]
    return texts * 10


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(corpus(), vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    """Random weights, perturbed so the blocks are not identities and losses differ between options."""
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    net = build_model(config, "cpu")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net.eval()


# ---------------------------------------------------------------- direct computations (the oracle)


def shot_prefix(label: str, idx: int) -> str:
    spec, data = SPECS[label], DATA[label]
    shots = [data[j] for j in sample_fewshot(len(data), idx, spec.num_fewshot)]
    if spec.task_type == "multiple_choice":
        return "".join(s["query"] + spec.continuation_delimiter + s["choices"][s["gold"]] + "\n\n" for s in shots)
    if spec.task_type == "schema":
        return "".join(s["context_options"][s["gold"]] + spec.continuation_delimiter + s["continuation"] + "\n\n" for s in shots)
    return "".join(s["context"].strip() + spec.continuation_delimiter + s["continuation"] + "\n\n" for s in shots)


def direct_logprobs(model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """The last SEQ_LEN tokens and the log-probabilities the model gives each next token."""
    ids = ids[-SEQ_LEN:]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    return ids, F.log_softmax(logits.float(), dim=-1)


def direct_mean_loss(model, full: list[int], n_scored: int) -> float:
    ids, logp = direct_logprobs(model, full)
    positions = range(len(ids) - n_scored, len(ids))
    return -sum(logp[p - 1, ids[p]].item() for p in positions) / n_scored


def direct_mc_losses(model, tok, idx: int) -> list[float]:
    item, bos = MC_DATA[idx], tok.get_bos_token_id()
    context = shot_prefix("toy_mc", idx) + item["query"] + "\nAnswer:"
    losses, firsts = [], set()
    for choice in item["choices"]:
        ctx, full = tok.encode(context, prepend=bos), tok.encode(context + " " + choice, prepend=bos)
        assert full[: len(ctx)] == ctx
        firsts.add(full[len(ctx)])
        losses.append(direct_mean_loss(model, full, len(full) - len(ctx)))
    assert len(firsts) == len(item["choices"]), "fixture: choices must differ from their first token"
    return losses


def direct_schema_losses(model, tok, idx: int) -> list[float]:
    item, bos = SCHEMA_DATA[idx], tok.get_bos_token_id()
    tail = tok.encode(" " + item["continuation"])
    losses = []
    for context in item["context_options"]:
        full = tok.encode(shot_prefix("toy_schema", idx) + context + " " + item["continuation"], prepend=bos)
        assert full[-len(tail):] == tail
        losses.append(direct_mean_loss(model, full, len(tail)))
    return losses


def direct_lm_correct(model, tok, idx: int) -> bool:
    item, bos = LM_DATA[idx], tok.get_bos_token_id()
    context = shot_prefix("toy_lm", idx) + item["context"].strip()
    ctx, full = tok.encode(context, prepend=bos), tok.encode(context + " " + item["continuation"], prepend=bos)
    assert full[: len(ctx)] == ctx
    ids, logp = direct_logprobs(model, full)
    n = len(full) - len(ctx)
    return all(logp[p - 1].argmax().item() == ids[p] for p in range(len(ids) - n, len(ids)))


# ---------------------------------------------------------------- few-shot and prompts


def test_fewshot_is_seeded_excludes_the_example_and_matches_sampling_from_the_others():
    for n, k in [(8, 2), (50, 10), (1000, 5)]:
        for idx in [0, 1, n // 2, n - 1]:
            picked = sample_fewshot(n, idx, k)
            assert picked == sample_fewshot(n, idx, k)
            assert idx not in picked and len(set(picked)) == k and all(0 <= j < n for j in picked)
            # what drawing from the list without idx gives (nanochat's seeds), so full runs compare
            assert picked == random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
    assert len({tuple(sample_fewshot(50, idx, 3)) for idx in range(10)}) > 1
    assert sorted(sample_fewshot(4, 2, 10)) == [0, 1, 3]
    assert sample_fewshot(1, 0, 3) == [] and sample_fewshot(10, 3, 0) == []


def test_prompts_follow_the_gauntlet_layout():
    shot = {"query": "Q1", "choices": ["a", "b"], "gold": 1}
    assert render_prompts("multiple_choice", {"query": "Q2", "choices": ["x", "y"], "gold": 0}, [shot], ": ") == ["Q1: b\n\nQ2: x", "Q1: b\n\nQ2: y"]
    shot = {"context_options": ["c0", "c1"], "continuation": "k", "gold": 0}
    assert render_prompts("schema", {"context_options": ["d0", "d1"], "continuation": "m", "gold": 1}, [shot], " ") == ["c0 k\n\nd0 m", "c0 k\n\nd1 m"]
    shot = {"context": " ctx1 \n", "continuation": "one"}
    without, full = render_prompts("language_modeling", {"context": "ctx2  ", "continuation": "two"}, [shot], "\nAnswer: ")
    assert full == "ctx1\nAnswer: one\n\nctx2\nAnswer: two"
    assert without == "ctx1\nAnswer: one\n\nctx2\nAnswer:"


@pytest.mark.parametrize("label", list(SPECS))
def test_scored_tokens_cover_exactly_the_text_after_the_shared_part(tokenizer, label):
    spec, data = SPECS[label], DATA[label]
    for idx in range(len(data)):
        shots = [data[j] for j in sample_fewshot(len(data), idx, spec.num_fewshot)]
        prompts = render_prompts(spec.task_type, data[idx], shots, spec.continuation_delimiter)
        tokens, starts, ends = continuation_rows(tokenizer, spec.task_type, prompts)
        scored = [tokenizer.decode(row[s:e]) for row, s, e in zip(tokens, starts, ends)]
        if spec.task_type == "multiple_choice":
            assert len(set(starts)) == 1 and [s.strip() for s in scored] == data[idx]["choices"]
        elif spec.task_type == "schema":
            assert set(scored) == {" " + data[idx]["continuation"]}
        else:
            assert scored == [" " + data[idx]["continuation"]] and tokens[0][0] == tokenizer.get_bos_token_id()


def test_a_boundary_merge_moves_the_start_back_instead_of_splitting_a_token(tokenizer):
    without, full = render_prompts("language_modeling", {"context": "Answer: blu", "continuation": "e"}, [], "")
    assert tokenizer.encode(full)[: len(tokenizer.encode(without))] != tokenizer.encode(without), "fixture: 'blu|e' must merge"
    (row,), (start,), (end,) = continuation_rows(tokenizer, "language_modeling", [without, full])
    scored = tokenizer.decode(row[start:end])
    assert len(scored) > 1 and scored.endswith("e")
    assert tokenizer.decode(row[1:start]) + scored == full


def test_crop_drops_oldest_tokens_and_keeps_the_continuation():
    row = list(range(10))
    assert crop_left(([row], [7], [10]), 6) == ([row[4:]], [3], [6])
    assert crop_left(([row], [7], [10]), 10) == ([row], [7], [10])
    # a continuation longer than the context window: its tail is scored, position 0 only conditions
    assert crop_left(([row], [2], [10]), 4) == ([row[6:]], [1], [4])


# ---------------------------------------------------------------- per-example predictions


def test_multiple_choice_losses_and_choice_match_a_direct_computation(model, tokenizer):
    spec, chosen = SPECS["toy_mc"], set()
    assert max(len(p) for p in tokenizer.encode(render_prompts("multiple_choice", MC_DATA[0], MC_DATA[1:3], spec.continuation_delimiter))) > SEQ_LEN
    for idx in range(len(MC_DATA)):
        expected = direct_mc_losses(model, tokenizer, idx)
        got = option_losses(model, tokenizer, MC_DATA, idx, spec)
        assert got == pytest.approx(expected, abs=1e-4)
        assert len(set(round(x, 3) for x in got)) > 1
        best = expected.index(min(expected))
        chosen.add(best)
        assert example_correct(model, tokenizer, MC_DATA, idx, spec) == (best == MC_DATA[idx]["gold"])
    assert len(chosen) > 1, "the perturbed model should not always pick the same position"


def test_schema_losses_and_choice_match_a_direct_computation(model, tokenizer):
    spec = SPECS["toy_schema"]
    for idx in range(len(SCHEMA_DATA)):
        expected = direct_schema_losses(model, tokenizer, idx)
        got = option_losses(model, tokenizer, SCHEMA_DATA, idx, spec)
        assert got == pytest.approx(expected, abs=1e-4)
        best = expected.index(min(expected))
        assert example_correct(model, tokenizer, SCHEMA_DATA, idx, spec) == (best == SCHEMA_DATA[idx]["gold"])


def test_language_modeling_correctness_matches_a_direct_computation(model, tokenizer):
    spec = SPECS["toy_lm"]
    for idx in range(len(LM_DATA)):
        assert example_correct(model, tokenizer, LM_DATA, idx, spec) == direct_lm_correct(model, tokenizer, idx)


def successor_model(vocab_size: int):
    """A real GPT whose greedy next token after each letter is the following letter.

    Blocks start as identities (zero output projections), so logits depend on the
    last token only; lm_head row succ(a) is set to token a's normalised embedding.
    """
    torch.manual_seed(0)
    net = build_model(GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64), "cpu")
    with torch.no_grad():
        unit = F.rms_norm(net.wte.weight, (64,), eps=1e-6)
        rows = unit.clone()
        for a in range(ord("a"), ord("z")):
            rows[a + 1] = unit[a]
        net.lm_head.weight.copy_(rows)
    return net.eval()


def test_language_modeling_needs_every_continuation_token_greedy():
    byte_tok = Tokenizer.train_from_iterator(["abc"], vocab_size=265)  # bytes only: no merges
    net = successor_model(byte_tok.get_vocab_size())
    spec = TaskSpec("succ", "language_modeling", "succ.jsonl", 1, "", 0.0)
    data = [{"context": "count: abc", "continuation": "def"}, {"context": "count: abc", "continuation": "dex"},
            {"context": "count: abc", "continuation": "xef"}, {"context": "count: pq ", "continuation": "rstu"}]
    assert [example_correct(net, byte_tok, data, i, spec) for i in range(4)] == [True, False, False, True]


# ---------------------------------------------------------------- tasks, centering, CORE


def test_centering_and_core_by_hand():
    assert centered_accuracy(0.25, 25.0) == pytest.approx(0.0)
    assert centered_accuracy(1.0, 50.0) == pytest.approx(1.0)
    assert centered_accuracy(0.4, 25.0) == pytest.approx(0.2)
    assert centered_accuracy(0.3, 50.0) == pytest.approx(-0.4)
    assert centered_accuracy(0.7, 0.0) == pytest.approx(0.7)
    assert core_metric({"a": 0.2, "b": -0.4, "c": 0.7}) == pytest.approx(0.5 / 3)


def test_task_accuracy_is_over_a_fixed_shuffled_subset(model, tokenizer):
    spec, data = SPECS["toy_mc"], MC_DATA
    order = shuffled(data)
    assert order == shuffled(data) and order != data and sorted(map(json.dumps, order)) == sorted(map(json.dumps, data))
    expected = sum(example_correct(model, tokenizer, order, i, spec) for i in range(3)) / 3
    assert evaluate_task(model, tokenizer, data, spec, max_examples=3) == pytest.approx(expected)
    assert evaluate_task(model, tokenizer, data, spec, max_examples=100) == evaluate_task(model, tokenizer, data, spec)


def test_ranks_split_examples_without_overlap():
    parts = [list(rank_indices(11, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11)) and parts[1] == [1, 4, 7, 10]


def test_core_over_the_bundle_equals_the_hand_computation(model, tokenizer, tmp_path):
    bundle = write_bundle(tmp_path / "bundle")
    lines = []
    result = evaluate_core(model, tokenizer, bundle, log=lines.append)
    assert list(result.accuracy) == [t[0] for t in TASKS] and len(lines) == 3
    for label, spec in SPECS.items():
        order = shuffled(DATA[label])
        acc = sum(example_correct(model, tokenizer, order, i, spec) for i in range(len(order))) / len(order)
        assert result.accuracy[label] == pytest.approx(acc)
        assert result.centered[label] == pytest.approx((acc - spec.random_baseline / 100) / (1 - spec.random_baseline / 100))
    assert result.core == pytest.approx(sum(result.centered.values()) / 3)


# ---------------------------------------------------------------- the bundle on disk


def test_bundle_specs_are_read_from_yaml_and_csv(tmp_path):
    specs = load_task_specs(write_bundle(tmp_path / "bundle"))
    assert specs == list(SPECS.values())


def test_bundle_missing_task_baseline_is_an_error(tmp_path):
    bundle = write_bundle(tmp_path / "bundle")
    csv = bundle / "eval_meta_data.csv"
    csv.write_text("\n".join(line for line in csv.read_text().splitlines() if not line.startswith("toy_lm")))
    with pytest.raises(BundleError, match="toy_lm"):
        load_task_specs(bundle)


def test_missing_bundle_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    with pytest.raises(BundleError, match="python -m nanochat.eval_bundle"):
        resolve_bundle_dir()
    partial = write_bundle(tmp_path / "partial")
    (partial / "eval_meta_data.csv").unlink()
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE", str(partial))
    with pytest.raises(BundleError, match="eval_meta_data.csv"):
        resolve_bundle_dir()
    assert resolve_bundle_dir(write_bundle(tmp_path / "full")) == tmp_path / "full"


def zip_bundle(tmp_path: Path) -> Path:
    source = write_bundle(tmp_path / "src" / "eval_bundle")
    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            zf.write(path, path.relative_to(source.parent))
    return archive


def leftovers(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir() if p.name.startswith(".eval_bundle") or p.name.startswith("eval_bundle.zip"))


def test_fetch_unpacks_into_place_and_then_skips(tmp_path, base_dir):
    archive = zip_bundle(tmp_path)
    path = fetch_eval_bundle(archive.as_uri(), retries=1, backoff=0)
    assert path == base_dir / "eval_bundle"
    assert load_task_specs(path) == list(SPECS.values()) and leftovers(base_dir) == []
    archive.unlink()
    assert fetch_eval_bundle(archive.as_uri(), retries=1, backoff=0) == path  # present: nothing fetched


def test_corrupt_zip_leaves_no_bundle(tmp_path, base_dir):
    archive = zip_bundle(tmp_path)
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(BundleError, match="could not download"):
        fetch_eval_bundle(archive.as_uri(), retries=2, backoff=0)
    assert not (base_dir / "eval_bundle").exists() and leftovers(base_dir) == []


def test_interrupted_unpacking_leaves_no_bundle(tmp_path, base_dir, monkeypatch):
    def half_then_fail(self, path):
        (Path(path) / "eval_bundle").mkdir()
        (Path(path) / "eval_bundle" / "core.yaml").write_text("icl_tasks: []")
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        fetch_eval_bundle(zip_bundle(tmp_path).as_uri(), retries=1, backoff=0)
    assert not (base_dir / "eval_bundle").exists() and not any(p.name.startswith(".eval_bundle.") for p in base_dir.iterdir())


def test_fetch_command(tmp_path, base_dir, capsys):
    assert eval_bundle.main(["--url", zip_bundle(tmp_path).as_uri(), "--retries", "1"]) == 0
    assert "3 tasks" in capsys.readouterr().out
    assert eval_bundle.main(["--url", (tmp_path / "nope.zip").as_uri(), "--retries", "1"]) == 0  # already there


def test_fetch_command_reports_a_missing_source(tmp_path, capsys):
    assert eval_bundle.main(["--url", (tmp_path / "nope.zip").as_uri(), "--retries", "1"]) == 2
    assert "--url file://" in capsys.readouterr().err


# ---------------------------------------------------------------- scripts.base_eval


def make_base_checkpoint(base: Path, tokenizer: Tokenizer, model) -> None:
    tokenizer.save(base / "tokenizer")
    save_checkpoint(base / "base_checkpoints" / "tiny", 7, model_state=model.state_dict(), optim_state=None,
                    data_state=None, meta={"model_config": model.config.to_dict()})


def test_base_eval_end_to_end_writes_the_report(tmp_path, base_dir, tokenizer, model, capsys):
    make_base_checkpoint(base_dir, tokenizer, model)
    bundle = write_bundle(tmp_path / "bundle")
    assert base_eval.main(["--bundle", str(bundle), "--max-per-task", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    expected = evaluate_core(model, tokenizer, bundle, max_per_task=4, log=lambda line: None)
    section = (base_dir / "report" / "base-eval.md").read_text()
    assert "tiny step 7" in section and f"CORE: {expected.core:.6g}" in section
    for label in SPECS:
        assert f"| {label} | {expected.accuracy[label]:.4f} | {expected.centered[label]:.4f} |" in section
        assert label in out
    assert f"**{expected.core:.4f}**" in out


def test_base_eval_exits_2_with_a_clear_error(tmp_path, base_dir, tokenizer, model, capsys, monkeypatch):
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    bundle = str(write_bundle(tmp_path / "bundle"))
    assert base_eval.main(["--bundle", bundle, "--device", "cpu"]) == 2
    assert "tokenizer" in capsys.readouterr().out.lower()
    tokenizer.save(base_dir / "tokenizer")
    assert base_eval.main(["--bundle", bundle, "--device", "cpu"]) == 2
    assert "./pretrain.sh" in capsys.readouterr().out
    make_base_checkpoint(base_dir, tokenizer, model)
    assert base_eval.main(["--device", "cpu"]) == 2
    assert "python -m nanochat.eval_bundle" in capsys.readouterr().out
    assert not (base_dir / "report" / "base-eval.md").exists()


@pytest.mark.slow  # 11-15 s on 2 cores: the default run must stay under ~10 min
def test_base_eval_under_torchrun_matches_one_process(tmp_path, base_dir, tokenizer, model):
    make_base_checkpoint(base_dir, tokenizer, model)
    bundle = write_bundle(tmp_path / "bundle")
    expected = evaluate_core(model, tokenizer, bundle, log=lambda line: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOCHAT_BASE_DIR": str(base_dir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scripts.base_eval", "--bundle", str(bundle), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"**{expected.core:.4f}**" in proc.stdout
    assert f"CORE: {expected.core:.6g}" in (base_dir / "report" / "base-eval.md").read_text()
