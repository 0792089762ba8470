"""Peak memory of force training: derivatives kept in memory against recomputed per batch.

Run: ``python -m benchmarks.memory [--epochs N] [--out FILE]``. Prints JSON, then a table. Data:
the 100 TiO2 structures, all for training, forces of every structure (force weight 0.1),
Adam, batch 16, float64, through ``TorchANNPotential.train``; two descriptors: the benchmarks'
common one ([Ti, O] rad 10/6.0 Å, ang 3/3.5 Å; 30 features) and the published TiO2 potential's
(``aenet_fn.examples.TIO2_POTENTIAL``: rad 20/6.5 Å, ang 6/5.0 Å; 56 features), networks
2×(10, tanh). Two ways to hold the derivatives: ``in memory`` (the default budget: local
derivatives and, on the CPU's fast route, stored Jacobians) and ``per batch``
(``memory_budget_gib=0``: recomputed for each batch). Each case runs in its own process, so its
peak RSS (``VmHWM``) is its own; ``setup_s`` is the time before the first epoch (featurizing,
stored Jacobians), ``epoch_s`` the mean epoch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import ROOT, markdown_table, peak_rss_mib, report, setup_info

DESCRIPTORS = ("common", "published")
MODES = {"in memory": 8.0, "per batch": 0.0}
COLUMNS = [
    ("descriptor", "descriptor"),
    ("features", "features"),
    ("mode", "derivatives"),
    ("setup_s", "set-up (s)"),
    ("epoch_s", "s / epoch"),
    ("peak_rss_mib", "peak RSS (MiB)"),
]


def measure(descriptor: str, mode: str, epochs: int) -> dict:
    """Train once in this process; the row of ``descriptor`` and ``mode``."""
    import aenet_fn as af
    from aenet_fn.examples import TIO2_POTENTIAL
    from aenet_fn.torch_featurize import ChebyshevDescriptor
    from aenet_fn.torch_training import Adam, TorchANNPotential, TorchTrainingConfig
    from benchmarks._common import PARAMS, tio2_structures

    if descriptor == "published":
        params = af.read_aenet_ascii(sorted(TIO2_POTENTIAL.glob("*.nn.ascii"))).descriptor
    else:
        params = PARAMS
    potential = TorchANNPotential(
        {s: [(10, "tanh"), (10, "tanh")] for s in params.species},
        ChebyshevDescriptor.from_params(params),
    )
    config = TorchTrainingConfig(
        iterations=epochs,
        method=Adam(batchsize=16),
        force_weight=0.1,
        testpercent=0,
        seed=0,
        memory_budget_gib=MODES[mode],
        checkpoint_dir=None,
        show_progress=False,
        device="cpu",
    )
    start = time.perf_counter()
    potential.train(structures=tio2_structures(), config=config)
    wall = time.perf_counter() - start
    epoch_times = [row["epoch_time"] for row in potential.history]
    return {
        "descriptor": descriptor,
        "features": params.n_features,
        "mode": mode,
        "setup_s": wall - sum(epoch_times),
        "epoch_s": sum(epoch_times) / len(epoch_times),
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", nargs=2, metavar=("DESCRIPTOR", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(*args.one, args.epochs)))
        return
    rows = []
    for descriptor in DESCRIPTORS:
        for mode in MODES:
            command = [sys.executable, "-m", "benchmarks.memory", "--one", descriptor, mode]
            command += ["--epochs", str(args.epochs), "--threads", str(args.threads)]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    setup = setup_info(
        dtype="float64", device="cpu", data="tio2: 100 structures", epochs=args.epochs
    )
    if args.out is not None:
        temporary = args.out.with_name(args.out.name + ".tmp")
        temporary.write_text(json.dumps({"setup": setup, "results": rows}, indent=2) + "\n")
        temporary.replace(args.out)
    report("memory", setup, rows)
    print()
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
