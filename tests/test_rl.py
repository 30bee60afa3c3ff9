"""RL (scripts.chat_rl) by its numbers, with scripted answers in place of sampling: each answer's
advantage, which tokens carry loss, the loss itself, and pass@k."""

from __future__ import annotations

import argparse

import pytest
import torch

from nanochat.common import DistInfo
from nanochat.engine import Completion
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import Tokenizer
from scripts.chat_rl import Rollouts, pass_at_k, policy_gradient_loss

RIGHT = "42"


class Questions:
    """A task of n questions; an answer earns 1 when its text is RIGHT."""

    def __init__(self, n: int):
        self.conversations = [{"messages": [{"role": "user", "content": f"question {i}?"}]} for i in range(n)]

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int) -> dict:
        return self.conversations[i]

    def reward(self, conversation: dict, completion: str) -> float:
        return float(completion == RIGHT)


class ScriptedEngine:
    """Engine.generate's interface: question i gets the completions scripted for it, in order."""

    def __init__(self, tokenizer: Tokenizer, task: Questions, script: list[list[Completion]]):
        self.tokenizer, self.model, self.max_len = tokenizer, torch.nn.Identity(), 256
        self.answers = {tuple(tokenizer.render_for_completion(task[i])): completions for i, completions in enumerate(script)}

    def generate(self, prompt: list[int], params, n: int = 1) -> list[Completion]:
        completions = self.answers[tuple(prompt)]
        assert len(completions) == n
        return completions


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer({bytes([i]): i for i in range(256)})


def answer(tokenizer: Tokenizer, text: str, tool: tuple[str, str] | None = None) -> Completion:
    """A sampled answer `text`; with `tool` (expression, result), it first calls the calculator,
    whose output the engine forces in."""
    special = tokenizer.encode_special
    tokens = []
    if tool:
        expression, result = tool
        tokens += [special("<|python_start|>"), *tokenizer.encode(expression), special("<|python_end|>"),
                   special("<|output_start|>"), *tokenizer.encode(result), special("<|output_end|>")]
    return Completion(text, tokens + tokenizer.encode(text), "stop")


def args(**overrides) -> argparse.Namespace:
    values = {"examples_per_step": 2, "num_samples": 3, "device_batch_size": 2, "temperature": 1.0, "top_k": 50, "max_new_tokens": 64}
    return argparse.Namespace(**{**values, **overrides})


SINGLE = DistInfo(False, 0, 0, 1, torch.device("cpu"))


def test_advantage_is_the_reward_minus_its_questions_mean(tokenizer):
    task = Questions(2)
    script = [[answer(tokenizer, t) for t in (RIGHT, "7", "8")], [answer(tokenizer, t) for t in (RIGHT, RIGHT, "9")]]
    rollouts = Rollouts(ScriptedEngine(tokenizer, task, script), task, args(), SINGLE, state=None)
    advantages = torch.cat([next(rollouts)[2] for _ in range(3)])
    # the step's mean reward is 1/2; each question's own is 1/3 and 2/3
    torch.testing.assert_close(advantages, torch.tensor([2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3]))
    assert rollouts.last_reward == pytest.approx(0.5)


def test_only_sampled_answer_tokens_are_targets_and_forced_tool_output_is_not(tokenizer):
    task = Questions(1)
    calls = answer(tokenizer, RIGHT, tool=("6*7", RIGHT))
    plain = answer(tokenizer, "no idea")
    rollouts = Rollouts(ScriptedEngine(tokenizer, task, [[calls, plain]]), task, args(examples_per_step=1, num_samples=2), SINGLE, None)
    x, y, _ = next(rollouts)
    prompt = tokenizer.render_for_completion(task[0])
    forced = {tokenizer.encode_special("<|output_start|>"), tokenizer.encode_special("<|output_end|>"), *tokenizer.encode(RIGHT)}
    for row, completion in enumerate([calls, plain]):
        ids = prompt + completion.tokens
        assert x[row, : len(ids)].tolist() == ids
        expected = [-1] * y.size(1)
        for j, token in enumerate(completion.tokens):
            expected[len(prompt) - 1 + j] = token  # position p predicts token p + 1
        if completion is calls:
            start = completion.tokens.index(tokenizer.encode_special("<|output_start|>"))
            end = completion.tokens.index(tokenizer.encode_special("<|output_end|>"))
            assert set(completion.tokens[start : end + 1]) == forced
            for j in range(start, end + 1):
                expected[len(prompt) - 1 + j] = -1
        assert y[row].tolist() == expected, row


def test_loss_is_the_advantage_weighted_nll_averaged_over_the_counted_tokens():
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=32), "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randint(0, 32, (2, 10))
    y = torch.randint(0, 32, (2, 10))
    y[0, :4], y[1, :7], y[1, 9] = -1, -1, -1  # rows count 6 and 2 tokens
    adv = torch.tensor([0.5, -1.5])
    with torch.no_grad():
        nll = model(x, y, loss_reduction="none")
    expected = (adv[:, None] * nll * (y != -1)).sum() / 8
    loss = policy_gradient_loss(model, (x, y, adv))
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_pass_at_k_counts_questions_solved_within_the_first_k_samples(tokenizer):
    task = Questions(3)
    script = [[answer(tokenizer, t) for t in ("1", RIGHT, "2", "3")],
              [answer(tokenizer, t) for t in ("4", "5", "6", "7")],
              [answer(tokenizer, t) for t in (RIGHT, "8", RIGHT, "9")]]
    engine = ScriptedEngine(tokenizer, task, script)
    assert pass_at_k(engine, task, args(num_samples=4), [0, 1, 2]) == pytest.approx({"pass@1": 1 / 3, "pass@2": 2 / 3, "pass@4": 2 / 3})
    assert pass_at_k(engine, task, args(num_samples=4), [1]) == {"pass@1": 0.0, "pass@2": 0.0, "pass@4": 0.0}


# ---------------------------------------------------------------- which questions, how sampled, how batched


class RecordingEngine(ScriptedEngine):
    """A ScriptedEngine that notes, per generate call, the question asked, its parameters, n, and
    whether the model was in eval mode."""

    def __init__(self, tokenizer: Tokenizer, task: Questions, script: list[list[Completion]]):
        super().__init__(tokenizer, task, script)
        self.index = {tuple(tokenizer.render_for_completion(task[i])): i for i in range(len(task))}
        self.calls: list[tuple[int, object, int, bool]] = []
        self.model = torch.nn.Linear(1, 1)

    def generate(self, prompt: list[int], params, n: int = 1) -> list[Completion]:
        self.calls.append((self.index[tuple(prompt)], params, n, self.model.training))
        return super().generate(prompt, params, n)


def two_answers_each(tokenizer: Tokenizer, task: Questions) -> list[list[Completion]]:
    return [[answer(tokenizer, RIGHT), answer(tokenizer, "no")] for _ in range(len(task))]


def test_each_rank_takes_every_world_size_th_question_wrapping_and_resumes_where_it_stood(tokenizer):
    task = Questions(5)
    engine = RecordingEngine(tokenizer, task, two_answers_each(tokenizer, task))
    rank1 = DistInfo(True, 1, 1, 2, torch.device("cpu"))
    settings = args(examples_per_step=4, num_samples=2, device_batch_size=4)  # two questions per rank and step
    rollouts = Rollouts(engine, task, settings, rank1, state=None)
    next(rollouts)
    assert [call[0] for call in engine.calls] == [1, 3]
    next(rollouts)
    assert [call[0] for call in engine.calls] == [1, 3, 0, 2]  # 5 % 5, 7 % 5: round the task again
    state = rollouts.state_dict()
    assert state == {"cursor": 9}
    # a resumed run continues with the questions the interrupted one would have asked next
    resumed = Rollouts(engine, task, settings, rank1, state=state)
    next(resumed)
    assert [call[0] for call in engine.calls[4:]] == [4, 1]


def test_answers_are_sampled_in_eval_mode_with_the_flags_and_a_seed_that_repeats_on_resume(tokenizer):
    task = Questions(2)
    engine = RecordingEngine(tokenizer, task, two_answers_each(tokenizer, task))
    settings = args(examples_per_step=2, num_samples=2, device_batch_size=2, temperature=0.7, top_k=9, max_new_tokens=33)
    rollouts = Rollouts(engine, task, settings, SINGLE, state=None)
    next(rollouts)
    next(rollouts)  # the second micro-batch of the first step: no new sampling
    assert len(engine.calls) == 2 and engine.model.training  # back in training mode for the loss
    next(rollouts)  # the second step
    for _, params, n, training in engine.calls:
        assert (params.temperature, params.top_k, params.max_tokens, n, training) == (0.7, 9, 33, 2, False)
    seeds = [call[1].seed for call in engine.calls]
    assert len(set(seeds)) == 4 and all(isinstance(s, int) for s in seeds)  # per question and step
    again = RecordingEngine(tokenizer, task, two_answers_each(tokenizer, task))
    Rollouts(again, task, settings, SINGLE, state={"cursor": 2}).__next__()
    assert [call[1].seed for call in again.calls] == seeds[2:]


def test_a_micro_batch_pads_with_bos_to_its_bucket_and_ignores_the_padding(tokenizer):
    task = Questions(1)
    long, short = answer(tokenizer, "x" * 70), answer(tokenizer, RIGHT)
    rollouts = Rollouts(ScriptedEngine(tokenizer, task, [[long, short]]), task, args(examples_per_step=1, num_samples=2), SINGLE, None)
    x, y, adv = next(rollouts)
    prompt = tokenizer.render_for_completion(task[0])
    longest = len(prompt) + len(long.tokens)
    assert longest > 64 and x.shape == y.shape == (2, 128)  # the next power of two above 64
    assert (x.dtype, y.dtype, adv.dtype) == (torch.long, torch.long, torch.float32)
    bos = tokenizer.get_bos_token_id()
    for row, completion in enumerate([long, short]):
        end = len(prompt) + len(completion.tokens)
        assert x[row, end:].eq(bos).all() and y[row, end - 1 :].eq(-1).all() and y[row, : len(prompt) - 1].eq(-1).all()
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5]))  # the short answer is the right one


def test_a_step_logs_its_mean_reward(tokenizer, capsys):
    task = Questions(2)
    script = [[answer(tokenizer, t) for t in (RIGHT, "7", "8")], [answer(tokenizer, t) for t in (RIGHT, RIGHT, "9")]]
    next(Rollouts(ScriptedEngine(tokenizer, task, script), task, args(), SINGLE, state=None))
    assert "rollout | mean reward 0.500 over 6 answers" in capsys.readouterr().out


def test_a_batch_without_any_counted_token_has_zero_loss():
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=32), "cpu")
    x = torch.randint(0, 32, (2, 6))
    loss = policy_gradient_loss(model, (x, torch.full((2, 6), -1), torch.tensor([1.0, -1.0])))
    assert loss.item() == 0.0


def test_pass_at_k_reports_every_power_of_two_up_to_the_samples_and_samples_as_flagged(tokenizer):
    task = Questions(2)
    script = [[answer(tokenizer, "0")] * 15 + [answer(tokenizer, RIGHT)], [answer(tokenizer, RIGHT)] + [answer(tokenizer, "0")] * 15]
    engine = RecordingEngine(tokenizer, task, script)
    metrics = pass_at_k(engine, task, args(num_samples=16, temperature=0.6, top_k=7, max_new_tokens=21), [0, 1])
    assert metrics == {"pass@1": 0.5, "pass@2": 0.5, "pass@4": 0.5, "pass@8": 0.5, "pass@16": 1.0}
    assert [(i, p.temperature, p.top_k, p.max_tokens, p.seed, n) for i, p, n, _ in engine.calls] == \
        [(0, 0.6, 7, 21, 0, 16), (1, 0.6, 7, 21, 1, 16)]
    three = RecordingEngine(tokenizer, Questions(1), [[answer(tokenizer, "0")] * 3])
    assert pass_at_k(three, Questions(1), args(num_samples=3), [0]) == {"pass@1": 0.0, "pass@2": 0.0}
    assert pass_at_k(three, Questions(1), args(num_samples=3), []) == {"pass@1": 0.0, "pass@2": 0.0}


class OwnAnswers(Questions):
    """Questions whose right answer differs per question: the reward must read its own conversation."""

    def __init__(self, answers: list[str]):
        super().__init__(len(answers))
        for conversation, right in zip(self.conversations, answers):
            conversation["right"] = right

    def reward(self, conversation: dict, completion: str) -> float:
        return float(completion == conversation["right"])


def test_each_answer_is_rewarded_against_its_own_question(tokenizer):
    task = OwnAnswers(["1", "2"])
    script = [[answer(tokenizer, t) for t in ("1", "2")], [answer(tokenizer, t) for t in ("1", "2")]]
    engine = ScriptedEngine(tokenizer, task, script)
    rollouts = Rollouts(engine, task, args(examples_per_step=2, num_samples=2, device_batch_size=4), SINGLE, state=None)
    torch.testing.assert_close(next(rollouts)[2], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert pass_at_k(engine, task, args(num_samples=2), [0, 1]) == {"pass@1": 0.5, "pass@2": 1.0}


def test_one_solved_question_alone_is_pass_at_k_of_one(tokenizer):
    task = Questions(1)
    engine = ScriptedEngine(tokenizer, task, [[answer(tokenizer, RIGHT)]])
    assert pass_at_k(engine, task, args(num_samples=1), [0]) == {"pass@1": 1.0}


def test_a_single_counted_token_carries_its_whole_weighted_nll():
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=32), "cpu")
    x = torch.randint(0, 32, (1, 6))
    y = torch.full((1, 6), -1)
    y[0, 3] = 5
    with torch.no_grad():
        nll = model(x, y, loss_reduction="none")
        loss = policy_gradient_loss(model, (x, y, torch.tensor([2.0])))
    torch.testing.assert_close(loss, 2.0 * nll[0, 3])
