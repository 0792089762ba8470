"""Fixed linear maps of per-atom rows as custom autograd Functions.

Force training differentiates ``∂E/∂r = J(∂E/∂G)`` with respect to the network parameters,
where ``J`` is a fixed linear map (the descriptor's position derivatives at the training
positions). :func:`linear_pair` turns a plain map and its transpose into Functions whose
backward is each other (any order of differentiation) and whose ``vmap`` rule keeps committee
members that share the map's data inside the rows, so one product serves all members. Under
``torch.compile`` the plain map runs instead, differentiated by the compiler like any torch
code (dynamo does not trace these Functions).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

PlainMap = Callable[..., torch.Tensor]
"""``plain(layout, x, *fields)``: ``x`` ``[..., n, k]`` with any leading member dims."""


def members_inner(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``[..., n, k]`` → ``[n, M, k]`` (leading dims flattened into ``M``), and those dims."""
    lead = x.shape[:-2]
    return x.reshape(-1, *x.shape[-2:]).movedim(0, 1).contiguous(), lead


def members_outer(x: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`members_inner`."""
    return x.movedim(1, 0).reshape(*lead, *x.shape[::2])


def linear_pair(forward_map: PlainMap, transpose_map: PlainMap) -> PlainMap:
    """The linear map ``forward_map(layout, x, *fields)`` as a custom Function whose backward
    is the Function of ``transpose_map`` and back, so any order of differentiation works.
    Their ``vmap`` rule keeps committee members that share the map's data inside the rows
    (one product for all members). Returns ``apply(layout, x, *fields)``: the Function, or
    ``forward_map`` itself while ``torch.compile`` traces."""

    def make(plain, name):
        class Map(torch.autograd.Function):
            @staticmethod
            def forward(layout, x, *fields):
                return plain(layout, x, *fields)

            @staticmethod
            def setup_context(ctx, inputs, output) -> None:
                ctx.layout = inputs[0]
                ctx.save_for_backward(*inputs[2:])

            @staticmethod
            def backward(ctx, grad_out):
                fields = ctx.saved_tensors
                other = maps["transpose" if plain is forward_map else "forward"]
                return None, other.apply(ctx.layout, grad_out, *fields), *([None] * len(fields))

            @staticmethod
            def vmap(info, in_dims, layout, x, *fields):
                return _members_rule(Map, plain, in_dims, layout, x, fields)

        Map.__name__ = Map.__qualname__ = name
        return Map

    maps = {
        "forward": make(forward_map, f"_{forward_map.__name__}"),
        "transpose": make(transpose_map, f"_{transpose_map.__name__}"),
    }

    def apply(layout: object, x: torch.Tensor, *fields: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return forward_map(layout, x, *fields)
        return maps["forward"].apply(layout, x, *fields)

    return apply


def _members_rule(function, plain, in_dims, layout, x, fields):
    """vmap rule of both maps: with shared map data the member axis joins the leading member
    dims; with per-member data (stacked batches) the plain map runs per member."""
    x_dim, field_dims = in_dims[1], in_dims[2:]
    if all(dim is None for dim in field_dims):
        return function.apply(layout, x.movedim(x_dim, 0), *fields), 0
    size = next(f.shape[d] for f, d in zip(fields, field_dims) if d is not None)
    x = x.unsqueeze(0).expand(size, *x.shape) if x_dim is None else x.movedim(x_dim, 0)
    fields = [f if d is None else f.movedim(d, 0) for f, d in zip(fields, field_dims)]
    members = [
        plain(layout, x[m], *(f if d is None else f[m] for f, d in zip(fields, field_dims)))
        for m in range(size)
    ]  # one plain map per member: unbatched indices keep the fast gather/scatter kernels
    return torch.stack(members), 0


def csr_matrix(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """A sparse CSR matrix of trusted index data (invariants not checked: the callers build
    them), for products ``matrix @ dense``."""
    with warnings.catch_warnings():  # "CSR support is in beta": plain products only here
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
