"""Per-phase wall time and peak memory of a generation.

Peak memory is MLX's (``mx.get_peak_memory``, reset at the start of each phase) and the process's peak resident
set size (``ru_maxrss``, which never decreases, so it is the peak up to the end of that phase).
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

import mlx.core as mx


def process_peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status`` (``ru_maxrss`` would carry the parent's peak across
    ``exec``); elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


@dataclass
class PhaseStats:
    """One phase: ``seconds`` of wall time, ``peak_memory`` (MLX bytes during the phase), ``peak_rss`` (process
    bytes up to the end of the phase), and ``steps`` for the denoising phase."""

    seconds: float = 0.0
    peak_memory: int = 0
    peak_rss: int = 0
    steps: int = 0


@dataclass
class Profile:
    """Time and memory of one pipeline call, phase by phase (``load``, ``text_encoding``, ``denoising``,
    ``decoding``)."""

    phases: dict[str, PhaseStats] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str, steps: int = 0) -> Iterator[PhaseStats]:
        """Time a phase and record MLX's peak memory during it (the caller must ``mx.eval`` inside)."""
        stats = self.phases.setdefault(name, PhaseStats())
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        try:
            yield stats
        finally:
            stats.seconds += time.perf_counter() - t0
            stats.peak_memory = max(stats.peak_memory, int(mx.get_peak_memory()))
            stats.peak_rss = process_peak_rss_bytes()
            stats.steps += steps

    @property
    def total_seconds(self) -> float:
        """Sum of the phases' wall times."""
        return sum(p.seconds for p in self.phases.values())

    @property
    def peak_memory(self) -> int:
        """Highest MLX peak over all phases, bytes."""
        return max((p.peak_memory for p in self.phases.values()), default=0)

    @property
    def seconds_per_step(self) -> float:
        """Denoising seconds per U-Net step (one step = one U-Net batch, CFG included)."""
        d = self.phases.get("denoising")
        return d.seconds / d.steps if d and d.steps else 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict of all figures."""
        return {"phases": {k: asdict(v) for k, v in self.phases.items()}, "total_seconds": self.total_seconds,
                "seconds_per_step": self.seconds_per_step, "peak_memory": self.peak_memory}

    def summary(self) -> str:
        """Readable table: one line a phase with seconds and peak memory in GB."""
        lines = [f"{'phase':<14}{'seconds':>9}{'MLX peak GB':>13}{'RSS peak GB':>13}"]
        for name, p in self.phases.items():
            extra = f"  ({p.seconds / p.steps:.3f} s/step)" if p.steps else ""
            lines.append(f"{name:<14}{p.seconds:>9.2f}{p.peak_memory / 1e9:>13.3f}{p.peak_rss / 1e9:>13.3f}{extra}")
        lines.append(f"{'total':<14}{self.total_seconds:>9.2f}{self.peak_memory / 1e9:>13.3f}")
        return "\n".join(lines)
