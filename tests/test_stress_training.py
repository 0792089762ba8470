"""Training on stresses: the features' strain derivatives give the potential's own stress,
the stress term of the loss trains it down, on both routes and in committees."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aenet_fn as af
from aenet_fn.core.featurized import strain_derivatives
from aenet_fn.core.forces import strained
from aenet_fn.driver.committee import committee_fit, init_committee, member_seeds
from aenet_fn.driver.loader import StructureSource
from aenet_fn.driver.step import residuals
from aenet_fn.examples import emt_alloys

PARAMS = af.ChebyshevParams(["Cu", "Ni", "Au"], 6, 4.0, 3, 3.0, min_cutoff=0.5)
ARCH = {s: [(8, "tanh")] for s in PARAMS.species}


@pytest.fixture(scope="module")
def emt():
    """EMT alloys with energies, forces and stresses; 40 to train on, 10 held out."""
    structures = emt_alloys(50, seed=5)
    assert all(s.has_stress() for s in structures)
    train = af.featurize_structures(
        PARAMS, structures[:40], with_derivatives=True, with_stress=True
    )
    test = af.featurize_structures(
        PARAMS, structures[40:], with_derivatives=False, with_stress=True
    )
    return structures, train, test


@given(seed=st.integers(0, 1000), component=st.tuples(st.integers(0, 2), st.integers(0, 2)))
@settings(max_examples=10, deadline=None)
def test_strain_derivatives_equal_finite_differences(seed, component):
    structures = emt_alloys(2, seed=seed)
    batch = af.collate(structures)
    graph = af.build_graph(PARAMS, batch)
    derivatives = strain_derivatives(PARAMS, batch, graph)

    def features(size: float) -> torch.Tensor:
        strain = torch.zeros(2, 3, 3, dtype=torch.float64)
        strain[:, component[0], component[1]] = size
        positions, cells = strained(batch.positions, batch.cells, batch.structure_index, strain)
        return af.features_from_graph(PARAMS, positions, cells, batch.structure_index, graph)

    numeric = (features(1e-6) - features(-1e-6)) / 2e-6
    torch.testing.assert_close(
        derivatives[..., component[0], component[1]], numeric, atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("with_forces", [False, True])
def test_a_batch_stress_is_the_potentials_stress(emt, with_forces):
    """Predicted stress of a batch (residual + label) equals ``energy_forces_stress``, the
    derivative of the energy under strain through the whole descriptor."""
    structures, train, _ = emt
    model = af.init_model(PARAMS, ARCH, train, seed=3)
    selection = torch.tensor([7, 2, 19, 2])
    supervised = torch.ones(train.n_structures, dtype=torch.bool) if with_forces else None
    batch = af.take_structures(train, selection, supervised, with_stress=True)
    predicted = residuals(model, batch).stress + batch.strain.stresses
    chosen = [structures[i] for i in selection.tolist()]
    expected = af.energy_forces_stress(model, af.collate(chosen), compute_stress=True).stress
    torch.testing.assert_close(predicted, expected, rtol=1e-10, atol=1e-14)


def test_stress_training_lowers_the_stress_error_on_both_routes(emt):
    """The stress error falls; the fast and torch.func routes reach the same weights; a model
    trained with stresses predicts held-out stresses better than one trained without."""
    _, train, test = emt
    model = af.init_model(PARAMS, ARCH, train, seed=0)
    config = af.TrainConfig(
        epochs=15, batch_size=8, stress_weight=0.5, optimizer=af.AdamConfig(lr=5e-3)
    )
    runs = {}
    for route in ("fast", "func"):
        routed = attrs.evolve(config, route=route)
        runs[route] = af.fit(af.init_train_state(model, train, routed), train, test, routed)
    fast, func = runs["fast"], runs["func"]
    torch.testing.assert_close(
        fast.model.network.values, func.model.network.values, rtol=1e-10, atol=1e-12
    )
    history = fast.history
    assert history[-1]["RMSE_stress_train"] < 0.5 * history[0]["RMSE_stress_train"]
    assert history[-1]["RMSE_stress_test"] < history[0]["RMSE_stress_test"]
    plain = attrs.evolve(config, stress_weight=0.0)
    without = af.fit(af.init_train_state(model, train, plain), train, test, plain)
    assert "RMSE_stress_train" not in without.history[-1]
    held_out = [
        af.evaluate(run.model, test, with_forces=False, with_stress=True)["rmse_stress"]
        for run in (fast, without)
    ]
    assert held_out[0] < 0.85 * held_out[1]


@pytest.mark.parametrize("shared", [False, True])
def test_a_committee_trains_stresses_as_its_members_alone(emt, shared):
    _, train, _ = emt
    config = af.TrainConfig(epochs=2, batch_size=8, force_weight=0.1, stress_weight=0.3)
    members = init_committee(
        PARAMS, ARCH, train, config, member_seeds(2, base_seed=1), shared_batches=shared
    )
    together = committee_fit(members, train, None, config)
    for member, start in zip(together, members):
        alone = af.fit(start, train, None, config)
        torch.testing.assert_close(
            member.model.network.values, alone.model.network.values, rtol=1e-9, atol=1e-12
        )
        assert member.history[-1]["RMSE_stress_train"] == pytest.approx(
            alone.history[-1]["RMSE_stress_train"], rel=1e-9
        )


def test_stress_training_refuses_what_cannot_train_stresses(emt):
    structures = emt[0]
    with pytest.raises(ValueError, match=r"force_weight \+ stress_weight must be <= 1"):
        af.TrainConfig(force_weight=0.6, stress_weight=0.5)
    config = af.TrainConfig(epochs=1, batch_size=8, stress_weight=0.2)
    no_stress = af.featurize_structures(PARAMS, structures[:8], with_derivatives=False)
    model = af.init_model(PARAMS, ARCH, no_stress, seed=0)
    with pytest.raises(ValueError, match="no stress data: featurize it in memory with"):
        af.init_train_state(model, no_stress, config)
    energies_only = attrs.evolve(config, stress_weight=0.0)
    state = af.init_train_state(model, no_stress, energies_only)
    lazy = StructureSource(PARAMS, structures[:8], with_derivatives=False)
    with pytest.raises(ValueError, match=r"fit: training stresses are weighted .* no stress data"):
        af.fit(state, lazy, None, config)


@pytest.mark.filterwarnings("ignore:No atomic_energies provided")
def test_the_facade_and_the_command_line_train_on_stresses(emt, tmp_path):
    """``TorchTrainingConfig(stress_weight=...)`` trains on the stresses of ASE structures and
    reports them in its TrainOut; the command line takes the same key from extended XYZ."""
    from ase.io import write

    from aenet_fn.cli import main
    from aenet_fn.io.ase_io import to_ase
    from aenet_fn.torch_featurize import ChebyshevDescriptor
    from aenet_fn.torch_training import Adam, TorchANNPotential, TorchTrainingConfig

    structures = emt[0][:24]
    descriptor = ChebyshevDescriptor(
        species=PARAMS.species,
        rad_order=6,
        rad_cutoff=4.0,
        ang_order=3,
        ang_cutoff=3.0,
        min_cutoff=0.5,
    )
    config = TorchTrainingConfig(
        iterations=6,
        stress_weight=0.4,
        testpercent=25,
        method=Adam(mu=5e-3, batchsize=6),
        checkpoint_dir=None,  # nothing written into the working folder
        show_progress=False,
    )
    potential = TorchANNPotential(ARCH, descriptor)
    result = potential.train(structures=[to_ase(s) for s in structures], config=config)
    errors = result.errors
    assert errors["RMSE_stress_train"].iloc[-1] < errors["RMSE_stress_train"].iloc[0]
    assert result.stats["final_RMSE_stress_test"] > 0
    write(tmp_path / "emt.xyz", [to_ase(s) for s in structures])
    (tmp_path / "run.json").write_text(
        '{"data": {"paths": ["emt.xyz"]}, "descriptor": {"species": ["Cu", "Ni", "Au"], '
        '"rad_order": 6, "rad_cutoff": 4.0, "ang_order": 3, "ang_cutoff": 3.0, '
        '"min_cutoff": 0.5}, "network": {"default": [[8, "tanh"]]}, "training": '
        '{"iterations": 2, "stress_weight": 0.3, "checkpoint_dir": false}, '
        '"output": {"directory": "out"}}'
    )
    assert main(["train", str(tmp_path / "run.json"), "--no-progress"]) == 0
    header = (tmp_path / "out" / "history.csv").read_text().splitlines()[0]
    assert "RMSE_stress_train" in header and "RMSE_stress_test" in header
