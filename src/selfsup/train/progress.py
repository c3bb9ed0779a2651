"""What a long run tells its user: a progress line (images/s, ETA) and a metrics CSV (+ TensorBoard)."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """One line per update: on a terminal it redraws in place, in a log file it appends."""

    def __init__(self, total: int, start: int, unit: str = "img", enabled: bool = True, stream=None):
        self.total, self.start = total, start
        self.unit = unit
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.items = 0

    def update(self, step: int, items: int, scalars: dict[str, float]) -> float:
        """Record ``items`` processed since the last call; print; return the current items/s."""
        self.items += items
        elapsed = time.perf_counter() - self.t0
        rate = self.items / elapsed if elapsed > 0 else 0.0
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        if self.enabled:
            values = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
            line = (f"step {step}/{self.total} [{100 * step / self.total:3.0f}%] {values} | "
                    f"{rate:,.0f} {self.unit}/s | ETA {format_seconds(eta)}")
            self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
            self.stream.flush()
        return rate

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")


class MetricsLog:
    """Appends rows to ``metrics.csv``; on resume, rows after the resumed step are dropped so the file
    equals the uninterrupted run's. Mirrors to TensorBoard when ``tensorboard`` is installed."""

    def __init__(self, path: Path, resume_step: int):
        self.path = Path(path)
        self.rows: list[dict] = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.fields = list(self.rows[0].keys()) if self.rows else []
        self._rewrite()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=resume_step + 1)
        except Exception:  # tensorboard is optional: no package, no mirror
            self.tb = None

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if self.fields:
                writer.writeheader()
                writer.writerows(self.rows)
        tmp.replace(self.path)

    def log(self, row: dict) -> None:
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        if any(k not in self.fields for k in row):
            self.fields += [k for k in row if k not in self.fields]
            self.rows.append(row)
            self._rewrite()
        else:
            self.rows.append(row)
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(key, float(value), int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
