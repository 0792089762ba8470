"""Bad input gets a clear error naming the argument: dtypes, structure fields, chunk sizes,
structure paths, ``.nn.ascii`` prefixes, all-or-nothing potential writes, truncated files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import aenet_fn as af
from aenet_fn.core.batch import collate
from aenet_fn.core.featurized import featurize_structures
from aenet_fn.core.structure import Structure, check_float_dtype
from aenet_fn.examples import TIO2_POTENTIAL
from aenet_fn.io import read_structures
from aenet_fn.io.ascii_potential import read_aenet_ascii, write_aenet_ascii
from tests.conftest import random_structure

NN = TIO2_POTENTIAL
PARAMS = af.ChebyshevParams(
    species=("Ti", "O"), rad_order=2, rad_cutoff=4.0, ang_order=1, ang_cutoff=3.0
)
BAD_DTYPES = [
    (torch.int64, ValueError),
    (torch.float16, ValueError),
    (torch.bfloat16, ValueError),
    (torch.complex128, ValueError),
    ("float64", TypeError),
    (np.float64, TypeError),
]


@pytest.fixture(scope="module")
def tio2_model() -> af.Model:
    return read_aenet_ascii(NN)


def _structures() -> list[Structure]:
    return [random_structure(seed, 4) for seed in range(2)]


# ---- 1. dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "error"), BAD_DTYPES)
@pytest.mark.parametrize(
    ("where", "call"),
    [
        ("collate", lambda dtype: collate(_structures(), dtype=dtype)),
        ("read_aenet_ascii", lambda dtype: read_aenet_ascii(NN, dtype=dtype)),
        (
            "featurize_structures",
            lambda dtype: featurize_structures(
                PARAMS, _structures(), with_derivatives=False, dtype=dtype
            ),
        ),
    ],
)
def test_only_float32_and_float64_are_accepted(where, call, dtype, error) -> None:
    with pytest.raises(error, match=rf"{where}: dtype must be torch\.float32 or torch\.float64"):
        call(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_pass(dtype: torch.dtype) -> None:
    assert check_float_dtype(dtype, "here") is dtype
    assert collate(_structures(), dtype=dtype).positions.dtype == dtype
    assert featurize_structures(PARAMS, _structures(), with_derivatives=False, dtype=dtype)


def test_the_dtype_message_names_what_was_given() -> None:
    with pytest.raises(TypeError, match=r"got 'float64' \(str, not a torch\.dtype\)"):
        check_float_dtype("float64", "here")
    with pytest.raises(ValueError, match=r"here: .* got torch\.int64"):
        check_float_dtype(torch.int64, "here")


# ---- 2. Structure fields -----------------------------------------------------------------------

POSITIONS = np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]])
CELL = np.eye(3) * 5.0


@pytest.mark.parametrize("kind", ["complex", "boolean"])
@pytest.mark.parametrize("field", ["positions", "forces", "cell"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_complex_and_boolean_arrays_are_refused(field: str, kind: str, as_tensor: bool) -> None:
    fields = {"positions": POSITIONS, "forces": np.zeros_like(POSITIONS), "cell": CELL}
    bad = fields[field] + 0j if kind == "complex" else np.ones(fields[field].shape, dtype=bool)
    fields[field] = torch.from_numpy(bad) if as_tensor else bad.tolist()
    with pytest.raises(ValueError, match=rf"'x': {field} must be real numbers, got {kind}"):
        Structure(species=["Ti", "O"], name="x", **fields)


@pytest.mark.parametrize("energy", [True, np.bool_(False), 1 + 0j, torch.tensor(True)])
def test_boolean_and_complex_energies_are_refused(energy) -> None:
    with pytest.raises(ValueError, match=r"'x': energy must be a real number"):
        Structure(POSITIONS, ["Ti", "O"], energy=energy, name="x")


def test_real_fields_still_convert() -> None:
    structure = Structure(
        torch.tensor(POSITIONS, dtype=torch.float32),
        ["Ti", "O"],
        energy=np.float32(-1.5),
        forces=np.zeros((2, 3), dtype=np.int64),
        cell=CELL.tolist(),
    )
    assert structure.positions.dtype == torch.float64 and structure.energy == -1.5


# ---- 3. chunk_size -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk_size", "error", "message"),
    [
        (0, ValueError, "must be >= 1, got 0"),
        (-1, ValueError, "must be >= 1, got -1"),
        (2.0, TypeError, "must be a positive integer, got 2.0"),
        (True, TypeError, "must be a positive integer, got True"),
        ("8", TypeError, "must be a positive integer, got '8'"),
    ],
)
def test_chunk_size_must_be_a_positive_integer(chunk_size, error, message: str) -> None:
    with pytest.raises(error, match=rf"featurize_structures: chunk_size {message}"):
        featurize_structures(PARAMS, _structures(), with_derivatives=False, chunk_size=chunk_size)


def test_chunk_size_numpy_integer_and_one_work() -> None:
    whole = featurize_structures(PARAMS, _structures(), with_derivatives=False)
    for chunk_size in (1, np.int64(1)):
        chunked = featurize_structures(
            PARAMS, _structures(), with_derivatives=False, chunk_size=chunk_size
        )
        assert torch.allclose(chunked.features, whole.features, rtol=1e-12, atol=1e-12)


# ---- 4. read_structures ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [5, None, 2.5, b"structure.xsf"])
def test_read_structures_refuses_what_is_not_paths(value) -> None:
    with pytest.raises(TypeError, match=r"read_structures: expected a path .* or a sequence"):
        read_structures(value)


@pytest.mark.parametrize("empty", [[], (), iter([])])
def test_read_structures_refuses_an_empty_selection(empty) -> None:
    with pytest.raises(ValueError, match=r"read_structures: no paths given"):
        read_structures(empty)


# ---- 5. write_aenet_ascii: prefix and all-or-nothing ------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "problem"),
    [
        ("../x", "contains a path separator"),
        ("a/b", "contains a path separator"),
        ("a\\b", "contains a path separator"),
        ("", "is empty"),
        ("  ", "is empty"),
        (".x", r"starts with '\.'"),
    ],
)
def test_bad_prefix_is_refused(tio2_model, tmp_path: Path, prefix: str, problem: str) -> None:
    target = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"write_aenet_ascii: prefix .* {problem}"):
        write_aenet_ascii(tio2_model, target, prefix=prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_prefix_must_be_a_string(tio2_model, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"write_aenet_ascii: prefix must be a string, got int"):
        write_aenet_ascii(tio2_model, tmp_path, prefix=3)


@pytest.mark.parametrize("blocked", ["Ti", "O"])
def test_write_is_all_or_nothing(tio2_model, tmp_path: Path, blocked: str) -> None:
    other = {"Ti": "O", "O": "Ti"}[blocked]
    (tmp_path / f"potential.{blocked}.nn.ascii").mkdir()
    (tmp_path / f"potential.{other}.nn.ascii").write_text("old")
    with pytest.raises(IsADirectoryError, match=rf"potential\.{blocked}\.nn\.ascii' is a folder"):
        write_aenet_ascii(tio2_model, tmp_path)
    assert (tmp_path / f"potential.{other}.nn.ascii").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"potential.{blocked}.nn.ascii", f"potential.{other}.nn.ascii"]
    )  # no temporary files left


def test_write_failure_of_one_species_leaves_every_file(tio2_model, tmp_path: Path, monkeypatch):
    for symbol in ("Ti", "O"):
        (tmp_path / f"potential.{symbol}.nn.ascii").write_text(f"old {symbol}")
    real_open = open

    def failing_open(path, *args, **kwargs):  # the O file (written after Ti) cannot be written
        if ".potential.O.nn.ascii." in str(path):
            raise OSError(28, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(OSError, match="No space left"):
        write_aenet_ascii(tio2_model, tmp_path)
    monkeypatch.undo()
    for symbol in ("Ti", "O"):
        assert (tmp_path / f"potential.{symbol}.nn.ascii").read_text() == f"old {symbol}"
    assert len(list(tmp_path.iterdir())) == 2


# ---- 6. truncated .nn.ascii --------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 5, 12])
def test_file_cut_inside_its_last_record_is_truncated(tmp_path: Path, cut: int) -> None:
    for name in ("Ti", "O"):
        shutil.copy(NN / f"{name}.nn.ascii", tmp_path / f"{name}.nn.ascii")
    text = (NN / "Ti.nn.ascii").read_text()
    assert text.endswith("\n")
    n_lines = len(text.splitlines())
    (tmp_path / "Ti.nn.ascii").write_text(text[:-cut])
    with pytest.raises(
        ValueError, match=rf"Ti\.nn\.ascii: line {n_lines}: the file is truncated: .*E_min E_max"
    ):
        read_aenet_ascii(tmp_path)


def test_complete_files_and_crlf_still_read(tmp_path: Path) -> None:
    for name in ("Ti", "O"):
        text = (NN / f"{name}.nn.ascii").read_text()
        (tmp_path / f"{name}.nn.ascii").write_bytes(text.replace("\n", "\r\n").encode())
    assert read_aenet_ascii(tmp_path).descriptor.species == read_aenet_ascii(NN).descriptor.species
