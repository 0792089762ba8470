"""Optimisers as pure ``init``/``update`` pairs and a pure plateau learning-rate scheduler.

Parameters may be any pytree of tensors (a frozen attrs record registered as a pytree, a dict, a
tuple, ...). ``update`` never modifies its inputs; it returns new parameters and a new state.

* Adam reproduces ``torch.optim.Adam`` (L2 weight decay added to the gradient — *not* AdamW —,
  bias correction as torch computes it, ``amsgrad=False``, ``maximize=False``).
* SGD reproduces ``torch.optim.SGD`` (momentum buffer set to the gradient at the first step,
  ``dampening=0``, ``nesterov=False``, L2 weight decay).
* :func:`decoupled_weight_decay` chains AdamW-style decay (``p ← p − lr·λ·p`` beside the
  optimiser's step, on the parameters a mask selects, e.g. weights but not biases) onto either.
* ``update`` uses tensor operations only (no Python branches on tensor values), so
  ``torch.func.vmap`` over parameters, gradients and states stacked along a leading committee axis
  gives, for every member, the result of updating that member alone.
* The plateau scheduler reproduces ``torch.optim.lr_scheduler.ReduceLROnPlateau`` for one
  parameter group; its state is plain Python numbers (driver level, stepped once per epoch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, Union

import attrs
import torch
import torch.utils._pytree as pytree

from aenet_fn.core.checks import is_integer, is_real
from aenet_fn.core.records import compilable_init, pytree_record, static_field

PyTree = Any
LearningRate = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------------
# validation helpers


def _number(name: str, value: Any) -> float:
    if not is_real(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _positive(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if _number(attribute.name, value) <= 0.0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _non_negative(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if _number(attribute.name, value) < 0.0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _beta(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not 0.0 <= _number(attribute.name, value) < 1.0:
        raise ValueError(f"{attribute.name} must satisfy 0 <= {attribute.name} < 1, got {value!r}")


def _factor(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not 0.0 < _number(attribute.name, value) < 1.0:
        raise ValueError(f"{attribute.name} must satisfy 0 < {attribute.name} < 1, got {value!r}")


def _non_negative_int(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not is_integer(value) or value < 0:
        raise ValueError(f"{attribute.name} must be an integer >= 0, got {value!r}")


def _one_of(*choices: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {choices}, got {value!r}")

    return check


def _flatten_like(tree: PyTree, spec: pytree.TreeSpec, name: str) -> list[Any]:
    leaves, tree_spec = pytree.tree_flatten(tree)
    if tree_spec != spec:
        raise ValueError(f"{name} does not have the structure of params: {tree_spec} != {spec}")
    return leaves


def _lr_tensor(lr: LearningRate, like: torch.Tensor) -> torch.Tensor:
    """``lr`` as a float64 tensor on ``like``'s device (0-d, or batched under vmap)."""
    if isinstance(lr, torch.Tensor):
        return lr.to(device=like.device, dtype=torch.float64)
    return torch.tensor(_number("lr", lr), dtype=torch.float64, device=like.device)


def _first_device(params: PyTree) -> torch.device:
    leaves = [x for x in pytree.tree_leaves(params) if isinstance(x, torch.Tensor)]
    return leaves[0].device if leaves else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# records


@pytree_record
@attrs.frozen
class AdamConfig:
    """Hyper-parameters of Adam (all static).

    Attributes:
        lr: learning rate (> 0); ``update(..., lr=...)`` may override it per call.
        beta1, beta2: moment decay rates (``0 <= beta < 1``).
        epsilon: added to the root of the second moment (> 0).
        weight_decay: L2 coefficient added to the gradient as ``g + weight_decay * p`` (>= 0).
    """

    lr: float = static_field(default=1e-3, validator=_positive)
    beta1: float = static_field(default=0.9, validator=_beta)
    beta2: float = static_field(default=0.999, validator=_beta)
    epsilon: float = static_field(default=1e-8, validator=_positive)
    weight_decay: float = static_field(default=0.0, validator=_non_negative)


@pytree_record
@attrs.frozen
class SGDConfig:
    """Hyper-parameters of SGD (all static).

    Attributes:
        lr: learning rate (> 0); ``update(..., lr=...)`` may override it per call.
        momentum: momentum factor (``0 <= momentum < 1``; 0 disables the buffer's use).
        weight_decay: L2 coefficient added to the gradient as ``g + weight_decay * p`` (>= 0).
    """

    lr: float = static_field(default=0.01, validator=_positive)
    momentum: float = static_field(default=0.0, validator=_beta)
    weight_decay: float = static_field(default=0.0, validator=_non_negative)


@pytree_record
@attrs.frozen(eq=False)
class AdamState:
    """State of Adam.

    Attributes:
        step: ``[]`` int64 number of updates done so far (``[M]`` when stacked for a committee).
        mu: first-moment estimates, a pytree shaped like the parameters.
        nu: second-moment estimates, a pytree shaped like the parameters.
    """

    step: torch.Tensor
    mu: PyTree
    nu: PyTree


@pytree_record
@attrs.frozen(eq=False)
class SGDState:
    """State of SGD.

    Attributes:
        momentum_buffer: pytree shaped like the parameters (zeros until the first update; left
            unchanged when ``momentum == 0``).
        step: ``[]`` int64 number of updates done so far (``[M]`` when stacked).
    """

    momentum_buffer: PyTree
    step: torch.Tensor


OptState = Union[AdamState, SGDState]


@compilable_init
@attrs.frozen
class Optimizer:
    """An optimiser as a pair of pure functions, its configuration bound.

    Attributes:
        init: ``init(params) -> state``.
        update: ``update(grads, state, params, lr=None) -> (new_params, new_state)``.
        config: the bound configuration (:class:`AdamConfig` or :class:`SGDConfig`).

    Faster eager, in-place and committee forms for the CPU are speed-ups that take an
    optimiser (:mod:`aenet_fn.speedups.fused_optim`); this record stays a pure pair.
    """

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple[PyTree, Any]]
    config: Any = None


# --------------------------------------------------------------------------------------------
# Adam


def adam_init(params: PyTree) -> AdamState:
    """Initial Adam state for ``params``: step 0 and zero moments shaped like the parameters."""
    step = torch.zeros((), dtype=torch.int64, device=_first_device(params))
    mu = pytree.tree_map(torch.zeros_like, params)
    nu = pytree.tree_map(torch.zeros_like, params)
    return AdamState(step=step, mu=mu, nu=nu)


def adam_update(
    config: AdamConfig,
    grads: PyTree,
    state: AdamState,
    params: PyTree,
    lr: LearningRate | None = None,
) -> tuple[PyTree, AdamState]:
    """One Adam step, as ``torch.optim.Adam.step`` computes it.

    Args:
        config: hyper-parameters.
        grads: gradients, a pytree with the structure and shapes of ``params``.
        state: current state (from :func:`adam_init` or a previous update).
        params: current parameters.
        lr: learning rate for this step (float or 0-d tensor); ``config.lr`` when ``None``.

    Returns:
        ``(new_params, new_state)``; the inputs are not modified.
    """
    step = state.step + 1
    # torch evaluates the bias corrections in double precision from the step count
    step_f = step.to(torch.float64)
    bias_correction1 = 1.0 - torch.pow(config.beta1, step_f)
    bias_correction2_sqrt = torch.sqrt(1.0 - torch.pow(config.beta2, step_f))
    lr_t = _lr_tensor(config.lr if lr is None else lr, step)
    neg_step_size = -(lr_t / bias_correction1)

    def new_leaf(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        denom = v.sqrt() / bias_correction2_sqrt.to(p.dtype) + config.epsilon
        return p + neg_step_size.to(p.dtype) * m / denom

    return _adam_leaves(config, grads, state, params, step, new_leaf)


def _adam_leaf_lists(grads, state: AdamState, params):
    """``(spec, params, grads, mu, nu)``: the leaves of the four trees (``spec`` None for one
    flat vector), each checked to have the structure of ``params``."""
    if isinstance(params, torch.Tensor) and isinstance(grads, torch.Tensor):  # one flat vector
        return None, [params], [grads], [state.mu], [state.nu]
    param_leaves, spec = pytree.tree_flatten(params)
    grad_leaves = _flatten_like(grads, spec, "grads")
    mu_leaves = _flatten_like(state.mu, spec, "state.mu")
    nu_leaves = _flatten_like(state.nu, spec, "state.nu")
    return spec, param_leaves, grad_leaves, mu_leaves, nu_leaves


def _adam_leaves(config: AdamConfig, grads, state: AdamState, params, step, new_leaf):
    """The per-leaf loop of the unfused Adam forms: new moments, then ``new_leaf(p, m, v)``."""
    spec, param_leaves, grad_leaves, mu_leaves, nu_leaves = _adam_leaf_lists(grads, state, params)
    new_params, new_mu, new_nu = [], [], []
    for p, g, m, v in zip(param_leaves, grad_leaves, mu_leaves, nu_leaves):
        if config.weight_decay != 0.0:
            g = torch.add(g, p, alpha=config.weight_decay)
        m = torch.lerp(m, g, 1.0 - config.beta1)
        v = torch.addcmul(v * config.beta2, g, g, value=1.0 - config.beta2)
        new_params.append(new_leaf(p, m, v))
        new_mu.append(m)
        new_nu.append(v)
    if spec is None:
        return new_params[0], AdamState(step=step, mu=new_mu[0], nu=new_nu[0])
    new_state = AdamState(
        step=step,
        mu=pytree.tree_unflatten(new_mu, spec),
        nu=pytree.tree_unflatten(new_nu, spec),
    )
    return pytree.tree_unflatten(new_params, spec), new_state


# --------------------------------------------------------------------------------------------
# SGD


def sgd_init(params: PyTree) -> SGDState:
    """Initial SGD state for ``params``: step 0 and a zero momentum buffer like the parameters."""
    step = torch.zeros((), dtype=torch.int64, device=_first_device(params))
    return SGDState(momentum_buffer=pytree.tree_map(torch.zeros_like, params), step=step)


def sgd_update(
    config: SGDConfig,
    grads: PyTree,
    state: SGDState,
    params: PyTree,
    lr: LearningRate | None = None,
) -> tuple[PyTree, SGDState]:
    """One SGD step, as ``torch.optim.SGD.step`` computes it (dampening 0, no Nesterov).

    Args:
        config: hyper-parameters.
        grads: gradients, a pytree with the structure and shapes of ``params``.
        state: current state (from :func:`sgd_init` or a previous update).
        params: current parameters.
        lr: learning rate for this step (float or 0-d tensor); ``config.lr`` when ``None``.

    Returns:
        ``(new_params, new_state)``; the inputs are not modified.
    """
    param_leaves, spec = pytree.tree_flatten(params)
    grad_leaves = _flatten_like(grads, spec, "grads")
    buf_leaves = _flatten_like(state.momentum_buffer, spec, "state.momentum_buffer")
    lr = config.lr if lr is None else lr
    first = state.step == 0

    new_params, new_bufs = [], []
    for p, g, buf in zip(param_leaves, grad_leaves, buf_leaves):
        if config.weight_decay != 0.0:
            g = torch.add(g, p, alpha=config.weight_decay)
        if config.momentum != 0.0:
            buf = torch.where(first, g, torch.add(buf * config.momentum, g))
            g = buf
        if isinstance(lr, torch.Tensor):
            new_params.append(p - _lr_tensor(lr, p).to(p.dtype) * g)
        else:
            new_params.append(torch.add(p, g, alpha=-_number("lr", lr)))
        new_bufs.append(buf)
    new_state = SGDState(momentum_buffer=pytree.tree_unflatten(new_bufs, spec), step=state.step + 1)
    return pytree.tree_unflatten(new_params, spec), new_state


# --------------------------------------------------------------------------------------------
# factories


def adam(config: AdamConfig | None = None) -> Optimizer:
    """Adam as an :class:`Optimizer` (``init(params)``, ``update(grads, state, params, lr)``)."""
    config = AdamConfig() if config is None else config
    return Optimizer(init=adam_init, update=partial(adam_update, config), config=config)


def sgd(config: SGDConfig | None = None) -> Optimizer:
    """SGD as an :class:`Optimizer` (``init(params)``, ``update(grads, state, params, lr)``)."""
    config = SGDConfig() if config is None else config
    return Optimizer(init=sgd_init, update=partial(sgd_update, config), config=config)


@compilable_init
@attrs.frozen
class DecoupledWeightDecay:
    """The configuration of an optimiser chained with :func:`decoupled_weight_decay`.

    Attributes:
        inner: the chained optimiser's configuration.
        rate: decay per unit learning rate, ``λ`` in ``p ← p − lr·λ·p`` (>= 0).
    """

    inner: Any
    rate: float = attrs.field(validator=_non_negative)

    @property
    def lr(self) -> float:
        """The chained optimiser's default learning rate."""
        return self.inner.lr


def decoupled_weight_decay(optimizer: Optimizer, rate: float, mask: PyTree = None) -> Optimizer:
    """``optimizer`` chained with decoupled weight decay (AdamW, Loshchilov & Hutter 2019):
    each step also moves every parameter ``mask`` selects by ``−lr·rate·p`` (``p`` before the
    step), as ``torch.optim.AdamW`` does, instead of adding ``rate·p`` to the gradient as the
    optimisers' own ``weight_decay`` (the reference's coupled L2) does.

    Args:
        optimizer: the optimiser to chain (its ``init`` and state are unchanged).
        rate: ``λ`` (>= 0; 0 gives ``optimizer``'s numbers).
        mask: a pytree like the parameters of bool tensors (True: decayed), e.g.
            :func:`~aenet_fn.core.network.weight_mask` for a network's flat values (weights
            decayed, biases not); None decays every parameter.
    """
    config = DecoupledWeightDecay(optimizer.config, rate)
    mask_leaves, mask_spec = (None, None) if mask is None else pytree.tree_flatten(mask)

    def update(grads: PyTree, state: Any, params: PyTree, lr: LearningRate | None = None):
        new_params, new_state = optimizer.update(grads, state, params, lr)
        leaves, spec = pytree.tree_flatten(params)
        if mask_spec is not None and mask_spec != spec:
            raise ValueError(f"mask does not have the structure of params: {mask_spec} != {spec}")
        masks = [None] * len(leaves) if mask_leaves is None else mask_leaves
        rate_lr = _lr_tensor(config.lr if lr is None else lr, leaves[0]) * rate

        def decayed(new: torch.Tensor, p: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
            shrink = rate_lr.to(p.dtype) * (p if m is None else p * m.to(p.dtype))
            return new - shrink

        new_leaves = pytree.tree_leaves(new_params)
        return spec.unflatten(list(map(decayed, new_leaves, leaves, masks))), new_state

    return Optimizer(init=optimizer.init, update=update, config=config)


# --------------------------------------------------------------------------------------------
# plateau scheduler


@pytree_record
@attrs.frozen
class PlateauConfig:
    """Settings of the plateau scheduler (``torch.optim.lr_scheduler.ReduceLROnPlateau``).

    Attributes:
        factor: multiplies the learning rate on a plateau (``0 < factor < 1``).
        patience: number of bad epochs tolerated before reducing (integer >= 0).
        min_lr: lower bound of the learning rate (>= 0).
        threshold: minimal improvement that counts (>= 0).
        threshold_mode: ``'rel'`` (relative to the best) or ``'abs'``.
        cooldown: epochs to wait after a reduction before counting bad epochs (integer >= 0).
        mode: ``'min'`` (the metric should decrease) or ``'max'``.
        eps: a reduction smaller than or equal to ``eps`` is ignored (>= 0).
    """

    factor: float = static_field(default=0.5, validator=_factor)
    patience: int = static_field(default=10, validator=_non_negative_int)
    min_lr: float = static_field(default=1e-6, validator=_non_negative)
    threshold: float = static_field(default=1e-4, validator=_non_negative)
    threshold_mode: str = static_field(default="rel", validator=_one_of("rel", "abs"))
    cooldown: int = static_field(default=0, validator=_non_negative_int)
    mode: str = static_field(default="min", validator=_one_of("min", "max"))
    eps: float = static_field(default=1e-8, validator=_non_negative)


@pytree_record
@attrs.frozen
class PlateauState:
    """State of the plateau scheduler: plain Python numbers (all static, so ``tree_map`` over a
    training state leaves it untouched; checkpoints store it through
    :mod:`aenet_fn.core.serialization`).

    Attributes:
        lr: current learning rate.
        best: best metric so far (``inf`` for ``'min'``, ``-inf`` for ``'max'`` initially).
        num_bad_epochs: consecutive epochs without improvement.
        cooldown_counter: epochs of cooldown left.
    """

    lr: float = static_field()
    best: float = static_field()
    num_bad_epochs: int = static_field(default=0)
    cooldown_counter: int = static_field(default=0)


def plateau_init(config: PlateauConfig, lr: float) -> PlateauState:
    """Initial scheduler state for the starting learning rate ``lr``."""
    best = math.inf if config.mode == "min" else -math.inf
    return PlateauState(lr=float(lr), best=best, num_bad_epochs=0, cooldown_counter=0)


def _is_better(config: PlateauConfig, value: float, best: float) -> bool:
    if config.mode == "min" and config.threshold_mode == "rel":
        return value < best * (1.0 - config.threshold)
    if config.mode == "min":
        return value < best - config.threshold
    if config.threshold_mode == "rel":
        return value > best * (config.threshold + 1.0)
    return value > best + config.threshold


def plateau_step(
    config: PlateauConfig, state: PlateauState, metric: float | torch.Tensor
) -> tuple[PlateauState, float]:
    """One scheduler step on the epoch's ``metric`` (number or 0-d tensor).

    Returns ``(new_state, lr)``, ``lr`` being the learning rate to use from now on.
    """
    current = float(metric)
    best, bad, cooldown, lr = state.best, state.num_bad_epochs, state.cooldown_counter, state.lr
    if _is_better(config, current, best):
        best, bad = current, 0
    else:
        bad += 1
    if cooldown > 0:
        cooldown -= 1
        bad = 0
    if bad > config.patience:
        new_lr = max(lr * config.factor, config.min_lr)
        if lr - new_lr > config.eps:
            lr = new_lr
        cooldown, bad = config.cooldown, 0
    new_state = PlateauState(lr=lr, best=best, num_bad_epochs=bad, cooldown_counter=cooldown)
    return new_state, lr
