"""What the training loop asks of the GPU tools: a short real TrainLoop run on the CPU, with a fake
nvidia-smi on PATH, starts it a bounded number of times however many steps it trains; the energy it
saves with its checkpoints is the job's, and a resumed run adds to it."""

from __future__ import annotations

import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import load_checkpoint
from nanochat.common import DistInfo
from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import build_optimizers
from nanochat.training import LoopSettings, Resumed, TrainLoop

WATTS = 60.0


@pytest.fixture
def nvidia_smi(tmp_path, monkeypatch) -> Path:
    """A fake nvidia-smi first on PATH that answers power.draw (once, or every 20 ms given --loop-ms) and
    memory.total as a GB10 does, appending a line to `calls` at each start; no pynvml importable."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, time
        with open({str(folder / "calls")!r}, "a") as log:
            log.write(" ".join(sys.argv[1:]) + "\\n")
        if "--query-gpu=memory.total" in sys.argv:
            print("[N/A]")
            sys.exit(0)
        loop = any(arg.startswith("--loop-ms=") for arg in sys.argv)
        while True:
            print({WATTS}, flush=True)
            if not loop:
                sys.exit(0)
            time.sleep(0.02)
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return folder / "calls"


def train(tag_dir: Path, steps: int, step_seconds: float, resumed: Resumed | None = None) -> TrainLoop:
    """A one-layer model trained for `steps` steps on the CPU, each step made to last `step_seconds`."""
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=1, n_kv_head=1, n_embd=16), "cpu")
    batch = torch.randint(32, (2, 8), generator=torch.Generator().manual_seed(0))

    class Batches:
        def __next__(self):
            return batch, batch

        def state_dict(self):
            return {}

    loop = TrainLoop(model=model, optimizers=build_optimizers(model), batches=Batches(),
                     settings=LoopSettings(num_iterations=steps, grad_accum_steps=1),
                     info=DistInfo(False, 0, 0, 1, torch.device("cpu")), tag_dir=tag_dir, meta={},
                     loss_fn=lambda m, b: time.sleep(step_seconds) or m(*b), resumed=resumed)
    assert loop.run() == 0
    return loop


def test_nvidia_smi_starts_a_bounded_number_of_times_however_many_steps(nvidia_smi, base_dir, one_torch_thread):
    """Once spawned per sample (every second) and per logged step's memory reading; now one reading
    to detect the sensor and one looping process for the whole run."""
    train(base_dir / "short", steps=2, step_seconds=0.0)
    short = len(nvidia_smi.read_text().splitlines())
    nvidia_smi.unlink()
    train(base_dir / "long", steps=12, step_seconds=0.25)  # 3 s: three of the meter's 1 s samples
    long = len(nvidia_smi.read_text().splitlines())
    assert short == long <= 2, nvidia_smi.read_text()


def test_the_saved_energy_is_the_jobs_and_a_resume_adds_to_it(nvidia_smi, base_dir, one_torch_thread):
    first = train(base_dir / "job", steps=4, step_seconds=0.4)
    saved = load_checkpoint(base_dir / "job").meta["energy_kwh"]
    assert saved == pytest.approx(WATTS * first.timer.elapsed / 3.6e6, rel=0.5)  # 60 W over the ~1.6 s of training
    resumed = train(base_dir / "job", steps=8, step_seconds=0.4, resumed=Resumed(4, None, {"energy_kwh": saved}))
    total = load_checkpoint(base_dir / "job").meta["energy_kwh"]
    assert total - saved == pytest.approx(WATTS * resumed.timer.elapsed / 3.6e6, rel=0.5)  # the earlier energy once
    assert resumed.energy_items()["energy (kWh)"] == total
