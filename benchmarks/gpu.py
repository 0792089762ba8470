"""Committees with forces on an accelerator: seconds per epoch and peak device memory for 1, 8
and 64 members, the script to run once whenever a GPU is lent.

Run: ``python -m benchmarks.gpu [--device cuda] [--structures 2000] [--members 1 8 64]
[--epochs 2] [--out gpu.json]`` (``--quick``: 24 structures, 1 and 2 members, 1 epoch, for a
check on the CPU). Data: ``aenet_fn.examples.emt_alloys`` (Cu/Ni/Au fcc cells of 8–108 atoms,
EMT energies and forces, generated on the host). Descriptor [Cu, Ni, Au] rad 8/4.0 Å, ang
4/3.0 Å, min 0.5 Å; 2×(16, tanh) per species; Adam; batch 32; force weight 0.1; float64; every
member draws its own batches. The featurized set and the members are built on the host and
moved with ``af.to``. Per committee size: the mean epoch (from the run's history: the run's
one-time set-up is left out), the peak device memory of that run (CUDA only), the ratio to one
member, and the training route (off the CPU the CPU-only speed-ups step aside). A size that
fails records its error and the next one runs, so one run gives every answer it can. Writes the
JSON to ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import aenet_fn as af
from aenet_fn.driver.committee import committee_fit, init_committee, member_seeds
from aenet_fn.examples import emt_alloys
from benchmarks._common import markdown_table, peak_rss_mib, setup_info

PARAMS = af.ChebyshevParams(
    species=["Cu", "Ni", "Au"],
    rad_order=8,
    rad_cutoff=4.0,
    ang_order=4,
    ang_cutoff=3.0,
    min_cutoff=0.5,
)
ARCH = {s: [(16, "tanh"), (16, "tanh")] for s in PARAMS.species}
BATCH_SIZE = 32
FORCE_WEIGHT = 0.1
COLUMNS = [
    ("members", "members"),
    ("epoch_s", "s/epoch"),
    ("vs_one_member", "× one member"),
    ("peak_device_mib", "peak device MiB"),
    ("route", "route"),
    ("error", "error"),
]


def route_of(device: torch.device) -> str:
    """The training route a committee takes on ``device``."""
    if device.type == "cpu":
        return "cpu speed-ups"  # hand-derived energy gradient, stored Jacobians, fused Adam
    return "autograd + pure updates"


def committee_row(
    train: af.FeaturizedSet, size: int, config: af.TrainConfig, device: torch.device
) -> dict[str, Any]:
    """Train a committee of ``size`` members on ``device``; its mean epoch and peak memory."""
    members = init_committee(PARAMS, ARCH, train, config, member_seeds(size))
    members = af.to(members, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    states = committee_fit(members, train, None, config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    history = states[0].history
    row: dict[str, Any] = {
        "members": size,
        "epoch_s": sum(r["epoch_time"] for r in history) / len(history),
        "route": route_of(device),
    }
    if device.type == "cuda":
        row["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def run(device: torch.device, n_structures: int, sizes: list[int], epochs: int) -> dict:
    """Every committee size on ``device``: the setup and one row per size."""
    started = time.perf_counter()
    structures = emt_alloys(n_structures, seed=7)
    generated = time.perf_counter() - started
    train = af.featurize_structures(PARAMS, structures, with_derivatives=True)
    featurized = time.perf_counter() - started - generated
    train = af.to(train, device=device)
    config = af.TrainConfig(epochs=epochs, batch_size=BATCH_SIZE, force_weight=FORCE_WEIGHT)
    rows = []
    for size in sizes:
        try:
            rows.append(committee_row(train, size, config, device))
        except Exception as error:  # record it and go on: one lent run answers all it can
            rows.append({"members": size, "error": f"{type(error).__name__}: {error}"})
            traceback.print_exc()
    one = next((r["epoch_s"] for r in rows if r["members"] == 1 and "epoch_s" in r), None)
    for row in rows:
        if one and "epoch_s" in row:
            row["vs_one_member"] = row["epoch_s"] / one
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    setup = setup_info(
        device=str(device),
        device_name=device_name,
        dtype="float64",
        data=f"emt_alloys({n_structures}, seed=7): {sum(s.n_atoms for s in structures)} atoms",
        descriptor="[Cu,Ni,Au] rad 8/4.0 ang 4/3.0 min 0.5",
        arch="2x(16,tanh) per species",
        batch=BATCH_SIZE,
        force_weight=FORCE_WEIGHT,
        epochs=epochs,
        generate_s=round(generated, 2),
        featurize_s=round(featurized, 2),
        peak_rss_mib=round(peak_rss_mib(), 1),
    )
    return {"benchmark": "gpu", "setup": setup, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default)
    parser.add_argument("--structures", type=int, default=2000)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.structures, args.members, args.epochs = 24, [1, 2], 1
    result = run(torch.device(args.device), args.structures, args.members, args.epochs)
    text = json.dumps(result, indent=2)
    if args.out is not None:
        temporary = args.out.with_name(args.out.name + ".tmp")
        temporary.write_text(text + "\n")
        temporary.replace(args.out)
    print(text)
    print(markdown_table(result["results"], COLUMNS))


if __name__ == "__main__":
    main()
