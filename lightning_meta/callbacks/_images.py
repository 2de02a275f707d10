"""Saving a figure and handing it to whichever loggers can show images (no logger is assumed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def figure_dir(trainer, name: str) -> Path:
    """``<the run's folder>/<name>``: the logger's version folder (TensorBoard, CSV: ``lightning_logs/version_N``),
    the W&B run's own folder (``wandb/run-.../``; Lightning's ``log_dir`` would be W&B's ``save_dir``, by default the
    working directory), or without a logger ``default_root_dir``."""
    run = getattr(trainer.loggers[0], "experiment", None) if trainer.loggers else None
    run_dir = getattr(run, "dir", None) if type(run).__module__.startswith("wandb") else None
    root = Path(run_dir).parent if isinstance(run_dir, str) else Path(trainer.log_dir or trainer.default_root_dir)
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_and_log(trainer, fig, path: Path, key: str) -> Path:
    """Write ``fig`` as a PNG and log it to every logger that takes images (W&B, TensorBoard); others keep the file."""
    fig.savefig(path, dpi=100, bbox_inches="tight")
    for logger in trainer.loggers:
        if callable(getattr(logger, "log_image", None)):  # WandbLogger and others with the same method
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
        elif callable(getattr(getattr(logger, "experiment", None), "add_image", None)):  # TensorBoard
            from PIL import Image

            image = np.asarray(Image.open(path).convert("RGB"))
            logger.experiment.add_image(key, image, trainer.global_step, dataformats="HWC")
    return path


def new_figure(figsize: tuple[float, float]):
    """A matplotlib Figure on its own Agg canvas: no pyplot, so the user's backend and open figures are untouched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("The image callbacks need matplotlib: pip install 'lightning-meta[plots]'.") from err
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig
