"""Shared test helpers: the reference data folder and small structure generators."""

from __future__ import annotations

import math
import os
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

from aenet_fn import Structure, testing
from aenet_fn.core.potential import energy_and_forces_from_derivatives
from aenet_fn.testing.transforms import shift_images

REFERENCE_DATA = Path(__file__).resolve().parent / "data"  # provenance: data/README.md

# Hypothesis profiles (HYPOTHESIS_PROFILE picks one): "ci", the default under CI=true, runs a
# fixed set of examples (derandomized, no example database) so that a run never fails by
# chance; "dev", the default elsewhere, draws new examples on every run; "explore" draws
# thousands, for the tests a change touches before it is submitted:
#   HYPOTHESIS_PROFILE=explore .venv/bin/python -m pytest -q tests/test_testing.py
settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", settings.get_profile("dev"), derandomize=True, database=None)
settings.register_profile(
    "explore",
    settings.get_profile("dev"),
    max_examples=2000,
    suppress_health_check=[HealthCheck.too_slow],
)
_ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _ON_CI else "dev"))


def scaled_examples(count: int) -> int:
    """``count`` examples for the "dev" and "ci" profiles, proportionally more under
    "explore" (for tests that set their own, smaller number)."""
    return max(1, count * settings.default.max_examples // 25)


# The tests' tensors are small: one thread avoids thread start-up costs and, on a shared
# machine, contention between threads (results do not depend on the thread count).
torch.set_num_threads(1)


def random_cell(rng: np.random.Generator, low: float = 3.0, high: float = 7.0) -> np.ndarray:
    """A random, well-conditioned triclinic cell (rows are lattice vectors, Å)."""
    return np.diag(rng.uniform(low, high, 3)) + rng.uniform(-1.0, 1.0, (3, 3))


def random_structure(
    seed: int,
    n_atoms: int,
    species: tuple[str, ...] = ("Ti", "O"),
    periodic: bool = True,
    pbc: tuple[bool, bool, bool] | None = None,
    min_distance: float = 0.8,
    outside: float = 0.0,
) -> Structure:
    """:func:`aenet_fn.testing.random_structure` of ``seed``: a periodic cell (or, with
    ``pbc``, that periodicity) or, without ``periodic``, a molecule; atoms at least
    ``min_distance`` Å apart, images included. ``outside`` > 0 moves each atom by up to
    ``outside`` lattice vectors along each periodic axis (atoms outside the cell)."""
    periodicity = pbc if pbc is not None else ("bulk" if periodic else "molecule")
    structure = testing.random_structure(seed, n_atoms, species, periodicity, min_distance)
    if outside > 0:
        reach = math.ceil(outside)
        shifts = np.random.default_rng(seed).integers(-reach, reach + 1, (n_atoms, 3))
        structure = shift_images(structure, shifts)
    return attrs.evolve(structure, name=f"random-{seed}")


@pytest.fixture(scope="session")
def reference_data() -> Path:
    """The folder of the tests' reference files, ``tests/data`` (outputs of the ænet Fortran
    code; the TiO2 structures and potential are ``aenet_fn.examples.TIO2_STRUCTURES`` and
    ``TIO2_POTENTIAL``)."""
    return REFERENCE_DATA


def facade_config(**overrides):
    """A quick, quiet ``TorchTrainingConfig``: 2 epochs of Adam (batch 4), 30 % test split with
    fixed seeds, no checkpoints, no progress bar; ``overrides`` replace any option."""
    from aenet_fn.torch_training import Adam, TorchTrainingConfig

    options = {
        "iterations": 2,
        "method": Adam(mu=0.01, batchsize=4),
        "testpercent": 30,
        "split_seed": 1,
        "seed": 2,
        "checkpoint_dir": None,
        "show_progress": False,
    }
    options.update(overrides)
    return TorchTrainingConfig(**options)


def assert_same_featurized(a, b, **tolerance) -> None:
    """Field-by-field equality of two FeaturizedSets (``tolerance``: ``rtol``/``atol`` of
    ``torch.testing.assert_close``; NaN equals NaN)."""
    import attrs

    for field in attrs.fields(type(a)):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if field.name in ("local", "layout"):
            assert (x is None) == (y is None)
            if x is not None:
                for g in attrs.fields(type(x)):
                    torch.testing.assert_close(getattr(x, g.name), getattr(y, g.name), **tolerance)
        elif isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, equal_nan=True, **tolerance)
        else:
            assert x == y, field.name


def batch_energies_and_forces(model, batch, by_species_blocks: bool = False):
    """Energies and forces of a mini-batch from its features and derivative data."""
    return energy_and_forces_from_derivatives(
        model,
        batch.features,
        batch.species_index,
        batch.structure_index,
        batch.n_structures,
        batch.local,
        batch.species_blocks if by_species_blocks else None,
    )
