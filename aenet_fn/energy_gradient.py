"""The energy-only training loss and its gradient, derived by hand for speed.

An energy-only training step on small networks is bound by per-operation overhead, not by
arithmetic: the autograd engine records and replays some 60 nodes for two species' networks.
:func:`energy_loss_gradient` computes the same loss as :func:`aenet_fn.train.batch_loss` (per-atom
energy RMSE, times ``1 − α``) and its gradient with respect to the flat network parameters by
explicit back-propagation through each species' MLP, with no graph. It is checked against
``torch.autograd`` in the tests; force training and committees (``vmap``) keep autodiff.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

from aenet_fn.featurized import MiniBatch
from aenet_fn.loss import energy_error_per_atom
from aenet_fn.network import _MTANH_A, _MTANH_B, _TWIST_C, ACTIVATIONS
from aenet_fn.potential import Model, sum_by_structure

# d activation / d input, from the input ``z`` and the output ``a = act(z)``
_SLOPES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor | float]] = {
    "linear": lambda z, a: 1.0,
    "tanh": lambda z, a: 1.0 - a * a,
    "sigmoid": lambda z, a: a * (1.0 - a),
    "mtanh": lambda z, a: _MTANH_B * (_MTANH_A - a * a / _MTANH_A),
    "twist": lambda z, a: _MTANH_B * (_MTANH_A - (a - _TWIST_C * z) ** 2 / _MTANH_A) + _TWIST_C,
    "relu": lambda z, a: (z > 0).to(z.dtype),
    "silu": lambda z, a: torch.sigmoid(z) * (1.0 + z * (1.0 - torch.sigmoid(z))),
}
assert _SLOPES.keys() == ACTIVATIONS.keys(), "every activation needs its slope"


def _network_gradient(
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...],
    activations: tuple[str, ...],
    inputs: torch.Tensor,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], list[torch.Tensor]]]:
    """One species' MLP on ``inputs`` ``[n, F]``: its outputs ``[n]`` and a function mapping
    ``∂L/∂outputs`` ``[n]`` to the gradient pieces ``[dW₁, db₁, ..., dW_out, db_out]``."""
    values, preactivations = [inputs], []
    for (weight, bias), name in zip(layers[:-1], activations):
        z = torch.addmm(bias, values[-1], weight)
        preactivations.append(z)
        values.append(ACTIVATIONS[name](z))
    out_weight, out_bias = layers[-1]
    outputs = torch.addmv(out_bias, values[-1], out_weight.squeeze(-1))

    def backward(output_grad: torch.Tensor) -> list[torch.Tensor]:
        grads: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(layers)  # type: ignore[list-item]
        grads[-1] = (torch.mv(values[-1].T, output_grad), output_grad.sum().reshape(1))
        delta = output_grad[:, None] * out_weight.squeeze(-1)
        for k in reversed(range(len(activations))):
            delta = delta * _SLOPES[activations[k]](preactivations[k], values[k + 1])
            grads[k] = (values[k].T @ delta, delta.sum(0))
            if k > 0:
                delta = delta @ layers[k][0].T
        return [piece for pair in grads for piece in pair]

    return outputs, backward


def energy_loss_gradient(
    model: Model, values: torch.Tensor, batch: MiniBatch, force_weight: float
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Gradient ``[P]`` of the energy-only loss ``(1 − α)·RMSE_E`` of ``batch`` with respect
    to the network parameters ``values`` ``[P]``, with the auxiliary output of
    :func:`aenet_fn.train.batch_loss`: per-atom energy errors ``[b]`` (eV/atom, before the step)
    and zero force differences ``[n, 3]``. ``batch`` must have its atoms in species blocks
    (as :func:`~aenet_fn.featurized.take_structures` builds them) and carry no force
    supervision."""
    if batch.local is not None:
        raise ValueError("energy_loss_gradient: the batch supervises forces; use batch_loss")
    network = attrs.evolve(model.network, values=values)
    norm = model.normalization
    normalized = norm.normalize_features(batch.features, batch.species_index)
    chunks = torch.split(normalized, list(batch.species_blocks))
    passes = [
        _network_gradient(layers, activations, x)
        for layers, activations, x in zip(network.layers(), network.activations, chunks)
    ]
    outputs = torch.cat([out for out, _ in passes])
    atomic = outputs / norm.energy_scaling + norm.energy_shift
    atomic = atomic + norm.atomic_energies[batch.species_index]
    energies = sum_by_structure(atomic, batch.structure_index, batch.n_structures)
    errors = energy_error_per_atom(energies, batch.energies, batch.n_atoms)
    mean_square = (errors * errors).mean()
    tiny = torch.finfo(errors.dtype).tiny
    rmse = torch.sqrt(mean_square.clamp_min(tiny))
    # d[(1 − α) rmse]/d errors, zero where the clamp is active (as autograd's clamp_min)
    scale = (1.0 - force_weight) * (mean_square >= tiny).to(errors.dtype) / (rmse * errors.numel())
    energy_grad = scale * errors / batch.n_atoms.to(errors.dtype)
    output_grad = energy_grad[batch.structure_index] / norm.energy_scaling
    output_grads = torch.split(output_grad, list(batch.species_blocks))
    pieces = [piece for (_, backward), g in zip(passes, output_grads) for piece in backward(g)]
    gradient = torch.cat([piece.reshape(-1) for piece in pieces])
    return gradient, (errors, batch.forces.new_zeros(batch.forces.shape[0], 3))
