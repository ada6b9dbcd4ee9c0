"""Plots of a run: the freeze timeline (unit vs epoch, like Figure 5b of the SmartFRZ paper)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # for the reports, which draw through pyplot


def freeze_timeline(unit_names: Sequence[str], events: Sequence[Any], epochs: float, title: str = "",
                    steps_per_epoch: int | None = None) -> Any:
    """A horizontal bar per unit: trained (blue) until it is frozen, frozen (grey) after, and a marker at the
    exact step of each freeze (a freeze late in the last epoch leaves a sliver of grey; the marker shows it).

    ``events`` are :class:`freezebench.trainer.freezer.FreezeEvent` objects (or dicts with unit/epoch/action,
    optionally step); with ``steps_per_epoch`` an event's position is ``step / steps_per_epoch``.
    """
    from matplotlib.figure import Figure  # not pyplot: importing it is a good share of a short run's ending

    L = len(unit_names)
    fig = Figure(figsize=(9, max(2.5, 0.22 * L + 1.2)))
    ax = fig.subplots()
    draw_freeze_timeline(ax, unit_names, events, epochs, title=title or "freeze timeline",
                         steps_per_epoch=steps_per_epoch)
    fig.tight_layout()
    return fig


def draw_freeze_timeline(ax: Any, unit_names: Sequence[str], events: Sequence[Any], epochs: float,
                         title: str = "", legend: bool = True, labels: bool = True,
                         steps_per_epoch: int | None = None) -> None:
    """Draw the freeze timeline of one run into ``ax`` (reports put several side by side, Figure 5b)."""
    L = len(unit_names)
    spans: dict[int, list[tuple[float, float, str]]] = {i: [] for i in range(L)}
    state = {i: ("train", 0.0) for i in range(L)}
    marks: list[tuple[float, int]] = []
    for ev in sorted(events, key=lambda e: event_epoch(e, steps_per_epoch)):
        u, ep, act = int(_get(ev, "unit")), event_epoch(ev, steps_per_epoch), _get(ev, "action")
        if u not in state:
            continue
        if act == "freeze":
            marks.append((ep, u))
        kind, start = state[u]
        new = "frozen" if act == "freeze" else "train"
        if new != kind:
            spans[u].append((start, ep, kind))
            state[u] = (new, ep)
    for u, (kind, start) in state.items():
        spans[u].append((start, float(epochs), kind))
    for u, segs in spans.items():
        for a, b, kind in segs:
            if b > a:
                ax.barh(u, b - a, left=a, height=0.8, color=TRAIN_COLOR if kind == "train" else FROZEN_COLOR,
                        edgecolor="none")
    if marks:  # the exact step of each freeze, visible however thin the grey bar after it is
        ax.scatter([m[0] for m in marks], [m[1] for m in marks], marker="|", s=220, linewidths=2.0,
                   color=MARK_COLOR, zorder=3)
    ax.set_yticks(range(L))
    ax.set_yticklabels(unit_names if labels else [], fontsize=6 if L > 30 else 8)
    ax.set_ylim(L - 0.5, -0.5)
    ax.set_xlim(0, epochs)
    ax.set_xlabel("epoch")
    if labels:
        ax.set_ylabel("unit (forward order)")
    if legend:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=TRAIN_COLOR, label="training"), Patch(color=FROZEN_COLOR, label="frozen"),
                           Line2D([], [], color=MARK_COLOR, marker="|", linestyle="none", markersize=8,
                                  markeredgewidth=1.6, label="frozen at")],
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title)


TRAIN_COLOR, FROZEN_COLOR, MARK_COLOR = "#3b75af", "#b9b9b9", "#222222"


def event_epoch(ev: Any, steps_per_epoch: int | None = None) -> float:
    """Where an event happened in epochs (fractional): ``step / steps_per_epoch`` when both are known."""
    if steps_per_epoch:
        step = ev.get("step") if isinstance(ev, dict) else getattr(ev, "step", None)
        if step is not None:
            return float(step) / steps_per_epoch
    return float(_get(ev, "epoch"))


def _get(ev: Any, key: str) -> Any:
    return ev[key] if isinstance(ev, dict) else getattr(ev, key)
