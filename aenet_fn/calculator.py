"""``AenetCalculator``: an ASE calculator over aenet_fn potentials and committees.

Every number comes from the core: energies, forces and stress from
:func:`~aenet_fn.core.potential.energy_forces_stress`, per-atom energies from
:func:`~aenet_fn.core.potential.atomic_energies`, the atoms converted by
:func:`~aenet_fn.io.ase_io.from_ase`. A committee is evaluated in one pass, the same core
function ``torch.func.vmap``-ed over the members' stacked network parameters (the construction
of :func:`~aenet_fn.driver.committee.committee_predict`, for one structure); its energy, forces,
stress and per-atom energies are the member means, and the spreads are population standard
deviations over the members, as in ``committee_predict``. Since every property is linear in the
energy, the mean forces and stress are exactly the derivatives of the mean energy.

Units are ASE's: Å, eV, eV/Å, and eV/Å³ for the stress (Voigt order xx, yy, zz, yz, xz, xy;
``σ = (1/V) ∂E/∂ε``, negative for a compressed cell).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ase
import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.md import velocitydistribution
from ase.stress import full_3x3_to_voigt_6_stress
from torch.func import vmap

from aenet_fn.core.batch import Batch, collate
from aenet_fn.core.descriptor import DescriptorGraph, build_graph
from aenet_fn.core.potential import Model, atomic_energies, energy_forces_stress, with_values
from aenet_fn.core.records import to
from aenet_fn.driver.committee import check_shared_parts, stack_members
from aenet_fn.io.ase_io import from_ase
from aenet_fn.torch_featurize.chebyshev import as_device
from aenet_fn.torch_training.committee import TorchCommitteePotential
from aenet_fn.torch_training.trainer import TorchANNPotential

__all__ = [
    "COMMITTEE_PROPERTIES",
    "PROPERTIES",
    "AenetCalculator",
    "PotentialLike",
    "thermalize_momenta",
]

PotentialLike = Model | TorchANNPotential | TorchCommitteePotential | str | os.PathLike[str]
"""What :class:`AenetCalculator` accepts as its potential."""

PROPERTIES = ("energy", "free_energy", "energies", "forces", "stress")
"""The results of every potential (see :class:`AenetCalculator`)."""

COMMITTEE_PROPERTIES = (
    "energy_std",
    "forces_std",
    "stress_std",
    "member_energies",
    "member_forces",
    "member_stresses",
)
"""The extra results of a committee (see :class:`AenetCalculator`)."""

COMMITTEE_METADATA = "committee_metadata.json"


def load_potential(
    path: Path, device: str | torch.device | None = None
) -> TorchANNPotential | TorchCommitteePotential:
    """The potential stored at ``path``: a committee directory or a model file, on ``device``
    (None: the CPU)."""
    if path.is_dir():
        if not (path / COMMITTEE_METADATA).is_file():
            raise ValueError(
                f"{path}: a directory but not a committee directory (no {COMMITTEE_METADATA}); "
                "give a model file written by TorchANNPotential.save or a committee directory"
            )
        return TorchCommitteePotential.from_directory(path, device)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file or committee directory")
    try:
        return TorchANNPotential.from_file(path, device)
    except ValueError as error:
        raise ValueError(
            f"{path}: neither an aenet_fn model file nor a committee directory ({error})"
        ) from error


def _members(potential: PotentialLike) -> tuple[tuple[Model, ...], bool]:
    """The member models of ``potential`` and whether it is a committee."""
    if isinstance(potential, (str, os.PathLike)):
        potential = load_potential(Path(potential))
    if isinstance(potential, Model):
        return (potential,), False
    if isinstance(potential, TorchANNPotential):
        if potential.model is None:
            raise ValueError(
                "AenetCalculator: the TorchANNPotential has not been trained or loaded"
            )
        return (potential.model,), False
    if isinstance(potential, TorchCommitteePotential):
        models = tuple(member.model for member in potential.members)
        if not models or any(model is None for model in models):
            raise ValueError(
                "AenetCalculator: the TorchCommitteePotential has not been trained or loaded"
            )
        check_shared_parts(models)
        return models, True
    raise TypeError(
        "AenetCalculator: the potential must be a Model, TorchANNPotential, "
        "TorchCommitteePotential, model file or committee directory, "
        f"not a {type(potential).__name__}"
    )


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy of ``tensor`` (ASE's result type)."""
    return tensor.detach().cpu().to(torch.float64).numpy()


def _voigt(stress: torch.Tensor) -> np.ndarray:
    """``[..., 3, 3]`` stress tensor(s) as ``[..., 6]`` Voigt vector(s) (xx, yy, zz, yz, xz, xy)."""
    return full_3x3_to_voigt_6_stress(_numpy(stress))


class AenetCalculator(Calculator):
    """ASE calculator for an aenet_fn potential or committee.

    Args:
        potential: a core :class:`~aenet_fn.core.potential.Model`, a trained or loaded
            :class:`~aenet_fn.torch_training.TorchANNPotential` or
            :class:`~aenet_fn.torch_training.TorchCommitteePotential`, the path of a model file
            (written by ``TorchANNPotential.save``) or of a committee directory (holding
            ``committee_metadata.json``). Files are read with ``torch.load(weights_only=True)``.
        **kwargs: passed to ``ase.calculators.calculator.Calculator`` (``label``, ``atoms``,
            ``directory``, ...).

    Results: ``energy`` and ``free_energy`` (eV, equal), ``forces`` ``[N, 3]`` (eV/Å),
    ``energies`` ``[N]`` per-atom energies (eV, summing to the energy; computed when asked for)
    and, for cells periodic in all three directions, ``stress`` ``[6]`` (eV/Å³, Voigt, ASE's
    sign convention ``σ = (1/V) ∂E/∂ε``); asking for the stress of any other cell raises
    ``PropertyNotImplementedError``. A committee's energy, forces, stress and per-atom energies
    are the member means, and it also gives :data:`COMMITTEE_PROPERTIES`: ``energy_std`` (eV),
    ``forces_std`` ``[N, 3]`` (eV/Å), ``stress_std`` ``[6]`` (eV/Å³; periodic cells), the
    population standard deviations over the ``M`` members, and the members' own
    ``member_energies`` ``[M]``, ``member_forces`` ``[M, N, 3]``, ``member_stresses``
    ``[M, 6]``. Read them with ``calc.get_property("energy_std", atoms)``.

    The evaluation runs in the model's dtype (float64 unless the model is float32) on
    ``device`` (None: the model's own; a path loads onto the CPU). ASE's ``check_state``
    decides when to recompute: results are reused until positions, numbers, cell or pbc
    change.

    Raises:
        ValueError: atoms with species the potential does not know, non-finite positions or
            cell, a singular periodic cell, a path that is neither a model file nor a
            committee directory, or an untrained potential.
        FileNotFoundError: a path that does not exist.
        TypeError: a potential of another type.
    """

    implemented_properties: tuple[str, ...] = PROPERTIES

    def __init__(
        self, potential: PotentialLike, device: str | torch.device | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.models, self.is_committee = _members(potential)
        if device is not None:
            self.models = to(self.models, as_device("device", device))
        if self.is_committee:
            self.implemented_properties = (*PROPERTIES, *COMMITTEE_PROPERTIES)

    @property
    def species(self) -> tuple[str, ...]:
        """The chemical symbols the potential knows, in its own order."""
        return self.models[0].descriptor.species

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the evaluation (the model's)."""
        return self.models[0].network.values.dtype

    @property
    def device(self) -> torch.device:
        """Device of the evaluation (the model's)."""
        return self.models[0].network.values.device

    def calculate(
        self,
        atoms: ase.Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = tuple(all_changes),
    ) -> None:
        """Evaluate ``atoms`` and store the results (see the class docstring). The stress is
        computed whenever the cell is periodic in all three directions (it comes from the same
        gradient as the forces); per-atom energies only when ``"energies"`` is asked for."""
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        periodic = bool(np.all(atoms.pbc))
        wants_stress = any(p in properties for p in ("stress", "stress_std", "member_stresses"))
        if wants_stress and not periodic:
            raise PropertyNotImplementedError(
                "AenetCalculator: the stress needs a cell periodic in all three directions; "
                f"these atoms have pbc={atoms.pbc.tolist()}"
            )
        batch = self._batch(atoms)
        graph = build_graph(self.models[0].descriptor, batch)
        outputs = self._evaluate(batch, graph, periodic)
        energies, forces = outputs[0], outputs[1]
        energy = float(energies.mean())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": _numpy(forces.mean(0)),
        }
        if periodic:
            self.results["stress"] = _voigt(outputs[2].mean(0))
        if "energies" in properties:
            self.results["energies"] = _numpy(self._atomic(batch, graph).mean(0))
        if self.is_committee:
            self.results.update(self._spread(*outputs))

    def _batch(self, atoms: ase.Atoms) -> Batch:
        """The one-structure batch of ``atoms``, in the model's species order, dtype, device."""
        unknown = sorted(set(atoms.get_chemical_symbols()) - set(self.species))
        if unknown:
            raise ValueError(
                f"AenetCalculator: the atoms contain species {unknown} that the potential does "
                f"not know (it knows {list(self.species)})"
            )
        try:
            structure = from_ase(atoms, name=atoms.get_chemical_formula())
        except ValueError as error:
            raise ValueError(f"AenetCalculator: invalid atoms: {error}") from error
        return collate([structure], species=self.species, dtype=self.dtype, device=self.device)

    def _evaluate(
        self, batch: Batch, graph: DescriptorGraph, with_stress: bool
    ) -> tuple[torch.Tensor, ...]:
        """Per member: energies ``[M]`` (eV), forces ``[M, N, 3]`` (eV/Å) and, with
        ``with_stress``, stress ``[M, 3, 3]`` (eV/Å³); one vmapped pass for ``M > 1``."""

        def one(model: Model) -> tuple[torch.Tensor, ...]:
            result = energy_forces_stress(model, batch, graph, compute_stress=with_stress)
            stress = (result.stress[0],) if with_stress else ()
            return (result.energy[0], result.forces, *stress)

        return self._over_members(one)

    def _atomic(self, batch: Batch, graph: DescriptorGraph) -> torch.Tensor:
        """Per-atom energies ``[M, N]`` (eV) of every member."""
        with torch.no_grad():
            return self._over_members(lambda model: (atomic_energies(model, batch, graph),))[0]

    def _over_members(
        self, function: Callable[[Model], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        """``function(model) -> tuple of tensors`` for every member, stacked along a leading
        member axis: a direct call for one member, ``torch.func.vmap`` over the stacked network
        parameters for several."""
        if len(self.models) == 1:
            return tuple(t.detach()[None] for t in function(self.models[0]))
        template = self.models[0]
        stacked = stack_members([m.network for m in self.models]).values
        outputs = vmap(lambda values: function(with_values(template, values)))(stacked)
        return tuple(t.detach() for t in outputs)

    @staticmethod
    def _spread(
        energies: torch.Tensor, forces: torch.Tensor, stress: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """The committee results: population standard deviations over members and the members'
        own energies ``[M]``, forces ``[M, N, 3]`` and stress ``[M, 6]``."""
        results: dict[str, Any] = {
            "energy_std": float(energies.std(0, unbiased=False)),
            "forces_std": _numpy(forces.std(0, unbiased=False)),
            "member_energies": _numpy(energies),
            "member_forces": _numpy(forces),
        }
        if stress is not None:
            member_stresses = _voigt(stress)
            results["member_stresses"] = member_stresses
            results["stress_std"] = member_stresses.std(0)
        return results


def thermalize_momenta(
    atoms: ase.Atoms, temperature_K: float, rng: np.random.Generator | None = None
) -> None:
    """Set the momenta of ``atoms`` to a Maxwell–Boltzmann distribution at ``temperature_K``
    (K): ASE's ``thermalize_momenta`` (ASE ≥ 3.29), else its ``MaxwellBoltzmannDistribution``
    (the same distribution; deprecated from 3.29)."""
    thermalize = getattr(velocitydistribution, "thermalize_momenta", None)
    if thermalize is None:
        thermalize = velocitydistribution.MaxwellBoltzmannDistribution
    thermalize(atoms, temperature_K=temperature_K, rng=rng)
