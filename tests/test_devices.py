"""aenet_fn.testing.devices: a clean training step passes; planted host reads, data-dependent
shapes and device slips raise, naming the op and the planted line; counting runs to the end."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from aenet_fn.testing.devices import (
    DEVICE,
    DYNAMIC_SHAPE,
    HOST_READ,
    HostSyncError,
    count_host_syncs,
    forbid_host_sync,
)


def make_params(device: str = "cpu") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = {"w1": (3, 6), "b1": (6,), "w2": (6, 1), "b2": (1,)}
    params = {
        k: torch.randn(s, generator=generator, dtype=torch.float64) for k, s in shapes.items()
    }
    return {k: v.to(device) for k, v in params.items()}


def make_data(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    return x.to(device), x.sum(1, keepdim=True).sin().to(device)


def clean(h: torch.Tensor) -> torch.Tensor:
    return h


def loss_of(params, x, y, plant=clean):
    hidden = plant(torch.tanh(x @ params["w1"] + params["b1"]))
    return ((hidden @ params["w2"] + params["b2"] - y) ** 2).mean()


def backward_step(params, x, y, plant=clean, lr=0.1):
    """Forward, ``loss.backward()``, SGD update: plain torch ops."""
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    loss = loss_of(leaves, x, y, plant)
    loss.backward()
    with torch.no_grad():
        return {k: v - lr * leaves[k].grad for k, v in params.items()}, loss.detach()


def func_step(params, x, y, plant=clean, lr=0.1):
    """The same step by ``torch.func.grad``."""
    grads, loss = torch.func.grad_and_value(loss_of)(params, x, y, plant)
    return {k: v - lr * grads[k] for k, v in params.items()}, loss


STEPS = [backward_step, func_step]

# Each fault on one line: the checker must name the op and this line.
FAULTS = [
    ("item", lambda h: h * h.sum().item(), {"aten._local_scalar_dense"}),
    ("float", lambda h: h / float(h.detach().abs().max()), {"aten._local_scalar_dense"}),
    ("if", lambda h: h if h.sum() > 0 else -h, {"aten._local_scalar_dense", "aten.is_nonzero"}),
    ("tolist", lambda h: h * len(h.detach().sum(1).tolist()), {"Tensor.tolist"}),
    ("numpy", lambda h: h * float(h.detach().numpy().sum()), {"Tensor.numpy"}),
    ("nonzero", lambda h: h + torch.nonzero(h[:, :1] > 0).sum(), {"aten.nonzero"}),
    ("mask", lambda h: h + h[h > 0].sum(), {"aten.index"}),
    ("mask_assign", lambda h: h.clone().index_put_((h < 0,), h.new_zeros(())), {"aten.index_put_"}),
    ("unique", lambda h: h + torch.unique(h.detach()).sum(), {"aten._unique2"}),
    ("bincount", lambda h: h + torch.bincount((h > 0).long().flatten()).sum(), {"aten.bincount"}),
    (
        "repeat_interleave",
        lambda h: torch.repeat_interleave(h, torch.ones_like(h[:, 0], dtype=torch.long), dim=0),
        {"aten.repeat_interleave"},
    ),
    ("arange", lambda h: h + torch.arange(h.shape[1]), {"torch.arange"}),
    ("tensor", lambda h: h * torch.tensor([0.5] * h.shape[1], dtype=h.dtype), {"torch.tensor"}),
]
KINDS = {"arange": DEVICE, "tensor": DEVICE, "item": HOST_READ, "nonzero": DYNAMIC_SHAPE}

# The same computations without the fault: these must pass.
CONTROLS = [
    (
        "output_size",
        lambda h: torch.repeat_interleave(
            h, h.new_ones(h.shape[0], dtype=torch.long), dim=0, output_size=h.shape[0]
        ),
    ),
    ("arange_on_device", lambda h: h + torch.arange(h.shape[1], device=h.device)),
    (
        "tensor_on_device",
        lambda h: h * torch.tensor([0.5] * h.shape[1], dtype=h.dtype, device=h.device),
    ),
    ("masked_fill", lambda h: h.masked_fill(h < 0, 0.0)),
    ("where", lambda h: torch.where(h > 0, h, 0.5 * h)),
    ("scalar_tensor", lambda h: h * torch.tensor(0.5)),
    ("nonzero_static", lambda h: h + torch.nonzero_static(h[:, 0] > 0, size=8).sum()),
    ("max", lambda h: h / h.abs().max()),
]


@pytest.fixture
def data():
    return make_params(), *make_data()


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("expected_device", [None, "cpu"])
def test_a_clean_step_passes(step, expected_device, data):
    params, x, y = data
    reference, reference_loss = step(params, x, y)
    with forbid_host_sync(expected_device):
        new, loss = step(params, x, y)
    torch.testing.assert_close(loss, reference_loss)
    for name in params:
        torch.testing.assert_close(new[name], reference[name])
        assert not torch.equal(new[name], params[name])


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize(("name", "plant"), CONTROLS, ids=[c[0] for c in CONTROLS])
def test_the_fault_free_variants_pass(step, name, plant, data):
    with forbid_host_sync("cpu"):
        step(*data, plant)


# (.numpy() of a tensor under torch.func.grad fails in torch itself: no storage.)
FAULT_CASES = [
    pytest.param(step, *fault, id=f"{fault[0]}-{step.__name__}")
    for step in STEPS
    for fault in FAULTS
    if not (step is func_step and fault[0] == "numpy")
]


@pytest.mark.parametrize(("step", "name", "plant", "ops"), FAULT_CASES)
def test_a_planted_fault_raises_with_its_op_and_line(step, name, plant, ops, data):
    step(*data, plant)  # runs without the checker
    with pytest.raises(HostSyncError) as caught, forbid_host_sync("cpu"):
        step(*data, plant)
    violation = caught.value.violation
    assert violation.op in ops
    assert violation.kind == KINDS.get(name, violation.kind)
    line = plant.__code__.co_firstlineno
    assert violation.where.endswith(f"test_devices.py:{line}")
    assert violation.op in str(caught.value)
    assert f"test_devices.py:{line}" in str(caught.value)
    assert "lambda h:" in str(caught.value)  # the caller's code


def test_repeat_interleave_passes_with_output_size_only(data):
    counts = torch.tensor([2, 0, 1])
    values = torch.tensor([1.0, 2.0, 3.0])
    with forbid_host_sync("cpu"):
        torch.repeat_interleave(values, counts, output_size=3)
        torch.repeat_interleave(values, 2)  # a Python int: the shape is known
    with pytest.raises(HostSyncError, match=r"aten\.repeat_interleave"), forbid_host_sync():
        torch.repeat_interleave(values, counts)


def test_a_cpu_tensor_only_offends_when_the_step_declares_its_device(data):
    plant = FAULTS[[f[0] for f in FAULTS].index("arange")][1]
    with forbid_host_sync():  # no device declared: nothing mixes on the CPU
        backward_step(*data, plant)
    with pytest.raises(HostSyncError, match=r"torch\.arange .*without device="):
        with forbid_host_sync("cpu"):
            backward_step(*data, plant)


def test_on_the_meta_device_mixing_and_hard_coded_devices_raise():
    params, (x, y) = make_params("meta"), make_data("meta")
    with forbid_host_sync("meta"):
        new, loss = backward_step(params, x, y)
        func_step(params, x, y)
    assert loss.device.type == "meta" and all(v.device.type == "meta" for v in new.values())

    def hard_coded(h):
        return h + torch.arange(h.shape[1], device="cpu")  # passes on the CPU

    on_cpu = make_params(), *make_data()
    with forbid_host_sync("cpu"):
        backward_step(*on_cpu, hard_coded)
    with pytest.raises(HostSyncError, match=r"aten\.arange .*on cpu; the step's device is meta"):
        with forbid_host_sync("meta"):
            backward_step(params, x, y, hard_coded)
    with pytest.raises(HostSyncError, match=r"mixes tensors on cpu, meta"), forbid_host_sync():
        backward_step(params, x, y, hard_coded)
    with pytest.raises(HostSyncError, match=r"aten\._local_scalar_dense"), forbid_host_sync():
        float(loss)  # reads are named before torch refuses them on meta
    with pytest.raises(HostSyncError, match=r"a copy from meta to the CPU"), forbid_host_sync():
        loss.cpu()


def test_host_work_passes_until_it_meets_the_device_uncopied():
    """``host_work``: planning on the host (CPU ops, dynamic shapes and reads of host data
    included) passes while the step's device is another; a host tensor copied to the device
    passes, one that meets the device's tensors uncopied offends, as does a constructor
    without ``device=``."""
    data = torch.arange(12.0, device="meta").reshape(6, 2)
    counts = torch.tensor([2, 0, 3])

    def plan_and_gather(copy: bool) -> torch.Tensor:
        rows = torch.repeat_interleave(torch.arange(3, device="cpu"), counts)
        rows = rows[rows > 0] if int(counts.sum()) > 0 else rows  # host shapes and reads
        return data.index_select(0, rows.to("meta") if copy else rows)

    with forbid_host_sync("meta", host_work=True):
        assert plan_and_gather(copy=True).shape == (3, 2)
    with pytest.raises(HostSyncError, match="on cpu; the step's device is meta"):
        with forbid_host_sync("meta"):
            plan_and_gather(copy=True)
    with pytest.raises(HostSyncError, match=r"mixes tensors on cpu, meta"):
        with forbid_host_sync("meta", host_work=True):
            plan_and_gather(copy=False)
    with pytest.raises(HostSyncError, match=r"torch\.arange .*without device="):
        with forbid_host_sync("meta", host_work=True):
            torch.arange(3)


class _ReadsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(h):
        return h * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad * (2 if grad.sum() > 0 else -2)  # the planted read


def test_a_read_in_the_backward_pass_names_its_line(data):
    line = _ReadsInBackward.backward.__code__.co_firstlineno + 2
    plant = _ReadsInBackward.apply
    with pytest.raises(HostSyncError, match=rf"test_devices.py:{line} in backward"):
        with forbid_host_sync("cpu"):
            backward_step(*data, plant)


def test_count_host_syncs_runs_to_the_end_and_lists_every_offence(data):
    def step(h):
        h = h * h.sum().item()  # 1
        h = h + h[h > 0].sum()  # 2
        h = h + torch.arange(h.shape[1])  # 3
        return h + len(h.detach().sum(1).tolist())  # 4

    first = step.__code__.co_firstlineno + 1
    expected, _ = backward_step(*data, step)
    result, offences = count_host_syncs(backward_step, *data, step, expected_device="cpu")
    for name in expected:
        torch.testing.assert_close(result[0][name], expected[name])
    assert [(v.kind, v.op) for v in offences] == [
        (HOST_READ, "aten._local_scalar_dense"),
        (DYNAMIC_SHAPE, "aten.index"),
        (DEVICE, "torch.arange"),
        (HOST_READ, "Tensor.tolist"),
        (DYNAMIC_SHAPE, "aten.index_put"),  # the mask's backward, at loss.backward()
    ]
    backward_line = (
        next(
            number
            for number, line in enumerate(inspect.getsourcelines(backward_step)[0])
            if line.strip() == "loss.backward()"
        )
        + backward_step.__code__.co_firstlineno
    )
    assert [v.line for v in offences] == [first, first + 1, first + 2, first + 3, backward_line]
    assert offences[-1].code == "loss.backward()"
    assert count_host_syncs(backward_step, *data, expected_device="cpu")[1] == []
    _, without_device = count_host_syncs(backward_step, *data, step)
    assert [v.op for v in without_device] == [
        "aten._local_scalar_dense",
        "aten.index",
        "Tensor.tolist",
        "aten.index_put",
    ]


def test_allowed_ops_pass_and_the_checks_end_with_the_block(data):
    plant = FAULTS[[f[0] for f in FAULTS].index("nonzero")][1]
    with forbid_host_sync("cpu", allow={"aten.nonzero"}):
        backward_step(*data, plant)
    with pytest.raises(HostSyncError):
        with forbid_host_sync("cpu", allow={"aten.index"}):
            backward_step(*data, plant)
    with forbid_host_sync():
        pass
    assert isinstance(torch.ones(2).sum().item(), float)
    assert torch.arange(3).tolist() == [0, 1, 2]
    assert issubclass(HostSyncError, AssertionError)


def test_other_host_reads(data):
    t = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    cases = [
        (lambda: np.asarray(t), "Tensor.__array__"),
        (lambda: repr(t), "Tensor.__repr__"),
        (lambda: f"{t}", "Tensor.__format__"),
        (lambda: torch.equal(t, t), "aten.equal"),
        (lambda: torch.allclose(t, t), "aten.allclose"),
        (lambda: torch.linalg.inv(torch.eye(2, dtype=t.dtype)), "aten._linalg_check_errors"),
        (lambda: torch.histc(t), "aten.histc"),
        (lambda: [0, 1, 2][t.long()[1]], "aten._local_scalar_dense"),
    ]
    for call, op in cases:
        with pytest.raises(HostSyncError) as caught, forbid_host_sync():
            call()
        assert caught.value.violation.op == op
        assert caught.value.violation.kind == HOST_READ
    with forbid_host_sync():
        torch.linalg.inv_ex(torch.eye(2, dtype=t.dtype))
        torch.histc(t, bins=4, min=0.0, max=1.0)
        torch.isclose(t, t)


def test_reads_of_cpu_scalars_are_not_syncs_when_the_step_is_elsewhere():
    scalar = torch.tensor(3.0)  # 0-dim on the CPU: a number to torch, on any device
    with forbid_host_sync("meta"):
        assert scalar.item() == 3.0
    with pytest.raises(HostSyncError), forbid_host_sync("cpu"):
        scalar.item()  # on a CPU-only step, device and host data cannot be told apart
