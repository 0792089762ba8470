"""A full disk is an error, never a crash: each command run in a subprocess whose file size is
limited (``RLIMIT_FSIZE``, so writes fail with ``EFBIG`` as on a full disk) exits with status 1
and one line naming the file it could not write, leaves no temporary file, and keeps what was
there before."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aenet_fn.examples import TIO2_STRUCTURES
from tests.test_cli import tables, write_config

resource = pytest.importorskip("resource")  # POSIX only

DESCRIPTOR = '{"descriptor": {"species": ["Ti", "O"], "rad_order": 6, "rad_cutoff": 5.0, "ang_order": 3, "ang_cutoff": 3.5, "min_cutoff": 0.5}}'  # noqa: E501


def run_limited(folder: Path, limit: int | None, *args: str) -> subprocess.CompletedProcess:
    """``aenet-fn args`` in ``folder``, its files limited to ``limit`` bytes (None: no limit)."""

    def limited() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "aenet_fn", "--threads", "1", *args]
    return subprocess.run(
        command, cwd=folder, preexec_fn=limited, capture_output=True, text=True, timeout=300
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_failed_cleanly(done: subprocess.CompletedProcess, folder: Path, command: str) -> str:
    """Exit status 1, one line of standard error naming the file, no temporary file left."""
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"aenet-fn {command}: error: ") and "File too large" in lines[0]
    assert not [p for p in folder.rglob("*.tmp")], sorted(folder.rglob("*"))
    return lines[0]


@pytest.mark.parametrize("forces", [False, True])
def test_a_database_build_that_fills_the_disk_fails_cleanly(tmp_path, forces):
    (tmp_path / "descriptor.json").write_text(DESCRIPTOR)
    build = ["featurize", str(TIO2_STRUCTURES), "--output", "db.h5", "--no-progress"]
    build += ["--descriptor", "descriptor.json", *(["--forces"] if forces else [])]
    assert run_limited(tmp_path, None, *build[:4], "--no-progress").returncode == 0
    before = snapshot(tmp_path)
    done = run_limited(tmp_path, 200_000, *build, "--overwrite")
    line = assert_failed_cleanly(done, tmp_path, "featurize")
    assert "db.h5: File too large" in line
    assert snapshot(tmp_path) == before  # the database of the first build is intact


def test_a_training_run_that_fills_the_disk_fails_cleanly_and_keeps_the_old_run(tmp_path):
    config = tables()
    config["training"]["checkpoint_dir"] = "checkpoints"
    path = write_config(tmp_path, config, toml=False).name
    assert run_limited(tmp_path, None, "train", path, "--no-progress").returncode == 0
    before = snapshot(tmp_path)
    for limit in (2_000, 40_000):  # the first checkpoint, or the plots, cannot be written
        done = run_limited(tmp_path, limit, "train", path, "--no-progress", "--overwrite")
        line = assert_failed_cleanly(done, tmp_path, "train")
        assert str(tmp_path / "run") in line
        assert snapshot(tmp_path) == before  # --overwrite restores the old run on failure
