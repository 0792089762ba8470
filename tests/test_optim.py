"""Optimisers and the plateau scheduler against ``torch.optim`` (spec §4.7)."""

from __future__ import annotations

import itertools
import math

import attrs
import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st

from aenet_fn.core.optim import (
    AdamConfig,
    AdamState,
    Optimizer,
    PlateauConfig,
    PlateauState,
    SGDConfig,
    SGDState,
    adam,
    adam_init,
    adam_update,
    decoupled_weight_decay,
    plateau_init,
    plateau_step,
    sgd,
    sgd_init,
    sgd_update,
)
from aenet_fn.core.records import pytree_record
from aenet_fn.core.serialization import from_tree, to_tree
from aenet_fn.speedups.fused_optim import update_eagerly, update_in_place, update_members_in_place

N_STEPS = 10
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


@pytree_record
@attrs.frozen(eq=False)
class _Params:
    """A small record of parameters: a least-squares model ``y = X w + b``."""

    w: torch.Tensor
    b: torch.Tensor


def _problem(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, _Params]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(12, 3, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(3, generator=g, dtype=torch.float64).to(dtype)
    return x, y, _Params(w=w, b=b)


def _loss(params: _Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x @ params.w + params.b - y) ** 2).mean()


def _grads(params: _Params, x: torch.Tensor, y: torch.Tensor) -> _Params:
    return torch.func.grad(_loss)(params, x, y)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * 1e-3)


def _compare_with_torch(
    make_torch: type[torch.optim.Optimizer],
    torch_kwargs: dict,
    opt: Optimizer,
    dtype: torch.dtype,
    rtol: float | None = None,
) -> None:
    """``opt`` for ``N_STEPS`` steps against the torch optimiser (within ``rtol``, default
    ``TOLERANCE``), both its pure and its eager update."""
    rtol = TOLERANCE[dtype] if rtol is None else rtol
    x, y, params = _problem(dtype)
    reference = [params.w.clone().requires_grad_(True), params.b.clone().requires_grad_(True)]
    torch_opt = make_torch(reference, **torch_kwargs)
    state = eager_state = opt.init(params)
    eager = params
    for _ in range(N_STEPS):
        torch_opt.zero_grad()
        _loss(_Params(*reference), x, y).backward()
        torch_opt.step()
        params, state = opt.update(_grads(params, x, y), state, params)
        eager, eager_state = update_eagerly(opt, _grads(eager, x, y), eager_state, eager)
        for ours in (params, eager):
            _assert_close(ours.w, reference[0].detach(), rtol)
            _assert_close(ours.b, reference[1].detach(), rtol)
    assert int(state.step) == int(eager_state.step) == N_STEPS


ADAM_GRID = list(
    itertools.product(
        [1e-3, 0.05],  # lr
        [(0.9, 0.999), (0.5, 0.9), (0.0, 0.0)],  # betas
        [1e-8, 1e-3],  # eps
        [0.0, 0.1],  # weight decay
    )
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("lr", "betas", "eps", "weight_decay"), ADAM_GRID)
def test_adam_matches_torch(
    dtype: torch.dtype, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    config = AdamConfig(
        lr=lr, beta1=betas[0], beta2=betas[1], epsilon=eps, weight_decay=weight_decay
    )
    kwargs = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
    _compare_with_torch(torch.optim.Adam, kwargs, adam(config), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("lr", "momentum", "weight_decay"),
    list(itertools.product([0.01, 0.1], [0.0, 0.5, 0.9], [0.0, 0.1])),
)
def test_sgd_matches_torch(
    dtype: torch.dtype, lr: float, momentum: float, weight_decay: float
) -> None:
    config = SGDConfig(lr=lr, momentum=momentum, weight_decay=weight_decay)
    kwargs = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    _compare_with_torch(torch.optim.SGD, kwargs, sgd(config), dtype)


@pytest.mark.parametrize("lr_as_tensor", [False, True])
@pytest.mark.parametrize(
    ("make_torch", "opt"),
    [
        (torch.optim.Adam, adam(AdamConfig(lr=0.1, weight_decay=0.01))),
        (torch.optim.SGD, sgd(SGDConfig(lr=0.1, momentum=0.9, weight_decay=0.01))),
    ],
)
def test_lr_override_matches_changing_torch_lr(
    make_torch: type[torch.optim.Optimizer], opt: Optimizer, lr_as_tensor: bool
) -> None:
    """Changing ``lr`` between calls equals changing the param group's lr in torch."""
    x, y, params = _problem(torch.float64, seed=1)
    reference = [params.w.clone().requires_grad_(True), params.b.clone().requires_grad_(True)]
    torch_opt = make_torch(reference, lr=0.1, weight_decay=0.01)
    if make_torch is torch.optim.SGD:
        torch_opt.param_groups[0]["momentum"] = 0.9
    state = eager_state = opt.init(params)
    eager = params
    for k in range(N_STEPS):
        lr = 0.1 * 0.7**k
        torch_opt.param_groups[0]["lr"] = lr
        torch_opt.zero_grad()
        _loss(_Params(*reference), x, y).backward()
        torch_opt.step()
        step_lr = torch.tensor(lr, dtype=torch.float64) if lr_as_tensor else lr
        params, state = opt.update(_grads(params, x, y), state, params, step_lr)
        eager, eager_state = update_eagerly(opt, _grads(eager, x, y), eager_state, eager, step_lr)
        for ours in (params, eager):
            _assert_close(ours.w, reference[0].detach(), 1e-12)
            _assert_close(ours.b, reference[1].detach(), 1e-12)


def test_dict_and_tuple_pytrees() -> None:
    """Any pytree of tensors works: a dict of tuples gives the same as the record."""
    x, y, params = _problem(torch.float64)
    tree = {"layer": (params.w, params.b)}
    opt = adam(AdamConfig(lr=0.01))
    state_r, state_t = opt.init(params), opt.init(tree)
    for _ in range(3):
        grads = _grads(params, x, y)
        params, state_r = opt.update(grads, state_r, params)
        tree, state_t = opt.update({"layer": (grads.w, grads.b)}, state_t, tree)
    assert torch.equal(tree["layer"][0], params.w)
    assert torch.equal(tree["layer"][1], params.b)


def test_factories_bind_config() -> None:
    """``sgd(config).update`` is ``sgd_update`` with the config bound (same for Adam)."""
    x, y, params = _problem(torch.float64)
    grads = _grads(params, x, y)
    for config, opt, update in [
        (SGDConfig(lr=0.1, momentum=0.5), sgd(SGDConfig(lr=0.1, momentum=0.5)), sgd_update),
        (AdamConfig(lr=0.1), adam(AdamConfig(lr=0.1)), adam_update),
    ]:
        assert opt.config == config
        via_factory, _ = opt.update(grads, opt.init(params), params)
        direct, _ = update(config, grads, opt.init(params), params)
        assert torch.equal(via_factory.w, direct.w) and torch.equal(via_factory.b, direct.b)


def test_structure_mismatch_raises() -> None:
    _, _, params = _problem(torch.float64)
    state = adam_init(params)
    with pytest.raises(ValueError, match="structure"):
        adam_update(AdamConfig(), {"w": params.w, "b": params.b}, state, params)


@pytest.mark.parametrize(
    "opt",
    [
        adam(AdamConfig(lr=0.05, weight_decay=0.1)),
        sgd(SGDConfig(lr=0.05, momentum=0.9, weight_decay=0.1)),
    ],
    ids=["adam", "sgd"],
)
@pytest.mark.parametrize("lr", [None, 0.02, "tensor"])
def test_vmapped_update_equals_per_member(opt: Optimizer, lr: object) -> None:
    """A committee of 3 members updated at once by vmap equals each member updated alone."""
    n_members = 3
    problems = [_problem(torch.float64, seed=s) for s in range(n_members)]
    xs = torch.stack([p[0] for p in problems])
    ys = torch.stack([p[1] for p in problems])
    members = [p[2] for p in problems]
    lr = torch.tensor(0.02, dtype=torch.float64) if lr == "tensor" else lr

    states = [opt.init(m) for m in members]
    stacked = pytree.tree_map(lambda *leaves: torch.stack(leaves), *members)
    stacked_state = pytree.tree_map(lambda *leaves: torch.stack(leaves), *states)
    batched_grads = torch.func.vmap(_grads)
    batched_update = torch.func.vmap(
        lambda g, s, p: opt.update(g, s, p, lr), in_dims=(0, 0, 0), out_dims=0
    )
    for _ in range(5):
        stacked, stacked_state = batched_update(
            batched_grads(stacked, xs, ys), stacked_state, stacked
        )
        for k in range(n_members):
            grads = _grads(members[k], problems[k][0], problems[k][1])
            members[k], states[k] = opt.update(grads, states[k], members[k], lr)
        for k in range(n_members):
            torch.testing.assert_close(stacked.w[k], members[k].w, rtol=1e-14, atol=1e-15)
            torch.testing.assert_close(stacked.b[k], members[k].b, rtol=1e-14, atol=1e-15)
    assert stacked_state.step.tolist() == [5] * n_members


def test_vmapped_adam_per_member_lr() -> None:
    """A per-member lr (``in_dims=0``) gives each member its own step."""
    _, _, params = _problem(torch.float64)
    grads = pytree.tree_map(torch.ones_like, params)
    opt = adam(AdamConfig())
    lrs = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    stack = lambda tree: pytree.tree_map(lambda t: torch.stack([t] * 3), tree)  # noqa: E731
    new, _ = torch.func.vmap(opt.update)(stack(grads), stack(opt.init(params)), stack(params), lrs)
    for k in range(3):
        alone, _ = opt.update(grads, opt.init(params), params, float(lrs[k]))
        torch.testing.assert_close(new.w[k], alone.w, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(
    "opt",
    [adam(AdamConfig(weight_decay=0.1)), sgd(SGDConfig(momentum=0.9, weight_decay=0.1))],
    ids=["adam", "sgd"],
)
def test_update_is_pure(opt: Optimizer) -> None:
    x, y, params = _problem(torch.float64)
    state = opt.init(params)
    for _ in range(2):  # the second update starts from a non-trivial state
        grads = _grads(params, x, y)
        snapshot = [t.clone() for t in pytree.tree_leaves((grads, state, params))]
        new_params, new_state = opt.update(grads, state, params)
        after = pytree.tree_leaves((grads, state, params))
        assert all(torch.equal(a, b) for a, b in zip(after, snapshot))
        new_leaves = pytree.tree_leaves((new_params, new_state))
        assert all(
            new.data_ptr() != old.data_ptr()
            for new in new_leaves
            for old in after
            if new.numel() and old.numel()
        )
        params, state = new_params, new_state


def test_init_states() -> None:
    _, _, params = _problem(torch.float32)
    a = adam_init(params)
    assert isinstance(a, AdamState)
    assert a.step.dtype == torch.int64 and a.step.shape == ()
    assert torch.equal(a.mu.w, torch.zeros_like(params.w)) and a.nu.b.dtype == torch.float32
    s = sgd_init(params)
    assert isinstance(s, SGDState)
    assert torch.equal(s.momentum_buffer.w, torch.zeros_like(params.w)) and int(s.step) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"lr": -1e-3},
        {"lr": math.nan},
        {"lr": "0.1"},
        {"beta1": 1.0},
        {"beta1": -0.1},
        {"beta2": 1.0},
        {"beta2": -0.5},
        {"epsilon": 0.0},
        {"epsilon": -1e-8},
        {"weight_decay": -0.1},
        {"weight_decay": math.inf},
    ],
)
def test_adam_config_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AdamConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": 0.0}, {"lr": -0.1}, {"lr": True}, {"momentum": -0.9}, {"weight_decay": -1e-4}],
)
def test_sgd_config_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SGDConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"factor": 1.0},
        {"factor": 0.0},
        {"patience": -1},
        {"patience": 2.5},
        {"min_lr": -1e-6},
        {"threshold": -1e-4},
        {"threshold_mode": "relative"},
        {"cooldown": -1},
        {"mode": "minimum"},
        {"eps": -1.0},
    ],
)
def test_plateau_config_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PlateauConfig(**kwargs)


def test_config_defaults() -> None:
    assert attrs.asdict(AdamConfig()) == {
        "lr": 1e-3,
        "beta1": 0.9,
        "beta2": 0.999,
        "epsilon": 1e-8,
        "weight_decay": 0.0,
    }
    assert attrs.asdict(SGDConfig()) == {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.0}
    config = PlateauConfig()
    assert (config.factor, config.patience, config.min_lr, config.mode) == (0.5, 10, 1e-6, "min")
    assert pytree.tree_leaves(config) == [] and pytree.tree_leaves(AdamConfig()) == []


_metrics = st.lists(
    st.one_of(
        st.floats(0.0, 2.0, allow_nan=False),
        st.sampled_from([1.0, 0.5, 0.25]),  # repeats make plateaus
    ),
    min_size=1,
    max_size=60,
)


@given(
    metrics=_metrics,
    factor=st.sampled_from([0.1, 0.5, 0.9]),
    patience=st.integers(0, 4),
    min_lr=st.sampled_from([0.0, 1e-6, 0.01, 0.05]),
    threshold=st.sampled_from([0.0, 1e-4, 0.1]),
    threshold_mode=st.sampled_from(["rel", "abs"]),
    cooldown=st.integers(0, 3),
    mode=st.sampled_from(["min", "max"]),
    lr0=st.sampled_from([0.1, 1e-3, 0.0500000001]),
)
def test_plateau_matches_torch(
    metrics: list[float],
    factor: float,
    patience: int,
    min_lr: float,
    threshold: float,
    threshold_mode: str,
    cooldown: int,
    mode: str,
    lr0: float,
) -> None:
    kwargs = {
        "factor": factor,
        "patience": patience,
        "min_lr": min_lr,
        "threshold": threshold,
        "threshold_mode": threshold_mode,
        "cooldown": cooldown,
        "mode": mode,
    }
    torch_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(torch_opt, **kwargs)
    config = PlateauConfig(**kwargs)
    state = plateau_init(config, lr0)
    for metric in metrics:
        scheduler.step(metric)
        state, lr = plateau_step(config, state, torch.tensor(metric, dtype=torch.float64))
        assert lr == torch_opt.param_groups[0]["lr"] == state.lr
        assert state.best == scheduler.best
        assert state.num_bad_epochs == scheduler.num_bad_epochs
        assert state.cooldown_counter == scheduler.cooldown_counter
        assert from_tree(to_tree(state)) == state


def test_plateau_eps_rule_and_min_lr() -> None:
    """Reductions stop at ``min_lr``; one smaller than ``eps`` is ignored."""
    config = PlateauConfig(factor=0.5, patience=0, min_lr=0.01)
    state = plateau_init(config, 0.04)
    lrs = []
    for _ in range(6):
        state, lr = plateau_step(config, state, 1.0)
        lrs.append(lr)
    assert lrs == [0.04, 0.02, 0.01, 0.01, 0.01, 0.01]
    tiny = PlateauConfig(factor=0.5, patience=0, min_lr=0.0, eps=1e-8)
    state = plateau_init(tiny, 1.5e-8)
    state, _ = plateau_step(tiny, state, 1.0)
    state, lr = plateau_step(tiny, state, 1.0)
    assert lr == 1.5e-8  # 0.75e-8 decrease is below eps


def test_plateau_state_serialises_and_is_static() -> None:
    state = PlateauState(lr=0.1, best=math.inf, num_bad_epochs=3, cooldown_counter=1)
    assert from_tree(to_tree(state)) == state
    assert pytree.tree_leaves(state) == []  # tree_map over a training state leaves it alone


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eager_adam_is_bitwise_torch_optim(
    weight_decay: float, in_place: bool, dtype: torch.dtype
) -> None:
    """The eager form forms the bias corrections as Python numbers, as torch.optim does; the
    in-place form is torch.optim's fused Adam, writing into the parameters and moments it is
    given."""
    generator = torch.Generator().manual_seed(3)
    params = torch.randn(40, dtype=dtype, generator=generator)
    reference = params.clone().requires_grad_(True)
    torch_opt = torch.optim.Adam([reference], lr=0.02, weight_decay=weight_decay, fused=in_place)
    opt = adam(AdamConfig(lr=0.02, weight_decay=weight_decay))
    state = opt.init(params)
    for step in range(15):
        grads = torch.randn(40, dtype=dtype, generator=generator)
        reference.grad = grads.clone()
        torch_opt.step()
        if in_place:
            moments = state.mu
            state = update_in_place(opt, grads, state, params)
            assert state.mu is moments and int(state.step) == step + 1
        else:
            params, state = update_eagerly(opt, grads, state, params)
        assert torch.equal(params, reference.detach())
    torch.testing.assert_close(state.nu, torch_opt.state[reference]["exp_avg_sq"], rtol=0, atol=0)


def test_in_place_update_without_an_in_place_form_copies_the_eager_update() -> None:
    """SGD (no in-place form): ``update_in_place`` writes ``update_eagerly``'s parameters."""
    generator = torch.Generator().manual_seed(5)
    opt = sgd(SGDConfig(lr=0.1, momentum=0.9))
    params = torch.randn(12, dtype=torch.float64, generator=generator)
    eager, buffer = params.clone(), params
    state = eager_state = opt.init(params)
    for _ in range(4):
        grads = torch.randn(12, dtype=torch.float64, generator=generator)
        eager, eager_state = update_eagerly(opt, grads, eager_state, eager)
        state = update_in_place(opt, grads, state, buffer)
        assert buffer is params and torch.equal(buffer, eager)
        assert torch.equal(state.momentum_buffer, eager_state.momentum_buffer)


@pytest.mark.parametrize(
    "opt",
    [
        adam(AdamConfig(lr=0.1)),
        adam(AdamConfig(lr=0.1, weight_decay=0.1)),
        sgd(SGDConfig(lr=0.1, momentum=0.9)),
    ],
)
def test_members_update_in_place_is_each_member_alone(opt: Optimizer) -> None:
    """Stacked members with their own learning rates (two sharing one) and step counts (two
    members ahead): the members update writes, for each member, its own in-place
    update (Adam: the fused members form, bit for bit; SGD, which has none: vmapped)."""
    generator = torch.Generator().manual_seed(7)
    lrs = [0.02, 0.005, 0.02, 0.001]

    def randn() -> dict[str, torch.Tensor]:
        return {"w": torch.randn(5, 2, dtype=torch.float64, generator=generator)}

    members = [randn() for _ in lrs]
    alone = [opt.init(m) for m in members]
    for i in (1, 3, 3):  # members 1 and 3 one and two steps ahead
        alone[i] = update_in_place(opt, randn(), alone[i], members[i], lrs[i])
    params = pytree.tree_map(lambda *leaves: torch.stack(leaves), *members)
    state = pytree.tree_map(lambda *leaves: torch.stack(leaves), *alone)
    for _ in range(4):
        grads = [randn() for _ in lrs]
        stacked_grads = pytree.tree_map(lambda *leaves: torch.stack(leaves), *grads)
        state = update_members_in_place(
            opt, stacked_grads, state, params, torch.tensor(lrs, dtype=torch.float64)
        )
        alone = [
            update_in_place(opt, g, s, m, lr) for g, s, m, lr in zip(grads, alone, members, lrs)
        ]
    for i, member in enumerate(members):
        torch.testing.assert_close(params["w"][i], member["w"], rtol=1e-15, atol=0)
        if isinstance(opt.config, AdamConfig):  # the fused members form
            assert torch.equal(params["w"][i], member["w"])
    assert state.step.tolist() == [4, 5, 4, 6]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("lr", "rate"), [(1e-3, 0.1), (0.05, 0.01), (0.05, 0.0)])
def test_adam_with_decoupled_weight_decay_is_torch_adamw(dtype, lr, rate) -> None:
    """Adam chained with the decoupled decay of every parameter is ``torch.optim.AdamW``;
    with a mask, AdamW on the selected parameters and Adam on the rest (float32 to round-off
    of the parameters' size: AdamW shrinks before its step, the chain after; a decay off by
    its own size would be 5e-3 after these steps)."""
    rtol = 1e-4 if dtype == torch.float32 else TOLERANCE[dtype]
    opt = decoupled_weight_decay(adam(AdamConfig(lr=lr)), rate)
    _compare_with_torch(torch.optim.AdamW, {"lr": lr, "weight_decay": rate}, opt, dtype, rtol)

    def adamw_on_weights_only(tensors, **kwargs):
        weights, biases = tensors
        groups = [{"params": [weights]}, {"params": [biases], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, **kwargs)

    mask = _Params(w=torch.ones(4, 3, dtype=torch.bool), b=torch.zeros(3, dtype=torch.bool))
    masked = decoupled_weight_decay(adam(AdamConfig(lr=lr)), rate, mask)
    kwargs = {"lr": lr, "weight_decay": rate}
    _compare_with_torch(adamw_on_weights_only, kwargs, masked, dtype, rtol)


@given(
    lr=st.floats(1e-4, 1.0),
    rate=st.floats(0.0, 0.5),
    lr_override=st.one_of(st.none(), st.floats(1e-4, 1.0)),
)
def test_decoupled_decay_shrinks_exactly_the_masked_parameters(lr, rate, lr_override) -> None:
    """With zero gradients SGD does not move, so the chained step is the decay alone:
    ``p(1 − lr·λ)`` where the mask is set, ``p`` elsewhere, at the step's learning rate."""
    _, _, params = _problem(torch.float64)
    mask = _Params(w=torch.rand(4, 3) < 0.5, b=torch.zeros(3, dtype=torch.bool))
    opt = decoupled_weight_decay(sgd(SGDConfig(lr=lr)), rate, mask)
    zeros = pytree.tree_map(torch.zeros_like, params)
    new, state = opt.update(zeros, opt.init(params), params, lr_override)
    factor = 1 - (lr if lr_override is None else lr_override) * rate
    expected_w = torch.where(mask.w, params.w * factor, params.w)
    torch.testing.assert_close(new.w, expected_w, rtol=1e-14, atol=0)
    assert torch.equal(new.b, params.b)
    assert isinstance(state, SGDState) and opt.config.inner == SGDConfig(lr=lr)


def test_decoupled_decay_vmaps_over_members_and_refuses_a_mask_of_another_shape() -> None:
    _, _, params = _problem(torch.float64)
    opt = decoupled_weight_decay(adam(AdamConfig(lr=0.1)), 0.3)
    stacked = pytree.tree_map(lambda t: torch.stack([t, 2 * t]), params)
    grads = pytree.tree_map(torch.ones_like, stacked)
    state = torch.func.vmap(opt.init)(stacked)
    together, _ = torch.func.vmap(opt.update)(grads, state, stacked)
    for i, member in enumerate((params, pytree.tree_map(lambda t: 2 * t, params))):
        alone, _ = opt.update(pytree.tree_map(torch.ones_like, member), opt.init(member), member)
        torch.testing.assert_close(together.w[i], alone.w, rtol=1e-15, atol=0)
    wrong = decoupled_weight_decay(adam(), 0.1, {"w": torch.ones(4, 3, dtype=torch.bool)})
    ones = pytree.tree_map(torch.ones_like, params)
    with pytest.raises(ValueError, match="mask does not have the structure of params"):
        wrong.update(ones, wrong.init(params), params)
