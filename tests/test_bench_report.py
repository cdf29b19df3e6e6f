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


def cold_read(ceiling: float, peer: report.PeerResult | None = None) -> Result:
    """A 1 GB/s cold read judged against a FUSE ceiling of `ceiling` B/s."""
    target = Target("ratio_at_least", 0.7, ">= 0.7 x fuse")
    return Result("cold", "d", target, Figure("B/s", [1e9]), Figure("B/s", [ceiling]), "fuse", peer=peer)


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
        (595.4, "B", "595 B"),  # a figure per entry
        (1_048_575, "B", "1,048,575 B"),
        (12345.6, "files/s", "12,346 files/s"),
    ],
)
def test_format_value(value, unit, text):
    assert report.format_value(value, unit) == text


def test_table_shows_every_workload_verdict_ceiling_and_machine():
    results = [
        cold_read(ceiling=1e9),
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


PEER = {"name": "arv-mount", "version": "3.2.1", "how": "defaults"}


def peer_doc(results: list[Result]) -> dict:
    doc = make_doc(results)
    doc["peer"] = PEER
    return json.loads(json.dumps(doc))


def with_peer(name: str, unit: str, own: list[float], peer: report.PeerResult) -> Result:
    return Result(name, "d", Target("report"), Figure(unit, own), peer=peer)


def test_peer_ratio_is_median_over_the_peers_median_in_the_figures_unit():
    r = with_peer(
        "cold", "B/s", [3e8, 6e8, 9e8], report.PeerResult("arv-mount", Figure("B/s", [1e8, 2e8, 9e9]))
    )
    assert r.peer_ratio == pytest.approx(3.0)
    p = r.to_json()["peer"]
    assert (p["name"], p["ratio"], p["na"], p["error"]) == ("arv-mount", pytest.approx(3.0), None, None)
    assert p["figure"]["median"] == 2e8
    find = with_peer("find", "s", [1.0], report.PeerResult("arv-mount", Figure("s", [4.0])))
    assert find.peer_ratio == pytest.approx(0.25)  # seconds: below 1 is fedmount faster


def test_peer_na_and_error_have_no_ratio_and_no_peer_means_null():
    na = with_peer("direct", "B/s", [1.0], report.PeerResult("arv-mount", na="no direct route"))
    assert na.peer_ratio is None and na.to_json()["peer"]["na"] == "no direct route"
    assert Result("w", "d", Target("report"), Figure("s", [1.0])).to_json()["peer"] is None


def test_document_with_a_peer_validates_figures_and_na():
    results = [
        with_peer("cold", "B/s", [3e8], report.PeerResult("arv-mount", Figure("B/s", [1e8]))),
        with_peer("direct", "B/s", [3e8], report.PeerResult("arv-mount", na="no direct route")),
    ]
    doc = peer_doc(results)
    assert doc["peer"]["name"] == "arv-mount"
    assert report.validate(doc) == []


def test_validate_refuses_a_failed_missing_or_inconsistent_peer_entry():
    failed = peer_doc([with_peer("w", "s", [1.0], report.PeerResult("arv-mount", error="exited with 1"))])
    assert any("arv-mount failed: exited with 1" in p for p in report.validate(failed))
    missing = peer_doc([Result("w", "d", Target("report"), Figure("s", [1.0]))])
    assert any("has no arv-mount entry" in p for p in report.validate(missing))
    unit = peer_doc([with_peer("w", "s", [1.0], report.PeerResult("arv-mount", Figure("B", [2.0])))])
    assert any("is in 'B', the workload's in 's'" in p for p in report.validate(unit))
    ratio = peer_doc([with_peer("w", "s", [1.0], report.PeerResult("arv-mount", Figure("s", [2.0])))])
    ratio["workloads"][0]["peer"]["ratio"] = 2.0
    assert any("is not median / arv-mount median" in p for p in report.validate(ratio))
    both = peer_doc([with_peer("w", "s", [1.0], report.PeerResult("arv-mount", Figure("s", [2.0]), na="x"))])
    assert any("exactly one of figure, na, error" in p for p in report.validate(both))
    unnamed = peer_doc([with_peer("w", "s", [1.0], report.PeerResult("arv-mount", Figure("s", [2.0])))])
    unnamed["workloads"][0]["peer"]["name"] = "other"
    assert any("peer is 'other'" in p for p in report.validate(unnamed))
    stray = make_doc([with_peer("w", "s", [1.0], report.PeerResult("arv-mount", Figure("s", [2.0])))])
    assert any("the document names no peer" in p for p in report.validate(stray))


def test_table_gives_the_peer_and_the_peer_ratio_beside_the_ceiling_ratio():
    results = [
        cold_read(ceiling=2e9, peer=report.PeerResult("arv-mount", Figure("B/s", [250e6]))),
        with_peer("direct", "B/s", [3e8], report.PeerResult("arv-mount", na="no direct route")),
        with_peer("ttfb", "s", [0.5], report.PeerResult("arv-mount", error="exited with 1")),
    ]
    lines = report.table(peer_doc(results)).splitlines()
    header = lines[0].split()
    assert header.index("ratio") < header.index("arv-mount") < header.index("fedmount/arv-mount")
    assert header.index("fedmount/arv-mount") < header.index("target")
    cold = next(line for line in lines if line.startswith("cold")).split()
    assert cold[cold.index("0.50") + 1 : cold.index("0.50") + 4] == ["250", "MB/s", "4.00"]
    direct = next(line for line in lines if line.startswith("direct")).split()
    assert direct.count("n/a") == 2
    assert "arv-mount n/a in direct: no direct route" in lines
    ttfb = next(line for line in lines if line.startswith("ttfb ")).split()
    assert ttfb[-4:] == ["ERROR", "-", "reported", "-"]  # the peer failed, fedmount's figure stands
    assert "arv-mount error in ttfb: exited with 1" in lines
    assert any(line.startswith("arv-mount 3.2.1: defaults") for line in lines)


def test_table_without_a_peer_has_no_peer_columns():
    text = report.table(make_doc([Result("w", "d", Target("report"), Figure("s", [1.0]))]))
    assert "arv-mount" not in text and "fedmount/" not in text


def test_a_per_entry_memory_figure_is_judged_against_its_budget_and_shown_in_bytes():
    budget = Target("at_most", 80.0, "<= 80 B (manifest budget per file)")
    over = Result("rss per entry", "d", budget, Figure("B", [1650.0, 1677.0, 1700.0]))
    under = Result("rss per entry, small", "d", budget, Figure("B", [60.0]))
    peer = report.PeerResult("arv-mount", Figure("B", [2985.0]))
    over.peer = peer
    under.peer = report.PeerResult("arv-mount", na="arv-mount: over its time limit")
    assert (over.passed, under.passed) == (False, True)
    assert over.peer_ratio == pytest.approx(1677 / 2985)
    doc = peer_doc([over, under])
    assert report.validate(doc) == []
    row = next(line for line in report.table(doc).splitlines() if line.startswith("rss per entry "))
    assert "1,677 B" in row and "1,650 B .. 1,700 B" in row and "2,985 B" in row and "0.56" in row
    assert row.endswith("<= 80 B (manifest budget per file)  FAIL")
