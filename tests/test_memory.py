"""Memory measurement: the fake-tensor step against the same step on real
CPU tensors, its parts against hand arithmetic from the config, how it moves
with batch, dtype and ranks, the CLI, the /proc readers with fixture files,
unified-memory detection (through a fake nvidia-smi), and the verdict with
its power-of-two batch suggestion."""

from __future__ import annotations

import math
import re
import stat
import time
from pathlib import Path

import pytest
import torch

from nanochat import ops
from nanochat.fake_step import track_training_peak
from nanochat.gpt import GPT, GPTConfig, build_model, config_for_depth
from nanochat.memory import (
    BATCH_FLAG,
    FIXED_OVERHEAD_BYTES,
    GIB,
    DROP_CACHES,
    _unified_gpu,
    available_memory,
    choose_device_batch,
    describe,
    explain_out_of_memory,
    is_unified_memory,
    largest_fitting_batch,
    main,
    measure_training_memory,
    memory_in_use,
    nvidia_smi_memory_total,
    peak_memory_line,
    power_of_two_divisors_below,
    process_rss,
    read_kib_fields,
    unified_available,
)
from nanochat.optim import build_optimizers

CPU = torch.device("cpu")
SMALL = config_for_depth(4, 8192, max_seq_len=256)  # 256 wide, 2 heads of 128
# Depth 4 but 128 wide, for the real-tensor runs: this CPU has no bf16 matmul
# instructions, and SMALL's real bf16 step takes ~100 s on it.
NARROW = config_for_depth(4, 1024, aspect_ratio=32, max_seq_len=64)
TINY = GPTConfig(sequence_len=64, vocab_size=1000, n_layer=2, n_head=4, n_kv_head=1, n_embd=128)  # GQA


MEMINFO = """\
MemTotal:       130841280 kB
MemFree:        100000000 kB
MemAvailable:   120000000 kB
Buffers:           12345 kB
Cached:         41000000 kB
Active(file):   10000000 kB
Inactive(file): 30000000 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""

STATUS = """\
Name:\tpython
State:\tR (running)
VmPeak:\t 9000000 kB
VmRSS:\t  2500000 kB
Threads:\t4
"""


# ---------------------------------------------------------------- the measurement


def tensor_bytes(estimate) -> int:
    return estimate.total - estimate.overhead


def real_peak(config: GPTConfig, batch: int, dtype: torch.dtype, checkpoint_blocks: bool = False) -> int:
    """The same steps under MemTracker, on a model that really exists on the CPU."""
    model = build_model(config, CPU)
    model.compute_dtype, model.checkpoint_blocks = dtype, checkpoint_blocks
    return sum(track_training_peak(model, build_optimizers(model, world_size=1), batch, config.sequence_len).values())


def test_the_estimate_chunks_the_head_as_a_gpu_does():
    """The fake tensors live on the CPU, whose head chunks are smaller (ops.CPU_HEAD_CHUNK_ELEMENTS);
    the estimate plans GPU runs, so it holds the GPU's chunk: here all 4,096 rows at once."""
    estimate = measure_training_memory(SMALL, 16, 256, torch.float32)
    one_chunk = 16 * 256 * SMALL.vocab_size * 4  # fp32 (rows, V)
    assert estimate.activations >= 2 * one_chunk  # the squashed logits and their exp
    assert ops.CPU_HEAD_CHUNK_ELEMENTS == 2**22  # and the CPU's cap is back afterwards


@pytest.mark.parametrize("dtype, checkpoint_blocks", [
    pytest.param(torch.float32, False, id="fp32"),
    pytest.param(torch.bfloat16, False, id="bf16"),
    pytest.param(torch.float32, True, id="fp32-recompute"),
])
def test_fake_tensors_measure_what_real_tensors_hold(dtype, checkpoint_blocks):
    fake = measure_training_memory(NARROW, 4, NARROW.sequence_len, dtype, checkpoint_blocks=checkpoint_blocks)
    assert tensor_bytes(fake) == pytest.approx(real_peak(NARROW, 4, dtype, checkpoint_blocks), rel=0.1)


def test_activation_checkpointing_keeps_fewer_activations():
    kept, recomputed = (measure_training_memory(SMALL, 8, SMALL.sequence_len, torch.float32, checkpoint_blocks=recompute)
                        for recompute in (False, True))
    assert recomputed.activations < kept.activations and recomputed.parameters == kept.parameters
    assert "activation checkpointing" in describe(recomputed)


def optimizer_state_bytes(config: GPTConfig) -> tuple[int, int]:
    """(parameter count, optimizer state bytes) by hand from the config: AdamW
    keeps 2 fp32 moments of the embedding and lm_head (and a 4-byte step
    counter for each of the two), Muon 1 fp32 momentum per block matrix and
    NorMuon's fp32 second moment per matrix row."""
    c = config
    adamw = 2 * c.vocab_size * c.n_embd
    attention = c.n_embd * (2 * c.n_head + 2 * c.n_kv_head) * c.head_dim  # q, o and k, v
    muon = c.n_layer * (attention + 2 * 4 * c.n_embd * c.n_embd)  # + the MLP's two 4x matrices
    rows = c.n_layer * ((c.n_head + 2 * c.n_kv_head) * c.head_dim + c.n_embd + 4 * c.n_embd + c.n_embd)  # q k v o fc1 fc2
    return adamw + muon, 2 * 4 * adamw + 2 * 4 + 4 * muon + 4 * rows


@pytest.mark.parametrize("config, batch", [(SMALL, 8), (TINY, 8)], ids=["d4", "gqa"])
@pytest.mark.parametrize("world_size", [1, 8])
def test_parts_add_up_and_match_hand_arithmetic(config, batch, world_size):
    est = measure_training_memory(config, batch, config.sequence_len, torch.float32, world_size)
    assert est.total == sum(est.parts().values())
    assert list(est.parts()) == ["parameters", "gradients", "optimizer", "activations", "temporaries", "overhead"]
    params, optimizer = optimizer_state_bytes(config)
    # fp32 master weights; every gradient is held, as the peak is in the second micro-batch
    assert est.parameters == est.gradients == 4 * params
    assert est.optimizer == math.ceil(optimizer / world_size)
    assert est.overhead == FIXED_OVERHEAD_BYTES


def test_d4_hand_arithmetic():
    # embedding and head 2 x 8192 x 256 = 4,194,304; blocks 4 x 12 x 256^2 = 3,145,728;
    # rows 4 x (3 + 1 + 4 + 1) x 256 = 9,216
    assert optimizer_state_bytes(SMALL) == (7_340_032, 8 * 4_194_304 + 8 + 4 * 3_145_728 + 4 * 9_216)


def test_peak_grows_with_batch():
    totals = [measure_training_memory(TINY, b, TINY.sequence_len, torch.float32).total for b in (2, 4, 8)]
    assert totals[0] < totals[1] < totals[2]


def test_bf16_activations_are_smaller_than_fp32():
    fp32, bf16 = (measure_training_memory(SMALL, 8, SMALL.sequence_len, dtype) for dtype in (torch.float32, torch.bfloat16))
    assert bf16.activations < fp32.activations
    assert bf16.parameters == fp32.parameters  # master weights stay fp32


def test_rl_stage_measures_the_weighted_loss():
    est = measure_training_memory(TINY, 4, TINY.sequence_len, torch.float32, stage="rl")
    assert est.stage == "rl" and est.activations > 0


def test_measurements_are_cached(monkeypatch):
    import nanochat.fake_step

    calls = []
    measure = nanochat.fake_step.measure_fake_step
    monkeypatch.setattr(nanochat.fake_step, "measure_fake_step", lambda *a: calls.append(a) or measure(*a))
    first = measure_training_memory(TINY, 3, 48, torch.float32)
    again = measure_training_memory(TINY, 3, 48, torch.float32, world_size=2)  # same measurement, sharded after
    assert len(calls) == 1
    assert first.with_batch_size(3) == first and again.optimizer == math.ceil(first.optimizer / 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(device_batch_size=0), "device_batch_size"),
    (dict(world_size=0), "world_size"),
    (dict(stage="pretrain"), "unknown stage"),
    (dict(dtype=torch.int64), "floating-point"),
])
def test_bad_arguments_are_refused(kwargs, match):
    args = dict(config=TINY, device_batch_size=2, seq_len=64, dtype=torch.float32) | kwargs
    with pytest.raises(ValueError, match=match):
        measure_training_memory(**args)


@pytest.mark.slow
def test_depth20_is_measured_in_reasonable_time():
    d20 = config_for_depth(20, 65536)  # 1280 wide, 10 heads: nanochat's d20
    start = time.perf_counter()
    est = measure_training_memory(d20, 32, 2048, torch.bfloat16)
    assert time.perf_counter() - start < 120  # seconds; about 12 on one CPU core
    # embedding and head 2 x 65536 x 1280 = 167,772,160; blocks 20 x 12 x 1280^2 = 393,216,000;
    # NorMuon's rows 20 x (3 + 1 + 4 + 1) x 1280 = 230,400
    assert est.parameters == est.gradients == 4 * (167_772_160 + 393_216_000)
    assert est.optimizer == 8 * 167_772_160 + 8 + 4 * 393_216_000 + 4 * 230_400
    # activations dominate at 64K tokens per micro-batch, whatever the model keeps
    assert est.activations > est.parameters + est.gradients + est.optimizer


# ---------------------------------------------------------------- the command line


def test_cli_prints_the_peak_first_then_the_parts(capsys):
    assert main(["--depth", "2", "--batch-size", "2", "--seq-len", "64", "--vocab-size", "1000", "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"peak \d+\.\d GiB", lines[0])
    assert [line.split()[0] for line in lines[1:7]] == [
        "parameters", "gradients", "optimizer", "activations", "temporaries", "overhead"]
    assert all(line.endswith(" GiB") for line in lines[1:7])
    assert re.match(r"measured in \d+\.\d s", lines[7])


def test_cli_refuses_bad_sizes(capsys):
    assert main(["--depth", "2", "--batch-size", "0"]) == 2
    assert "device_batch_size" in capsys.readouterr().err


# ---------------------------------------------------------------- what the machine has


def test_meminfo_fields_are_read_in_bytes(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    fields = read_kib_fields(path)
    assert fields["MemAvailable"] == 120_000_000 * 1024
    assert fields["Hugepagesize"] == 2048 * 1024
    assert "HugePages_Total" not in fields  # a count, not a size


def test_cpu_available_memory_is_memavailable(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    free, source = available_memory(CPU, meminfo=path)
    assert free == 120_000_000 * 1024
    assert "MemAvailable" in source and str(path) in source


def test_old_kernel_without_memavailable_falls_back_to_memfree(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO.replace("MemAvailable:   120000000 kB\n", ""))
    free, source = available_memory(CPU, meminfo=path)
    assert free == 100_000_000 * 1024 and "MemFree" in source


def test_no_meminfo_means_unknown_and_unchecked(tmp_path):
    available = available_memory(CPU, meminfo=tmp_path / "missing")
    assert available[0] is None
    batch, lines = choose_device_batch(TINY, 2, 64, torch.float32, 1, available)
    assert batch == 2 and "not checked" in lines[-1]


def test_cpu_usage_is_the_process_rss(tmp_path):
    path = tmp_path / "status"
    path.write_text(STATUS)
    use = memory_in_use(CPU, status=path)
    assert (use.used, use.source) == (2_500_000 * 1024, f"VmRSS in {path}")
    assert use.metrics() == {"memory_gib": 2_500_000 / 2**20}  # no torch figures on the CPU
    assert peak_memory_line(CPU, GIB) is None
    assert process_rss()[0] > 0  # this process's real /proc/self/status


def test_unified_memory_does_not_count_the_page_cache_as_free(tmp_path):
    """MemAvailable (120,000,000 kB) counts the 40,000,000 kB of file pages as reclaimable; the GPU
    cannot count on them, so they are taken out, and the message says how to free them."""
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    free, source = unified_available(path)
    assert free == 80_000_000 * 1024
    assert "38.1 GiB of page cache" in source and DROP_CACHES in source


def test_unified_memory_on_a_kernel_without_file_lru_fields_is_memfree(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO.replace("Active(file):   10000000 kB\n", ""))
    free, source = unified_available(path)
    assert free == 100_000_000 * 1024 and "MemFree" in source


@pytest.mark.parametrize("name, machine, smi_total, unified", [
    ("NVIDIA GB10", "aarch64", "[N/A]", True),
    ("NVIDIA GB10", "aarch64", None, True),
    ("NVIDIA Thor", "aarch64", "[N/A]", True),
    ("NVIDIA Thor", "aarch64", "[Not Supported]", True),
    ("NVIDIA GH200 480GB", "aarch64", "97871", False),
    ("NVIDIA Thor", "aarch64", None, False),  # no nvidia-smi: no evidence either way
    ("NVIDIA H100 80GB HBM3", "x86_64", "81559", False),
    ("NVIDIA H100 80GB HBM3", "x86_64", "[N/A]", False),
])
def test_unified_memory_detection(name, machine, smi_total, unified):
    assert is_unified_memory(name, machine, smi_total) is unified


def fake_nvidia_smi(folder: Path, output: str, exit_code: int = 0) -> None:
    """An executable `nvidia-smi` printing `output`; each call appends a line to `calls` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho called >> '{folder / 'calls'}'\nprintf '%s' '{output}'\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def nvidia_smi_calls(folder: Path) -> int:
    calls = folder / "calls"
    return len(calls.read_text().splitlines()) if calls.exists() else 0


@pytest.mark.parametrize("output, exit_code, expected", [("[N/A]\n", 0, "[N/A]"), ("81559\n", 0, "81559"), ("failed", 9, None)])
def test_nvidia_smi_memory_total(tmp_path, monkeypatch, output, exit_code, expected):
    fake_nvidia_smi(tmp_path, output, exit_code)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert nvidia_smi_memory_total(0) == expected


def test_nvidia_smi_memory_total_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert nvidia_smi_memory_total(0) is None


@pytest.fixture
def fake_cuda(tmp_path, monkeypatch):
    """torch.cuda answering as a GPU named by the test would, with 3 GiB held by torch,
    and nvidia-smi printing a given memory.total; set .name, .machine, .smi_total."""
    gpu = type("FakeGpu", (), {})()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: gpu.name)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 6 * GIB)
    _unified_gpu.cache_clear()  # each test names its own GPU
    monkeypatch.setattr("platform.machine", lambda: gpu.machine)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))

    def configure(name: str, machine: str, smi_total: str) -> torch.device:
        gpu.name, gpu.machine = name, machine
        fake_nvidia_smi(tmp_path / "bin", smi_total)
        return torch.device("cuda", 0)

    yield configure
    _unified_gpu.cache_clear()  # no fake GPU's answer outlives its test


def test_gb10_available_memory_leaves_out_the_page_cache_and_adds_what_torch_holds(tmp_path, fake_cuda):
    device = fake_cuda("NVIDIA GB10", "aarch64", "[N/A]\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    free, source = available_memory(device, meminfo=meminfo)
    assert free == 80_000_000 * 1024 + 3 * GIB
    assert "page cache" in source and "unified" in source


def test_gpu_usage_is_the_drivers_figure_with_torchs_allocated_and_reserved(fake_cuda):
    """Not the process RSS, which on a GB10 leaves out the pages cudaMalloc maps."""
    for name, machine, whose in (("NVIDIA GB10", "aarch64", "the whole machine's"),
                                 ("NVIDIA H100 80GB HBM3", "x86_64", "every process on the GPU")):
        device = fake_cuda(name, machine, "[N/A]\n")
        use = memory_in_use(device)
        assert (use.used, use.allocated, use.reserved) == (10 * GIB, 2 * GIB, 3 * GIB)
        assert "cudaMemGetInfo of 80.0 GiB" in use.source and whose in use.source
        assert use.metrics() == {"memory_gib": 10.0, "allocated_gib": 2.0, "reserved_gib": 3.0}
        assert "2.0 GiB allocated, 3.0 GiB reserved" in use.describe()
        _unified_gpu.cache_clear()


def test_the_first_steps_peaks_stand_next_to_the_estimate(fake_cuda):
    line = peak_memory_line(fake_cuda("NVIDIA H100 80GB HBM3", "x86_64", "81559\n"), 7 * GIB)
    assert "5.0 GiB allocated, 6.0 GiB reserved (torch); estimated 7.0 GiB; in use now 10.0 GiB" in line


def test_discrete_gpu_available_memory_is_free_plus_what_torch_holds(fake_cuda):
    device = fake_cuda("NVIDIA H100 80GB HBM3", "x86_64", "81559\n")
    free, source = available_memory(device)
    assert free == 73 * GIB and "80.0 GiB" in source


def test_nvidia_smi_is_asked_once_however_often_memory_is_read(tmp_path, fake_cuda):
    """The training loop reads memory at every logged step; nvidia-smi (a subprocess) answered the
    unified-memory question at each of them, synchronously on rank 0."""
    device = fake_cuda("NVIDIA Thor", "aarch64", "[N/A]\n")  # a name that needs nvidia-smi's answer
    for _ in range(20):
        memory_in_use(device)
    available_memory(device, meminfo=tmp_path / "missing")
    peak_memory_line(device, None)
    assert nvidia_smi_calls(tmp_path / "bin") == 1
    assert "whole machine" in memory_in_use(device).source  # and the one answer is used


# ---------------------------------------------------------------- after an out-of-memory error


def test_out_of_memory_on_a_discrete_gpu_names_half_the_batch(tmp_path, fake_cuda):
    device = fake_cuda("NVIDIA H100 80GB HBM3", "x86_64", "81559\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    message = explain_out_of_memory(device, 32, meminfo=meminfo)
    assert message.startswith(f"out of memory at {BATCH_FLAG} 32; run again with {BATCH_FLAG} 16")
    assert "page cache" not in message
    assert f"not even {BATCH_FLAG} 1 fits" in explain_out_of_memory(CPU, 1, meminfo=meminfo)


def test_out_of_memory_on_unified_memory_full_of_page_cache_says_drop_it_first(tmp_path, fake_cuda):
    device = fake_cuda("NVIDIA GB10", "aarch64", "[N/A]\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    message = explain_out_of_memory(device, 32, estimate=60 * GIB, meminfo=meminfo)
    assert "38.1 GiB" in message and DROP_CACHES in message
    assert message.index(DROP_CACHES) < message.index(f"{BATCH_FLAG} 16")  # the cache first, the batch if that fails


def test_out_of_memory_on_unified_memory_blames_the_batch_when_the_cache_would_not_help(tmp_path, fake_cuda):
    device = fake_cuda("NVIDIA GB10", "aarch64", "[N/A]\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    too_big = explain_out_of_memory(device, 32, estimate=200 * GIB, meminfo=meminfo)  # > MemAvailable + held
    assert "page cache" not in too_big and f"{BATCH_FLAG} 16" in too_big
    meminfo.write_text(MEMINFO.replace("Inactive(file): 30000000 kB", "Inactive(file):      1000 kB")
                              .replace("Active(file):   10000000 kB", "Active(file):        1000 kB"))
    little_cache = explain_out_of_memory(device, 32, meminfo=meminfo)
    assert "page cache" not in little_cache and f"{BATCH_FLAG} 16" in little_cache


# ---------------------------------------------------------------- the verdict


def tiny(batch: int):
    return measure_training_memory(TINY, batch, TINY.sequence_len, torch.float32)


def room_for(batch: int, margin: float = 0.9) -> tuple[int, str]:
    """Available memory in which `batch` just fits with `margin`."""
    return math.ceil(tiny(batch).total / margin), "MemAvailable"


@pytest.mark.parametrize("batch, divisors", [(32, [1, 2, 4, 8, 16]), (24, [1, 2, 4, 8]), (7, [1]), (1, [])])
def test_power_of_two_divisors_below(batch, divisors):
    assert power_of_two_divisors_below(batch) == divisors


def verdict(batch: int, available: tuple[int, str], margin: float = 0.9) -> tuple[int | None, list[str]]:
    return choose_device_batch(TINY, batch, TINY.sequence_len, torch.float32, 1, available, margin=margin)


def test_a_run_that_fits_says_so_with_every_part():
    batch, lines = verdict(8, (120 * GIB, "MemAvailable in /proc/meminfo"))
    message = "\n".join(lines)
    assert batch == 8
    for part in ("parameters", "gradients", "optimizer", "activations", "temporaries", "overhead"):
        assert part in message
    assert "MemAvailable in /proc/meminfo" in message and message.endswith("fits")


def test_margin_is_applied():
    room = (int(tiny(8).total / 0.95), "x")
    assert verdict(8, room, margin=0.9)[0] != 8
    assert verdict(8, room, margin=1.0)[0] == 8


def test_margin_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="margin"):
        verdict(8, (120 * GIB, "x"), margin=1.5)


def test_short_memory_picks_a_smaller_power_of_two_that_divides():
    batch, lines = choose_device_batch(TINY, 8, TINY.sequence_len, torch.float32, 1, room_for(4))
    assert batch == 4
    assert f"{BATCH_FLAG} 4 would" in lines[-1]
    assert tiny(4).total <= 0.9 * room_for(4)[0] < tiny(8).total


def test_suggestions_keep_the_total_batch_divisible():
    # 12 rows would fit, but of 24's divisors only the powers of two count: 8
    assert largest_fitting_batch(measure_training_memory(TINY, 24, 64, torch.float32), tiny(12).total) == 8


def test_nothing_fits_says_what_else_to_change():
    batch, lines = choose_device_batch(TINY, 4, TINY.sequence_len, torch.float32, 1, (GIB, "free GPU memory"))
    assert batch is None
    assert f"{BATCH_FLAG} 1" in lines[-1] and "--depth" in lines[-1]


def test_a_batch_that_fits_is_kept():
    batch, lines = choose_device_batch(TINY, 8, TINY.sequence_len, torch.float32, 1, (120 * GIB, "MemAvailable"))
    assert batch == 8 and lines[-1] == "fits"
