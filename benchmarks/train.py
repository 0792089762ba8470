"""Training speed on the TiO2 reference set: seconds per epoch and peak memory.

Run: ``python -m benchmarks.train [--epochs N] [--runs R]``. Prints JSON, then a table. Setup
(issue 3): aenet_fn.examples.TIO2_STRUCTURES (100 structures, all used for training), descriptor
[Ti, O] rad 10/6.0 Å, ang 3/3.5 Å, min 0.5 Å, networks 2×(10, tanh), Adam, batch 16, float64,
CPU, 2 threads.
Modes: energy-only (features computed once and reused) and forces (force_weight 0.1, every
structure's forces supervised). Each mode runs in its own process so that its peak RSS is its own.
Each mode times ``R`` runs of ``N`` epochs from one warmed-up state and reports the mean epoch
of the median and of the best run (other jobs on a shared machine slow whole runs down: the
best run is the least disturbed, as ``timeit`` takes the best of its repeats), the best epoch
and the best window of eight epochs (``fit`` lays out eight energy-only epochs in one plan,
paid in the first of them: the best window is the steadiest figure that includes it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import aenet_fn as af
from aenet_fn.driver.seam import DRAW_AHEAD
from benchmarks._common import (
    ARCH,
    BATCH_SIZE,
    FORCE_WEIGHT,
    PARAMS,
    ROOT,
    parse_benchmark_arguments,
    peak_rss_mib,
    report,
    tio2_description,
    tio2_structures,
    training_setup_info,
)

MODES = ("energy", "forces")
WINDOW = DRAW_AHEAD
"""Epochs per window of the best-window figure: those that fit lays out in one energy plan
(the plan's cost falls in a window's first epoch, so its best single epoch flatters)."""


def _best_window(times: list[float]) -> float:
    """The least mean epoch time of the consecutive windows of ``WINDOW`` epochs (fewer, when
    the run has fewer)."""
    size = min(WINDOW, len(times))
    return min(sum(times[i : i + size]) / size for i in range(0, len(times) - size + 1, size))


def measure(mode: str, epochs: int, n_structures: int | None = None, runs: int = 1) -> dict:
    """Featurize the set, then time ``runs`` fits of ``epochs`` epochs of ``mode``, each from
    the state after one warm-up epoch."""
    structures = tio2_structures(n_structures)
    forces = mode == "forces"
    start = time.perf_counter()
    train = af.featurize_structures(PARAMS, structures, with_derivatives=forces)
    featurize_s = time.perf_counter() - start
    model = af.init_model(PARAMS, ARCH, train, seed=0)
    config = af.TrainConfig(
        epochs=1, batch_size=BATCH_SIZE, force_weight=FORCE_WEIGHT if forces else 0.0
    )
    warm = af.fit(af.init_train_state(model, train, config), train, None, config)
    config = af.TrainConfig(epochs=epochs, batch_size=BATCH_SIZE, force_weight=config.force_weight)
    run_means, run_epochs = [], []  # per run: its mean (wall time) and its epochs' times
    for _ in range(runs):
        start = time.perf_counter()
        state = af.fit(warm, train, None, config)
        run_means.append((time.perf_counter() - start) / epochs)
        run_epochs.append([row["epoch_time"] for row in state.history[len(warm.history) :]])
    return {
        "mode": mode,
        "structures": train.n_structures,
        "atoms": int(train.n_atoms.sum()),
        "featurize_s": featurize_s,
        "runs": runs,
        "epoch_s": statistics.median(run_means),
        "best_run_epoch_s": min(run_means),
        "best_epoch_s": min(min(times) for times in run_epochs),
        "best_window_s": min(_best_window(times) for times in run_epochs),
        "peak_rss_mib": peak_rss_mib(),
    }


def train_rows(
    epochs: int, threads: int, n_structures: int | None = None, runs: int = 1
) -> list[dict]:
    """:func:`measure` of each mode, each in a fresh process (its own peak RSS)."""
    rows = []
    for mode in MODES:
        command = [sys.executable, "-m", "benchmarks.train", "--mode", mode]
        command += ["--epochs", str(epochs), "--runs", str(runs), "--threads", str(threads)]
        if n_structures is not None:
            command += ["--structures", str(n_structures)]
        output = subprocess.run(
            command, check=True, capture_output=True, text=True, cwd=ROOT
        ).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    return rows


def train_setup(rows: list[dict], epochs: int) -> dict:
    """The setup of :func:`train_rows` (``rows``: its result)."""
    return training_setup_info(
        tio2_description(rows[0]["structures"], rows[0]["atoms"]),
        epochs,
        process="one fresh process per mode",
    )


def main() -> None:
    """Run each mode in a subprocess and print JSON plus a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of --epochs each")
    parser.add_argument("--structures", type=int, help="use only the first N structures")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parse_benchmark_arguments(parser)
    if args.mode:
        print(json.dumps(measure(args.mode, args.epochs, args.structures, args.runs)))
        return
    rows = train_rows(args.epochs, args.threads, args.structures, args.runs)
    report("train", train_setup(rows, args.epochs), rows)


if __name__ == "__main__":
    main()
