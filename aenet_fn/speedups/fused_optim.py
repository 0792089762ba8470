"""The optimisers' faster forms for the CPU, a speed-up over the pure ``update`` of
:mod:`aenet_fn.core.optim` with the same numbers (to round-off for the fused kernel).

* :func:`update_eagerly`: one model outside ``torch.func`` transforms; Adam's eager form reads
  the step count on the host and forms the bias corrections as Python numbers, as
  ``torch.optim.Adam`` does.
* :func:`update_in_place`: the same written into working copies the caller owns (Adam: torch's
  fused kernel, ``torch.optim.Adam(fused=True)``'s numbers).
* :func:`update_members_in_place`: committee members stacked along a leading axis, one fused
  call per learning rate.

Off the CPU (they read counts and rates on the host, which would stall an accelerator) and for
optimisers without such a form, each falls back to the pure ``update`` (vmapped for members).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from aenet_fn.core.optim import (
    AdamConfig,
    AdamState,
    LearningRate,
    Optimizer,
    PyTree,
    _adam_leaf_lists,
    _adam_leaves,
    _number,
)
from aenet_fn.core.records import on_cpu


def update_eagerly(
    optimizer: Optimizer, grads: PyTree, state: Any, params: PyTree, lr: LearningRate | None = None
) -> tuple[PyTree, Any]:
    """``optimizer.update`` for one model outside ``torch.func`` transforms, by Adam's eager
    form where the parameters are on the CPU (the same numbers as ``torch.optim``)."""
    if _fused(optimizer, params):
        return adam_update_eager(optimizer.config, grads, state, params, lr)
    return optimizer.update(grads, state, params, lr)


def update_in_place(
    optimizer: Optimizer, grads: PyTree, state: Any, params: PyTree, lr: LearningRate | None = None
) -> Any:
    """:func:`update_eagerly` written into ``params`` (working copies the caller owns);
    returns the new state. Adam on the CPU: torch's fused kernel, which also updates the
    tensors of ``state`` in place; otherwise the eager update copied back."""
    if _fused(optimizer, params):
        return adam_update_fused(optimizer.config, grads, state, params, lr)[1]
    return _written_back(params, *update_eagerly(optimizer, grads, state, params, lr))


def update_members_in_place(
    optimizer: Optimizer, grads: PyTree, state: Any, params: PyTree, lrs: torch.Tensor
) -> Any:
    """One step of ``W`` committee members stacked along the leading axis of every leaf
    (``params``, ``grads``, ``state``), member ``i`` at learning rate ``lrs[i]``, written into
    ``params``; returns the new state. Adam on the CPU: one fused call per learning rate on
    the members' rows (it reads the rates on the host); otherwise ``vmap(update)`` copied
    back."""
    if _fused(optimizer, params):
        return adam_update_members_fused(optimizer.config, grads, state, params, lrs)[1]
    new = torch.func.vmap(optimizer.update)(grads, state, params, lrs)
    return _written_back(params, *new)


def _fused(optimizer: Optimizer, params: PyTree) -> bool:
    """Whether the faster forms apply: Adam (the one optimiser that has them) on the CPU."""
    return isinstance(optimizer.config, AdamConfig) and on_cpu(params)


def _written_back(params: PyTree, new_params: PyTree, state: Any) -> Any:
    """Copy ``new_params`` into ``params`` (in place) and return ``state``."""
    pytree.tree_map(lambda target, new: target.copy_(new), params, new_params)
    return state


def adam_update_eager(
    config: AdamConfig,
    grads: PyTree,
    state: AdamState,
    params: PyTree,
    lr: LearningRate | None = None,
) -> tuple[PyTree, AdamState]:
    """:func:`adam_update` for one model outside ``torch.func`` transforms: the step count is
    read and the bias corrections are Python numbers, exactly as ``torch.optim.Adam`` forms
    them, which saves a dozen small tensor operations per step (reading the count is a host
    synchronisation on accelerators). Not ``vmap``-able."""
    step = int(state.step) + 1
    step_size = _number("lr", config.lr if lr is None else float(lr)) / (1 - config.beta1**step)
    bias_correction2_sqrt = (1 - config.beta2**step) ** 0.5

    def new_leaf(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        denom = (v.sqrt() / bias_correction2_sqrt).add_(config.epsilon)
        return torch.addcdiv(p, m, denom, value=-step_size)

    return _adam_leaves(config, grads, state, params, state.step + 1, new_leaf)


def _fused_adam(config: AdamConfig, leaves: list[list[torch.Tensor]], steps, lr) -> None:
    """torch's fused Adam kernel on ``leaves`` (parameters, gradients, first and second
    moments: four lists of tensors), each tensor with its step count in ``steps``."""
    torch._fused_adam_(
        *leaves,
        [],
        steps,
        lr=_number("lr", lr),
        beta1=config.beta1,
        beta2=config.beta2,
        weight_decay=config.weight_decay,
        eps=config.epsilon,
        amsgrad=False,
        maximize=False,
    )


def adam_update_fused(
    config: AdamConfig,
    grads: PyTree,
    state: AdamState,
    params: PyTree,
    lr: LearningRate | None = None,
) -> tuple[PyTree, AdamState]:
    """:func:`adam_update_eager` that writes the new parameters, moments and step count into
    ``params``, ``state.mu`` / ``state.nu`` and ``state.step`` (tensors the caller owns) with
    torch's fused Adam kernel: one operation for all leaves instead of seven per leaf, the
    numbers of ``torch.optim.Adam(fused=True)`` (the unfused form's to round-off). Returns
    ``(params, state)``, both updated. Not ``vmap``-able; CPU and CUDA tensors."""
    _, *leaves = _adam_leaf_lists(grads, state, params)
    state.step.add_(1)  # the kernel reads the (integer) count as torch's float one
    _fused_adam(
        config, leaves, [state.step] * len(leaves[0]), config.lr if lr is None else float(lr)
    )
    return params, state


def adam_update_members_fused(
    config: AdamConfig,
    grads: PyTree,
    state: AdamState,
    params: PyTree,
    lrs: torch.Tensor | Sequence[float],
) -> tuple[PyTree, AdamState]:
    """:func:`adam_update_fused` of ``W`` committee members stacked along the leading axis
    of every leaf (state included: ``state.step`` ``[W]``), member ``i`` with learning rate
    ``lrs[i]``: one fused call per group of members sharing a learning rate, on their rows
    (parameters, moments and counts updated in place, as there). Each member's numbers are
    those of :func:`adam_update_fused` on its own rows."""
    _, *leaves = _adam_leaf_lists(grads, state, params)
    rows = [[leaf.unbind(0) for leaf in kind] for kind in leaves]  # [kind][leaf][member]
    state.step.add_(1)
    member_steps = state.step.unbind(0)
    groups: dict[float, list[int]] = {}
    for member, lr in enumerate(lrs.tolist() if isinstance(lrs, torch.Tensor) else lrs):
        groups.setdefault(float(lr), []).append(member)
    for lr, members in groups.items():
        chosen = [[leaf[i] for i in members for leaf in kind] for kind in rows]
        steps = [member_steps[i] for i in members for _ in leaves[0]]
        _fused_adam(config, chosen, steps, lr)
    return params, state
