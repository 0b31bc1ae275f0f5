"""``anycnn bench --input-grad`` and ``--first-step``: the columns and rows they add (tiny
sizes; no timing is asserted)."""

from __future__ import annotations

import json
import sys

import pytest

from anycnn.cli.commands import main
from anycnn.kernels import kernel_bundle

#: every run here is ``--backend numpy``: the same in every session (left to the numpy one)
pytestmark = pytest.mark.numpy_only


def _bench(tmp_path, capsys, *argv: str) -> tuple[str, dict]:
    out_json = tmp_path / "bench.json"
    code = main(["bench", "--backend", "numpy", "--model", "lenet5", "--batch-sizes", "4",
                 "--steps", "2", "--warmup", "1", "--rounds", "1", "--json", str(out_json),
                 *argv])
    assert code == 0
    return capsys.readouterr().out, json.loads(out_json.read_text())


def test_input_grad_times_the_default_backward_beside_the_trainers(tmp_path, capsys):
    out, results = _bench(tmp_path, capsys, "--input-grad")
    assert "with input grad ms" in out
    row = results["rows"][0]
    assert row["anycnn"]["train_input_grad"] > 0
    assert row["input_grad_ratio"] == row["anycnn"]["train_input_grad"] / row["anycnn"]["train"]


def test_alternated_steps_take_turns_first():
    """``--input-grad``'s two steps are timed alternately, the order reversed every other
    round, each ended by the sync: the same number of times each, after the warmup rounds."""
    from anycnn.cli.bench import time_alternating

    calls = []
    times = time_alternating([lambda: calls.append("a"), lambda: calls.append("b")],
                             lambda: calls.append("sync"), 1, 3)
    assert calls == ["a", "b", "sync", "a", "sync", "b", "sync", "b", "sync", "a", "sync",
                     "a", "sync", "b", "sync"]
    assert [len(t) for t in times] == [3, 3] and all(v >= 0 for t in times for v in t)


def test_first_step_runs_a_cold_and_a_warm_cache_process(tmp_path, capsys):
    out, results = _bench(tmp_path, capsys, "--first-step")
    assert "first step, empty cache ms" in out and "page faults cached first / warm" in out
    row = results["rows"][0]
    for kind in ("cold", "warm"):
        assert row[kind]["first_ms"] > 0 and row[kind]["warm_ms"] > 0
        # the first step maps its working memory; later steps reuse what the allocator kept
        assert row[kind]["first_faults"] > row[kind]["warm_faults"] >= 0
    assert row["warm_first_over_step"] == row["warm"]["first_ms"] / row["warm"]["warm_ms"]
    assert "kernel libraries empty / cached" in out
    if sys.platform.startswith("linux"):  # counted from /proc/self/maps
        assert 0 <= row["warm"]["libraries"] <= row["cold"]["libraries"]
    kernels = (row["cold"]["libraries"] or 1) - 1  # the cold process's, but Halide's runtime
    if kernels >= kernel_bundle.BUNDLE_AFTER:
        # enough for a bundle: the cached process opens Halide's runtime and the bundle
        assert row["warm"]["libraries"] == 2
    elif kernels:  # too few to bundle (a tiny batch takes few kernels): one by one again
        assert row["warm"]["libraries"] == row["cold"]["libraries"]
