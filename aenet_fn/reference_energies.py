"""Atomic reference energies from (composition, energy) data, with the names of the ænet tools'
``aenet.reference_energies``.

A *sample* is a pair ``(composition, energy)``: ``composition`` maps chemical symbols to atom
counts (``{"Ti": 32, "O": 64}``) and ``energy`` is the total energy in eV. Samples may come from
any iterable, a generator included; each method reads it exactly once, so arbitrarily large data
sets stream through in constant memory (the regression keeps one small dict per sample it uses).

* :meth:`ReferenceEnergies.from_regression` fits ``E ≈ Σ_s n_s E_s`` by linear least squares
  over all samples, or over a random subset drawn by reservoir sampling in the same single pass.
* :meth:`ReferenceEnergies.from_reference_compounds` takes, for each requested compound, the
  sample of lowest energy with that composition and solves ``Σ_s c_s E_s = E_compound``.
* :func:`iter_composition_energy_samples_from_files` yields the samples of structure files.

In both fits, species of ``fixed_atomic_energies`` keep the given values (their contribution is
moved to the right-hand side) and the other species present in the samples are solved for. Every
species that occurs in the samples must end up with an energy: when the data cannot determine
some of them, a ``ValueError`` names them and suggests ``fixed_atomic_energies``.

Choices the reference leaves open, made here:

* Reference compounds match samples *after reduction*: ``"TiO2"``, ``"Ti2O4"`` and a sample with
  32 Ti and 64 O atoms all have the composition TiO2. Among the matching samples the one of
  lowest energy per formula unit (equivalently per atom) is selected, and its energy is converted
  to one formula unit *of the compound as written* (``E_sample · n_compound / n_sample``).
  Two requested compounds with the same reduced composition are duplicates (``ValueError``).
* Formulas are element symbols with optional counts, e.g. ``"TiO2"``, ``"H2O"``, ``"CH3CH3"``
  (repeated elements add up); parentheses and hydrates are not parsed.
* ``species_order`` (and the order of :attr:`ReferenceEnergies.atomic_energies`) is alphabetical,
  so it does not depend on which samples a subset happens to contain.
* ``subset_fraction`` keeps ``ceil(subset_fraction · len(samples))`` samples (at least one).
* ``rmse`` is the root-mean-square residual per sample, in eV (not per atom).
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import reduce
from pathlib import Path
from typing import Any

import ase.io
import attrs
import numpy as np

from aenet_fn.core.structure import ELEMENT_SYMBOLS
from aenet_fn.io.ase_io import from_ase, read_structures

__all__ = ["ReferenceEnergies", "iter_composition_energy_samples_from_files"]

Composition = dict[str, int]
"""Atom count per chemical symbol."""

_FORMULA = re.compile(r"(?:[A-Z][a-z]?\d*)+")
_FORMULA_TOKEN = re.compile(r"([A-Z][a-z]?)(\d*)")


# -- validation of inputs ---------------------------------------------------------------------


def _symbol(symbol: Any, where: str) -> str:
    if not isinstance(symbol, str) or symbol not in ELEMENT_SYMBOLS:
        raise ValueError(f"{where}: {symbol!r} is not a chemical element symbol")
    return symbol


def _finite(value: Any, where: str) -> float:
    """``value`` as a finite float; ``ValueError`` for non-numbers, NaN and inf."""
    if value is None or isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{where}: {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: {number} is not finite")
    return number


def _count(value: Any, where: str) -> int:
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, float) and value.is_integer()
    )
    if isinstance(value, bool) or not integral:
        raise ValueError(f"{where}: the atom count {value!r} is not an integer")
    if value < 0:
        raise ValueError(f"{where}: the atom count {value!r} is negative")
    return int(value)


def _composition(value: Any, where: str) -> Composition:
    """A validated composition without zero counts (``TypeError`` when not a mapping,
    ``ValueError`` for bad symbols or counts and for zero atoms)."""
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{where}: the composition must be a mapping symbol -> count, got "
            f"{type(value).__name__}"
        )
    counts = {}
    for symbol, count in value.items():
        symbol = _symbol(symbol, where)
        count = _count(count, f"{where}, {symbol}")
        if count:
            counts[symbol] = count
    if not counts:
        raise ValueError(f"{where}: the composition {dict(value)!r} has no atoms")
    return counts


def _samples(samples: Iterable[Any]) -> Iterator[tuple[int, Composition, float]]:
    """``(index, composition, energy)`` of every sample, validated, in one pass."""
    try:
        iterator = iter(samples)
    except TypeError:
        raise TypeError(
            f"samples must be an iterable of (composition, energy) pairs, got "
            f"{type(samples).__name__}"
        ) from None
    for index, sample in enumerate(iterator):
        where = f"sample {index}"
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise TypeError(f"{where}: expected a (composition, energy) pair, got {sample!r}")
        composition, energy = sample
        yield index, _composition(composition, where), _finite(energy, f"{where}: energy")


def _fixed_energies(fixed: Mapping[str, Any] | None) -> dict[str, float]:
    if fixed is None:
        return {}
    if not isinstance(fixed, Mapping):
        raise TypeError(
            f"fixed_atomic_energies must map symbols to energies (eV), got {type(fixed).__name__}"
        )
    return {
        _symbol(s, "fixed_atomic_energies"): _finite(e, f"fixed_atomic_energies[{s!r}]")
        for s, e in fixed.items()
    }


def _check_fixed_known(fixed: Mapping[str, float], species: set[str]) -> None:
    unknown = sorted(set(fixed) - species)
    if unknown:
        raise ValueError(
            f"fixed_atomic_energies names species {unknown} that occur in none of the samples "
            f"(species present: {sorted(species)})"
        )


def _subset_target(
    samples: Iterable[Any], subset_size: Any, subset_fraction: Any, random_seed: Any
) -> int | None:
    """Number of samples to keep (None: all), from the validated subset options."""
    if random_seed is not None and (
        isinstance(random_seed, bool) or not isinstance(random_seed, numbers.Integral)
    ):
        raise ValueError(f"random_seed must be an integer or None, got {random_seed!r}")
    if subset_size is not None and subset_fraction is not None:
        raise ValueError("give subset_size or subset_fraction, not both")
    if subset_size is not None:
        if (
            isinstance(subset_size, bool)
            or not isinstance(subset_size, numbers.Integral)
            or subset_size < 1
        ):
            raise ValueError(f"subset_size must be a positive integer, got {subset_size!r}")
        return int(subset_size)
    if subset_fraction is not None:
        if (
            isinstance(subset_fraction, bool)
            or not isinstance(subset_fraction, numbers.Real)
            or not 0 < subset_fraction <= 1
        ):
            raise ValueError(f"subset_fraction must lie in (0, 1], got {subset_fraction!r}")
        try:
            n = len(samples)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                "subset_fraction needs samples of known length (a list or other sized "
                "collection); for a generator or iterator give subset_size instead"
            ) from None
        return max(1, math.ceil(subset_fraction * n - 1e-9))
    return None


def _parse_formula(formula: str) -> Composition:
    """``"TiO2"`` → ``{"Ti": 1, "O": 2}``; ``ValueError`` naming an invalid formula."""
    text = formula.strip()
    if not _FORMULA.fullmatch(text):
        raise ValueError(
            f"invalid formula {formula!r}: expected element symbols with optional counts, "
            "e.g. 'TiO2'"
        )
    counts: Composition = {}
    for symbol, digits in _FORMULA_TOKEN.findall(text):
        if symbol not in ELEMENT_SYMBOLS:
            raise ValueError(f"invalid formula {formula!r}: {symbol!r} is not an element")
        count = int(digits) if digits else 1
        if count == 0:
            raise ValueError(f"invalid formula {formula!r}: zero count for {symbol}")
        counts[symbol] = counts.get(symbol, 0) + count
    return counts


def _formula(composition: Mapping[str, int]) -> str:
    return "".join(f"{s}{c if c != 1 else ''}" for s, c in composition.items())


def _reduced(composition: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    """The composition divided by the gcd of its counts, as a sorted, hashable key."""
    divisor = reduce(math.gcd, composition.values())
    return tuple(sorted((s, c // divisor) for s, c in composition.items()))


def _compounds(reference_compounds: Any) -> list[tuple[str, Composition]]:
    """``(label, composition)`` of every requested compound; rejects bad types, bad formulas,
    an empty list and duplicates (same reduced composition)."""
    if isinstance(reference_compounds, (str, Mapping)) or not isinstance(
        reference_compounds, Iterable
    ):
        raise TypeError(
            "reference_compounds must be a list of formulas or compositions, e.g. ['TiO2', "
            f"{{'O': 2}}], got {reference_compounds!r}"
        )
    compounds, seen = [], {}
    for k, compound in enumerate(reference_compounds):
        if isinstance(compound, str):
            label, composition = compound.strip(), _parse_formula(compound)
        elif isinstance(compound, Mapping):
            composition = _composition(compound, f"reference_compounds[{k}]")
            label = _formula(composition)
        else:
            raise TypeError(
                f"reference_compounds[{k}] must be a formula string or a composition mapping, "
                f"got {type(compound).__name__}"
            )
        key = _reduced(composition)
        if key in seen:
            raise ValueError(
                f"reference compounds {seen[key]!r} and {label!r} have the same composition"
            )
        seen[key] = label
        compounds.append((label, composition))
    if not compounds:
        raise ValueError("reference_compounds is empty: give at least one compound")
    return compounds


# -- the linear system -------------------------------------------------------------------------


def _solve(
    rows: Sequence[Composition],
    targets: Sequence[float],
    species_order: Sequence[str],
    fixed: Mapping[str, float],
    remedy: str,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Least squares ``Σ_s rows[i][s] E_s = targets[i]`` for the species not in ``fixed``.

    Returns the energies of every species in ``species_order`` and the fit statistics. Raises
    ``ValueError`` naming the undetermined species when the system is rank-deficient."""
    free = [s for s in species_order if s not in fixed]
    counts = np.array([[row.get(s, 0) for s in free] for row in rows], dtype=np.float64)
    counts = counts.reshape(len(rows), len(free))
    offsets = np.array([sum(n * fixed.get(s, 0.0) for s, n in row.items()) for row in rows])
    rhs = np.asarray(targets, dtype=np.float64) - offsets
    if free:
        solution, _, rank, singular = np.linalg.lstsq(counts, rhs, rcond=None)
    else:
        solution, rank, singular = np.zeros(0), 0, np.zeros(0)
    if rank < len(free):
        null_space = np.linalg.svd(counts, full_matrices=True)[2][rank:]
        undetermined = [s for j, s in enumerate(free) if np.abs(null_space[:, j]).max() > 1e-8]
        raise ValueError(
            f"the samples do not determine the energies of {undetermined} (rank {rank} for "
            f"{len(free)} free species): provide fixed_atomic_energies for some of them or "
            f"{remedy}"
        )
    residual = counts @ solution - rhs
    rss = float(residual @ residual)
    energies = {s: fixed[s] if s in fixed else 0.0 for s in species_order}
    energies.update({s: float(e) for s, e in zip(free, solution)})
    stats = {
        "species_order": list(species_order),
        "fixed_atomic_energies": dict(fixed),
        "free_species": free,
        "rank": int(rank),
        "residual_sum_squares": rss,
        "rmse": math.sqrt(rss / len(rows)),
        "singular_values": [float(v) for v in singular],
    }
    return energies, stats


# -- the record --------------------------------------------------------------------------------


def _energies_table(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise TypeError(f"atomic_energies must map symbols to energies (eV), got {value!r}")
    return {
        _symbol(s, "atomic_energies"): _finite(e, f"atomic_energies[{s!r}]")
        for s, e in value.items()
    }


def _metadata_copy(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(value).__name__}")
    return copy.deepcopy(dict(value))


def _method(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"method must be a non-empty string, got {value!r}")


@attrs.frozen
class ReferenceEnergies:
    """Atomic reference energies (eV per atom of each species) and how they were obtained.

    Build one with :meth:`from_regression` or :meth:`from_reference_compounds`, or directly:
    ``ReferenceEnergies({"Ti": -1604.6, "O": -432.5}, method="manual")``. Values must be finite
    (``ValueError``). Use :attr:`atomic_energies` wherever atomic energies are expected, e.g.
    ``TorchTrainingConfig(atomic_energies=refs.atomic_energies)``.

    Attributes:
        method: ``"regression"``, ``"reference_compounds"`` or a caller's label.
    """

    _atomic_energies: dict[str, float] = attrs.field(converter=_energies_table)
    method: str = attrs.field(validator=_method)
    _metadata: dict[str, Any] = attrs.field(factory=dict, converter=_metadata_copy)

    @property
    def atomic_energies(self) -> dict[str, float]:
        """A copy of the energy (eV) of each species."""
        return dict(self._atomic_energies)

    @property
    def metadata(self) -> dict[str, Any]:
        """A deep copy of the provenance of the values (inputs, sample counts, fit quality)."""
        return copy.deepcopy(self._metadata)

    @classmethod
    def from_regression(
        cls,
        samples: Iterable[tuple[Mapping[str, int], float]],
        *,
        fixed_atomic_energies: Mapping[str, float] | None = None,
        subset_size: int | None = None,
        subset_fraction: float | None = None,
        random_seed: int | None = None,
    ) -> ReferenceEnergies:
        """Least-squares atomic energies: ``E_i ≈ Σ_s n_is E_s`` over the samples.

        Args:
            samples: ``(composition, energy)`` pairs (counts per symbol, total energy in eV);
                any iterable, read once.
            fixed_atomic_energies: energies (eV) kept as given; the other species are fitted.
            subset_size: fit on this many samples, drawn uniformly without replacement by
                reservoir sampling during the single pass (must not exceed the number of
                samples).
            subset_fraction: fit on ``ceil(fraction · len(samples))`` samples, fraction in
                ``(0, 1]``; needs a sized ``samples`` (use ``subset_size`` for generators).
            random_seed: seed of the subset draw (the same seed and samples give the same
                subset); None draws from fresh entropy.

        ``metadata`` holds species_order, fixed_atomic_energies, free_species, n_samples_total,
        n_samples_used, subset_size, subset_fraction, random_seed, rank, residual_sum_squares
        (eV²), rmse (eV per sample) and singular_values (of the free species' count matrix).
        Raises ``ValueError`` for invalid samples or options, no samples, fixed species absent
        from the samples, and species the samples cannot determine.
        """
        fixed = _fixed_energies(fixed_atomic_energies)
        keep = _subset_target(samples, subset_size, subset_fraction, random_seed)
        generator = random.Random(random_seed)
        chosen: list[tuple[int, Composition, float]] = []
        species: set[str] = set()
        n_total = 0
        for index, composition, energy in _samples(samples):
            n_total += 1
            species.update(composition)
            if keep is None or len(chosen) < keep:
                chosen.append((index, composition, energy))
            else:
                slot = generator.randrange(n_total)
                if slot < keep:
                    chosen[slot] = (index, composition, energy)
        if n_total == 0:
            raise ValueError("from_regression: no samples given")
        if subset_size is not None and subset_size > n_total:
            raise ValueError(f"subset_size {subset_size} exceeds the {n_total} samples given")
        _check_fixed_known(fixed, species)
        chosen.sort(key=lambda item: item[0])
        energies, stats = _solve(
            [c for _, c, _ in chosen],
            [e for _, _, e in chosen],
            sorted(species),
            fixed,
            "add samples of other compositions",
        )
        metadata = {
            **stats,
            "n_samples_total": n_total,
            "n_samples_used": len(chosen),
            "subset_size": subset_size,
            "subset_fraction": subset_fraction,
            "random_seed": random_seed,
        }
        return cls(energies, "regression", metadata)

    @classmethod
    def from_reference_compounds(
        cls,
        samples: Iterable[tuple[Mapping[str, int], float]],
        *,
        reference_compounds: Sequence[str | Mapping[str, int]],
        fixed_atomic_energies: Mapping[str, float] | None = None,
    ) -> ReferenceEnergies:
        """Atomic energies from the lowest-energy sample of each reference compound.

        Args:
            samples: ``(composition, energy)`` pairs, any iterable, read once.
            reference_compounds: formulas (``"TiO2"``, ``"O2"``) or compositions
                (``{"Ti": 1, "O": 2}``). A sample matches a compound when their compositions
                agree after reduction (``Ti32O64`` is TiO2); the match of lowest energy per atom
                is selected and its energy scaled to one formula unit of the compound.
            fixed_atomic_energies: energies (eV) kept as given.

        Solves ``Σ_s c_ks E_s = E_k`` (square, or least squares with more compounds than free
        species). Every species of the samples must be fixed or occur in a compound.
        ``metadata`` holds species_order, fixed_atomic_energies, free_species, n_samples_total,
        n_samples_used (= compounds), rank, residual_sum_squares, rmse, singular_values,
        n_reference_compounds, reference_compounds (labels), reference_candidate_counts (label →
        matching samples) and selected_reference_samples (label → sample_index, composition,
        energy, formula_units, energy_per_formula_unit). Raises ``TypeError`` for compounds of
        the wrong type and ``ValueError`` for invalid formulas, an empty or duplicated compound
        list, a compound no sample matches, and undetermined species.
        """
        compounds = _compounds(reference_compounds)
        fixed = _fixed_energies(fixed_atomic_energies)
        by_key = {_reduced(c): k for k, (_, c) in enumerate(compounds)}
        sizes = [sum(c.values()) for _, c in compounds]
        candidates = [0] * len(compounds)
        best: list[dict[str, Any] | None] = [None] * len(compounds)
        species: set[str] = set()
        n_total = 0
        for index, composition, energy in _samples(samples):
            n_total += 1
            species.update(composition)
            k = by_key.get(_reduced(composition))
            if k is None:
                continue
            candidates[k] += 1
            units = sum(composition.values()) / sizes[k]
            per_unit = energy / units
            if best[k] is None or per_unit < best[k]["energy_per_formula_unit"]:
                best[k] = {
                    "sample_index": index,
                    "composition": composition,
                    "energy": energy,
                    "formula_units": units,
                    "energy_per_formula_unit": per_unit,
                }
        if n_total == 0:
            raise ValueError("from_reference_compounds: no samples given")
        missing = [label for (label, _), n in zip(compounds, candidates) if n == 0]
        if missing:
            raise ValueError(f"no sample has the composition of the reference compounds {missing}")
        _check_fixed_known(fixed, species)
        energies, stats = _solve(
            [c for _, c in compounds],
            [b["energy_per_formula_unit"] for b in best],
            sorted(species),
            fixed,
            "add reference compounds containing them",
        )
        labels = [label for label, _ in compounds]
        metadata = {
            **stats,
            "n_samples_total": n_total,
            "n_samples_used": len(compounds),
            "n_reference_compounds": len(compounds),
            "reference_compounds": labels,
            "reference_candidate_counts": dict(zip(labels, candidates)),
            "selected_reference_samples": dict(zip(labels, best)),
        }
        return cls(energies, "reference_compounds", metadata)


# -- samples from files ------------------------------------------------------------------------


def _is_xsf(path: Path, frmt: str | None) -> bool:
    return frmt == "xsf" or (frmt is None and (path.is_dir() or path.suffix.lower() == ".xsf"))


def iter_composition_energy_samples_from_files(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    frmt: str | None = None,
    **read_kwargs: Any,
) -> Iterator[tuple[Composition, float]]:
    """Yield ``(composition, energy)`` for every frame of every file, file by file.

    Args:
        paths: one path or an iterable of paths (read lazily); a directory stands for its
            ``*.xsf`` files (see :func:`aenet_fn.read_structures`).
        frmt: file format (``"xsf"``, or any ASE format name); None guesses from the name.
        read_kwargs: passed to ``ase.io.read`` (``index=":"`` unless given) for non-XSF files;
            XSF files are read by aenet_fn's own reader, which takes none (``ValueError``).

    A frame without a total energy raises ``ValueError`` naming it.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for item in paths:
        path = Path(os.fspath(item))
        if not read_kwargs:
            structures = read_structures(path, format=frmt)
        elif _is_xsf(path, frmt):
            raise ValueError(
                f"{path}: XSF files are read by aenet_fn's reader, which takes no keyword "
                f"arguments (got {sorted(read_kwargs)})"
            )
        else:
            images = ase.io.read(path, format=frmt, **{"index": ":", **read_kwargs})
            images = images if isinstance(images, list) else [images]
            structures = [
                from_ase(atoms, name=f"{path}#frame={k}") for k, atoms in enumerate(images)
            ]
        for structure in structures:
            if structure.energy is None:
                raise ValueError(f"{structure.name}: the structure has no total energy")
            counts: Composition = {}
            for symbol in structure.species:
                counts[symbol] = counts.get(symbol, 0) + 1
            yield counts, float(structure.energy)
