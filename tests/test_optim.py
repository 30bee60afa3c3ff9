"""Muon, AdamW and their sharded versions: the maths, the parameter groups,
checkpoint round trips, and 2 gloo ranks against 1 process accumulating grads."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import muon
from nanochat.muon import Muon, aspect_scale, newton_schulz_dtype, normalize_rows_, orthogonalize
from nanochat.optim import MuonOptions, batch_lr_scale, build_optimizers

ROOT = Path(__file__).resolve().parents[1]
DIST_STEPS = 4


class TinyLM(nn.Module):
    """Stand-in for GPT with what build_optimizers uses: parameter_groups()
    and config.n_embd. Odd sizes on purpose: 37 x 15 entries do not split
    evenly over 2 ranks, and 3 layers leave a short block of same-shaped
    matrices, so the padding paths of both sharded optimizers run."""

    def __init__(self, vocab: int = 37, dim: int = 15, layers: int = 3):
        super().__init__()
        self.config = SimpleNamespace(n_embd=dim)
        self.wte = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "mix": nn.Linear(dim, dim, bias=False),
                    "fc1": nn.Linear(dim, 4 * dim, bias=False),
                    "fc2": nn.Linear(4 * dim, dim, bias=False),
                }
            )
            for _ in range(layers)
        )
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"matrix": list(self.blocks.parameters()), "embedding": [self.wte.weight], "lm_head": [self.lm_head.weight]}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(self.wte(idx), (self.config.n_embd,))
        for block in self.blocks:
            x = x + torch.tanh(block["mix"](x))
            x = x + block["fc2"](F.relu(block["fc1"](F.rms_norm(x, (self.config.n_embd,)))))
        return F.cross_entropy(self.lm_head(x).flatten(0, 1), targets.flatten())


def fresh_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def batches(num_steps: int, per_step: int = 2, vocab: int = 37) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Fixed (inputs, targets) micro-batches: per_step of them for each step."""
    gen = torch.Generator().manual_seed(1234)

    def draw() -> torch.Tensor:
        return torch.randint(vocab, (4, 8), generator=gen)

    return [[(draw(), draw()) for _ in range(per_step)] for _ in range(num_steps)]


def train(model: nn.Module, optimizers, steps, first_step: int = 0) -> None:
    """base_train's protocol: micro-batch losses divided by their count, lr
    and momentum set through the groups before each step."""
    for step, micro_batches in enumerate(steps, start=first_step):
        for x, y in micro_batches:
            (model(x, y) / len(micro_batches)).backward()
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * (1 - 0.1 * step)
                group["weight_decay"] = group["initial_weight_decay"] * (1 - 0.1 * step)
                if "momentum" in group:
                    group["momentum"] = 0.85 + 0.02 * step
            opt.step()
        model.zero_grad(set_to_none=True)


def through_file(obj):
    """What a checkpoint does to a state: torch.save, then a weights_only load."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# Muon as the two recipes set it up; weight decay large enough to matter in a few steps at width 15
RECIPE_OPTIONS = {
    "2026": MuonOptions(weight_decay=0.001),
    "2025-10": MuonOptions(orthogonalizer="newton-schulz", normuon=False, weight_decay=0.0, cautious=False),
}


def resumed_run(steps, split: int, world_size: int = 1, options: MuonOptions = RECIPE_OPTIONS["2026"]) -> TinyLM:
    """Train steps[:split], checkpoint, rebuild everything fresh from it, train the rest."""
    model = fresh_model()
    optimizers = build_optimizers(model, muon=options, world_size=world_size)
    train(model, optimizers, steps[:split])
    model_state, optim_states = through_file((model.state_dict(), [opt.state_dict() for opt in optimizers]))
    model = fresh_model(seed=1)
    model.load_state_dict(model_state)
    optimizers = build_optimizers(model, muon=options, world_size=world_size)
    for opt, state in zip(optimizers, optim_states):
        opt.load_state_dict(state)
    train(model, optimizers, steps[split:], first_step=split)
    return model


def gram_deviation(u: torch.Tensor) -> float:
    """Spectral norm of (U U^T - I) on the small side: 0 for semi-orthogonal U."""
    small = u @ u.mT if u.size(0) <= u.size(1) else u.mT @ u
    return torch.linalg.matrix_norm(small - torch.eye(small.size(0)), ord=2).item()


# ---------------------------------------------------------------- Muon maths


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_is_near_orthogonal(shape, dtype):
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ortho = orthogonalize(grad, "newton-schulz", 5, dtype)
    assert ortho.shape == grad.shape and ortho.dtype == dtype
    ortho = ortho.float()
    singular = torch.linalg.svdvals(ortho)
    assert 0.5 < singular.min() and singular.max() < 1.5
    # The quintic stops at singular values in about [0.68, 1.13], so |s^2 - 1| <= 0.54.
    assert gram_deviation(ortho) < 0.6
    # The bounds mean something: the raw gradient fails them, even rescaled to
    # spectral norm 1 (its singular values then spread over [0.36, 1]).
    assert torch.linalg.svdvals(grad).max() > 1.5
    assert gram_deviation(grad / torch.linalg.matrix_norm(grad, ord=2)) > 0.8


def test_muon_reduces_least_squares_loss():
    gen = torch.Generator().manual_seed(0)
    inputs, target = torch.randn(256, 32, generator=gen), torch.randn(16, 32, generator=gen) / 32**0.5
    weight = nn.Parameter(torch.zeros(16, 32))
    opt = Muon([weight], lr=0.02)

    def loss() -> torch.Tensor:
        return ((inputs @ weight.T - inputs @ target.T) ** 2).mean()

    first = loss().item()
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.1 * first


def test_muon_update_is_scaled_by_aspect_ratio():
    gen = torch.Generator().manual_seed(0)
    tall, wide = nn.Parameter(torch.randn(32, 8, generator=gen)), nn.Parameter(torch.randn(8, 32, generator=gen))
    before = [tall.detach().clone(), wide.detach().clone()]
    for p in (tall, wide):
        p.grad = torch.randn(p.shape, generator=gen)
    # momentum 0, no NorMuon: the update is the orthogonalised gradient itself
    Muon([tall, wide], lr=0.1, momentum=0.0, normuon=False).step()
    assert aspect_scale(tall) == 2.0 and aspect_scale(wide) == 1.0
    ns = newton_schulz_dtype("cpu")
    torch.testing.assert_close(before[0] - tall.detach(), 0.1 * 2.0 * orthogonalize(tall.grad, dtype=ns).float())
    torch.testing.assert_close(before[1] - wide.detach(), 0.1 * orthogonalize(wide.grad, dtype=ns).float())


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)])
def test_polar_express_is_its_longhand_iteration(shape):
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # longhand, on the wide side: X <- a X + b (X X^T) X + c (X X^T)^2 X with the i-th coefficients
    x = grad.T if shape[0] > shape[1] else grad
    x = x / (1.02 * torch.linalg.matrix_norm(x) + 1e-6)
    for a, b, c in muon.POLAR_EXPRESS_COEFFS:
        xxt = x @ x.T
        x = a * x + b * (xxt @ x) + c * (xxt @ (xxt @ x))
    expected = x.T if shape[0] > shape[1] else x
    torch.testing.assert_close(orthogonalize(grad, "polar-express", 5, torch.float64), expected)


def test_polar_express_lands_closer_to_orthogonal_than_the_fixed_quintic():
    grad = torch.randn(128, 512, generator=torch.Generator().manual_seed(0))
    polar = orthogonalize(grad, "polar-express", 5, torch.float32)
    quintic = orthogonalize(grad, "newton-schulz", 5, torch.float32)
    assert gram_deviation(polar) < 0.65 * gram_deviation(quintic)  # measured 0.30 vs 0.54


def test_unknown_orthogonalizer_is_refused():
    with pytest.raises(ValueError, match="polar-express"):
        orthogonalize(torch.ones(2, 2), "svd")
    with pytest.raises(ValueError, match="newton-schulz"):
        Muon([nn.Parameter(torch.zeros(2, 2))], orthogonalizer="svd")


def test_normuon_normalises_rows_by_their_running_second_moment():
    gen = torch.Generator().manual_seed(1)
    update = torch.randn(6, 10, generator=gen, dtype=torch.float64) * torch.arange(1, 7, dtype=torch.float64)[:, None]
    moment = torch.rand(6, 1, generator=gen, dtype=torch.float64)
    # longhand: v <- 0.95 v + 0.05 mean_j(u_ij^2); u_ij / sqrt(v_i); rescaled to the old Frobenius norm
    v = 0.95 * moment + 0.05 * (update**2).sum(dim=1, keepdim=True) / 10
    expected = update / v.sqrt()
    expected = expected * torch.linalg.matrix_norm(update) / torch.linalg.matrix_norm(expected)
    out = normalize_rows_(update.clone(), moment)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(moment, v)


def test_normuon_first_step_gives_every_row_the_same_size():
    gen = torch.Generator().manual_seed(2)
    weight = nn.Parameter(torch.zeros(16, 64))
    weight.grad = torch.randn(16, 64, generator=gen) * torch.linspace(0.1, 10, 16)[:, None]
    Muon([weight], lr=1.0, momentum=0.0, normuon=True, orthogonalizer="newton-schulz").step()
    rows = weight.detach().norm(dim=1)
    assert rows.max() / rows.min() < 1.001  # from a zero buffer every row is divided by its own RMS
    plain = nn.Parameter(torch.zeros(16, 64))
    plain.grad = weight.grad.clone()
    Muon([plain], lr=1.0, momentum=0.0, normuon=False, orthogonalizer="newton-schulz").step()
    plain_rows = plain.detach().norm(dim=1)
    assert plain_rows.max() / plain_rows.min() > 1.05  # without it the quintic leaves rows uneven
    torch.testing.assert_close(weight.detach().norm(), plain.detach().norm())  # same step size overall


@pytest.mark.parametrize("cautious", [True, False])
def test_weight_decay_longhand(cautious):
    gen = torch.Generator().manual_seed(4)
    weight = nn.Parameter(torch.randn(8, 24, generator=gen))
    weight.grad = torch.randn(8, 24, generator=gen)
    before = weight.detach().clone()
    Muon([weight], lr=0.1, momentum=0.0, weight_decay=0.5, normuon=False, cautious=cautious).step()
    update = orthogonalize(weight.grad, "polar-express", 5, newton_schulz_dtype("cpu")).float()
    # longhand: w <- w - lr wd w [u w > 0 if cautious] - lr u
    agree = (update * before > 0).float()
    mask = agree if cautious else torch.ones_like(before)
    expected = before - 0.1 * 0.5 * before * mask - 0.1 * update
    torch.testing.assert_close(weight.detach(), expected)
    assert 0.2 < agree.mean() < 0.8  # both kinds of entry occur, so the mask is tested


def test_a_state_saved_before_the_2026_options_loads_as_the_old_muon():
    weight = nn.Parameter(torch.zeros(4, 4))
    old = Muon([weight]).state_dict()
    for group in old["param_groups"]:
        for key in ("orthogonalizer", "normuon", "cautious"):
            del group[key]
    opt = Muon([weight])
    opt.load_state_dict(old)
    (group,) = opt.param_groups
    assert (group["orthogonalizer"], group["normuon"], group["cautious"]) == ("newton-schulz", False, False)


@pytest.mark.parametrize("native", [True, False])
def test_newton_schulz_runs_in_bf16_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(muon, "cpu_bf16_native", lambda: native)
    assert newton_schulz_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    assert newton_schulz_dtype("mps") == torch.float32  # the CPU's bf16 says nothing about another device


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(4))])


# ---------------------------------------------------------------- build_optimizers


def test_build_optimizers_groups_and_learning_rates():
    model = fresh_model()
    adamw, muon = build_optimizers(model, muon=MuonOptions(weight_decay=0.1))
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    optimized = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(optimized) == sorted(id(p) for p in model.parameters())
    dim_scale = (15 / 768) ** -0.5
    embedding, head = adamw.param_groups
    assert embedding["params"] == [model.wte.weight] and head["params"] == [model.lm_head.weight]
    assert embedding["lr"] == pytest.approx(0.2 * dim_scale) and head["lr"] == pytest.approx(0.004 * dim_scale)
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-10 and adamw.defaults["weight_decay"] == 0
    (matrices,) = muon.param_groups
    # weight decay scales as 1 / width^2 from width 768
    assert len(matrices["params"]) == 9 and matrices["lr"] == 0.02 and matrices["weight_decay"] == pytest.approx(0.1 * (768 / 15) ** 2)
    assert all(g["initial_lr"] == g["lr"] for opt in (adamw, muon) for g in opt.param_groups)
    assert all(g["initial_weight_decay"] == g["weight_decay"] for opt in (adamw, muon) for g in opt.param_groups)
    assert (matrices["orthogonalizer"], matrices["normuon"], matrices["cautious"]) == ("polar-express", True, True)


def test_build_optimizers_scales_every_learning_rate_for_the_batch():
    base = build_optimizers(fresh_model())
    scaled = build_optimizers(fresh_model(), lr_scale=batch_lr_scale(2**17))
    assert batch_lr_scale(2**17) == pytest.approx(0.5) and batch_lr_scale(2**19) == 1.0
    for a, b in zip(base, scaled):
        for ga, gb in zip(a.param_groups, b.param_groups):
            assert gb["lr"] == pytest.approx(0.5 * ga["lr"])


def test_muon_options_refuse_bad_values():
    with pytest.raises(ValueError, match="orthogonalizer"):
        MuonOptions(orthogonalizer="qr")
    with pytest.raises(ValueError, match="weight decay"):
        MuonOptions(weight_decay=-1)


def test_build_optimizers_rejects_incomplete_groups():
    model = fresh_model()
    model.parameter_groups = lambda: {"matrix": [], "embedding": [model.wte.weight], "lm_head": [model.lm_head.weight]}
    with pytest.raises(ValueError, match="exactly once"):
        build_optimizers(model)


def test_build_optimizers_distributed_needs_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        build_optimizers(fresh_model(), world_size=2)


@pytest.mark.parametrize("recipe", RECIPE_OPTIONS)
def test_state_dict_round_trip_continues_bit_identically(recipe):
    steps = batches(5)
    uninterrupted = fresh_model()
    train(uninterrupted, build_optimizers(uninterrupted, muon=RECIPE_OPTIONS[recipe]), steps)
    resumed = resumed_run(steps, split=3, options=RECIPE_OPTIONS[recipe])
    for (name, a), b in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_with_real_gpt():
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    optimizers = build_optimizers(model)
    assert sum(len(g["params"]) for g in optimizers[1].param_groups) == 2 * 6
    x = torch.randint(64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(10):
        loss = model(x, x)  # copying the input is learnable: the loss must fall fast
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------- two gloo ranks

DIST_SCRIPT = """
    import sys
    import torch
    sys.path.insert(0, "tests")
    from test_optim import DIST_STEPS, RECIPE_OPTIONS, batches, fresh_model, resumed_run, train
    from nanochat.common import compute_cleanup, compute_init
    from nanochat.optim import DistAdamW, build_optimizers
    from nanochat.muon import DistMuon

    info = compute_init("cpu")
    out, options = sys.argv[1], RECIPE_OPTIONS[sys.argv[2]]
    # each rank takes its own micro-batch of every step, loss undivided
    steps = [[micro[info.rank]] for micro in batches(DIST_STEPS)]
    model = fresh_model()
    optimizers = build_optimizers(model, muon=options, world_size=info.world_size)
    assert [type(o) for o in optimizers] == [DistAdamW, DistMuon]
    train(model, optimizers, steps)
    torch.save(model.state_dict(), f"{out}/rank{info.rank}.pt")
    resumed = resumed_run(steps, split=2, world_size=info.world_size, options=options)
    torch.save(resumed.state_dict(), f"{out}/rank{info.rank}_resumed.pt")
    compute_cleanup()
"""


@pytest.mark.parametrize("recipe", ["2026", pytest.param("2025-10", marks=pytest.mark.slow)])  # the old recipe: slow set
def test_two_ranks_match_single_process_grad_accumulation(tmp_path, recipe):
    script = tmp_path / "dist_train.py"
    script.write_text(textwrap.dedent(DIST_SCRIPT))
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path), recipe],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[:4000] + "\n...\n" + run.stderr[-2000:]  # a rank's own traceback comes first
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    resumed = [torch.load(tmp_path / f"rank{r}_resumed.pt", weights_only=True) for r in range(2)]
    single = fresh_model()
    train(single, build_optimizers(single, muon=RECIPE_OPTIONS[recipe]), batches(DIST_STEPS))  # grad accumulation 2 over the same micro-batches
    for name, expected in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
        assert all(torch.equal(ranks[r][name], resumed[r][name]) for r in range(2)), f"resume changed {name}"
        torch.testing.assert_close(ranks[0][name], expected, rtol=1e-5, atol=1e-5, msg=f"{name} differs")
