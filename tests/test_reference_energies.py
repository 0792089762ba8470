"""Atomic reference energies: regression, subsets, reference compounds, files, errors."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import aenet_fn as af
from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.reference_energies import (
    ReferenceEnergies,
    iter_composition_energy_samples_from_files,
)

E_TI, E_O = -1604.604515075, -432.503149303
SPECIES_POOL = ("H", "C", "N", "O", "Ti", "Cu")


def _samples(compositions, energies, noise=None):
    """``(composition, Σ n_s E_s [+ noise])`` for every composition."""
    noise = np.zeros(len(compositions)) if noise is None else noise
    return [
        (c, sum(n * energies[s] for s, n in c.items()) + float(eps))
        for c, eps in zip(compositions, noise)
    ]


def _noisy_tio(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    compositions = [
        {"Ti": int(rng.integers(1, 9)), "O": int(rng.integers(1, 17))} for _ in range(n)
    ]
    return _samples(compositions, {"Ti": E_TI, "O": E_O}, rng.normal(0.0, 0.5, n))


@st.composite
def exact_problems(draw):
    n_species = draw(st.integers(1, 4))
    species = draw(st.permutations(SPECIES_POOL))[:n_species]
    energies = {s: draw(st.floats(-2000.0, 0.0)) for s in species}
    n_samples = draw(st.integers(n_species, n_species + 8))
    compositions = []
    for _ in range(n_samples):
        counts = {s: draw(st.integers(0, 30)) for s in species}
        assume(sum(counts.values()) > 0)
        compositions.append(counts)
    matrix = np.array([[c[s] for s in species] for c in compositions], dtype=float)
    assume(np.linalg.matrix_rank(matrix) == n_species and np.linalg.cond(matrix) < 1e3)
    return energies, compositions


@given(exact_problems())
def test_regression_recovers_exact_atomic_energies(problem):
    energies, compositions = problem
    result = ReferenceEnergies.from_regression(iter(_samples(compositions, energies)))
    assert result.method == "regression"
    assert result.atomic_energies.keys() == energies.keys()
    for symbol, value in energies.items():
        assert result.atomic_energies[symbol] == pytest.approx(value, abs=1e-8)
    meta = result.metadata
    assert meta["species_order"] == sorted(energies)
    assert meta["rank"] == len(energies) and meta["rmse"] < 1e-8
    assert meta["n_samples_total"] == meta["n_samples_used"] == len(compositions)
    assert len(meta["singular_values"]) == len(energies)


def test_regression_metadata_describes_the_fit():
    samples = _noisy_tio(40, seed=3)
    result = ReferenceEnergies.from_regression(samples)
    counts = np.array([[c.get("O", 0), c.get("Ti", 0)] for c, _ in samples], dtype=float)
    energies = np.array([e for _, e in samples])
    solution, residuals, _, singular = np.linalg.lstsq(counts, energies, rcond=None)
    meta = result.metadata
    assert result.atomic_energies == {"O": solution[0], "Ti": solution[1]}
    assert meta["residual_sum_squares"] == pytest.approx(residuals[0], rel=1e-9)
    assert meta["rmse"] == pytest.approx(math.sqrt(residuals[0] / 40), rel=1e-9)
    np.testing.assert_allclose(meta["singular_values"], singular, rtol=1e-12)
    assert (meta["free_species"], meta["fixed_atomic_energies"]) == (["O", "Ti"], {})
    assert (meta["subset_size"], meta["subset_fraction"], meta["random_seed"]) == (None,) * 3


def test_fixed_species_keep_their_value_and_the_rest_is_fitted():
    compositions = [{"Ti": 1, "O": 2}, {"Ti": 2, "O": 3}, {"O": 2}, {"Ti": 1, "O": 1, "H": 1}]
    exact = {"Ti": E_TI, "O": E_O, "H": -13.6}
    result = ReferenceEnergies.from_regression(
        _samples(compositions, exact), fixed_atomic_energies={"O": E_O}
    )
    assert result.atomic_energies["O"] == E_O  # bit for bit
    assert result.atomic_energies == pytest.approx(exact, abs=1e-9)
    assert result.metadata["free_species"] == ["H", "Ti"]
    # A wrong fixed value is kept and the free species absorb it.
    shifted = ReferenceEnergies.from_regression(
        [({"Ti": 1, "O": 2}, 2 * E_O + E_TI)], fixed_atomic_energies={"O": E_O + 1.0}
    )
    assert shifted.atomic_energies == pytest.approx({"O": E_O + 1.0, "Ti": E_TI - 2.0})


def test_only_fixed_species_gives_the_residual_of_the_fixed_values():
    result = ReferenceEnergies.from_regression(
        [({"O": 2}, 2 * E_O + 0.3)], fixed_atomic_energies={"O": E_O}
    )
    meta = result.metadata
    assert result.atomic_energies == {"O": E_O}
    assert meta["rank"] == 0 and meta["rmse"] == pytest.approx(0.3)


def test_one_composition_ratio_cannot_separate_two_species():
    samples = [({"Ti": n, "O": 2 * n}, n * (E_TI + 2 * E_O)) for n in (1, 2, 4)]
    with pytest.raises(ValueError, match=r"\['O', 'Ti'\].*provide fixed_atomic_energies"):
        ReferenceEnergies.from_regression(samples)
    fixed = ReferenceEnergies.from_regression(samples, fixed_atomic_energies={"O": E_O})
    assert fixed.atomic_energies["Ti"] == pytest.approx(E_TI, abs=1e-9)


def test_subsets_are_reproducible_from_the_seed_and_read_the_samples_once():
    samples = _noisy_tio(60, seed=1)
    first = ReferenceEnergies.from_regression(samples, subset_size=12, random_seed=7)
    again = ReferenceEnergies.from_regression((s for s in samples), subset_size=12, random_seed=7)
    other = ReferenceEnergies.from_regression(samples, subset_size=12, random_seed=8)
    everything = ReferenceEnergies.from_regression(samples)
    assert first == again
    assert first.atomic_energies != other.atomic_energies
    assert first.atomic_energies != everything.atomic_energies
    meta = first.metadata
    assert (meta["n_samples_total"], meta["n_samples_used"]) == (60, 12)
    assert (meta["subset_size"], meta["random_seed"]) == (12, 7)
    fraction = ReferenceEnergies.from_regression(samples, subset_fraction=0.25, random_seed=7)
    assert fraction.metadata["n_samples_used"] == 15
    assert fraction.metadata["subset_fraction"] == 0.25
    whole = ReferenceEnergies.from_regression(samples, subset_fraction=1.0, random_seed=3)
    assert whole.atomic_energies == everything.atomic_energies


def test_reservoir_sampling_draws_every_sample_equally_often():
    # Sample i has energy 2**i for one H atom, so the fitted H energy (the mean of the chosen
    # energies) tells exactly which samples were chosen.
    n, k, draws = 10, 3, 1500
    samples = [({"H": 1}, float(2**i)) for i in range(n)]
    chosen = Counter()
    for seed in range(draws):
        mean = ReferenceEnergies.from_regression(
            iter(samples), subset_size=k, random_seed=seed
        ).atomic_energies["H"]
        mask = round(mean * k)
        assert bin(mask).count("1") == k
        chosen.update(i for i in range(n) if mask >> i & 1)
    expected = draws * k / n
    bound = 4 * math.sqrt(expected * (1 - k / n))
    assert all(abs(chosen[i] - expected) < bound for i in range(n)), chosen


def _polymorphs():
    """TiO2 cells of several sizes and energies, O2 molecules, one TiO and one Ti cell."""
    per_unit = {"a": -2469.0, "b": -2470.5, "c": -2469.9}
    samples = [
        ({"Ti": 8, "O": 16}, 8 * per_unit["a"]),
        ({"O": 2}, -865.0),
        ({"Ti": 2, "O": 4}, 2 * per_unit["b"]),  # the most stable TiO2, per formula unit
        ({"O": 8, "Ti": 4}, 4 * per_unit["c"]),
        ({"O": 2}, -864.0),
        ({"Ti": 1, "O": 1}, -2040.0),
        ({"Ti": 2}, -3210.0),
    ]
    return samples, per_unit["b"]


def test_reference_compounds_use_the_lowest_energy_sample_of_each_composition():
    samples, best_tio2 = _polymorphs()
    result = ReferenceEnergies.from_reference_compounds(
        iter(samples), reference_compounds=["TiO2", {"O": 2}]
    )
    assert result.method == "reference_compounds"
    assert result.atomic_energies["O"] == pytest.approx(-865.0 / 2, abs=1e-10)
    assert result.atomic_energies["Ti"] == pytest.approx(best_tio2 + 865.0, abs=1e-10)
    meta = result.metadata
    assert meta["reference_compounds"] == ["TiO2", "O2"]
    assert meta["n_reference_compounds"] == 2 and meta["n_samples_total"] == 7
    assert meta["reference_candidate_counts"] == {"TiO2": 3, "O2": 2}
    selected = meta["selected_reference_samples"]
    assert selected["TiO2"]["sample_index"] == 2 and selected["TiO2"]["formula_units"] == 2
    assert selected["TiO2"]["energy_per_formula_unit"] == pytest.approx(best_tio2)
    assert selected["O2"]["sample_index"] == 1
    assert meta["rank"] == 2 and meta["rmse"] == pytest.approx(0.0, abs=1e-9)


def test_reference_compounds_are_scaled_to_the_formula_as_written():
    samples, best_tio2 = _polymorphs()
    result = ReferenceEnergies.from_reference_compounds(
        samples, reference_compounds=["Ti2O4", "TiO"], fixed_atomic_energies={"O": -430.0}
    )
    assert result.metadata["selected_reference_samples"]["Ti2O4"]["formula_units"] == 1
    # Ti from Ti2O4 (2 Ti + 4 O = 2 × best) and from TiO disagree: least squares over both.
    from_tio2, from_tio = (2 * best_tio2 + 4 * 430.0) / 2, -2040.0 + 430.0
    assert result.atomic_energies["Ti"] == pytest.approx(
        (2 * 2 * from_tio2 + from_tio) / 5, abs=1e-9
    )
    assert result.atomic_energies["O"] == -430.0
    assert result.metadata["residual_sum_squares"] > 0


def test_species_without_a_compound_or_fixed_value_are_reported():
    samples, _ = _polymorphs()
    with pytest.raises(ValueError, match=r"\['Ti'\].*add reference compounds"):
        ReferenceEnergies.from_reference_compounds(samples, reference_compounds=["O2"])


@pytest.fixture(scope="module")
def tio2_files():
    return sorted(TIO2_STRUCTURES.glob("*.xsf"))


def test_file_samples_match_the_structures_of_the_files(tio2_files):
    samples = list(iter_composition_energy_samples_from_files(str(p) for p in tio2_files))
    structures = af.read_structures(tio2_files)
    assert len(samples) == len(structures) == 100
    for (composition, energy), structure in zip(samples, structures):
        assert composition == dict(Counter(structure.species))
        assert energy == structure.energy
    folder = list(iter_composition_energy_samples_from_files(tio2_files[0].parent, frmt="xsf"))
    assert folder == samples


def test_regression_and_compounds_on_the_tio2_files(tio2_files):
    samples = iter_composition_energy_samples_from_files(tio2_files)
    result = ReferenceEnergies.from_regression(samples)
    energies = result.atomic_energies
    assert set(energies) == {"Ti", "O"} and all(math.isfinite(e) for e in energies.values())
    assert result.metadata["n_samples_total"] == 100 and result.metadata["rank"] == 2
    # The fit reproduces the total energies to within a few eV per structure.
    assert result.metadata["rmse"] < 50.0
    compounds = ReferenceEnergies.from_reference_compounds(
        iter_composition_energy_samples_from_files(tio2_files),
        reference_compounds=["TiO2"],
        fixed_atomic_energies={"O": E_O},
    )
    selected = compounds.metadata["selected_reference_samples"]["TiO2"]
    file_energies = [
        s.energy / s.n_atoms
        for s in af.read_structures(tio2_files)
        if 2 * s.species.count("Ti") == s.species.count("O")
    ]
    assert selected["energy_per_formula_unit"] / 3 == pytest.approx(min(file_energies))
    assert compounds.atomic_energies["Ti"] == pytest.approx(
        selected["energy_per_formula_unit"] - 2 * E_O
    )


def test_files_other_than_xsf_go_through_ase_with_keyword_arguments(tmp_path):
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for k in range(3):
        atoms = ase.Atoms("H2O", positions=[[0, 0, 0], [0.9 + 0.1 * k, 0, 0], [0, 0.9, 0]])
        atoms.calc = SinglePointCalculator(atoms, energy=-14.0 - k)
        frames.append(atoms)
    path = tmp_path / "water.extxyz"
    ase.io.write(path, frames)
    every = list(iter_composition_energy_samples_from_files(path))
    assert every == [({"H": 2, "O": 1}, -14.0 - k) for k in range(3)]
    last = list(iter_composition_energy_samples_from_files(path, index="-1"))
    assert last == [({"H": 2, "O": 1}, -16.0)]


def test_the_record_hands_out_copies():
    result = ReferenceEnergies.from_regression([({"O": 2}, -865.0)])
    result.atomic_energies["O"] = 0.0
    result.metadata["singular_values"].append(99.0)
    assert result.atomic_energies == {"O": -432.5}
    assert result.metadata["singular_values"] == [2.0]
    direct = ReferenceEnergies({"Ti": E_TI}, "manual", {"source": ["paper"]})
    assert (direct.atomic_energies, direct.method, direct.metadata) == (
        {"Ti": E_TI},
        "manual",
        {"source": ["paper"]},
    )
    with pytest.raises(AttributeError):
        direct.method = "other"


class _Sized:
    """A sized container that can also be iterated."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


GOOD = [({"Ti": 1, "O": 2}, -2469.6), ({"O": 2}, -865.0)]


def _regression(samples=GOOD, **options):
    return lambda: ReferenceEnergies.from_regression(samples, **options)


def _compounds(compounds, samples=GOOD, **options):
    return lambda: ReferenceEnergies.from_reference_compounds(
        samples, reference_compounds=compounds, **options
    )


# (spec §2 condition, trigger, exception, message fragment). ``None``: a check beyond §2.
INVALID_INPUTS = [
    (109, _regression([({"O": 2}, "low")]), ValueError, r"sample 0: energy: 'low' is not a n"),
    (109, _regression([({"O": 2}, None)]), ValueError, "energy: None is not a number"),
    (109, _regression([({"O": 2}, math.nan)]), ValueError, "energy: nan is not finite"),
    (109, _regression([*GOOD, ({"O": 1}, -math.inf)]), ValueError, "sample 2: energy: -inf"),
    (110, _regression([(["O", "O"], -865.0)]), TypeError, "composition must be a mapping"),
    (111, _regression([({"O": 1.5}, -1.0)]), ValueError, "atom count 1.5 is not an integer"),
    (111, _regression([({"O": True}, -1.0)]), ValueError, "atom count True is not an integer"),
    (111, _regression([({"O": -1}, -1.0)]), ValueError, "atom count -1 is negative"),
    (112, _regression([({"O": 0}, -1.0)]), ValueError, "has no atoms"),
    (113, _regression([({"O": 2}, -865.0, 1)]), TypeError, r"sample 0: expected a \(comp"),
    (113, _regression([{"O": 2}]), TypeError, r"expected a \(composition, energy\) pair"),
    (113, _regression(42), TypeError, "samples must be an iterable"),
    (114, _compounds(["TiO2x"]), ValueError, "invalid formula 'TiO2x'"),
    (114, _compounds(["Ti(O2)"]), ValueError, "invalid formula"),
    (114, _compounds(["Xy2"]), ValueError, "'Xy' is not an element"),
    (114, _compounds(["Ti0O2"]), ValueError, "zero count for Ti"),
    (114, _compounds([""]), ValueError, "invalid formula ''"),
    (114, _compounds([42]), TypeError, r"reference_compounds\[0\] must be a formula"),
    (114, _compounds("TiO2"), TypeError, "must be a list of formulas"),
    (115, _regression([]), ValueError, "no samples given"),
    (115, _compounds(["O2"], samples=iter(())), ValueError, "no samples given"),
    (116, _regression([({"Ti": 1, "O": 2}, -2469.6)]), ValueError, "provide fixed_atomic_en"),
    (117, _compounds([]), ValueError, "reference_compounds is empty"),
    (117, _compounds(["TiO2", {"Ti": 2, "O": 4}]), ValueError, "'TiO2' and 'Ti2O4' have the sa"),
    (117, _compounds(["TiO2", "TiO"]), ValueError, r"reference compounds \['TiO'\]"),
    (118, _regression(fixed_atomic_energies={"H": -13.6}), ValueError, r"species \['H'\] that"),
    (118, _regression(fixed_atomic_energies={"O": math.nan}), ValueError, r"\['O'\]: nan is no"),
    (118, _regression(fixed_atomic_energies={"Q": 1.0}), ValueError, "'Q' is not a chemical"),
    (118, _compounds(["O2"], fixed_atomic_energies={"H": 1.0}), ValueError, r"species \['H'\]"),
    (119, _regression(subset_size=1, subset_fraction=0.5), ValueError, "not both"),
    (119, _regression(subset_size=0), ValueError, "subset_size must be a positive integer"),
    (119, _regression(subset_size=1.0), ValueError, "subset_size must be a positive integer"),
    (119, _regression(subset_size=3), ValueError, "subset_size 3 exceeds the 2 samples"),
    (119, _regression(subset_fraction=0.0), ValueError, r"subset_fraction must lie in \(0, 1\]"),
    (119, _regression(subset_fraction=1.5), ValueError, r"subset_fraction must lie in \(0, 1\]"),
    (119, _regression(iter(GOOD), subset_fraction=0.5), ValueError, "give subset_size instead"),
    (120, lambda: ReferenceEnergies({"O": math.inf}, "manual"), ValueError, "inf is not finite"),
    (120, lambda: ReferenceEnergies({"O": "x"}, "manual"), ValueError, "'x' is not a number"),
    (None, _regression(subset_size=1, random_seed=1.5), ValueError, "random_seed must be an int"),
    (None, lambda: ReferenceEnergies({"O": 1.0}, ""), ValueError, "method must be a non-empty"),
    (None, lambda: ReferenceEnergies({"O": 1.0}, "m", [1]), TypeError, "metadata must be a map"),
]


@pytest.mark.parametrize(
    ("trigger", "error", "message"),
    [case[1:] for case in INVALID_INPUTS],
    ids=[f"c{n or 0:03d}-{k}" for k, (n, *_) in enumerate(INVALID_INPUTS)],
)
def test_invalid_input_is_rejected(trigger, error, message):
    with pytest.raises(error, match=message):
        trigger()


def test_subset_fraction_of_a_sized_collection_is_allowed():
    result = ReferenceEnergies.from_regression(
        _Sized(_noisy_tio(8)), subset_fraction=0.5, random_seed=0
    )
    assert result.metadata["n_samples_used"] == 4


def test_file_errors_name_the_file(tmp_path, tio2_files):
    unlabelled = tmp_path / "nolabel.xsf"
    af.write_xsf(unlabelled, af.Structure([[0.0, 0.0, 0.0]], ["O"]))
    with pytest.raises(ValueError, match=r"nolabel\.xsf.*has no total energy"):
        list(iter_composition_energy_samples_from_files([tio2_files[0], unlabelled]))
    with pytest.raises(ValueError, match="XSF files are read by aenet_fn's reader"):
        list(iter_composition_energy_samples_from_files(tio2_files[0], index=":"))
    with pytest.raises(FileNotFoundError, match=r"missing\.xsf"):
        list(iter_composition_energy_samples_from_files(tmp_path / "missing.xsf"))
