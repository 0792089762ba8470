"""Training speed on the TiO2 reference set: seconds per epoch and peak memory.

Run: ``python -m benchmarks.train [--epochs N]``. Prints JSON, then a table. Setup (issue 3):
../shared/data/tio2 (100 structures, all used for training), descriptor [Ti, O] rad 10/6.0 Å,
ang 3/3.5 Å, min 0.5 Å, networks 2×(10, tanh), Adam, batch 16, float64, CPU, 2 threads.
Modes: energy-only (features computed once and reused) and forces (force_weight 0.1, every
structure's forces supervised). Each mode runs in its own process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from benchmarks._common import SHARED_DATA, peak_rss_mib, report, setup_info

ARCH = {"Ti": [(10, "tanh"), (10, "tanh")], "O": [(10, "tanh"), (10, "tanh")]}


def measure(mode: str, epochs: int) -> dict:
    """Featurize the set, then time ``epochs`` epochs of ``mode`` (after one warm-up epoch)."""
    import aenet_fn as af

    params = af.ChebyshevParams(
        species=["Ti", "O"],
        rad_order=10,
        rad_cutoff=6.0,
        ang_order=3,
        ang_cutoff=3.5,
        min_cutoff=0.5,
    )
    structures = af.read_structures(SHARED_DATA / "tio2")
    forces = mode == "forces"
    start = time.perf_counter()
    train = af.featurize_structures(params, structures, with_derivatives=forces)
    featurize_s = time.perf_counter() - start
    model = af.init_model(params, ARCH, train, seed=0)
    config = af.TrainConfig(epochs=1, batch_size=16, force_weight=0.1 if forces else 0.0)
    state = af.fit(af.init_train_state(model, train, config), train, None, config)
    config = af.TrainConfig(epochs=epochs, batch_size=16, force_weight=config.force_weight)
    start = time.perf_counter()
    state = af.fit(state, train, None, config)
    seconds = (time.perf_counter() - start) / epochs
    return {
        "mode": mode,
        "structures": train.n_structures,
        "atoms": int(train.n_atoms.sum()),
        "featurize_s": featurize_s,
        "epoch_s": seconds,
        "best_epoch_s": min(row["epoch_time"] for row in state.history[1:]),
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    """Run each mode in a subprocess and print JSON plus a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--mode", choices=["energy", "forces"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.mode:
        print(json.dumps(measure(args.mode, args.epochs)))
        return
    rows = []
    for mode in ("energy", "forces"):
        command = [sys.executable, "-m", "benchmarks.train", "--mode", mode]
        command += ["--epochs", str(args.epochs)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    report(
        "train",
        setup_info(dtype="float64", device="cpu", arch="2x(10,tanh)", optimizer="adam", batch=16),
        rows,
    )


if __name__ == "__main__":
    main()
