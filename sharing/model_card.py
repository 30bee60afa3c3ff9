"""The model card (README.md) of a shared model: YAML front matter for the Hub, what the model is,
how it was trained, its scores, and how to use it with transformers or with this project."""

from __future__ import annotations

import yaml

from sharing.hf_share import COST_KEY, ENERGY_KEY, PIPELINE, STAGE_INFO, SharedModel
from nanochat.progress import format_duration
from nanochat.report import CHAT_METRICS, summary_table
from nanochat.stages import chat_eval_section


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
    chat = metrics.get(chat_eval_section(stage), {})
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
