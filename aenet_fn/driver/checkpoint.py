"""Checkpoints: atomic writes, loading that never runs code, and pure rotation.

A checkpoint is ``torch.save`` of a plain tree (see :mod:`aenet_fn.core.serialization`) holding the
whole :class:`~aenet_fn.driver.state.TrainState` and the
:class:`~aenet_fn.driver.state.TrainConfig`; it is read back with ``torch.load(...,
weights_only=True)``. Files are written to a temporary name in the target folder and renamed into
place, so a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from aenet_fn.core.checks import is_integer
from aenet_fn.core.potential import check_model_values
from aenet_fn.core.serialization import from_tree, to_tree
from aenet_fn.driver.state import TrainConfig, TrainState
from aenet_fn.io.atomic import replacing

CHECKPOINT_FORMAT = "aenet_fn-checkpoint"
CHECKPOINT_VERSION = 1
BEST_MODEL = "best_model.pt"
_NUMBERED = re.compile(r"^checkpoint_epoch_(\d+)\.pt$")


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (see :mod:`aenet_fn.io.atomic`); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as temporary, open(temporary, "xb") as stream:
        torch.save(payload, stream)
    return path


def safe_torch_load(path: str | os.PathLike, expected_format: str) -> dict:
    """``torch.load(path, weights_only=True)`` with clear errors for missing, corrupt and
    foreign files; the payload must be a dict whose ``format`` is ``expected_format``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable {expected_format} file ({error})") from error
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: not an {expected_format} file (found {found!r})")
    return payload


def checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint written after (0-based) ``epoch``."""
    return f"checkpoint_epoch_{epoch:04d}.pt"


def _check_record(value: Any, expected: type, what: str) -> None:
    if not isinstance(value, expected):
        raise TypeError(f"{what}: expected a {expected.__name__}, got {type(value).__name__}")


def save_checkpoint(path: str | os.PathLike, state: TrainState, config: TrainConfig) -> Path:
    """Write ``state`` and ``config`` to ``path`` atomically (refused, and nothing written,
    unless they are a TrainState and a TrainConfig)."""
    _check_record(state, TrainState, "save_checkpoint: state")
    _check_record(config, TrainConfig, "save_checkpoint: config")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "torch_version": str(torch.__version__),
        "state": to_tree(state),
        "config": to_tree(config),
    }
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | os.PathLike) -> tuple[TrainState, TrainConfig]:
    """``(state, config)`` from a checkpoint written by :func:`save_checkpoint`; refuses a
    file whose records are of other types, whose model is not whole and finite, or whose
    optimiser state, sampler scores or best model hold a non-finite number."""
    payload = safe_torch_load(path, CHECKPOINT_FORMAT)
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')!r} is not supported")
    try:
        state, config = from_tree(payload["state"]), from_tree(payload["config"])
        _check_record(state, TrainState, f"{path}: state")
        _check_record(config, TrainConfig, f"{path}: config")
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: corrupt checkpoint ({error})") from error
    check_model_values(state.model, str(path))
    parts = {"optimizer state": state.opt_state, "sampler scores": state.sampler.scores}
    if state.best_values is not None:
        parts["best model's parameters"] = state.best_values
    for what, tree in parts.items():
        leaves = [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]
        if any(leaf.is_floating_point() and not bool(leaf.isfinite().all()) for leaf in leaves):
            raise ValueError(f"{path}: the checkpoint's {what} are not all finite")
    return state, config


def numbered_checkpoints(names: Sequence[str]) -> list[str]:
    """The numbered checkpoint names among ``names``, oldest epoch first (by number, not by
    text: epoch 10000 comes after epoch 9999)."""
    numbered = sorted((int(m.group(1)), n) for n in names if (m := _NUMBERED.match(n)))
    return [name for _, name in numbered]


def newest_checkpoint(folder: str | os.PathLike | None) -> Path | None:
    """The numbered checkpoint of the latest epoch in ``folder`` (None: none, or no folder)."""
    if folder is None or not Path(folder).is_dir():
        return None
    names = numbered_checkpoints([p.name for p in Path(folder).iterdir()])
    return Path(folder) / names[-1] if names else None


def checkpoints_to_delete(names: Sequence[str], max_checkpoints: int | None) -> list[str]:
    """Which numbered checkpoints to delete so that the ``max_checkpoints`` newest remain
    (pure; other file names are ignored; None keeps all)."""
    numbered = numbered_checkpoints(names)
    if max_checkpoints is None or len(numbered) <= max_checkpoints:
        return []
    return numbered[: len(numbered) - max_checkpoints]


class CheckpointWriter:
    """Callback for :func:`~aenet_fn.driver.train.fit`: a numbered checkpoint every ``interval``
    epochs (0: none), rotation to ``max_checkpoints`` files, and ``best_model.pt`` whenever the
    validation monitor improves (``save_best``)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        config: Any,
        interval: int = 1,
        max_checkpoints: int | None = None,
        save_best: bool = True,
    ) -> None:
        if not (is_integer(interval) and interval >= 0):
            raise ValueError(f"checkpoint interval must be an integer >= 0, got {interval!r}")
        if max_checkpoints is not None and not (
            is_integer(max_checkpoints) and max_checkpoints >= 1
        ):
            raise ValueError(
                f"max_checkpoints must be an integer >= 1 or None, got {max_checkpoints!r}"
            )
        _check_record(config, TrainConfig, "CheckpointWriter: config")
        self.directory = Path(directory)
        self.config = config
        self.interval = interval
        self.max_checkpoints = max_checkpoints
        self.save_best = save_best

    def __call__(self, state: Any) -> None:
        """Write what is due after the epoch ``state.epoch - 1``."""
        epoch = state.epoch - 1
        if self.interval and state.epoch % self.interval == 0:
            save_checkpoint(self.directory / checkpoint_name(epoch), state, self.config)
            existing = [p.name for p in self.directory.iterdir()]
            for name in checkpoints_to_delete(existing, self.max_checkpoints):
                (self.directory / name).unlink(missing_ok=True)
        if self.save_best and state.best_epoch == epoch:
            save_checkpoint(self.directory / BEST_MODEL, state, self.config)
