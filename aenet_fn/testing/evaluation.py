"""One interface to every kind of potential: ``evaluator(structure) -> Evaluation``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import numpy as np
from ase.calculators.calculator import BaseCalculator, PropertyNotImplementedError

from aenet_fn.calculator import AenetCalculator
from aenet_fn.core.potential import Model
from aenet_fn.core.structure import Structure
from aenet_fn.io.ase_io import to_ase
from aenet_fn.torch_training import TorchANNPotential, TorchCommitteePotential


@attrs.frozen
class Evaluation:
    """What a potential says about one structure.

    Attributes:
        energy: total energy (eV).
        forces: ``[N, 3]`` forces (eV/Å), or None when the potential gives none.
        stress: ``[3, 3]`` stress (eV/Å³, ASE's sign: ``σ = (1/V) ∂E/∂ε``), or None (the
            potential gives none, or the structure is not periodic in all three directions).
    """

    energy: float
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None


Evaluator = Callable[[Structure], Evaluation]
"""``evaluator(structure) -> Evaluation``."""


def _numpy(value: Any) -> np.ndarray:
    """A float64 NumPy array of a number, array or tensor (on any device)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    return np.asarray(value, dtype=np.float64)


def _array(value: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if value is None:
        return None
    array = _numpy(value)
    if array.shape == (6,) and shape == (3, 3):  # Voigt: xx, yy, zz, yz, xz, xy
        xx, yy, zz, yz, xz, xy = array
        array = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    return array.reshape(shape)


def as_evaluation(result: Any, structure: Structure) -> Evaluation:
    """An :class:`Evaluation` from what an energy function returned: an ``Evaluation``, a number
    (the energy, eV), or a mapping with ``"energy"`` and optionally ``"forces"`` ``[N, 3]`` and
    ``"stress"`` (``[3, 3]`` or Voigt ``[6]``) as ASE's results."""
    if isinstance(result, Evaluation):
        return result
    if isinstance(result, Mapping):
        return Evaluation(
            energy=float(_numpy(result["energy"]).reshape(())),
            forces=_array(result.get("forces"), (structure.n_atoms, 3)),
            stress=_array(result.get("stress"), (3, 3)),
        )
    return Evaluation(energy=float(_numpy(result).reshape(())))


def ase_evaluator(calculator: BaseCalculator) -> Evaluator:
    """Evaluate with an ASE calculator: energy, forces when implemented, and the stress for
    cells periodic in all three directions when implemented."""
    implemented = set(getattr(calculator, "implemented_properties", ()))

    def evaluate(structure: Structure) -> Evaluation:
        atoms = to_ase(structure)
        atoms.calc = calculator
        forces = stress = None
        if "forces" in implemented:
            forces = np.array(atoms.get_forces(), dtype=np.float64)
        if "stress" in implemented and all(structure.pbc):
            try:
                stress = np.array(atoms.get_stress(voigt=False), dtype=np.float64)
            except PropertyNotImplementedError:
                stress = None
        return Evaluation(float(atoms.get_potential_energy()), forces, stress)

    return evaluate


def as_evaluator(potential: Any) -> Evaluator:
    """An evaluator for ``potential``: an ASE calculator; an aenet_fn ``Model``,
    ``TorchANNPotential`` or ``TorchCommitteePotential`` (evaluated by
    :class:`~aenet_fn.calculator.AenetCalculator`: a committee's mean), or the path of a saved
    one; or any function ``structure -> energy | mapping | Evaluation`` (see
    :func:`as_evaluation`)."""
    if isinstance(potential, BaseCalculator):
        return ase_evaluator(potential)
    if isinstance(potential, (Model, TorchANNPotential, TorchCommitteePotential, str, os.PathLike)):
        return ase_evaluator(AenetCalculator(potential))
    if callable(potential):
        return lambda structure: as_evaluation(potential(structure), structure)
    raise TypeError(
        "a potential must be an ASE calculator, a Model, TorchANNPotential, "
        "TorchCommitteePotential, a saved model's path, or a function of a Structure; "
        f"got a {type(potential).__name__}"
    )
