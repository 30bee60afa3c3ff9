"""Energy metering: trapezoid integration, the NVML and nvidia-smi sensors
(through a fake pynvml module and a fake nvidia-smi executable, started once
and left looping), unknown energy staying unknown, a sensor failing mid-run,
the sum over two torchrun "nodes" (gloo), and the cost arithmetic."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

from nanochat.energy import (
    EnergyReport,
    NvidiaSmiPower,
    PowerMeter,
    SensorError,
    cost_usd,
    depreciation_usd,
    detect_power_source,
    format_energy,
    sum_over_nodes,
)
from two_ranks import free_port

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedPower:
    """Returns the given readings in turn; an Exception in the list is raised instead."""

    description = "scripted"

    def __init__(self, readings):
        self.readings = list(readings)
        self.calls = 0

    def read_watts(self) -> float:
        self.calls += 1
        value = self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]
        if isinstance(value, Exception):
            raise value
        return value

    def close(self) -> None:
        self.closed = True


def sample_at(meter: PowerMeter, clock: FakeClock, times) -> None:
    for t in times:
        clock.now = t
        meter.sample()


def fake_nvidia_smi(folder: Path, output: str, exit_code: int = 0) -> Path:
    """An executable `nvidia-smi` that prints `output` and exits, or, given --loop-ms, prints it every 20 ms
    until stopped, as the real one does; each start appends a line "<pid> <arguments>" to `args`."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import os, sys, time
        with open({str(folder / "args")!r}, "a") as log:
            log.write(f"{{os.getpid()}} {{' '.join(sys.argv[1:])}}\\n")
        loop = any(arg.startswith("--loop-ms=") for arg in sys.argv) and {exit_code} == 0
        while True:
            sys.stdout.write({output!r})
            sys.stdout.flush()
            if not loop:
                sys.exit({exit_code})
            time.sleep(0.02)
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def starts(folder: Path) -> list[tuple[int, str]]:
    """(pid, arguments) of each start of the fake nvidia-smi in `folder`."""
    lines = (folder / "args").read_text().splitlines()
    return [(int(pid), arguments) for pid, _, arguments in (line.partition(" ") for line in lines)]


@pytest.fixture
def only_fake_gpu_tools(tmp_path, monkeypatch) -> Path:
    """PATH with nothing but a folder for a fake nvidia-smi, and no pynvml importable."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return bin_dir


# ---------------------------------------------------------------- integration


def test_constant_power_integrates_to_exact_energy():
    clock = FakeClock()
    meter = PowerMeter(ScriptedPower([100.0]), clock=clock)
    sample_at(meter, clock, [0, 1, 2, 3, 3600])  # uneven spacing: the trapezoid uses real timestamps
    assert meter.kwh == pytest.approx(0.1)  # 100 W for one hour
    assert meter.mean_watts == pytest.approx(100.0)


def test_ramp_integrates_by_trapezoid():
    clock = FakeClock()
    meter = PowerMeter(ScriptedPower([0.0, 100.0, 200.0]), clock=clock)
    sample_at(meter, clock, [0, 10, 20])
    # area under 0 -> 200 W over 20 s, linear: 2000 J
    assert meter.kwh == pytest.approx(2000 / 3.6e6)
    assert meter.mean_watts == pytest.approx(100.0)


def test_energy_is_unknown_until_two_readings():
    clock = FakeClock()
    meter = PowerMeter(ScriptedPower([100.0]), clock=clock)
    assert meter.kwh is None and meter.mean_watts is None
    sample_at(meter, clock, [0])
    assert meter.kwh is None


def test_failed_reading_is_bridged_and_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("nanochat"), "propagate", True)  # setup_logging() may have turned it off
    clock = FakeClock()
    source = ScriptedPower([100.0, RuntimeError("NVML gone"), RuntimeError("NVML gone"), 100.0])
    meter = PowerMeter(source, clock=clock)
    with caplog.at_level(logging.WARNING, logger="nanochat.energy"):
        sample_at(meter, clock, [0, 1, 2, 3])
    assert meter.kwh == pytest.approx(300 / 3.6e6)  # 100 W across the gap
    assert [r.getMessage().count("NVML gone") for r in caplog.records] == [1]


def test_sensor_that_disappears_ends_the_count_without_raising():
    clock = FakeClock()
    meter = PowerMeter(ScriptedPower([120.0, 120.0, SensorError("[N/A]")]), clock=clock)
    sample_at(meter, clock, [0, 10, 20, 30, 40])
    assert meter.kwh == pytest.approx(1200 / 3.6e6)
    assert meter.mean_watts == pytest.approx(120.0)


def test_background_thread_samples_until_stopped():
    source = ScriptedPower([50.0])
    meter = PowerMeter(source, interval=0.01).start()
    time.sleep(0.1)
    meter.stop()
    calls = source.calls
    time.sleep(0.05)
    assert source.calls == calls >= 3  # sampled repeatedly, and not after stop()
    assert meter.mean_watts == pytest.approx(50.0)
    assert 0 < meter.kwh <= 50.0 * meter.seconds / 3.6e6  # readings cover at most the wall time
    meter.stop()  # a second stop is harmless


def test_thread_survives_a_source_that_always_fails():
    meter = PowerMeter(ScriptedPower([OSError("sensor gone")]), interval=0.01).start()
    time.sleep(0.05)
    meter.stop()
    assert meter.kwh is None
    assert meter.seconds > 0


def test_no_sensor_means_unknown_energy_not_zero():
    meter = PowerMeter(None).start()
    meter.stop()
    assert meter.kwh is None and meter.mean_watts is None
    assert format_energy(meter.kwh, cost_usd(meter.kwh)) == "n/a"


# ---------------------------------------------------------------- sensors


def test_nvidia_smi_readings_are_summed_over_gpus(only_fake_gpu_tools):
    fake_nvidia_smi(only_fake_gpu_tools, "95.50\n20.25\n")
    source = detect_power_source()
    assert isinstance(source, NvidiaSmiPower)
    try:
        assert source.read_watts() == pytest.approx(115.75)  # the looping nvidia-smi's first reading
    finally:
        source.close()
    assert "--query-gpu=power.draw" in (only_fake_gpu_tools / "args").read_text()


def test_nvidia_smi_asks_only_for_the_visible_gpus(only_fake_gpu_tools, monkeypatch):
    fake_nvidia_smi(only_fake_gpu_tools, "95.50\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    source = detect_power_source()
    try:
        assert source.read_watts() == pytest.approx(95.5)
    finally:
        source.close()
    assert "--id=1" in (only_fake_gpu_tools / "args").read_text()


@pytest.mark.parametrize("output", ["[N/A]\n", "95.50\n[Not Supported]\n", ""])
def test_nvidia_smi_without_a_reading_means_no_sensor(only_fake_gpu_tools, output):
    fake_nvidia_smi(only_fake_gpu_tools, output)
    assert detect_power_source() is None
    meter = PowerMeter.autodetect().start()
    meter.stop()
    assert meter.kwh is None
    assert format_energy(meter.kwh, cost_usd(meter.kwh)) == "n/a"


def test_failing_nvidia_smi_means_no_sensor(only_fake_gpu_tools):
    fake_nvidia_smi(only_fake_gpu_tools, "NVIDIA-SMI has failed", exit_code=9)
    assert detect_power_source() is None


def test_missing_nvidia_smi_means_no_sensor(only_fake_gpu_tools):
    assert detect_power_source() is None


def test_one_looping_nvidia_smi_serves_every_reading_and_stops_with_the_meter(only_fake_gpu_tools):
    fake_nvidia_smi(only_fake_gpu_tools, "95.50\n20.25\n")
    meter = PowerMeter.autodetect(interval=0.02).start()
    time.sleep(0.5)  # some 25 readings
    meter.stop()
    (_, first), (loop_pid, looping) = starts(only_fake_gpu_tools)  # exactly two starts, or this unpacking fails
    assert "--loop-ms" not in first and "--loop-ms=20" in looping
    assert meter.mean_watts == pytest.approx(115.75)
    with pytest.raises(ProcessLookupError):
        os.kill(loop_pid, 0)  # stopped and reaped


def test_looping_nvidia_smi_that_dies_mid_run_ends_the_count_without_raising(only_fake_gpu_tools):
    fake_nvidia_smi(only_fake_gpu_tools, "100.0\n")
    clock = FakeClock()
    meter = PowerMeter(NvidiaSmiPower(str(only_fake_gpu_tools / "nvidia-smi"), interval=0.02, timeout=0.3), clock=clock)
    sample_at(meter, clock, [0, 10])  # the one-off reading, then the loop's first
    os.kill(starts(only_fake_gpu_tools)[1][0], signal.SIGKILL)  # as a driver reinstall would end it
    time.sleep(0.6)  # past interval + timeout: its last reading is stale
    sample_at(meter, clock, [20])
    meter.source.close()  # reaps the killed process
    assert meter.kwh == pytest.approx(1000 / 3.6e6)


def test_without_a_process_group_a_node_is_the_whole_run():
    cpu = torch.device("cpu")
    assert sum_over_nodes(1.5, 120.0, True, cpu) == (1.5, 120.0)
    assert sum_over_nodes(1.5, 120.0, False, cpu) == (None, None)


NODES_SCRIPT = """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from nanochat.energy import sum_over_nodes

    dist.init_process_group("gloo")
    node, local = int(os.environ["GROUP_RANK"]), int(os.environ["LOCAL_RANK"])
    cpu = torch.device("cpu")
    # every rank offers its node's figures: only each node's local rank 0 may count them
    known = sum_over_nodes([1.0, 2.5][node], [100.0, 150.0][node], local == 0, cpu)
    one_node_blind = sum_over_nodes([1.0, None][node], [100.0, 150.0][node], local == 0, cpu)
    with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as out:
        json.dump([known, one_node_blind], out)
    dist.destroy_process_group()
"""


@pytest.mark.slow  # two torchrun launchers
def test_energy_is_summed_over_two_nodes_each_counted_once(tmp_path):
    """Two "nodes" of two ranks each, as two torchrun launchers on one host (gloo, 127.0.0.1)."""
    script = tmp_path / "nodes.py"
    script.write_text(textwrap.dedent(NODES_SCRIPT))
    port = free_port()
    launchers = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                          "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}", str(script),
                          str(tmp_path)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    outputs = [launcher.communicate(timeout=120)[0] for launcher in launchers]
    assert all(launcher.returncode == 0 for launcher in launchers), "\n".join(outputs)[-4000:]
    for rank in range(4):
        known, one_node_blind = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert known == [3.5, 250.0]  # not 7.0: the local ranks 1 added nothing
        assert one_node_blind == [None, 250.0]  # one node without a reading: the total is unknown, not 1.0


def fake_pynvml(milliwatts: dict[int, int]) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetCount = lambda: len(milliwatts)
    module.nvmlDeviceGetHandleByIndex = lambda index: index
    module.nvmlDeviceGetPowerUsage = lambda handle: milliwatts[handle]
    return module


def test_nvml_is_preferred_and_summed_in_watts(only_fake_gpu_tools, monkeypatch):
    fake_nvidia_smi(only_fake_gpu_tools, "1.0\n")
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: 95500, 1: 20250}))
    source = detect_power_source()
    assert source.description == "NVML"
    assert source.read_watts() == pytest.approx(115.75)


def test_nvml_counts_only_visible_gpus(only_fake_gpu_tools, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: 95500, 1: 20250}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert detect_power_source().read_watts() == pytest.approx(20.25)


def test_nvml_without_a_reading_falls_back_to_nvidia_smi(only_fake_gpu_tools, monkeypatch):
    module = fake_pynvml({0: 0})

    def not_supported(handle):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    module.nvmlDeviceGetPowerUsage = not_supported
    monkeypatch.setitem(sys.modules, "pynvml", module)
    fake_nvidia_smi(only_fake_gpu_tools, "42.0\n")
    source = detect_power_source()
    try:
        assert source.read_watts() == pytest.approx(42.0)
    finally:
        source.close()  # ends the looping nvidia-smi the second reading started


def test_no_visible_gpu_means_no_sensor(only_fake_gpu_tools, monkeypatch):
    fake_nvidia_smi(only_fake_gpu_tools, "42.0\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_power_source() is None


# ---------------------------------------------------------------- money


def test_cost_of_a_nine_day_spark_run():
    kwh = 0.120 * 216  # 120 W for 9 days
    assert kwh == pytest.approx(25.92)
    assert cost_usd(kwh) == pytest.approx(3.888)
    assert cost_usd(kwh, price_per_kwh=0.30) == pytest.approx(7.776)
    assert cost_usd(None) is None


def test_depreciation_is_linear_over_the_lifetime():
    year = 365.25 * 86400
    assert depreciation_usd(3.5 * year) == pytest.approx(4000.0)
    assert depreciation_usd(9 * 86400) == pytest.approx(4000 * 9 / (3.5 * 365.25))
    assert depreciation_usd(year, hardware_price=3000.0, lifetime_years=3.0) == pytest.approx(1000.0)


def test_format_energy():
    assert format_energy(0.1234, 0.0185) == "0.123 kWh, $0.02"
    assert format_energy(None, None) == "n/a"


def test_report_items_are_numbers_or_na():
    known = EnergyReport(kwh=25.92, mean_watts=120.0, seconds=9 * 86400).items()
    assert known == {
        "energy (kWh)": 25.92,
        "cost (USD)": pytest.approx(3.888),
        "mean power (W)": 120.0,
        "depreciation (USD)": pytest.approx(28.17, abs=0.01),
    }
    unknown = EnergyReport(kwh=None, mean_watts=None, seconds=3600).items()
    assert unknown["energy (kWh)"] == unknown["cost (USD)"] == unknown["mean power (W)"] == "n/a"
    assert unknown["depreciation (USD)"] > 0


def test_report_items_fit_a_report_section(base_dir):
    from nanochat import report

    items = EnergyReport(kwh=None, mean_watts=None, seconds=3600).items()
    report.write_section("energy-test", "Energy", items)
    sidecar = (base_dir / "report" / "energy-test.json").read_text()
    assert "energy (kWh)" not in sidecar  # unknown energy is left out, not stored as 0
    assert "depreciation (USD)" in sidecar
