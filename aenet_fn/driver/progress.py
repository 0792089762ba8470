"""Progress bars for :func:`~aenet_fn.driver.train.fit` (tqdm), as callbacks."""

from __future__ import annotations

import math
from typing import Any

from tqdm.auto import tqdm


class EpochProgress:
    """An epoch-level tqdm bar showing the latest metrics; call :meth:`close` when done.

    Use as ``fit(..., callbacks=[bar])``; ``bar.on_batch`` may be passed as ``on_batch`` for a
    second, batch-level bar (``show_batches=True``).
    """

    def __init__(self, epochs: int, show_batches: bool = False, disable: bool = False) -> None:
        self.bar = tqdm(total=epochs, desc="train", unit="epoch", disable=disable)
        self.batch_bar = tqdm(
            desc="batches", unit="batch", leave=False, disable=disable or not show_batches
        )

    def on_batch(self, done: int, total: int) -> None:
        """Advance the batch bar (``done`` of ``total`` in this epoch)."""
        if self.batch_bar.total != total:
            self.batch_bar.reset(total=total)
        self.batch_bar.n = done
        self.batch_bar.refresh()

    def __call__(self, state: Any) -> None:
        """Advance the epoch bar and show the newest history row."""
        row = state.history[-1]
        shown = {
            "E_train": row["RMSE_train"],
            "E_test": row["RMSE_test"],
            "F_train": row["RMSE_force_train"],
            "F_test": row["RMSE_force_test"],
        }
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items() if not math.isnan(v)})
        self.bar.update(1)

    def close(self) -> None:
        """Close both bars."""
        self.batch_bar.close()
        self.bar.close()
