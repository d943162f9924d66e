"""Plots of the training reports: one place that turns a matplotlib figure into PNG bytes.

matplotlib is optional (the [train] extra); callers import it lazily and treat ImportError as "no plot".
"""
from __future__ import annotations

PNG_DPI = 110  # 3.6-inch panels come out ~400 px wide: readable in a README, small in git


def png_bytes(fig, dpi: int = PNG_DPI) -> bytes:
    """The figure as PNG bytes (for an atomic write); the figure is closed afterwards."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()
