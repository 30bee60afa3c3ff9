"""Checkpoints and tokenizers of the original nanochat, as the DGX Spark setup made them: found, read safely, converted.

The layout (karpathy/nanochat, October 2025, which the original DGX Spark nanochat ran):

    <base dir>/{base,mid,chatsft,chatrl}_checkpoints/<tag>/model_000123.pt   torch.save of the state dict
                                                          meta_000123.json  {"model_config": {...}, ...}
                                                          optim_000123*.pt  optimizer state (optional)
    <base dir>/tokenizer/tokenizer.pkl     pickle of a tiktoken Encoding
                         token_bytes.pt    byte length of each token id

A model published from it on the Hub holds model_*.pt, meta_*.json and tokenizer/
at its top level, plus a config.json whose "phase" names the stage.

The architecture is the one nanochat/gpt.py implements (rotary embeddings with theta
10000 rotating the first half of each head against the second, QK-norm, parameter-free
RMSNorm after the embedding and before attention, MLP and head, ReLU^2 MLP, untied
head, logits soft-capped at 15, grouped-query attention with n_kv_head), so weights
only change their names. Two differences, both in precision: the original's RMSNorm
takes torch's default epsilon, which for fp32 is float32's machine epsilon, so an
imported model keeps that (GPTConfig.norm_eps); and it rounds its rotary tables to
bf16 where ours stay fp32, which moves logits by about that rounding.

Nothing here runs code from the files: tensors load with torch.load(weights_only=True),
and tokenizer.pkl goes through an unpickler that admits only what a tiktoken Encoding's
pickle names and builds no Encoding from it (the tokenizer is rebuilt from the ranks
it holds). Checkpoints of later nanochat versions (value embeddings, sliding-window
attention, per-layer residual scalars) are refused with what they have that ours lacks.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.stages import STAGES
from nanochat.conversation import SPECIAL_TOKENS
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer, TokenizerError

STAGE_OF_FOLDER = {stage.folder: name for name, stage in STAGES.items()}  # the same folder names as ours
# config.json "phase" of a published model (the original's hf_prepare.sh) -> our stage
STAGE_OF_PHASE = {"pretrain": "base", "midtrain": "mid", "sft": "sft", "rl": "rl", **{s: s for s in STAGES}}
MODEL_RE = re.compile(r"^model_(\d+)\.pt$")
CONFIG_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
# torch's F.rms_norm without eps uses the input dtype's machine epsilon; the original computed norms in fp32
ORIGINAL_NORM_EPS = torch.finfo(torch.float32).eps
COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper, left in some saved state dicts
BLOCK_PARAMS = {"attn.c_q": "attn.q_proj", "attn.c_k": "attn.k_proj", "attn.c_v": "attn.v_proj",
                "attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
BLOCK_RE = re.compile(r"^transformer\.h\.(\d+)\.(attn\.c_q|attn\.c_k|attn\.c_v|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# What later nanochat versions added, by the config field or parameter name that gives it away.
LATER_FEATURES = {"window_pattern": "sliding-window attention", "value_embeds": "value embeddings",
                  "ve_gate": "value embeddings", "resid_lambdas": "per-layer residual scalars",
                  "x0_lambdas": "per-layer residual scalars"}


class OriginalFormatError(ValueError):
    """Not an importable original-nanochat checkpoint or tokenizer; the message says what and where."""


@dataclass
class Found:
    """One checkpoint of the original layout: where it is and what the folders say it is."""

    folder: Path
    step: int
    stage: str | None  # None: the folder does not say
    tag: str | None


@dataclass
class Converted:
    found: Found
    config: GPTConfig
    state: dict[str, torch.Tensor]  # our parameter names, fp32
    meta: dict  # the original meta_NNNNNN.json
    has_optimizer: bool


# ---------------------------------------------------------------- finding


def find_checkpoints(path: Path, stage: str | None = None, step: int | None = None, name: str | None = None) -> list[Found]:
    """The newest (or `step`) checkpoint of each tag: in a checkpoint folder, or of every stage of a base dir.
    `name`: what the folder is called where that says its stage (a Hub repo's name; default the folder's)."""
    if _steps(path):
        in_stage_folder = path.parent.name in STAGE_OF_FOLDER
        found_stage = STAGE_OF_FOLDER[path.parent.name] if in_stage_folder else _published_stage(path, name or path.name)
        return [_found(path, step, found_stage, in_stage_folder)]
    found = []
    for folder_name, folder_stage in STAGE_OF_FOLDER.items():
        if stage in (None, folder_stage) and (path / folder_name).is_dir():
            tags = sorted(p for p in (path / folder_name).iterdir() if p.is_dir() and _steps(p))
            found += [_found(tag, step, folder_stage, True) for tag in tags]
    if not found:
        which = f"{STAGES[stage].folder}/<tag>/" if stage else "{base,mid,chatsft,chatrl}_checkpoints/<tag>/"
        raise OriginalFormatError(f"no original nanochat checkpoint in {path}: looked for model_NNNNNN.pt + meta_NNNNNN.json "
                                  f"there and in {which}")
    return found


def _steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := MODEL_RE.match(p.name)) and (folder / f"meta_{m.group(1)}.json").is_file())


def _found(folder: Path, step: int | None, stage: str | None, tag_from_folder: bool) -> Found:
    steps = _steps(folder)
    if step is not None and step not in steps:
        raise OriginalFormatError(f"{folder} has no step {step} (it has {', '.join(map(str, steps))})")
    return Found(folder, steps[-1] if step is None else step, stage, folder.name if tag_from_folder else None)


def _published_stage(folder: Path, name: str) -> str | None:
    """The stage a published model says it is: config.json's phase, else the -sft / -midtrain ending of its name."""
    try:
        phase = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("phase")
    except (OSError, ValueError, AttributeError):
        phase = None
    if phase in STAGE_OF_PHASE:
        return STAGE_OF_PHASE[phase]
    ending = name.rsplit("-", 1)[-1]
    return STAGE_OF_PHASE.get(ending)


# ---------------------------------------------------------------- weights


def read_checkpoint(found: Found) -> Converted:
    """Read, check and rename one checkpoint; OriginalFormatError says what does not fit."""
    meta_path = found.folder / f"meta_{found.step:06d}.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OriginalFormatError(f"{meta_path} is not readable JSON: {exc}") from None
    config = config_from_meta(meta, meta_path)
    model_path = found.folder / f"model_{found.step:06d}.pt"
    try:
        # mmap: shapes are checked before the weights are read; weights_only: no code runs from the file
        original = torch.load(model_path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
        raise OriginalFormatError(f"{model_path} is not a state dict torch.load(weights_only=True) can read: {exc}") from None
    if not isinstance(original, dict) or not all(isinstance(v, torch.Tensor) for v in original.values()):
        raise OriginalFormatError(f"{model_path} does not hold a state dict of tensors")
    state = convert_state(original, config, model_path)
    has_optimizer = any(found.folder.glob(f"optim_{found.step:06d}*.pt"))
    return Converted(found, config, state, meta, has_optimizer)


def config_from_meta(meta, where: Path) -> GPTConfig:
    config = meta.get("model_config") if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        raise OriginalFormatError(f"{where} has no model_config")
    later = sorted(set(config) - set(CONFIG_FIELDS))
    if later:
        raise OriginalFormatError(f"{where}: model_config has {', '.join(later)}{_later_hint(later)}, which this project's model "
                                  "does not have; only checkpoints of the October 2025 nanochat can be imported")
    missing = [f for f in CONFIG_FIELDS if not isinstance(config.get(f), int) or isinstance(config.get(f), bool)]
    if missing:
        raise OriginalFormatError(f"{where}: model_config lacks whole numbers for {', '.join(missing)}")
    try:
        return GPTConfig(**config, norm_eps=ORIGINAL_NORM_EPS)
    except ValueError as exc:
        raise OriginalFormatError(f"{where}: model_config describes no model this project can build: {exc}") from None


def convert_state(original: dict[str, torch.Tensor], config: GPTConfig, where: Path) -> dict[str, torch.Tensor]:
    """The original's parameters under our names, fp32, after checking that each one is there with its shape."""
    with torch.device("meta"):
        expected = {name: tensor.shape for name, tensor in GPT(config).state_dict().items()}
    state, unknown = {}, []
    for key, tensor in original.items():
        name = our_name(key.removeprefix(COMPILED_PREFIX), config.n_layer)
        if name is None:
            unknown.append(key)
        else:
            state[name] = tensor
    if unknown:
        shown = ", ".join(unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
        raise OriginalFormatError(f"{where} holds parameters this project's model does not have ({shown}){_later_hint(unknown)}; "
                                  "only checkpoints of the October 2025 nanochat can be imported")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise OriginalFormatError(f"{where} lacks {len(missing)} parameter(s) the model_config needs, e.g. {missing[0]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name] or not tensor.is_floating_point():
            raise OriginalFormatError(f"{where}: {name} is {tensor.dtype} {tuple(tensor.shape)}, the model_config "
                                      f"needs a float {tuple(expected[name])}")
    return {name: tensor.to(torch.float32) for name, tensor in state.items()}


def our_name(original: str, n_layer: int) -> str | None:
    """transformer.h.3.attn.c_q.weight -> blocks.3.attn.q_proj.weight; None for a name we have no counterpart of."""
    if original == "transformer.wte.weight":
        return "wte.weight"
    if original == "lm_head.weight":
        return original
    m = BLOCK_RE.match(original)
    if m and int(m.group(1)) < n_layer:
        return f"blocks.{m.group(1)}.{BLOCK_PARAMS[m.group(2)]}.weight"
    return None


def _later_hint(names: list[str]) -> str:
    features = sorted({feature for key, feature in LATER_FEATURES.items() for name in names if key in name})
    return f" (a later nanochat's {' and '.join(features)})" if features else ""


# ---------------------------------------------------------------- tokenizer


class _EncodingFields:
    """Stands in for tiktoken.core.Encoding while tokenizer.pkl is read: it keeps the pickled fields and runs nothing
    (a real Encoding would, given a registered encoding's name, fetch that encoding from the network)."""

    def __setstate__(self, state) -> None:
        self.state = state


def _reconstructor(cls, base, state):
    """copyreg._reconstructor, as pickle protocols 0 and 1 use it to make the object, limited to doing that."""
    if cls is not _EncodingFields or base is not object or state is not None:
        raise pickle.UnpicklingError("tokenizer.pkl reconstructs something other than a tiktoken Encoding: refused")
    return _EncodingFields()


def _latin1(text, encoding):
    """_codecs.encode, as pickle protocol 2 uses it to spell bytes, limited to that."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"tokenizer.pkl calls _codecs.encode with {encoding!r}: refused")
    return text.encode("latin1")


class TokenizerUnpickler(pickle.Unpickler):
    """Admits only the names a pickled tiktoken Encoding refers to (under each pickle protocol); refuses any other."""

    ALLOWED = {
        ("tiktoken.core", "Encoding"): _EncodingFields,
        ("copyreg", "_reconstructor"): _reconstructor, ("copy_reg", "_reconstructor"): _reconstructor,
        ("builtins", "object"): object, ("__builtin__", "object"): object,
        ("_codecs", "encode"): _latin1,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"tokenizer.pkl asks for {module}.{name}, which a tiktoken Encoding does not need: "
                                         "refused to load it (the file may be malicious)") from None


def find_tokenizer(folder: Path) -> Path:
    """The original's tokenizer folder for a checkpoint folder or base dir: beside it, or in the base dir above it."""
    for candidate in (folder / "tokenizer", folder.parent.parent / "tokenizer"):
        if (candidate / "tokenizer.pkl").is_file():
            return candidate
    raise OriginalFormatError(f"no tokenizer for {folder}: looked for tokenizer/tokenizer.pkl in it and in {folder.parent.parent}")


def read_tokenizer(folder: Path) -> Tokenizer:
    """Our Tokenizer rebuilt from the ranks in folder/tokenizer.pkl, checked against token_bytes.pt when present."""
    path = folder / "tokenizer.pkl"
    try:
        with open(path, "rb") as f:
            loaded = TokenizerUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise OriginalFormatError(f"{path}: {exc}") from None
    fields = loaded.state if isinstance(loaded, _EncodingFields) else None
    if not isinstance(fields, dict) or not isinstance(fields.get("pat_str"), str):
        raise OriginalFormatError(f"{path} holds no tiktoken Encoding of a nanochat tokenizer (a registered encoding's name?)")
    ranks, specials = fields.get("mergeable_ranks"), fields.get("special_tokens")
    if not isinstance(ranks, dict) or not all(isinstance(k, bytes) and type(v) is int for k, v in ranks.items()):
        raise OriginalFormatError(f"{path}: mergeable_ranks is not a table of bytes to ids")
    expected = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    if specials != expected:
        raise OriginalFormatError(f"{path}: special tokens {specials!r} are not nanochat's nine after the mergeable tokens")
    try:
        tokenizer = Tokenizer(ranks, fields["pat_str"])
    except (TokenizerError, ValueError) as exc:
        raise OriginalFormatError(f"{path}: {exc}") from None
    _check_token_bytes(folder / "token_bytes.pt", tokenizer)
    return tokenizer


def _check_token_bytes(path: Path, tokenizer: Tokenizer) -> None:
    if not path.is_file():
        return
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
        raise OriginalFormatError(f"{path} is not a tensor torch.load(weights_only=True) can read: {exc}") from None
    if not isinstance(saved, torch.Tensor) or not torch.equal(saved.long(), tokenizer.token_bytes().long()):
        raise OriginalFormatError(f"{path} disagrees with tokenizer.pkl (byte length of each token)")
