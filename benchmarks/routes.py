"""The CPU's fast route against the ``torch.func`` route: keep a speed-up only where it is at
least 1.3× faster end to end on both data sets.

Run: ``python -m benchmarks.routes [--quick] [--out FILE]``. Prints JSON, then a table. Data: the
TiO2 benchmark set (100 structures, the common descriptor and networks of
``benchmarks._common``, batch 16) and a 2 000-structure EMT set (``emt_alloys(2000, seed=7)``,
the descriptor and networks of ``benchmarks.gpu``, batch 32). Modes: energy-only and forces
(force weight 0.1, every structure's forces), one model and a committee of 8 members drawing
their own batches; each a whole ``fit`` / ``committee_fit`` with ``route="func"`` and with
``route="fast"`` (energy tables for energy-only epochs, stored Jacobians for force batches,
each where it applies: ``applied`` says whether it did).

The two routes of a case run alternately, ``--rounds`` times, in this one process; each keeps its
best round. A run's cost is its set-up (what ``fit`` builds before the first epoch: stored
Jacobians, energy tables) plus its epochs; ``run_100_s`` is that set-up plus 100 of its best
epochs, and ``vs_func`` the func route's ``run_100_s`` over the fast route's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import attrs

import aenet_fn as af
from aenet_fn.driver.committee import committee_fit, init_committee, member_seeds
from aenet_fn.examples import emt_alloys
from benchmarks import _common, gpu
from benchmarks._common import markdown_table, peak_rss_mib, report, setup_info

KEEP_AT = 1.3
"""The least end-to-end speed-up (func route time over the variant's) that keeps a speed-up."""
RUN_EPOCHS = 100
"""Epochs of the run whose end-to-end time decides (set-up paid once, then this many)."""


@attrs.frozen
class DataSet:
    """A benchmark data set with its descriptor, networks and batch size."""

    name: str
    train: af.FeaturizedSet
    params: af.ChebyshevParams
    arch: dict
    batch_size: int


ROUTES = ("func", "fast")


def _timed_run(data: DataSet, config: af.TrainConfig, members: int) -> tuple[float, float, bool]:
    """``(set-up s, best epoch s, whether a speed-up applied)`` of one run of ``config``."""
    start = time.perf_counter()
    if members == 1:
        model = af.init_model(data.params, data.arch, data.train, seed=0)
        run = af.init_train_state(model, data.train, config)
        speedups = af.prepare_speedups(run, data.train, None, config)
        states = [af.fit(run, data.train, None, config, speedups=speedups)]
    else:
        committee = init_committee(
            data.params, data.arch, data.train, config, member_seeds(members)
        )
        speedups = af.prepare_speedups(committee, data.train, None, config)
        states = list(committee_fit(committee, data.train, None, config, speedups=speedups))
    wall = time.perf_counter() - start
    epochs = [row["epoch_time"] for row in states[0].history]
    return wall - sum(epochs), min(epochs), speedups.applied


def measure_case(data: DataSet, forces: bool, members: int, epochs: int, rounds: int) -> list[dict]:
    """Rows of one case: each route's best set-up and epoch over ``rounds`` alternating
    rounds, its ``run_100_s`` and ``vs_func``."""
    config = af.TrainConfig(
        epochs=epochs, batch_size=data.batch_size, force_weight=0.1 if forces else 0.0
    )
    best: dict[str, tuple[float, float]] = {}
    applied = False
    for _ in range(rounds):
        for route in ROUTES:
            setup, epoch, used = _timed_run(data, attrs.evolve(config, route=route), members)
            applied |= used
            old = best.get(route, (float("inf"), float("inf")))
            best[route] = (min(old[0], setup), min(old[1], epoch))
    func_run = best["func"][0] + RUN_EPOCHS * best["func"][1]
    rows = []
    for route in ROUTES:
        setup, epoch = best[route]
        run = setup + RUN_EPOCHS * epoch
        rows.append(
            {
                "data": data.name,
                "mode": "forces" if forces else "energy",
                "members": members,
                "route": route,
                "applied": applied if route == "fast" else None,
                "setup_s": setup,
                "epoch_s": epoch,
                "run_100_s": run,
                "vs_func": func_run / run,
            }
        )
    return rows


def data_sets(quick: bool) -> list[DataSet]:
    """The TiO2 benchmark set and the EMT set (smaller with ``quick``)."""
    tio2 = _common.tio2_structures(20 if quick else None)
    emt = emt_alloys(100 if quick else 2000, seed=7)
    return [
        DataSet(
            "tio2",
            af.featurize_structures(_common.PARAMS, tio2, with_derivatives=True),
            _common.PARAMS,
            _common.ARCH,
            _common.BATCH_SIZE,
        ),
        DataSet(
            f"emt{len(emt)}",
            af.featurize_structures(gpu.PARAMS, emt, with_derivatives=True),
            gpu.PARAMS,
            gpu.ARCH,
            gpu.BATCH_SIZE,
        ),
    ]


def verdicts(rows: list[dict]) -> dict[str, Any]:
    """Per speed-up (energy tables: energy-only epochs; stored Jacobians: force batches) and
    committee size, its least end-to-end gain over the data sets where it applied, and
    whether that reaches ``KEEP_AT``; None where it applied nowhere."""
    gains: dict[str, list[float]] = {}
    for row in rows:
        if row["route"] == "fast":
            part = "energy tables" if row["mode"] == "energy" else "stored Jacobians"
            key = f"{part}, {row['members']} member(s)"
            gains.setdefault(key, [])
            if row["applied"]:
                gains[key].append(row["vs_func"])
    return {
        what: {
            "least_gain": min(values) if values else None,
            "keep": min(values) >= KEEP_AT if values else None,
        }
        for what, values in gains.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sets, 1 epoch, 1 round")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = _common.parse_benchmark_arguments(parser)
    if args.quick:
        args.epochs, args.rounds = 2, 1
    rows = []
    for data in data_sets(args.quick):
        for forces in (False, True):
            for members in (1, args.members):
                rows += measure_case(data, forces, members, args.epochs, args.rounds)
    result = {
        "benchmark": "routes",
        "setup": setup_info(
            dtype="float64",
            device="cpu",
            epochs=args.epochs,
            rounds=args.rounds,
            peak_rss_mib=round(peak_rss_mib(), 1),
        ),
        "results": rows,
        "verdicts": verdicts(rows),
    }
    if args.out is not None:
        temporary = args.out.with_name(args.out.name + ".tmp")
        temporary.write_text(json.dumps(result, indent=2) + "\n")
        temporary.replace(args.out)
    report("routes", result["setup"], rows)
    print()
    print(
        markdown_table(
            [{"what": k, **v} for k, v in result["verdicts"].items()],
            [("what", "speed-up"), ("least_gain", "least gain"), ("keep", f"≥ {KEEP_AT}×")],
        )
    )


if __name__ == "__main__":
    main()
