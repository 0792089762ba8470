"""Tests of ``aenet_fn.io.train``: TrainOut (history, stats, text, plots), history files and the
energies files."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import aenet_fn.io.train as train_io
from aenet_fn.io.train import (
    HISTORY_COLUMNS,
    Energies,
    TrainOut,
    read_history,
    write_energies,
    write_history,
)

NAN = float("nan")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STAT_KEYS = [
    "final_MAE_train",
    "final_RMSE_train",
    "final_MAE_test",
    "final_RMSE_test",
    "min_RMSE_test",
    "epoch_min_RMSE_test",
]
FORCE_STAT_KEYS = [
    "final_RMSE_force_train",
    "final_RMSE_force_test",
    "min_RMSE_force_test",
    "epoch_min_RMSE_force_test",
]

TRAIN_OUT = """\
 Weight optimization for 3 epochs using the Adaptive Moment Estimation (Adam) method.

        |------------TRAIN-----------|  |------------TEST------------|
 epoch             MAE          <RMSE>             MAE          <RMSE>
     0    2.150739E+00    2.346867E+00    2.653921E+00    2.718389E+00 <
     1    1.922196E+00    2.093266E+00    2.374289E+00    2.430859E+00 <
     2    1.714063D+00    1.860964E+00    2.108215E+00    2.154571E+00 <
     3    1.522756E+00    1.640675E+00    1.870729E+00    2.202153E+00

 Training finished.

 Final MAE of training set  =   1522.8 meV/atom
"""


def _history(n: int = 6, forces: bool = False, seed: int = 0) -> tuple[dict[str, float], ...]:
    """A driver-style history: a tuple of per-epoch dicts (eV/atom, eV/Å, s)."""
    rng = np.random.default_rng(seed)
    rows = []
    for epoch in range(n):
        decay = 1.0 / (1.0 + epoch)
        rows.append(
            {
                "epoch": epoch,
                "MAE_train": 0.5 * decay + 0.01 * rng.random(),
                "RMSE_train": 0.8 * decay + 0.01 * rng.random(),
                "MAE_test": 0.6 * decay + 0.05 * rng.random(),
                "RMSE_test": 0.9 * decay + 0.2 * rng.random(),
                "RMSE_force_train": 0.3 * decay + 0.01 * rng.random() if forces else NAN,
                "RMSE_force_test": 0.4 * decay + 0.1 * rng.random() if forces else NAN,
                "learning_rate": 1e-3 * 0.5 ** (epoch // 2),
                "epoch_time": 0.1 + 0.01 * epoch + 0.001 * rng.random(),
            }
        )
    return tuple(rows)


def _assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3
    assert image.shape[0] > 50 and image.shape[1] > 50


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# --------------------------------------------------------------------------------------------
# construction and the errors table


def test_errors_table_energy_only() -> None:
    history = _history(5)
    out = TrainOut.from_torch_history(history, config={"iterations": 5})
    assert list(out.errors.columns) == list(HISTORY_COLUMNS)
    assert len(out.errors) == 5
    for column in HISTORY_COLUMNS:
        expected = np.array([row[column] for row in history])
        np.testing.assert_array_equal(out.errors[column].to_numpy(), expected)
    assert out.errors["RMSE_force_train"].isna().all()
    assert out.errors["RMSE_force_test"].isna().all()
    assert out.learning_rate == [row["learning_rate"] for row in history]
    assert out.timing is not None and list(out.timing.columns) == ["epoch_time"]
    np.testing.assert_array_equal(
        out.timing["epoch_time"].to_numpy(), [row["epoch_time"] for row in history]
    )
    assert out.path is None
    assert out.config == {"iterations": 5}
    assert out.energies is None
    assert out.has_force_data is False


def test_errors_table_with_forces_and_dict_of_lists() -> None:
    history = _history(4, forces=True)
    out = TrainOut(history_data=history)
    assert out.has_force_data is True
    by_column = {key: [row[key] for row in history] for key in history[0]}
    same = TrainOut(history_data=by_column)
    pd.testing.assert_frame_equal(out.errors, same.errors)
    # the reference's key names (history.json of aenet's torch trainer) are accepted too
    reference = {
        "train_energy_rmse": by_column["RMSE_train"],
        "test_energy_rmse": by_column["RMSE_test"],
        "train_energy_mae": by_column["MAE_train"],
        "test_energy_mae": by_column["MAE_test"],
        "train_force_rmse": by_column["RMSE_force_train"],
        "test_force_rmse": by_column["RMSE_force_test"],
        "learning_rate": by_column["learning_rate"],
        "epoch_time": by_column["epoch_time"],
        "forward_time": [0.01] * 4,
    }
    renamed = TrainOut(history_data=reference)
    pd.testing.assert_frame_equal(out.errors, renamed.errors)
    assert renamed.timing is not None
    assert list(renamed.timing.columns) == ["epoch_time", "forward_time"]


def test_partial_force_data_counts_as_force_data() -> None:
    history = list(_history(3))
    history[1] = {**history[1], "RMSE_force_test": 0.2}
    assert TrainOut(history_data=history).has_force_data is True


def test_path_and_history_data_exclusive(tmp_path: Path) -> None:
    trainout = tmp_path / "train.out"
    trainout.write_text(TRAIN_OUT)
    with pytest.raises(ValueError, match="exactly one"):
        TrainOut()
    with pytest.raises(ValueError, match="exactly one"):
        TrainOut(path=trainout, history_data=_history(2))
    with pytest.raises(FileNotFoundError):
        TrainOut(path=tmp_path / "missing.out")


def test_bad_history_data() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        TrainOut(history_data={"RMSE_train": [1.0, 2.0], "RMSE_test": [1.0]})
    with pytest.raises(ValueError, match="none of the expected keys"):
        TrainOut(history_data=[{"foo": 1.0}])
    with pytest.raises(ValueError, match="list of per-epoch values"):
        TrainOut(history_data={"RMSE_train": 1.0})
    with pytest.raises(ValueError, match="expected a number"):
        TrainOut(history_data=[{"RMSE_train": "abc"}])
    with pytest.raises(TypeError):
        TrainOut(history_data=3.0)


def test_empty_history() -> None:
    out = TrainOut(history_data=())
    assert len(out.errors) == 0
    assert all(math.isnan(value) for value in out.stats.values())
    assert repr(out) == "TrainOut(n_epochs=0, source=in-memory, has_forces=False)"


# --------------------------------------------------------------------------------------------
# statistics and text


@pytest.mark.parametrize("forces", [False, True])
def test_stats_match_direct_computation(forces: bool) -> None:
    history = _history(7, forces=forces, seed=3)
    frame = pd.DataFrame(list(history))
    stats = TrainOut.from_torch_history(history).stats
    assert list(stats) == STAT_KEYS + FORCE_STAT_KEYS
    for column in ("MAE_train", "RMSE_train", "MAE_test", "RMSE_test"):
        assert stats[f"final_{column}"] == frame[column].iloc[-1]
    assert stats["min_RMSE_test"] == frame["RMSE_test"].min()
    assert stats["epoch_min_RMSE_test"] == int(np.argmin(frame["RMSE_test"].to_numpy())) + 1
    assert isinstance(stats["epoch_min_RMSE_test"], int)
    if forces:
        assert stats["final_RMSE_force_train"] == frame["RMSE_force_train"].iloc[-1]
        assert stats["final_RMSE_force_test"] == frame["RMSE_force_test"].iloc[-1]
        assert stats["min_RMSE_force_test"] == frame["RMSE_force_test"].min()
        expected = int(np.argmin(frame["RMSE_force_test"].to_numpy())) + 1
        assert stats["epoch_min_RMSE_force_test"] == expected
    else:
        # all-NaN columns: NaN minima and NaN epochs (the reference reports epoch 1)
        for key in FORCE_STAT_KEYS:
            assert math.isnan(stats[key]), key


def test_stats_argmin_is_one_based_and_skips_nan() -> None:
    rmse_test = [0.5, NAN, 0.2, 0.3, NAN]
    history = [
        {"RMSE_train": 1.0, "MAE_train": 1.0, "MAE_test": 1.0, "RMSE_test": value}
        for value in rmse_test
    ]
    stats = TrainOut(history_data=history).stats
    assert stats["min_RMSE_test"] == 0.2
    assert stats["epoch_min_RMSE_test"] == 3
    assert math.isnan(stats["final_RMSE_test"])  # the last epoch's value, even when NaN
    # a minimum in the first epoch is epoch 1, not 0
    first = [{**row, "RMSE_test": 0.01 if i == 0 else 1.0} for i, row in enumerate(history)]
    assert TrainOut(history_data=first).stats["epoch_min_RMSE_test"] == 1


def test_str_and_repr() -> None:
    out = TrainOut.from_torch_history(_history(3, forces=True))
    lines = str(out).splitlines()
    assert lines[0] == "Training statistics:"
    assert len(lines) == 1 + len(STAT_KEYS) + len(FORCE_STAT_KEYS)
    for line, (key, value) in zip(lines[1:], out.stats.items()):
        assert line == f"{key}: {value}"
    assert repr(out) == "TrainOut(n_epochs=3, source=in-memory, has_forces=True)"
    energy_only = TrainOut.from_torch_history(_history(2))
    assert repr(energy_only) == "TrainOut(n_epochs=2, source=in-memory, has_forces=False)"
    assert "epoch_min_RMSE_force_test: nan" in str(energy_only)


def test_trainoutput_alias_is_deprecated() -> None:
    with pytest.warns(DeprecationWarning, match="TrainOut"):
        alias = train_io.TrainOutput
    assert alias is TrainOut
    with pytest.raises(AttributeError):
        _ = train_io.NoSuchThing


# --------------------------------------------------------------------------------------------
# Fortran train.x output


def test_read_train_x_output(tmp_path: Path) -> None:
    path = tmp_path / "train.out"
    path.write_text(TRAIN_OUT)
    out = TrainOut(path=path)
    assert out.path == path
    assert list(out.errors.columns) == ["MAE_train", "RMSE_train", "MAE_test", "RMSE_test"]
    assert len(out.errors) == 4
    assert out.errors["MAE_train"].tolist()[2] == 1.714063  # Fortran D exponent
    assert out.errors.iloc[-1].tolist() == [1.522756, 1.640675, 1.870729, 2.202153]
    assert out.has_force_data is False
    assert out.timing is None and out.learning_rate is None
    stats = out.stats
    assert list(stats) == STAT_KEYS
    assert stats["min_RMSE_test"] == 2.154571
    assert stats["epoch_min_RMSE_test"] == 3
    assert repr(out) == "TrainOut(n_epochs=4, source=file, has_forces=False)"
    with pytest.raises(ValueError, match="no force"):
        out.plot_force_errors()


def test_read_train_x_output_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.out"
    lines = TRAIN_OUT.splitlines()
    lines[5] = "     1    1.922196E+00    ********    2.374289E+00    2.430859E+00 <"
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"broken\.out, line 6: expected"):
        TrainOut(path=broken)
    short = tmp_path / "short.out"
    lines[5] = "     1    1.922196E+00    2.093266E+00"
    short.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"short\.out, line 6"):
        TrainOut(path=short)
    unrelated = tmp_path / "unrelated.out"
    unrelated.write_text("nothing to see here\n")
    with pytest.raises(ValueError, match=r"unrelated\.out: no epoch table"):
        TrainOut(path=unrelated)


# --------------------------------------------------------------------------------------------
# history files


@pytest.mark.parametrize("forces", [False, True])
def test_write_history_round_trip(tmp_path: Path, forces: bool) -> None:
    history = _history(5, forces=forces, seed=1)
    json_path, csv_path = write_history(history, tmp_path / "member_000")
    assert json_path == tmp_path / "member_000" / "history.json"
    assert csv_path == tmp_path / "member_000" / "history.csv"
    assert not [p for p in json_path.parent.iterdir() if p.name.endswith(".tmp")]

    data = json.loads(json_path.read_text())  # strict JSON: would fail on bare NaN
    assert list(data) == ["epoch", *HISTORY_COLUMNS]
    assert data["epoch"] == [0, 1, 2, 3, 4]
    assert data["learning_rate"] == [row["learning_rate"] for row in history]
    assert data["epoch_time"] == [row["epoch_time"] for row in history]
    if not forces:
        assert data["RMSE_force_test"] == [None] * 5

    table = pd.read_csv(csv_path)
    assert list(table.columns) == ["epoch", *HISTORY_COLUMNS]
    assert table["epoch"].tolist() == [0, 1, 2, 3, 4]
    for column in HISTORY_COLUMNS:
        expected = np.array([row[column] for row in history])
        np.testing.assert_array_equal(table[column].to_numpy(), expected)  # exact floats
    assert np.isfinite(table["learning_rate"]).all()
    assert np.isfinite(table["epoch_time"]).all()

    back = read_history(json_path)
    assert len(back) == len(history)
    for read_row, row in zip(back, history):
        assert read_row.keys() == row.keys()
        assert all(_same(read_row[k], row[k]) for k in row)
    pd.testing.assert_frame_equal(
        TrainOut.from_torch_history(back).errors, TrainOut.from_torch_history(history).errors
    )
    # the loaded JSON (with nulls) is accepted as history_data directly
    pd.testing.assert_frame_equal(
        TrainOut(history_data=data).errors, TrainOut.from_torch_history(history).errors
    )


def test_write_history_overwrites_atomically(tmp_path: Path) -> None:
    write_history(_history(3), tmp_path)
    json_path, csv_path = write_history(_history(2), tmp_path)
    assert len(read_history(json_path)) == 2
    assert len(pd.read_csv(csv_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv", "history.json"]


# --------------------------------------------------------------------------------------------
# plots


@pytest.mark.parametrize("forces", [False, True])
def test_plots_write_png(tmp_path: Path, forces: bool) -> None:
    out = TrainOut.from_torch_history(_history(6, forces=forces))
    figure = out.plot_training_errors(outfile=tmp_path / "energy.png")
    assert isinstance(figure, Figure)
    assert figure.axes[0].get_yscale() == "log"
    assert len(figure.axes[0].lines) == 2
    _assert_png(tmp_path / "energy.png")

    summary = out.plot_training_summary(outfile=tmp_path / "summary.png")
    assert len(summary.axes) == (2 if forces else 1)
    _assert_png(tmp_path / "summary.png")

    if forces:
        force_figure = out.plot_force_errors(outfile=tmp_path / "forces.png")
        assert isinstance(force_figure, Figure)
        assert force_figure.axes[0].get_yscale() == "log"
        _assert_png(tmp_path / "forces.png")
    else:
        with pytest.raises(ValueError, match="no force"):
            out.plot_force_errors(outfile=tmp_path / "forces.png")
        assert not (tmp_path / "forces.png").exists()


@pytest.mark.parametrize("forces", [False, True])
def test_a_stress_history_adds_a_stress_panel_and_statistics(tmp_path: Path, forces: bool) -> None:
    history = [
        {**row, "RMSE_stress_train": 0.1 / (k + 1), "RMSE_stress_test": 0.2 / (k + 1)}
        for k, row in enumerate(_history(4, forces=forces))
    ]
    out = TrainOut.from_torch_history(history)
    summary = out.plot_training_summary(outfile=tmp_path / "summary.png")
    assert [axis.get_title() for axis in summary.axes][-1] == "Stress errors"
    assert len(summary.axes) == (3 if forces else 2)
    assert out.stats["final_RMSE_stress_test"] == pytest.approx(0.05)
    assert out.stats["epoch_min_RMSE_stress_test"] == 4
    _assert_png(tmp_path / "summary.png")
    assert "final_RMSE_stress_test" not in TrainOut.from_torch_history(_history(4)).stats


def test_plot_without_outfile_returns_figure_and_custom_data(tmp_path: Path) -> None:
    out = TrainOut.from_torch_history(_history(4))
    figure = out.plot_training_errors()
    assert isinstance(figure, Figure)
    assert list(tmp_path.iterdir()) == []
    subset = out.errors.iloc[:2]
    figure = out.plot_training_errors(data=subset)
    assert len(figure.axes[0].lines[0].get_xdata()) == 2
    with pytest.raises(ValueError, match="RMSE_train"):
        out.plot_training_errors(data=pd.DataFrame({"x": [1.0]}))


def test_plot_without_test_split(tmp_path: Path) -> None:
    history = [{**row, "MAE_test": NAN, "RMSE_test": NAN} for row in _history(3)]
    out = TrainOut(history_data=history)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure = out.plot_training_summary(outfile=tmp_path / "s.png")
    assert len(figure.axes[0].lines) == 1  # only the training curve
    _assert_png(tmp_path / "s.png")


# --------------------------------------------------------------------------------------------
# energies files


def _energy_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        n_ti = int(rng.integers(1, 9))
        n_o = 2 * n_ti
        ref = -1604.6 * n_ti - 432.5 * n_o + rng.normal()
        rows.append(
            {
                "ref_energy": ref,
                "ann_energy": ref + 0.1 * rng.normal(),
                "n_atoms": n_ti + n_o,
                "species_counts": {"Ti": n_ti, "O": n_o},
                "name": f"data/structure {i:03d}.xsf#frame=0",
            }
        )
    return rows


def test_energies_write_read_round_trip(tmp_path: Path) -> None:
    rows = _energy_rows(5, seed=0)
    rows[1]["cost"] = 123.25
    path = write_energies(tmp_path / "energies.train.0", rows, species=["Ti", "O"])
    assert path == tmp_path / "energies.train.0"
    header = path.read_text().splitlines()[0]
    assert header.startswith("#") and header.split()[-1] == "Path-of-input-file"
    energies = Energies(path)
    frame = energies.energies_train
    assert energies.energies_test is None
    assert list(frame.columns) == [
        "Ref(eV)",
        "ANN(eV)",
        "#atoms",
        "Ref(eV/atom)",
        "ANN(eV/atom)",
        "Ref-ANN(eV/atom)",
        "Cost-Func",
        "#Ti",
        "#O",
        "Path-of-input-file",
    ]
    assert len(frame) == 5
    ref = np.array([r["ref_energy"] for r in rows])
    ann = np.array([r["ann_energy"] for r in rows])
    n = np.array([r["n_atoms"] for r in rows])
    np.testing.assert_array_equal(frame["#atoms"].to_numpy(), n)
    np.testing.assert_array_equal(
        frame["#Ti"].to_numpy(), [r["species_counts"]["Ti"] for r in rows]
    )
    np.testing.assert_allclose(frame["Ref(eV)"], ref, rtol=1e-6)  # 14.6E: 7 significant digits
    np.testing.assert_allclose(frame["ANN(eV)"], ann, rtol=1e-6)
    np.testing.assert_allclose(frame["Ref(eV/atom)"], ref / n, rtol=1e-6)
    np.testing.assert_allclose(frame["Ref-ANN(eV/atom)"], (ref - ann) / n, rtol=1e-6)
    cost = (ref - ann) / n
    cost[1] = 123.25
    np.testing.assert_allclose(frame["Cost-Func"], cost, rtol=1e-6)
    assert frame["Path-of-input-file"].tolist() == [r["name"] for r in rows]


def test_energies_fortran_header_and_several_files(tmp_path: Path) -> None:
    text = (
        "#  Ref(eV)   ANN(eV)   #atoms  Ref(eV/atom)  ANN(eV/atom)  Ref-ANN(eV/atom)  Cost Func"
        "  Path-of-input-file\n"
        "  -1.0E+01  -1.1D+01  2  -5.0E+00  -5.5E+00  5.0E-01  5.0E-01  ./a.xsf\n\n"
        "  -2.0E+01  -2.2E+01  4  -5.0E+00  -5.5E+00  5.0E-01  5.0E-01  ./b.xsf\n"
    )
    for name in ("energies.train.0", "energies.train.1", "energies.test.0", "energies.test.1"):
        (tmp_path / name).write_text(text)
    energies = Energies(
        [tmp_path / "energies.train.0", tmp_path / "energies.train.1"],
        [tmp_path / "energies.test.0", tmp_path / "energies.test.1"],
    )
    assert "Cost-Func" in energies.energies_train.columns
    assert len(energies.energies_train) == 4 and len(energies.energies_test) == 4
    assert energies.energies_train["ANN(eV)"].tolist() == [-11.0, -22.0, -11.0, -22.0]
    energies.add_energies(tmp_path / "energies.train.0")
    assert len(energies.energies_train) == 6 and len(energies.energies_test) == 4


def test_energies_file_count_mismatch_warns(tmp_path: Path) -> None:
    rows = _energy_rows(3, seed=1)
    for name in ("energies.train.0", "energies.train.1", "energies.test.0"):
        write_energies(tmp_path / name, rows)
    with pytest.warns(UserWarning, match="test files are ignored"):
        energies = Energies(
            [tmp_path / "energies.train.0", tmp_path / "energies.train.1"],
            tmp_path / "energies.test.0",
        )
    assert len(energies.energies_train) == 6
    assert energies.energies_test is None


@pytest.mark.parametrize(
    ("replace", "line", "what"),
    [
        (lambda s: s.replace("-", "x", 1), 2, "a number in column 'Ref(eV)'"),
        (lambda s: " ".join(s.split()[:5]), 2, "expected 10 columns"),
    ],
)
def test_corrupt_energies_file(tmp_path: Path, replace, line: int, what: str) -> None:
    path = write_energies(tmp_path / "energies.test.0", _energy_rows(3, seed=2))
    lines = path.read_text().splitlines()
    lines[line - 1] = replace(lines[line - 1])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"energies\.test\.0, line {line}: .*{re.escape(what)}"):
        Energies(path)


def test_corrupt_energies_counts_and_header(tmp_path: Path) -> None:
    path = write_energies(tmp_path / "energies.train.0", _energy_rows(3, seed=2))
    lines = path.read_text().splitlines()
    parts = lines[3].split()
    parts[2] = "6.5"  # #atoms
    lines[3] = " ".join(parts)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ValueError, match=r"energies\.train\.0, line 4: expected an integer in column '#atoms'"
    ):
        Energies(path)
    no_header = tmp_path / "energies.train.1"
    no_header.write_text("  1.0 2.0 3 0.3 0.6 0.1 0.1 a.xsf\n")
    with pytest.raises(ValueError, match=r"energies\.train\.1, line 1: expected the header"):
        Energies(no_header)
    with pytest.raises(FileNotFoundError):
        Energies(tmp_path / "missing")


def test_write_energies_validation(tmp_path: Path) -> None:
    row = _energy_rows(1, seed=3)[0]
    target = tmp_path / "energies.train.0"
    with pytest.raises(ValueError, match="lacks name"):
        write_energies(target, [{k: v for k, v in row.items() if k != "name"}])
    with pytest.raises(ValueError, match="sum to"):
        write_energies(target, [{**row, "n_atoms": row["n_atoms"] + 1}])
    with pytest.raises(ValueError, match="not in"):
        write_energies(target, [row], species=["Ti"])
    with pytest.raises(ValueError, match="invalid name"):
        write_energies(target, [{**row, "name": "a\nb"}])
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_trainout_with_energies_and_correlation_plot(tmp_path: Path) -> None:
    train = write_energies(tmp_path / "energies.train.0", _energy_rows(6, seed=4))
    test = write_energies(tmp_path / "energies.test.0", _energy_rows(2, seed=5))
    out = TrainOut.from_torch_history(
        _history(3), energies_train_files=train, energies_test_files=test
    )
    assert isinstance(out.energies, Energies)
    assert len(out.energies.energies_train) == 6 and len(out.energies.energies_test) == 2
    figure = out.energies.plot_correlation(outfile=tmp_path / "corr.png")
    assert isinstance(figure, Figure)
    assert len(figure.axes[0].collections) == 2
    _assert_png(tmp_path / "corr.png")
    limited = out.energies.plot_correlation(E_min=-900.0, E_max=-800.0)
    assert limited.axes[0].get_xlim() == (-900.0, -800.0)
    with pytest.raises(ValueError, match="empty"):
        out.energies.plot_correlation(E_min=-800.0, E_max=-900.0)
    with pytest.raises(ValueError, match="without energies_train_files"):
        TrainOut.from_torch_history(_history(2), energies_test_files=test)
