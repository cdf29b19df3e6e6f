"""bench.report: medians, ratios, targets, the JSON document and its validation, the table."""

from __future__ import annotations

import json

import pytest

from bench import report
from bench.report import Figure, Result, Target

MACHINE = {
    "cpu_model": "Test CPU",
    "cores": 2,
    "memory_bytes": 8 << 30,
    "kernel": "6.1.0",
    "python": "3.11.2",
    "pyfuse3": "3.5.0",
    "trio": "0.35.0",
}


def make_doc(results: list[Result], ceilings=None) -> dict:
    return report.document(
        mode="quick",
        target_fs="fedmount",
        settings={"runs": 3},
        ceilings=ceilings or {"fuse": (Figure("B/s", [1e9, 2e9, 3e9]), {"how": "nullfs"})},
        results=results,
        machine_info=MACHINE,
        started_at=0.0,
        duration_s=1.0,
        notes=["quick mode"],
    )


def test_figure_median_min_max_with_even_and_odd_counts():
    assert Figure("s", [3.0, 1.0, 2.0]).median == 2.0
    assert Figure("s", [4.0, 1.0, 2.0, 3.0]).median == 2.5
    j = Figure("B/s", [5.0, 1.0, 3.0]).to_json()
    assert (j["min"], j["median"], j["max"], j["samples"]) == (1.0, 3.0, 5.0, [5.0, 1.0, 3.0])


def test_figure_rejects_empty_samples_and_unknown_units():
    with pytest.raises(ValueError):
        Figure("s", [])
    with pytest.raises(ValueError):
        Figure("furlongs", [1.0])


def test_ratio_is_median_over_median():
    target = Target("ratio_at_least", 0.7, "")
    r = Result("w", "d", target, Figure("B/s", [1, 7, 100]), Figure("B/s", [10, 10, 0]))
    assert r.ratio == pytest.approx(0.7)
    assert r.passed is True


def test_ratio_at_least_fails_below_target():
    r = Result("w", "d", Target("ratio_at_least", 0.8), Figure("B/s", [79.0]), Figure("B/s", [100.0]))
    assert r.passed is False


def test_ratio_at_most_for_memory():
    t = Target("ratio_at_most", 4.0)
    assert t.met(400.0, 100.0) is True
    assert t.met(401.0, 100.0) is False


def test_at_most_needs_no_ceiling():
    r = Result("find", "d", Target("at_most", 2.0), Figure("s", [1.5, 2.5, 1.9]))
    assert r.ratio is None
    assert r.passed is True


def test_ceiling_plus_adds_to_the_ceiling():
    t = Target("ceiling_plus", 0.020)
    assert t.met(0.70, 0.69) is True
    assert t.met(0.72, 0.69) is False


def test_report_only_and_missing_ceiling_are_not_judged():
    assert Target("report").met(1.0, 2.0) is None
    assert Target("ratio_at_least", 0.5).met(1.0, None) is None
    assert Target("ratio_at_least", 0.5).met(1.0, 0.0) is None


def test_unknown_target_kind_is_refused():
    with pytest.raises(ValueError):
        Target("at_least_sometimes", 1.0)


def test_lower_ceiling_picks_lowest_median():
    name, fig = report.lower_ceiling({"fuse": Figure("B/s", [2.0]), "keep": Figure("B/s", [1.0, 5.0, 1.5])})
    assert name == "keep" and fig.median == 1.5


def test_document_round_trips_through_json_and_validates():
    results = [
        Result(
            "cold",
            "d",
            Target("ratio_at_least", 0.7, ">= 0.7"),
            Figure("B/s", [1e8, 2e8]),
            Figure("B/s", [3e8]),
            "fuse",
        ),
        Result("random 4 KiB", "d", Target("report"), Figure("ops/s", [100.0, 200.0, 300.0])),
    ]
    doc = json.loads(json.dumps(make_doc(results)))
    assert report.validate(doc) == []
    cold = doc["workloads"][0]
    assert cold["ratio"] == pytest.approx(0.5)
    assert cold["passed"] is False
    assert cold["ceiling"]["name"] == "fuse"
    assert doc["workloads"][1]["passed"] is None


def test_failed_target_is_not_a_validation_problem():
    doc = make_doc([Result("w", "d", Target("at_most", 1.0), Figure("s", [5.0]))])
    assert doc["workloads"][0]["passed"] is False
    assert report.validate(doc) == []


def test_validate_reports_errors_and_broken_figures():
    doc = make_doc([Result("w", "d", Target("report"), error="mount failed")])
    assert any("mount failed" in p for p in report.validate(doc))
    doc = make_doc([Result("w", "d", Target("report"), Figure("s", [1.0]))])
    doc["workloads"][0]["figure"]["min"] = 9.0
    assert any("min <= median <= max" in p for p in report.validate(doc))
    doc["machine"] = {}
    assert any("machine.cpu_model" in p for p in report.validate(doc))
    assert report.validate([]) == ["document is not a JSON object"]
    doc = make_doc([Result("w", "d", Target("report"), Figure("s", [1.0]))])
    doc["workloads"] = []
    assert "workloads is missing or empty" in report.validate(doc)


def test_write_is_atomic_and_readable(tmp_path):
    path = tmp_path / "results" / "latest.json"
    doc = make_doc([Result("w", "d", Target("report"), Figure("s", [1.0]))])
    report.write(doc, str(path))
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc))
    assert not (tmp_path / "results" / "latest.json.tmp").exists()


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (1.5e9, "B/s", "1.50 GB/s"),
        (250e6, "B/s", "250 MB/s"),
        (0.0123, "s", "12 ms"),
        (12.5, "s", "12.5 s"),
        (3 << 20, "B", "3.0 MiB"),
        (12345.6, "files/s", "12,346 files/s"),
    ],
)
def test_format_value(value, unit, text):
    assert report.format_value(value, unit) == text


def test_table_shows_every_workload_verdict_ceiling_and_machine():
    results = [
        Result(
            "cold",
            "d",
            Target("ratio_at_least", 0.7, ">= 0.7 x fuse"),
            Figure("B/s", [1e9]),
            Figure("B/s", [1e9]),
            "fuse",
        ),
        Result("find", "d", Target("at_most", 2.0, "< 2 s"), Figure("s", [3.0])),
        Result("rss", "d", Target("ratio_at_most", 4.0), error="daemon died"),
    ]
    text = report.table(make_doc(results))
    lines = text.splitlines()
    assert lines[0].startswith("workload")
    assert set(lines[1].replace(" ", "")) == {"-"}
    cold = next(line for line in lines if line.startswith("cold"))
    assert "1.00 GB/s" in cold and "1.00" in cold and cold.endswith("pass")
    assert next(line for line in lines if line.startswith("find")).endswith("FAIL")
    assert next(line for line in lines if line.startswith("rss ")).endswith("ERROR")
    assert "error in rss: daemon died" in text
    assert "ceiling fuse: 2.00 GB/s" in text
    assert "Test CPU, 2 cores" in text
    assert "note: quick mode" in text
