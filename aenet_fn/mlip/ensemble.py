"""``AenetEnsembleResult``: one structure's committee prediction (ænet tools' names)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

AGGREGATIONS = ("mean", "reference")


def validate_aggregation_mode(aggregation: str, reference_member: int, num_members: int) -> None:
    """Raise ``ValueError`` for an unknown aggregation or a reference member out of range."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not 0 <= reference_member < num_members:
        raise ValueError(f"reference_member {reference_member} is not in 0..{num_members - 1}")


def normalize_ensemble_members(
    members: Iterable[Mapping[str, str | os.PathLike]],
) -> list[dict[str, str]]:
    """The members of an ensemble of potential files, one ``{atom type: path}`` mapping each
    (as :meth:`TorchCommitteePotential.to_aenet_ascii` returns them), as plain dicts of
    strings with every member's types in the first member's order.

    Raises ``ValueError`` for no members, a member that is not a mapping or names no atom
    type, and members whose sets of atom types differ."""
    normalized = []
    for index, member in enumerate(members):
        if not isinstance(member, Mapping):
            raise ValueError(
                f"ensemble member {index} must map atom types to potential files, "
                f"got {type(member).__name__}"
            )
        if not member:
            raise ValueError(f"ensemble member {index} names no atom types")
        normalized.append({str(kind): os.fspath(path) for kind, path in member.items()})
    if not normalized:
        raise ValueError("an ensemble needs at least one member")
    order = list(normalized[0])
    for index, member in enumerate(normalized[1:], start=1):
        if set(member) != set(order):
            raise ValueError(
                f"ensemble member {index} has atom types {sorted(member)}, "
                f"member 0 has {sorted(order)}"
            )
    return [{kind: member[kind] for kind in order} for member in normalized]


@dataclass
class AenetEnsembleResult:
    """Committee prediction of one structure.

    Attributes:
        energy: reported energy (eV): the mean, or the reference member's with
            ``aggregation="reference"``; energy_mean / energy_std: over members (population std).
        forces: reported forces ``[n, 3]`` (eV/Å) or None; forces_mean / forces_std likewise.
        force_uncertainty: ``[n]`` per atom, the mean over x, y, z of the per-component std.
        member_energies: ``[M]``; member_forces: ``[M, n, 3]`` or None.
    """

    energy: float
    forces: np.ndarray | None
    energy_mean: float
    energy_std: float
    forces_mean: np.ndarray | None
    forces_std: np.ndarray | None
    force_uncertainty: np.ndarray | None
    member_energies: np.ndarray
    member_forces: np.ndarray | None
    aggregation: str = "mean"
    reference_member: int = 0

    @property
    def num_members(self) -> int:
        """Number of committee members."""
        return len(self.member_energies)

    @classmethod
    def from_member_predictions(
        cls,
        member_energies: Sequence[float],
        member_forces: Sequence[np.ndarray] | None = None,
        aggregation: str = "mean",
        reference_member: int = 0,
    ) -> AenetEnsembleResult:
        """Aggregate the members' energies (eV) and forces (eV/Å) of one structure."""
        energies = np.asarray(member_energies, dtype=float)
        if energies.ndim != 1 or energies.size == 0:
            raise ValueError(
                f"member_energies must be 1-D with one energy per member, got shape "
                f"{energies.shape}"
            )
        validate_aggregation_mode(aggregation, reference_member, len(energies))
        forces = None if member_forces is None else np.asarray(member_forces, dtype=float)
        if forces is not None and (forces.ndim != 3 or forces.shape[2] != 3):
            raise ValueError(f"member_forces must have shape [M, n, 3], got {forces.shape}")
        if forces is not None and len(forces) != len(energies):
            raise ValueError(f"{len(forces)} members' forces for {len(energies)} members' energies")
        mean_f = std_f = uncertainty = reported_f = None
        if forces is not None:
            mean_f, std_f = forces.mean(axis=0), forces.std(axis=0)
            uncertainty = std_f.mean(axis=1)
            reported_f = mean_f if aggregation == "mean" else forces[reference_member]
        reported = energies.mean() if aggregation == "mean" else energies[reference_member]
        return cls(
            energy=float(reported),
            forces=reported_f,
            energy_mean=float(energies.mean()),
            energy_std=float(energies.std()),
            forces_mean=mean_f,
            forces_std=std_f,
            force_uncertainty=uncertainty,
            member_energies=energies,
            member_forces=forces,
            aggregation=aggregation,
            reference_member=reference_member,
        )
