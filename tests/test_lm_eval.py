"""lm-evaluation-harness against our server, for real: `local-completions` (token ids, text, and the
server's own tokenizer) scores and generates exactly what the harness's `hf` backend does on the
exported folder. The tasks are a YAML and a JSONL the test writes; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from served_model import ServerProcess, make_served_model
from sharing.hf_export import CHAT_TEMPLATE, export_hf

CONTEXT = 256
WORDS = ["hello", "world", "script", "alert", "bold", "code", "and", "the", "answer", "is"]
# every document our model saw starts with <|bos|>: the hf backend is told so; the server adds it itself
HF_ARGS = "dtype=float32,add_bos_token=True"
LOCAL_ARGS = {
    "token ids": "tokenizer_backend=huggingface,tokenizer={hf}",
    "text": "tokenizer_backend=huggingface,tokenizer={hf},tokenized_requests=False",
    "server's tokenizer": "tokenizer_backend=remote",
}


def write_tasks(folder: Path, docs: int, shots: int) -> list[str]:
    """A multiple-choice task (log-likelihoods) and a generate_until task over the same rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": " ".join(WORDS[(i * 3 + j * 7) % len(WORDS)] for j in range(3 + i % 5)),
             "choices": [" " + w for w in WORDS[i % 3 : i % 3 + 4]], "answer": i % 4} for i in range(docs)]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "rows.jsonl"}
    train: {folder / "rows.jsonl"}
test_split: test
fewshot_split: train
num_fewshot: {shots}
doc_to_text: "{{{{question}}}}"
"""
    (folder / "mc.yaml").write_text(f"""task: nanochat_mc
{common}output_type: multiple_choice
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (folder / "gen.yaml").write_text(f"""task: nanochat_gen
{common}output_type: generate_until
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")
    return ["nanochat_mc", "nanochat_gen"]


def evaluate(model: str, model_args: str, tasks_dir: Path, tasks: list[str]) -> dict:
    """Per task: its metric, and per document its answers' log-likelihoods or its generation."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=TaskManager(include_path=str(tasks_dir)),
                                  log_samples=True, batch_size=8, device="cpu")
    results = {}
    for task in tasks:
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        metric = next(v for k, v in out["results"][task].items() if k in ("acc,none", "exact_match,none"))
        if task == "nanochat_mc":
            results[task] = (float(metric), [[ll for ll, _ in s["filtered_resps"]] for s in samples])
        else:
            results[task] = (float(metric), [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in samples])
    return results


@pytest.fixture(scope="module")
def offline():
    """The harness reads only the files the test wrote: any reach for the Hub fails instead."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        import datasets
        import huggingface_hub.constants

        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def served(tmp_path_factory, offline):
    base = tmp_path_factory.mktemp("lm_eval")
    model, tokenizer = make_served_model(base, sequence_len=CONTEXT)
    hf = export_hf(model, tokenizer, base / "hf", chat_template=CHAT_TEMPLATE)
    server = ServerProcess(base, "--max-batch", "8")
    yield base, hf, server
    server.close()


def check_same(ours: dict, theirs: dict) -> None:
    (acc, lls), (their_acc, their_lls) = ours["nanochat_mc"], theirs["nanochat_mc"]
    assert len(lls) == len(their_lls) and all(len(a) == len(b) == 4 for a, b in zip(lls, their_lls))
    for doc, (a, b) in enumerate(zip(lls, their_lls)):
        assert a == pytest.approx(b, abs=1e-3), f"document {doc}"
    assert acc == their_acc
    assert ours["nanochat_gen"] == theirs["nanochat_gen"]


@pytest.fixture(scope="module")
def small(served):
    """Four documents, zero-shot: the tasks' folder, names, and the hf backend's results on them."""
    base, hf, _ = served
    tasks = write_tasks(base / "tasks-small", docs=4, shots=0)
    return base / "tasks-small", tasks, evaluate("hf", f"pretrained={hf},{HF_ARGS}", base / "tasks-small", tasks)


# text prompts (tokenized_requests=False) in the slow set: token ids and the server's tokenizer cover the default one
@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.slow) if b == "text" else b for b in LOCAL_ARGS])
def test_local_completions_equals_the_hf_backend_on_the_export(served, small, backend):
    _, hf, server = served
    tasks_dir, tasks, theirs = small
    args = LOCAL_ARGS[backend].format(hf=hf)
    ours = evaluate("local-completions", f"model=nanochat,base_url={server.url}/v1/completions,max_length={CONTEXT},{args}",
                    tasks_dir, tasks)
    check_same(ours, theirs)
    assert any(ours["nanochat_gen"][1])  # something was generated (and the same as hf's)


@pytest.mark.slow
def test_local_completions_equals_the_hf_backend_few_shot_and_batched(served):
    """More documents, two-shot prompts of different lengths batched 8 to a request, each backend."""
    base, hf, server = served
    tasks = write_tasks(base / "tasks-large", docs=48, shots=2)
    theirs = evaluate("hf", f"pretrained={hf},{HF_ARGS}", base / "tasks-large", tasks)
    for backend, args in LOCAL_ARGS.items():
        ours = evaluate("local-completions", f"model=nanochat,base_url={server.url}/v1/completions,max_length={CONTEXT},"
                        + args.format(hf=hf), base / "tasks-large", tasks)
        check_same(ours, theirs)
