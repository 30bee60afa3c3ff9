"""Export a model and its tokenizer as a HuggingFace transformers folder.

The folder loads with `AutoModelForCausalLM.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)` (transformers' NanoChat architecture):

    config.json               NanoChatConfig
    model.safetensors         weights under HF parameter names
    tokenizer.json            byte-level BPE equivalent to our tiktoken encoding
    tokenizer_config.json     special tokens and, for chat models, CHAT_TEMPLATE
    special_tokens_map.json

Our parameter and config names map onto HF's through the two tables below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nanochat.conversation import BOS, END_OF_ANSWER, chat_template
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# (our name, HF name) for every parameter; {i} is the layer index.
PARAMETER_NAMES = (
    ("wte.weight", "model.embed_tokens.weight"),
    ("blocks.{i}.attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blocks.{i}.attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blocks.{i}.attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blocks.{i}.attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blocks.{i}.mlp.fc1.weight", "model.layers.{i}.mlp.fc1.weight"),
    ("blocks.{i}.mlp.fc2.weight", "model.layers.{i}.mlp.fc2.weight"),
    ("lm_head.weight", "lm_head.weight"),
)

# (GPTConfig field, NanoChatConfig key) for the sizes both sides store.
CONFIG_FIELDS = (
    ("sequence_len", "max_position_embeddings"),
    ("vocab_size", "vocab_size"),
    ("n_layer", "num_hidden_layers"),
    ("n_head", "num_attention_heads"),
    ("n_kv_head", "num_key_value_heads"),
    ("n_embd", "hidden_size"),
    ("norm_eps", "rms_norm_eps"),
    ("logit_softcap", "final_logit_softcapping"),
)

# The chat template for transformers, from nanochat.conversation's definitions.
CHAT_TEMPLATE = chat_template()


# ---------------------------------------------------------------- export


def export_hf(
    model_or_state_dict: GPT | Mapping[str, torch.Tensor],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    config: GPTConfig | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write config, weights and tokenizer files to out_dir; returns it.

    Pass a GPT, or a state dict of one together with its config. Weights keep
    their dtype. chat_template (Jinja) goes to tokenizer_config.json.
    """
    if isinstance(model_or_state_dict, GPT):
        config = config or model_or_state_dict.config
        state_dict = model_or_state_dict.state_dict()
    elif config is None:
        raise ValueError("exporting a state dict needs its GPTConfig (config=...)")
    else:
        state_dict = model_or_state_dict
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in to_hf_state_dict(state_dict, config.n_layer).items()}
    save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    dtype = str(tensors["lm_head.weight"].dtype).removeprefix("torch.")
    _write_json(out_dir / CONFIG_FILE, hf_config(config, tokenizer, dtype))
    export_tokenizer(tokenizer, out_dir, model_max_length=config.sequence_len, chat_template=chat_template)
    return out_dir


# ---------------------------------------------------------------- names and config


def parameter_name_map(n_layer: int) -> dict[str, str]:
    """Our parameter name -> HF parameter name, for a model with n_layer blocks."""
    names = {}
    for ours, theirs in PARAMETER_NAMES:
        layers = range(n_layer) if "{i}" in ours else [None]
        names.update({ours.format(i=i): theirs.format(i=i) for i in layers})
    return names


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    return _rename(state_dict, parameter_name_map(n_layer))


def _rename(state_dict: Mapping[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    missing, unexpected = set(names) - set(state_dict), set(state_dict) - set(names)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    return {names[name]: tensor for name, tensor in state_dict.items()}


def hf_config(config: GPTConfig, tokenizer: Tokenizer, dtype: str = "float32") -> dict:
    """config.json contents for transformers' NanoChatConfig."""
    bos_id = tokenizer.encode_special(BOS)
    return {
        "model_type": "nanochat",
        "architectures": ["NanoChatForCausalLM"],
        **architecture_fields(config),
        "bos_token_id": bos_id,
        "eos_token_id": tokenizer.encode_special(END_OF_ANSWER),
        "pad_token_id": bos_id,  # padded positions are masked out, so reusing bos costs nothing
        "torch_dtype": dtype,
    }


def architecture_fields(config: GPTConfig) -> dict:
    """The NanoChatConfig keys that describe the network (sizes, and what our architecture fixes)."""
    return {**{theirs: getattr(config, ours) for ours, theirs in CONFIG_FIELDS}, **_implied_fields(config)}


def _implied_fields(config: GPTConfig) -> dict:
    """config.json keys that our architecture fixes or derives from the sizes."""
    return {
        "head_dim": config.head_dim,
        "intermediate_size": 4 * config.n_embd,
        "hidden_act": "relu2",
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "attention_bias": False,
        "tie_word_embeddings": False,
    }


# ---------------------------------------------------------------- tokenizer


def export_tokenizer(
    tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int, chat_template: str | None = None
) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for AutoTokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer(tokenizer).save(str(out_dir / "tokenizer.json"))
    special_names = list(tokenizer.get_special_tokens())
    special_map = {
        "bos_token": BOS,
        "eos_token": END_OF_ANSWER,
        "pad_token": BOS,
        "additional_special_tokens": [name for name in special_names if name not in (BOS, END_OF_ANSWER)],
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        **special_map,
    }
    # The template that renders conversations in our <|user_start|>... format (chat models).
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json", special_map)


def hf_tokenizer(tokenizer: Tokenizer) -> HFTokenizer:
    """A `tokenizers` byte-level BPE that encodes ordinary text to the same ids as ours.

    Tokens are spelled in GPT-2's byte-to-unicode alphabet, the same split
    regex cuts text into pieces, and ignore_merges makes a piece that is a
    whole token map to it directly, as tiktoken does.
    """
    ranks = tokenizer.get_mergeable_ranks()
    alphabet = byte_to_unicode()
    vocab = {_spell(token, alphabet): rank for token, rank in ranks.items()}
    merges = [
        tuple(_spell(part, alphabet) for part in _last_merge(token, ranks))
        for token in sorted(ranks, key=ranks.get)
        if len(token) > 1
    ]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tokenizer.get_pattern()), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in tokenizer.get_special_tokens()])
    return hf


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for
    themselves, the rest take code points from 256 up, so no token string holds
    whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(stand_ins)) for b in range(256)}


def _spell(token: bytes, alphabet: dict[int, str]) -> str:
    return "".join(alphabet[b] for b in token)


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair BPE joins to form `token`: merge its bytes in rank order, stopping short of its own rank."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        candidates = [(ranks.get(a + b, len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(candidates)
        if rank >= ranks[token]:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not the merge of two lower-ranked tokens")
    return parts[0], parts[1]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
