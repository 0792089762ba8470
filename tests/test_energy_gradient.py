"""The hand-derived energy-only gradient equals autodiff for every activation and dtype."""

from __future__ import annotations

import pytest
import torch

import aenet_fn as af
from aenet_fn.energy_gradient import energy_loss_gradient
from aenet_fn.network import ACTIVATIONS
from aenet_fn.train import batch_loss, func_gradient

REFERENCES = {"Ti": -1604.604515075, "O": -432.503149303}


@pytest.fixture(scope="module")
def tio2_structures(shared_data):
    return af.read_structures(sorted((shared_data / "tio2").glob("*.xsf"))[:20])


PARAMS = af.ChebyshevParams(["Ti", "O"], 6, 5.0, 3, 3.5, min_cutoff=0.5)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hand_gradient_equals_torch_func(tio2_structures, activation, dtype):
    arch = {
        "Ti": [(7, activation), (5, "tanh")],
        "O": [(6, activation), (4, activation), (3, "sigmoid")],
    }
    train = af.featurize_structures(PARAMS, tio2_structures, with_derivatives=False, dtype=dtype)
    model = af.init_model(PARAMS, arch, train, seed=2, atomic_energies=REFERENCES)
    batch = af.take_structures(train, torch.tensor([3, 0, 7, 7, 12, 19, 5]))
    values = model.network.values
    expected, (errors, _) = func_gradient(lambda v: batch_loss(model, v, batch, 0.3, False), values)
    gradient, (hand_errors, differences) = energy_loss_gradient(model, values, batch, 0.3)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(gradient, expected, rtol=0, atol=tolerance * scale)
    torch.testing.assert_close(hand_errors, errors, rtol=0, atol=0)
    assert gradient.dtype == dtype and not differences.any()


def test_force_batches_are_refused(tio2_structures):
    train = af.featurize_structures(PARAMS, tio2_structures[:3], with_derivatives=True)
    model = af.init_model(PARAMS, {"Ti": [(3, "tanh")], "O": [(3, "tanh")]}, train, seed=0)
    batch = af.take_structures(train, torch.arange(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="supervises forces"):
        energy_loss_gradient(model, model.network.values, batch, 0.1)
