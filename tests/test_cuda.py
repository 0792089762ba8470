"""On a CUDA device, the steps give the CPU's numbers and never wait for the device.

Marked ``cuda`` and skipped without a CUDA device (CI has none); run them where a GPU is lent:
``python -m pytest -q -m cuda``. Without a GPU, ``tests/test_device_placement.py`` checks the
same steps on PyTorch's shape-only meta device.
"""

from __future__ import annotations

import pytest
import torch

import aenet_fn as af
from aenet_fn.core.potential import energy_forces_stress
from aenet_fn.driver.committee import committee_fit, init_committee
from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.testing import forbid_host_sync

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PARAMS = af.ChebyshevParams(["Ti", "O"], 6, 5.0, 3, 3.5, min_cutoff=0.5)
ARCH = {"Ti": [(5, "tanh")], "O": [(5, "tanh")]}
E_ATOM = {"Ti": -1604.604515075, "O": -432.503149303}
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def data():
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:10])
    train = af.featurize_structures(PARAMS, structures, with_derivatives=True)
    model = af.init_model(PARAMS, ARCH, train, seed=0, atomic_energies=E_ATOM)
    return structures, train, model


def test_an_evaluation_on_cuda_equals_the_cpu(data):
    structures, _, model = data
    batch = af.collate(structures[:3], species=PARAMS.species)
    graph = af.build_graph(PARAMS, batch)
    expected = energy_forces_stress(model, batch, graph, compute_stress=True)
    on_cuda = af.to((model, batch, graph), device=CUDA)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with forbid_host_sync(expected_device=CUDA):
            result = energy_forces_stress(*on_cuda, compute_stress=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name in ("energy", "forces", "stress"):
        torch.testing.assert_close(
            getattr(result, name).cpu(), getattr(expected, name), rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize("force_weight", [0.0, 0.1])
def test_a_training_step_on_cuda_equals_the_cpu(data, force_weight):
    _, train, model = data
    config = af.TrainConfig(batch_size=4, force_weight=force_weight)
    state = af.init_train_state(model, train, config)
    supervised = torch.ones(train.n_structures, dtype=torch.bool) if force_weight else None
    batch = af.take_structures(train, torch.tensor([0, 3, 7, 2]), supervised)
    expected, _ = af.train_step(state, batch, config)
    on_cuda = af.to((state, batch), device=CUDA)
    with forbid_host_sync(expected_device=CUDA):
        result, _ = af.train_step(*on_cuda, config)
    torch.testing.assert_close(
        result.model.network.values.cpu(), expected.model.network.values, rtol=1e-10, atol=1e-12
    )


def test_a_committee_trains_on_cuda_as_on_the_cpu(data):
    _, train, _ = data
    config = af.TrainConfig(epochs=2, batch_size=4, force_weight=0.1)
    members = init_committee(PARAMS, ARCH, train, config, [1, 2], atomic_energies=E_ATOM)
    expected = committee_fit(members, train, None, config)
    result = committee_fit(af.to(members, device=CUDA), af.to(train, device=CUDA), None, config)
    for on_cuda, on_cpu in zip(result, expected):
        torch.testing.assert_close(
            on_cuda.model.network.values.cpu(), on_cpu.model.network.values, rtol=1e-9, atol=1e-11
        )


def test_the_facade_trains_on_cuda_as_on_the_cpu(data):
    """``TorchTrainingConfig(device="cuda")``: the splits move there once, the ``torch.func``
    route trains, and the potential comes back to its descriptor's device (the CPU)."""
    from aenet_fn.torch_featurize import ChebyshevDescriptor
    from aenet_fn.torch_training import TorchANNPotential, TorchTrainingConfig

    structures, _, _ = data
    descriptor = ChebyshevDescriptor.from_params(PARAMS)
    weights = {}
    for device in ("cpu", "cuda"):
        potential = TorchANNPotential(ARCH, descriptor)
        config = TorchTrainingConfig(
            iterations=2,
            device=device,
            force_weight=0.1,
            atomic_energies=E_ATOM,
            testpercent=20,
            checkpoint_dir=None,
            show_progress=False,
        )
        potential.train(structures=structures, config=config)
        weights[device] = potential.model.network.values
    assert weights["cuda"].device.type == "cpu"
    torch.testing.assert_close(weights["cuda"], weights["cpu"], rtol=1e-9, atol=1e-11)
