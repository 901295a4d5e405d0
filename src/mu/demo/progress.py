"""The demo's stage list with an overall ETA, updated from measured durations.

Each stage has an estimate (seconds, from a short timing of the models on this machine) and a kind
("train", "eval", ...). While a stage runs, its own remaining time comes from its progress fraction;
stages still to come are scaled by how far the finished stages of their kind (or, before any, of any
kind) were off their estimates. Lines go to stderr through tqdm.write, so they do not break progress bars.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Optional


def fmt_time(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


@dataclass
class Stage:
    name: str
    description: str
    estimate: float  # predicted seconds
    kind: str  # stages of one kind share a correction factor
    status: str = "pending"  # pending | running | done | reused
    seconds: float = 0.0  # measured (done) or elapsed (running)
    fraction: float = 0.0  # progress of a running stage


class Plan:
    FIXED_GUESS = ("data", "report")  # kinds whose estimates are fixed guesses: they do not correct other kinds

    def __init__(self, enabled: bool = True, interval: float = 15.0):
        self.enabled = enabled
        self.interval = interval  # seconds between progress lines inside a stage
        self.stages: dict[str, Stage] = {}
        self.t0 = time.perf_counter()
        self._stage_t0 = 0.0
        self._last_line = 0.0

    def add(self, name: str, description: str, estimate: float, kind: str) -> None:
        self.stages[name] = Stage(name, description, max(estimate, 0.1), kind)

    def set_estimate(self, name: str, estimate: float) -> None:
        self.stages[name].estimate = max(estimate, 0.1)

    # -- estimates ------------------------------------------------------------------------------

    def _correction(self, kind: str) -> float:
        done = [s for s in self.stages.values() if s.status == "done" and s.estimate > 0.5]
        same = [s for s in done if s.kind == kind]
        pool = same or [s for s in done if s.kind not in self.FIXED_GUESS]
        if not pool:
            return 1.0
        return sum(s.seconds for s in pool) / sum(s.estimate for s in pool)

    def remaining(self) -> float:
        left = 0.0
        for s in self.stages.values():
            if s.status == "pending":
                left += s.estimate * self._correction(s.kind)
            elif s.status == "running":
                elapsed = time.perf_counter() - self._stage_t0
                if s.fraction >= 0.05:
                    left += elapsed * (1.0 - s.fraction) / s.fraction
                else:
                    left += max(s.estimate * self._correction(s.kind) - elapsed, 0.0)
        return left

    def total_estimate(self) -> float:
        return sum(s.estimate for s in self.stages.values() if s.status != "reused")

    # -- events ---------------------------------------------------------------------------------

    def _write(self, message: str) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)

    def show(self, header: str) -> None:
        lines = [header]
        for i, s in enumerate(self.stages.values(), 1):
            when = "done earlier, reused" if s.status == "reused" else f"~{fmt_time(s.estimate)}"
            lines.append(f"  {i}. {s.name:<10} {s.description:<62} {when}")
        lines.append(f"  estimated total: ~{fmt_time(self.remaining())} (from a short timing of the models "
                     f"on this machine; updated as stages finish)")
        self._write("\n".join(lines))

    def start(self, name: str) -> None:
        s = self.stages[name]
        s.status, s.fraction = "running", 0.0
        self._stage_t0 = self._last_line = time.perf_counter()
        i = list(self.stages).index(name) + 1
        self._write(f"[demo {i}/{len(self.stages)}] {name}: {s.description} (~{fmt_time(s.estimate * self._correction(s.kind))}; "
                    f"{fmt_time(time.perf_counter() - self.t0)} elapsed, ~{fmt_time(self.remaining())} left)")

    def update(self, name: str, fraction: float, note: Optional[str] = None) -> None:
        s = self.stages[name]
        s.fraction = min(max(fraction, 0.0), 1.0)
        now = time.perf_counter()
        if now - self._last_line >= self.interval:
            self._last_line = now
            i = list(self.stages).index(name) + 1
            extra = f", {note}" if note else ""
            self._write(f"[demo {i}/{len(self.stages)}] {name} {100 * s.fraction:.0f}%{extra} | "
                        f"{fmt_time(now - self.t0)} elapsed, ~{fmt_time(self.remaining())} left")

    def finish(self, name: str, seconds: float, message: str = "") -> None:
        s = self.stages[name]
        s.status, s.seconds, s.fraction = "done", seconds, 1.0
        i = list(self.stages).index(name) + 1
        self._write(f"[demo {i}/{len(self.stages)}] {name} done in {fmt_time(seconds)} (estimated "
                    f"{fmt_time(s.estimate)}){': ' + message if message else ''} | "
                    f"{fmt_time(time.perf_counter() - self.t0)} elapsed, ~{fmt_time(self.remaining())} left")

    def reuse(self, name: str) -> None:
        self.stages[name].status = "reused"

    def note(self, message: str) -> None:
        self._write(message)
