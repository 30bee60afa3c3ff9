"""The shared-model format on the HuggingFace Hub: what a prepared folder holds and how it is named.

A prepared folder is named like the Hub repo it becomes (nanochat-<tag>-<stage>):

    config.json, model.safetensors, tokenizer.json,   transformers format (NanoChat architecture); the
    tokenizer_config.json, special_tokens_map.json    chat template renders our conversation format
    README.md                                         model card, YAML front matter for the Hub
    nanochat/model.safetensors, nanochat/meta.json    the checkpoint as this project stores it
    nanochat/tokenizer/                               the tokenizer as this project stores it

sharing.hf_folders writes them, sharing.model_card their cards, sharing.hf_install
installs one back; scripts.hf_prepare and upload_to_hf.py are the commands.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from nanochat.checkpoint import META_FILE
from nanochat.common import get_base_dir
from nanochat.gpt import GPTConfig
from nanochat.stages import STAGES


PIPELINE = tuple(STAGES)  # base, mid, sft, rl: each stage starts from the one before


NATIVE_DIR = "nanochat"


NATIVE_TOKENIZER_DIR = "tokenizer"


CARD_FILE = "README.md"


# meta.json of a shared checkpoint records what it is, so upload and download need no guessing.
SHARE_KEY = "hf_share"


ENERGY_KEY, COST_KEY = "energy (kWh)", "cost (USD)"


HUB_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")


REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


EXIT_FAILED, EXIT_NOTHING = 1, 2


@dataclass(frozen=True)
class StageInfo:
    title: str
    data: str
    datasets: tuple[str, ...]  # Hub ids of the stage's default data, for the card's metadata
    tag: str


STAGE_INFO = {
    "base": StageInfo(
        "pretrained base model: it continues text and does not know the chat format",
        "FineWeb-EDU web text (karpathy/fineweb-edu-100b-shuffle)",
        ("karpathy/fineweb-edu-100b-shuffle",), "pretrained",
    ),
    "mid": StageInfo(
        "midtrained model: the base model taught the chat format, multiple choice, tool use and spelling",
        "SmolTalk conversations, MMLU auxiliary_train, GSM8K train, identity conversations, spelling tasks",
        ("HuggingFaceTB/smol-smoltalk", "cais/mmlu", "openai/gsm8k"), "midtrained",
    ),
    "sft": StageInfo(
        "chat model after supervised fine-tuning",
        "ARC-Easy and ARC-Challenge train, GSM8K train, 10K SmolTalk conversations, identity conversations, spelling rows",
        ("allenai/ai2_arc", "openai/gsm8k", "HuggingFaceTB/smol-smoltalk"), "sft",
    ),
    "rl": StageInfo(
        "chat model after reinforcement learning on GSM8K",
        "GSM8K train questions, rewarded for the right final number",
        ("openai/gsm8k",), "rl",
    ),
}


class ShareError(RuntimeError):
    """Preparing, uploading or installing failed; the message says why and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class SharedModel:
    """One stage's checkpoint as it is being shared."""

    stage: str
    model_tag: str
    step: int
    repo_id: str
    base_model: str | None  # repo id of the stage it started from, when that is shared too
    config: GPTConfig
    num_params: int
    meta: dict  # the checkpoint's metadata, as load_model returns it


def parse_stages(text: str) -> tuple[str, ...]:
    """'sft,base' -> ('base', 'sft'): known stages, in pipeline order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"stages must be a comma-separated subset of {','.join(PIPELINE)}, got {text!r}")
    return tuple(stage for stage in PIPELINE if stage in names)


def repo_name(model_tag: str, stage: str) -> str:
    """The Hub repo name for a stage of a model: nanochat-d20-sft."""
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", model_tag).strip("-.")
    return f"nanochat-{tag}-{stage}" if tag else f"nanochat-{stage}"


def default_out_dir() -> Path:
    return get_base_dir() / "hf"


def read_share_info(folder: Path) -> dict | None:
    """The SHARE_KEY entry of a prepared folder's meta.json; None if the folder is not one."""
    try:
        meta = json.loads((folder / NATIVE_DIR / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    share = meta.get(SHARE_KEY) if isinstance(meta, dict) else None
    return share if isinstance(share, dict) and share.get("stage") in STAGES else None
