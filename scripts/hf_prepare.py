"""Share trained models on the HuggingFace Hub: prepare upload folders, and install a shared model back.

    ./hf_prepare.sh --author USER                          # one folder per trained stage, in $NANOCHAT_BASE_DIR/hf/
    ./hf_prepare.sh --author USER --stages sft,rl --out ~/to_upload
    python -m scripts.hf_prepare --download USER/nanochat-d20-sft   # then ./chat_cli.sh talks to it

A prepared folder is named like the Hub repo it becomes (nanochat-<tag>-<stage>):

    config.json, model.safetensors, tokenizer.json,   transformers format (NanoChat architecture); the
    tokenizer_config.json, special_tokens_map.json    chat template renders our conversation format
    README.md                                         model card, YAML front matter for the Hub
    nanochat/model.safetensors, nanochat/meta.json    the checkpoint as this project stores it
    nanochat/tokenizer/                               the tokenizer as this project stores it

upload_to_hf.py uploads the folders; `--download` installs the nanochat/ files of a
shared repo (or of a local folder) into $NANOCHAT_BASE_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from nanochat.checkpoint import (
    META_FILE,
    MODEL_FILE,
    STAGES,
    CheckpointError,
    list_steps,
    load_model,
    newest_tag,
    stage_dir,
    step_dir_name,
    verify,
)
from nanochat.common import get_base_dir
from nanochat.fileio import atomic_write
from nanochat.flags import FlagParser
from nanochat.gpt import GPTConfig
from nanochat.hf_export import CHAT_TEMPLATE, export_hf
from nanochat.progress import format_duration
from nanochat.report import CHAT_METRICS, load_all_metrics, section_slugs, summary_table
from nanochat.tokenizer import Tokenizer, TokenizerError, default_tokenizer_dir, get_tokenizer

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
    """Preparing or installing failed; the message says why and what to do."""

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


# ---------------------------------------------------------------- names and folders


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


def replace_folder(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`; an old `final` is deleted only once the new one is in place."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def build_folder(final: Path, fill) -> Path:
    """Call fill(tmp) on a fresh hidden sibling folder, then swap it in; a failure leaves `final` untouched."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------- preparing


def prepare_all(author: str, stages: tuple[str, ...], out_dir: Path, code_url: str | None = None) -> list[Path]:
    """A folder per requested stage that has a checkpoint; ShareError (exit 2) when none has one."""
    tokenizer = load_home_tokenizer()
    metrics = report_metrics()
    shared: dict[str, SharedModel] = {}
    folders, skipped = [], []
    for stage in stages:
        try:
            model, meta = load_model(stage)
        except CheckpointError as exc:
            print(f"skipping {stage}: {exc}")
            skipped.append(str(exc))
            continue
        shared[stage] = to_shared_model(model, meta, author, shared)
        folders.append(prepare_stage(shared[stage], model, tokenizer, out_dir, metrics, code_url))
        print(f"{stage}: {meta['model_tag']} step {meta['step']:,} -> {folders[-1]}")
        del model  # the next stage's weights need the memory
    if not folders:
        raise ShareError("nothing to share: " + "; ".join(skipped), EXIT_NOTHING)
    return folders


def load_home_tokenizer() -> Tokenizer:
    try:
        return get_tokenizer()
    except TokenizerError as exc:
        raise ShareError(str(exc), EXIT_NOTHING) from None


def to_shared_model(model, meta: dict, author: str, shared: dict[str, SharedModel]) -> SharedModel:
    stage, tag = meta["source"], meta["model_tag"]
    return SharedModel(
        stage=stage, model_tag=tag, step=meta["step"], repo_id=f"{author}/{repo_name(tag, stage)}",
        base_model=lineage(meta, shared), config=model.config, num_params=model.num_params(), meta=meta,
    )


def lineage(meta: dict, shared: dict[str, SharedModel]) -> str | None:
    """Repo id of the model this stage started from, if it is shared in the same run.

    Post-training checkpoints record where they started ("started_from"); a
    shared predecessor of another tag is a different model, so it does not count.
    """
    started = meta.get("started_from")
    if started:
        parent = shared.get(started.get("source"))
        return parent.repo_id if parent and parent.model_tag == started.get("model_tag") else None
    position = PIPELINE.index(meta["source"])
    parent = shared.get(PIPELINE[position - 1]) if position > 0 else None
    return parent.repo_id if parent else None


def prepare_stage(shared: SharedModel, model, tokenizer: Tokenizer, out_dir: Path, metrics: dict, code_url: str | None) -> Path:
    """Write one ready-to-upload folder (replacing an older one of the same name)."""
    if model.config.vocab_size != tokenizer.get_vocab_size():
        raise ShareError(
            f"the {shared.stage} model has a {model.config.vocab_size:,}-token vocabulary but the tokenizer in "
            f"{default_tokenizer_dir()} has {tokenizer.get_vocab_size():,}: it was trained with another tokenizer"
        )
    checkpoint = stage_dir(shared.stage) / shared.model_tag / step_dir_name(shared.step)

    def fill(folder: Path) -> None:
        export_hf(model, tokenizer, folder, chat_template=CHAT_TEMPLATE)
        write_native_files(folder / NATIVE_DIR, checkpoint, tokenizer, shared)
        atomic_write(folder / CARD_FILE, model_card(shared, metrics, code_url))

    out_dir.mkdir(parents=True, exist_ok=True)
    return build_folder(out_dir / shared.repo_id.split("/")[1], fill)


def write_native_files(native: Path, checkpoint: Path, tokenizer: Tokenizer, shared: SharedModel) -> None:
    """The checkpoint's weights and meta.json (listing only the weights) and our tokenizer files."""
    native.mkdir(parents=True)
    shutil.copyfile(checkpoint / MODEL_FILE, native / MODEL_FILE)
    meta = json.loads((checkpoint / META_FILE).read_text(encoding="utf-8"))
    # optimizer and data-loader state stay home: they are large and only resume training
    meta["files"] = {MODEL_FILE: meta["files"][MODEL_FILE]}
    meta[SHARE_KEY] = {"stage": shared.stage, "model_tag": shared.model_tag, "step": shared.step, "repo_id": shared.repo_id}
    atomic_write(native / META_FILE, json.dumps(meta, indent=2) + "\n")
    tokenizer.save(native / NATIVE_TOKENIZER_DIR)


# ---------------------------------------------------------------- the model card


def report_metrics() -> dict[str, dict]:
    """Numbers of every report section (sidecars); unreadable ones are left out with a warning."""
    directory = get_base_dir() / "report"
    if not directory.is_dir():
        return {}
    metrics, problems = load_all_metrics(directory, section_slugs(directory))
    for problem in problems:
        print(f"warning: {problem} (left out of the model card)", file=sys.stderr)
    return metrics


def model_card(shared: SharedModel, metrics: dict[str, dict], code_url: str | None) -> str:
    parts = [
        card_front_matter(shared),
        card_intro(shared, code_url),
        "## Model\n\n" + architecture_table(shared),
        "## Training\n\n" + "\n".join(training_lines(shared)),
        "## Evaluation\n\n" + evaluation_text(shared.stage, metrics),
        energy_text(shared.stage, metrics),
        "## Usage\n\n" + transformers_usage(shared) + "\n\n" + nanochat_usage(shared, code_url),
        "## Files\n\n" + FILES_TEXT,
        "## Limitations\n\n" + LIMITATIONS_TEXT,
    ]
    return "\n\n".join(part for part in parts if part) + "\n"


def card_front_matter(shared: SharedModel) -> str:
    info = STAGE_INFO[shared.stage]
    fields = {
        "license": "mit",
        "language": ["en"],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["nanochat", "dgx-spark", info.tag] + ([] if shared.stage == "base" else ["conversational"]),
        "datasets": list(info.datasets),
    }
    if shared.base_model:
        fields["base_model"] = shared.base_model
    return "---\n" + yaml.safe_dump(fields, sort_keys=False) + "---"


def card_intro(shared: SharedModel, code_url: str | None) -> str:
    project = f"[nanochat for DGX Spark]({code_url})" if code_url else "nanochat for DGX Spark"
    return (
        f"# {shared.repo_id.split('/')[1]}\n\n"
        f"A small language model trained from scratch with {project}, a hackable pipeline "
        f"(tokenizer, pretraining, midtraining, SFT, RL) for one NVIDIA DGX Spark.\n\n"
        f"This is the **{shared.stage}** stage, the {STAGE_INFO[shared.stage].title}: "
        f"model tag `{shared.model_tag}`, step {shared.step:,}."
    )


def architecture_table(shared: SharedModel) -> str:
    c = shared.config
    rows = [
        ("architecture", f"GPT (NanoChat): rotary embeddings, QK norm, ReLU² MLP, untied head, logits soft-capped at {c.logit_softcap:g}"),
        ("layers", f"{c.n_layer}"),
        ("width", f"{c.n_embd:,}"),
        ("attention heads", f"{c.n_head} query, {c.n_kv_head} key/value, head dim {c.head_dim}"),
        ("vocabulary", f"{c.vocab_size:,} tokens (byte-level BPE)"),
        ("context", f"{c.sequence_len:,} tokens"),
        ("parameters", f"{shared.num_params:,}"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def training_lines(shared: SharedModel) -> list[str]:
    meta, info = shared.meta, STAGE_INFO[shared.stage]
    lines = [f"- data: {info.data} (the {shared.stage} stage's default mixture)", f"- optimizer steps: {shared.step:,}"]
    plan = meta.get("plan")
    if plan and plan.get("total_batch_size"):
        tokens = shared.step * plan["total_batch_size"]
        lines.append(f"- training tokens: {tokens:,} ({plan['total_batch_size']:,} per step)")
    started = meta.get("started_from")
    if started:
        link = f" ([{shared.base_model}](https://huggingface.co/{shared.base_model}))" if shared.base_model else ""
        lines.append(f"- started from: the {started['source']} model `{started['model_tag']}` step {started['step']:,}{link}")
    if meta.get("train_seconds"):
        lines.append(f"- training time: {format_duration(meta['train_seconds'])} on {meta.get('world_size', 1)} rank(s)")
    val_bpb = meta.get("metrics", {}).get("val_bpb")
    if val_bpb is not None:
        lines.append(f"- validation bits per byte at the end: {val_bpb:.4f}")
    return lines


def stage_scores(metrics: dict[str, dict], stage: str) -> list[tuple[str, float | None]]:
    """(metric, value or None) for the evaluations that apply to a stage's model."""
    if stage == "base":
        return [("CORE", metrics.get("base-eval", {}).get("CORE")), ("val bpb", metrics.get("base-loss", {}).get("val bpb"))]
    chat = metrics.get(f"chat-eval-{stage}", {})
    return [(name, chat.get(name)) for name in CHAT_METRICS]


def evaluation_text(stage: str, metrics: dict[str, dict]) -> str:
    scores = stage_scores(metrics, stage)
    rows = [f"| {name} | {'not evaluated' if value is None else f'{value:.4f}'} |" for name, value in scores]
    text = "| Metric | Score |\n|---|---|\n" + "\n".join(rows)
    if any(value is not None for _, value in scores):
        text += "\n\nThe whole pipeline, from the report card:\n\n" + summary_table(metrics)
    return text


def _slug_stage(slug: str) -> str | None:
    """The stage a report section belongs to ('sft-train', 'chat-eval-sft' -> 'sft'); None for shared ones."""
    return next((stage for stage in PIPELINE if slug.startswith(f"{stage}-") or slug.endswith(f"-{stage}")), None)


def energy_text(stage: str, metrics: dict[str, dict]) -> str:
    """Energy and cost of the sections that led to this model; empty when the report recorded none."""
    upto = PIPELINE[: PIPELINE.index(stage) + 1]
    rows = [
        (slug, values.get(ENERGY_KEY), values.get(COST_KEY))
        for slug, values in metrics.items()
        if _slug_stage(slug) in (*upto, None) and (values.get(ENERGY_KEY) is not None or values.get(COST_KEY) is not None)
    ]
    if not rows:
        return ""

    def cell(value, unit_format: str) -> str:
        return "-" if value is None else unit_format.format(value)

    lines = ["## Energy and cost", "", f"Report sections up to the {stage} stage:", "", "| Section | Energy (kWh) | Cost (USD) |", "|---|---|---|"]
    lines += [f"| {slug} | {cell(kwh, '{:.3f}')} | {cell(usd, '{:.2f}')} |" for slug, kwh, usd in rows]
    total_kwh = sum(kwh for _, kwh, _ in rows if kwh is not None)
    total_usd = sum(usd for _, _, usd in rows if usd is not None)
    lines.append(f"| **total** | **{total_kwh:.3f}** | **{total_usd:.2f}** |")
    return "\n".join(lines)


def transformers_usage(shared: SharedModel) -> str:
    if shared.stage == "base":
        prompt = (
            "inputs = tokenizer(tokenizer.bos_token + \"The capital of France is\", return_tensors=\"pt\")\n"
            "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
            "print(tokenizer.decode(output[0], skip_special_tokens=True))"
        )
        note = "The base model continues text; documents start with `<|bos|>` in training, so prompts should too."
    else:
        prompt = (
            "messages = [{\"role\": \"user\", \"content\": \"Why is the sky blue?\"}]\n"
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)\n"
            "output = model.generate(**inputs, max_new_tokens=256, do_sample=True, temperature=0.6, top_k=50)\n"
            "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"
        )
        note = (
            "The chat template renders conversations exactly as nanochat does (a system message is joined to the "
            "first user message); generation stops at `<|assistant_end|>`. nanochat encodes text that looks like a "
            "special token as plain text; pass `sanitize_control_tokens=True` to `apply_chat_template` for the same."
        )
    return (
        "### With transformers\n\n"
        "Needs transformers 5 or newer (the NanoChat architecture).\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"repo = \"{shared.repo_id}\"\n"
        "tokenizer = AutoTokenizer.from_pretrained(repo)\n"
        "model = AutoModelForCausalLM.from_pretrained(repo)\n"
        f"{prompt}\n"
        "```\n\n" + note
    )


def nanochat_usage(shared: SharedModel, code_url: str | None) -> str:
    where = f"a checkout of {code_url}" if code_url else "a checkout of nanochat for DGX Spark"
    return (
        "### With nanochat\n\n"
        f"In {where}, after `./setup.sh`, download the checkpoint and tokenizer into `$NANOCHAT_BASE_DIR` and chat:\n\n"
        "```bash\n"
        f"python -m scripts.hf_prepare --download {shared.repo_id}\n"
        f"./chat_cli.sh -s {shared.stage}\n"
        "```\n\n"
        "`--download` refuses to replace a different tokenizer you already have (`--force` does)."
    )


FILES_TEXT = """\
- `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` (with the chat template),
  `special_tokens_map.json`: the model in transformers format.
- `nanochat/model.safetensors`, `nanochat/meta.json`: the checkpoint as nanochat stores it.
- `nanochat/tokenizer/`: the tokenizer as nanochat stores it (tiktoken ranks, token byte lengths, manifest)."""

LIMITATIONS_TEXT = """\
A small model trained on a modest budget: it makes factual mistakes, loses track of long conversations and
can produce wrong or inappropriate text. It has had no safety tuning. Use it to learn and experiment."""


# ---------------------------------------------------------------- installing a shared model


def fetch_shared(source: str) -> Path:
    """A local folder as it is; a Hub repo id is downloaded (only the nanochat/ files, which are all we install)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not REPO_ID_RE.match(source):
        raise ShareError(f"{source!r} is neither a folder nor a Hub repo id like USER/nanochat-d20-sft", EXIT_NOTHING)
    from huggingface_hub import snapshot_download

    # the hub raises its own HTTP errors and its HTTP library's network errors, with no common base
    try:
        return Path(snapshot_download(repo_id=source, allow_patterns=[f"{NATIVE_DIR}/*"]))
    except Exception as exc:
        raise ShareError(f"could not download {source}: {exc}") from None


def read_shared_checkpoint(native: Path) -> dict:
    """meta.json of a shared checkpoint, after checking the weights against it."""
    try:
        meta = verify(native, [MODEL_FILE])
        GPTConfig.from_dict(meta["model_config"])
    except CheckpointError as exc:
        raise ShareError(f"not a usable nanochat checkpoint: {exc}", EXIT_NOTHING) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ShareError(f"{native / META_FILE} has no model config this code can build: {exc}", EXIT_NOTHING) from None
    return meta


def read_shared_tokenizer(native: Path, vocab_size: int) -> Tokenizer:
    try:
        tokenizer = Tokenizer.load(native / NATIVE_TOKENIZER_DIR)
    except TokenizerError as exc:
        raise ShareError(str(exc), EXIT_NOTHING) from None
    if tokenizer.get_vocab_size() != vocab_size:
        raise ShareError(f"the shared tokenizer has {tokenizer.get_vocab_size():,} tokens, the model {vocab_size:,}", EXIT_NOTHING)
    return tokenizer


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return a.get_pattern() == b.get_pattern() and a.get_mergeable_ranks() == b.get_mergeable_ranks()


def tokenizer_needs_install(shared: Tokenizer, force: bool) -> bool:
    """Whether to write the shared tokenizer; refuses to replace a different one without force."""
    home = default_tokenizer_dir()
    if not home.is_dir() or not any(home.iterdir()):
        return True
    try:
        if same_tokenizer(Tokenizer.load(home), shared):
            return False
        problem = "holds a different tokenizer"
    except TokenizerError:
        problem = "holds an unreadable tokenizer"
    if not force:
        raise ShareError(
            f"{home} {problem}; models trained with it would read the shared tokenizer's ids wrongly. "
            "Use another NANOCHAT_BASE_DIR for the shared model, or --force to replace it"
        )
    return True


def checkpoint_needs_install(target: Path, meta: dict, force: bool) -> bool:
    """Whether to write the checkpoint; refuses to replace a different one at the same place without force."""
    if not target.exists():
        return True
    try:
        installed = verify(target, [MODEL_FILE])["files"][MODEL_FILE]["sha256"]
    except CheckpointError:
        installed = None
    if installed == meta["files"][MODEL_FILE]["sha256"]:
        return False
    if not force:
        raise ShareError(f"{target} already holds a different checkpoint; --force replaces it (or pick --model-tag)")
    return True


def install_shared(source: str, stage: str | None = None, model_tag: str | None = None, force: bool = False) -> tuple[str, str, int]:
    """Install a shared repo's (or local folder's) checkpoint and tokenizer; returns (stage, tag, step).

    Both conflicts are checked before anything is written, so a refusal changes nothing.
    """
    native = fetch_shared(source) / NATIVE_DIR
    if not native.is_dir():
        raise ShareError(f"{source} has no {NATIVE_DIR}/ folder: it was not prepared by hf_prepare", EXIT_NOTHING)
    meta = read_shared_checkpoint(native)
    share = meta.get(SHARE_KEY, {})
    stage = stage or share.get("stage")
    if stage not in STAGES:
        raise ShareError(f"{source} does not say which stage it is; pass --stage ({', '.join(PIPELINE)})", EXIT_NOTHING)
    model_tag = model_tag or share.get("model_tag") or "shared"
    step = meta["step"]
    target = stage_dir(stage) / model_tag / step_dir_name(step)
    tokenizer = read_shared_tokenizer(native, meta["model_config"]["vocab_size"])
    write_tokenizer = tokenizer_needs_install(tokenizer, force)
    write_checkpoint = checkpoint_needs_install(target, meta, force)
    if write_tokenizer:
        tokenizer.save(default_tokenizer_dir())
        print(f"tokenizer -> {default_tokenizer_dir()}")
    if write_checkpoint:
        target.parent.mkdir(parents=True, exist_ok=True)
        build_folder(target, lambda folder: copy_checkpoint(native, folder, meta))
        print(f"{stage} checkpoint -> {target}")
    else:
        print(f"{stage} checkpoint already installed at {target}")
    return stage, model_tag, step


def copy_checkpoint(native: Path, folder: Path, meta: dict) -> None:
    shutil.copyfile(native / MODEL_FILE, folder / MODEL_FILE)
    atomic_write(folder / META_FILE, json.dumps(meta, indent=2) + "\n")


def chat_command(stage: str, model_tag: str, step: int) -> str:
    """The chat_cli command that talks to this checkpoint: the short one when it is what chat_cli picks anyway."""
    folder = stage_dir(stage)
    if newest_tag(folder) == model_tag and list_steps(folder / model_tag)[-1] == step:
        return f"./chat_cli.sh -s {stage}"
    return f"./chat_cli.sh -s {stage} --model-tag {model_tag} --step {step}"


# ---------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = FlagParser(
        prog="python -m scripts.hf_prepare",
        description="Prepare HuggingFace Hub folders of your trained models (--author), or install a shared one (--download).",
        epilog="Exit status: 0 done; 1 failed (download error, refused to overwrite); 2 nothing to work with "
        "(no checkpoint, no tokenizer, not a shared nanochat model) or bad arguments.",
    )
    prep = parser.add_argument_group("prepare folders for upload_to_hf.py")
    prep.add_argument("--author", metavar="USER", help="HuggingFace user or organisation the repos will belong to (named in the model cards)")
    prep.add_argument("--stages", metavar="STAGES", type=parse_stages, default=PIPELINE, help="comma-separated stages to prepare (default: base,mid,sft,rl; stages without a checkpoint are skipped)")
    prep.add_argument("--out", metavar="DIR", type=Path, default=None, help="folder for the prepared repos (default: $NANOCHAT_BASE_DIR/hf)")
    prep.add_argument("--code-url", metavar="URL", default=None, help="where readers get this project's code; linked from the model cards")
    down = parser.add_argument_group("install a shared model into $NANOCHAT_BASE_DIR")
    down.add_argument("--download", metavar="REPO_ID_OR_FOLDER", help="Hub repo id (USER/nanochat-d20-sft) or a local copy of one")
    down.add_argument("--stage", choices=PIPELINE, default=None, help="stage to install it as (default: the one it was shared as)")
    down.add_argument("--model-tag", metavar="TAG", default=None, help="model tag to install it under (default: the one it was shared with)")
    down.add_argument("--force", action="store_true", help="replace a different tokenizer or checkpoint already there")
    args = parser.parse_args(argv)
    if (args.author is None) == (args.download is None):
        parser.error("give --author USER to prepare folders for upload, or --download REPO_ID to install a shared model")
    if args.author is not None and not HUB_NAME_RE.match(args.author):
        parser.error(f"--author {args.author!r} is not a valid HuggingFace user or organisation name")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.download is not None:
            stage, tag, step = install_shared(args.download, args.stage, args.model_tag, args.force)
            print(f"chat with it: {chat_command(stage, tag, step)}")
            return 0
        out_dir = (args.out or default_out_dir()).expanduser()
        folders = prepare_all(args.author, args.stages, out_dir, args.code_url)
    except ShareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    root_flag = f" --folder-root {out_dir}" if args.out else ""
    print(f"{len(folders)} folder(s) ready in {out_dir}; check them, then: python upload_to_hf.py --username {args.author}{root_flag} --dry-run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
