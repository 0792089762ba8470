"""Normalisation constants against direct computations (spec §4.2, §4.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aenet_fn.core.normalization import fit_normalization, referenced_energy_per_atom

E_ATOM = torch.tensor([-3.0, -1.5], dtype=torch.float64)


def _data(seed, n_structures=6):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 5, (n_structures, 2), generator=generator)
    energies = torch.randn(n_structures, generator=generator, dtype=torch.float64) * 3 - 20
    features = torch.randn(int(counts.sum()), 5, generator=generator, dtype=torch.float64) * 2 + 1
    return features, energies, counts


@given(seed=st.integers(0, 10**6))
def test_fitted_constants_equal_the_formulas(seed):
    features, energies, counts = _data(seed)
    norm = fit_normalization(features, energies, counts, E_ATOM)
    x = features.numpy()
    mean = x.mean(axis=0)
    std = np.sqrt(np.maximum((x**2).mean(axis=0) - mean**2, 0) + 1e-12)
    np.testing.assert_allclose(norm.feature_mean[1].numpy(), mean, rtol=1e-13)
    np.testing.assert_allclose(norm.feature_std[1].numpy(), std, rtol=1e-12)
    np.testing.assert_array_equal(norm.feature_min[0].numpy(), x.min(axis=0))
    assert norm.feature_mean.shape == (2, 5)
    torch.testing.assert_close(norm.feature_std[0], norm.feature_std[1], rtol=0, atol=0)
    per_atom = [
        (float(e) - float(c[0]) * -3.0 - float(c[1]) * -1.5) / float(c.sum())
        for e, c in zip(energies, counts)
    ]
    low, high = min(per_atom), max(per_atom)
    assert float(norm.energy_shift) == pytest.approx((high + low) / 2, rel=1e-14)
    assert float(norm.energy_scaling) == pytest.approx(2 / (high - low), rel=1e-12)
    np.testing.assert_allclose(
        referenced_energy_per_atom(energies, counts, E_ATOM).numpy(), per_atom, rtol=1e-14
    )


def test_normalised_features_have_zero_mean_and_unit_variance():
    features, energies, counts = _data(1, 30)
    norm = fit_normalization(features, energies, counts, E_ATOM)
    z = norm.normalize_features(features, torch.zeros(len(features), dtype=torch.long))
    torch.testing.assert_close(
        z.mean(dim=0), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        z.std(dim=0, unbiased=False), torch.ones(5, dtype=torch.float64), atol=1e-9, rtol=0
    )


def test_constant_feature_does_not_divide_by_zero():
    features, energies, counts = _data(2)
    features[:, 2] = 4.0
    norm = fit_normalization(features, energies, counts, E_ATOM)
    assert bool(
        torch.isfinite(norm.normalize_features(features, counts.new_zeros(len(features)))).all()
    )


def test_single_structure_gives_unit_scaling_and_zero_shift():
    features, energies, counts = _data(3, 1)
    norm = fit_normalization(features, energies, counts, E_ATOM)
    assert (float(norm.energy_scaling), float(norm.energy_shift)) == (1.0, 0.0)


def test_switches_turn_normalisation_off():
    features, energies, counts = _data(4)
    norm = fit_normalization(
        features, energies, counts, E_ATOM, normalize_features=False, normalize_energy=False
    )
    assert bool((norm.feature_mean == 0).all() and (norm.feature_std == 1).all())
    assert (float(norm.energy_scaling), float(norm.energy_shift)) == (1.0, 0.0)


def test_energy_override_needs_both_values():
    features, energies, counts = _data(5)
    fitted = fit_normalization(features, energies, counts, E_ATOM)
    only_shift = fit_normalization(features, energies, counts, E_ATOM, energy_shift=1.0)
    assert float(only_shift.energy_shift) == float(fitted.energy_shift)
    both = fit_normalization(
        features, energies, counts, E_ATOM, energy_shift=1.0, energy_scaling=0.5
    )
    assert (float(both.energy_shift), float(both.energy_scaling)) == (1.0, 0.5)


def test_feature_stats_override_is_honoured_and_validated():
    features, energies, counts = _data(6)
    stats = {"mean": [0.5] * 5, "std": [2.0] * 5}
    norm = fit_normalization(features, energies, counts, E_ATOM, feature_stats=stats)
    assert (
        norm.feature_mean.tolist() == [[0.5] * 5] * 2
        and norm.feature_std.tolist() == [[2.0] * 5] * 2
    )
    with pytest.raises(ValueError, match="must give 'mean' and 'std'"):
        fit_normalization(
            features, energies, counts, E_ATOM, feature_stats={"mean": [0] * 5, "cov": [1] * 5}
        )
    with pytest.raises(ValueError, match="must be 5 finite numbers"):
        fit_normalization(
            features, energies, counts, E_ATOM, feature_stats={"mean": [0] * 4, "std": [1] * 4}
        )
    with pytest.raises(ValueError, match="must be positive"):
        fit_normalization(
            features, energies, counts, E_ATOM, feature_stats={"mean": [0] * 5, "std": [0] * 5}
        )


def test_bad_training_data_is_rejected():
    features, energies, counts = _data(7)
    with pytest.raises(ValueError, match="need features"):
        fit_normalization(features[:0], energies, counts, E_ATOM)
    energies[1] = float("nan")
    with pytest.raises(ValueError, match="must be finite"):
        fit_normalization(features, energies, counts, E_ATOM)
