"""The ``aenet-fn`` command line: train → predict → export-ascii → import-ascii → predict on tiny
data, committees, featurize, configuration errors, the fast demo and the entry point."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aenet_fn.cli import CONFIG_EXAMPLE, main
from aenet_fn.cli.demo import toml_text
from aenet_fn.examples import TIO2_POTENTIAL, TIO2_STRUCTURES
from aenet_fn.torch_featurize import ChebyshevDescriptor
from aenet_fn.torch_training import TorchANNPotential, TorchCommitteePotential

PNG = b"\x89PNG\r\n\x1a\n"
TOML = sys.version_info >= (3, 11)  # tomllib; JSON configurations (same schema) otherwise


def tables(committee: bool = False) -> dict:
    """A tiny configuration on eight of the TiO2 example structures."""
    config = {
        "data": {"paths": [str(TIO2_STRUCTURES / "structure-00[1-8].xsf")]},
        "descriptor": {
            "species": ["Ti", "O"],
            "rad_order": 4,
            "rad_cutoff": 4.0,
            "ang_order": 2,
            "ang_cutoff": 3.0,
            "min_cutoff": 0.5,
        },
        "network": {"default": [[5, "tanh"]]},
        "training": {
            "iterations": 2,
            "testpercent": 25,
            "split_seed": 3,
            "seed": 1,
            "force_weight": 0.1,
            "atomic_energies": {"Ti": -1604.604515075, "O": -432.503149303},
            "checkpoint_dir": False,
            "method": "adam",
            "adam": {"mu": 0.003, "batchsize": 4},
        },
        "output": {"directory": "run"},
    }
    if committee:
        config["committee"] = {"members": 2, "base_seed": 5, "execution": "vmap"}
    return config


def write_config(folder: Path, config: dict, toml: bool = TOML) -> Path:
    """``config`` as ``folder/config.toml`` (or ``config.json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if toml:
        path = folder / "config.toml"
        path.write_text(toml_text(config))
    else:
        path = folder / "config.json"
        path.write_text(json.dumps(config))
    return path


def structure_files(count: int = 3) -> list[str]:
    return [str(p) for p in sorted(TIO2_STRUCTURES.glob("*.xsf"))[:count]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is as fast and does not stall on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("single"), tables())
    assert main(["train", str(config), "--no-progress"]) == 0
    return config.parent / "run"


@pytest.fixture(scope="module")
def committee(tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("committee"), tables(True))
    assert main(["train", str(config), "--no-progress"]) == 0
    return config.parent / "run"


def test_train_writes_model_history_energies_and_plots(single):
    for name in ("model.pt", "history.json", "history.csv", "energies.train.0", "metrics.json"):
        assert (single / name).is_file(), name
    for name in ("training_summary.png", "parity.png"):
        assert (single / name).read_bytes()[:8] == PNG
    history = json.loads((single / "history.json").read_text())
    assert len(history["RMSE_train"]) == 2
    metrics = json.loads((single / "metrics.json").read_text())
    assert metrics["train"]["n_structures"] == 6 and metrics["test"]["n_structures"] == 2
    assert metrics["test"]["rmse_forces"] > 0


def test_predict_csv_and_json_equal_the_facade(single, tmp_path):
    files = structure_files()
    expected = TorchANNPotential.from_file(single / "model.pt").predict(files, eval_forces=True)
    table = tmp_path / "out.csv"
    assert main(["predict", str(single / "model.pt"), *files, "--format", "csv",
                 "--output", str(table)]) == 0  # fmt: skip
    rows = list(csv.DictReader(table.open()))
    assert [r["name"] for r in rows] == files
    assert [float(r["energy"]) for r in rows] == expected.total_energy
    assert [int(r["n_atoms"]) for r in rows] == [len(t) for t in expected.atom_types]
    document = tmp_path / "out.json"
    assert main(["predict", str(single / "model.pt"), *files, "--format", "json", "--forces",
                 "--output", str(document)]) == 0  # fmt: skip
    structures = json.loads(document.read_text())["structures"]
    assert [s["energy"] for s in structures] == expected.total_energy
    for record, forces in zip(structures, expected.forces):
        np.testing.assert_array_equal(np.array(record["forces"]), forces)
        assert record["energy_per_atom"] == record["energy"] / record["n_atoms"]


def test_predict_table_to_stdout(single, capsys):
    files = structure_files(2)
    assert main(["predict", str(single / "model.pt"), *files, "--forces"]) == 0
    printed = capsys.readouterr().out
    assert "E/atom (eV)" in printed and files[1] in printed and "forces (eV/Å)" in printed


def test_ascii_export_import_round_trip(single, tmp_path, capsys):
    files = structure_files()
    model = str(single / "model.pt")
    assert main(["export-ascii", model, str(tmp_path / "ascii"), "--prefix", "tio2",
                 "--structures", *files]) == 0  # fmt: skip
    written = sorted((tmp_path / "ascii").glob("tio2.*.nn.ascii"))
    assert [p.name for p in written] == ["tio2.O.nn.ascii", "tio2.Ti.nn.ascii"]
    imported = tmp_path / "imported.pt"
    assert main(["import-ascii", *map(str, written), "--output", str(imported)]) == 0
    energies = []
    for path in (model, str(imported)):
        capsys.readouterr()
        assert main(["predict", path, *files, "--format", "json"]) == 0
        energies.append([s["energy"] for s in json.loads(capsys.readouterr().out)["structures"]])
    np.testing.assert_allclose(energies[1], energies[0], rtol=0, atol=1e-8)
    reloaded = TorchANNPotential.from_file(imported).predict(files)
    np.testing.assert_allclose(reloaded.total_energy, energies[0], rtol=0, atol=1e-8)


def test_committee_train_predict_and_export(committee, tmp_path):
    assert (committee / "committee_metadata.json").is_file()
    for name in ("training_summary.png", "parity.png"):
        assert (committee / name).read_bytes()[:8] == PNG
    files = structure_files()
    table = tmp_path / "committee.csv"
    assert main(["predict", str(committee), *files, "--format", "csv",
                 "--output", str(table)]) == 0  # fmt: skip
    rows = list(csv.DictReader(table.open()))
    expected = TorchCommitteePotential.from_directory(committee).predict(files)
    np.testing.assert_allclose([float(r["energy"]) for r in rows], expected.energy_mean, 0, 1e-9)
    np.testing.assert_allclose([float(r["energy_std"]) for r in rows], expected.energy_std, 0, 1e-9)
    assert all(float(r["energy_std"]) > 0 for r in rows)
    per_atom = tmp_path / "forces.csv"
    assert main(["predict", str(committee), files[0], "--format", "csv", "--forces",
                 "--output", str(per_atom)]) == 0  # fmt: skip
    atoms = list(csv.DictReader(per_atom.open()))
    assert len(atoms) == 23 and float(atoms[0]["force_uncertainty"]) > 0
    assert main(["export-ascii", str(committee), str(tmp_path / "ascii")]) == 0
    for member in ("member_000", "member_001"):
        assert (tmp_path / "ascii" / member / "potential.Ti.nn.ascii").is_file()


def test_featurize_then_train_from_the_database(tmp_path):
    config = tables()
    descriptor = write_config(tmp_path, config)
    database = tmp_path / "tio2.h5"
    assert main(["featurize", *structure_files(8), "--output", str(database),
                 "--descriptor", str(descriptor), "--forces", "--no-progress"]) == 0  # fmt: skip
    from aenet_fn.torch_training.hdf5_dataset import HDF5StructureDataset

    with HDF5StructureDataset(None, database, mode="load") as dataset:
        assert len(dataset) == 8
        assert dataset.has_persisted_features() and dataset.has_persisted_force_derivatives()
    config["data"] = {"hdf5": "tio2.h5"}
    assert main(["train", str(write_config(tmp_path, config)), "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]["n_structures"] == 2
    config["committee"] = {"members": 2, "base_seed": 5}
    config["output"] = {"directory": "committee"}
    assert main(["train", str(write_config(tmp_path, config)), "--no-progress"]) == 0
    assert (tmp_path / "committee" / "committee_metadata.json").is_file()
    assert json.loads((tmp_path / "committee" / "metrics.json").read_text())["train"]


def test_committee_with_separate_test_files(tmp_path):
    config = tables(committee=True)
    config["data"]["test_paths"] = [str(TIO2_STRUCTURES / "structure-009.xsf")]
    assert main(["train", str(write_config(tmp_path, config)), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["n_structures"] == 1 and metrics["train"]["n_structures"] == 8


def _rename(section: str, old: str, new: str):
    return lambda t: t[section].__setitem__(new, t[section].pop(old))


def _set(section: str, key: str, value):
    return lambda t: t[section].__setitem__(key, value)


def _delete(section: str):
    return lambda t: t.pop(section)


def _move(section: str, new: str):
    return lambda t: t.__setitem__(new, t.pop(section))


ERRORS = {
    "unknown key": (
        _rename("training", "iterations", "iteration"),
        ["[training] unknown key 'iteration'", "did you mean 'iterations'?"],
    ),
    "wrong type": (
        _set("training", "iterations", "2"),
        ["[training] iterations must be an integer"],
    ),
    "bad value": (
        _set("training", "sampling_policy", "random"),
        ["[training] sampling_policy must be one of", "'uniform'", "'error_weighted'", "'random'"],
    ),
    "bad choice": (
        _set("committee", "execution", "pmap"),
        ["[committee] execution", "'sequential'"],
    ),
    "bad method value": (
        lambda t: t["training"]["adam"].__setitem__("mu", -1.0),
        ["[training.adam] mu must be > 0"],
    ),
    "unknown section": (_move("network", "networks"), ["unknown section [networks]", "[network]?"]),
    "missing section": (_delete("descriptor"), ["the section [descriptor] is required"]),
    "no matching files": (_set("data", "paths", ["no-such-*.xsf"]), ["[data] paths", "matches no"]),
    "missing file": (_set("data", "paths", "missing.xsf"), ["[data] paths", "does not exist"]),
    "unknown reference species": (
        lambda t: t["training"]["atomic_energies"].__setitem__("Xx", 0.0),
        ["[training] atomic_energies names ['Xx']", "not species of the descriptor"],
    ),
    "misspelt reference species": (
        lambda t: t["training"].__setitem__("atomic_energies", {"Ti": -1604.6, "o": -432.5}),
        ["[training] atomic_energies names ['o']", "did you mean 'O' instead of 'o'?"],
    ),
    "bad method batchsize": (
        lambda t: t["training"]["adam"].__setitem__("batchsize", 0),
        ["[training.adam] batchsize must be >= 1"],
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_configuration_errors_name_the_key(tmp_path, capsys, case):
    change, expected = ERRORS[case]
    config = tables(committee=True)
    change(config)
    path = write_config(tmp_path, config)
    assert main(["train", str(path)]) == 2
    message = capsys.readouterr().err
    assert message.startswith("aenet-fn train: error: ") and "Traceback" not in message
    for part in expected:
        assert part in message
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_check_validates_without_writing_and_existing_output_is_kept(single, capsys):
    config = next(single.parent.glob("config.*"))
    assert main(["train", str(config), "--check", "--output", str(single.parent / "x")]) == 0
    assert "valid" in capsys.readouterr().out and not (single.parent / "x").exists()
    before = (single / "model.pt").read_bytes()
    assert main(["train", str(config)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (single / "model.pt").read_bytes() == before


def test_json_configuration_has_the_same_schema(tmp_path, capsys):
    config = tables()
    path = write_config(tmp_path, config, toml=False)
    assert main(["train", str(path), "--check"]) == 0
    assert f"output: {tmp_path / 'run'}" in capsys.readouterr().out
    config["training"]["adam"]["batch_size"] = 4
    assert main(["train", str(write_config(tmp_path, config, toml=False)), "--check"]) == 2
    assert "[training.adam] unknown key 'batch_size'; did you mean 'batchsize'?" in (
        capsys.readouterr().err
    )


@pytest.mark.skipif(not TOML, reason="TOML configurations need Python >= 3.11")
def test_the_example_configuration_of_the_help_is_valid(tmp_path, capsys):
    (tmp_path / "structures").mkdir()
    for source in structure_files():
        (tmp_path / "structures" / Path(source).name).write_bytes(Path(source).read_bytes())
    (tmp_path / "example.toml").write_text(CONFIG_EXAMPLE)
    assert main(["train", str(tmp_path / "example.toml"), "--check"]) == 0
    assert "(single potential, 3 data path(s))" in capsys.readouterr().out


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "none.pt"), str(tmp_path / "x.xsf")]) == 1
    assert "none.pt: no such model file or committee directory" in capsys.readouterr().err


def test_fast_demo_writes_plots_and_prints_the_summary(tmp_path, capsys):
    assert main(["demo", "--fast", "--no-progress", "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for part in ("E RMSE", "meV/atom", "spread F", "train", "test", "MD check", "energy drift"):
        assert part in printed
    for name in ("training_summary.png", "parity.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert (tmp_path / "committee_metadata.json").is_file()
    assert len(list(tmp_path.glob("member_*/model.pt"))) == 4
    if TOML:
        assert main(["train", str(tmp_path / "demo.toml"), "--check", "--overwrite"]) == 0


def test_python_m_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "aenet_fn", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    for command in ("train", "predict", "export-ascii", "import-ascii", "featurize", "demo"):
        assert command in done.stdout


def one_line_error(capsys, command: str) -> str:
    """The standard error of a failed command, checked to be one line without a traceback."""
    message = capsys.readouterr().err
    assert message.startswith(f"aenet-fn {command}: error: "), message
    assert "Traceback" not in message and message.count("\n") == 1, message
    return message


def overlapping(folder: Path) -> Path:
    """A copy of a TiO2 structure whose second atom sits on its first."""
    lines = (TIO2_STRUCTURES / "structure-001.xsf").read_text().splitlines()
    first = lines.index("PRIMCOORD") + 2
    lines[first + 1] = lines[first]
    path = folder / "overlap.xsf"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_binary_configuration_is_a_one_line_error(tmp_path, capsys, suffix):
    path = tmp_path / f"cfg{suffix}"
    path.write_bytes(PNG + bytes(range(256)))
    assert main(["train", str(path)]) == 2
    assert f"{path}: not a text file" in one_line_error(capsys, "train")


def test_testpercent_100_is_refused_by_check_and_train(tmp_path, capsys):
    config = tables()
    config["training"]["testpercent"] = 100
    path = write_config(tmp_path, config)
    for extra in (["--check"], ["--no-progress"]):
        assert main(["train", str(path), *extra]) == 2
        assert "[training] testpercent must be < 100" in one_line_error(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_predict_names_a_structure_that_cannot_be_predicted(single, tmp_path, capsys):
    model = str(single / "model.pt")
    bad = overlapping(tmp_path)
    assert main(["predict", model, structure_files(1)[0], str(bad)]) == 1
    message = one_line_error(capsys, "predict")
    assert f"{bad}: neighbor_list" in message and "overlap" in message
    lines = (TIO2_STRUCTURES / "structure-001.xsf").read_text().replace("Ti ", "Xe ", 1)
    (tmp_path / "xe.xsf").write_text(lines)
    assert main(["predict", model, str(tmp_path / "xe.xsf")]) == 1
    message = one_line_error(capsys, "predict")
    assert "species ['Xe'] are not in the model's species ['Ti', 'O']" in message
    assert "xe.xsf" in message


def test_training_and_featurizing_overlapping_atoms_name_the_file(tmp_path, capsys):
    config = tables()
    bad = overlapping(tmp_path)
    config["data"]["paths"].append(str(bad))
    path = write_config(tmp_path, config)
    assert main(["train", str(path), "--no-progress"]) == 1
    message = one_line_error(capsys, "train")
    assert f"{bad}: neighbor_list" in message and "overlap" in message
    assert not (tmp_path / "run" / "model.pt").exists()
    files = [*structure_files(1), str(bad)]
    database = tmp_path / "db.h5"
    assert main(["featurize", *files, "--output", str(database), "--descriptor", str(path),
                 "--no-progress"]) == 1  # fmt: skip
    assert f"{bad}: neighbor_list" in one_line_error(capsys, "featurize")
    assert not database.exists()


def test_library_errors_are_one_line(single, tmp_path, capsys):
    model = str(single / "model.pt")
    (tmp_path / "keep.txt").write_text("kept")
    assert main(["export-ascii", model, str(tmp_path / "keep.txt")]) == 1
    message = one_line_error(capsys, "export-ascii")
    assert "OUTDIR" in message and "keep.txt exists and is not a folder" in message
    files = structure_files(1)
    assert main(["predict", model, *files, "--output", str(tmp_path / "keep.txt" / "p")]) == 1
    assert "keep.txt" in one_line_error(capsys, "predict")  # an OSError from the library
    assert (tmp_path / "keep.txt").read_text() == "kept"
    with pytest.raises(OSError):
        main(["--debug", "predict", model, *files, "--output", str(tmp_path / "keep.txt" / "p")])


def test_no_command_replaces_its_inputs(single, tmp_path, capsys):
    model = tmp_path / "model.pt"
    model.write_bytes((single / "model.pt").read_bytes())
    xsf = tmp_path / "in.xsf"
    xsf.write_text(Path(structure_files(1)[0]).read_text())
    assert main(["export-ascii", str(model), str(tmp_path / "nn")]) == 0
    ascii_files = [str(tmp_path / "nn" / f"potential.{s}.nn.ascii") for s in ("Ti", "O")]
    (tmp_path / "in.Ti.nn.ascii").write_text("not a structure")  # what export-ascii would write
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    commands = [
        ["predict", str(model), str(xsf), "--output", str(model)],
        ["predict", str(model), str(xsf), "--output", str(xsf), "--overwrite"],
        ["predict", str(model), str(tmp_path), "--output", str(xsf), "--overwrite"],
        ["featurize", str(xsf), "--output", str(xsf), "--overwrite", "--no-progress"],
        ["import-ascii", *ascii_files, "--output", ascii_files[0], "--overwrite"],
        ["import-ascii", str(tmp_path / "nn"), "--output", ascii_files[1], "--overwrite"],
        ["export-ascii", str(model), str(tmp_path), "--prefix", "in", "--structures",
         str(tmp_path / "in.Ti.nn.ascii")],
    ]  # fmt: skip
    for command in commands:
        assert main(command) == 1, command
        assert "is one of this command's inputs" in one_line_error(capsys, command[0])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_existing_outputs_need_overwrite(single, tmp_path, capsys):
    model = str(single / "model.pt")
    files = structure_files(1)
    assert main(["export-ascii", model, str(tmp_path / "nn")]) == 0
    ascii_files = sorted(str(p) for p in (tmp_path / "nn").iterdir())
    target = tmp_path / "existing"
    commands = [
        ["predict", model, *files, "--output", str(target)],
        ["import-ascii", *ascii_files, "--output", str(target)],
        ["featurize", *files, "--output", str(target), "--no-progress"],
    ]
    for command in commands:
        target.write_text("precious")
        assert main(command) == 1, command
        assert "already exists" in one_line_error(capsys, command[0])
        assert target.read_text() == "precious"
        assert main([*command, "--overwrite"]) == 0, command
        assert target.read_bytes() != b"precious"
    capsys.readouterr()
    assert main(["export-ascii", model, str(tmp_path / "nn")]) == 1
    assert "potential.Ti.nn.ascii already exists" in one_line_error(capsys, "export-ascii")
    assert main(["export-ascii", model, str(tmp_path / "nn"), "--overwrite"]) == 0


def test_device_options_are_checked_and_name_the_option(single, tmp_path, capsys):
    config = tables()
    config["training"]["num_workers"] = 2
    path = write_config(tmp_path, config)
    assert main(["train", str(path), "--device", "cuda", "--check"]) == 2
    assert "--device: DataLoader workers (num_workers=2)" in one_line_error(capsys, "train")
    assert main(["train", str(path), "--device", "abacus", "--check"]) == 2
    assert "--device: device must be a torch device" in one_line_error(capsys, "train")
    assert main(["predict", str(single / "model.pt"), *structure_files(1), "--device", "x"]) == 1
    assert "device must be a torch device" in one_line_error(capsys, "predict")


def test_predict_on_an_explicit_device_gives_the_same_numbers(single, capsys):
    files = structure_files(2)
    arguments = ["predict", str(single / "model.pt"), *files, "--format", "json", "--forces"]
    assert main(arguments) == 0
    default = capsys.readouterr().out
    assert main([*arguments, "--device", "cpu"]) == 0
    assert capsys.readouterr().out == default


def test_a_diverging_run_fails_with_one_line_and_writes_no_model(tmp_path, capsys):
    config = tables()
    config["training"]["adam"]["mu"] = 1e300
    path = write_config(tmp_path, config)
    assert main(["train", str(path), "--no-progress"]) == 1
    assert "diverged in epoch 0" in one_line_error(capsys, "train")
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_json_configuration_repeating_a_key_is_refused(tmp_path, capsys):
    path = write_config(tmp_path, tables(), toml=False)
    text = path.read_text().replace('"iterations": 2', '"iterations": 2, "iterations": 50')
    path.write_text(text)
    assert main(["train", str(path), "--check"]) == 2
    assert "the key 'iterations' appears twice" in one_line_error(capsys, "train")


def test_committee_metadata_listing_a_member_twice_is_refused(committee, tmp_path):
    import shutil

    copy = tmp_path / "committee"
    shutil.copytree(committee, copy)
    metadata = copy / "committee_metadata.json"
    document = json.loads(metadata.read_text())
    document["members"].append(document["members"][0])
    metadata.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="member 0 is listed more than once"):
        TorchCommitteePotential.from_directory(copy)


@pytest.mark.parametrize(
    "error",
    [MemoryError(), RecursionError("maximum recursion depth exceeded"), RuntimeError("CUDA oops")],
    ids=["memory", "recursion", "runtime"],
)
def test_unexpected_errors_are_one_line_with_exit_status_3(single, capsys, monkeypatch, error):
    import aenet_fn.cli.predict as predict_module

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(predict_module, "predict_structures", fails)
    arguments = ["predict", str(single / "model.pt"), *structure_files(1)]
    assert main(arguments) == 3
    message = one_line_error(capsys, "predict")
    assert f"unexpected {type(error).__name__}" in message and "--debug" in message
    with pytest.raises(type(error)):
        main(["--debug", *arguments])


def _checkpointed(folder: Path, iterations: int) -> Path:
    config = tables()
    config["training"].update(iterations=iterations, checkpoint_dir="checkpoints")
    return write_config(folder, config)


def _weights(folder: Path) -> torch.Tensor:
    return TorchANNPotential.from_file(folder / "model.pt").model.network.values


def test_resume_continues_the_folders_run_as_if_never_stopped(tmp_path, capsys):
    straight = _checkpointed(tmp_path / "straight", 3)
    assert main(["train", str(straight), "--no-progress"]) == 0
    stopped = _checkpointed(tmp_path / "stopped", 1)  # a run that ended after 1 of 3 epochs
    assert main(["train", str(stopped), "--no-progress"]) == 0
    resumed = _checkpointed(tmp_path / "stopped", 3)
    assert main(["train", str(resumed), "--no-progress"]) == 1
    assert "pass --resume to continue it or --overwrite" in one_line_error(capsys, "train")
    assert main(["train", str(resumed), "--no-progress", "--resume"]) == 0
    capsys.readouterr()
    assert torch.equal(
        _weights(tmp_path / "stopped" / "run"), _weights(tmp_path / "straight" / "run")
    )
    history = json.loads((tmp_path / "stopped" / "run" / "history.json").read_text())
    assert len(history["RMSE_train"]) == 3
    assert main(["train", str(resumed), "--no-progress", "--resume"]) == 1
    assert "the run is complete (3 of 3 epochs)" in one_line_error(capsys, "train")
    assert main(["train", str(resumed), "--resume", "--overwrite"]) == 2
    assert "give one" in one_line_error(capsys, "train")


def test_resume_needs_a_checkpoint_and_a_single_potential(tmp_path, capsys):
    path = write_config(tmp_path / "plain", tables())
    assert main(["train", str(path), "--resume", "--check"]) == 1
    assert "no checkpoint to resume from" in one_line_error(capsys, "train")
    path = write_config(tmp_path / "committee", tables(True))
    assert main(["train", str(path), "--resume", "--check"]) == 1
    assert "committees keep no checkpoints" in one_line_error(capsys, "train")


def test_overwrite_replaces_a_run_as_a_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    import aenet_fn.cli.train as train_module

    path = _checkpointed(tmp_path, 2)
    run = tmp_path / "run"
    assert main(["train", str(path), "--no-progress"]) == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("the new run failed half-way")

    monkeypatch.setattr(train_module, "_write_results", broken)
    assert main(["train", str(path), "--no-progress", "--overwrite"]) == 3
    capsys.readouterr()
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # the old run, whole: nothing of the failed one, no lock
    monkeypatch.undo()
    changed = tables()
    changed["training"].update(iterations=1, checkpoint_dir="checkpoints", seed=9)
    assert (
        main(["train", str(write_config(tmp_path, changed)), "--no-progress", "--overwrite"]) == 0
    )
    names = sorted(p.name for p in (run / "checkpoints").glob("checkpoint_epoch_*.pt"))
    assert names == ["checkpoint_epoch_0000.pt"]  # none of the old run's epochs is left
    assert not (run / ".replaced-run").exists()


def test_a_folder_in_use_by_a_live_run_is_refused_and_a_dead_runs_lock_is_taken_over(
    tmp_path, capsys
):
    import os
    import socket

    path = write_config(tmp_path, tables())
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".aenet-fn.lock"
    lock.write_text(f"{os.getppid()} {socket.gethostname()}")  # a live process on this host
    assert main(["train", str(path), "--no-progress"]) == 1
    assert f"in use by another aenet-fn run (process {os.getppid()}" in one_line_error(
        capsys, "train"
    )
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    lock.write_text(f"{dead} {socket.gethostname()}")
    assert main(["train", str(path), "--no-progress"]) == 0
    assert (run / "model.pt").exists() and not lock.exists()


def test_a_potential_with_switched_off_features_survives_export_and_import(tmp_path, capsys):
    """Angular cutoff 1.0 Å: no triplets, constant angular features, which ænet files mark as
    switched off (std +inf on reading); export-ascii → import-ascii → predict closes and
    predicts what the original did."""
    from aenet_fn.torch_training import Adam, TorchTrainingConfig

    descriptor = ChebyshevDescriptor(["Ti", "O"], 4, 4.0, 2, 1.0, min_cutoff=0.5)
    potential = TorchANNPotential({"Ti": [(4, "tanh")], "O": [(4, "tanh")]}, descriptor)
    config = TorchTrainingConfig(
        iterations=1,
        method=Adam(batchsize=3),
        testpercent=0,
        atomic_energies={"Ti": -1604.6, "O": -432.5},
        checkpoint_dir=None,
        show_progress=False,
    )
    potential.train(structures=structure_files(6), config=config)
    potential.save(tmp_path / "model.pt")
    assert main(["export-ascii", str(tmp_path / "model.pt"), str(tmp_path / "ascii")]) == 0
    back = tmp_path / "back.pt"
    assert main(["import-ascii", str(tmp_path / "ascii"), "--output", str(back)]) == 0
    capsys.readouterr()
    imported = TorchANNPotential.from_file(back)
    assert torch.isinf(imported.model.normalization.feature_std).any()
    files = structure_files(3)
    np.testing.assert_allclose(
        imported.predict(files).total_energy, potential.predict(files).total_energy, rtol=1e-12
    )
    assert main(["predict", str(back), *files]) == 0


def test_model_files_with_nan_or_negative_feature_spread_are_refused(tmp_path):
    import attrs

    potential = TorchANNPotential.from_aenet_ascii(TIO2_POTENTIAL)
    for bad in (float("nan"), -1.0):
        std = potential.model.normalization.feature_std.clone()
        std[0, 3] = bad
        norm = attrs.evolve(potential.model.normalization, feature_std=std)
        potential.model = attrs.evolve(potential.model, normalization=norm)
        potential.save(tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=r"feature_std are not all finite \(or \+inf"):
            TorchANNPotential.from_file(tmp_path / "bad.pt")


def test_check_refuses_output_and_checkpoint_folders_that_are_files(tmp_path, capsys):
    config = tables()
    config["training"]["checkpoint_dir"] = "checkpoints"
    path = write_config(tmp_path, config)
    (tmp_path / "run").write_text("a file where the output folder goes")
    assert main(["train", str(path), "--check"]) == 1
    assert "[output] directory" in one_line_error(capsys, "train")
    (tmp_path / "run").unlink()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where checkpoints go")
    assert main(["train", str(path), "--check"]) == 1
    assert "checkpoint_dir" in one_line_error(capsys, "train")
    (tmp_path / "run" / "checkpoints").unlink()
    assert main(["train", str(path), "--check"]) == 0


def test_check_estimates_the_memory_of_the_run_and_refuses_what_does_not_fit(
    tmp_path, capsys, monkeypatch
):
    """``--check`` reads the data and prints what the run would hold (structures, atoms,
    neighbours per atom, networks) against the memory available; more than that is refused
    naming the numbers, without writing anything."""
    import aenet_fn.cli.memory as memory

    path = write_config(tmp_path, tables())
    assert main(["train", str(path), "--check"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("memory: about ") and "for 8 structures, 215 atoms" in line
    assert "derivatives kept in memory" in line and "available" in line
    neighbours = int(line.split("; ")[1].split(" neighbours")[0])
    assert 5 < neighbours < 60  # TiO2 within 4 Å
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    assert main(["train", str(path), "--check"]) == 1
    error = capsys.readouterr().err
    assert "more than the 0.000954 MiB available" in error and "8 structures" in error
    assert not (tmp_path / "run").exists()
