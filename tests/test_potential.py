"""The energy model: prediction formula, both force paths, and its physics (invariances,
extensivity, forces and stress as derivatives) by the checks of aenet_fn.testing."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aenet_fn as af
from aenet_fn import ChebyshevParams, Structure, build_graph, collate, featurize
from aenet_fn.core.featurized import featurize_structures
from aenet_fn.core.local_derivatives import LocalDerivatives, centre_sums
from aenet_fn.core.minibatch import take_structures
from aenet_fn.core.network import atomic_outputs, init_network
from aenet_fn.core.normalization import Normalization
from aenet_fn.core.potential import (
    Model,
    energy,
    energy_and_forces,
    energy_forces_stress,
)
from aenet_fn.speedups.force_jacobian import BatchJacobian, set_jacobian
from aenet_fn.testing import (
    check_extensivity,
    check_forces,
    check_permutation_invariance,
    check_rewrapping_invariance,
    check_rotation_invariance,
    check_stress,
    check_translation_invariance,
    count_host_syncs,
    forbid_host_sync,
    lattice_shifts,
    permutations_of,
    rotations,
    structures,
    supercells,
    translations,
)
from tests.conftest import batch_energies_and_forces, random_structure

PARAMS = ChebyshevParams(
    species=["Ti", "O"], rad_order=6, rad_cutoff=4.5, ang_order=3, ang_cutoff=3.5, min_cutoff=0.5
)
ARCH = {"Ti": [(8, "tanh"), (6, "tanh")], "O": [(8, "twist")]}


def make_model(seed: int = 0) -> Model:
    generator = torch.Generator().manual_seed(seed)
    network = init_network(ARCH, PARAMS.species, PARAMS.n_features, generator=generator)
    f = PARAMS.n_features
    norm = Normalization(
        feature_mean=torch.rand(2, f, generator=generator, dtype=torch.float64),
        feature_std=torch.rand(2, f, generator=generator, dtype=torch.float64) + 0.5,
        feature_min=torch.zeros(2, f, dtype=torch.float64),
        feature_max=torch.ones(2, f, dtype=torch.float64),
        energy_shift=torch.tensor(-4.2, dtype=torch.float64),
        energy_scaling=torch.tensor(0.7, dtype=torch.float64),
        atomic_energies=torch.tensor([-1604.6, -432.5], dtype=torch.float64),
    )
    return Model(PARAMS, network, norm)


def _structures(seed, count=3):
    return [random_structure(seed + k, 2 + k, periodic=(seed + k) % 3 > 0) for k in range(count)]


def test_energy_follows_the_prediction_formula():
    model = make_model(1)
    structures = _structures(4)
    batch = collate(structures, species=PARAMS.species)
    norm = model.normalization
    s = batch.species_index  # per-species statistics
    z = (featurize(PARAMS, batch) - norm.feature_mean[s]) / norm.feature_std[s]
    nn = atomic_outputs(model.network, z, batch.species_index)
    expected = []
    for b, structure in enumerate(structures):
        mine = batch.structure_index == b
        e_atom = sum(-1604.6 if s == "Ti" else -432.5 for s in structure.species)
        expected.append(float(nn[mine].sum()) / 0.7 + structure.n_atoms * -4.2 + e_atom)
    torch.testing.assert_close(energy(model, batch), torch.tensor(expected, dtype=torch.float64))


@given(seed=st.integers(0, 10**5))
def test_local_derivative_forces_equal_autodiff_forces(seed):
    model = make_model(seed)
    structures = _structures(seed, 4)
    data = featurize_structures(
        PARAMS, [_with_forces(s) for s in structures], with_derivatives=True
    )
    selection = torch.arange(len(structures))
    batch = take_structures(data, selection, torch.ones(len(structures), dtype=torch.bool))
    e_local, f_local = batch_energies_and_forces(model, batch)
    e_auto, f_auto = energy_and_forces(model, collate(structures, species=PARAMS.species))
    torch.testing.assert_close(e_local, e_auto, rtol=1e-13, atol=1e-9)
    torch.testing.assert_close(f_local, f_auto[batch.atom_index], rtol=1e-10, atol=1e-11)
    _, f_blocks = batch_energies_and_forces(model, batch, by_species_blocks=True)
    torch.testing.assert_close(f_blocks, f_local, rtol=0, atol=1e-14)


@pytest.mark.parametrize("piece", [1, 7, 1 << 15])
def test_local_derivatives_computed_in_pieces_are_those_computed_at_once(piece, monkeypatch):
    """Entries are differentiated ``ENTRIES_PER_PIECE`` at a time (bounded temporaries):
    every field is bitwise the one-piece result, whatever the piece size."""
    import aenet_fn.core.local_derivatives as local_module

    structures = _structures(3, 3)
    whole = featurize_structures(PARAMS, structures, with_derivatives=True).local
    monkeypatch.setattr(local_module, "ENTRIES_PER_PIECE", piece)
    pieces = featurize_structures(PARAMS, structures, with_derivatives=True).local
    assert whole.radial.shape[0] > 7 and whole.angular_first.shape[0] > 7
    for field in attrs.fields(LocalDerivatives):
        assert torch.equal(getattr(pieces, field.name), getattr(whole, field.name)), field.name


@pytest.mark.parametrize(
    "storage", [None, 0.0, 1.0, math.inf], ids=["entries", "pairs", "mixed", "dense"]
)
@given(seed=st.integers(0, 10**5))
def test_batches_of_any_selection_give_autodiff_forces(storage, seed):
    """A shuffled selection with a repeat and one unsupervised structure, with derivative
    entries (sorted by centre: the CSR sums' fast path) or the assembled Jacobian (pair blocks,
    dense, or each structure its way: ``dense_up_to``): forces and the transposed map (the
    loss-gradient direction) equal autodiff."""
    model = make_model(seed)
    structures = _structures(seed, 4)
    data = featurize_structures(
        PARAMS, [_with_forces(s) for s in structures], with_derivatives=True
    )
    generator = torch.Generator().manual_seed(seed)
    selection = torch.cat([torch.randperm(4, generator=generator), torch.tensor([seed % 4])])
    supervised = torch.ones(4, dtype=torch.bool)
    supervised[(seed + 1) % 4] = False
    jacobian = None if storage is None else set_jacobian(PARAMS, data, storage)
    batch = take_structures(data, selection, supervised, jacobian)
    assert isinstance(batch.local, LocalDerivatives if storage is None else BatchJacobian)
    if storage is None:
        for centres in (batch.local.radial_centre, batch.local.triplet_centre):
            assert bool((centres[1:] >= centres[:-1]).all())
    values = model.network.values.detach().requires_grad_(True)

    def forces_of(values, local_batch, atom_forces):
        m = attrs.evolve(model, network=attrs.evolve(model.network, values=values))
        _, forces = batch_energies_and_forces(m, local_batch)
        return forces[local_batch.force_atoms], atom_forces

    everything = collate(structures, species=PARAMS.species)  # the set's atom order
    supervised_atoms = batch.atom_index[batch.force_atoms]
    f_local, _ = forces_of(values, batch, None)
    _, f_auto = energy_and_forces(model, everything)
    torch.testing.assert_close(f_local, f_auto[supervised_atoms], rtol=1e-10, atol=1e-11)
    weights = torch.randn(f_local.shape, generator=generator, dtype=f_local.dtype)
    (gradient,) = torch.autograd.grad((f_local * weights).sum(), values)

    def autodiff_loss(values):
        m = attrs.evolve(model, network=attrs.evolve(model.network, values=values))
        _, forces = energy_and_forces(m, everything)
        return (forces[supervised_atoms] * weights).sum()

    (expected_gradient,) = torch.autograd.grad(autodiff_loss(values), values)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-9, atol=1e-10)


@given(
    seed=st.integers(0, 10**5),
    n_entries=st.integers(0, 40),
    width=st.sampled_from([1, 3, 11, 65]),
    shuffled=st.booleans(),
)
def test_centre_sums_equal_index_add(seed, n_entries, width, shuffled):
    """Sorted or not, narrow (CSR products) or wide rows, weighted or not: index_add's sums."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randint(0, 7, (n_entries,), generator=generator).sort().values
    if shuffled:
        centres = centres[torch.randperm(n_entries, generator=generator)]
    values = torch.randn(n_entries, width, dtype=torch.float64, generator=generator)
    spin = torch.randn(n_entries, dtype=torch.float64, generator=generator)
    plain, weighted = centre_sums(centres, 7, values.view(n_entries, 1, width), spin)
    zeros = torch.zeros(7, width, dtype=torch.float64)
    expected = zeros.index_add(0, centres, values)
    torch.testing.assert_close(plain, expected.view(7, 1, width), rtol=1e-14, atol=1e-14)
    weighted_expected = zeros.index_add(0, centres, values * spin[:, None])
    torch.testing.assert_close(weighted.view(7, width), weighted_expected, rtol=1e-14, atol=1e-14)


def _with_forces(structure: Structure) -> Structure:
    return Structure(
        structure.positions,
        structure.species,
        energy=0.0,
        forces=torch.zeros(structure.n_atoms, 3),
        cell=structure.cell,
        pbc=structure.pbc,
    )


# ------------------------------------------------ physics of the model (aenet_fn.testing)

MODEL = make_model(2)
drawn = structures(species=("Ti", "O"), max_atoms=5, min_distance=1.0)


@given(structure=drawn, rotation=rotations(improper=True), data=st.data())
def test_the_model_is_invariant_and_extensive(structure, rotation, data):
    check_rotation_invariance(MODEL, structure, rotation)
    check_translation_invariance(MODEL, structure, data.draw(translations()))
    check_permutation_invariance(MODEL, structure, data.draw(permutations_of(structure)))
    check_rewrapping_invariance(MODEL, structure, data.draw(lattice_shifts(structure.n_atoms)))
    if any(structure.pbc):
        check_extensivity(MODEL, structure, data.draw(supercells(structure.pbc)))


@given(structure=drawn)
def test_forces_and_stress_are_derivatives_of_the_energy(structure):
    check_forces(MODEL, structure)
    if all(structure.pbc):
        check_stress(MODEL, structure)


def test_stress_is_symmetric_and_only_for_periodic_structures():
    model = make_model(4)
    batch = collate(
        [random_structure(5, 4), random_structure(6, 3, periodic=False)], species=PARAMS.species
    )
    stress = energy_forces_stress(model, batch, compute_stress=True).stress
    torch.testing.assert_close(stress[0], stress[0].T)
    assert bool(stress[1].isnan().all()) and bool(stress[0].isfinite().all())


def test_model_rejects_mismatched_parts():
    model = make_model()
    other = init_network(ARCH, ["O", "Ti"], PARAMS.n_features, generator=torch.Generator())
    with pytest.raises(ValueError, match="differ from the descriptor's"):
        Model(PARAMS, other, model.normalization)
    narrow = init_network(ARCH, PARAMS.species, 5, generator=torch.Generator())
    with pytest.raises(ValueError, match="networks take 5 inputs"):
        Model(PARAMS, narrow, model.normalization)


def test_unknown_species_in_a_batch_is_named():
    model = make_model()
    with pytest.raises(ValueError, match=r"\['Cu'\]"):
        energy(model, collate([random_structure(1, 3, species=("Ti", "Cu"))]))


def test_centre_sums_off_the_cpu_use_index_add():
    """Devices other than the CPU (here the shape-only "meta" device, where building a CSR
    matrix or reading a value would fail) take index_add."""
    centres = torch.tensor([0, 0, 2, 3], device="meta")
    values = torch.empty(4, 1, 5, dtype=torch.float64, device="meta")
    spin = torch.empty(4, dtype=torch.float64, device="meta")
    plain, weighted = centre_sums(centres, 6, values, spin)
    assert plain.shape == weighted.shape == (6, 1, 5) and plain.device.type == "meta"


def test_an_evaluation_with_its_graph_stays_on_the_device():
    """With its graph built, an evaluation (energies, forces, stress) reads nothing back to the
    host, makes no data-dependent shape and creates every tensor on the inputs' device: on the
    shape-only "meta" device, where any of these would fail, and on the CPU."""
    model = make_model(1)
    batch = collate([random_structure(3, 5), random_structure(4, 3)], species=PARAMS.species)
    graph = build_graph(PARAMS, batch)
    on_meta = af.to((model, batch, graph), device="meta")
    with forbid_host_sync(expected_device="meta"):
        result = energy_forces_stress(*on_meta, compute_stress=True)
    assert result.forces.device.type == "meta" and result.stress.shape == (2, 3, 3)
    _, offences = count_host_syncs(
        lambda: energy_forces_stress(model, batch, graph, compute_stress=True),
        expected_device="cpu",
    )
    assert offences == []
    # the graph's species grouping gives the energies of the per-atom grouping by index
    atomic = af.atomic_energies(model, batch, graph)
    ungrouped = attrs.evolve(graph, by_species=None, species_blocks=None)
    torch.testing.assert_close(
        atomic, af.atomic_energies(model, batch, ungrouped), rtol=0, atol=1e-12
    )
