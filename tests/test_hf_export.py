"""Export to HuggingFace transformers: model parity, weight round trip, tokenizer equivalence."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers

from nanochat.gpt import GPT, GPTConfig
from sharing.hf_export import (
    export_hf,
    hf_config,
    hf_tokenizer,
    parameter_name_map,
    to_hf_state_dict,
)
from nanochat.conversation import SPECIAL_TOKENS
from nanochat.tokenizer import Tokenizer

VOCAB = 512

SAMPLE_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 7 42 1234567 3.14159 -2e10 2024-01-31 1,000,000",
    "unicode: naïve café Ünïcödé 日本語のテキスト 😀👍🏽 Ελληνικά русский",
    "whitespace   runs\t\ttabs\n\n\nnewlines \r\n windows   \n  trailing   ",
    "don't WE'LL they've I'M it's   x=1;y+=2 {'a': [1, 2]}",
    "",
    " ",
]


def generated_corpus(seed: int = 0) -> list[str]:
    """Made-up words mixed with numbers, unicode and whitespace, enough for a 512-token vocabulary."""
    rng = random.Random(seed)
    extras = ["naïve", "café", "日本語", "😀", "don't", "WE'LL", "x=1;", "\t", "  ", "\n\n", "Ünï", "—"]

    def piece() -> str:
        roll = rng.random()
        if roll < 0.75:
            return "".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(1, 8)))
        if roll < 0.9:
            return str(rng.randint(0, 10**6))
        return rng.choice(extras)

    return [" ".join(piece() for _ in range(60)) for _ in range(400)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(generated_corpus(), VOCAB)


def random_model(n_head: int, n_kv_head: int, seed: int = 0) -> GPT:
    """init_weights, then noise on the zero-initialised projections so every block matters."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, n_embd=128)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o_proj.weight.normal_(0.0, 0.05)
            block.mlp.fc2.weight.normal_(0.0, 0.05)
        model.lm_head.weight.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("n_head, n_kv_head", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_transformers_logits_match(tokenizer, tmp_path, n_head, n_kv_head, attn_implementation):
    model = random_model(n_head, n_kv_head)
    export_hf(model, tokenizer, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation=attn_implementation
    )
    assert type(hf_model).__name__ == "NanoChatForCausalLM"
    idx = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
    assert ours.std() > 1.0  # the comparison is not between two near-constant tensors
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_transformers_reads_every_weight_as_written(tokenizer, tmp_path):
    model = random_model(4, 2)
    export_hf(model, tokenizer, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    expected = to_hf_state_dict(model.state_dict(), model.config.n_layer)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_export_from_state_dict_needs_the_config(tokenizer, tmp_path):
    model = random_model(4, 4)
    with pytest.raises(ValueError, match="GPTConfig"):
        export_hf(model.state_dict(), tokenizer, tmp_path)
    export_hf(model.state_dict(), tokenizer, tmp_path, config=model.config)
    assert json.loads((tmp_path / "config.json").read_text()) == hf_config(model.config, tokenizer)


def test_config_json_fields(tokenizer, tmp_path):
    model = random_model(4, 2)
    export_hf(model, tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    special = tokenizer.get_special_tokens()
    assert config["model_type"] == "nanochat" and config["architectures"] == ["NanoChatForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["head_dim"]) == (128, 512, 32)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (4, 2, 2)
    assert config["bos_token_id"] == config["pad_token_id"] == special["<|bos|>"]
    assert config["eos_token_id"] == special["<|assistant_end|>"]
    assert config["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    assert (config["hidden_act"], config["final_logit_softcapping"], config["rms_norm_eps"]) == ("relu2", 15.0, 1e-6)
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "float32"


def test_hf_parameter_names():
    names = parameter_name_map(n_layer=2)
    assert len(names) == 2 + 6 * 2 and len(set(names.values())) == len(names)
    assert names["wte.weight"] == "model.embed_tokens.weight"
    assert names["blocks.1.attn.o_proj.weight"] == "model.layers.1.self_attn.o_proj.weight"
    assert names["blocks.0.mlp.fc2.weight"] == "model.layers.0.mlp.fc2.weight"
    assert set(names) == set(GPT(GPTConfig(16, 64, 2, 2, 2, 32)).state_dict())


def test_mismatched_state_dict_is_refused():
    state_dict = GPT(GPTConfig(16, 64, 2, 2, 2, 32)).state_dict()
    with pytest.raises(ValueError, match="missing.*blocks.2"):
        to_hf_state_dict(state_dict, n_layer=3)
    state_dict["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected.*extra.weight"):
        to_hf_state_dict(state_dict, n_layer=2)


# ---------------------------------------------------------------- tokenizer


def test_hf_tokenizer_encodes_like_ours(tokenizer):
    hf = hf_tokenizer(tokenizer)
    texts = SAMPLE_TEXTS + generated_corpus(seed=1)[:50]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False).ids == tokenizer.encode(text), text


def test_auto_tokenizer_from_export(tokenizer, tmp_path):
    export_hf(random_model(4, 4), tokenizer, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLE_TEXTS:
        ids = tokenizer.encode(text)
        assert hf.encode(text) == ids, text
        assert hf.decode(ids) == text
    special = tokenizer.get_special_tokens()
    assert [hf.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS] == [special[name] for name in SPECIAL_TOKENS]
    assert hf.bos_token_id == special["<|bos|>"] and hf.eos_token_id == special["<|assistant_end|>"]
    assert len(hf) == tokenizer.get_vocab_size()
