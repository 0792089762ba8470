"""The main job: train a potential on the built-in EMT alloy data set and summarise it."""

from __future__ import annotations

import math
import time

import torch

from aenet_fn.batch import collate
from aenet_fn.descriptor import ChebyshevParams
from aenet_fn.examples import ALLOY_SPECIES, emt_alloys
from aenet_fn.featurized import featurize_structures
from aenet_fn.optim import AdamConfig
from aenet_fn.potential import energy_and_forces
from aenet_fn.progress import EpochProgress
from aenet_fn.sampling import split_indices
from aenet_fn.train import TrainConfig, evaluate, fit, init_model, init_train_state

DEMO_DESCRIPTOR = ChebyshevParams(
    species=ALLOY_SPECIES, rad_order=8, rad_cutoff=5.0, ang_order=4, ang_cutoff=4.0, min_cutoff=0.5
)
DEMO_ARCH = {s: [(16, "tanh"), (16, "tanh")] for s in ALLOY_SPECIES}


def run_demo(
    n_structures: int = 80, epochs: int = 60, seed: int = 0, show_progress: bool = True
) -> dict:
    """Generate ``n_structures`` EMT alloy cells, train on energies and forces for ``epochs``,
    print a summary and return the final metrics."""
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    start = time.perf_counter()
    print(f"aenet_fn demo: {n_structures} Cu/Ni/Au cells labelled with ASE's EMT calculator")
    structures = emt_alloys(n_structures, seed=seed)
    train_idx, test_idx = split_indices(
        len(structures), 0.2, generator=torch.Generator().manual_seed(seed)
    )
    train_structures = [structures[i] for i in train_idx]
    test_structures = [structures[i] for i in test_idx]
    train = featurize_structures(DEMO_DESCRIPTOR, train_structures, with_derivatives=True)
    test = featurize_structures(DEMO_DESCRIPTOR, test_structures, with_derivatives=True)
    print(
        f"featurized {int(train.n_atoms.sum()) + int(test.n_atoms.sum())} atoms "
        f"({DEMO_DESCRIPTOR.n_features} features each) in {time.perf_counter() - start:.1f} s"
    )
    model = init_model(DEMO_DESCRIPTOR, DEMO_ARCH, train, seed=seed)
    config = TrainConfig(
        epochs=epochs, batch_size=8, force_weight=0.1, optimizer=AdamConfig(lr=5e-3), seed=seed
    )
    progress = EpochProgress(epochs, disable=not show_progress)
    try:
        state = fit(init_train_state(model, train, config), train, test, config, [progress])
    finally:
        progress.close()
    final = {"train": evaluate(state.model, train, True), "test": evaluate(state.model, test, True)}
    energies, forces = energy_and_forces(
        state.model, collate(test_structures, DEMO_DESCRIPTOR.species)
    )
    reference = torch.tensor([s.energy for s in test_structures], dtype=energies.dtype)
    seconds = time.perf_counter() - start
    print()
    header = ("split", "structures", "RMSE E (meV/atom)", "MAE E (meV/atom)", "RMSE F (eV/Å)")
    print(f"{header[0]:<7}{header[1]:>11}{header[2]:>19}{header[3]:>18}{header[4]:>15}")
    for name, data in (("train", train), ("test", test)):
        m = final[name]
        print(
            f"{name:<7}{data.n_structures:>11}{1000 * m['rmse_energy']:>19.1f}"
            f"{1000 * m['mae_energy']:>18.1f}{m['rmse_forces']:>15.3f}"
        )
    worst = int(torch.argmax((energies - reference).abs()))
    print(
        f"largest test error: {test_structures[worst].name} "
        f"{float(energies[worst] - reference[worst]):+.3f} eV; "
        f"mean |F| {float(forces.norm(dim=1).mean()):.3f} eV/Å"
    )
    print(f"trained {epochs} epochs in {seconds:.1f} s in all")
    if not all(math.isfinite(v) for v in final["test"].values()):
        raise RuntimeError("demo: training produced non-finite errors")
    return final
