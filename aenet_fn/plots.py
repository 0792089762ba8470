"""Figures of the command line, built on :class:`~aenet_fn.io.train.TrainOut` and
:class:`~aenet_fn.io.train.Energies` plots, and written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from aenet_fn.io.atomic import replacing
from aenet_fn.io.train import Energies, TrainOut

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write ``figure`` as a PNG to ``path`` atomically (:func:`aenet_fn.io.atomic.replacing`);
    returns the path."""
    with replacing(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    return Path(path)


def committee_training_summary(trainouts: Sequence[TrainOut]) -> Figure:
    """:meth:`TrainOut.plot_training_summary` of the members' mean errors per epoch, with the
    band from the lowest to the highest member shaded."""
    if not trainouts:
        raise ValueError("committee_training_summary: no members")
    frames = [t.errors for t in trainouts]
    stacked = pd.concat(frames, keys=range(len(frames)))
    mean = stacked.groupby(level=1).mean()
    summary = TrainOut.from_torch_history(mean)
    figure = summary.plot_training_summary()
    low, high = stacked.groupby(level=1).min(), stacked.groupby(level=1).max()
    epochs = np.arange(1, len(mean) + 1)
    for axes, (columns, _, _) in zip(figure.axes, summary.summary_panels()):
        colors = {line.get_label(): line.get_color() for line in axes.lines}
        for column, label in zip(columns, ("train", "test")):
            if label in colors:
                axes.fill_between(
                    epochs, low[column], high[column], color=colors[label], alpha=0.2, lw=0
                )
    figure.suptitle(f"Committee of {len(trainouts)}: member mean, band from min to max")
    return figure


def parity_figure(train_file: Path, test_file: Path | None, title: str) -> Figure:
    """:meth:`Energies.plot_correlation` (ANN vs reference energy per atom) of an
    ``energies.train.0`` file and an optional ``energies.test.0`` file."""
    figure = Energies(train_file, test_file).plot_correlation()
    figure.axes[0].set_title(title)
    return figure
