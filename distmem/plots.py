"""One way to draw a job's result plot (a PNG beside metrics.json)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def line_plot(path: str | Path, title: str, xlabel: str, ylabel: str,
              legend_size: float | None = None) -> Iterator[Any]:
    """Yields matplotlib axes to draw on; then labels, a grid and a legend go on, and the figure
    is saved to `path` (6 x 4 in, 120 dpi) and closed."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")  # no display: jobs run headless
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
