"""Check that a step is GPU-friendly, on any machine: it never reads device data on the host,
never makes a tensor whose shape depends on its data, and never mixes devices.

On a GPU, each of these stalls the host until the device has caught up (or fails outright), so
a training or prediction step that does one per batch runs at a fraction of the device's speed.
On the CPU they cost nothing and go unnoticed; these checks find them without a GPU, so that a
CPU-only CI can keep a step GPU-ready::

    from aenet_fn.testing.devices import forbid_host_sync

    with forbid_host_sync(expected_device=positions.device):
        energies, forces = step(model, positions)  # raises HostSyncError at the first offence

    result, offences = count_host_syncs(step, model, positions, expected_device="cpu")

What is caught (a :class:`torch.utils._python_dispatch.TorchDispatchMode` sees every ATen
operation of the block, backward passes and ``torch.func`` transforms included, and a
:class:`torch.overrides.TorchFunctionMode` sees the calls of the ``torch`` API):

- **Host reads** (:data:`HOST_READ_OPS`): ``aten._local_scalar_dense`` (what ``.item()``,
  ``float(t)``, ``int(t)``, ``bool(t)``, ``if t:``, ``range(t)``, ``x in t`` and indexing a
  list with a tensor call), ``aten.is_nonzero``, ``aten.equal``, ``aten.allclose``,
  ``aten._linalg_check_errors`` (the error check of ``torch.linalg.inv``, ``cholesky``,
  ``solve``...), ``aten.histc`` with ``min == max`` (it reads the data's range), any op called
  with ``check_errors=True``, and copies from another device to the CPU (``.cpu()``,
  ``.to("cpu")``). Reads that do not go through dispatch are caught at the API level
  (:data:`HOST_READ_FUNCTIONS`): ``Tensor.tolist``, ``Tensor.numpy``, ``np.asarray(t)``
  (``Tensor.__array__``), ``repr(t)``/``print(t)`` and ``f"{t}"``.
- **Data-dependent shapes** (:data:`DYNAMIC_SHAPE_OPS`): ``aten.nonzero`` (``torch.nonzero``,
  ``torch.argwhere``, one-argument ``torch.where``), ``aten.masked_select``, every
  ``aten.unique*`` (``torch.unique``, ``unique_consecutive``), ``aten.bincount`` (its length
  is the largest value plus one, even with ``minlength``), ``aten.repeat_interleave`` with
  tensor repeats and no ``output_size``, boolean-mask indexing and assignment (``aten.index``,
  ``aten.index_put`` with a bool or uint8 index: ``x[mask]``, ``x[mask] = v``), and sparse
  coalescing.
- **Devices**: an op whose tensor arguments lie on two devices; with ``expected_device``, any
  tensor argument or result on another device, and any tensor created by a constructor
  (:data:`CONSTRUCTORS`: ``torch.arange``, ``zeros``, ``ones``, ``empty``, ``full``, ``rand*``,
  ``randperm``, ``linspace``, ``eye``, ``tensor``, ``as_tensor``...) called
  without ``device=``. The last rule is what lets a CPU-only CI check device placement: with
  every tensor on the CPU nothing mixes, but ``torch.arange(n)`` without a device is the line
  that puts a CPU tensor into a GPU step. Give ``expected_device="cpu"`` (or the inputs'
  device) to turn it on.

Zero-dimensional CPU tensors are treated as Python scalars, as torch does (they may mix with
tensors on any device, and constructors may make them without a device). A value read of a CPU
tensor is not a device sync; it is reported anyway unless ``expected_device`` names another
device, since on a CPU-only machine device data and host data cannot be told apart.

The offending operation is named with the first line of the caller outside torch and this
module (for a backward pass: the line that called ``backward`` or ``torch.func.grad``, or the
``backward`` of a custom ``torch.autograd.Function``).

Limits:

- The op lists cover the well-known host reads and dynamic shapes, not every ATen kernel that
  synchronises on some backend; ``torch.cuda.set_sync_debug_mode("error")`` on a real GPU
  remains the final word (it sees CUDA syncs, not dynamic shapes or device placement).
- ``torch.from_numpy``, ``torch.frombuffer`` and ``torch.utils.dlpack`` make CPU tensors that
  neither mode sees being made (such a tensor is caught once it mixes with tensors on another
  device, or meets ``expected_device``'s check on a machine where that is not the CPU);
  ``torch.tensor_split`` with tensor indices reads them on the host without an ATen op (they
  must be on the CPU already, so this is never itself a device sync).
- With every tensor on one device, a constructor given the device explicitly is trusted:
  ``torch.arange(n, device="cpu")`` cannot be told apart from ``device=x.device`` when ``x`` is
  on the CPU. Running the step on the ``meta`` device (inputs moved with ``.to("meta")``,
  ``expected_device="meta"``) makes hard-coded devices mix, at the price that nothing can be
  computed (value reads then fail in torch too, but this mode raises first and names them).
- Constructors called without a device are reported only while the default device is the CPU
  (``torch.set_default_device`` to an accelerator makes them land there) and only when called
  from outside torch (torch's own helpers are not the step's concern).
- Modes are thread-local: work in other threads or processes (DataLoader workers) is not seen.
  Not tried with ``torch.compile``. Written and tested on the CPU and the ``meta`` device; the
  device rules are meant for a real accelerator too but have not been run on one here.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READ = "host read"
DYNAMIC_SHAPE = "dynamic shape"
DEVICE = "device"

_VALUE_READ = "reads a tensor's value on the host"

HOST_READ_OPS: Mapping[str, str] = MappingProxyType(
    {
        "aten._local_scalar_dense": f"{_VALUE_READ}: .item(), float(t), int(t), bool(t), if t:",
        "aten.item": f"{_VALUE_READ}: .item()",
        "aten.is_nonzero": f"{_VALUE_READ}: bool(t), if t:",
        "aten.equal": f"{_VALUE_READ}: torch.equal returns a Python bool",
        "aten.allclose": f"{_VALUE_READ}: torch.allclose returns a Python bool",
        "aten._linalg_check_errors": f"{_VALUE_READ}: the error check of torch.linalg (use *_ex)",
        "aten.histc": f"{_VALUE_READ}: with min == max histc reads the data's range",
    }
)
"""ATen ops (overload packets) that read tensor values on the host: op → what it reads.
``aten.histc`` counts only with ``min == max``; any op called with ``check_errors=True`` and
copies from another device to the CPU count too."""

_SHAPE = "output shape depends on the data"
_NONZERO = f"{_SHAPE}: the number of nonzero elements"
_DISTINCT = f"{_SHAPE}: the number of distinct values"
_RUNS = f"{_SHAPE}: the number of runs of equal values"
_MASK_WRITE = "the number of written elements depends on the data: assigning through a bool mask"

DYNAMIC_SHAPE_OPS: Mapping[str, str] = MappingProxyType(
    {
        "aten.nonzero": _NONZERO,
        "aten.argwhere": _NONZERO,
        "aten.nonzero_numpy": _NONZERO,
        "aten.masked_select": f"{_SHAPE}: the number of selected elements",
        "aten._unique": _DISTINCT,
        "aten._unique2": _DISTINCT,
        "aten.unique_dim": _DISTINCT,
        "aten.unique_consecutive": _RUNS,
        "aten.unique_dim_consecutive": _RUNS,
        "aten.bincount": f"{_SHAPE}: the largest value plus one",
        "aten.repeat_interleave": f"{_SHAPE}: the sum of the repeats (give output_size)",
        "aten.index": f"{_SHAPE}: indexing with a bool mask",
        "aten.index_put": _MASK_WRITE,
        "aten.index_put_": _MASK_WRITE,
        "aten._index_put_impl_": _MASK_WRITE,
        "aten._coalesce": f"{_SHAPE}: the number of distinct sparse indices",
    }
)
"""ATen ops (overload packets) whose output shape depends on tensor values: op → why.
``aten.repeat_interleave`` counts only with tensor repeats and no ``output_size``; the index
ops only with a bool or uint8 index."""

HOST_READ_FUNCTIONS: Mapping[str, str] = MappingProxyType(
    {
        "Tensor.tolist": f"{_VALUE_READ}: .tolist()",
        "Tensor.numpy": f"{_VALUE_READ}: .numpy()",
        "Tensor.__array__": f"{_VALUE_READ}: np.asarray(t)",
        "Tensor.__repr__": f"{_VALUE_READ}: repr(t), str(t), print(t)",
        "Tensor.__format__": f"{_VALUE_READ}: f-string formatting",
    }
)
"""``torch`` API calls that read values on the host without an ATen op (caught by the
API-level mode): name → what it reads."""

CONSTRUCTORS: tuple[str, ...] = (
    "arange",
    "as_tensor",
    "asarray",
    "bartlett_window",
    "blackman_window",
    "empty",
    "empty_permuted",
    "empty_strided",
    "eye",
    "full",
    "hamming_window",
    "hann_window",
    "kaiser_window",
    "linspace",
    "logspace",
    "normal",
    "ones",
    "rand",
    "randint",
    "randn",
    "randperm",
    "range",
    "scalar_tensor",
    "tensor",
    "tril_indices",
    "triu_indices",
    "zeros",
)
"""``torch`` functions that create a tensor from no tensor: with ``expected_device`` given, each
must be called with ``device=`` (unless it makes a 0-dim tensor, or takes a tensor input)."""

_COPY_OPS = frozenset({"aten._to_copy", "aten.copy_", "aten._copy_from", "aten.copy"})
_INDEX_OPS = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)


class HostSyncError(AssertionError):
    """A step read device data on the host, made a data-dependent shape or mixed devices."""

    def __init__(self, violation: Violation) -> None:
        super().__init__(str(violation))
        self.violation = violation


@dataclass(frozen=True)
class Violation:
    """One offence: its ``kind`` (:data:`HOST_READ`, :data:`DYNAMIC_SHAPE` or :data:`DEVICE`),
    the ``op`` (``aten.nonzero``, ``torch.arange``, ``Tensor.tolist``), why it offends, and the
    caller's source ``file``, ``line``, ``function`` and ``code`` (empty when unknown)."""

    kind: str
    op: str
    reason: str
    file: str = ""
    line: int = 0
    function: str = ""
    code: str = ""

    @property
    def where(self) -> str:
        """``file:line`` of the caller (``"?"`` when unknown)."""
        return f"{self.file}:{self.line}" if self.file else "?"

    def __str__(self) -> str:
        text = f"{self.kind}: {self.op} ({self.reason}) at {self.where}"
        if self.function:
            text += f" in {self.function}"
        return text + (f": {self.code}" if self.code else "")


def _caller() -> tuple[str, int, str, str]:
    """``(file, line, function, code)`` of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path == _THIS_FILE or path.startswith(_TORCH_DIR):
            continue
        return _display_path(path), frame.lineno or 0, frame.name, (frame.line or "").strip()
    return "", 0, "", ""


def _called_from_torch() -> bool:
    """Whether the innermost frame outside this module is in torch itself."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path != _THIS_FILE:
            return path.startswith(_TORCH_DIR)
    return False


def _display_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # pragma: no cover - another drive on Windows
        return path
    return path if relative.startswith("..") else relative


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``value`` (nested lists, tuples and dicts, as in ATen op arguments)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _is_scalar(tensor: torch.Tensor) -> bool:
    """A 0-dim CPU tensor: torch lets it mix with tensors on any device, like a number."""
    return tensor.device.type == "cpu" and tensor.dim() == 0


def _on(device: torch.device, expected: torch.device) -> bool:
    """Whether ``device`` is ``expected`` (``"cuda"`` matches any CUDA index)."""
    return device.type == expected.type and (
        expected.index is None or device.index == expected.index
    )


def _mask_index(indices: Any) -> bool:
    """Whether an ``aten.index``/``index_put`` index list holds a bool or uint8 tensor."""
    return any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(indices))


class _Checker:
    """The state shared by the dispatch-level and API-level modes of one block."""

    def __init__(
        self,
        expected_device: torch.device | str | None,
        raise_errors: bool,
        allow: Iterable[str],
        host_work: bool = False,
    ) -> None:
        self.expected = None if expected_device is None else torch.device(expected_device)
        self.raise_errors = raise_errors
        self.allow = frozenset(allow)
        self.host_work = host_work
        self.violations: list[Violation] = []
        self.quiet = 0  # > 0: inside an API call already reported, its ATen ops are not
        self.quiet_devices = 0  # > 0: inside a constructor already checked for its device

    def offend(self, kind: str, op: str, reason: str) -> None:
        if op in self.allow:
            return
        violation = Violation(kind, op, reason, *_caller())
        if self.raise_errors:
            raise HostSyncError(violation)
        self.violations.append(violation)

    def host_only(self, tensors: list[torch.Tensor]) -> bool:
        """Whether an op on ``tensors`` is host work the block allows: every tensor on the
        CPU while the step's device is another (``host_work``)."""
        expected = self.expected
        if not self.host_work or expected is None or expected.type == "cpu":
            return False
        return all(t.device.type == "cpu" for t in tensors)

    def read_matters(self, tensor: torch.Tensor) -> bool:
        """Whether reading ``tensor`` on the host counts: it is not on the CPU, or the step's
        device is unknown or the CPU (device and host data cannot be told apart there)."""
        expected = self.expected
        return tensor.device.type != "cpu" or expected is None or expected.type == "cpu"


def _packet(func: Any) -> str:
    """``aten.nonzero`` for ``aten.nonzero.default``."""
    return f"{func.namespace}.{func.__name__.split('.')[0]}"


class _DispatchMode(TorchDispatchMode):
    """Sees every ATen op: value reads, dynamic shapes and device placement."""

    def __init__(self, checker: _Checker) -> None:
        super().__init__()
        self.checker = checker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        checker = self.checker
        if not checker.quiet:
            name = _packet(func)
            self._check_values(name, args, kwargs)
            if not checker.quiet_devices:
                self._check_devices(name, args, kwargs)
        result = func(*args, **kwargs)
        if not checker.quiet and not checker.quiet_devices and checker.expected is not None:
            if not checker.host_only([*_tensors((args, kwargs)), *_tensors(result)]):
                self._check_result(_packet(func), result)
        return result

    def _check_values(self, name: str, args: tuple, kwargs: dict) -> None:
        checker = self.checker
        inputs = list(_tensors((args, kwargs)))
        if inputs and not any(checker.read_matters(t) for t in inputs):
            return
        if name in HOST_READ_OPS:
            if name == "aten.histc":
                low = kwargs.get("min", args[2] if len(args) > 2 else 0)
                high = kwargs.get("max", args[3] if len(args) > 3 else 0)
                if low != high:
                    return
            checker.offend(HOST_READ, name, HOST_READ_OPS[name])
        elif kwargs.get("check_errors"):
            checker.offend(HOST_READ, name, f"{_VALUE_READ}: check_errors=True")
        elif name in DYNAMIC_SHAPE_OPS:
            if name == "aten.repeat_interleave":
                repeats = args[0] if len(args) == 1 else args[1] if len(args) > 1 else None
                if not isinstance(repeats, torch.Tensor) or kwargs.get("output_size") is not None:
                    return
            elif name in _INDEX_OPS and not _mask_index(args[1] if len(args) > 1 else ()):
                return
            checker.offend(DYNAMIC_SHAPE, name, DYNAMIC_SHAPE_OPS[name])
        elif name in _COPY_OPS:
            self._check_copy(name, args, kwargs)

    def _check_copy(self, name: str, args: tuple, kwargs: dict) -> None:
        """A copy from another device to the CPU reads device data on the host."""
        if not args or not isinstance(args[0], torch.Tensor):
            return
        if name == "aten.copy_" or name == "aten.copy":
            target, source = args[0].device, args[1].device if len(args) > 1 else None
        elif name == "aten._copy_from":
            source, target = args[0].device, args[1].device if len(args) > 1 else None
        else:
            source, target = args[0].device, kwargs.get("device")
        if source is None or target is None:
            return
        target = torch.device(target)
        if target.type == "cpu" and source.type != "cpu":
            self.checker.offend(HOST_READ, name, f"{_VALUE_READ}: a copy from {source} to the CPU")

    def _check_devices(self, name: str, args: tuple, kwargs: dict) -> None:
        checker = self.checker
        inputs = [t for t in _tensors((args, kwargs)) if not _is_scalar(t)]
        devices = {t.device for t in inputs}
        if len(devices) > 1 and name not in _COPY_OPS:
            listed = ", ".join(sorted(str(d) for d in devices))
            checker.offend(DEVICE, name, f"mixes tensors on {listed}")
            return
        expected = checker.expected
        if expected is None or checker.host_only(inputs):
            return
        for tensor in inputs:
            if not _on(tensor.device, expected):
                shape = list(tensor.shape)
                checker.offend(
                    DEVICE,
                    name,
                    f"takes a {shape} tensor on {tensor.device}; the step's device is {expected}",
                )
                return

    def _check_result(self, name: str, result: Any) -> None:
        checker = self.checker
        expected = checker.expected
        assert expected is not None
        for tensor in _tensors(result):
            if _is_scalar(tensor) or _on(tensor.device, expected):
                continue
            if name in _COPY_OPS and tensor.device.type == "cpu":
                return  # reported as a host read when it came from a device
            checker.offend(
                DEVICE,
                name,
                f"makes a {list(tensor.shape)} tensor on {tensor.device}; "
                f"the step's device is {expected}",
            )
            return


def _function_names() -> dict[Any, str]:
    """The API functions the API-level mode checks, by identity: → their names."""
    names: dict[Any, str] = {}
    for name in HOST_READ_FUNCTIONS:
        names[getattr(torch.Tensor, name.split(".", 1)[1])] = name
    for name in CONSTRUCTORS:
        function = getattr(torch, name, None)
        if function is not None:
            names[function] = f"torch.{name}"
    return names


_FUNCTIONS = _function_names()


class _FunctionMode(TorchFunctionMode):
    """Sees the ``torch`` API calls: reads that bypass dispatch, constructors without a device."""

    def __init__(self, checker: _Checker) -> None:
        super().__init__()
        self.checker = checker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            name = _FUNCTIONS.get(func)
        except TypeError:  # an unhashable callable: none of ours
            name = None
        if name is None or self.checker.quiet:
            return func(*args, **kwargs)
        if name in HOST_READ_FUNCTIONS:
            return self._read(name, func, args, kwargs)
        return self._construct(name, func, args, kwargs)

    def _read(self, name: str, func: Any, args: tuple, kwargs: dict) -> Any:
        checker = self.checker
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if tensor is not None and checker.read_matters(tensor):
            checker.offend(HOST_READ, name, HOST_READ_FUNCTIONS[name])
            checker.quiet += 1  # its ATen ops (a copy, an item) are this one offence
            try:
                return func(*args, **kwargs)
            finally:
                checker.quiet -= 1
        return func(*args, **kwargs)

    def _construct(self, name: str, func: Any, args: tuple, kwargs: dict) -> Any:
        checker = self.checker
        device = kwargs.get("device")
        if name == "torch.as_tensor" and device is None and len(args) > 2:
            device = args[2]
        if (
            checker.expected is None
            or device is not None
            or any(True for _ in _tensors((args, kwargs)))
            or torch.get_default_device().type != "cpu"
        ):
            return func(*args, **kwargs)
        checker.quiet_devices += 1  # the constructor's own ATen ops: judged here, once
        try:
            result = func(*args, **kwargs)
        finally:
            checker.quiet_devices -= 1
        made = [t for t in _tensors(result) if not _is_scalar(t)]
        if made and not _called_from_torch():
            checker.offend(
                DEVICE,
                name,
                f"makes a {list(made[0].shape)} tensor on the default device "
                f"({made[0].device}) without device=; the step's device is {checker.expected}",
            )
        return result


class HostSyncCheck:
    """A context manager that checks the ops of its block (see the module's description).

    ``expected_device``: the device the step's tensors live on (``None``: only mixing is
    checked, and constructors without a device are allowed). ``raise_errors``: raise
    :class:`HostSyncError` at the first offence (before the op runs), or record every offence
    in :attr:`violations` and let the block run on. ``allow``: names of ops to let pass
    (``"aten.nonzero"``, ``"torch.arange"``, ``"Tensor.tolist"``). ``host_work``: let ops
    whose tensors all lie on the CPU pass while ``expected_device`` is another (planning on
    the host, e.g. a batch's indices; constructors still need ``device=``, and host tensors
    that meet the device's still offend, unless copied there).
    """

    def __init__(
        self,
        expected_device: torch.device | str | None = None,
        *,
        raise_errors: bool = True,
        allow: Iterable[str] = (),
        host_work: bool = False,
    ) -> None:
        self._checker = _Checker(expected_device, raise_errors, allow, host_work)
        self._stack: contextlib.ExitStack | None = None

    @property
    def violations(self) -> list[Violation]:
        """The offences recorded so far (empty when raising)."""
        return self._checker.violations

    def __enter__(self) -> HostSyncCheck:
        stack = contextlib.ExitStack()
        stack.enter_context(_FunctionMode(self._checker))
        stack.enter_context(_DispatchMode(self._checker))
        self._stack = stack
        return self

    def __exit__(self, *exc_info: Any) -> None:
        stack, self._stack = self._stack, None
        assert stack is not None
        stack.__exit__(*exc_info)


def forbid_host_sync(
    expected_device: torch.device | str | None = None,
    *,
    allow: Iterable[str] = (),
    host_work: bool = False,
) -> HostSyncCheck:
    """A context manager that raises :class:`HostSyncError` (naming the op and the caller's
    source line) at the first host read, data-dependent shape or device mix in its block.
    ``expected_device``: the device the step's tensors live on; given, tensors on other devices
    and constructors called without ``device=`` offend too (``"cpu"`` checks CPU code).
    ``host_work``: see :class:`HostSyncCheck`."""
    return HostSyncCheck(expected_device, raise_errors=True, allow=allow, host_work=host_work)


def count_host_syncs(
    function: Callable[..., Any],
    *args: Any,
    expected_device: torch.device | str | None = None,
    allow: Iterable[str] = (),
    host_work: bool = False,
    **kwargs: Any,
) -> tuple[Any, list[Violation]]:
    """``function(*args, **kwargs)`` run to the end under the same checks as
    :func:`forbid_host_sync`; returns its result and every offence, in order (tally them with
    ``collections.Counter((v.op, v.where) for v in offences)``). ``expected_device``,
    ``allow`` and ``host_work`` are this function's own keywords."""
    check = HostSyncCheck(expected_device, raise_errors=False, allow=allow, host_work=host_work)
    with check:
        result = function(*args, **kwargs)
    return result, list(check.violations)


__all__ = [
    "CONSTRUCTORS",
    "DEVICE",
    "DYNAMIC_SHAPE",
    "DYNAMIC_SHAPE_OPS",
    "HOST_READ",
    "HOST_READ_FUNCTIONS",
    "HOST_READ_OPS",
    "HostSyncCheck",
    "HostSyncError",
    "Violation",
    "count_host_syncs",
    "forbid_host_sync",
]
