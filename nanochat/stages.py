"""The pipeline's model stages, defined once: each stage's name, checkpoint
folder, stage script, Python entry point, report sections and the stage it
starts from. Python imports STAGES; the bash scripts ask the CLI for a folder:

    python -m nanochat.stages folder base           # base_checkpoints

A stage's name is what --source / -i take, the key of its report sections and
of its curves. The folder names are the original nanochat's, so its runs and
ours sit side by side under $NANOCHAT_BASE_DIR.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    folder: str  # checkpoint folder under $NANOCHAT_BASE_DIR
    script: str  # the root stage script that fills it
    module: str  # the Python entry point the script launches
    starts_from: str | None  # the stage whose model it continues
    sections: tuple[str, ...]  # its report sections, in the order they are written

    @property
    def train_section(self) -> str:
        return self.sections[0]


def chat_eval_section(name: str) -> str:
    """The report section scripts.chat_eval writes for a stage's model."""
    return f"chat-eval-{name}"


STAGES = {stage.name: stage for stage in (
    Stage("base", "Pretraining", "base_checkpoints", "./pretrain.sh", "scripts.base_train", None,
          ("base-train", "base-loss", "base-eval")),
    Stage("mid", "Midtraining", "mid_checkpoints", "./midtrain.sh", "scripts.mid_train", "base",
          ("mid-train", chat_eval_section("mid"))),
    Stage("sft", "Supervised finetuning", "chatsft_checkpoints", "./sft.sh", "scripts.chat_sft", "mid",
          ("sft-train", chat_eval_section("sft"))),
    Stage("rl", "Reinforcement learning (GSM8K)", "chatrl_checkpoints", "./rl.sh", "scripts.chat_rl", "sft",
          ("rl-train", chat_eval_section("rl"))),
)}
# `--source auto` takes the most advanced stage that has a model
AUTO_ORDER = tuple(reversed(STAGES))


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")
    return STAGES[name]


def stage_of_folder(folder: str) -> str | None:
    """The stage whose checkpoint folder is named `folder`, or None."""
    return next((stage.name for stage in STAGES.values() if stage.folder == folder), None)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if len(words) == 2 and words[0] == "folder" and words[1] in STAGES:
        print(STAGES[words[1]].folder)
        return 0
    print(f"usage: python -m nanochat.stages folder {{{'|'.join(STAGES)}}}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
