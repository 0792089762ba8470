"""Run every benchmark and write one JSON file plus Markdown tables.

Run: ``python -m benchmarks.run [--quick] [--threads N] [--output DIR] [--update-docs]
[--only SECTION ...]``.

Sections: ``featurize`` (TiO2 throughput), ``scaling`` (periodic boxes of growing size),
``train`` (seconds per epoch and peak RSS, energy-only and with forces), ``committee`` (vmapped vs
sequential members) and ``inference`` (prediction throughput, one model and a committee, with
and without forces). Each section records its setup (threads, dtype, data, torch and Python
versions, CPU model, date, load average) next to its rows. ``--quick`` uses fewer repeats,
epochs, members and smaller boxes: it took 54 s with ``--threads 1`` on the shared 2-core
development machine (load average ~3), the full run 2 minutes; two threads on a loaded machine
can take several times longer. Results go to ``DIR/latest.json`` and
``DIR/latest.md`` (default ``benchmarks/results/``); ``--update-docs`` also rewrites the tables
of ``docs/performance.md`` between its ``<!-- benchmark:NAME -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import committee, featurize, inference, train
from benchmarks._common import ROOT, markdown_table, tio2_structures

DOC = ROOT / "docs" / "performance.md"


@dataclass(frozen=True)
class Settings:
    """How much of each benchmark to run.

    Attributes:
        repeats: timed repeats (best of) for featurization, scaling and inference; timed runs
            per training mode (median and best run).
        scaling_sizes: target atom counts of the scaling boxes.
        train_epochs: epochs timed per training run.
        committee_sizes: committee sizes timed.
        committee_epochs: epochs timed per committee.
        inference_members: members of the inference committee.
        structures: use only the first N TiO2 structures (None: all 100).
    """

    repeats: int
    scaling_sizes: tuple[int, ...]
    train_epochs: int
    committee_sizes: tuple[int, ...]
    committee_epochs: int
    inference_members: int
    structures: int | None = None


FULL = Settings(
    repeats=5,
    scaling_sizes=tuple(featurize.FULL_SIZES),
    train_epochs=60,
    committee_sizes=tuple(committee.FULL_SIZES),
    committee_epochs=4,
    inference_members=8,
)
QUICK = Settings(
    repeats=2,
    scaling_sizes=tuple(featurize.QUICK_SIZES),
    train_epochs=5,
    committee_sizes=tuple(committee.QUICK_SIZES),
    committee_epochs=1,
    inference_members=8,
)


def _featurize(settings: Settings) -> tuple[dict, list[dict]]:
    structures = tio2_structures(settings.structures)
    return featurize.tio2_setup(structures), featurize.tio2_rows(structures, settings.repeats)


def _scaling(settings: Settings) -> tuple[dict, list[dict]]:
    rows = featurize.scaling_rows(list(settings.scaling_sizes), settings.repeats)
    return featurize.scaling_setup(), rows


def _train(settings: Settings) -> tuple[dict, list[dict]]:
    threads = torch.get_num_threads()  # set by run_benchmarks; passed to the subprocesses
    rows = train.train_rows(settings.train_epochs, threads, settings.structures, settings.repeats)
    return train.train_setup(rows, settings.train_epochs), rows


def _committee(settings: Settings) -> tuple[dict, list[dict]]:
    structures = tio2_structures(settings.structures)
    rows = committee.committee_rows(
        structures, list(settings.committee_sizes), settings.committee_epochs
    )
    return committee.committee_setup(structures, settings.committee_epochs), rows


def _inference(settings: Settings) -> tuple[dict, list[dict]]:
    structures = tio2_structures(settings.structures)
    members = settings.inference_members
    rows = inference.inference_rows(structures, members, settings.repeats)
    return inference.inference_setup(structures, members), rows


@dataclass(frozen=True)
class Section:
    """One benchmark: how to run it and how to show it."""

    title: str
    run: Callable[[Settings], tuple[dict, list[dict]]]
    columns: tuple[tuple[str, str], ...]


SECTIONS: dict[str, Section] = {
    "featurize": Section(
        "Featurization (TiO2 set)",
        _featurize,
        (
            ("view", "view"),
            ("atoms", "atoms"),
            ("seconds", "seconds"),
            ("atoms_per_s", "atoms/s"),
        ),
    ),
    "scaling": Section(
        "Scaling with system size",
        _scaling,
        (
            ("atoms", "atoms"),
            ("neighbor_list_s", "neighbour list (s)"),
            ("featurize_s", "featurize (s)"),
            ("us_per_atom", "µs per atom (featurize)"),
        ),
    ),
    "train": Section(
        "Training",
        _train,
        (
            ("mode", "mode"),
            ("structures", "structures"),
            ("featurize_s", "featurize once (s)"),
            ("epoch_s", "s / epoch (median run)"),
            ("best_run_epoch_s", "s / epoch (best run)"),
            ("best_epoch_s", "best epoch (s)"),
            ("best_window_s", "best 8 epochs (s / epoch)"),
            ("peak_rss_mib", "peak RSS (MiB)"),
        ),
    ),
    "committee": Section(
        "Committee training",
        _committee,
        (
            ("mode", "mode"),
            ("batches", "batches"),
            ("members", "members"),
            ("vmapped_epoch_s", "vmapped (s, mean epoch)"),
            ("sequential_epoch_s", "sequential (s, mean epochs)"),
            ("speedup", "speed-up"),
            ("vmapped_vs_one_member", "vmapped ÷ one member"),
        ),
    ),
    "inference": Section(
        "Prediction",
        _inference,
        (
            ("api", "api"),
            ("call", "call"),
            ("members", "members"),
            ("forces", "forces"),
            ("seconds", "seconds"),
            ("structures_per_s", "structures/s"),
            ("atoms_per_s", "atoms/s"),
        ),
    ),
}


def run_benchmarks(
    settings: Settings,
    sections: Sequence[str] = tuple(SECTIONS),
    threads: int = 2,
    after_section: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``sections`` with ``threads`` torch threads; the result is what ``latest.json``
    holds: the settings and, per section, its setup, rows and wall time. ``after_section`` is
    called with the results so far after each section."""
    torch.set_num_threads(threads)
    results: dict[str, Any] = {"settings": asdict(settings), "sections": {}}
    for name in sections:
        start = time.perf_counter()
        setup, rows = SECTIONS[name].run(settings)
        results["sections"][name] = {
            "setup": setup,
            "results": rows,
            "wall_s": time.perf_counter() - start,
        }
        print(f"{name}: {len(rows)} rows in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        if after_section is not None:
            after_section(results)
    return results


def section_markdown(name: str, section: dict[str, Any]) -> str:
    """The setup line and the table of one section of :func:`run_benchmarks`' result."""
    s = section["setup"]
    described = (
        f"Measured {s['date']} (1-minute load average {s['load_average']}): {s['data']}; "
        f"{s['threads']} thread{'' if s['threads'] == 1 else 's'}, {s['dtype']}, "
        f"torch {s['torch']}, Python {s['python']}, "
        f"CPU {s['cpu']}."
    )
    table = markdown_table(section["results"], SECTIONS[name].columns)
    return f"{described}\n\n{table}"


def markdown_report(results: dict[str, Any], command: str) -> str:
    """Every section of ``results`` as Markdown: a heading, its setup, its table."""
    parts = [f"# Benchmark results\n\n`{command}`"]
    for name, section in results["sections"].items():
        parts.append(f"## {SECTIONS[name].title}\n\n{section_markdown(name, section)}")
    return "\n\n".join(parts) + "\n"


def update_doc(text: str, results: dict[str, Any]) -> str:
    """``text`` with the block between ``<!-- benchmark:NAME -->`` and
    ``<!-- /benchmark:NAME -->`` replaced by the section's Markdown, for every section in
    ``results``; a missing marker pair raises ``ValueError``."""
    for name, section in results["sections"].items():
        pattern = re.compile(rf"(<!-- benchmark:{name} -->\n).*?(<!-- /benchmark:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"no <!-- benchmark:{name} --> ... <!-- /benchmark:{name} --> block")
        block = section_markdown(name, section)
        text = pattern.sub(lambda m, b=block: f"{m.group(1)}{b}\n{m.group(2)}", text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: run, write ``latest.json`` and ``latest.md``, optionally update the doc."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller sizes")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--update-docs", action="store_true", help="rewrite docs/performance.md")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "")
    if args.only != list(SECTIONS):
        command += " --only " + " ".join(args.only)
    if args.threads != 2:
        command += f" --threads {args.threads}"
    args.output.mkdir(parents=True, exist_ok=True)

    def write(results: dict[str, Any]) -> None:  # after every section: a killed run keeps them
        (args.output / "latest.json").write_text(
            json.dumps({"command": command, **results}, indent=2) + "\n"
        )
        (args.output / "latest.md").write_text(markdown_report(results, command))

    results = run_benchmarks(QUICK if args.quick else FULL, args.only, args.threads, write)
    print(f"wrote {args.output / 'latest.json'} and {args.output / 'latest.md'}", file=sys.stderr)
    if args.update_docs:
        DOC.write_text(update_doc(DOC.read_text(encoding="utf-8"), results), encoding="utf-8")
        print(f"updated {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
