"""Frozen ``attrs`` records that ``torch.func`` transforms can see through.

A record is an ``attrs`` class with ``frozen=True``. Fields created with :func:`static_field`
are hyper-parameters (ints, strings, tuples); every other field is a pytree child (a tensor, a
tuple of tensors, another record). :func:`pytree_record` registers the class with
``torch.utils._pytree`` so that ``torch.func.vmap``, ``grad``, ``functional_call`` and
``tree_map`` traverse the children and carry the static fields along unchanged. It also
gives the class a constructor that ``torch.compile`` can trace (:func:`compilable_init`).
"""

from __future__ import annotations

from typing import Any, TypeVar

import attrs
import torch
import torch.utils._pytree as pytree

_STATIC = "aenet_fn_static"
_HOST = "aenet_fn_host"
T = TypeVar("T")

RECORD_TYPES: dict[str, type] = {}
"""Every record class by its saved name (:func:`saved_name`): the only classes a saved file
may name."""


def saved_name(cls: type) -> str:
    """The name files record for ``cls``: ``aenet_fn.<class name>``, whatever module defines
    it, so that moving a class between modules changes no saved file."""
    return f"aenet_fn.{cls.__qualname__}"


def static_field(**kwargs: Any) -> Any:
    """An ``attrs`` field that is not a pytree child (hyper-parameter, name, shape)."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata[_STATIC] = True
    return attrs.field(metadata=metadata, **kwargs)


def host_field(**kwargs: Any) -> Any:
    """An ``attrs`` field holding a tensor that lives on the host whatever the record's device
    (e.g. a CPU ``torch.Generator``'s state): :func:`to` leaves it where it is."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata[_HOST] = True
    return attrs.field(metadata=metadata, **kwargs)


def dynamic_fields(cls: type) -> tuple[str, ...]:
    """Names of the pytree-child fields of a record class."""
    return tuple(f.name for f in attrs.fields(cls) if not f.metadata.get(_STATIC))


def _rebuild(cls: type, values: dict[str, Any]) -> Any:
    """Build an instance without running validators: under ``vmap`` the leaves are batched
    tensors whose apparent shapes differ from the validated ones."""
    obj = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(obj, name, value)
    return obj


def compilable_init(cls: type[T]) -> type[T]:
    """Let ``torch.compile`` build instances of the ``attrs`` class ``cls`` inside a compiled
    function (class decorator; :func:`pytree_record` applies it).

    Dynamo cannot trace the ``__init__`` that attrs generates (a frozen class sets its fields
    through ``object.__setattr__.__get__``, and the method's globals are not its module's).
    Outside compilation the class keeps that constructor unchanged; while compiling, fields are
    set with ``object.__setattr__`` after the same defaults and converters (e.g. energies to
    float64), for classes without ``init=False`` or keyword-only fields. Validators and
    ``__attrs_post_init__`` are skipped there, as when ``vmap`` rebuilds a record: the inputs
    of a compiled function were built, and checked, outside it."""
    attrs_init = cls.__init__
    plans = []
    for field in attrs.fields(cls):
        if field.init:
            factory = field.default if isinstance(field.default, attrs.Factory) else None
            plans.append(
                (
                    field.name,
                    field.alias,
                    None if factory else field.default,
                    factory and factory.factory,
                    factory and factory.takes_self,
                    field.converter,
                )
            )
    plans = tuple(plans)  # plain values: dynamo cannot wrap attrs' Attribute and Factory
    aliases = frozenset(plan[1] for plan in plans)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if not torch.compiler.is_compiling():
            attrs_init(self, *args, **kwargs)
            return
        unknown = sorted(set(kwargs) - aliases)
        if len(args) > len(plans) or unknown:
            raise TypeError(f"{cls.__qualname__}() takes no arguments {unknown or args}")
        for position, (name, alias, default, factory, takes_self, converter) in enumerate(plans):
            if position < len(args):
                value = args[position]
            elif alias in kwargs:
                value = kwargs[alias]
            elif factory is not None:
                value = factory(self) if takes_self else factory()
            elif default is attrs.NOTHING:
                raise TypeError(f"{cls.__qualname__}() missing argument {alias!r}")
            else:
                value = default
            object.__setattr__(self, name, value if converter is None else converter(value))

    __init__.__doc__ = attrs_init.__doc__
    cls.__init__ = __init__
    return cls


def serializable(cls: type[T]) -> type[T]:
    """Allow a record class to be saved and loaded by its :func:`saved_name` (see
    ``aenet_fn.core.serialization``); two classes may not share one."""
    name = saved_name(cls)
    known = RECORD_TYPES.get(name)
    if known is not None and known is not cls:
        raise TypeError(f"{name} names both {known.__module__} and {cls.__module__} records")
    RECORD_TYPES[name] = cls
    return cls


def pytree_record(cls: type[T]) -> type[T]:
    """Register a frozen ``attrs`` class as a pytree node and as :func:`serializable` (class
    decorator, applied above ``attrs.frozen``)."""
    dynamic = dynamic_fields(cls)
    static = tuple(f.name for f in attrs.fields(cls) if f.metadata.get(_STATIC))

    def flatten(obj: Any) -> tuple[list[Any], tuple[Any, ...]]:
        # an optional field holding None is no child (so vmap and tree_map never meet None)
        present = tuple(n for n in dynamic if getattr(obj, n) is not None)
        statics = tuple(getattr(obj, n) for n in static)
        return [getattr(obj, n) for n in present], (present, statics)

    def unflatten(children: Any, context: tuple[Any, ...]) -> Any:
        present, statics = context
        values = dict.fromkeys(dynamic)
        values.update(zip(present, children))
        return _rebuild(cls, {**values, **dict(zip(static, statics))})

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
        children, context = flatten(obj)
        return [(pytree.GetAttrKey(n), c) for n, c in zip(context[0], children)], context

    serializable(cls)
    compilable_init(cls)
    pytree.register_pytree_node(
        cls,
        flatten,
        unflatten,
        serialized_type_name=saved_name(cls),
        flatten_with_keys_fn=flatten_with_keys,
    )
    return cls


def tree_bytes(tree: Any) -> int:
    """Memory (bytes) of the tensors of the pytree ``tree`` (a record, or nested tuples, lists
    and dicts of them)."""
    return sum(
        leaf.numel() * leaf.element_size()
        for leaf in pytree.tree_leaves(tree)
        if isinstance(leaf, torch.Tensor)
    )


def replace(record: T, **changes: Any) -> T:
    """A copy of ``record`` with some fields changed (validators run again)."""
    return attrs.evolve(record, **changes)


def on_cpu(tree: Any) -> bool:
    """Whether every tensor of the pytree ``tree`` is on the CPU: where the CPU-only speed-ups
    (forms that read counts, rates or plans on the host) apply; elsewhere they would stall an
    accelerator and the pure forms run."""
    return all(leaf.device.type == "cpu" for leaf in pytree.tree_leaves(tree))


def to(tree: T, device: Any = None, dtype: Any = None) -> T:
    """``tree`` (a record, tensor, or tuple, list or dict of them, nested) with every tensor
    moved to ``device`` and every floating tensor cast to ``dtype`` (None: unchanged).
    Integer and boolean tensors keep their dtype; a record's host fields (:func:`host_field`,
    e.g. a training state's generator state) stay where they are. Records are rebuilt by their
    constructors, so their own conversions apply: energies stay float64 (the dtype policy of
    :mod:`aenet_fn.core.normalization`)."""
    if isinstance(tree, torch.Tensor):
        cast = dtype if dtype is not None and tree.is_floating_point() else None
        return tree.to(device=device, dtype=cast)
    if attrs.has(type(tree)):
        changes = {
            f.alias: to(getattr(tree, f.name), device, dtype)
            for f in attrs.fields(type(tree))
            if f.init and not f.metadata.get(_STATIC) and not f.metadata.get(_HOST)
        }
        return attrs.evolve(tree, **changes)
    if isinstance(tree, (tuple, list)):
        return type(tree)(to(item, device, dtype) for item in tree)
    if isinstance(tree, dict):
        return {key: to(value, device, dtype) for key, value in tree.items()}
    return tree
