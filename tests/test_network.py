"""Per-species networks: initialisation, evaluation against a direct computation, vmap."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aenet_fn.core.network import (
    ACTIVATIONS,
    atomic_outputs,
    check_architecture,
    init_network,
    network_size,
    weight_mask,
)

ARCH = {"Ti": [(6, "tanh"), (4, "sigmoid")], "O": [(5, "mtanh")]}
SPECIES = ("Ti", "O")


def _init(seed=0, arch=ARCH, n_features=7):
    return init_network(arch, SPECIES, n_features, generator=torch.Generator().manual_seed(seed))


def test_initialisation_is_reproducible_and_seed_dependent():
    torch.testing.assert_close(_init(3).values, _init(3).values, rtol=0, atol=0)
    assert not torch.equal(_init(3).values, _init(4).values)


def test_initial_weights_lie_within_the_linear_default_bounds():
    network = _init(1)
    for layers in network.layers():
        for weight, bias in layers:
            bound = 1 / math.sqrt(weight.shape[0])
            assert float(weight.abs().max()) <= bound and float(bias.abs().max()) <= bound


def test_layout_and_size():
    network = _init()
    assert network.values.shape == (network_size(ARCH, SPECIES, 7),)
    shapes = [[tuple(w.shape) for w, _ in layers] for layers in network.layers()]
    assert shapes == [[(7, 6), (6, 4), (4, 1)], [(7, 5), (5, 1)]]
    assert network.architecture() == {"Ti": [(6, "tanh"), (4, "sigmoid")], "O": [(5, "mtanh")]}


def test_the_weight_mask_marks_every_weight_and_no_bias():
    network = _init()
    marked = attrs.evolve(network, values=weight_mask(network).to(torch.float64))
    for layers in marked.layers():
        for weight, bias in layers:
            assert bool(weight.eq(1).all()) and bool(bias.eq(0).all())


def _direct(network, x, species):
    """A per-atom loop with explicit formulas, independent of ``mlp``."""
    formulas = {
        "tanh": math.tanh,
        "sigmoid": lambda v: 1 / (1 + math.exp(-v)),
        "mtanh": lambda v: 1.7159 * math.tanh(0.666666666666667 * v),
    }
    out = []
    for row, p in zip(x.tolist(), species.tolist()):
        layers, acts = network.layers()[p], network.activations[p]
        h = row
        for k, (weight, bias) in enumerate(layers):
            h = [
                sum(wi * hi for wi, hi in zip(w_row, h)) + b
                for w_row, b in zip(weight.T.tolist(), bias.tolist())
            ]
            if k < len(acts):
                h = [formulas[acts[k]](v) for v in h]
        out.append(h[0])
    return torch.tensor(out, dtype=torch.float64)


@given(seed=st.integers(0, 1000), n_atoms=st.integers(1, 12))
def test_atomic_outputs_equal_a_direct_computation(seed, n_atoms):
    network = _init(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_atoms, 7, generator=generator, dtype=torch.float64)
    species = torch.randint(0, 2, (n_atoms,), generator=generator)
    torch.testing.assert_close(atomic_outputs(network, x, species), _direct(network, x, species))


def test_atoms_of_a_missing_species_are_fine():
    network = _init()
    x = torch.randn(3, 7, dtype=torch.float64)
    only_ti = atomic_outputs(network, x, torch.zeros(3, dtype=torch.long))
    assert only_ti.shape == (3,)


@pytest.mark.parametrize(
    ("name", "formula"),
    [
        ("linear", lambda x: x),
        ("tanh", math.tanh),
        ("sigmoid", lambda x: 1 / (1 + math.exp(-x))),
        ("mtanh", lambda x: 1.7159 * math.tanh(2 * x / 3)),
        ("twist", lambda x: 1.7159 * math.tanh(2 * x / 3) + 0.1 * x),
        ("relu", lambda x: max(x, 0.0)),
        ("silu", lambda x: x / (1 + math.exp(-x))),
    ],
)
def test_activation_formulas(name, formula):
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    expected = torch.tensor([formula(v) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(ACTIVATIONS[name](x), expected, rtol=1e-12, atol=1e-12)


def test_vmap_over_stacked_members_equals_each_member():
    members = [_init(s) for s in range(3)]
    stacked = torch.stack([m.values for m in members])
    x = torch.randn(9, 7, dtype=torch.float64)
    species = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1])

    def outputs(values):
        return atomic_outputs(attrs.evolve(members[0], values=values), x, species)

    together = torch.func.vmap(outputs)(stacked)
    for k, member in enumerate(members):
        torch.testing.assert_close(
            together[k], atomic_outputs(member, x, species), rtol=0, atol=1e-14
        )


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ({"Ti": [(5, "tanh")]}, r"no network for species \['O'\]"),
        ({"Ti": [], "O": [(5, "tanh")]}, "non-empty list"),
        ({"Ti": [(5, "tanh")], "O": [(5, "swish")]}, "unknown activation 'swish'"),
        ({"Ti": [(0, "tanh")], "O": [(5, "tanh")]}, "nodes must be an integer >= 1"),
        ({"Ti": [(5,)], "O": [(5, "tanh")]}, "is not \\(nodes, activation\\)"),
        ([("Ti", 5)], "must map species"),
    ],
)
def test_bad_architectures_are_rejected(arch, message):
    with pytest.raises(ValueError, match=message):
        check_architecture(arch, SPECIES)


def test_activation_names_are_case_insensitive_and_extra_species_ignored():
    checked = check_architecture(
        {"Ti": [(3, "TANH")], "O": [(2, "Linear")], "H": [(1, "tanh")]}, SPECIES
    )
    assert checked == {"Ti": ((3, "tanh"),), "O": ((2, "linear"),)}
