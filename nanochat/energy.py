"""What a training run costs: GPU energy measured in the background, its
electricity price, and the share of the hardware's price the run used up.

`PowerMeter` samples the GPUs' power draw about once a second on a daemon
thread and integrates it (trapezoid rule) to kWh. The sensor is NVML through
the nvidia-ml-py package (`import pynvml`) when it is installed, else one
`nvidia-smi` left looping for the whole run (not one per reading); with neither, or when they only answer "[N/A]", there is no
reading and the energy is None, never 0. It is the GPU's own sensor, not the
wall socket: a meter at the plug reads more (CPU, memory, disks, fan,
power-supply losses). Several nodes: each measures its own GPUs on its local
rank 0, and sum_over_nodes adds them up.

For scale, on a DGX Spark (GB10) drawing about 120 W, a 9-day (216 h) run uses
0.120 kW x 216 h = 25.9 kWh, $3.89 at $0.15/kWh; the $4,000 machine,
written off over 3.5 years, loses $28 of value in those 9 days.

    meter = PowerMeter.autodetect().start()
    ...  # train
    meter.stop()
    print(format_energy(meter.kwh, cost_usd(meter.kwh)))
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 1.0
NVIDIA_SMI_TIMEOUT_S = 5.0
PRICE_PER_KWH_USD = 0.15
SPARK_PRICE_USD = 4000.0
SPARK_LIFETIME_YEARS = 3.5
JOULES_PER_KWH = 3.6e6
SECONDS_PER_YEAR = 365.25 * 86400


class SensorError(RuntimeError):
    """The power sensor answered, but with no usable reading."""


class PowerSource(Protocol):
    description: str

    def read_watts(self) -> float:
        """Total draw of the visible GPUs now; raises when there is no reading."""
        ...

    def close(self) -> None:
        """Release what reading took (a process, a library handle); called once, when the meter stops."""
        ...


def visible_gpu_ids() -> list[str] | None:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them
    (indices or UUIDs); None when it is unset, meaning all of them. NVML and
    nvidia-smi ignore that variable, so the power sources apply it themselves."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


class NvmlPower:
    """Power through NVML (the nvidia-ml-py package), summed over the visible GPUs."""

    description = "NVML"

    def __init__(self, nvml, handles: list):
        self.nvml, self.handles = nvml, handles

    @classmethod
    def open(cls) -> NvmlPower:
        """Raises ImportError without nvidia-ml-py, or NVML's own error without a driver."""
        import pynvml

        pynvml.nvmlInit()
        ids = visible_gpu_ids()
        if ids is None:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        else:
            handles = [
                pynvml.nvmlDeviceGetHandleByIndex(int(gpu)) if gpu.isdigit() else pynvml.nvmlDeviceGetHandleByUUID(gpu)
                for gpu in ids
            ]
        if not handles:
            raise SensorError("NVML sees no GPU")
        return cls(pynvml, handles)

    def read_watts(self) -> float:
        return sum(self.nvml.nvmlDeviceGetPowerUsage(h) for h in self.handles) / 1000.0  # NVML reports mW

    def close(self) -> None:
        pass  # NVML stays initialised for the process: nvmlShutdown would close it for any other user too


def parse_power_draw(text: str) -> float:
    """Sum of nvidia-smi's power.draw lines (watts, one per GPU). A GPU that
    answers "[N/A]" or "[Not Supported]" makes the whole reading unusable:
    a partial sum would look like a real, lower draw."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise SensorError("nvidia-smi printed no power reading")
    try:
        return sum(float(line) for line in lines)
    except ValueError:
        raise SensorError(f"nvidia-smi has no power reading: {', '.join(lines)}") from None


class NvidiaSmiPower:
    """Power through `nvidia-smi --query-gpu=power.draw`, summed over the visible GPUs.

    The first reading is one nvidia-smi call, which also counts the GPUs. After it one nvidia-smi runs
    for as long as the meter does, printing a reading per GPU every `interval` (its --loop-ms), which a
    reader thread keeps the newest of: sampling starts no process. A reading older than interval +
    timeout (nvidia-smi hung or gone) raises, and the meter counts that time as unmeasured.
    """

    def __init__(self, executable: str, gpu_ids: list[str] | None = None, interval: float = SAMPLE_INTERVAL_S,
                 timeout: float = NVIDIA_SMI_TIMEOUT_S):
        self.executable, self.gpu_ids, self.interval, self.timeout = executable, gpu_ids, interval, timeout
        self.description = f"nvidia-smi ({executable})"
        self._gpus: int | None = None  # lines per reading, from the first one
        self._process: subprocess.Popen | None = None
        self._newest: tuple[float, float | None] | None = None  # (monotonic time, watts or None for "[N/A]")
        self._changed = threading.Condition()

    def _command(self, *extra: str) -> list[str]:
        command = [self.executable, "--query-gpu=power.draw", "--format=csv,noheader,nounits", *extra]
        if self.gpu_ids is not None:
            command.append(f"--id={','.join(self.gpu_ids)}")
        return command

    def read_watts(self) -> float:
        if self._gpus is None:
            done = subprocess.run(self._command(), capture_output=True, text=True, timeout=self.timeout, check=True)
            watts = parse_power_draw(done.stdout)
            self._gpus = sum(1 for line in done.stdout.splitlines() if line.strip())
            return watts
        if self._process is None:
            self._process = subprocess.Popen(self._command(f"--loop-ms={round(self.interval * 1000)}"),
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._follow, args=(self._process,), name="nvidia-smi-power", daemon=True).start()
        return self._newest_reading()

    def _follow(self, process: subprocess.Popen) -> None:
        lines: list[str] = []
        for line in process.stdout:
            if line.strip():
                lines.append(line)
            if len(lines) == self._gpus:
                try:
                    watts = parse_power_draw("".join(lines))
                except SensorError:
                    watts = None
                with self._changed:
                    self._newest = (time.monotonic(), watts)
                    self._changed.notify_all()
                lines = []

    def _newest_reading(self) -> float:
        with self._changed:  # the loop's first reading waits for nvidia-smi to start
            self._changed.wait_for(lambda: self._newest is not None, timeout=self.timeout)
            newest = self._newest
        if newest is None:
            raise SensorError(f"nvidia-smi --loop-ms printed no reading within {self.timeout:.0f} s")
        age = time.monotonic() - newest[0]
        if age > self.interval + self.timeout:
            raise SensorError(f"nvidia-smi --loop-ms has printed no reading for {age:.0f} s")
        if newest[1] is None:
            raise SensorError("nvidia-smi has no power reading")
        return newest[1]

    def close(self) -> None:
        """End the looping nvidia-smi, if one was started."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()


def detect_power_source(interval: float = SAMPLE_INTERVAL_S) -> PowerSource | None:
    """NVML if it gives a reading, else nvidia-smi if it gives one, else None.

    Each candidate must produce one reading here, so a GB10 whose sensors
    answer "[N/A]" yields None rather than a meter that never measures.
    """
    if visible_gpu_ids() == []:
        return None
    candidates: list[Callable[[], PowerSource]] = [NvmlPower.open]
    smi = shutil.which("nvidia-smi")
    if smi:
        candidates.append(lambda: NvidiaSmiPower(smi, visible_gpu_ids(), interval))
    for make in candidates:
        try:
            source = make()
            source.read_watts()
        except Exception as exc:  # noqa: BLE001 - any failure (package, driver, binary, reading) means: try the next
            logger.debug("power sensor unavailable: %s", exc)
            continue
        return source
    return None


class PowerMeter:
    """Samples a power source on a daemon thread and integrates it to energy.

    A failed reading is logged once and skipped; the trapezoid then spans the
    gap, so a sensor that comes back loses nothing, and one that is gone for
    good ends the count at its last reading. Nothing here raises into the
    training loop.
    """

    def __init__(self, source: PowerSource | None, interval: float = SAMPLE_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.source, self.interval, self.clock = source, interval, clock
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at: float | None = None
        self._stopped_at: float | None = None
        self._last: tuple[float, float] | None = None  # (time, watts) of the newest good reading
        self._joules = 0.0
        self._measured_seconds = 0.0
        self._failures = 0

    @classmethod
    def autodetect(cls, interval: float = SAMPLE_INTERVAL_S) -> PowerMeter:
        return cls(detect_power_source(interval), interval)

    def start(self) -> PowerMeter:
        if self._started_at is not None:  # one sampling thread per meter
            return self
        self._started_at = self.clock()
        if self.source is not None:
            self._thread = threading.Thread(target=self._run, name="power-meter", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling, after one last reading so the count runs to now; safe to call twice."""
        if self._started_at is None or self._stopped_at is not None:
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + NVIDIA_SMI_TIMEOUT_S)
            if not self._thread.is_alive():  # a hung read must not race the final one
                self.sample()
        if self.source is not None:
            self.source.close()
        self._stopped_at = self.clock()
        if self._failures:
            logger.warning("power readings failed %d time(s); energy covers %.0f s of %.0f s",
                           self._failures, self._measured_seconds, self.seconds)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stopping.wait(self.interval):
                return

    def sample(self) -> None:
        """Take one reading now and add the energy since the previous one."""
        if self.source is None:
            return
        try:
            watts = float(self.source.read_watts())
        except Exception as exc:  # noqa: BLE001 - a sensor may vanish mid-run (driver reset); training goes on
            with self._lock:
                self._failures += 1
                first = self._failures == 1
            if first:
                logger.warning("power sensor %s failed (%s); energy counts only the time with readings, "
                               "further failures are not logged", self.source.description, exc)
            return
        now = self.clock()
        with self._lock:
            if self._last is not None:
                then, previous = self._last
                self._joules += (now - then) * (watts + previous) / 2
                self._measured_seconds += now - then
            self._last = (now, watts)

    @property
    def kwh(self) -> float | None:
        """Energy so far; None until two readings have been taken."""
        with self._lock:
            return self._joules / JOULES_PER_KWH if self._measured_seconds > 0 else None

    @property
    def mean_watts(self) -> float | None:
        """Average draw over the time covered by readings (this run only)."""
        with self._lock:
            return self._joules / self._measured_seconds if self._measured_seconds > 0 else None

    @property
    def seconds(self) -> float:
        """Wall time since start(), up to stop()."""
        if self._started_at is None:
            return 0.0
        end = self._stopped_at if self._stopped_at is not None else self.clock()
        return end - self._started_at


def sum_over_nodes(kwh: float | None, watts: float | None, measures: bool,
                   device: torch.device) -> tuple[float | None, float | None]:
    """(kWh, mean watts) of all nodes together. Each node's meter runs on its local rank 0 and reads every
    GPU of that node, so those ranks pass `measures` and the others add nothing: no GPU counted twice, none
    left out. A figure unknown on any measuring rank makes the sum unknown, as a partial sum would look like
    a real, lower one. A collective when a process group is up: every rank calls it at the same point."""
    if not (dist.is_available() and dist.is_initialized()):
        return (kwh, watts) if measures else (None, None)
    figures = [value for figure in (kwh, watts)
               for value in ((figure or 0.0) if measures else 0.0, float(measures and figure is None))]
    # float64: a total over days of ~1 s increments must not lose them in float32's 24 bits
    total = torch.tensor(figures, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    summed_kwh, unknown_kwh, summed_watts, unknown_watts = total.tolist()
    return (None if unknown_kwh else summed_kwh), (None if unknown_watts else summed_watts)


def cost_usd(kwh: float | None, price_per_kwh: float = PRICE_PER_KWH_USD) -> float | None:
    """Electricity cost; unknown energy stays unknown."""
    return None if kwh is None else kwh * price_per_kwh


def depreciation_usd(seconds: float, hardware_price: float = SPARK_PRICE_USD,
                     lifetime_years: float = SPARK_LIFETIME_YEARS) -> float:
    """The hardware's value used up by `seconds` of work, written off linearly over its lifetime."""
    return hardware_price * seconds / (lifetime_years * SECONDS_PER_YEAR)


def format_energy(kwh: float | None, cost: float | None) -> str:
    """"0.123 kWh, $0.02", or "n/a" when the energy is unknown."""
    return "n/a" if kwh is None else f"{kwh:.3f} kWh, ${cost:.2f}"


@dataclass(frozen=True)
class EnergyReport:
    """Energy, cost and depreciation of a run, as report-section items.

    `seconds` is the training time the depreciation is charged for (across
    resumes, when the caller keeps it so).
    """

    kwh: float | None
    mean_watts: float | None
    seconds: float
    price_per_kwh: float = PRICE_PER_KWH_USD
    hardware_price: float = SPARK_PRICE_USD
    lifetime_years: float = SPARK_LIFETIME_YEARS

    def items(self) -> dict:
        cost = cost_usd(self.kwh, self.price_per_kwh)
        return {
            "energy (kWh)": _or_na(self.kwh),
            "cost (USD)": _or_na(cost),
            "mean power (W)": _or_na(self.mean_watts),
            "depreciation (USD)": depreciation_usd(self.seconds, self.hardware_price, self.lifetime_years),
        }


def _or_na(value: float | None):
    # report sidecars keep numbers only, so "n/a" is left out of them instead of posing as 0
    return "n/a" if value is None else value


def add_cost_args(parser) -> None:
    """--price-per-kwh and the hardware figures that turn energy and time into money."""
    parser.add_argument("--price-per-kwh", type=float, default=PRICE_PER_KWH_USD, help="electricity price in USD/kWh (default %(default)s)")
    parser.add_argument("--hardware-price", type=float, default=SPARK_PRICE_USD, help="machine price in USD, for depreciation (default %(default)s)")
    parser.add_argument("--hardware-lifetime-years", type=float, default=SPARK_LIFETIME_YEARS, help="years over which the machine is written off (default %(default)s)")
