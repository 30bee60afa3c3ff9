"""Reinforcement learning on GSM8K: sample answers, reward correct ones, push towards them.

    python -m scripts.chat_rl                        # from the newest SFT model

Each step takes --examples-per-step questions; for each, the engine samples
--num-samples answers (tool use on). Reward is 1 for the right final number;
advantage = reward - the mean reward of that question's group; the loss is
the advantage-weighted negative log-likelihood of the sampled tokens (plain
policy gradient: no KL term, no ratio clipping). Calculator outputs were
forced, not sampled, so they carry no loss. Logs mean reward per step and
pass@k on held-out questions; writes chatrl_checkpoints/<tag>/.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from nanochat.common import print0, setup_logging
from nanochat.engine import Engine
from nanochat.flags import FlagParser
from nanochat.optim import add_lr_args, learning_rates
from nanochat.posttrain import add_run_args, add_start_args, load_start, prepare_training, report_stage, train_stage
from nanochat.runtime import BatchRequest, ComputeSettings, bucket_length, fit_device_batch
from nanochat.sampling import SamplingParams
from nanochat.schedule import PlanError
from nanochat.tokenizer import get_tokenizer
from nanochat.training import Hooks, LoopSettings, cost_settings, run_guarded
from tasks.chat_eval import final_chat_eval
from tasks.gsm8k import GSM8K


DEFAULT_DEVICE_BATCH = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(prog="python -m scripts.chat_rl", description="Policy-gradient RL on GSM8K, then the chat evaluation. "
                   "Safe to stop with Ctrl-C (a checkpoint is saved): run it again and it continues.")
    add_start_args(p, "rl", DEFAULT_DEVICE_BATCH)
    p.add_argument("--examples-per-step", type=int, default=16, help="questions per optimizer step across all ranks (default %(default)s)")
    p.add_argument("--num-samples", type=int, default=16, help="answers sampled per question (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest sampled answer (default %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default %(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="sampling top-k (default %(default)s)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (default: one pass over GSM8K train)")
    p.add_argument("--max-examples", type=int, default=None, help="use only the first N training questions")
    add_lr_args(p, init_lr_frac=0.05)
    p.add_argument("--eval-every", type=int, default=60, help="pass@k on held-out questions every N steps (default %(default)s)")
    p.add_argument("--eval-examples", type=int, default=100, help="held-out questions for pass@k (default %(default)s)")
    add_run_args(p, save_every=60)
    return p.parse_args(argv)


class Rollouts:
    """Per optimizer step: sample answers for this rank's questions, then yield micro-batches
    (inputs, targets, advantages) of `rows` sequences. A step's micro-batches are used up
    before a checkpoint, so the state is just where the questions stand."""

    def __init__(self, engine: Engine, task, args, info, state: dict | None):
        self.engine, self.task, self.args, self.info = engine, task, args, info
        self.tokenizer = engine.tokenizer
        self.cursor = state["cursor"] if state else info.rank
        self.pending: list = []
        self.last_reward = 0.0
        special = self.tokenizer.encode_special
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def __iter__(self):
        return self

    def __next__(self):
        if not self.pending:
            self.pending = self._rollout()
        return self.pending.pop(0)

    def _questions(self) -> list[int]:
        per_rank = self.args.examples_per_step // self.info.world_size
        picked = []
        for _ in range(per_rank):
            picked.append(self.cursor % len(self.task))
            self.cursor += self.info.world_size
        return picked

    def _rollout(self) -> list:
        model = self.engine.model
        model.eval()
        sequences, advantages, rewards = [], [], []
        for index in self._questions():
            conv = self.task[index]
            prompt = self.tokenizer.render_for_completion(conv)
            params = SamplingParams(temperature=self.args.temperature, top_k=self.args.top_k, max_tokens=self.args.max_new_tokens,
                                    seed=self.cursor * 1000 + index)
            answers = self.engine.generate(prompt, params, n=self.args.num_samples)
            group = [float(self.task.reward(conv, a.text)) for a in answers]
            mean = sum(group) / len(group)
            rewards += group
            for answer, reward in zip(answers, group):
                sequences.append((prompt, answer.tokens))
                advantages.append(reward - mean)
        model.train()
        self.last_reward = sum(rewards) / len(rewards)
        print0(f"rollout | mean reward {self.last_reward:.3f} over {len(rewards)} answers")
        return self._micro_batches(sequences, advantages)

    def _micro_batches(self, sequences, advantages) -> list:
        rows, device = self.args.device_batch_size, self.info.device
        batches = []
        for start in range(0, len(sequences), rows):
            chunk = sequences[start : start + rows]
            width = bucket_length(max(len(p) + len(c) for p, c in chunk), self.engine.max_len)
            x = torch.full((len(chunk), width), self.tokenizer.get_bos_token_id(), dtype=torch.long)
            y = torch.full((len(chunk), width), -1, dtype=torch.long)
            for r, (prompt, completion) in enumerate(chunk):
                ids = prompt + completion
                x[r, : len(ids)] = torch.tensor(ids)
                y[r, len(prompt) - 1 : len(ids) - 1] = torch.tensor(self._learnable(completion))
            adv = torch.tensor(advantages[start : start + rows], dtype=torch.float32)
            batches.append((x.to(device), y.to(device), adv.to(device)))
        return batches

    def _learnable(self, completion: list[int]) -> list[int]:
        """The completion as targets, with forced calculator outputs masked out (-1)."""
        out, inside = [], False
        for t in completion:
            inside = inside or t == self.output_start
            out.append(-1 if inside else t)
            if t == self.output_end:
                inside = False
        return out


def policy_gradient_loss(model, batch) -> torch.Tensor:
    """Advantage-weighted NLL of the sampled tokens, averaged over them."""
    x, y, adv = batch
    counted = (y != -1).sum().clamp(min=1)
    return model(x, y, loss_weights=(adv[:, None] / counted).expand_as(y))  # ignored targets (-1) weigh 0


def pass_at_k(engine: Engine, task, args, indices: list[int]) -> dict:
    """Fraction of questions with at least one right answer among the first k samples."""
    ks = [k for k in (1, 2, 4, 8, 16) if k <= args.num_samples]
    solved = {k: 0 for k in ks}
    for index in indices:
        conv = task[index]
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_new_tokens, seed=index)
        answers = engine.generate(engine.tokenizer.render_for_completion(conv), params, n=args.num_samples)
        right = [task.reward(conv, a.text) > 0 for a in answers]
        for k in ks:
            solved[k] += any(right[:k])
    return {f"pass@{k}": solved[k] / max(len(indices), 1) for k in ks}


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    code = run_guarded(lambda info: train(args, info), device=args.device,
                       device_batch=lambda: args.device_batch_size or DEFAULT_DEVICE_BATCH)
    if code == 0 and not args.no_eval:
        code = final_chat_eval("rl", model_tag=args.model_tag, max_problems=args.eval_problems, device=args.device,
                               dtype=args.dtype, tasks=["GSM8K"])
    return code


def train(args, info) -> int:
    t0 = time.time()
    tokenizer = get_tokenizer()
    # the model: the newest SFT model (or --source); rollouts are at most its context long, and so are the rows trained on
    start = load_start("rl", args.source, args.model_tag, args.step, info, args.dtype)
    request = BatchRequest(DEFAULT_DEVICE_BATCH, args.device_batch_size, args.auto_batch, args.ignore_memory_check, args.memory_limit)
    batch, start.memory_estimate = fit_device_batch(start.model, request, start.model.config.sequence_len, info, "rl",
                                                    checkpoint_blocks=args.activation_checkpointing)
    args.device_batch_size = batch  # Rollouts' micro-batches
    # the plan: per step, each rank's questions x samples, trained on in micro-batches of the device batch
    if args.examples_per_step % info.world_size or (args.examples_per_step // info.world_size * args.num_samples) % batch:
        raise PlanError("--examples-per-step must divide among ranks, and each rank's samples among --device-batch-size rows")
    train_task, test_task = GSM8K("train", stop=args.max_examples), GSM8K("test")
    steps = args.num_iterations if args.num_iterations > 0 else max(1, len(train_task) // args.examples_per_step)
    # the loop: rollouts sample through the engine from the model itself; pass@k on held-out questions
    compute = ComputeSettings(args.dtype, args.compile, args.activation_checkpointing)
    rates = learning_rates(args.matrix_lr, args.embedding_lr, args.unembedding_lr, args.init_lr_frac)
    prepare_training(start, info, steps, rates=rates, resume_mode=args.resume_mode, settings=vars(args), compute=compute)
    engine = Engine(start.model, tokenizer, max_batch=args.num_samples)
    rollouts = Rollouts(engine, train_task, args, info, start.resumed.data_state)
    eval_indices = list(range(info.rank, min(len(test_task), args.eval_examples), info.world_size))
    hooks = Hooks(evaluate=lambda step: _report_pass_at_k(step, engine, test_task, args, eval_indices),
                  step_metrics=lambda: {"reward": rollouts.last_reward})  # this rank's mean, as its rollout line says
    micro = args.examples_per_step // info.world_size * args.num_samples // batch
    settings = LoopSettings(num_iterations=steps, grad_accum_steps=micro, warmdown_ratio=1.0, eval_every=args.eval_every,
                            save_every=args.save_every, keep_last=args.keep_last, warm_momentum=False,
                            cost=cost_settings(args.price_per_kwh, args.hardware_price, args.hardware_lifetime_years))
    print0(f"RL: from {start.started_from()}; {steps} steps of {args.examples_per_step} questions x {args.num_samples} samples")
    code, loop = train_stage(start, info, rollouts, settings, hooks, run=args.run, flags=vars(args), loss_fn=policy_gradient_loss)
    # the report (the chat evaluation follows in main)
    if code == 0 and info.is_master:
        report_stage(start, {"steps": steps, "last mean reward": rollouts.last_reward, **loop.metrics}, loop, t0)
    return code


def _report_pass_at_k(step: int, engine: Engine, task, args, indices: list[int]) -> dict:
    import torch.distributed as dist

    metrics = pass_at_k(engine, task, args, indices)
    if dist.is_available() and dist.is_initialized():
        values = torch.tensor([metrics[k] * len(indices) for k in metrics] + [len(indices)], dtype=torch.float64, device=engine.device)
        dist.all_reduce(values)
        metrics = {k: float(values[i] / values[-1]) for i, k in enumerate(metrics)}
    print0(f"step {step:06d} | " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return metrics


if __name__ == "__main__":
    sys.exit(main())
