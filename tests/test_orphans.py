"""No orphans: when a process building a database with worker processes is killed, its
workers exit too (Linux: they ask to be signalled when their parent dies)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aenet_fn.examples import TIO2_STRUCTURES

BUILD = """
import sys
from aenet_fn import ChebyshevParams
from aenet_fn.io.database import build_database
params = ChebyshevParams(["Ti", "O"], 20, 6.5, 6, 5.0, min_cutoff=0.5)
files = sys.argv[2:] * 20
build_database(sys.argv[1], files, descriptor_params=params, persist_features=True,
               persist_force_derivatives=True, build_workers=2, show_progress=False)
"""


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_build_workers_exit_when_the_build_is_killed(tmp_path):
    files = [str(p) for p in sorted(TIO2_STRUCTURES.glob("*.xsf"))[:10]]
    build = subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path / "db.h5"), *files])
    try:
        deadline = time.monotonic() + 60
        workers: set[int] = set()
        while len(workers) < 2 and time.monotonic() < deadline and build.poll() is None:
            workers = _children(build.pid)
            time.sleep(0.05)
        assert len(workers) >= 2, "the build did not start its workers"
        os.kill(build.pid, signal.SIGKILL)
        build.wait()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in workers)
    finally:
        if build.poll() is None:
            build.kill()
