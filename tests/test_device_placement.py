"""Device placement of the training side: every tensor of a training step, an epoch or an
evaluation is made on the device of its inputs. Checked on the CPU with the dispatch-mode checker
(:func:`aenet_fn.testing.devices.count_host_syncs` with ``expected_device="cpu"`` reports each
constructor called without ``device=``, the line that would put a CPU tensor into a GPU step),
and on the ``meta`` device, where a hard-coded CPU device mixes with the inputs' device.

Batches are laid out on the host: an epoch's order and force subset are drawn from the run's
CPU ``torch.Generator`` and stay there, a set carries its layout on the host
(:class:`~aenet_fn.core.featurized.HostLayout`), and a batch cut from a set on another device only
gathers from it (checked with ``host_work=True``). Steps and evaluations read nothing back;
graph building still does (see ``python -m benchmarks.host_syncs``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import torch
from torch.utils._pytree import tree_leaves, tree_map

import aenet_fn as af
from aenet_fn.core.minibatch import stack_batches
from aenet_fn.core.network import atomic_outputs, init_network
from aenet_fn.core.optim import AdamConfig, SGDConfig, adam, sgd
from aenet_fn.driver.committee import committee_epoch, committee_fit, committee_step, init_committee
from aenet_fn.driver.seam import Speedups, assembled_jacobian
from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.speedups.force_jacobian import set_jacobian
from aenet_fn.speedups.fused_optim import update_eagerly
from aenet_fn.testing.devices import (
    DEVICE,
    HostSyncError,
    Violation,
    count_host_syncs,
    forbid_host_sync,
)

PARAMS = af.ChebyshevParams(["Ti", "O"], 6, 5.0, 3, 3.5, min_cutoff=0.5)
ARCH = {"Ti": [(5, "tanh")], "O": [(5, "tanh")]}
E_ATOM = {"Ti": -1604.604515075, "O": -432.503149303}
BATCH = 4


def device_offences(
    function: Callable[..., Any], *args: Any, expected_device: str = "cpu"
) -> list[Violation]:
    """The offences of kind "device" of one call of ``function(*args)`` (its first call: tensors
    made once, for caches, must be made on the right device too)."""
    _, offences = count_host_syncs(function, *args, expected_device=expected_device)
    return [offence for offence in offences if offence.kind == DEVICE]


def assert_on_device(function: Callable[..., Any], *args: Any, expected_device: str = "cpu"):
    offences = device_offences(function, *args, expected_device=expected_device)
    listed = "\n".join(f"  {v.where}: {v.code}  [{v.op}: {v.reason}]" for v in offences)
    assert not offences, f"{len(offences)} tensors off the step's device:\n{listed}"


@attrs.frozen
class Setup:
    train: af.FeaturizedSet
    test: af.FeaturizedSet
    model: Any
    jacobian: Any
    forces: af.TrainConfig
    energies: af.TrainConfig
    resampled: af.TrainConfig


@pytest.fixture(scope="module")
def setup() -> Setup:
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:14])
    train = af.featurize_structures(PARAMS, structures[:10], with_derivatives=True)
    test = af.featurize_structures(PARAMS, structures[10:], with_derivatives=True)
    model = af.init_model(PARAMS, ARCH, train, seed=0, atomic_energies=E_ATOM)
    forces = af.TrainConfig(epochs=1, batch_size=BATCH, force_weight=0.1)
    # error-weighted draws and a force subset re-drawn every epoch (force_subset's own draw)
    resampled = attrs.evolve(
        forces,
        sampling_policy="error_weighted",
        force_fraction=0.5,
        force_resample_num_epochs=1,
        force_scale_unbiased=True,
        optimizer=SGDConfig(lr=1e-3, momentum=0.9),
        use_scheduler=True,
    )
    return Setup(
        train=train,
        test=test,
        model=model,
        jacobian=assembled_jacobian(model, train, forces),
        forces=forces,
        energies=af.TrainConfig(epochs=3, batch_size=BATCH, force_weight=0.0),
        resampled=resampled,
    )


def _selection() -> torch.Tensor:
    return torch.tensor([0, 5, 2, 5])


def _everything(setup: Setup) -> torch.Tensor:
    return torch.ones(setup.train.n_structures, dtype=torch.bool)


@pytest.mark.parametrize("kind", ["energies", "entries", "assembled"])
def test_take_structures(setup, kind):
    force_selected = None if kind == "energies" else _everything(setup)
    jacobian = setup.jacobian if kind == "assembled" else None
    assert_on_device(af.take_structures, setup.train, _selection(), force_selected, jacobian)


@pytest.mark.parametrize("kind", ["energy only", "forces", "forces, assembled"])
def test_train_step(setup, kind):
    config = setup.energies if kind == "energy only" else setup.forces
    force_selected = None if kind == "energy only" else _everything(setup)
    jacobian = setup.jacobian if kind == "forces, assembled" else None
    state = af.init_train_state(setup.model, setup.train, config)
    batch = af.take_structures(setup.train, _selection(), force_selected, jacobian)
    assert_on_device(af.train_step, state, batch, config)


@pytest.mark.parametrize("with_forces", [False, True], ids=["energies", "forces"])
def test_evaluate(setup, with_forces):
    assert_on_device(af.evaluate, setup.model, setup.test, with_forces, 2)


@pytest.mark.parametrize("kind", ["energy only", "energy weighted", "forces", "resampled"])
def test_run_epoch(setup, kind):
    """Energy-only epochs take the energy route (their plans laid out through NumPy on the
    host, then moved); force epochs go through assembled mini-batches."""
    config = {
        "energy only": setup.energies,
        "energy weighted": attrs.evolve(setup.energies, sampling_policy="energy_weighted"),
        "forces": setup.forces,
        "resampled": setup.resampled,
    }[kind]
    state = af.init_train_state(setup.model, setup.train, config)
    assert_on_device(af.run_epoch, state, setup.train, config)


def test_init_train_state(setup):
    """The sampler's scores and force subset are made on the training data's device."""
    assert_on_device(af.init_train_state, setup.model, setup.train, setup.resampled)


@pytest.mark.parametrize("kind", ["energy only", "forces"])
def test_fit_with_a_test_split(setup, kind):
    """Several epochs (energy-only ones drawn ahead into one plan) and the test metrics."""
    config = setup.energies if kind == "energy only" else setup.forces
    state = af.init_train_state(setup.model, setup.train, config)
    assert_on_device(af.fit, state, setup.train, setup.test, config)


@pytest.mark.parametrize("storage", [None, 0.0, math.inf], ids=["entries", "pairs", "dense"])
def test_stack_batches(setup, storage):
    jacobian = None if storage is None else set_jacobian(PARAMS, setup.train, storage)
    everything = _everything(setup)
    batches = [
        af.take_structures(setup.train, torch.tensor([0, 5, 9]), everything, jacobian),
        af.take_structures(setup.train, torch.tensor([3, 3, 1]), None, jacobian),
    ]
    assert_on_device(stack_batches, batches)


def _members(setup: Setup, config: af.TrainConfig, shared: bool = False):
    return init_committee(
        PARAMS, ARCH, setup.train, config, [1, 2], shared_batches=shared, atomic_energies=E_ATOM
    )


def _committee_step_arguments(setup: Setup, kind: str) -> tuple[Any, ...]:
    """The first arguments of :func:`committee_step` for two members (template model, stacked
    values, optimiser state, learning rates) and a batch shared by them (``kind`` "shared") or
    stacked, with derivative entries ("stacked entries") or assembled Jacobians."""
    members = _members(setup, setup.forces)
    values = torch.stack([m.model.network.values for m in members])
    opt_state = tree_map(lambda *leaves: torch.stack(leaves), *[m.opt_state for m in members])
    lrs = torch.tensor([m.lr for m in members], dtype=values.dtype)
    everything = _everything(setup)
    jacobian = None if kind == "stacked entries" else setup.jacobian
    if kind == "shared":
        batch = af.take_structures(setup.train, _selection(), everything, jacobian)
    else:
        batch = stack_batches(
            [
                af.take_structures(setup.train, torch.tensor([0, 5, 9]), everything, jacobian),
                af.take_structures(setup.train, torch.tensor([3, 3, 1]), None, jacobian),
            ]
        )
    return members[0].model, values, opt_state, lrs, batch


COMMITTEE_BATCHES = ["shared", "stacked entries", "stacked assembled"]


@pytest.mark.parametrize("kind", COMMITTEE_BATCHES)
def test_committee_step(setup, kind):
    arguments = _committee_step_arguments(setup, kind)
    assert_on_device(committee_step, *arguments, setup.forces, kind != "shared")


@pytest.mark.parametrize("kind", ["energy only", "forces, stacked", "forces, shared"])
def test_committee_epoch(setup, kind):
    config = setup.energies if kind == "energy only" else setup.forces
    members = _members(setup, config, shared=kind == "forces, shared")
    speedups = Speedups(jacobian=setup.jacobian) if kind == "forces, shared" else None
    assert_on_device(committee_epoch, members, setup.train, config, None, speedups)


def test_committee_fit_with_a_test_split(setup):
    """Energy-only committee epochs drawn ahead, and the members' test metrics."""
    members = _members(setup, setup.energies)
    assert_on_device(committee_fit, members, setup.train, setup.test, setup.energies)


def _meta(tree: Any) -> Any:
    return tree_map(lambda leaf: leaf.to("meta") if isinstance(leaf, torch.Tensor) else leaf, tree)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_optimiser_on_the_meta_device(name):
    """On the meta device a tensor made on a hard-coded CPU device mixes with the inputs (the
    CPU check trusts an explicit ``device="cpu"``): the optimisers' pure init and update
    (``torch.func``-able; the eager forms read the step count) make nothing off it."""
    optimizer = adam(AdamConfig(lr=1e-3)) if name == "adam" else sgd(SGDConfig(momentum=0.9))
    values = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64, device="meta")
    gradient = torch.ones(12, dtype=torch.float64, device="meta")

    def two_steps() -> Any:
        state = optimizer.init(values)
        new_values, state = optimizer.update(gradient, state, values, 1e-3)
        return optimizer.update(gradient, state, new_values, 1e-3)

    assert_on_device(two_steps, expected_device="meta")
    new_values, _ = two_steps()
    assert new_values.device.type == "meta"


def test_network_on_the_meta_device(setup):
    """The atoms' network outputs with species blocks (static slices: no value read) run on
    the meta device without a tensor off it."""
    network = init_network(
        ARCH,
        PARAMS.species,
        PARAMS.n_features,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    batch = af.take_structures(setup.train, _selection())
    arguments = _meta((network, batch.features, batch.species_index))
    assert_on_device(atomic_outputs, *arguments, batch.species_blocks, expected_device="meta")


def test_a_constructor_without_a_device_is_reported():
    """The check this file relies on: a constructor without ``device=`` offends on the CPU,
    and a hard-coded CPU device offends on the meta device; the line is named."""

    def placed(x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[0], dtype=x.dtype, device=x.device)

    def unplaced(x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[0], dtype=x.dtype)

    def hard_coded(x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[0], dtype=x.dtype, device="cpu")

    x = torch.zeros(5, dtype=torch.float64)
    assert device_offences(placed, x) == []
    assert device_offences(hard_coded, x) == []  # trusted on the CPU...
    (offence,) = device_offences(unplaced, x)
    assert (
        offence.op == "torch.arange" and "torch.arange(x.shape[0], dtype=x.dtype)" in offence.code
    )
    on_meta = x.to("meta")
    assert device_offences(placed, on_meta, expected_device="meta") == []
    with pytest.raises(HostSyncError, match="tensor on cpu; the step's device is meta"):
        with forbid_host_sync(expected_device="meta"):  # ...not on meta (torch fails there)
            hard_coded(on_meta)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_the_eager_update_off_the_cpu_reads_nothing_on_the_host(name):
    """``update_eagerly`` takes its faster form (which reads the step count) only on the CPU;
    elsewhere the pure update runs, with no host read and nothing made off the device."""
    optimizer = adam(AdamConfig(lr=1e-3)) if name == "adam" else sgd(SGDConfig(momentum=0.9))
    values = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64)
    gradient = torch.ones(12, dtype=torch.float64)
    state = optimizer.init(values)
    on_cpu, _ = update_eagerly(optimizer, gradient, state, values, 1e-3)
    pure, _ = optimizer.update(gradient, state, values, 1e-3)
    torch.testing.assert_close(on_cpu, pure, rtol=1e-15, atol=1e-15)
    meta = _meta((gradient, state, values))
    with forbid_host_sync(expected_device="meta"):
        new_values, _ = update_eagerly(optimizer, *meta, 1e-3)
    assert new_values.device.type == "meta"


# ------------------------------------------------ a step off the CPU reads nothing on the host


@pytest.mark.parametrize("kind", ["energies", "entries", "assembled"])
def test_a_training_step_off_the_cpu_never_waits_for_the_device(setup, kind):
    """Given its batch, a single model's training step on another device (here the shape-only
    meta device, where a value read or a data-dependent shape fails) reads nothing back to the
    host, makes no data-dependent shape and nothing off the device: the CPU-only speed-ups
    (the hand-derived energy gradient, the eager optimiser form, CSR sums) step aside."""
    config = setup.energies if kind == "energies" else setup.forces
    force_selected = None if kind == "energies" else _everything(setup)
    jacobian = setup.jacobian if kind == "assembled" else None
    batch = af.take_structures(setup.train, _selection(), force_selected, jacobian)
    state = af.init_train_state(setup.model, setup.train, config)
    on_meta = af.to((state, batch), device="meta")
    with forbid_host_sync(expected_device="meta"):
        new_state, found = af.train_step(*on_meta, config)
    assert new_state.model.network.values.device.type == "meta"
    assert found.energy.shape == (BATCH,)


@pytest.mark.parametrize("kind", ["energies", "entries"])
def test_a_batch_is_cut_from_a_set_off_the_cpu_without_reading_it(setup, kind):
    """Batches are laid out on the host from the set's layout: a set on another device (the
    meta device) is only gathered from, and the batch equals the CPU's in every shape, the
    species blocks and the host-side sizes."""
    force_selected = None if kind == "energies" else _everything(setup)
    expected = af.take_structures(setup.train, _selection(), force_selected)
    on_meta = af.to(setup.train, device="meta")
    selection = _selection()
    with forbid_host_sync(expected_device="meta", host_work=True):
        batch = af.take_structures(on_meta, selection, force_selected)
    assert batch.species_blocks == expected.species_blocks
    leaves = [(a, b) for a, b in zip(tree_leaves(batch), tree_leaves(expected), strict=True)]
    assert leaves and all(a.device.type == "meta" for a, _ in leaves if a is not None)
    assert all(a.shape == b.shape for a, b in leaves if a is not None)


@pytest.mark.parametrize("kind", COMMITTEE_BATCHES)
def test_a_committee_step_off_the_cpu_never_waits_for_the_device(setup, kind):
    arguments = _committee_step_arguments(setup, kind)
    on_meta = af.to(arguments, device="meta")
    with forbid_host_sync(expected_device="meta"):
        new_values, _, _ = committee_step(*on_meta, setup.forces, kind != "shared")
    assert new_values.shape == arguments[1].shape and new_values.device.type == "meta"


# ------------------------------------------------ set-up on the data's device


def test_featurize_structures_places_the_set_on_the_device():
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:3])
    data = af.featurize_structures(PARAMS, structures, with_derivatives=True, device="meta")
    assert data.device.type == "meta" and data.local.radial.device.type == "meta"
    assert data.n_atoms.device.type == "meta" and data.energies.dtype == torch.float64


@pytest.mark.parametrize("overrides", [{}, {"energy_shift": 0.1, "energy_scaling": 2.0}])
def test_init_model_makes_nothing_off_the_sets_device(setup, overrides):
    stats = {"feature_stats": {"mean": [0.0] * PARAMS.n_features, "std": [1.0] * PARAMS.n_features}}
    options = {**overrides, **(stats if overrides else {})}
    assert_on_device(
        lambda: af.init_model(PARAMS, ARCH, setup.train, seed=0, atomic_energies=E_ATOM, **options)
    )
