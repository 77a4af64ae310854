"""What the machine can do in low precision: its kernels' capability and a measured matmul speed.

Mixed precision is faster only where the hardware has fast low-precision kernels:
tensor cores on a GPU, ``avx512_bf16``/AMX on a CPU.  Elsewhere PyTorch still runs
bfloat16 and float16 (converting to float32 inside its kernels), only slower than
float32: on an AVX-512 CPU without ``avx512_bf16`` a bfloat16 matmul takes about 4x
the float32 time and a float16 one about 80x.  Timing such rows says nothing about
mixed precision, so the ``speed`` suite measures the machine first
([`measure`][mpnode.bench.hardware.measure]) and times a precision only where it is fast
([`LowPrecisionSpeed.skip_reason`][mpnode.bench.hardware.LowPrecisionSpeed.skip_reason]).

The measure is one matmul per dtype, 1 thread on a CPU (the suite's setting):
``(256, 512) @ (512, 512)`` on a CPU, ``(4096, 4096) @ (4096, 4096)`` on a GPU,
the median of 5 rounds, interleaved across the dtypes, of several calls each.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .profilers import synchronize

LOW_PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16}
FAST_SPEEDUP = 1.2
"""A low precision counts as fast when its matmul runs at least this many times faster than float32's."""
MATMUL_SHAPES = {"cpu": (256, 512, 512), "cuda": (4096, 4096, 4096)}
"""``(m, k, n)`` of the measured ``(m, k) @ (k, n)`` matmul per device type (others use the CPU shape)."""
CPU_FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile", "avx512_vnni")
"""The ``/proc/cpuinfo`` flags that tell whether low-precision kernels are native (recorded when present)."""


@dataclass
class LowPrecisionSpeed:
    """The machine's low-precision kernels, measured.

    Attributes:
        device: the device measured (``"cpu"``, ``"cuda:0"``).
        name: the CPU model or GPU name.
        capability: ``torch.backends.cpu.get_cpu_capability()`` on a CPU (``"AVX512"``,
            ``"AVX2"``, ...), the CUDA compute capability (``"sm_90"``) on a GPU.
        cpu_flags: the [`CPU_FLAGS`][mpnode.bench.hardware.CPU_FLAGS] the CPU reports (CPU only; empty where unknown).
        matmul_shape: ``(m, k, n)`` of the measured matmul.
        matmul_s: median seconds of one matmul per dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``).
        threads: torch intra-op threads during the measure.
    """

    device: str
    name: str
    capability: str
    cpu_flags: list[str] = field(default_factory=list)
    matmul_shape: tuple[int, int, int] = (0, 0, 0)
    matmul_s: dict[str, float] = field(default_factory=dict)
    threads: int = 1

    def speedup(self, precision: str) -> float | None:
        """float32 matmul time over ``precision``'s (``None`` when either was not measured)."""
        low, high = self.matmul_s.get(precision), self.matmul_s.get("float32")
        return None if not low or not high else high / low

    def is_fast(self, precision: str) -> bool:
        """float32 is always "fast"; a low precision when its matmul speed-up is at least
        [`FAST_SPEEDUP`][mpnode.bench.hardware.FAST_SPEEDUP]."""
        if precision == "float32":
            return True
        s = self.speedup(precision)
        return s is not None and s >= FAST_SPEEDUP

    def skip_reason(self, precision: str) -> str | None:
        """Why rows in ``precision`` are not timed here (``None`` when they are)."""
        if self.is_fast(precision):
            return None
        s = self.speedup(precision)
        measured = "not measured" if s is None else f"{s:.2f}x float32's speed"
        return (f"skipped: no fast {precision} kernels on this {self.device.split(':')[0].upper()} "
                f"({self.name}, {self.capability}): a {precision} matmul runs at {measured} "
                f"(fast means >= {FAST_SPEEDUP}x); --force-low-precision times it anyway")

    def row_note(self, precision: str) -> str | None:
        """The short form of [`skip_reason`][mpnode.bench.hardware.LowPrecisionSpeed.skip_reason], for each skipped row
        (``None`` when the precision is timed)."""
        if self.is_fast(precision):
            return None
        s = self.speedup(precision)
        return (f"skipped: no fast {precision} kernels here (matmul "
                + ("not measured" if s is None else f"{s:.2f}x float32's speed") + ")")

    def describe(self) -> str:
        """One line: the device, its capability and flags, the matmul times and speed-ups."""
        m, k, n = self.matmul_shape
        parts = [f"{self.device} ({self.name}), capability {self.capability}"]
        if self.cpu_flags:
            parts.append("flags " + " ".join(self.cpu_flags))
        times = ", ".join(
            f"{p} {t * 1e3:.3g} ms" + ("" if p == "float32" else f" ({self.speedup(p):.2f}x)")
            for p, t in self.matmul_s.items()
        )
        parts.append(f"({m}x{k}) @ ({k}x{n}) matmul, {self.threads} thread(s): {times}")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)


def _cpu_name_and_flags() -> tuple[str, list[str]]:
    """The CPU model name and its [`CPU_FLAGS`][mpnode.bench.hardware.CPU_FLAGS] from ``/proc/cpuinfo`` (Linux), else
    the platform's name."""
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    name, flags = platform.processor() or platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return name, [f for f in CPU_FLAGS if f in flags]


def _matmul_calls(dtype: torch.dtype, shape: tuple[int, int, int], device: torch.device, min_round_s: float):
    """A warmed-up closure making ``calls`` matmuls of ``shape`` in ``dtype`` (enough for ``min_round_s``), and
    ``calls``."""
    m, k, n = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    t0 = time.perf_counter()
    torch.mm(a, b)
    synchronize(device)
    calls = max(1, min(200, int(min_round_s / max(time.perf_counter() - t0, 1e-7))))

    def run() -> None:
        for _ in range(calls):
            torch.mm(a, b)

    return run, calls


def measure(device: torch.device | str, precisions: tuple[str, ...] = ("float32", "bfloat16", "float16"),
            rounds: int = 5, min_round_s: float = 0.02) -> LowPrecisionSpeed:
    """Measure the matmul speed of each precision on ``device`` with the current thread setting: ``rounds``
    interleaved rounds of at least ``min_round_s`` (or one call) per dtype, the median per call."""
    dev = torch.device(device)
    shape = MATMUL_SHAPES.get(dev.type, MATMUL_SHAPES["cpu"])
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        speed = LowPrecisionSpeed(str(dev), torch.cuda.get_device_name(dev), f"sm_{major}{minor}")
    else:
        name, flags = _cpu_name_and_flags()
        speed = LowPrecisionSpeed(str(dev), name, torch.backends.cpu.get_cpu_capability(), flags)
    speed.matmul_shape = shape
    speed.threads = torch.get_num_threads()
    dtypes = {"float32": torch.float32, **LOW_PRECISIONS}
    runs = {p: _matmul_calls(dtypes[p], shape, dev, min_round_s) for p in precisions}
    samples: dict[str, list[float]] = {p: [] for p in precisions}
    for _ in range(rounds):  # interleaved, so a load change on a shared machine hits every dtype alike
        for p, (run, calls) in runs.items():
            synchronize(dev)
            t0 = time.perf_counter()
            run()
            synchronize(dev)
            samples[p].append((time.perf_counter() - t0) / calls)
    speed.matmul_s = {p: statistics.median(v) for p, v in samples.items()}
    return speed
