"""Plots of a run: the freeze timeline (unit vs epoch, like Figure 5b of the SmartFRZ paper)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def freeze_timeline(unit_names: Sequence[str], events: Sequence[Any], epochs: float, title: str = "") -> Any:
    """A horizontal bar per unit: trained (blue) until it is frozen, frozen (grey) after.

    ``events`` are :class:`freezebench.trainer.freezer.FreezeEvent` objects (or dicts with unit/epoch/action).
    """
    L = len(unit_names)
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.22 * L + 1.2)))
    draw_freeze_timeline(ax, unit_names, events, epochs, title=title or "freeze timeline")
    fig.tight_layout()
    return fig


def draw_freeze_timeline(ax: Any, unit_names: Sequence[str], events: Sequence[Any], epochs: float,
                         title: str = "", legend: bool = True, labels: bool = True) -> None:
    """Draw the freeze timeline of one run into ``ax`` (reports put several side by side, Figure 5b)."""
    L = len(unit_names)
    spans: dict[int, list[tuple[float, float, str]]] = {i: [] for i in range(L)}
    state = {i: ("train", 0.0) for i in range(L)}
    for ev in sorted(events, key=lambda e: float(_get(e, "epoch"))):
        u, ep, act = int(_get(ev, "unit")), float(_get(ev, "epoch")), _get(ev, "action")
        if u not in state:
            continue
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
    ax.set_yticks(range(L))
    ax.set_yticklabels(unit_names if labels else [], fontsize=6 if L > 30 else 8)
    ax.set_ylim(L - 0.5, -0.5)
    ax.set_xlim(0, epochs)
    ax.set_xlabel("epoch")
    if labels:
        ax.set_ylabel("unit (forward order)")
    if legend:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=TRAIN_COLOR, label="training"), Patch(color=FROZEN_COLOR, label="frozen")],
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title)


TRAIN_COLOR, FROZEN_COLOR = "#3b75af", "#b9b9b9"


def _get(ev: Any, key: str) -> Any:
    return ev[key] if isinstance(ev, dict) else getattr(ev, key)
