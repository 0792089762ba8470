"""A training run's output folder belongs to one run at a time.

* **Lock**: ``.aenet-fn.lock`` (the owner's process id and host) is created exclusively when a
  run starts and removed when it ends; a second run into the same folder is refused while the
  owner lives (a lock left by a killed process on this host is taken over).
* **Another run's outputs** (a model, a committee, checkpoints) are never mixed with a new
  run's: the command refuses, continues that run (``--resume``: from its newest checkpoint,
  with the split recorded in ``run.json``), or replaces it as a whole (``--overwrite``: its
  outputs are set aside while the new run trains, deleted when it succeeds and put back when
  it fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from aenet_fn.cli.errors import CLIError
from aenet_fn.io.atomic import atomic_write_text
from aenet_fn.io.strict_json import strict_json_loads

LOCK = ".aenet-fn.lock"
RECORD = "run.json"
SET_ASIDE = ".replaced-run"
OUTPUT_NAMES = (
    "model.pt",
    "committee_metadata.json",
    "history.json",
    "history.csv",
    "energies.train.0",
    "energies.test.0",
    "metrics.json",
    "training_summary.png",
    "parity.png",
    RECORD,
)
"""The files a training run writes into its folder (besides ``member_*`` and checkpoints)."""


def run_outputs(folder: Path, checkpoints: Path | None) -> list[Path]:
    """What a training run left in ``folder``: its files, committee members and checkpoint
    folder (``checkpoints``, when it holds checkpoints)."""
    if not folder.is_dir():
        return []
    found = [folder / name for name in OUTPUT_NAMES if (folder / name).exists()]
    found += sorted(folder.glob("member_[0-9][0-9][0-9]"))
    inside = checkpoints is not None and checkpoints.resolve().parent == folder.resolve()
    if inside and any(checkpoints.glob("*.pt")):
        found.append(checkpoints)
    return found


def read_record(folder: Path) -> dict:
    """The run's ``run.json`` (its split seed), refused by name when missing or unreadable."""
    path = folder / RECORD
    try:
        record = strict_json_loads(path.read_text(encoding="utf-8"))
        int(record["split_seed"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CLIError(f"{path}: cannot resume without the run's record ({error})") from None
    return record


def write_record(folder: Path, split_seed: int) -> None:
    """Record what a resumed run needs to draw the same split."""
    atomic_write_text(folder / RECORD, json.dumps({"split_seed": split_seed}) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; refuses while another live run holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    owner = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid, host = path.read_text(encoding="utf-8").split(maxsplit=1)
                stale = host.strip() == socket.gethostname() and not _alive(int(pid))
            except (OSError, ValueError):
                stale = False
                pid, host = "?", "?"
            if not stale:
                raise CLIError(
                    f"{folder} is in use by another aenet-fn run (process {pid} on "
                    f"{host.strip()}; {path} is its lock): wait for it or choose another "
                    "output folder"
                ) from None
            path.unlink(missing_ok=True)  # left by a killed run on this host
            continue
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(owner)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing_run(folder: Path, outputs: list[Path], checkpoints: Path | None) -> Iterator[None]:
    """Set ``outputs`` (another run's, in ``folder``) aside for the block: deleted when it
    succeeds; when it fails, the new run's outputs are removed and the old ones put back, so
    that the folder holds one run or the other, never a mix."""
    aside = folder / SET_ASIDE
    if aside.exists():
        shutil.rmtree(aside)
    aside.mkdir()
    moved = []
    for path in outputs:
        path.rename(aside / path.name)
        moved.append(path)
    try:
        yield
    except BaseException:
        for new in run_outputs(folder, checkpoints):
            shutil.rmtree(new) if new.is_dir() else new.unlink()
        for path in moved:
            (aside / path.name).rename(path)
        aside.rmdir()
        raise
    shutil.rmtree(aside)
