"""Reading and writing ænet ``.nn.ascii`` potentials (spec §5), checked against Fortran."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import attrs
import pytest
import torch

import aenet_fn
from aenet_fn import ChebyshevParams, collate, init_network, read_structures
from aenet_fn.core.normalization import Normalization
from aenet_fn.core.potential import Model
from aenet_fn.examples import TIO2_POTENTIAL, TIO2_STRUCTURES
from aenet_fn.io.ascii_potential import _parse_file, read_aenet_ascii, write_aenet_ascii
from tests.conftest import random_structure

NN = TIO2_POTENTIAL
# Fortran predict.x total energies (eV), tests/data/nn-tio2/REFERENCE.md
REFERENCE = {1: -19517.16578343, 2: -39038.49118938, 3: -19517.81272714}


@pytest.fixture(scope="module")
def tio2_model() -> Model:
    return read_aenet_ascii([NN / "Ti.nn.ascii", NN / "O.nn.ascii"])


@pytest.fixture(scope="module")
def tio2_structures() -> dict:
    return {k: read_structures(TIO2_STRUCTURES / f"structure-00{k}.xsf")[0] for k in REFERENCE}


def _batch(model: Model, structures: list) -> aenet_fn.Batch:
    return collate(structures, species=model.descriptor.species)


def test_reads_fortran_tio2_potential(tio2_model: Model) -> None:
    d = tio2_model.descriptor
    assert d == ChebyshevParams(
        species=("Ti", "O"),
        rad_order=20,
        rad_cutoff=6.5,
        ang_order=6,
        ang_cutoff=5.0,
        min_cutoff=0.35,
    )
    assert d.n_features == 56
    net = tio2_model.network
    assert net.sizes == ((56, 5, 5, 1), (56, 5, 5, 1))
    assert net.activations == (("tanh", "tanh"), ("tanh", "tanh"))
    assert net.values.dtype == torch.float64 and net.values.shape == (2 * 321,)
    norm = tio2_model.normalization
    assert norm.feature_mean.shape == (2, 56) and norm.feature_std.shape == (2, 56)
    assert float(norm.energy_scaling) == 1.27384834786371
    assert float(norm.energy_shift) == -7.786247938833317
    assert norm.atomic_energies.tolist() == [-1604.604515075, -432.503149303]
    # per-species statistics: the two files differ
    assert not torch.equal(norm.feature_mean[0], norm.feature_mean[1])


def test_reproduces_fortran_energies(tio2_model: Model, tio2_structures: dict) -> None:
    errors = []
    for k, reference in REFERENCE.items():
        predicted = aenet_fn.energy(tio2_model, _batch(tio2_model, [tio2_structures[k]]))
        errors.append(abs(float(predicted[0]) - reference))
    assert max(errors) < 1e-6, errors


def test_other_ways_to_name_the_files(tio2_model: Model, tmp_path: Path) -> None:
    from_folder = read_aenet_ascii(NN)
    from_mapping = read_aenet_ascii({"O": NN / "O.nn.ascii", "Ti": NN / "Ti.nn.ascii"})
    reversed_list = read_aenet_ascii([NN / "O.nn.ascii", NN / "Ti.nn.ascii"])
    for model in (from_folder, from_mapping, reversed_list):
        assert model.descriptor == tio2_model.descriptor
        assert torch.equal(model.network.values, tio2_model.network.values)
    with pytest.raises(ValueError, match=r"O\.nn\.ascii.*given for species 'Ti'"):
        read_aenet_ascii({"Ti": NN / "O.nn.ascii", "O": NN / "Ti.nn.ascii"})
    with pytest.raises(ValueError, match=r"no potential file for species \['O'\]"):
        read_aenet_ascii([NN / "Ti.nn.ascii"])
    with pytest.raises(ValueError, match="both for species 'Ti'"):
        read_aenet_ascii([NN / "Ti.nn.ascii", NN / "Ti.nn.ascii"])


def _assert_same_model(a: Model, b: Model) -> None:
    assert a.descriptor == b.descriptor
    assert a.network.sizes == b.network.sizes
    assert a.network.activations == b.network.activations
    assert a.network.species == b.network.species
    assert torch.equal(a.network.values, b.network.values)
    for name in attrs.fields_dict(Normalization):
        assert torch.equal(getattr(a.normalization, name), getattr(b.normalization, name)), name


def _assert_same_predictions(a: Model, b: Model, structures: list) -> None:
    energy_a, forces_a = aenet_fn.energy_and_forces(a, _batch(a, structures))
    energy_b, forces_b = aenet_fn.energy_and_forces(b, _batch(b, structures))
    assert torch.equal(energy_a, energy_b)
    assert torch.equal(forces_a, forces_b)


def test_round_trip_tio2(tio2_model: Model, tio2_structures: dict, tmp_path: Path) -> None:
    paths = write_aenet_ascii(tio2_model, tmp_path)
    assert paths == [tmp_path / "potential.Ti.nn.ascii", tmp_path / "potential.O.nn.ascii"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    again = read_aenet_ascii(paths)
    _assert_same_model(tio2_model, again)
    _assert_same_predictions(tio2_model, again, [tio2_structures[1], tio2_structures[3]])
    # §5 layout: exponent-form floats, 12 sfparam values per line, default training info
    text = paths[0].read_text().splitlines()
    assert text[:8] == [
        f"{4:17d}",
        f"{56:17d}",
        f"{321:17d}",
        f"{70:17d}",
        " ".join(f"{n:17d}" for n in (56, 5, 5, 1)),
        " ".join(f"{n:17d}" for n in (1, 1, 0)),
        " ".join(f"{n:17d}" for n in (0, 285, 315, 321)),
        " ".join(f"{n:17d}" for n in (0, 57, 63, 69)),
    ]
    assert len(text[8].split()) == 321
    assert all(re.fullmatch(r"-?\d\.\d{17}e[+-]\d\d", t) for t in text[8].split())
    assert text[10] == "Ti" and text[12] == "Ti O" and text[15] == "Chebyshev"
    assert len(text[19].split()) == 12 and text[19].split()[:4] == [
        f"{v:.17e}" for v in (6.5, 20, 5.0, 6)
    ]
    info = _parse_file(paths[0]).training
    assert info == {
        "filename": "aenet_fn",
        "natomtot": 0,
        "nstrucs": 0,
        "e_min": 0.0,
        "e_max": 0.0,
        "e_avg": 0.0,
    }


def _toy_model(arch: dict, species: tuple[str, ...], seed: int = 0) -> Model:
    descriptor = ChebyshevParams(
        species=species, rad_order=4, rad_cutoff=4.0, ang_order=2, ang_cutoff=3.0, min_cutoff=0.5
    )
    generator = torch.Generator().manual_seed(seed)
    network = init_network(arch, species, descriptor.n_features, generator=generator)
    shape = (len(species), descriptor.n_features)
    # statistics on a 1/1024 grid: std² + mean² and its difference are exact, so std round-trips
    # exactly (generic values: see test_generic_statistics_round_trip_to_rounding)
    mean = torch.round(torch.randn(shape, generator=generator, dtype=torch.float64) * 3072) / 1024
    std = torch.round(torch.rand(shape, generator=generator, dtype=torch.float64) * 2048 + 8) / 1024
    std[0, 1] = torch.inf  # a switched-off feature
    return Model(
        descriptor=descriptor,
        network=network,
        normalization=Normalization(
            feature_mean=mean,
            feature_std=std,
            feature_min=mean - 2 * std.nan_to_num(posinf=1.0),
            feature_max=mean + 2 * std.nan_to_num(posinf=1.0),
            energy_shift=torch.tensor(-3.25, dtype=torch.float64),
            energy_scaling=torch.tensor(0.7, dtype=torch.float64),
            atomic_energies=torch.linspace(-10.0, -1.0, len(species), dtype=torch.float64),
        ),
    )


def test_round_trip_all_fortran_activations_and_depths(
    tio2_structures: dict, tmp_path: Path
) -> None:
    arch = {
        "Ti": [(4, "mtanh"), (3, "twist")],
        "O": [(5, "sigmoid"), (2, "linear"), (3, "tanh")],
    }
    model = _toy_model(arch, ("Ti", "O"))
    info = {"filename": "my data/set.train", "natomtot": 12, "nstrucs": 3, "e_min": -1.5}
    paths = write_aenet_ascii(model, tmp_path / "out", prefix="toy", training_info=info)
    assert [p.name for p in paths] == ["toy.Ti.nn.ascii", "toy.O.nn.ascii"]
    lines = paths[1].read_text().splitlines()
    assert lines[5].split() == ["2", "0", "1", "0"]  # activation codes, output linear
    again = read_aenet_ascii(paths)
    _assert_same_model(model, again)
    assert torch.isinf(again.normalization.feature_std[0, 1])
    _assert_same_predictions(model, again, [tio2_structures[1]])
    assert _parse_file(paths[0]).training == {
        "filename": "my data/set.train",
        "natomtot": 12,
        "nstrucs": 3,
        "e_min": -1.5,
        "e_max": 0.0,
        "e_avg": 0.0,
    }


def test_round_trip_single_species(tmp_path: Path) -> None:
    model = _toy_model({"Ti": [(3, "tanh")]}, ("Ti",), seed=1)
    assert model.descriptor.n_features == 8  # no weighted half
    paths = write_aenet_ascii(model, tmp_path)
    again = read_aenet_ascii(paths[0])
    _assert_same_model(model, again)
    _assert_same_predictions(model, again, [random_structure(3, 5, species=("Ti",))])


def test_generic_statistics_round_trip_to_rounding(tmp_path: Path) -> None:
    model = _toy_model({"Ti": [(3, "tanh")]}, ("Ti",), seed=4)
    generator = torch.Generator().manual_seed(5)
    shape = model.normalization.feature_mean.shape
    mean = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    std = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 + 0.01
    model = attrs.evolve(
        model, normalization=attrs.evolve(model.normalization, feature_mean=mean, feature_std=std)
    )
    again = read_aenet_ascii(write_aenet_ascii(model, tmp_path))
    assert torch.equal(again.normalization.feature_mean, mean)
    bound = 4 * torch.finfo(torch.float64).eps * (std + mean**2 / std)
    assert ((again.normalization.feature_std - std).abs() <= bound).all()


def test_tiny_weights_survive_in_exponent_form(tmp_path: Path) -> None:
    model = _toy_model({"Ti": [(3, "tanh")]}, ("Ti",), seed=2)
    values = model.network.values.clone()
    values[0] = 1.234567890123e-12
    values[1] = -9.87654321e-300
    model = attrs.evolve(model, network=attrs.evolve(model.network, values=values))
    [path] = write_aenet_ascii(model, tmp_path)
    again = read_aenet_ascii([path])
    assert float(again.network.values[0]) == 1.234567890123e-12
    assert float(again.network.values[1]) == -9.87654321e-300
    assert torch.equal(again.network.values, values)


def test_fortran_d_exponents_and_energy_normalisation_off(tmp_path: Path) -> None:
    model = _toy_model({"Ti": [(3, "sigmoid")]}, ("Ti",), seed=3)
    norm = attrs.evolve(
        model.normalization,
        energy_shift=torch.tensor(0.0, dtype=torch.float64),
        energy_scaling=torch.tensor(1.0, dtype=torch.float64),
    )
    model = attrs.evolve(model, normalization=norm)
    [path] = write_aenet_ascii(model, tmp_path)
    text = path.read_text()
    assert "\nF\n" in text
    path.write_text(re.sub(r"(\d)e([+-]\d\d)", r"\1D\2", text))
    assert "e-" not in path.read_text() and "D-" in path.read_text()
    _assert_same_model(model, read_aenet_ascii([path]))


def test_relu_cannot_be_exported(tmp_path: Path) -> None:
    model = _toy_model({"Ti": [(3, "tanh")], "O": [(3, "relu")]}, ("Ti", "O"))
    with pytest.raises(ValueError, match=r"'relu' of species 'O'"):
        write_aenet_ascii(model, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the Ti file


def _copy_pair(tmp_path: Path) -> tuple[Path, Path]:
    ti, o = tmp_path / "Ti.nn.ascii", tmp_path / "O.nn.ascii"
    shutil.copy(NN / "Ti.nn.ascii", ti)
    shutil.copy(NN / "O.nn.ascii", o)
    return ti, o


def _edit_line(path: Path, line: int, edit) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = edit(lines[line - 1])
    path.write_text("".join(lines))


@pytest.mark.parametrize(
    ("line", "new", "field"),
    [
        (14, "0.4\n", "min_cutoff"),
        (13, "O Ti\n", "species"),
        (29, "1.3\n", "scale"),
        (33, "-1604.6 -432.503149303\n", "E_atom"),
    ],
)
def test_mismatched_files_are_refused(tmp_path: Path, line: int, new: str, field: str) -> None:
    ti, o = _copy_pair(tmp_path)
    _edit_line(o, line, lambda _: new)
    with pytest.raises(ValueError, match=rf"Ti\.nn\.ascii and .*O\.nn\.ascii disagree on {field}"):
        read_aenet_ascii([ti, o])


def test_malformed_files_name_the_file(tmp_path: Path) -> None:
    ti, o = _copy_pair(tmp_path)
    with pytest.raises(ValueError, match=r"missing\.nn\.ascii: no such"):
        read_aenet_ascii([ti, tmp_path / "missing.nn.ascii"])

    lines = (NN / "Ti.nn.ascii").read_text().splitlines(keepends=True)
    ti.write_text("".join(lines[:30]))
    with pytest.raises(ValueError, match=r"Ti\.nn\.ascii: unexpected end of file .*ntypes"):
        read_aenet_ascii([ti, o])

    ti.write_text("".join(lines))
    _edit_line(ti, 9, lambda text: text.replace("-0.05951643641831211", "-0.0595x", 1))
    with pytest.raises(ValueError, match=r"Ti\.nn\.ascii: line 9: .*W \(321 values\)"):
        read_aenet_ascii([ti, o])

    ti.write_text("".join(lines))
    _edit_line(ti, 2, lambda _: "57\n")
    with pytest.raises(ValueError, match=r"Ti\.nn\.ascii: nnodes_max is 57"):
        read_aenet_ascii([ti, o])

    ti.write_text("".join(lines))
    _edit_line(ti, 22, lambda _: "7308.0\n")
    with pytest.raises(ValueError, match=r"Ti\.nn\.ascii: line 22: expected an integer"):
        read_aenet_ascii([ti, o])


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("              321\n", "    10000000000000\n", r"10000000000000"),
        ("-0.12282115179966388", "1000000000000*0.5", None),
    ],
    ids=["absurd count", "absurd repeat"],
)
def test_absurd_counts_in_a_file_are_refused_before_allocating(tmp_path, old, new, message):
    """A count or a Fortran repeat count far beyond what the file holds never reaches the
    allocator: the reader fails with both numbers, or reads no more values than it needs."""
    folder = tmp_path / "nn"
    shutil.copytree(NN, folder)
    target = folder / "O.nn.ascii"
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    start = time.perf_counter()
    try:
        read_aenet_ascii([folder / "Ti.nn.ascii", target])
    except ValueError as error:
        assert message is None or re.search(message, str(error)), str(error)
    else:
        assert message is None
    assert time.perf_counter() - start < 10


def test_a_consistent_but_absurd_network_is_refused_by_its_counts(tmp_path):
    """Layer sizes and weight count agreeing with each other but not with the file: the reader
    asks for the announced values and fails at the end of the file, allocating nothing."""
    folder = tmp_path / "nn"
    shutil.copytree(NN, folder)
    target = folder / "O.nn.ascii"
    lines = target.read_text().split("\n")
    hidden = 2_000_000_000
    weights = 56 * hidden + hidden + hidden * 5 + 5 + 5 + 1
    lines[1] = f"{hidden:>17d}"  # the widest layer
    lines[2] = f"{weights:>17d}"
    lines[3] = f"{56 + hidden + 5 + 1 + 3:>17d}"  # nodes with the bias nodes
    lines[4] = f"{56:>17d}{hidden:>18d}{5:>18d}{1:>18d} "
    offsets = [0, 57 * hidden, 57 * hidden + (hidden + 1) * 5, weights]  # each layer's weights
    lines[6] = "".join(f"{k:>18d}" for k in offsets)
    lines[7] = "".join(f"{k:>18d}" for k in (0, 57, 57 + hidden + 1, 57 + hidden + 1 + 6))
    target.write_text("\n".join(lines))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"expected {weights} value\(s\), found"):
        read_aenet_ascii([folder / "Ti.nn.ascii", target])
    assert time.perf_counter() - start < 10
