"""benchmarks/run.py: a tiny run yields every section with its setup, its Markdown and the doc
tables it rewrites (the timings themselves are not checked)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.run import (
    DOC,
    SECTIONS,
    Settings,
    markdown_report,
    run_benchmarks,
    update_doc,
)

TINY = Settings(
    repeats=1,
    scaling_sizes=(27,),
    train_epochs=1,
    committee_sizes=(1, 2),
    committee_epochs=1,
    inference_members=2,
    structures=6,
)
SETUP_KEYS = {"torch", "python", "cpu", "threads", "date", "load_average", "dtype", "data"}


@pytest.fixture(scope="module")
def results():
    return run_benchmarks(TINY, threads=1)


def test_every_section_has_its_setup_and_rows(results):
    assert list(results["sections"]) == list(SECTIONS)
    for name, section in results["sections"].items():
        assert SETUP_KEYS <= set(section["setup"]), name
        assert section["setup"]["threads"] == 1
        assert section["results"], name
        columns = {key for key, _ in SECTIONS[name].columns}
        assert all(columns <= set(row) for row in section["results"]), name
    inference = results["sections"]["inference"]["results"]
    assert {(r["api"], r["members"], r["forces"]) for r in inference} == {
        (api, members, forces)
        for api in ("core", "facade")
        for members in (1, 2)
        for forces in (False, True)
    }
    assert results["sections"]["train"]["setup"]["data"] == "tio2: 6 structures, 185 atoms"
    json.dumps(results)  # the JSON file can be written


def test_markdown_and_doc_tables(results):
    report = markdown_report(results, "python -m benchmarks.run")
    assert report.count("\n| ") >= sum(len(s["results"]) for s in results["sections"].values())
    doc = DOC.read_text(encoding="utf-8")
    updated = update_doc(doc, results)
    for name in SECTIONS:
        block = updated.split(f"<!-- benchmark:{name} -->\n")[1].split("<!-- /benchmark")[0]
        data = results["sections"][name]["setup"]["data"]
        assert block.startswith("Measured ") and f"{data}; 1 thread, float64" in block, name
    assert update_doc(updated, results) == updated  # markers survive a rewrite
    with pytest.raises(ValueError, match="benchmark:scaling"):
        update_doc(doc.replace("<!-- /benchmark:scaling -->", ""), results)


def test_the_gpu_benchmark_runs_on_the_cpu():
    """The prepared accelerator benchmark runs end to end (here on the CPU, tiny)."""
    from benchmarks.gpu import run

    result = run(torch.device("cpu"), 8, [1, 2], 1)
    assert [row["members"] for row in result["results"]] == [1, 2]
    assert all("error" not in row and row["epoch_s"] > 0 for row in result["results"])
    assert result["results"][0]["vs_one_member"] == 1.0
    assert result["setup"]["device_name"] == "cpu"


def test_the_routes_benchmark_measures_both_routes_and_judges_each_speed_up():
    """benchmarks/routes.py on a tiny set: each case times both routes, says whether the fast
    route's speed-up applied, and the verdicts name each speed-up with its least gain."""
    import aenet_fn as af
    from benchmarks import _common, routes

    structures = _common.tio2_structures(6)
    data = routes.DataSet(
        "tiny",
        af.featurize_structures(_common.PARAMS, structures, with_derivatives=True),
        _common.PARAMS,
        _common.ARCH,
        4,
    )
    rows = [
        row
        for forces in (False, True)
        for members in (1, 2)
        for row in routes.measure_case(data, forces, members, epochs=1, rounds=1)
    ]
    assert [(r["mode"], r["members"], r["route"]) for r in rows] == [
        (mode, members, route)
        for mode in ("energy", "forces")
        for members in (1, 2)
        for route in routes.ROUTES
    ]
    assert all(r["applied"] for r in rows if r["route"] == "fast")
    assert all(r["vs_func"] > 0 and r["run_100_s"] > 0 for r in rows)
    verdicts = routes.verdicts(rows)
    assert set(verdicts) == {
        f"{part}, {members} member(s)"
        for part in ("energy tables", "stored Jacobians")
        for members in (1, 2)
    }
    assert all(v["keep"] == (v["least_gain"] >= routes.KEEP_AT) for v in verdicts.values())
