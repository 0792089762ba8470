"""The records and the ``torch.func`` route under ``torch.compile``: whole functions trace as
one graph (``fullgraph=True`` fails on any graph break) and compute the eager numbers.

The ``eager`` backend runs dynamo's graph as it is, ``aot_eager`` also AOT autograd (what
``inductor`` compiles), both without generating kernels, so the tests stay quick;
``benchmarks/compile.py`` measures ``inductor``.
"""

from __future__ import annotations

import attrs
import pytest
import torch
from torch.utils._pytree import tree_leaves

import aenet_fn as af
from aenet_fn.core.batch import collate
from aenet_fn.core.descriptor import build_graph
from aenet_fn.core.records import compilable_init, pytree_record
from aenet_fn.driver.loader import take_batch
from aenet_fn.examples import TIO2_POTENTIAL, TIO2_STRUCTURES


def _compiled(function, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(function, backend=backend, fullgraph=True)


def _as_float64(value):
    return torch.as_tensor(value, dtype=torch.float64)


@pytree_record
@attrs.frozen(eq=False)
class _Sample:
    value: torch.Tensor = attrs.field(converter=_as_float64)
    scale: torch.Tensor = attrs.field(factory=lambda: torch.ones(()))
    offset: torch.Tensor = attrs.field(
        default=attrs.Factory(lambda self: 2 * self.scale, takes_self=True)
    )
    _label: str = "sample"


@compilable_init
@attrs.frozen
class _Plain:
    first: torch.Tensor
    second: int = 3


def test_records_built_inside_a_compiled_function_equal_eager_ones():
    """Positional and keyword arguments, private names by alias, defaults, factories (also
    those taking ``self``) and converters, as attrs' own constructor applies them."""

    def build(x):
        return (
            _Sample(x),
            _Sample(x.to(torch.float32), x + 1, label="other"),
            _Sample(value=x, offset=x * 3),
            _Plain(x, second=4),
            _Plain(first=x),
        )

    x = torch.arange(3, dtype=torch.float32)
    eager, traced = build(x), _compiled(build, backend="eager")(x)
    for expected, found in zip(eager, traced, strict=True):
        assert type(found) is type(expected)
        for field in attrs.fields(type(expected)):
            a, b = getattr(expected, field.name), getattr(found, field.name)
            if isinstance(a, torch.Tensor):
                assert a.dtype == b.dtype and torch.equal(a, b), field.name
            else:
                assert a == b, field.name
    with pytest.raises(AttributeError):
        traced[0].value = x  # still frozen


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda x: _Plain(second=x.shape[0]), "missing argument 'first'"),
        (lambda x: _Plain(x, third=x), "no arguments \\['third'\\]"),
        (lambda x: _Plain(x, 1, 2), "no arguments"),
    ],
)
def test_bad_arguments_are_errors_inside_compiled_code_too(build, message):
    with pytest.raises(Exception, match=message):
        _compiled(build, backend="eager")(torch.ones(2))


@pytest.fixture(scope="module")
def tio2():
    model = af.read_aenet_ascii(TIO2_POTENTIAL)
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:2])
    return model, collate(structures)


def test_energy_forces_and_stress_compile_to_one_graph(tio2):
    model, batch = tio2
    graph = build_graph(model.descriptor, batch)

    def evaluate(model, batch, graph):
        return af.energy_forces_stress(model, batch, graph, compute_stress=True)

    compiled = _compiled(evaluate, backend="eager")(model, batch, graph)  # dynamo's graph
    eager = evaluate(model, batch, graph)
    torch.testing.assert_close(compiled.energy, eager.energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(compiled.forces, eager.forces, rtol=0, atol=1e-12)
    torch.testing.assert_close(compiled.stress, eager.stress, rtol=0, atol=1e-14)


def test_a_force_training_step_compiles_to_one_graph():
    """The ``torch.func`` route's step with stored local derivatives (their linear map is a
    custom autograd Function in eager mode, plain differentiable code under the compiler)."""
    params = af.ChebyshevParams(["Ti", "O"], 4, 5.0, 2, 3.5, min_cutoff=0.5)
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:6])
    train = af.featurize_structures(params, structures, with_derivatives=True)
    model = af.init_model(params, {"Ti": [(5, "tanh")], "O": [(5, "tanh")]}, train, seed=1)
    config = af.TrainConfig(batch_size=4, force_weight=0.3, route="func")
    state = af.init_train_state(model, train, config)
    batch = take_batch(train, torch.tensor([4, 0, 2, 5]), torch.ones(6, dtype=torch.bool))

    (eager, eager_residuals), (compiled, residuals) = (
        step(state, batch, config) for step in (af.train_step, _compiled(af.train_step))
    )
    assert not torch.equal(eager.model.network.values, model.network.values)
    torch.testing.assert_close(
        compiled.model.network.values, eager.model.network.values, rtol=1e-12, atol=1e-14
    )
    for found, expected in zip(tree_leaves(residuals), tree_leaves(eager_residuals), strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-14)
