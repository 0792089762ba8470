"""Physics checks of any potential: each raises an ``AssertionError`` naming the worst case.

Every check takes a ``potential`` in any form :func:`~aenet_fn.testing.evaluation.as_evaluator`
accepts (an ASE calculator, a ``Model``, ``TorchANNPotential``, ``TorchCommitteePotential``, a
saved model's path, or a function of a :class:`~aenet_fn.core.structure.Structure`) and compares
energies (eV), forces (eV/Å) and stress (eV/Å³) wherever the potential gives them. A quantity
passes when ``|actual − expected| <= atol + rtol · max|expected|`` for its largest difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ase.data import atomic_masses, atomic_numbers
from ase.units import fs, kB

from aenet_fn.core.structure import Structure
from aenet_fn.testing import transforms
from aenet_fn.testing.evaluation import Evaluation, as_evaluator

_AXES = "xyz"
_UNITS = {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å³"}


def _label(structure: Structure) -> str:
    return f"{structure.name or 'a structure'} ({structure.formula}, pbc {structure.pbc})"


def _where(quantity: str, index: tuple[int, ...], structure: Structure) -> str:
    if quantity == "forces":
        atom, axis = index
        return f" at atom {atom} ({structure.species[atom]}), {_AXES[axis]}"
    if quantity == "stress":
        return f" at {_AXES[index[0]]}{_AXES[index[1]]}"
    return ""


def _difference(
    quantity: str, actual: Any, expected: Any, rtol: float, atol: float, structure: Structure
) -> str | None:
    """A line describing the worst entry of ``actual`` against ``expected``, or None when it is
    within tolerance."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    gap = np.abs(actual - expected)
    tolerance = atol + rtol * float(np.abs(expected).max(initial=0.0))
    if not np.isfinite(actual).all() or not np.isfinite(expected).all():
        worst = np.unravel_index(int(np.argmax(~np.isfinite(actual - expected))), gap.shape)
    else:
        worst = np.unravel_index(int(np.argmax(gap)), gap.shape)
        if gap[worst] <= tolerance:
            return None
    unit = _UNITS.get(quantity, "")
    return (
        f"  {quantity}{_where(quantity, tuple(int(i) for i in worst), structure)}: "
        f"got {actual[worst]:.10g} {unit}, expected {expected[worst]:.10g} {unit} "
        f"(difference {gap[worst]:.3g} > tolerance {tolerance:.3g})"
    )


def _assert_all(check: str, structure: Structure, lines: Sequence[str | None]) -> None:
    failures = [line for line in lines if line is not None]
    if failures:
        raise AssertionError("\n".join([f"{check} fails for {_label(structure)}:", *failures]))


def _compare(
    check: str,
    structure: Structure,
    actual: Evaluation,
    expected: Evaluation,
    rtol: float,
    atol: float,
) -> None:
    """``actual`` equals ``expected`` in every quantity both give."""
    lines = [_difference("energy", actual.energy, expected.energy, rtol, atol, structure)]
    for quantity in ("forces", "stress"):
        got, wanted = getattr(actual, quantity), getattr(expected, quantity)
        if got is not None and wanted is not None:
            lines.append(_difference(quantity, got, wanted, rtol, atol, structure))
    _assert_all(check, structure, lines)


def _unchanged(value: Any) -> Any:
    return value


def _mapped(
    evaluation: Evaluation, energy=_unchanged, forces=_unchanged, stress=_unchanged
) -> Evaluation:
    """``evaluation`` with each quantity it has mapped by the given function."""
    return Evaluation(
        energy(evaluation.energy),
        None if evaluation.forces is None else forces(evaluation.forces),
        None if evaluation.stress is None else stress(evaluation.stress),
    )


def _check_symmetry(
    check: str,
    potential: Any,
    structure: Structure,
    transformed: Structure,
    expected_from: Any,
    rtol: float,
    atol: float,
) -> None:
    """``transformed`` evaluates to ``expected_from(evaluation of structure)``."""
    evaluate = as_evaluator(potential)
    expected = expected_from(evaluate(structure))
    _compare(check, transformed, evaluate(transformed), expected, rtol, atol)


def check_rotation_invariance(
    potential: Any,
    structure: Structure,
    rotation: np.ndarray,
    *,
    rtol: float = 1e-9,
    atol: float = 1e-8,
) -> None:
    """Rotating (or reflecting) positions and cell by the orthogonal ``rotation`` ``[3, 3]``
    (``r → r R``) keeps the energy and rotates forces (``F R``) and stress (``Rᵀ σ R``)."""
    matrix = np.asarray(rotation, dtype=np.float64)
    rotated = transforms.rotate(structure, rotation)

    def expected(before: Evaluation) -> Evaluation:
        return _mapped(before, forces=lambda f: f @ matrix, stress=lambda s: matrix.T @ s @ matrix)

    _check_symmetry("rotation invariance", potential, structure, rotated, expected, rtol, atol)


def check_translation_invariance(
    potential: Any,
    structure: Structure,
    shift: Sequence[float],
    *,
    rtol: float = 1e-9,
    atol: float = 1e-8,
) -> None:
    """Moving every atom by ``shift`` ``[3]`` (Å) changes no energy, force or stress."""
    moved = transforms.translate(structure, shift)
    _check_symmetry("translation invariance", potential, structure, moved, _mapped, rtol, atol)


def check_permutation_invariance(
    potential: Any,
    structure: Structure,
    order: Sequence[int],
    *,
    rtol: float = 1e-9,
    atol: float = 1e-8,
) -> None:
    """Reordering the atoms (atom ``i`` becomes atom ``order[i]``) keeps energy and stress and
    reorders the forces alike."""
    index = np.asarray(order)
    permuted = transforms.permute(structure, order)

    def expected(before: Evaluation) -> Evaluation:
        return _mapped(before, forces=lambda f: f[index])

    _check_symmetry("permutation invariance", potential, structure, permuted, expected, rtol, atol)


def check_rewrapping_invariance(
    potential: Any,
    structure: Structure,
    shifts: np.ndarray,
    *,
    rtol: float = 1e-9,
    atol: float = 1e-8,
) -> None:
    """Replacing atoms by periodic images (atom ``i`` moved by ``shifts[i] @ cell``, integer
    ``shifts`` ``[N, 3]``, periodic axes only), as wrapping atoms into the cell does, changes
    nothing."""
    moved = transforms.shift_images(structure, shifts)
    _check_symmetry("re-wrapping invariance", potential, structure, moved, _mapped, rtol, atol)


def check_extensivity(
    potential: Any,
    structure: Structure,
    repeats: Sequence[int],
    *,
    rtol: float = 1e-9,
    atol: float = 1e-8,
) -> None:
    """The supercell of ``repeats`` ``[3]`` copies (periodic axes only) has the energy of the
    copies, each copy the forces of the original, and the same stress."""
    supercell = transforms.repeat(structure, repeats)
    copies = int(np.prod(repeats))

    def expected(before: Evaluation) -> Evaluation:
        return _mapped(
            before, energy=lambda e: copies * e, forces=lambda f: np.tile(f, (copies, 1))
        )

    _check_symmetry("extensivity", potential, structure, supercell, expected, rtol, atol)


def _round_off(energies: Sequence[float], step: float) -> float:
    """The central differences' round-off (100 ulp of the energies over the step)."""
    return 100 * np.finfo(np.float64).eps * max(1.0, *map(abs, energies)) / step


def check_forces(
    potential: Any,
    structure: Structure,
    *,
    step: float = 1e-4,
    atoms: Sequence[int] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Forces equal ``−∂E/∂r`` by central differences of ``step`` Å (for the ``atoms`` listed,
    default all: ``6 N`` evaluations). The tolerance adds the differences' round-off."""
    evaluate = as_evaluator(potential)
    reference = evaluate(structure)
    if reference.forces is None:
        raise ValueError("check_forces: the potential gives no forces")
    chosen = range(structure.n_atoms) if atoms is None else [int(a) for a in atoms]
    numeric = reference.forces.copy()  # atoms not chosen compare equal
    energies = [reference.energy]
    for atom in chosen:
        for axis in range(3):
            shift = np.zeros((structure.n_atoms, 3))
            shift[atom, axis] = step
            up, down = (
                evaluate(_with_positions(structure, structure.positions.numpy() + sign * shift))
                for sign in (1, -1)
            )
            energies += [up.energy, down.energy]
            numeric[atom, axis] = -(up.energy - down.energy) / (2 * step)
    tolerance = atol + _round_off(energies, step)
    line = _difference("forces", reference.forces, numeric, rtol, tolerance, structure)
    _assert_all(f"forces = −∂E/∂r (central differences, step {step} Å)", structure, [line])


def _with_positions(structure: Structure, positions: np.ndarray) -> Structure:
    return Structure(
        positions, structure.species, cell=structure.cell, pbc=structure.pbc, name=structure.name
    )


def check_stress(
    potential: Any,
    structure: Structure,
    *,
    step: float = 1e-5,
    rtol: float = 1e-5,
    atol: float = 1e-7,
) -> None:
    """The stress equals ``(1/V) ∂E/∂ε`` (symmetrised) by central differences of homogeneous
    strains of ``step`` (18 evaluations); the structure must be periodic in all three
    directions. The tolerance adds the differences' round-off over the volume."""
    evaluate = as_evaluator(potential)
    reference = evaluate(structure)
    if reference.stress is None:
        raise ValueError(
            "check_stress: the potential gives no stress for this structure (a stress needs a "
            "cell periodic in all three directions)"
        )
    derivative = np.zeros((3, 3))
    energies = [reference.energy]
    for a in range(3):
        for b in range(3):
            epsilon = np.zeros((3, 3))
            epsilon[a, b] = step
            up, down = (evaluate(transforms.strain(structure, sign * epsilon)) for sign in (1, -1))
            energies += [up.energy, down.energy]
            derivative[a, b] = (up.energy - down.energy) / (2 * step)
    volume = abs(float(np.linalg.det(structure.cell.numpy())))
    expected = 0.5 * (derivative + derivative.T) / volume
    tolerance = atol + _round_off(energies, step) / volume
    line = _difference("stress", reference.stress, expected, rtol, tolerance, structure)
    _assert_all(f"stress = (1/V) ∂E/∂ε (central differences, step {step})", structure, [line])


def check_energy_conservation(
    potential: Any,
    structure: Structure,
    *,
    temperature_K: float = 300.0,
    timestep_fs: float = 1.0,
    steps: int = 50,
    max_drift_per_atom: float = 1e-3,
    seed: int = 0,
) -> None:
    """A short NVE run (velocity Verlet, ``steps`` steps of ``timestep_fs`` fs, velocities
    drawn at ``temperature_K`` K with the centre of mass at rest) keeps the total energy within
    ``max_drift_per_atom`` eV/atom of its start."""
    evaluate = as_evaluator(potential)
    masses = np.array([atomic_masses[atomic_numbers[s]] for s in structure.species])[:, None]
    rng = np.random.default_rng(seed)
    velocities = rng.normal(size=(structure.n_atoms, 3)) * np.sqrt(kB * temperature_K / masses)
    velocities -= (masses * velocities).sum(0) / masses.sum()
    dt = timestep_fs * fs
    positions = structure.positions.numpy().copy()
    state = evaluate(structure)
    if state.forces is None:
        raise ValueError("check_energy_conservation: the potential gives no forces")
    totals = [state.energy + 0.5 * float((masses * velocities**2).sum())]
    for _ in range(steps):
        velocities = velocities + 0.5 * dt * state.forces / masses
        positions = positions + dt * velocities
        state = evaluate(_with_positions(structure, positions))
        velocities = velocities + 0.5 * dt * state.forces / masses
        totals.append(state.energy + 0.5 * float((masses * velocities**2).sum()))
    drift = np.abs(np.array(totals) - totals[0]) / structure.n_atoms
    worst = int(np.argmax(drift))
    if not np.isfinite(drift).all() or drift[worst] > max_drift_per_atom:
        raise AssertionError(
            f"energy conservation (NVE, {timestep_fs} fs steps from {temperature_K} K) fails "
            f"for {_label(structure)}: after {worst} steps the total energy moved by "
            f"{drift[worst]:.3g} eV/atom (from {totals[0]:.10g} eV to {totals[worst]:.10g} eV) "
            f"> {max_drift_per_atom:.3g} eV/atom"
        )
