"""A data-parallel training run, launched by tests/test_distributed.py as
``torchrun --standalone --nproc_per_node=2 tests/distributed_fit.py OUT DB.h5`` (gloo, CPU),
and called directly in the test process for the 1-process reference. Rank 0 writes the
results to OUT; DB.h5 is the database of :func:`database_run`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import aenet_fn as af
from aenet_fn.examples import TIO2_STRUCTURES

CASES = {
    "uniform-forces": {"force_weight": 0.3, "sampling_policy": "uniform"},
    "error-weighted-energy": {"force_weight": 0.0, "sampling_policy": "error_weighted"},
    "energy-weighted-subset": {
        "force_weight": 0.2,
        "sampling_policy": "energy_weighted",
        "force_fraction": 0.5,
        "force_scale_unbiased": True,
    },
}


STRUCTURES = 15
"""TiO2 structures of the runs: 11 to train on, 4 to validate on."""


def setup() -> tuple[af.ChebyshevParams, af.FeaturizedSet, af.FeaturizedSet, af.Model]:
    """The descriptor, the training and test sets and the initial model of every case."""
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:STRUCTURES])
    params = af.ChebyshevParams(["Ti", "O"], 6, 5.0, 3, 3.5, min_cutoff=0.5)
    train = af.featurize_structures(params, structures[:11], with_derivatives=True)
    test = af.featurize_structures(params, structures[11:], with_derivatives=True)
    arch = {"Ti": [(5, "tanh")], "O": [(5, "tanh")]}
    references = {"Ti": -1604.604515075, "O": -432.503149303}
    model = af.init_model(params, arch, train, seed=4, atomic_energies=references)
    return params, train, test, model


def run_cases() -> dict[str, dict[str, object]]:
    """Train every case for 2 epochs on 11 TiO2 structures (batches of 4: 4, 4, 3, whose
    shares over 2 processes are uneven), validating on 4 more; returns weights and history."""
    _, train, test, model = setup()
    results = {}
    for name, options in CASES.items():
        config = af.TrainConfig(epochs=2, batch_size=4, seed=9, **options)
        state = af.fit(af.init_train_state(model, train, config), train, test, config)
        results[name] = {
            "values": state.model.network.values,
            "scores": state.sampler.scores,
            "history": [
                [row[k] for k in ("RMSE_train", "MAE_train", "RMSE_test", "RMSE_force_train")]
                for row in state.history
            ],
        }
    return results


def database_run(path: str) -> torch.Tensor:
    """The ``uniform-forces`` case trained from the HDF5 database at ``path`` (the same
    structures, features and derivatives persisted), read lazily: each process reads only its
    share of each batch. Returns the weights."""
    from aenet_fn.driver.database_source import DatabaseSource

    params, _, _, model = setup()
    train = DatabaseSource(params, path, range(11), with_derivatives=True)
    test = DatabaseSource(params, path, range(11, STRUCTURES), with_derivatives=True)
    config = af.TrainConfig(epochs=2, batch_size=4, seed=9, **CASES["uniform-forces"])
    state = af.fit(af.init_train_state(model, train, config), train, test, config)
    train.close()
    test.close()
    return state.model.network.values


def build_tio2_database(path: str) -> None:
    """The database :func:`database_run` reads."""
    from aenet_fn.io.database import build_database

    params = setup()[0]
    build_database(
        path,
        sorted(TIO2_STRUCTURES.glob("*.xsf"))[:STRUCTURES],
        descriptor_params=params,
        persist_features=True,
        persist_force_derivatives=True,
        show_progress=False,
    )


def train_committee(output_dir: Path) -> list[torch.Tensor]:
    """Train a 3-member committee (vmapped per process) into ``output_dir``; under torchrun
    its members are spread over the ranks. Returns the member weights."""
    from aenet_fn.torch_featurize import ChebyshevDescriptor
    from aenet_fn.torch_training import (
        Adam,
        TorchCommitteeConfig,
        TorchCommitteePotential,
        TorchTrainingConfig,
    )

    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:10])
    descriptor = ChebyshevDescriptor(["Ti", "O"], 6, 5.0, 3, 3.5, min_cutoff=0.5)
    committee = TorchCommitteePotential({"Ti": [(4, "tanh")], "O": [(4, "tanh")]}, descriptor)
    config = TorchTrainingConfig(
        iterations=2,
        method=Adam(mu=0.003, batchsize=4),
        testpercent=20,
        split_seed=2,
        force_weight=0.1,
        atomic_energies={"Ti": -1604.604515075, "O": -432.503149303},
        show_progress=False,
    )
    result = committee.train(
        structures=structures,
        config=config,
        committee_config=TorchCommitteeConfig(num_members=3, base_seed=7, output_dir=output_dir),
    )
    assert len(result.members) == 3
    return [member.model.network.values for member in committee.members]


def facade_seeds() -> list[tuple[int, int]]:
    """Train the facade with ``seed`` and ``split_seed`` left unset; returns every rank's
    ``(seed, split_seed)``, which must agree (rank 0's draw, broadcast)."""
    from aenet_fn.driver.distributed import all_gather_objects, current_world
    from aenet_fn.torch_featurize import ChebyshevDescriptor
    from aenet_fn.torch_training import Adam, TorchANNPotential, TorchTrainingConfig

    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:8])
    descriptor = ChebyshevDescriptor(["Ti", "O"], 4, 4.0, 2, 3.0, min_cutoff=0.5)
    config = TorchTrainingConfig(
        iterations=1,
        method=Adam(mu=0.003, batchsize=4),
        testpercent=25,
        atomic_energies={"Ti": -1604.604515075, "O": -432.503149303},
        checkpoint_dir=None,
        show_progress=False,
    )
    TorchANNPotential({"Ti": [(3, "tanh")], "O": [(3, "tanh")]}, descriptor).train(
        structures=structures, config=config
    )
    return all_gather_objects([(config.seed, config.split_seed)], current_world())


def main(out: str, database: str) -> None:
    """Join the process group torchrun set up, train, and save the results on rank 0."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = run_cases()
        results["database"] = database_run(database)
        results["world_size"] = dist.get_world_size()
        results["committee"] = train_committee(Path(out).parent / "committee")
        results["facade_seeds"] = facade_seeds()
        if dist.get_rank() == 0:
            torch.save(results, out)
        dist.barrier()  # every rank is done before any tears the group down
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Leave without the interpreter's teardown: gloo's worker threads can still hold tensors
    # then, and about one run in twenty aborted there ("terminate called without an active
    # exception", exit code -6) after all its work was done and saved (a torch issue).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
