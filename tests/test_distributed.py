"""Data-parallel training under torchrun (gloo, 2 CPU processes) equals the 1-process run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aenet_fn as af
from aenet_fn.driver.distributed import World, gather_parts, shares
from aenet_fn.torch_training import TorchCommitteePotential
from tests.distributed_fit import (
    CASES,
    build_tio2_database,
    database_run,
    run_cases,
    train_committee,
)

HERE = Path(__file__).resolve().parent


def test_shares_cover_the_batch_in_order():
    selection = torch.tensor([7, 3, 3, 9, 1])
    parts = shares(selection, World(rank=0, size=2))
    assert [p.tolist() for p in parts] == [[7, 3, 3], [9, 1]]
    assert torch.equal(torch.cat(shares(selection, World(rank=1, size=3))), selection)
    errors = torch.tensor([0.5, -0.25])
    assert gather_parts(errors, [2], World()) is errors


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    out, database = tmp_path / "two.pt", tmp_path / "tio2.h5"
    build_tio2_database(str(database))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(HERE / "distributed_fit.py"), str(out), str(database)]
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    two = torch.load(out, weights_only=True)
    assert two["world_size"] == 2
    one = run_cases()
    # Adam divides each gradient element by its own magnitude, so elements that are sums of
    # cancelling terms carry their round-off (~1e-8 relative) into the update: 1e-9 absolute on
    # weights of order 1 after 6 steps at lr 1e-3; a wrong reduction differs by ~1e-4.
    for name in CASES:
        torch.testing.assert_close(two[name]["values"], one[name]["values"], rtol=0, atol=1e-9)
        torch.testing.assert_close(two[name]["scores"], one[name]["scores"], rtol=1e-8, atol=0)
        for row_two, row_one in zip(two[name]["history"], one[name]["history"]):
            for a, b in zip(row_two, row_one):
                assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-8)
    # two processes reading their shares of each batch from the database train alike
    torch.testing.assert_close(two["database"], one["uniform-forces"]["values"], rtol=0, atol=1e-9)
    torch.testing.assert_close(
        database_run(str(database)), one["uniform-forces"]["values"], rtol=0, atol=1e-9
    )
    # committee members spread over the two ranks equal the members trained in one process,
    # and rank 0 wrote the metadata of all of them
    alone = train_committee(tmp_path / "one")
    spread = TorchCommitteePotential.from_directory(tmp_path / "committee")
    for together, by_rank, member in zip(alone, two["committee"], spread.members):
        torch.testing.assert_close(by_rank, together, rtol=0, atol=1e-12)
        torch.testing.assert_close(member.model.network.values, together, rtol=0, atol=1e-12)
    # the facade's unset seeds are drawn once and shared, so both ranks split alike
    (seed_0, split_0), (seed_1, split_1) = two["facade_seeds"]
    assert (seed_0, split_0) == (seed_1, split_1) and split_0 is not None
    # the runs really trained: weights moved from the common initial model
    assert not torch.equal(one["uniform-forces"]["values"], one["error-weighted-energy"]["values"])


def test_fit_outside_a_process_group_is_single_process():
    assert af.driver.distributed.current_world() == World(rank=0, size=1)
