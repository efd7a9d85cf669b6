"""Attainment-vs-rate plots (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_attainment(curves: dict[str, tuple[np.ndarray, np.ndarray]], target: float, path: Path,
                    title: str) -> None:
    """curves: label -> (rate per GPU, attainment). One line each, with the target as a dashed line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        for label, (rates, attainment) in curves.items():
            ax.plot(rates, attainment * 100, marker="o", markersize=3, label=label)
        ax.axhline(target * 100, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
        ax.set_xlabel("rate per GPU (req/s)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 102)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
