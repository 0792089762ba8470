"""Atomic neural networks: one small MLP per species, as pure functions over a record.

An architecture maps each species to its hidden layers, e.g.
``{"Ti": [(10, "tanh"), (10, "tanh")], "O": [(10, "tanh"), (10, "tanh")]}``; every network ends
in a linear output node with bias. :class:`NetworkParams` holds the weights (pytree children) and
the activation names (static), so ``torch.func.vmap`` over stacked parameters evaluates a whole
committee at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import attrs
import torch

from aenet_fn.core.records import pytree_record, static_field

_MTANH_A = 1.7159
_MTANH_B = 0.666666666666667  # ænet's Fortran constant (2/3 to 15 digits)
_TWIST_C = 0.1

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda x: x,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "mtanh": lambda x: _MTANH_A * torch.tanh(_MTANH_B * x),
    "twist": lambda x: _MTANH_A * torch.tanh(_MTANH_B * x) + _TWIST_C * x,
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
}
"""Activation functions by name. ``linear``, ``tanh``, ``sigmoid``, ``mtanh``
(``1.7159 tanh(2x/3)``) and ``twist`` (``mtanh(x) + 0.1 x``) exist in ænet's Fortran code too."""

Architecture = Mapping[str, Sequence[tuple[int, str]]]


def check_architecture(arch: Architecture, species: Sequence[str]) -> dict[str, tuple]:
    """Validate ``arch`` for ``species``: every species present with a non-empty list of
    ``(nodes >= 1, activation)`` layers, activations known (case-insensitive). Returns the
    normalised architecture (lower-case names, tuples) restricted to ``species``."""
    if not isinstance(arch, Mapping):
        raise ValueError(f"architecture must map species to layer lists, got {type(arch).__name__}")
    missing = [s for s in species if s not in arch]
    if missing:
        raise ValueError(f"architecture has no network for species {missing}")
    normalised = {}
    for symbol in species:
        layers = arch[symbol]
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
            raise ValueError(
                f"architecture[{symbol!r}] must be a non-empty list of (nodes, activation)"
            )
        checked = []
        for k, layer in enumerate(layers):
            if not isinstance(layer, Sequence) or len(layer) != 2:
                raise ValueError(
                    f"architecture[{symbol!r}][{k}] = {layer!r} is not (nodes, activation)"
                )
            nodes, activation = layer
            if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
                raise ValueError(
                    f"architecture[{symbol!r}][{k}]: nodes must be an integer >= 1, got {nodes!r}"
                )
            name = str(activation).lower()
            if name not in ACTIVATIONS:
                raise ValueError(
                    f"architecture[{symbol!r}][{k}]: unknown activation {activation!r}; "
                    f"choose from {sorted(ACTIVATIONS)}"
                )
            checked.append((nodes, name))
        normalised[symbol] = tuple(checked)
    return normalised


@pytree_record
@attrs.frozen(eq=False)
class NetworkParams:
    """Weights of one MLP per species, stored as one flat vector.

    Keeping every weight and bias in a single tensor makes optimiser updates a handful of
    element-wise ops and committee stacking a plain ``torch.stack``; :meth:`layers` gives the
    per-layer views.

    Attributes:
        values: ``[P]`` all weights and biases (species by species, layer by layer, weight
            ``[in, out]`` row-major then bias ``[out]``).
        sizes: per species the layer widths ``(n_features, h1, ..., hK, 1)``.
        activations: per species the activation name of each hidden layer.
        species: the species the networks belong to, in descriptor order.
    """

    values: torch.Tensor
    sizes: tuple[tuple[int, ...], ...] = static_field()
    activations: tuple[tuple[str, ...], ...] = static_field()
    species: tuple[str, ...] = static_field()

    def layers(self) -> tuple[tuple[tuple[torch.Tensor, torch.Tensor], ...], ...]:
        """Per species, the ``(weight [in, out], bias [out])`` views of each layer."""
        shapes = [
            shape
            for sizes in self.sizes
            for fan_in, fan_out in zip(sizes[:-1], sizes[1:])
            for shape in ((fan_in, fan_out), (fan_out,))
        ]
        pieces = torch.split(self.values, [math.prod(shape) for shape in shapes], dim=-1)
        views = iter(p.unflatten(-1, shape) for p, shape in zip(pieces, shapes))
        return tuple(
            tuple((next(views), next(views)) for _ in range(len(sizes) - 1)) for sizes in self.sizes
        )

    @property
    def n_inputs(self) -> int:
        """Number of input features."""
        return self.sizes[0][0]

    def architecture(self) -> dict[str, list[tuple[int, str]]]:
        """The architecture these parameters were built from."""
        return {
            s: list(zip(sizes[1:-1], acts))
            for s, sizes, acts in zip(self.species, self.sizes, self.activations)
        }


def weight_mask(network: NetworkParams) -> torch.Tensor:
    """``[P]`` bool, True at the weights of ``network.values`` and False at the biases (on the
    values' device), e.g. the mask of :func:`~aenet_fn.core.optim.decoupled_weight_decay`."""
    counts = [
        count
        for sizes in network.sizes
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:])
        for count in (fan_in * fan_out, fan_out)  # a layer's weights, then its biases
    ]
    kinds = torch.tensor([True, False] * (len(counts) // 2))
    return torch.repeat_interleave(kinds, torch.tensor(counts)).to(network.values.device)


def parameter_count(sizes: Sequence[int]) -> int:
    """Number of weights and biases of one network with layer widths ``sizes``."""
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))


def network_size(arch: Architecture, species: Sequence[str], n_features: int) -> int:
    """Number of weights and biases of the networks of ``arch``."""
    arch = check_architecture(arch, species)
    return sum(
        parameter_count([n_features, *(nodes for nodes, _ in arch[symbol]), 1])
        for symbol in species
    )


def init_network(
    arch: Architecture,
    species: Sequence[str],
    n_features: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> NetworkParams:
    """Fresh network parameters, reproducible from ``generator``.

    Weights and biases of a layer with ``fan_in`` inputs are drawn from ``U(-1/√fan_in,
    1/√fan_in)`` (the ``torch.nn.Linear`` default the reference uses), layer by layer, species
    by species in ``species`` order.
    """
    arch = check_architecture(arch, species)
    if n_features < 1:
        raise ValueError(f"init_network: n_features must be >= 1, got {n_features}")
    pieces, all_sizes = [], []
    for symbol in species:
        sizes = (n_features, *(nodes for nodes, _ in arch[symbol]), 1)
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            draw = torch.rand(
                fan_out * fan_in + fan_out,
                generator=generator,
                dtype=torch.float64,
                device=generator.device,  # drawn where the generator is, then moved
            )
            pieces.append((2 * draw - 1) / math.sqrt(fan_in))
        all_sizes.append(sizes)
    return NetworkParams(
        values=torch.cat(pieces).to(dtype=dtype, device=device),
        sizes=tuple(all_sizes),
        activations=tuple(tuple(name for _, name in arch[s]) for s in species),
        species=tuple(species),
    )


def mlp(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]], activations: Sequence[str], x: torch.Tensor
) -> torch.Tensor:
    """One species' network on inputs ``x`` ``[n, F]`` → ``[n]``. Layers of stacked members
    (weights ``[M, in, out]``, biases ``[M, out]``) give ``[M, n]`` (``x``: ``[n, F]`` or
    ``[M, n, F]``)."""
    for (weight, bias), name in zip(layers[:-1], activations):
        x = ACTIVATIONS[name](x @ weight + bias.unsqueeze(-2))
    weight, bias = layers[-1]
    if weight.ndim > 2:  # stacked members
        return (x @ weight).squeeze(-1) + bias
    return x @ weight.squeeze(-1) + bias


def atomic_outputs(
    network: NetworkParams,
    features: torch.Tensor,
    species_index: torch.Tensor,
    species_blocks: Sequence[int] | None = None,
) -> torch.Tensor:
    """Network output of every atom, ``[N]``: atom ``a`` goes through the network of species
    ``species_index[a]`` (an index into ``network.species``); the output keeps the input order.
    With stacked members' values ``[M, P]``: ``[M, N]``.

    With ``species_blocks`` (atoms sorted by species, that many of each) every network runs on
    a static slice, with no data-dependent shapes (``vmap``-able over batches); otherwise atoms
    are grouped with index tensors."""
    layers, activations = network.layers(), network.activations
    if species_blocks is not None:
        chunks = torch.split(features, list(species_blocks), dim=-2)
        outputs = [mlp(w, a, x) for w, a, x in zip(layers, activations, chunks)]
        return torch.cat(outputs, dim=-1)
    groups = [torch.nonzero(species_index == p).flatten() for p in range(len(network.species))]
    order = torch.cat(groups)
    inverse = torch.empty_like(order).scatter_(
        0, order, torch.arange(order.shape[0], device=order.device)
    )
    outputs = [mlp(w, a, features[atoms]) for w, a, atoms in zip(layers, activations, groups)]
    return torch.cat(outputs, dim=-1)[..., inverse]
