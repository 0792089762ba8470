"""Tests of the I/O layer: XSF reading/writing, ASE conversion and ``read_structures``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from hypothesis import given
from hypothesis import strategies as st

from aenet_fn import Structure
from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.io import from_ase, read_structures, read_xsf, to_ase, write_xsf
from tests.conftest import REFERENCE_DATA, random_cell

TIO2 = TIO2_STRUCTURES
FORTRAN = REFERENCE_DATA / "fortran-features"

PRINTED = 1e-8  # the writer prints 8 decimals


def _close(a: torch.Tensor | None, b: torch.Tensor | None, atol: float = PRINTED) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.allclose(a, b, rtol=0.0, atol=atol)


def _assert_same(read: Structure, written: Structure, atol: float = PRINTED) -> None:
    assert read.species == written.species
    assert _close(read.positions, written.positions, atol)
    assert _close(read.forces, written.forces, atol)
    assert read.pbc == written.pbc
    if written.is_periodic():
        assert _close(read.cell, written.cell, atol)
    else:
        assert read.cell is None
    if written.energy is None:
        assert read.energy is None
    else:
        assert read.energy == pytest.approx(written.energy, abs=atol, rel=1e-15)


# ---------------------------------------------------------------------------------------------
# reference files


def test_tio2_structure_001() -> None:
    (structure,) = read_xsf(TIO2 / "structure-001.xsf")
    assert structure.n_atoms == 23
    assert structure.species[:8] == ("Ti",) * 8 and structure.species[8:] == ("O",) * 15
    assert structure.energy == pytest.approx(-19517.09425849, abs=1e-9)
    assert torch.equal(
        structure.forces[0],
        torch.tensor([0.54256802, -0.31428097, 2.51304061], dtype=torch.float64),
    )
    assert torch.equal(
        structure.positions[-1],
        torch.tensor([2.96260899, 4.36108302, 2.25722699], dtype=torch.float64),
    )
    expected_cell = torch.diag(
        torch.tensor([5.17600016, 5.50899976, 9.26300011], dtype=torch.float64)
    )
    assert torch.equal(structure.cell, expected_cell)
    assert structure.cell.dtype == torch.float64 and structure.positions.dtype == torch.float64
    assert structure.pbc == (True, True, True)
    assert structure.name == str(TIO2 / "structure-001.xsf")


def test_writer_reproduces_reference_file_byte_for_byte(tmp_path: Path) -> None:
    source = TIO2 / "structure-001.xsf"
    target = tmp_path / "copy.xsf"
    write_xsf(target, read_xsf(source))
    assert target.read_text() == source.read_text()


def test_all_tio2_files_have_energies_and_forces() -> None:
    files = sorted(TIO2.glob("*.xsf"))
    assert len(files) == 100
    structures = read_structures(files)
    assert len(structures) == 100
    for file, structure in zip(files, structures, strict=True):
        assert structure.name == str(file)
        assert structure.energy is not None and np.isfinite(structure.energy)
        assert structure.forces is not None and structure.forces.shape == (structure.n_atoms, 3)
        assert structure.cell is not None and structure.pbc == (True, True, True)


def test_directory_reads_all_xsf_sorted_by_name(tmp_path: Path) -> None:
    structures = read_structures(TIO2)
    assert [s.name for s in structures] == [str(p) for p in sorted(TIO2.glob("*.xsf"))]
    # order is by file name, not by creation order; other files are ignored
    (aucu,) = read_xsf(FORTRAN / "aucu.xsf")
    (tio2,) = read_xsf(TIO2 / "structure-002.xsf")
    write_xsf(tmp_path / "b.xsf", aucu)
    write_xsf(tmp_path / "a.xsf", tio2)
    (tmp_path / "notes.txt").write_text("not a structure\n")
    names = [Path(s.name).name for s in read_structures(tmp_path)]
    assert names == ["a.xsf", "b.xsf"]


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no \*\.xsf files"):
        read_structures(tmp_path)


def test_aucu_without_energy_and_forces() -> None:
    (structure,) = read_structures(FORTRAN / "aucu.xsf")
    assert structure.species == ("Cu", "Cu", "Au", "Au")
    assert structure.energy is None and structure.forces is None
    assert torch.equal(structure.cell, 4.0 * torch.eye(3, dtype=torch.float64))
    assert torch.equal(structure.positions[1], torch.tensor([0.0, 2.0, 2.0], dtype=torch.float64))


def test_lmnto_energy_from_comment_and_unwrapped_coordinates() -> None:
    (structure,) = read_structures(FORTRAN / "lmnto_structure001.xsf")
    assert structure.energy == pytest.approx(-630.63081206, abs=1e-9)
    assert structure.n_atoms == 56
    counts = {s: structure.species.count(s) for s in set(structure.species)}
    assert counts == {"Li": 8, "Mo": 2, "Ni": 7, "Ti": 7, "O": 32}
    first = torch.tensor([-4.00570517, 2.27122533, -1.88935153], dtype=torch.float64)
    assert torch.equal(structure.positions[0], first)  # negative, i.e. not wrapped
    row = torch.tensor([0.00285542, 0.02004370, -7.95977623], dtype=torch.float64)
    assert torch.equal(structure.cell[0], row)
    assert structure.forces is not None


def test_water_xyz_through_ase() -> None:
    (structure,) = read_structures(FORTRAN / "water.xyz")
    assert structure.species == ("O", "H", "H")
    assert structure.cell is None and structure.pbc == (False, False, False)
    assert structure.energy is None and structure.forces is None
    assert torch.equal(
        structure.positions[1], torch.tensor([0.0, 0.75545, -0.47116], dtype=torch.float64)
    )


def test_paths_as_str_and_sequences() -> None:
    single = read_structures(str(FORTRAN / "aucu.xsf"))
    several = read_structures([FORTRAN / "aucu.xsf", str(FORTRAN / "water.xyz")])
    assert len(single) == 1 and len(several) == 2
    assert several[1].species == ("O", "H", "H")
    assert _close(single[0].positions, several[0].positions, 0.0)


# ---------------------------------------------------------------------------------------------
# XSF variants


def test_atomic_numbers_and_case_insensitive_symbols(tmp_path: Path) -> None:
    path = tmp_path / "numbers.xsf"
    path.write_text(
        "CRYSTAL\nPRIMVEC\n 4 0 0\n 0 4 0\n 0 0 4\nPRIMCOORD\n3 1\n"
        "22 0.0 0.0 0.0\n8 1.0 1.0 1.0\nCU 2.0 2.0 2.0\n"
    )
    (structure,) = read_xsf(path)
    assert structure.species == ("Ti", "O", "Cu")


def test_molecule_atoms_block_with_forces(tmp_path: Path) -> None:
    path = tmp_path / "molecule.xsf"
    path.write_text(
        "# a molecule\n# total energy = -14.5 eV\n\nATOMS\n"
        "8  0.0 0.0 0.1  0.1 0.2 0.3\n"
        "1  0.0 0.7 -0.4  -0.1 -0.2 -0.3\n"
        "H  0.0 -0.7 -0.4  0.0 0.0 0.0\n"
    )
    (structure,) = read_xsf(path)
    assert structure.species == ("O", "H", "H")
    assert structure.cell is None and not structure.is_periodic()
    assert structure.energy == -14.5
    assert torch.equal(structure.forces[1], torch.tensor([-0.1, -0.2, -0.3], dtype=torch.float64))


def test_multiple_primcoord_blocks_are_frames(tmp_path: Path) -> None:
    path = tmp_path / "frames.xsf"
    path.write_text(
        "# total energy = -1.5 eV\nCRYSTAL\nPRIMVEC\n 3 0 0\n 0 3 0\n 0 0 3\n"
        "PRIMCOORD\n1 1\nCu 0 0 0\n"
        "# total energy = -2.5 eV\nPRIMCOORD\n2 1\nCu 0 0 0\nCu 1.5 1.5 1.5\n"
    )
    frames = read_xsf(path)
    assert [f.n_atoms for f in frames] == [1, 2]
    assert [f.energy for f in frames] == [-1.5, -2.5]
    assert [f.name for f in frames] == [f"{path}#frame=0", f"{path}#frame=1"]
    assert torch.equal(frames[1].cell, 3.0 * torch.eye(3, dtype=torch.float64))


def test_animsteps_with_frame_numbers(tmp_path: Path) -> None:
    path = tmp_path / "anim.xsf"
    path.write_text(
        "ANIMSTEPS 2\nCRYSTAL\nPRIMVEC 1\n 3 0 0\n 0 3 0\n 0 0 3\nPRIMCOORD 1\n1 1\nNi 0 0 0\n"
        "PRIMVEC 2\n 4 0 0\n 0 4 0\n 0 0 4\nPRIMCOORD 2\n1 1\nNi 0.5 0 0\n"
    )
    frames = read_xsf(path)
    assert len(frames) == 2
    assert frames[0].cell[0, 0] == 3.0 and frames[1].cell[0, 0] == 4.0
    assert frames[1].positions[0, 0] == 0.5
    assert all(f.energy is None for f in frames)


def test_energy_after_the_coordinates_belongs_to_the_structure(tmp_path: Path) -> None:
    path = tmp_path / "late.xsf"
    path.write_text("ATOMS\nAr 0 0 0\n# Total Energy = -3.25 eV\n")
    (structure,) = read_xsf(path)
    assert structure.energy == -3.25


def test_slab_keeps_partial_pbc(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    slab = Structure(
        rng.uniform(0, 4, (3, 3)), ("Pt", "Pt", "O"), cell=random_cell(rng), pbc=(True, True, False)
    )
    write_xsf(tmp_path / "slab.xsf", slab)
    assert "SLAB" in (tmp_path / "slab.xsf").read_text()
    (read,) = read_xsf(tmp_path / "slab.xsf")
    _assert_same(read, slab)


def test_pbc_that_xsf_cannot_express_is_refused(tmp_path: Path) -> None:
    odd = Structure(np.zeros((1, 3)), ("H",), cell=np.eye(3) * 5, pbc=(False, True, False))
    with pytest.raises(ValueError, match="cannot represent pbc"):
        write_xsf(tmp_path / "odd.xsf", odd)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# write -> read round trips


@st.composite
def structures(draw: st.DrawFn, periodic: bool | None = None) -> Structure:
    seed = draw(st.integers(0, 2**32 - 1))
    n_atoms = draw(st.integers(1, 8))
    if periodic is None:
        periodic = draw(st.booleans())
    with_energy = draw(st.booleans())
    with_forces = draw(st.booleans())
    rng = np.random.default_rng(seed)
    symbols = ("H", "C", "O", "Ti", "Cu", "Au", "Og", "W")
    species = tuple(symbols[i] for i in rng.integers(0, len(symbols), n_atoms))
    scale = 10.0 ** rng.integers(-1, 4)  # coordinates far outside the cell too
    return Structure(
        positions=rng.uniform(-scale, scale, (n_atoms, 3)),
        species=species,
        energy=float(rng.uniform(-1e5, 1e5)) if with_energy else None,
        forces=rng.normal(0.0, 3.0, (n_atoms, 3)) if with_forces else None,
        cell=random_cell(rng, 2.0, 30.0) if periodic else None,
        name=f"random-{seed}",
    )


@given(structure=structures())
def test_round_trip_single(tmp_path_factory: pytest.TempPathFactory, structure: Structure) -> None:
    path = tmp_path_factory.mktemp("single") / "structure.xsf"
    write_xsf(path, structure)
    text = path.read_text()
    assert ("CRYSTAL" in text) == structure.is_periodic()
    assert ("total energy" in text) == (structure.energy is not None)
    (read,) = read_xsf(path)
    _assert_same(read, structure)
    assert read.name == str(path)


@given(frames=st.lists(structures(periodic=True), min_size=2, max_size=4))
def test_round_trip_periodic_animsteps(
    tmp_path_factory: pytest.TempPathFactory, frames: list[Structure]
) -> None:
    path = tmp_path_factory.mktemp("frames") / "frames.xsf"
    write_xsf(path, frames)
    assert path.read_text().startswith(f"ANIMSTEPS {len(frames)}\nCRYSTAL\n")
    read = read_xsf(path)
    assert len(read) == len(frames)
    for index, (got, want) in enumerate(zip(read, frames, strict=True)):
        _assert_same(got, want)
        assert got.name == f"{path}#frame={index}"


@given(frames=st.lists(structures(periodic=False), min_size=2, max_size=4))
def test_round_trip_isolated_animsteps(
    tmp_path_factory: pytest.TempPathFactory, frames: list[Structure]
) -> None:
    path = tmp_path_factory.mktemp("molecules") / "molecules.xsf"
    write_xsf(path, frames)
    read = read_xsf(path)
    for got, want in zip(read, frames, strict=True):
        _assert_same(got, want)


def test_multi_frame_output_is_valid_xsf_for_ase(tmp_path: Path) -> None:
    frames = [*read_xsf(TIO2 / "structure-003.xsf"), *read_xsf(FORTRAN / "aucu.xsf")]
    write_xsf(tmp_path / "frames.xsf", frames)
    images = ase.io.read(tmp_path / "frames.xsf", index=":", format="xsf")
    assert len(images) == 2
    for atoms, structure in zip(images, frames, strict=True):
        assert atoms.get_chemical_symbols() == list(structure.species)
        assert np.allclose(atoms.positions, structure.positions.numpy(), atol=PRINTED)
        assert np.allclose(atoms.cell.array, structure.cell.numpy(), atol=PRINTED)


def test_mixed_periodic_and_isolated_frames_are_refused(tmp_path: Path) -> None:
    (crystal,) = read_xsf(FORTRAN / "aucu.xsf")
    (molecule,) = read_structures(FORTRAN / "water.xyz")
    with pytest.raises(ValueError, match="single kind of system"):
        write_xsf(tmp_path / "mixed.xsf", [crystal, molecule])


def test_isolated_structure_with_cell_is_written_as_atoms(tmp_path: Path) -> None:
    boxed = Structure(np.eye(3), ("H", "H", "O"), cell=10 * np.eye(3), pbc=(False,) * 3)
    write_xsf(tmp_path / "boxed.xsf", boxed)
    text = (tmp_path / "boxed.xsf").read_text()
    assert text.startswith("ATOMS\n") and "PRIMVEC" not in text
    (read,) = read_xsf(tmp_path / "boxed.xsf")
    assert read.cell is None and _close(read.positions, boxed.positions)


def test_comment_lines_are_written_and_ignored(tmp_path: Path) -> None:
    (structure,) = read_xsf(FORTRAN / "aucu.xsf")
    write_xsf(tmp_path / "c.xsf", structure, comment="first line\nsecond line")
    assert (tmp_path / "c.xsf").read_text().startswith("# first line\n# second line\n\nCRYSTAL\n")
    (read,) = read_xsf(tmp_path / "c.xsf")
    _assert_same(read, structure)
    with pytest.raises(ValueError, match="total energy"):
        write_xsf(tmp_path / "d.xsf", structure, comment="total energy = 5")


# ---------------------------------------------------------------------------------------------
# ASE


def _emt_copper(seed: int = 0) -> ase.Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1, 1, 2))
    atoms.rattle(0.05, seed=seed)
    atoms.calc = EMT()
    atoms.get_potential_energy()
    return atoms


def test_extxyz_round_trip_with_energy_and_forces(tmp_path: Path) -> None:
    images = [_emt_copper(0), _emt_copper(1)]
    energies = [a.get_potential_energy() for a in images]
    forces = [a.get_forces() for a in images]
    path = tmp_path / "cu.extxyz"
    ase.io.write(path, images, format="extxyz")
    structures = read_structures(path)
    assert [s.name for s in structures] == [f"{path}#frame=0", f"{path}#frame=1"]
    for structure, atoms, energy, force in zip(structures, images, energies, forces, strict=True):
        assert structure.energy == pytest.approx(energy, abs=1e-8)
        assert np.allclose(structure.forces.numpy(), force, atol=1e-7, rtol=0)
        assert np.allclose(structure.cell.numpy(), atoms.cell.array, atol=1e-10)
        assert np.allclose(structure.positions.numpy(), atoms.positions, atol=1e-10)
        assert structure.pbc == (True, True, True)
    # the same file through an explicit format
    assert len(read_structures(path, format="extxyz")) == 2


def test_extxyz_single_point_calculator_single_frame(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    atoms = ase.Atoms("NH3", positions=rng.uniform(0, 3, (4, 3)))
    force = rng.normal(size=(4, 3))
    atoms.calc = SinglePointCalculator(atoms, energy=-12.345678, forces=force)
    path = tmp_path / "nh3.xyz"
    ase.io.write(path, atoms, format="extxyz")
    (structure,) = read_structures(path)
    assert structure.name == str(path)
    assert structure.energy == pytest.approx(-12.345678, abs=1e-9)
    assert np.allclose(structure.forces.numpy(), force, atol=1e-7, rtol=0)
    assert structure.cell is None and structure.species == ("N", "H", "H", "H")


def test_from_ase_to_ase_round_trip() -> None:
    atoms = _emt_copper(3)
    structure = from_ase(atoms, name="cu")
    assert structure.name == "cu"
    assert structure.energy == atoms.get_potential_energy()
    assert np.array_equal(structure.forces.numpy(), atoms.get_forces())
    back = to_ase(structure)
    assert isinstance(back.calc, SinglePointCalculator)
    assert back.get_chemical_symbols() == atoms.get_chemical_symbols()
    assert np.array_equal(back.positions, atoms.positions)
    assert np.array_equal(back.cell.array, atoms.cell.array)
    assert back.pbc.tolist() == [True, True, True]
    assert back.get_potential_energy() == structure.energy
    assert np.array_equal(back.get_forces(), atoms.get_forces())
    again = from_ase(back)
    assert again.name == "cu"
    _assert_same(again, structure, atol=0.0)


def test_to_ase_without_labels_and_isolated() -> None:
    structure = Structure(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.74]]), ("H", "H"))
    atoms = to_ase(structure)
    assert atoms.calc is None
    assert not atoms.pbc.any()
    assert from_ase(atoms).cell is None


def test_from_ase_never_calculates_and_ignores_stale_results() -> None:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = EMT()
    structure = from_ase(atoms)  # calculator attached but nothing computed yet
    assert structure.energy is None and structure.forces is None
    assert not atoms.calc.results  # from_ase did not trigger a calculation
    atoms.get_potential_energy()
    assert from_ase(atoms).energy is not None
    atoms.positions[0] += 0.1  # results now belong to other positions
    assert from_ase(atoms).energy is None


def test_from_ase_cell_and_pbc() -> None:
    molecule = ase.Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.1]], cell=np.eye(3) * 10)
    assert from_ase(molecule).cell is None and from_ase(molecule).pbc == (False,) * 3
    slab = ase.Atoms("Cu", cell=np.eye(3) * 3, pbc=(True, True, False))
    structure = from_ase(slab)
    assert structure.pbc == (True, True, False)
    assert torch.equal(structure.cell, 3.0 * torch.eye(3, dtype=torch.float64))


def test_unparseable_file_for_ase_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.extxyz"
    path.write_text("3\nLattice='1 0 0 0 1 0 0 0 1'\nH 0 0\n")
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        read_structures(path)
    assert info.value.__cause__ is not None
    unknown = tmp_path / "data.unknownformat"
    unknown.write_text("hello\n")
    with pytest.raises(ValueError, match=re.escape(str(unknown))):
        read_structures(unknown)


def test_missing_files_raise_file_not_found(tmp_path: Path) -> None:
    for name in ("missing.xsf", "missing.extxyz"):
        path = tmp_path / name
        with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
            read_structures(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.xsf"))):
        read_xsf(tmp_path / "missing.xsf")
    with pytest.raises(FileNotFoundError, match="missing"):
        read_structures([FORTRAN / "aucu.xsf", tmp_path / "missing.xsf"])


# ---------------------------------------------------------------------------------------------
# corrupt XSF files: each message names the file and the 1-based line


def _corrupt(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corrupt.xsf"
    path.write_text(text)
    return path


def _where(path: Path, line: int) -> str:
    return re.escape(f"{path}, line {line}:")


def _tio2_lines() -> list[str]:
    return (TIO2 / "structure-001.xsf").read_text().splitlines()


def test_truncated_primcoord_block(tmp_path: Path) -> None:
    lines = _tio2_lines()
    assert lines[8] == "23 1"  # line 9 holds the count
    path = _corrupt(tmp_path, "\n".join(lines[:-3]) + "\n")
    with pytest.raises(
        ValueError, match=_where(path, 9) + r".*23 atoms.*only 20 atom lines .*ends at line 29\)"
    ):
        read_xsf(path)


def test_primcoord_block_interrupted_by_a_keyword(tmp_path: Path) -> None:
    lines = _tio2_lines()
    path = _corrupt(tmp_path, "\n".join([*lines[:-3], "PRIMCOORD", "1 1", "O 0 0 0"]) + "\n")
    with pytest.raises(ValueError, match=_where(path, 9) + r".*only 20 .*line 30 is 'PRIMCOORD'"):
        read_xsf(path)


def test_more_atom_lines_than_the_count(tmp_path: Path) -> None:
    lines = _tio2_lines()
    path = _corrupt(tmp_path, "\n".join([*lines, "O 1.0 1.0 1.0"]) + "\n")
    with pytest.raises(ValueError, match=_where(path, 33) + r".*outside a PRIMCOORD.*line 9 "):
        read_xsf(path)


def test_non_numeric_coordinate(tmp_path: Path) -> None:
    lines = _tio2_lines()
    lines[13] = lines[13].replace("1.93979700", "1.93x79700")
    path = _corrupt(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=_where(path, 14) + r" coordinate '1\.93x79700' is not"):
        read_xsf(path)


def test_non_numeric_force(tmp_path: Path) -> None:
    lines = _tio2_lines()
    lines[9] = lines[9].replace("-0.31428097", "nan")
    path = _corrupt(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=_where(path, 10) + r" force component 'nan' is not a"):
        read_xsf(path)


def test_primvec_with_two_rows(tmp_path: Path) -> None:
    lines = _tio2_lines()
    del lines[6]  # third lattice vector
    path = _corrupt(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=_where(path, 4) + r" PRIMVEC needs 3 .*found 2"):
        read_xsf(path)


def test_primvec_row_with_two_numbers(tmp_path: Path) -> None:
    lines = _tio2_lines()
    lines[5] = "  0.0 5.50899976"
    path = _corrupt(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=_where(path, 6) + " expected lattice vector 2"):
        read_xsf(path)


def test_empty_file(tmp_path: Path) -> None:
    path = _corrupt(tmp_path, "")
    with pytest.raises(ValueError, match=_where(path, 1) + " the file is empty"):
        read_xsf(path)


def test_not_an_xsf_file(tmp_path: Path) -> None:
    path = _corrupt(tmp_path, (FORTRAN / "water.xyz").read_text())
    with pytest.raises(ValueError, match=_where(path, 1) + " expected an XSF keyword.*got '3'"):
        read_xsf(path)


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.xsf"
    path.write_bytes(b"CRYSTAL\n\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=_where(path, 2) + " expected a text"):
        read_xsf(path)


def test_comments_only(tmp_path: Path) -> None:
    path = _corrupt(tmp_path, "# total energy = -1.0 eV\n\n# nothing else\n")
    with pytest.raises(ValueError, match=_where(path, 3) + " no structure found"):
        read_xsf(path)


def test_missing_count_line(tmp_path: Path) -> None:
    lines = _tio2_lines()
    del lines[8]
    path = _corrupt(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=_where(path, 9) + r" expected the atom count line.*'Ti'"):
        read_xsf(path)


def test_unknown_element(tmp_path: Path) -> None:
    path = _corrupt(tmp_path, "ATOMS\nH 0 0 0\nXx 1 0 0\n")
    with pytest.raises(ValueError, match=_where(path, 3) + " expected a chemical symbol.*'Xx'"):
        read_xsf(path)
    path = _corrupt(tmp_path, "ATOMS\n0 0 0 0\n")
    with pytest.raises(ValueError, match=_where(path, 2) + " atomic number 0"):
        read_xsf(path)


def test_wrong_number_of_columns(tmp_path: Path) -> None:
    path = _corrupt(tmp_path, "ATOMS\nH 0 0 0\nH 1 0 0 0.5 0.5\n")
    with pytest.raises(ValueError, match=_where(path, 3) + " expected an atom line.*6 columns"):
        read_xsf(path)


def test_forces_on_some_atoms_only(tmp_path: Path) -> None:
    path = _corrupt(tmp_path, "ATOMS\nH 0 0 0 0.1 0.1 0.1\nH 1 0 0\n")
    with pytest.raises(ValueError, match=_where(path, 3) + " atom 2 lacks force columns"):
        read_xsf(path)


def test_bad_energy_value(tmp_path: Path) -> None:
    lines = _tio2_lines()
    lines[0] = "# total energy = unknown eV"
    path = _corrupt(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=_where(path, 1) + " total energy 'unknown' is not"):
        read_xsf(path)


def test_two_energies_for_one_frame(tmp_path: Path) -> None:
    lines = _tio2_lines()
    path = _corrupt(tmp_path, "\n".join([lines[0], *lines]) + "\n")
    with pytest.raises(ValueError, match=_where(path, 2) + " a second 'total energy'.*line 1"):
        read_xsf(path)


def test_primcoord_without_primvec(tmp_path: Path) -> None:
    path = _corrupt(tmp_path, "CRYSTAL\nPRIMCOORD\n1 1\nH 0 0 0\n")
    with pytest.raises(ValueError, match=_where(path, 2) + " PRIMCOORD needs the cell"):
        read_xsf(path)


def test_animsteps_with_missing_frames(tmp_path: Path) -> None:
    path = _corrupt(tmp_path, "ANIMSTEPS 3\nATOMS 1\nH 0 0 0\nATOMS 2\nH 0 0 1\n")
    with pytest.raises(ValueError, match=_where(path, 1) + " ANIMSTEPS announces 3 frames.* 2"):
        read_xsf(path)


def test_singular_cell_is_reported_at_its_block(tmp_path: Path) -> None:
    path = _corrupt(tmp_path, "CRYSTAL\nPRIMVEC\n1 0 0\n1 0 0\n0 0 1\nPRIMCOORD\n1 1\nH 0 0 0\n")
    with pytest.raises(ValueError, match=_where(path, 6) + " invalid structure.*singular"):
        read_xsf(path)


def test_corrupt_xsf_through_read_structures(tmp_path: Path) -> None:
    path = _corrupt(tmp_path, "CRYSTAL\nPRIMVEC\n")
    with pytest.raises(ValueError, match=_where(path, 2) + " PRIMVEC needs 3 .*found 0"):
        read_structures(path)


# ---------------------------------------------------------------------------------------------
# atomic writes


class _Exploding:
    """Looks like a periodic structure, but reading its positions fails mid-write."""

    species = ("Cu",)
    pbc = (True, True, True)
    energy = -1.0
    forces = None
    cell = torch.eye(3, dtype=torch.float64) * 3

    @property
    def positions(self) -> torch.Tensor:
        raise RuntimeError("disk on fire")


def test_failed_write_leaves_previous_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "out.xsf"
    (good,) = read_xsf(FORTRAN / "aucu.xsf")
    write_xsf(path, good)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_xsf(path, [good, _Exploding()])  # the first frame is written before the failure
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.xsf"]  # no temporary file left behind


def test_failed_rename_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.xsf"
    (structure,) = read_xsf(TIO2 / "structure-004.xsf")

    def failing_replace(src: str, dst: str) -> None:
        assert Path(src).parent == tmp_path  # the temporary file sits beside the target
        assert Path(src).read_text().endswith("\n")  # and is complete
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_xsf(path, structure)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    write_xsf(path, structure)
    assert os.listdir(tmp_path) == ["out.xsf"]
    _assert_same(read_xsf(path)[0], structure)


def test_write_into_missing_directory(tmp_path: Path) -> None:
    (structure,) = read_xsf(FORTRAN / "aucu.xsf")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_xsf(tmp_path / "nowhere" / "out.xsf", structure)


@pytest.mark.parametrize("token", ["1_000.0", "0x1p-2", "inf", "Infinity", "1.0e", "--1.0"])
def test_numbers_outside_fortran_syntax_are_refused(tmp_path: Path, token: str) -> None:
    lines = _tio2_lines()
    lines[9] = lines[9].replace("-0.31428097", token)
    path = _corrupt(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=_where(path, 10) + " force component"):
        read_xsf(path)


def test_fortran_exponents_are_read(tmp_path: Path) -> None:
    lines = _tio2_lines()
    lines[9] = lines[9].replace("-0.31428097", "-0.31428097D+01")
    structure = read_xsf(_corrupt(tmp_path, "\n".join(lines) + "\n"))[0]
    assert -3.1428097 in structure.forces.flatten().tolist()


@pytest.mark.parametrize(
    ("unit", "factor"),
    [("", 1.0), ("eV", 1.0), ("Ry", units.Ry), ("hartree", units.Hartree), ("kJ/mol", 0.0103643)],
)
def test_an_energy_comment_in_another_unit_is_converted(tmp_path, unit, factor) -> None:
    lines = [line for line in _tio2_lines() if "total energy" not in line]
    lines.insert(0, f"# total energy = -2.5 {unit}")
    structure = read_xsf(_corrupt(tmp_path, "\n".join(lines) + "\n"))[0]
    assert structure.energy == pytest.approx(-2.5 * factor, rel=1e-5)  # ASE's CODATA values


def test_an_energy_comment_in_an_unknown_unit_is_refused(tmp_path) -> None:
    lines = [line for line in _tio2_lines() if "total energy" not in line]
    lines.insert(0, "# total energy = -2.5 meV")
    path = _corrupt(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=_where(path, 1) + " unknown energy unit 'meV'"):
        read_xsf(path)
