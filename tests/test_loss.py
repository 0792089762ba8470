"""Losses and exactly accumulated metrics against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aenet_fn.core.loss import (
    accumulate_errors,
    combined_loss,
    energy_rmse,
    error_sums_init,
    force_rmse,
    force_unbiased_factor,
    masked_force_differences,
    metrics_from_sums,
)

floats = st.floats(-50, 50, allow_nan=False)


@given(
    predicted=st.lists(floats, min_size=1, max_size=8),
    data=st.data(),
)
def test_energy_rmse_is_per_atom(predicted, data):
    n = len(predicted)
    reference = data.draw(st.lists(floats, min_size=n, max_size=n))
    atoms = data.draw(st.lists(st.integers(1, 50), min_size=n, max_size=n))
    value = energy_rmse(
        torch.tensor(predicted, dtype=torch.float64),
        torch.tensor(reference, dtype=torch.float64),
        torch.tensor(atoms),
    )
    direct = math.sqrt(sum(((p - r) / a) ** 2 for p, r, a in zip(predicted, reference, atoms)) / n)
    assert float(value) == pytest.approx(direct, rel=1e-12, abs=1e-150)


def test_force_rmse_over_supervised_components():
    predicted = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    reference = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [float("nan")] * 3])
    supervised = torch.tensor([True, True, False])
    differences = masked_force_differences(predicted, reference, supervised)
    assert differences[2].tolist() == [0.0, 0.0, 0.0]
    assert float(force_rmse(differences, supervised)) == pytest.approx(math.sqrt(14 / 6))


def test_unbiased_factor():
    def factor(a, b):
        return float(force_unbiased_factor(torch.tensor(a), torch.tensor(b)))

    assert factor(2, 8) == pytest.approx(2.0)
    assert factor(8, 8) == 1.0
    assert factor(0, 8) == 1.0
    assert factor(0, 0) == 1.0


def test_combined_loss():
    e, f = torch.tensor(2.0), torch.tensor(10.0)
    yes, no = torch.tensor(True), torch.tensor(False)
    assert float(combined_loss(e, f, yes, 0.25)) == pytest.approx(0.75 * 2 + 0.25 * 10)
    assert float(combined_loss(e, f, no, 0.25)) == pytest.approx(1.5)


def test_rmse_gradient_is_finite_at_a_perfect_fit():
    predicted = torch.zeros(3, requires_grad=True)
    (gradient,) = torch.autograd.grad(
        energy_rmse(predicted, torch.zeros(3), torch.ones(3)), predicted
    )
    assert bool(torch.isfinite(gradient).all())


@given(
    errors=st.lists(floats, min_size=1, max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=5),
)
def test_accumulated_metrics_do_not_depend_on_batching(errors, cuts):
    all_errors = torch.tensor(errors, dtype=torch.float64)
    bounds = sorted({0, len(errors), *(min(c, len(errors)) for c in cuts)})
    sums = error_sums_init()
    for low, high in zip(bounds[:-1], bounds[1:]):
        chunk = all_errors[low:high]
        supervised = torch.ones(high - low, dtype=torch.bool)
        sums = accumulate_errors(sums, chunk, chunk[:, None].repeat(1, 3), supervised)
    metrics = metrics_from_sums(sums)
    rmse = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert metrics["rmse_energy"] == pytest.approx(rmse, rel=1e-12, abs=1e-300)
    assert metrics["mae_energy"] == pytest.approx(
        sum(abs(e) for e in errors) / len(errors), rel=1e-12
    )
    assert metrics["rmse_forces"] == pytest.approx(rmse, rel=1e-12, abs=1e-300)


def test_empty_sums_give_nan():
    metrics = metrics_from_sums(error_sums_init())
    assert all(math.isnan(v) for v in metrics.values())
