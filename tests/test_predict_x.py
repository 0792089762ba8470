"""``PredictOut.from_file`` reads ænet's Fortran ``predict.x`` output, and our predictions with
the published TiO2 potential equal what predict.x printed (tests/data/nn-tio2/predict-x)."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch

import aenet_fn as af
from aenet_fn.examples import TIO2_POTENTIAL, TIO2_STRUCTURES
from aenet_fn.io.predict import PredictOut

NAMES = ["structure-001.xsf", "structure-002.xsf", "structure-003.xsf"]


@pytest.fixture(scope="module")
def outputs(reference_data) -> dict[str, PredictOut]:
    folder = reference_data / "nn-tio2" / "predict-x"
    return {
        kind: PredictOut.from_file(folder / f"predict-{kind}.out")
        for kind in ("energies", "forces")
    }


@pytest.fixture(scope="module")
def ours():
    model = af.read_aenet_ascii(sorted(TIO2_POTENTIAL.glob("*.nn.ascii")))
    structures = [af.read_structures(TIO2_STRUCTURES / name)[0] for name in NAMES]
    batch = af.collate(structures, species=model.descriptor.species)
    result = af.energy_forces_stress(model, batch)
    forces = result.forces.detach().split(batch.n_atoms.tolist())
    return structures, result.energy.detach(), [f.numpy() for f in forces]


def test_both_outputs_are_read_structure_by_structure(outputs, ours):
    structures, _, _ = ours
    for kind, read in outputs.items():
        assert read.num_structures == 3 and read.paths == NAMES
        assert [read.num_atoms(i) for i in range(3)] == [s.n_atoms for s in structures]
        for i, structure in enumerate(structures):
            assert read.atom_types[i] == list(structure.species)
            # predict.x prints the atoms wrapped into the cell: equal up to lattice vectors
            cell = structure.cell.numpy()
            shift = (read.coords[i] - structure.positions.numpy()) @ np.linalg.inv(cell)
            wrapped = structure.positions.numpy() + np.round(shift) @ cell
            np.testing.assert_allclose(read.coords[i], wrapped, atol=6e-7)
        assert all(f is None for f in read.forces) == (kind == "energies")
    energies, forces = outputs["energies"], outputs["forces"]
    assert energies.total_energy == forces.total_energy
    assert energies.cohesive_energy == forces.cohesive_energy


def test_our_predictions_equal_predict_x_to_its_print_precision(outputs, ours):
    """Energies are printed to 1e-8 eV, forces to 1e-6 eV/Å."""
    _, energies, forces = ours
    read = outputs["forces"]
    np.testing.assert_allclose(energies.numpy(), read.total_energy, rtol=0, atol=2e-8)
    for mine, printed in zip(forces, read.forces, strict=True):
        np.testing.assert_allclose(mine, printed, rtol=0, atol=6e-7)
    assert max(np.abs(f).max() for f in read.forces) > 1.0  # forces worth comparing


def test_structure_paths_can_be_given(outputs, reference_data, tmp_path):
    source = reference_data / "nn-tio2" / "predict-x" / "predict-forces.out"
    paths = [str(TIO2_STRUCTURES / name) for name in NAMES]
    read = PredictOut.from_file(source, structure_paths=paths)
    assert read.paths == paths and len(read.to_structures()) == 3
    with pytest.raises(ValueError, match="3 structures, but 2 structure paths"):
        PredictOut.from_file(source, structure_paths=paths[:2])


def test_missing_truncated_and_foreign_files_are_refused(reference_data, tmp_path):
    source = reference_data / "nn-tio2" / "predict-x" / "predict-forces.out"
    with pytest.raises(FileNotFoundError):
        PredictOut.from_file(tmp_path / "absent.out")
    lines = source.read_text().splitlines()
    first_row = next(k for k, line in enumerate(lines) if line.startswith(" Ti "))
    truncated = tmp_path / "truncated.out"
    truncated.write_text("\n".join(lines[: first_row + 5]) + "\n")
    with pytest.raises(ValueError, match=r"truncated\.out, line \d+: the file ends within"):
        PredictOut.from_file(truncated)
    damaged = tmp_path / "damaged.out"
    damaged.write_text("\n".join([*lines[:first_row], " Ti 1.0 2.0", *lines[first_row + 1 :]]))
    with pytest.raises(ValueError, match=rf"damaged\.out, line {first_row + 1}: expected an atom"):
        PredictOut.from_file(damaged)
    foreign = tmp_path / "foreign.out"
    foreign.write_text("this is not predict.x output\n")
    with pytest.raises(ValueError, match="no structure found"):
        PredictOut.from_file(foreign)


def test_the_facade_opens_ascii_potentials_and_predicts_as_predict_x(outputs, tmp_path):
    from aenet_fn.torch_training import TorchANNPotential, TorchCommitteePotential

    paths = [str(TIO2_STRUCTURES / name) for name in NAMES]
    potential = TorchANNPotential.from_aenet_ascii(TIO2_POTENTIAL)
    predicted = potential.predict(paths, eval_forces=True)
    read = outputs["forces"]
    np.testing.assert_allclose(predicted.total_energy, read.total_energy, rtol=0, atol=2e-8)
    for mine, printed in zip(predicted.forces, read.forces, strict=True):
        np.testing.assert_allclose(mine, printed, rtol=0, atol=6e-7)
    committee = TorchCommitteePotential.from_aenet_ascii([TIO2_POTENTIAL, TIO2_POTENTIAL])
    together = committee.predict(paths)
    np.testing.assert_allclose(together.energy_mean, read.total_energy, rtol=0, atol=2e-8)
    assert np.all(together.energy_std == 0.0)
    other = af.read_aenet_ascii(TIO2_POTENTIAL)
    arch = {s: [(6, "tanh")] for s in ("Ti", "O")}
    wider = af.init_network(arch, ["Ti", "O"], 56, generator=torch.Generator().manual_seed(0))
    af.write_aenet_ascii(attrs.evolve(other, network=wider), tmp_path)
    with pytest.raises(ValueError, match="architecture or descriptor differs"):
        TorchCommitteePotential.from_aenet_ascii([TIO2_POTENTIAL, tmp_path])


def test_a_model_file_loads_onto_the_device_asked_for(tmp_path):
    from aenet_fn.torch_training import TorchANNPotential

    potential = TorchANNPotential.from_aenet_ascii(TIO2_POTENTIAL)
    path = tmp_path / "model.pt"
    potential.save(path)
    on_meta = TorchANNPotential.from_file(path, device="meta")
    assert on_meta.device.type == "meta"
    assert on_meta.model.network.values.device.type == "meta"
