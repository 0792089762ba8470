"""Sampling formulas against direct computations (spec §10)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aenet_fn.core.sampling import (
    energy_filter_mask,
    energy_weights,
    epoch_order,
    error_scores_update,
    error_weights,
    force_filter_mask,
    force_resample_due,
    force_subset,
    force_subset_size,
    sampler_init,
    split_indices,
    weighted_draw,
)

energies = st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=30)


@given(values=energies)
def test_energy_weights_follow_the_formula(values):
    weights = energy_weights(torch.tensor(values, dtype=torch.float64)).tolist()
    low, top = min(values), max(values) - min(values)
    expected = [1.0 if top == 0 else 1 / (1 + (v - low) / top) for v in values]
    assert weights == pytest.approx(expected, rel=1e-12)
    assert all(0.5 - 1e-12 <= w <= 1.0 for w in weights)


def test_energy_weights_reject_non_finite_input():
    with pytest.raises(ValueError, match="must be finite"):
        energy_weights(torch.tensor([1.0, float("nan")]))


@given(
    scores=st.lists(st.floats(0, 5), min_size=1, max_size=12),
    draws=st.lists(st.tuples(st.integers(0, 11), st.floats(0, 3)), max_size=30),
)
def test_error_score_update_is_the_mean_over_draws(scores, draws):
    n = len(scores)
    draws = [(i % n, e) for i, e in draws]
    drawn = torch.tensor([i for i, _ in draws], dtype=torch.long)
    errors = torch.tensor([e for _, e in draws], dtype=torch.float64)
    updated = error_scores_update(torch.tensor(scores, dtype=torch.float64), drawn, errors).tolist()
    per_structure: dict[int, list[float]] = {}
    for i, e in draws:
        per_structure.setdefault(i, []).append(e)
    expected = [
        sum(per_structure[i]) / len(per_structure[i]) if i in per_structure else s
        for i, s in enumerate(scores)
    ]
    assert updated == pytest.approx(expected, rel=1e-12)


@given(
    scores=st.lists(
        st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=20
    )
)
def test_error_weights_have_unit_mean_and_drop_bad_scores(scores):
    weights = error_weights(torch.tensor(scores, dtype=torch.float64))
    cleaned = [s if s == s and abs(s) != float("inf") and s >= 0 else 0.0 for s in scores]
    if not any(c > 0 for c in cleaned):
        assert weights.tolist() == [1.0] * len(scores)
        return
    clamped = [max(c, 1e-12) for c in cleaned]
    mean = sum(clamped) / len(clamped)
    assert weights.tolist() == pytest.approx([c / mean for c in clamped], rel=1e-9)


@given(n=st.integers(0, 300), fraction=st.floats(0, 0.99), seed=st.integers(0, 10**6))
def test_split_is_a_partition_of_the_right_size(n, fraction, seed):
    train, test = split_indices(n, fraction, generator=torch.Generator().manual_seed(seed))
    assert len(test) == int(n * fraction)
    assert sorted(train.tolist() + test.tolist()) == list(range(n))
    assert train.tolist() == sorted(train.tolist()) and test.tolist() == sorted(test.tolist())


def test_split_depends_on_its_seed_only():
    a = split_indices(100, 0.2, generator=torch.Generator().manual_seed(7))
    b = split_indices(100, 0.2, generator=torch.Generator().manual_seed(7))
    c = split_indices(100, 0.2, generator=torch.Generator().manual_seed(8))
    torch.manual_seed(123)  # the global generator plays no part
    d = split_indices(100, 0.2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[1], b[1]) and torch.equal(a[1], d[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize(("n", "fraction"), [(-1, 0.1), (10, -0.1), (10, 1.0)])
def test_split_rejects_bad_arguments(n, fraction):
    with pytest.raises(ValueError):
        split_indices(n, fraction, generator=torch.Generator())


def test_weighted_draw_frequencies_follow_the_weights():
    weights = torch.tensor([1.0, 2.0, 0.0, 5.0], dtype=torch.float64)
    draws = weighted_draw(weights, 40000, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=4).double() / 40000
    assert frequencies.tolist() == pytest.approx((weights / weights.sum()).tolist(), abs=0.01)


@pytest.mark.parametrize(
    ("candidates", "total", "fraction", "minimum", "expected"),
    [
        (10, 20, 1.0, 1, 10),
        (10, 20, 0.25, 1, 5),
        (10, 20, 0.01, 3, 3),
        (10, 20, 0.01, None, 0),
        (2, 20, 0.5, 1, 2),
    ],
)
def test_force_subset_size_rules(candidates, total, fraction, minimum, expected):
    assert force_subset_size(candidates, total, fraction, minimum) == expected


def test_force_subset_draws_without_replacement_and_is_reproducible():
    candidates = torch.arange(0, 40, 2)
    a = force_subset(candidates, 7, generator=torch.Generator().manual_seed(1))
    b = force_subset(candidates, 7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and len(set(a.tolist())) == 7
    assert set(a.tolist()) <= set(candidates.tolist())
    assert force_subset(candidates, 99, generator=torch.Generator()).tolist() == candidates.tolist()


def test_force_resample_schedule():
    due = [force_resample_due(e, 0, "random", 3) for e in range(7)]
    assert due == [True, False, False, True, False, False, True]
    assert not any(force_resample_due(e, 0, "random", 0) for e in range(5))
    assert not any(force_resample_due(e, 0, "fixed", 1) for e in range(5))


def test_filters():
    per_atom = torch.tensor([-1.0, 0.5, 2.0])
    assert energy_filter_mask(per_atom, 0.5).tolist() == [True, True, False]
    assert energy_filter_mask(per_atom, None).tolist() == [True] * 3
    forces = torch.tensor([1.0, float("nan"), 7.0])
    assert force_filter_mask(forces, 5.0).tolist() == [True, True, False]


def test_epoch_orders_per_policy():
    per_atom = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    uniform = epoch_order(
        sampler_init("uniform", 4), per_atom, generator=torch.Generator().manual_seed(0)
    )
    assert sorted(uniform.tolist()) == [0, 1, 2, 3]
    for policy in ("energy_weighted", "error_weighted"):
        order = epoch_order(
            sampler_init(policy, 4), per_atom, generator=torch.Generator().manual_seed(0)
        )
        assert order.shape == (4,) and int(order.max()) < 4
    with pytest.raises(ValueError, match="needs the energies per atom"):
        epoch_order(sampler_init("energy_weighted", 4), None, generator=torch.Generator())
    with pytest.raises(ValueError, match="is not one of"):
        sampler_init("sometimes", 4)
