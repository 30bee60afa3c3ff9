"""torch.compile without recompile storms: each compiled model meets a bounded set of shapes
(bucketed row widths, fixed row counts), compile_model allows exactly that many graphs, and one
more is a RecompileLimitError instead of dynamo's silent fall back to eager.

The stages' own compile call runs here with its backend swapped to a counter around "aot_eager"
(the graphs inductor would get, without generating kernels)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager

from nanochat import runtime
from nanochat.checkpoint import save_checkpoint
from nanochat.core_eval import CORE_ROWS
from nanochat.gpt import GPTConfig, build_model
from nanochat.runtime import GRAPH_KINDS, RecompileLimitError, bucket_length, bucket_widths, compile_model
from nanochat.tokenizer import Tokenizer
from tasks.sample_data import write_sample_task_files
from test_core_eval import write_bundle

SEQ_LEN = 256  # row widths 64, 128, 256


class GraphCounter:
    """A torch.compile backend: aot_eager, noting (gradients on, rows, width) of each graph it gets."""

    def __init__(self):
        self.graphs: list[tuple[bool, int, int]] = []

    def __call__(self, gm, example_inputs):
        tokens = next(t for t in example_inputs if isinstance(t, torch.Tensor) and t.dtype == torch.long and t.dim() == 2)
        self.graphs.append((torch.is_grad_enabled(), *tokens.shape))
        return aot_eager(gm, example_inputs)


@pytest.fixture
def counter(monkeypatch):
    counted = GraphCounter()
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", counted)
    return counted


def tiny_model(layers: int = 1):
    torch.manual_seed(0)
    return build_model(GPTConfig(sequence_len=SEQ_LEN, vocab_size=400, n_layer=layers, n_head=2, n_kv_head=2, n_embd=64), "cpu")


@pytest.mark.parametrize("limit", [36, 64, 100, 256, 2048])
def test_bucket_widths_are_every_width_bucket_length_gives(limit):
    assert bucket_widths(limit) == sorted({bucket_length(n, limit) for n in range(1, limit + 1)})
    assert len(bucket_widths(2048)) == 6  # the "6 widths" at the default context


def test_a_shape_past_the_allowed_graphs_is_an_error_not_silent_eager(counter):
    defaults = (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit)
    # another model's graph on the same code object, which dynamo's limit counts too
    torch.compile(tiny_model(layers=3), dynamic=False, backend="aot_eager")(torch.zeros(1, 8, dtype=torch.long))
    model = tiny_model()
    step = compile_model(model, 128)
    for width in bucket_widths(128) * 2:  # every width twice: compiled once each
        tokens = torch.randint(400, (2, width))
        step(tokens, tokens).backward()
    with torch.no_grad():
        for width in bucket_widths(128):
            step(torch.randint(400, (2, width)))
        assert len(counter.graphs) == GRAPH_KINDS * len(bucket_widths(128))
        with pytest.raises(RecompileLimitError, match="bucket_length"):
            step(torch.randint(400, (2, 100)))  # not a bucket width
    assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit) == defaults


@pytest.fixture
def workspace(base_dir, tmp_path, monkeypatch, one_torch_thread):
    """A base checkpoint (context SEQ_LEN), a tokenizer, the sample chat tasks and a toy CORE bundle."""
    for key, value in write_sample_task_files(tmp_path / "tasks", size=24).items():
        monkeypatch.setenv(key, value)
    texts = [line for f in (tmp_path / "tasks").glob("*.jsonl") for line in f.read_text().splitlines()]
    Tokenizer.train_from_iterator(texts * 3, vocab_size=400).save(base_dir / "tokenizer")
    model = tiny_model(layers=2)
    save_checkpoint(base_dir / "base_checkpoints" / "d2", 1, model_state=model.state_dict(), optim_state=None,
                    data_state=None, meta={"model_config": model.config.to_dict()})
    return write_bundle(tmp_path / "bundle")


@pytest.mark.slow  # 20-30 s on 2 shared cores: an SFT run and a CORE pass, each compiling its graphs; `pytest -m slow`
def test_sft_with_evaluation_and_a_core_pass_compile_a_bounded_set_of_graphs(workspace, counter, capsys):
    from scripts import base_eval, chat_sft

    widths = bucket_widths(SEQ_LEN)
    code = chat_sft.main(["--source", "base", "--num-iterations", "6", "--device-batch-size", "2", "--examples-per-step", "2",
                          "--eval-every", "2", "--eval-steps", "3", "--save-every", "0", "--no-eval", "--compile", "yes",
                          "--device", "cpu"])
    assert code == 0, capsys.readouterr().out[-3000:]
    sft, counter.graphs = counter.graphs, []
    assert len(sft) == len(set(sft)) <= GRAPH_KINDS * len(widths), sft  # no shape compiled twice, none past the budget
    assert {rows for _, rows, _ in sft} == {2} and {width for _, _, width in sft} <= set(widths)
    assert {grad for grad, _, _ in sft} == {True, False}, "training and evaluation each compile"
    assert len({width for grad, _, width in sft if grad}) > 1, "fixture: the SFT batches should need several widths"

    assert base_eval.main(["--bundle", str(workspace), "--compile", "yes", "--device", "cpu"]) == 0
    core = counter.graphs
    assert len(core) == len(set(core)) <= GRAPH_KINDS * len(widths), core
    assert {rows for _, rows, _ in core} == {1, CORE_ROWS} and not any(grad for grad, _, _ in core)
    assert "CORE" in capsys.readouterr().out
