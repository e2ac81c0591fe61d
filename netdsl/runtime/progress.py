"""Progress output: a terminal/log progress bar, a JSON-lines metrics log and plots."""
from __future__ import annotations

import io
import json
import math
import os
import sys
import time

import numpy as np

from ..errors import NetdslError
from .checkpoint import atomic_write


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressBar:
    """`update(steps, loss=..., images=...)` after each batch; `close()` at the end.
    `images` counts what `unit` names (images, or tokens for a sequence source).

    On a terminal the line is redrawn in place (at most `redraw_s` apart). Otherwise,
    e.g. into a log file, a full line is printed every `log_every_s` seconds, so the
    log stays readable. Images/s and ETA are averages since the bar started.
    """

    def __init__(self, total: int, desc: str = "", *, stream=None, width: int = 24,
                 is_tty: bool | None = None, redraw_s: float = 0.1, log_every_s: float = 10.0,
                 clock=time.monotonic, unit: str = "img"):
        self.total, self.desc, self.width, self.unit = total, desc, width, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)() if is_tty is None else is_tty
        self.interval = redraw_s if self.tty else log_every_s
        self.clock = clock
        self.start = self.last_draw = clock()
        self.count = self.images = 0
        self.drawn = -1  # count at the last draw
        self._last_len = 0
        self.loss: float | None = None
        self.extra: dict[str, float] = {}
        self.closed = False

    def update(self, steps: int = 1, *, loss: float | None = None, images: int = 0, **metrics) -> None:
        self.count += steps
        self.images += images
        if loss is not None:
            self.loss = float(loss)
        self.extra.update(metrics)
        now = self.clock()
        if now - self.last_draw >= self.interval or self.count >= self.total:
            self.last_draw = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self.start
        frac = min(self.count / self.total, 1.0) if self.total else 1.0
        filled = int(frac * self.width)
        parts = [self.desc] if self.desc else []
        parts.append(f"[{'#' * filled}{'.' * (self.width - filled)}] {self.count}/{self.total}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.extra.items()]
        if elapsed > 0 and self.images:
            parts.append(f"{self.images / elapsed:.0f} {self.unit}/s")
        if self.count < self.total:
            eta = elapsed / self.count * (self.total - self.count) if self.count else float("inf")
            parts.append(f"ETA {_fmt_time(eta)}")
        else:
            parts.append(f"took {_fmt_time(elapsed)}")
        return "  ".join(parts)

    def _draw(self, now: float) -> None:
        text = self.line(now)
        self.drawn = self.count
        if self.tty:
            # Pad so a shorter line fully overwrites the previous one.
            self.stream.write("\r" + text.ljust(self._last_len))
            self._last_len = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.count != self.drawn:  # show the final state once
            self._draw(self.clock())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MetricsLog:
    """Appends one JSON object per `log()` call to a .jsonl file, flushed each time so
    a crashed run keeps everything logged before the crash."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        try:
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise NetdslError(f"cannot open metrics log {self.path}: {e.strerror}") from None

    def log(self, **record) -> None:
        self._f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _plain(v):
    """numpy scalars/arrays -> JSON types; non-finite floats -> None (JSON has no NaN)."""
    if isinstance(v, (np.generic, np.ndarray)):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str) -> list[dict]:
    """All records; a torn last line (the run was killed mid-write) is skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise NetdslError(f"metrics file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NetdslError(f"cannot read metrics file {path}: {e}") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                break
            raise NetdslError(f"{path}:{i}: not a JSON object") from None
        if not isinstance(rec, dict):
            raise NetdslError(f"{path}:{i}: not a JSON object")
        records.append(rec)
    return records


def plot_metrics(jsonl_path: str, png_path: str) -> None:
    """Plot every numeric metric against 'step' (or 'epoch', or the record number) into
    a PNG: losses in one panel, fractions (accuracies, mIoU) in another, perplexity in
    a third (metrics.panel says which key goes where)."""
    from .metrics import panel as panel_of
    records = read_metrics(jsonl_path)
    xkey = next((k for k in ("step", "epoch") if any(k in r for r in records)), None)
    panels = {"loss": {}, "accuracy": {}, "perplexity": {}}
    for i, r in enumerate(records):
        x = r.get(xkey, i) if xkey else i
        for k, v in r.items():
            if k in ("step", "epoch") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            panel = panel_of(k)
            if panel:
                panels[panel].setdefault(k, []).append((x, v))
    if not any(panels.values()):
        raise NetdslError(f"{jsonl_path}: no loss or accuracy values to plot")

    import matplotlib
    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    shown = [p for p in panels if panels[p]]
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4), squeeze=False)
    for ax, panel in zip(axes[0], shown):
        for k, pts in sorted(panels[panel].items()):
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=k, marker="o" if len(pts) < 30 else None)
        ax.set_xlabel(xkey or "record")
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(png_path, lambda f: f.write(buf.getvalue()))
