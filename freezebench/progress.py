"""Progress with an ETA for the long commands (sweeps, suites, predictor collection and training, compare).

    from freezebench import progress
    bar = progress.start(12, 0, "sweep window", unit="trial")   # 0 of 12 done; the command's outer task
    progress.describe("trial 3 [policy.window=30 seed=0]")    # what runs now (shown beside the count)
    progress.advance()            # one more done; or progress.advance_to(done) with a count read elsewhere
    bar.close()

    for run in progress.track(runs, "reading runs", unit="run"): ...

On a terminal each task is a tqdm bar ("3/12 trials [01:02<03:10]", the ETA after ``<``); when the output
is not a terminal nothing is drawn (logs stay clean), unless ``FREEZEBENCH_PROGRESS=1`` (``=0`` silences it
on a terminal too). Lines printed while a bar is drawn go through :func:`write`, above the bar; before an
error line the CLI calls :func:`clear_bars`, so the message is never printed over a bar.

tqdm is imported only when a bar is really drawn. :func:`describe`, :func:`advance` and :func:`advance_to`
act on the innermost task opened with :func:`start` (no-ops when there is none), so library code reports
progress in one line without passing a handle around.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

#: environment switch: 1 draws bars even when the output is not a terminal, 0 never draws them
ENV = "FREEZEBENCH_PROGRESS"

_stack: list[Progress] = []


def enabled(stream: TextIO | None = None) -> bool:
    """Whether bars are drawn on ``stream`` (default stderr): a terminal, unless ``$FREEZEBENCH_PROGRESS`` says."""
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``, ``3725`` -> ``1h02m``, ``9`` -> ``9s``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def eta_seconds(elapsed_s: float, done: int, total: int) -> float | None:
    """Time left if the remaining items take as long as the done ones did on average (None before the first)."""
    if done <= 0 or total <= 0:
        return None
    return max(0.0, elapsed_s / done * (total - done))


class Progress:
    """``done`` of ``total`` items with an ETA: a tqdm bar on a terminal, silent otherwise."""

    def __init__(self, total: int | None, done: int = 0, desc: str = "", unit: str = "it", *,
                 enable: bool | None = None, file: TextIO | None = None, leave: bool = False):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = done  # already done when the task starts (a sweep joined half-way): not in the ETA's rate
        self.file = sys.stderr if file is None else file
        self._bar: Any = None
        if enable is None:
            enable = enabled(self.file)
        if enable:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=done, desc=desc, unit=f" {unit}", file=self.file, leave=leave,
                             dynamic_ncols=True, mininterval=0.5)

    def advance(self, n: int = 1, refresh: bool = False) -> None:
        """``n`` more done; ``refresh``: redraw now (rare, slow items), else at most twice a second."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if refresh:
                self._bar.refresh()

    def advance_to(self, done: int, refresh: bool = True) -> None:
        """Set the done count (read from shared state, e.g. trials finished by every worker)."""
        if done != self.done:
            self.advance(done - self.done, refresh)

    def describe(self, text: str) -> None:
        """What runs now, shown after the count."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self in _stack:
            _stack.remove(self)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def start(total: int | None, done: int = 0, desc: str = "", unit: str = "it", **kw: Any) -> Progress:
    """Open a task (``done`` of ``total`` at the start) that :func:`describe` / :func:`advance` /
    :func:`advance_to` then act on; close it when done."""
    p = Progress(total, done, desc, unit, **kw)
    _stack.append(p)
    return p


def describe(text: str) -> None:
    if _stack:
        _stack[-1].describe(text)


def advance(n: int = 1) -> None:
    if _stack:
        _stack[-1].advance(n, refresh=True)


def advance_to(done: int) -> None:
    if _stack:
        _stack[-1].advance_to(done)


def track(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None,
          enable: bool | None = None) -> Iterator[T]:
    """Iterate over ``items`` with a bar (``enable=False``: never; None: on a terminal)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, 0, desc, unit, enable=None if enable is None or enable else False) as p:
        for item in items:
            yield item
            p.advance()


#: environment switch: set to 1, the trainer and the CLI print ``freezebench-phase NAME UNIXTIME CPUSECONDS``
#: lines to stderr (train-start: the first training step is next; train-end: the last step and its evaluation
#: done; exit: the command returns; tracking-ready: the MLflow process has imported MLflow; CPUSECONDS: the
#: printing process's CPU time so far), which benchmarks/bench_startup.py reads
PHASES_ENV = "FREEZEBENCH_PHASES"


def phase(name: str) -> None:
    """Timestamp a phase of the command (only when ``$FREEZEBENCH_PHASES`` is set)."""
    if os.environ.get(PHASES_ENV):
        import time

        print(f"freezebench-phase {name} {time.time():.6f} {time.process_time():.4f}", file=sys.stderr, flush=True)


def _live_bars() -> list[Any]:
    tq = sys.modules.get("tqdm")
    if tq is None:  # no bar was ever drawn
        return []
    return [b for b in list(getattr(tq.tqdm, "_instances", ())) if not getattr(b, "disable", False)]


def write(*args: Any, file: TextIO | None = None, end: str = "\n", **_: Any) -> None:
    """``print`` that keeps bars intact: above the bars while any is drawn."""
    text = " ".join(str(a) for a in args)
    if _live_bars():
        from tqdm import tqdm

        tqdm.write(text, file=file, end=end)
    else:
        print(text, file=file, end=end, flush=True)


def clear_bars() -> None:
    """Close every bar still drawn (an error stops a command mid-way): the next line starts on a clean line."""
    for p in list(_stack):
        p.close()
    for bar in _live_bars():
        try:
            bar.leave = False
            bar.close()
        except Exception:  # a bar of another library in a broken state must not hide the error itself
            pass
