"""Training results: :class:`TrainOut` (history, statistics, plots) and :class:`Energies`.

This module offers the API of the ænet Python tools' ``aenet.io.train`` (reference-api §1.4):

* :class:`TrainOut` holds the per-epoch errors of a training run, either parsed from the output
  of the Fortran ``train.x`` (``path=``) or built from an in-memory history (``history_data=`` /
  :meth:`TrainOut.from_torch_history`). It computes summary statistics and draws plots.
* :class:`Energies` reads the ``energies.train.N`` / ``energies.test.N`` files (reference §6.4)
  and draws a reference-vs-ANN correlation plot; :func:`write_energies` writes them.
* :func:`write_history` / :func:`read_history` store a history as ``history.json`` and
  ``history.csv``.

Units: energy errors are per atom (eV/atom), force errors in eV/Å, learning rates dimensionless,
epoch times in seconds.

Deliberate differences from the reference (see ``docs/differences.md``):

* ``history.csv`` holds the real learning rates and epoch times (the reference's columns are always
  NaN) and the MAE columns too; ``history.json`` is strict JSON (non-finite numbers are ``null``,
  read back as NaN) instead of bare ``NaN`` tokens.
* A history whose force columns hold no finite value (energy-only run) has
  ``has_force_data == False`` and :meth:`TrainOut.plot_force_errors` raises ``ValueError``; the
  minimum of an all-NaN column is NaN *and so is its epoch* (the reference reports epoch 1).
* Plots never call ``plt.show()``: every plotting method builds a :class:`matplotlib.figure.Figure`
  that is not registered with pyplot (so no display is needed and nothing blocks), writes it to
  ``outfile`` when one is given (PNG; another format only when the suffix names one, e.g.
  ``.pdf``), and returns it. In a notebook the returned figure is displayed;
  in a script save it with ``fig.savefig(...)`` or pass ``outfile``.

Errors in a file raise ``ValueError`` as ``"<file>, line <n>: <what was expected>"``.

Why one module of about 850 lines: it is the reference's ``aenet.io.train`` (users import
:class:`TrainOut` and :class:`Energies` from this path), and both classes share its column
tables, parsers and plotting helpers.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from aenet_fn.io.atomic import atomic_write_text
from aenet_fn.io.strict_json import strict_json_loads

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "ENERGY_COLUMNS",
    "FORCE_COLUMNS",
    "HISTORY_COLUMNS",
    "STRESS_COLUMNS",
    "Energies",
    "TrainOut",
    "read_history",
    "write_energies",
    "write_history",
]

PathLike = str | os.PathLike[str]

#: Energy error columns (eV/atom) of :attr:`TrainOut.errors`, in order.
ENERGY_COLUMNS: tuple[str, ...] = ("MAE_train", "RMSE_train", "MAE_test", "RMSE_test")
#: Force error columns (eV/Å) of :attr:`TrainOut.errors` for in-memory histories.
FORCE_COLUMNS: tuple[str, ...] = ("RMSE_force_train", "RMSE_force_test")
#: Stress error columns (eV/Å³) of :attr:`TrainOut.errors`, where the run trained on stresses.
STRESS_COLUMNS: tuple[str, ...] = ("RMSE_stress_train", "RMSE_stress_test")
#: Every column of :attr:`TrainOut.errors` for in-memory histories, in order.
HISTORY_COLUMNS: tuple[str, ...] = (*ENERGY_COLUMNS, *FORCE_COLUMNS, "learning_rate", "epoch_time")
_TIMING_COLUMNS = ("epoch_time", "forward_time", "backward_time")

# Names used by the reference's history dict / history.csv, mapped to ours.
_ALIASES = {
    "train_energy_mae": "MAE_train",
    "train_energy_rmse": "RMSE_train",
    "test_energy_mae": "MAE_test",
    "test_energy_rmse": "RMSE_test",
    "train_force_rmse": "RMSE_force_train",
    "test_force_rmse": "RMSE_force_test",
    "learning_rates": "learning_rate",
    "epoch_times": "epoch_time",
}


# --------------------------------------------------------------------------------------------
# small helpers


def _parse_float(token: str) -> float:
    """A float token, accepting Fortran ``D`` exponents (``1.0D-3``)."""
    return float(token.replace("D", "E").replace("d", "e"))


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def _as_float(value: Any, what: str) -> float:
    """``value`` as a Python float; ``None`` means NaN (``null`` in JSON)."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or isinstance(value, str):
        raise ValueError(f"{what}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a number, got {value!r}") from None


def _as_int(value: Any, what: str) -> int:
    """``value`` as a Python int (integral floats such as ``3.0`` accepted)."""
    if isinstance(value, bool) or isinstance(value, str) or value is None:
        raise ValueError(f"{what}: expected an integer, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected an integer, got {value!r}") from None
    if not number.is_integer():
        raise ValueError(f"{what}: expected an integer, got {value!r}")
    return int(number)


def _as_path_list(paths: PathLike | Sequence[PathLike] | None) -> list[Path]:
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        return [Path(os.fspath(paths))]
    return [Path(os.fspath(p)) for p in paths]


def _new_figure(n_panels: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure not registered with pyplot (needs no display), with ``n_panels`` side by side."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0 * n_panels, 4.5), layout="constrained")
    axes = figure.subplots(1, n_panels, squeeze=False)[0]
    return figure, list(axes)


def _finish(figure: Figure, outfile: PathLike | None) -> Figure:
    """Save ``figure`` to ``outfile`` when given (PNG, or the format its suffix names)."""
    if outfile is not None:
        target = Path(os.fspath(outfile))
        figure.savefig(target, format="png" if target.suffix == "" else None, dpi=120)
    return figure


def _plot_series(
    axes: Axes, frame: pd.DataFrame, columns: Sequence[tuple[str, str]], ylabel: str
) -> None:
    """Plot the finite parts of ``frame[column]`` against the 1-based epoch; log y when possible."""
    epochs = np.arange(1, len(frame) + 1)
    positive = False
    for column, label in columns:
        if column not in frame.columns:
            continue
        values = frame[column].to_numpy(dtype=float)
        finite = np.isfinite(values)
        if not finite.any():
            continue
        axes.plot(
            epochs[finite], values[finite], marker="." if finite.sum() < 50 else None, label=label
        )
        positive = positive or bool((values[finite] > 0).any())
    if positive:
        axes.set_yscale("log")
    axes.set_xlabel("Epoch")
    axes.set_ylabel(ylabel)
    if axes.lines:
        axes.legend()
    axes.grid(True, which="both", alpha=0.3)


# --------------------------------------------------------------------------------------------
# histories


def _history_columns(history_data: Any) -> dict[str, list[Any]]:
    """Normalise a history to ``{name: list}`` with our column names (reference aliases renamed).

    Accepts a sequence of per-epoch mappings (the driver's tuple of dicts), a mapping of equally
    long sequences (``history.json``; ``None`` entries mean NaN) or a pandas DataFrame.
    """
    if isinstance(history_data, pd.DataFrame):
        raw: dict[str, list[Any]] = {str(k): history_data[k].tolist() for k in history_data}
    elif isinstance(history_data, Mapping):
        raw = {}
        for key, values in history_data.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
                raise ValueError(
                    f"history_data[{key!r}]: expected a list of per-epoch values (a dict of "
                    f"lists), got {type(values).__name__}"
                )
            raw[str(key)] = list(values)
    elif isinstance(history_data, Sequence) and not isinstance(history_data, (str, bytes)):
        keys: dict[str, None] = {}
        for index, row in enumerate(history_data):
            if not isinstance(row, Mapping):
                raise ValueError(
                    f"history_data[{index}]: expected a dict of metrics for one epoch, got "
                    f"{type(row).__name__}"
                )
            keys.update(dict.fromkeys(str(k) for k in row))
        raw = {key: [row.get(key) for row in history_data] for key in keys}
    else:
        raise TypeError(
            "history_data must be a sequence of per-epoch dicts, a dict of lists or a DataFrame, "
            f"got {type(history_data).__name__}"
        )
    columns: dict[str, list[Any]] = {}
    for key, values in raw.items():
        name = _ALIASES.get(key, key)
        if name in columns and name != key:
            continue  # our own name wins over a reference alias
        columns[name] = values
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        detail = ", ".join(f"{k}: {len(v)}" for k, v in columns.items())
        raise ValueError(f"history_data: the columns have different lengths ({detail})")
    return columns


def _numeric_column(columns: Mapping[str, list[Any]], name: str, n: int) -> list[float]:
    if name not in columns:
        return [math.nan] * n
    return [_as_float(v, f"history_data[{name!r}][{i}]") for i, v in enumerate(columns[name])]


def _history_rows(history: Any) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (epoch first, then our columns, then any extra keys) of a history."""
    columns = _history_columns(history)
    n = len(next(iter(columns.values()))) if columns else 0
    names = ["epoch", *HISTORY_COLUMNS]
    names += [k for k in columns if k not in names]
    table: list[list[Any]] = []
    for name in names:
        if name == "epoch":
            values = columns.get("epoch", list(range(n)))
            table.append([_as_int(v, f"history_data['epoch'][{i}]") for i, v in enumerate(values)])
        elif name in HISTORY_COLUMNS or name in _TIMING_COLUMNS:
            table.append(_numeric_column(columns, name, n))
        else:
            table.append(
                [
                    v if isinstance(v, (str, bool, int)) or v is None else _as_float(v, name)
                    for v in columns[name]
                ]
            )
    return names, [list(row) for row in zip(*table)] if n else []


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_history(history: Any, directory: PathLike) -> tuple[Path, Path]:
    """Write ``history.json`` and ``history.csv`` into ``directory`` (created if missing).

    ``history`` is the driver's tuple of per-epoch dicts (or a dict of lists). Both files hold
    every key: ``epoch`` (0-based), ``MAE_train``, ``RMSE_train``, ``MAE_test``, ``RMSE_test``
    (eV/atom), ``RMSE_force_train``, ``RMSE_force_test`` (eV/Å), ``learning_rate`` and
    ``epoch_time`` (s), then any extra keys. ``history.json`` is a dict of lists (strict JSON:
    NaN/inf become ``null``); ``history.csv`` has one row per epoch with floats written exactly
    (``repr``; NaN as ``nan``). Each file is written atomically (temporary file + ``os.replace``).
    Returns ``(json_path, csv_path)``.
    """
    names, rows = _history_rows(history)
    target = Path(os.fspath(directory))
    target.mkdir(parents=True, exist_ok=True)
    by_column = {name: [_json_value(row[i]) for row in rows] for i, name in enumerate(names)}
    json_path = target / "history.json"
    csv_path = target / "history.csv"
    body = ",\n".join(
        f" {json.dumps(name)}: {json.dumps(values, allow_nan=False)}"
        for name, values in by_column.items()
    )
    atomic_write_text(json_path, "{\n" + body + "\n}\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        writer.writerow(repr(v) if isinstance(v, float) else v for v in row)
    atomic_write_text(csv_path, buffer.getvalue())
    return json_path, csv_path


def read_history(json_path: PathLike) -> tuple[dict[str, Any], ...]:
    """Read a ``history.json`` written by :func:`write_history` (or the reference's, whose keys
    are renamed to ours) back into the driver's tuple of per-epoch dicts (``null`` → NaN)."""
    path = Path(os.fspath(json_path))
    with path.open(encoding="utf-8") as handle:
        try:
            data = strict_json_loads(handle.read())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}: invalid JSON ({error.msg})") from None
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a JSON object of per-epoch lists")
    names, rows = _history_rows(data)
    return tuple(dict(zip(names, row)) for row in rows)


# --------------------------------------------------------------------------------------------
# Fortran train.x output


def _read_train_out(path: Path) -> pd.DataFrame:
    """Parse the epoch table(s) of a Fortran ``train.x`` output file.

    A table starts at a header line whose first word is ``epoch`` followed by ``MAE <RMSE> MAE
    <RMSE>`` (training, then testing; ``MAE <RMSE>`` alone means training only) and continues
    with rows ``<epoch> <MAE> <RMSE> [<MAE> <RMSE>] [marker]`` (the trailing ``<`` marks a saved
    network) until the first line that does not start with an integer. Several tables (a
    restarted run) are concatenated. Returns the columns ``MAE_train, RMSE_train, MAE_test,
    RMSE_test`` (eV/atom), one row per epoch line.
    """
    rows: list[list[float]] = []
    n_metrics = 0  # metric columns of the current table; 0 = outside a table
    table_rows = 0  # rows of the current table
    found = False
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            tokens = line.split()
            if (
                tokens
                and tokens[0].lower() == "epoch"
                and any("MAE" in t.upper() or "RMSE" in t.upper() for t in tokens[1:])
            ):
                names = [t.strip("<>").upper() for t in tokens[1:]]
                if names not in (["MAE", "RMSE", "MAE", "RMSE"], ["MAE", "RMSE"]):
                    raise ValueError(
                        f"{path}, line {number}: expected the epoch table header 'epoch MAE "
                        f"<RMSE> MAE <RMSE>', found {line.strip()!r}"
                    )
                n_metrics, table_rows, found = len(names), 0, True
                continue
            if not n_metrics:
                continue
            if not tokens or not _is_int(tokens[0]):
                if tokens or table_rows:
                    n_metrics = 0  # a blank line right after the header does not end the table
                continue
            expected = (
                "'epoch MAE_train RMSE_train MAE_test RMSE_test [<]'"
                if n_metrics == 4
                else "'epoch MAE_train RMSE_train [<]'"
            )
            values = tokens[1 : 1 + n_metrics]
            extra = tokens[1 + n_metrics :]
            try:
                numbers = [_parse_float(t) for t in values]
            except ValueError:
                numbers = []
            if len(numbers) != n_metrics or any(_is_number(t) for t in extra):
                raise ValueError(
                    f"{path}, line {number}: expected {expected}, found {line.strip()!r}"
                )
            rows.append(numbers + [math.nan] * (4 - n_metrics))
            table_rows += 1
    if not found:
        raise ValueError(
            f"{path}: no epoch table found (a header line 'epoch MAE <RMSE> MAE <RMSE>' followed "
            "by one line per epoch); is this the output of train.x?"
        )
    return pd.DataFrame(rows, columns=list(ENERGY_COLUMNS), dtype=float)


def _is_number(token: str) -> bool:
    try:
        _parse_float(token)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# TrainOut


class TrainOut:
    """Errors per epoch of a training run, with statistics and plots.

    Give exactly one of ``path`` (output file of the Fortran ``train.x``) or ``history_data``
    (in-memory history: the driver's tuple of per-epoch dicts, a dict of lists such as a loaded
    ``history.json``, or a DataFrame; the reference's key names are accepted too).
    ``energies_train_files`` / ``energies_test_files`` (a path or a list of paths) fill in
    :attr:`energies`.

    Attributes:
        path: the ``train.x`` output file, or None for an in-memory history.
        config: the training configuration (stored as given).
        errors: DataFrame with one row per epoch (row ``i`` = epoch ``i + 1``): ``MAE_train,
            RMSE_train, MAE_test, RMSE_test`` (eV/atom); in-memory histories also have
            ``RMSE_force_train, RMSE_force_test`` (eV/Å), ``learning_rate`` and ``epoch_time``
            (s), NaN where not available.
        energies: :class:`Energies` of the energies files, or None.
        timing: DataFrame of ``epoch_time`` (and ``forward_time`` / ``backward_time`` when the
            history has them; s), or None.
        learning_rate: the learning rate of every epoch, or None.
    """

    def __init__(
        self,
        path: PathLike | None = None,
        energies_train_files: PathLike | Sequence[PathLike] | None = None,
        energies_test_files: PathLike | Sequence[PathLike] | None = None,
        history_data: Any = None,
        config: Any = None,
    ) -> None:
        if (path is None) == (history_data is None):
            raise ValueError("TrainOut: give exactly one of 'path' and 'history_data'")
        self.config = config
        self.timing: pd.DataFrame | None = None
        self.learning_rate: list[float] | None = None
        if path is not None:
            self.path: Path | None = Path(os.fspath(path))
            if not self.path.is_file():
                raise FileNotFoundError(
                    f"TrainOut: the train.x output {str(path)!r} does not exist"
                )
            self.errors = _read_train_out(self.path)
        else:
            self.path = None
            self._from_history(history_data)
        if energies_train_files is not None:
            self.energies: Energies | None = Energies(energies_train_files, energies_test_files)
        elif energies_test_files is not None:
            raise ValueError("TrainOut: energies_test_files given without energies_train_files")
        else:
            self.energies = None

    def _from_history(self, history_data: Any) -> None:
        columns = _history_columns(history_data)
        n = len(next(iter(columns.values()))) if columns else 0
        known = {*HISTORY_COLUMNS, *_TIMING_COLUMNS}
        if n and not known.intersection(columns):
            raise ValueError(
                "history_data: none of the expected keys " + ", ".join(HISTORY_COLUMNS) + " found"
                f" (keys: {', '.join(columns)})"
            )
        names = [*HISTORY_COLUMNS, *(c for c in STRESS_COLUMNS if c in columns)]
        self.errors = pd.DataFrame(
            {name: _numeric_column(columns, name, n) for name in names}, dtype=float
        )
        if "learning_rate" in columns:
            self.learning_rate = self.errors["learning_rate"].tolist()
        timing = [name for name in _TIMING_COLUMNS if name in columns]
        if timing:
            self.timing = pd.DataFrame(
                {name: _numeric_column(columns, name, n) for name in timing}, dtype=float
            )

    @classmethod
    def from_torch_history(
        cls,
        history: Any,
        config: Any = None,
        energies_train_files: PathLike | Sequence[PathLike] | None = None,
        energies_test_files: PathLike | Sequence[PathLike] | None = None,
    ) -> TrainOut:
        """A TrainOut of the trainer's history (tuple of per-epoch dicts, or dict of lists)."""
        return cls(
            energies_train_files=energies_train_files,
            energies_test_files=energies_test_files,
            history_data=history,
            config=config,
        )

    @property
    def has_force_data(self) -> bool:
        """True when the force columns exist and hold at least one finite value."""
        return self._has_finite(FORCE_COLUMNS)

    def _has_finite(self, columns: Sequence[str]) -> bool:
        """True when any of ``columns`` exists and holds a finite value."""
        return any(
            column in self.errors.columns and bool(np.isfinite(self.errors[column]).any())
            for column in columns
        )

    @property
    def stats(self) -> dict[str, float | int]:
        """Summary statistics (eV/atom; forces eV/Å).

        Keys: ``final_MAE_train, final_RMSE_train, final_MAE_test, final_RMSE_test`` (last
        epoch), ``min_RMSE_test`` and ``epoch_min_RMSE_test`` (1-based epoch of the minimum,
        NaN values skipped); when the force columns exist also ``final_RMSE_force_train,
        final_RMSE_force_test, min_RMSE_force_test, epoch_min_RMSE_force_test``, and the same
        of the stress columns (eV/Å³) of a run trained on stresses. A column whose values are
        all NaN (or that is empty) gives NaN for both its minimum and its epoch.
        """
        stats: dict[str, float | int] = {}

        def final(column: str) -> float:
            return float(self.errors[column].iloc[-1]) if len(self.errors) else math.nan

        def minimum(column: str) -> tuple[float, float | int]:
            values = self.errors[column].to_numpy(dtype=float)
            if np.isnan(values).all():
                return math.nan, math.nan
            index = int(np.nanargmin(values))
            return float(values[index]), index + 1

        for column in ENERGY_COLUMNS:
            stats[f"final_{column}"] = final(column)
        stats["min_RMSE_test"], stats["epoch_min_RMSE_test"] = minimum("RMSE_test")
        for columns in (FORCE_COLUMNS, STRESS_COLUMNS):
            if all(column in self.errors.columns for column in columns):
                for column in columns:
                    stats[f"final_{column}"] = final(column)
                test = columns[1]
                stats[f"min_{test}"], stats[f"epoch_min_{test}"] = minimum(test)
        return stats

    def __str__(self) -> str:
        lines = ["Training statistics:"]
        lines += [f"{key}: {value}" for key, value in self.stats.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        source = "file" if self.path is not None else "in-memory"
        return (
            f"TrainOut(n_epochs={len(self.errors)}, source={source}, "
            f"has_forces={self.has_force_data})"
        )

    # plots -----------------------------------------------------------------------------------

    def plot_training_errors(
        self, data: pd.DataFrame | None = None, outfile: PathLike | None = None
    ) -> Figure:
        """Energy RMSE (eV/atom) of the training and test sets per epoch, log y axis.

        ``data`` replaces :attr:`errors` (a DataFrame with ``RMSE_train`` and/or ``RMSE_test``).
        Writes a PNG to ``outfile`` when given; returns the figure (never shown or blocking).
        """
        frame = self.errors if data is None else data
        if not {"RMSE_train", "RMSE_test"}.intersection(frame.columns):
            raise ValueError("plot_training_errors: data has neither 'RMSE_train' nor 'RMSE_test'")
        figure, (axes,) = _new_figure(1)
        _plot_series(
            axes, frame, [("RMSE_train", "train"), ("RMSE_test", "test")], "Energy RMSE (eV/atom)"
        )
        axes.set_title("Energy errors")
        return _finish(figure, outfile)

    def plot_force_errors(self, outfile: PathLike | None = None) -> Figure:
        """Force RMSE (eV/Å) of the training and test sets per epoch, log y axis.

        Raises ``ValueError`` when there is no force data (energy-only run or ``train.x`` file).
        Writes a PNG to ``outfile`` when given; returns the figure.
        """
        if not self.has_force_data:
            raise ValueError("plot_force_errors: this training run has no force errors")
        figure, (axes,) = _new_figure(1)
        _plot_series(
            axes,
            self.errors,
            [("RMSE_force_train", "train"), ("RMSE_force_test", "test")],
            "Force RMSE (eV/Å)",
        )
        axes.set_title("Force errors")
        return _finish(figure, outfile)

    def summary_panels(self) -> list[tuple[tuple[str, str], str, str]]:
        """The panels of :meth:`plot_training_summary`: ``((train column, test column), axis
        label, title)`` for the energy errors, and the force and stress errors where the
        history holds finite values of them."""
        panels = [(("RMSE_train", "RMSE_test"), "Energy RMSE (eV/atom)", "Energy errors")]
        if self.has_force_data:
            panels.append((FORCE_COLUMNS, "Force RMSE (eV/Å)", "Force errors"))
        if self._has_finite(STRESS_COLUMNS):
            panels.append((STRESS_COLUMNS, "Stress RMSE (eV/Å³)", "Stress errors"))
        return panels

    def plot_training_summary(self, outfile: PathLike | None = None) -> Figure:
        """Energy RMSE panel, plus force and stress RMSE panels where there is such data
        (:meth:`summary_panels`).

        Writes a PNG to ``outfile`` when given; returns the figure.
        """
        panels = self.summary_panels()
        figure, axes = _new_figure(len(panels))
        for axis, ((train, test), label, title) in zip(axes, panels):
            _plot_series(axis, self.errors, [(train, "train"), (test, "test")], label)
            axis.set_title(title)
        return _finish(figure, outfile)


# --------------------------------------------------------------------------------------------
# energies.train.N / energies.test.N


def _text_column(names: Sequence[str]) -> str | None:
    """The name of the free-text last column (``Path-of-input-file``), or None."""
    lowered = names[-1].lower()
    return names[-1] if "path" in lowered or "file" in lowered else None


def _read_energies(path: Path) -> pd.DataFrame:
    """One energies file as a DataFrame with the header's column names (see :class:`Energies`)."""
    if not path.is_file():
        raise FileNotFoundError(f"Energies: the file {str(path)!r} does not exist")
    names: list[str] | None = None
    text: str | None = None
    data: dict[str, list[Any]] = {}
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            stripped = line.strip()
            if not stripped:
                continue
            if names is None:
                if not stripped.startswith("#"):
                    raise ValueError(
                        f"{path}, line {number}: expected the header line '#  Ref(eV)  ANN(eV)  "
                        f"#atoms ...', found {stripped!r}"
                    )
                names = stripped[1:].replace("Cost Func", "Cost-Func").split()
                if len(names) < 2 or len(set(names)) != len(names):
                    raise ValueError(
                        f"{path}, line {number}: expected a header with distinct column names, "
                        f"found {stripped!r}"
                    )
                data = {name: [] for name in names}
                text = _text_column(names)
                continue
            if stripped.startswith("#"):
                continue  # comment
            parts = stripped.split(None, len(names) - 1)
            if len(parts) != len(names):
                raise ValueError(
                    f"{path}, line {number}: expected {len(names)} columns "
                    f"({' '.join(names)}), found {len(parts)}"
                )
            for name, token in zip(names, parts):
                try:
                    if name == text:
                        value: Any = token.strip()
                    elif name.startswith("#"):
                        value = int(token)
                    else:
                        value = _parse_float(token)
                except ValueError:
                    kind = "an integer" if name.startswith("#") else "a number"
                    raise ValueError(
                        f"{path}, line {number}: expected {kind} in column {name!r}, "
                        f"found {token!r}"
                    ) from None
                data[name].append(value)
    if names is None:
        raise ValueError(f"{path}, line 1: expected the header line '#  Ref(eV)  ANN(eV) ...'")
    frame = pd.DataFrame(data)
    for name in names:
        if name.startswith("#"):
            frame[name] = frame[name].astype("int64")
        elif name != _text_column(names):
            frame[name] = frame[name].astype(float)
    return frame


class Energies:
    """Reference and ANN energies of every structure, from ``energies.train.N`` / ``.test.N``.

    Each file starts with a header line ``#  Ref(eV) ANN(eV) #atoms Ref(eV/atom) ANN(eV/atom)
    Ref-ANN(eV/atom) Cost-Func #<sp>... Path-of-input-file`` whose words become the DataFrame
    columns (the Fortran ``Cost Func`` is renamed ``Cost-Func``); rows are whitespace-separated,
    the last column (``Path...``/``...file``) is the rest of the line (it may contain spaces),
    columns named ``#...`` are integers and the others floats. Blank lines and later ``#`` lines
    are skipped. ``path_train`` / ``path_test`` are a path or a list of paths (one per process);
    several files are concatenated.

    Attributes:
        energies_train: DataFrame of the training set (eV, eV/atom).
        energies_test: DataFrame of the test set, or None when no test files were read.
    """

    def __init__(
        self,
        path_train: PathLike | Sequence[PathLike],
        path_test: PathLike | Sequence[PathLike] | None = None,
    ) -> None:
        self.energies_train: pd.DataFrame | None = None
        self.energies_test: pd.DataFrame | None = None
        self.add_energies(path_train, path_test)

    def add_energies(
        self,
        path_train: PathLike | Sequence[PathLike],
        path_test: PathLike | Sequence[PathLike] | None = None,
    ) -> None:
        """Read more energies files and append them to :attr:`energies_train` / ``_test``.

        When the numbers of train and test files differ, warns (UserWarning) and ignores the
        test files. Nothing is changed when a file cannot be read.
        """
        train_files = _as_path_list(path_train)
        test_files = _as_path_list(path_test)
        if not train_files:
            raise ValueError("Energies: no training energies file given")
        if test_files and len(test_files) != len(train_files):
            warnings.warn(
                f"Energies: {len(train_files)} training but {len(test_files)} test energies "
                "files; the test files are ignored",
                UserWarning,
                stacklevel=2,
            )
            test_files = []
        train = [_read_energies(p) for p in train_files]
        test = [_read_energies(p) for p in test_files]
        self.energies_train = _concat(self.energies_train, train)
        if test:
            self.energies_test = _concat(self.energies_test, test)

    def plot_correlation(
        self,
        outfile: PathLike | None = None,
        E_min: float | None = None,
        E_max: float | None = None,
    ) -> Figure:
        """ANN vs reference energy per atom (eV/atom) of the training and test structures.

        ``E_min`` / ``E_max`` (eV/atom) set the range of both axes (default: the data range).
        Writes a PNG to ``outfile`` when given; returns the figure (never shown or blocking).
        """
        x_name, y_name = "Ref(eV/atom)", "ANN(eV/atom)"
        figure, (axes,) = _new_figure(1)
        low, high = math.inf, -math.inf
        for frame, label in ((self.energies_train, "train"), (self.energies_test, "test")):
            if frame is None:
                continue
            if x_name not in frame.columns or y_name not in frame.columns:
                raise ValueError(f"plot_correlation: the energies have no {x_name}/{y_name}")
            x = frame[x_name].to_numpy(dtype=float)
            y = frame[y_name].to_numpy(dtype=float)
            finite = np.isfinite(x) & np.isfinite(y)
            if finite.any():
                axes.scatter(x[finite], y[finite], s=12, alpha=0.7, label=f"{label} ({len(x)})")
                low = min(low, float(x[finite].min()), float(y[finite].min()))
                high = max(high, float(x[finite].max()), float(y[finite].max()))
        if math.isfinite(low):
            margin = 0.02 * (high - low) if high > low else 0.5
            low, high = low - margin, high + margin
        low = low if E_min is None else float(E_min)
        high = high if E_max is None else float(E_max)
        if math.isfinite(low) and math.isfinite(high):
            if high <= low:
                raise ValueError(
                    f"plot_correlation: the energy range [{low}, {high}] is empty (E_min/E_max)"
                )
            axes.plot([low, high], [low, high], color="black", linewidth=0.8)
            axes.set_xlim(low, high)
            axes.set_ylim(low, high)
        axes.ticklabel_format(useOffset=False)
        axes.set_xlabel("Reference energy (eV/atom)")
        axes.set_ylabel("ANN energy (eV/atom)")
        axes.set_aspect("equal", adjustable="box")
        if axes.collections:
            axes.legend()
        return _finish(figure, outfile)


def _concat(existing: pd.DataFrame | None, frames: list[pd.DataFrame]) -> pd.DataFrame:
    parts = ([existing] if existing is not None else []) + frames
    if len(parts) == 1:
        return parts[0]
    return pd.concat(parts, ignore_index=True)


_ROW_KEYS = ("ref_energy", "ann_energy", "n_atoms", "species_counts", "name")


def write_energies(
    path: PathLike,
    rows: Iterable[Mapping[str, Any]],
    species: Sequence[str] | None = None,
) -> Path:
    """Write an ``energies.train.N`` / ``energies.test.N`` file atomically (reference §6.4).

    Each row is a mapping with ``ref_energy`` and ``ann_energy`` (total energies, eV),
    ``n_atoms`` (int), ``species_counts`` (mapping species → number of atoms, summing to
    ``n_atoms``), ``name`` (the structure's identifier or path; no line breaks; leading and
    trailing blanks do not survive reading) and optionally ``cost`` (the ``Cost-Func`` column,
    default the per-atom difference; the trainer passes difference × E_scaling when it
    normalises energies). ``species`` orders the ``#<sp>`` columns (default: order of first
    appearance in the rows). Line layout: `` {Eref:14.6E} {Eann:14.6E} {N:5d} {Eref/N:14.6E}
    {Eann/N:14.6E} {(Eref-Eann)/N:14.6E} {cost:14.6E}`` then `` {count:4d}`` per species, then
    `` {name}``. Returns the path written.
    """
    rows = list(rows)
    checked: list[tuple[float, float, int, Mapping[str, Any], str, Any]] = []
    order: dict[str, None] = dict.fromkeys(species) if species is not None else {}
    for index, row in enumerate(rows):
        missing = [key for key in _ROW_KEYS if key not in row]
        if missing:
            raise ValueError(f"write_energies: row {index} lacks {', '.join(missing)}")
        n_atoms = row["n_atoms"]
        if isinstance(n_atoms, bool) or not isinstance(n_atoms, (int, np.integer)) or n_atoms < 1:
            raise ValueError(f"write_energies: row {index}: n_atoms must be a positive integer")
        counts = row["species_counts"]
        if not isinstance(counts, Mapping):
            raise ValueError(f"write_energies: row {index}: species_counts must be a mapping")
        for key, count in counts.items():
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
                raise ValueError(
                    f"write_energies: row {index}: the count of {key!r} must be an integer >= 0"
                )
            if species is None:
                order.setdefault(str(key), None)
            elif key not in order:
                raise ValueError(f"write_energies: row {index}: species {key!r} not in {species}")
        if sum(int(c) for c in counts.values()) != int(n_atoms):
            raise ValueError(
                f"write_energies: row {index}: species_counts sum to "
                f"{sum(int(c) for c in counts.values())}, not n_atoms = {int(n_atoms)}"
            )
        name = str(row["name"])
        if not name.strip() or "\n" in name or "\r" in name:
            raise ValueError(f"write_energies: row {index}: invalid name {name!r}")
        ref = _as_float(row["ref_energy"], f"write_energies: row {index}: ref_energy")
        ann = _as_float(row["ann_energy"], f"write_energies: row {index}: ann_energy")
        checked.append((ref, ann, int(n_atoms), counts, name, row.get("cost")))
    header = (
        f"#{'Ref(eV)':>14} {'ANN(eV)':>14} {'#atoms':>5} {'Ref(eV/atom)':>14} "
        f"{'ANN(eV/atom)':>14} {'Ref-ANN(eV/atom)':>14} {'Cost-Func':>14}"
        + "".join(f" {'#' + sp:>4}" for sp in order)
        + " Path-of-input-file"
    )
    lines = [header]
    for ref, ann, n, counts, name, cost in checked:
        diff = (ref - ann) / n
        cost_value = diff if cost is None else _as_float(cost, f"write_energies: cost of {name}")
        lines.append(
            f" {ref:14.6E} {ann:14.6E} {n:5d} {ref / n:14.6E} {ann / n:14.6E} {diff:14.6E}"
            f" {cost_value:14.6E}"
            + "".join(f" {int(counts.get(sp, 0)):4d}" for sp in order)
            + f" {name}"
        )
    target = Path(os.fspath(path))
    atomic_write_text(target, "\n".join(lines) + "\n")
    return target


def __getattr__(name: str) -> Any:
    """Deprecated module attributes: ``TrainOutput`` is an alias of :class:`TrainOut`."""
    if name == "TrainOutput":
        warnings.warn("TrainOutput is deprecated; use TrainOut", DeprecationWarning, stacklevel=2)
        return TrainOut
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
