"""benchmarks/accelerator.py runs and prints sane rows (its --quick mode, on the CPU).

Both run in the slow tier (their CNN compiles are over the default suite's budget): one
case without the engine-vs-loop check, and every case with the check, which compares the
engine's trained parameters with the sequential loop's."""

import importlib.util
import math
import os
import re
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
NUMBER = r"([0-9.eE+-]+)"
ROW = re.compile(r"^\| (\(\w\)[^|]*) \| (\d+) \| " + r" \| ".join([NUMBER] * 3)
                 + r" \| " + NUMBER + r"x \| " + NUMBER + r" \| " + NUMBER + r" \| ([^|]+) \|$")
CHECK = re.compile(r"^check: engine vs loop/step after \d+ rounds: max \|difference\| "
                   + NUMBER + ", parameters moved up to " + NUMBER + "$")


def _run(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "path", [BENCHMARKS, *sys.path])
    spec = importlib.util.spec_from_file_location("accelerator_benchmark",
                                                  os.path.join(BENCHMARKS, "accelerator.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    rows = module.main(argv)
    return rows, capsys.readouterr().out.splitlines()


def _check_rows(rows, lines, expected_cases):
    assert lines[0].startswith("backend: cpu, device: ")
    printed = [ROW.match(line) for line in lines if line.startswith("| (")]
    assert [m.group(1) for m in printed] == [r["case"] for r in rows]
    assert {r["case"][:3] for r in rows} == set(expected_cases)
    for m, row in zip(printed, rows):
        engine, loop, central, speedup, ratio, compile_s = (float(m.group(i)) for i in range(3, 9))
        for value in (engine, loop, central, compile_s):
            assert math.isfinite(value) and value > 0
        assert int(m.group(2)) == row["cohort"]
        # the ratio columns are those of the three contenders' columns
        assert speedup == pytest.approx(loop / engine, rel=0.05, abs=0.051)
        assert ratio == pytest.approx(engine / central, rel=0.05, abs=0.006)
        assert m.group(9).strip() == "n/a"  # XLA:CPU reports no device memory


@pytest.mark.slow  # ~13 CPU-seconds of CNN compiles: over the default suite's budget
def test_quick_run_times_the_three_contenders(monkeypatch, capsys):
    rows, lines = _run(monkeypatch, capsys,
                       ["--quick", "--cases", "a", "--reps", "1", "--rounds", "3", "--no-check"])
    _check_rows(rows, lines, ["(a)"])
    assert any(line.startswith("engine, 3 rounds end to end: ") for line in lines)
    assert rows[0]["end_to_end"][0] == 3 and rows[0]["end_to_end"][1] > 0


@pytest.mark.slow
def test_quick_run_of_every_case_with_the_engine_and_loop_training_alike(monkeypatch, capsys):
    rows, lines = _run(monkeypatch, capsys, ["--quick"])
    _check_rows(rows, lines, ["(a)", "(b)", "(c)"])
    checks = [CHECK.match(line) for line in lines if line.startswith("check: ")]
    assert len(checks) == len(rows) == 3
    for m in checks:
        difference, moved = float(m.group(1)), float(m.group(2))
        assert moved > 1e-3  # training changed the parameters ...
        assert difference <= 1e-4 * moved  # ... and both trained them alike (float round-off)
