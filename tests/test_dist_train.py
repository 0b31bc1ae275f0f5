"""Data-parallel training on real ``mpiexec`` jobs (tests/mpi_run.py: timeouts, never pytest
under mpiexec): N ranks x a share of batch B against one process summing the same shares (bit
for bit on 2 ranks with pinned threads) and one process on batch B (float32 tolerance); uneven
and empty shares; BatchNorm statistics and sharded validation; configuration mismatches; an
exception, a NaN or a killed process on one rank; SIGTERM and resume on 2 and on 1 rank."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import anycnn
from anycnn.data import DataLoader
from anycnn.io.checkpoint import load_checkpoint
from anycnn.nn import SoftmaxCrossEntropy
from anycnn.train import evaluate

from .mpi_run import SCRIPTS, child_env, mpiexec_or_skip, run_ranks
from .rounding import assert_rounding_close

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None,
                                reason="mpi4py is not installed (pip install 'anycnn[mpi]')")

WORKER = SCRIPTS / "train_worker.py"
_spec = importlib.util.spec_from_file_location("train_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


@pytest.fixture(autouse=True)
def numpy_backend(monkeypatch):
    monkeypatch.setenv("ANYCNN_NUM_THREADS", "1")
    with anycnn.use_backend("numpy"):
        yield


def run_worker(tmp_path, ranks: int, timeout: float = 60, backend: str = "numpy", **cfg):
    """The worker on ``ranks`` ranks (0: one plain process): (process, seconds, results)."""
    cfg["out"] = str(tmp_path / f"out-{ranks}-{backend}.npz")
    path = tmp_path / f"cfg-{ranks}.json"
    path.write_text(json.dumps(cfg))
    if ranks:
        out, seconds = run_ranks(ranks, [str(WORKER), str(path)], timeout=timeout,
                                 ANYCNN_NUM_THREADS="1", ANYCNN_BACKEND=backend)
    else:
        start = time.monotonic()
        out = subprocess.run([sys.executable, str(WORKER), str(path)], capture_output=True,
                             text=True, timeout=timeout, env=child_env(ANYCNN_NUM_THREADS="1"))
        seconds = time.monotonic() - start
    result = dict(np.load(cfg["out"])) if out.returncode == 0 else None
    return out, seconds, result


def shard_sum_reference(size: int, examples=50, batch=12, epochs=2, augment=False,
                        groups=False, freeze=False):
    """One process doing what ``size`` ranks do: each share's gradient times its size, summed
    in rank order, divided by the batch's size, then one SGD step (of the trainable
    parameters)."""
    net = worker.model(False)
    if freeze:
        net[0].weight.requires_grad = False
    opt = worker.optimizer(net, groups)
    loss_fn = SoftmaxCrossEntropy()
    aug = anycnn.data.Augment(crop=1, flip=True) if augment else None
    loaders = [DataLoader(worker.dataset(examples), batch, shuffle=True, seed=3, augment=aug,
                          shard=(r, size)) for r in range(size)]
    params = [p for p in opt.params if p.requires_grad]
    for epoch in range(epochs):
        for loader in loaders:
            loader.set_epoch(epoch)
        for shares in zip(*loaders):
            total, count = None, 0
            for x, y in shares:
                n = y.shape[0]
                net.zero_grad()
                if n:
                    loss_fn.forward(net.forward(x), y)
                    net.backward(loss_fn.backward(), input_grad=False)
                    flat = np.concatenate([p.grad.reshape(-1) for p in params]) * float(n)
                else:
                    flat = np.zeros(sum(p.data.size for p in params), dtype=np.float32)
                total = flat if total is None else total + flat
                count += n
            grads = total / float(count)
            start = 0
            for p in params:
                p.grad = grads[start:start + p.data.size].reshape(p.shape)
                start += p.data.size
            opt.step()
    return {k: anycnn.to_numpy(v) for k, v in net.state_dict().items()}


def test_two_ranks_equal_one_process_summing_the_two_shares(tmp_path):
    # 50 examples, batch 12: the last batch has 2 (one each); augmentation is cut, not redrawn
    out, _, got = run_worker(tmp_path, 2, augment=True)
    assert out.returncode == 0, out.stderr
    want = shard_sum_reference(2, augment=True)
    single_out, _, single = run_worker(tmp_path, 0, augment=True)
    assert single_out.returncode == 0, single_out.stderr
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
        np.testing.assert_allclose(got[name], single[name], rtol=2e-4, atol=2e-5, err_msg=name)


def test_two_ranks_with_parameter_groups_and_a_frozen_layer_equal_one_process(tmp_path):
    out, _, got = run_worker(tmp_path, 2, groups=True, freeze=True)
    assert out.returncode == 0, out.stderr
    want = shard_sum_reference(2, groups=True, freeze=True)
    initial = worker.model(False).state_dict()
    np.testing.assert_array_equal(got["0.weight"], anycnn.to_numpy(initial["0.weight"]))
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert not np.array_equal(got["0.bias"], anycnn.to_numpy(initial["0.bias"]))


@pytest.mark.parametrize("backend", ["torch", "array_api_strict"])
def test_other_backends_train_data_parallel_through_host_buffers(tmp_path, backend):
    pytest.importorskip(backend)
    out, _, got = run_worker(tmp_path, 2, backend=backend)
    assert out.returncode == 0, out.stderr
    out, _, want = run_worker(tmp_path, 2)
    assert out.returncode == 0, out.stderr
    for name in (k for k in want if k not in ("history", "skipped")):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_three_ranks_with_an_empty_share_match_one_process(tmp_path):
    # the last batch of 2 leaves rank 0 an empty share
    out, _, got = run_worker(tmp_path, 3)
    assert out.returncode == 0, out.stderr
    single_out, _, single = run_worker(tmp_path, 0)
    assert single_out.returncode == 0, single_out.stderr
    sums = shard_sum_reference(3)
    for name, value in sums.items():
        assert_rounding_close(got[name], value, err_msg=name)
        np.testing.assert_allclose(got[name], single[name], rtol=2e-4, atol=2e-5, err_msg=name)
    ours, theirs = json.loads(str(got["history"])), json.loads(str(single["history"]))
    for a, b in zip(ours, theirs):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["train_accuracy"] == b["train_accuracy"]
        assert a["val_accuracy"] == b["val_accuracy"]


def test_batchnorm_statistics_are_averaged_before_sharded_validation(tmp_path):
    out, _, got = run_worker(tmp_path, 2, bn=True)
    assert out.returncode == 0, out.stderr
    net = worker.model(True)
    net.load_state_dict({k: v for k, v in got.items() if k not in ("history", "skipped")})
    val = evaluate(net, DataLoader(worker.dataset(21, seed=1), 8))
    last = json.loads(str(got["history"]))[-1]
    # the recorded validation ran on 2 ranks with the averaged statistics rank 0 then saved
    assert last["val_loss"] == pytest.approx(val["loss"], rel=1e-5)
    assert last["val_accuracy"] == val["accuracy"]


def test_clipping_and_the_weight_average_train_data_parallel(tmp_path):
    # issue 26: the global gradient is clipped and every rank averages the same weights
    out, _, got = run_worker(tmp_path, 2, clip_grad_norm=0.05, ema=0.7)
    assert out.returncode == 0, out.stderr
    single_out, _, single = run_worker(tmp_path, 0, clip_grad_norm=0.05, ema=0.7)
    assert single_out.returncode == 0, single_out.stderr
    unclipped_out, _, unclipped = run_worker(tmp_path, 0, ema=0.7)
    assert unclipped_out.returncode == 0, unclipped_out.stderr
    names = [k for k in got if k.startswith("ema:")]
    assert len(names) == 4
    for name in (k for k in got if k not in ("history", "skipped")):
        np.testing.assert_allclose(got[name], single[name], rtol=2e-4, atol=2e-5, err_msg=name)
    assert any(not np.allclose(single[k], unclipped[k], rtol=1e-3) for k in names)


def test_averaged_batchnorm_statistics_are_averaged_over_ranks_before_validation(tmp_path):
    out, _, got = run_worker(tmp_path, 2, bn=True, ema=0.7)
    assert out.returncode == 0, out.stderr
    net = worker.model(True)
    net.load_state_dict({k[4:]: v for k, v in got.items() if k.startswith("ema:")})
    val = evaluate(net, DataLoader(worker.dataset(21, seed=1), 8))
    last = json.loads(str(got["history"]))[-1]
    # validation ran on 2 ranks with the averages, their statistics averaged over the ranks
    assert last["val_loss"] == pytest.approx(val["loss"], rel=1e-5)
    assert last["val_accuracy"] == val["accuracy"]


def test_synchronised_batchnorm_trains_as_one_process_on_the_whole_batch(tmp_path):
    single_out, _, single = run_worker(tmp_path, 0, bn=True, epochs=1)
    assert single_out.returncode == 0, single_out.stderr
    out, _, synced = run_worker(tmp_path, 2, bn=True, sync_bn=True, epochs=1)
    assert out.returncode == 0, out.stderr
    (tmp_path / "own").mkdir()
    out, _, own = run_worker(tmp_path / "own", 2, bn=True, epochs=1)
    assert out.returncode == 0, out.stderr
    names = [k for k in single if k not in ("history", "skipped")]
    for name in names:  # running statistics included
        np.testing.assert_allclose(synced[name], single[name], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    # per-rank statistics (the default) train a measurably different model
    assert max(np.abs(own[k] - single[k]).max() for k in names) > 1e-3
    out, _, _ = run_worker(tmp_path, 3, bn=True, sync_bn=True, epochs=1)  # an empty share
    assert out.returncode != 0
    assert "synchronised BatchNorm needs every rank in every step" in out.stderr


def assert_job_failed(tmp_path, *messages: str, **cfg) -> None:
    """A 2-rank worker run with ``cfg`` ends, within 10 s, non-zero, saying each message."""
    out, seconds, _ = run_worker(tmp_path, 2, **cfg)
    report = f"rc {out.returncode} after {seconds:.1f} s; stderr:\n{out.stderr}"
    assert out.returncode != 0, report
    for message in messages:
        assert message in out.stderr, report
    assert seconds < 10, report


def test_mismatched_configurations_are_refused(tmp_path):
    assert_job_failed(tmp_path, "configured differently",
                      "batch_size: 10 on rank 1, 12 on rank 0", batch_on_rank={"1": 10})


def test_an_exception_on_rank_1_ends_the_job_with_its_rank(tmp_path):
    assert_job_failed(tmp_path, "rank 1/2 failed: RuntimeError: injected failure",
                      raise_on_rank=[1, 3])


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    assert_job_failed(tmp_path, "loss became nan at epoch 1, step 2", nan_on_rank=[1, 2])
    out, _, got = run_worker(tmp_path, 2, nan_on_rank=[1, 2], on_nonfinite="skip")
    assert out.returncode == 0, out.stderr
    assert int(got["skipped"]) == 1


def test_a_killed_rank_ends_the_job(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"out": str(tmp_path / "o.npz"), "examples": 2000,
                               "epochs": 1000, "pid_dir": str(tmp_path)}))
    job = subprocess.Popen([mpiexec_or_skip(), "-n", "2", sys.executable, str(WORKER), str(cfg)],
                           env=child_env(ANYCNN_NUM_THREADS="1"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        pid_file = tmp_path / "rank-1.pid"
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.05)
        assert pid_file.exists(), "rank 1 never trained a step"
        time.sleep(0.2)  # the file is written in full
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        start = time.monotonic()
        job.wait(timeout=30)
        assert time.monotonic() - start < 10
        assert job.returncode != 0
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


# ------------------------------------------------------------------ the command line


def _train_args(out, *extra):
    return ["-m", "anycnn", "train", "--dataset", "mnist-sample", "--limit", "256", "--model",
            "lenet5", "--epochs", "2", "--batch-size", "32", "--backend", "numpy", "--quiet",
            "--out", str(out), *extra]


def _weights(path):
    state = load_checkpoint(path)
    return state.tensors, state


def assert_same_weights(run_a, run_b) -> None:
    """The two run folders' checkpoints hold the same weights, bit for bit."""
    a, _ = _weights(run_a / "checkpoint.safetensors")
    b, _ = _weights(run_b / "checkpoint.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_cli_sigterm_then_resume_on_two_ranks_equals_an_uninterrupted_run(tmp_path):
    whole, _ = run_ranks(2, _train_args(tmp_path / "whole"), timeout=120, ANYCNN_NUM_THREADS="1")
    assert whole.returncode == 0, whole.stderr
    logs = tmp_path / "logs"
    logs.mkdir()
    job = subprocess.Popen(
        [mpiexec_or_skip(), "-n", "2", sys.executable, str(SCRIPTS / "slow_cli.py"), "0.3",
         str(logs), *_train_args(tmp_path / "cut")[2:]],
        env=child_env(ANYCNN_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            log = logs / "rank-0.log"
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)  # mpiexec forwards it to every rank
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 128 + signal.SIGTERM, err
    assert err.count("interrupted (SIGTERM)") == 1  # rank 0 reports
    assert err.count("SIGTERM received") == 1
    _, state = _weights(tmp_path / "cut" / "checkpoint.safetensors")
    assert state.epoch == 0 and 3 <= state.step < 8  # mid-epoch (8 steps of 32)
    ranks = [len((logs / f"rank-{r}.log").read_text().splitlines()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == state.step  # both ranks stopped at the same step

    resumed, _ = run_ranks(2, _train_args(tmp_path / "cut", "--resume"), timeout=120,
                           ANYCNN_NUM_THREADS="1")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(tmp_path / "cut", tmp_path / "whole")


def test_cli_two_rank_checkpoint_resumes_on_one_process(tmp_path):
    out, _ = run_ranks(2, _train_args(tmp_path / "run", "--epochs", "1"), timeout=120)
    assert out.returncode == 0, out.stderr
    alone = subprocess.run([sys.executable, *_train_args(tmp_path / "run", "--resume")],
                           capture_output=True, text=True, timeout=120, env=child_env())
    assert alone.returncode == 0, alone.stderr
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[1]["val_accuracy"] > 0.3


def test_cli_workers_option_equals_mpiexec(tmp_path):
    a, _ = run_ranks(2, _train_args(tmp_path / "a", "--epochs", "1"), timeout=120,
                     ANYCNN_NUM_THREADS="1")
    assert a.returncode == 0, a.stderr
    b = subprocess.run([sys.executable, *_train_args(tmp_path / "b", "--epochs", "1",
                                                     "--workers", "2")],
                       capture_output=True, text=True, timeout=120,
                       env=child_env(ANYCNN_NUM_THREADS="1"))
    assert b.returncode == 0, b.stderr
    assert b.stdout.count("final validation accuracy") == 1  # rank 0 alone prints
    assert_same_weights(tmp_path / "a", tmp_path / "b")


def test_cli_errors_are_one_line_on_several_ranks(tmp_path):
    bad, _ = run_ranks(2, _train_args(tmp_path / "x", "--epochs", "0"), timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "anycnn: error: --epochs must be >= 1, got 0"
    nested, _ = run_ranks(2, _train_args(tmp_path / "x", "--workers", "2"), timeout=60)
    assert nested.returncode == 2
    assert nested.stderr.count("--workers starts mpiexec itself") == 1
    evaluate_twice, _ = run_ranks(2, ["-m", "anycnn", "evaluate", str(tmp_path / "x")],
                                  timeout=60)
    assert evaluate_twice.returncode == 2
    assert evaluate_twice.stderr.strip() == (
        "anycnn: error: anycnn evaluate runs on one process, but a launcher started 2; run it "
        "without mpiexec/srun (only train is data-parallel)")


@pytest.mark.parametrize("average", [True, False])
def test_a_hand_written_loop_averages_with_one_call(tmp_path, average):
    """``anycnn.dist.average_gradients(model)`` keeps the ranks' weights equal; a loop that
    skips it diverges, and each rank's optimizer warns once."""
    out, _ = run_ranks(2, [str(SCRIPTS / "hand_loop.py"), "average" if average else "skip"],
                       timeout=120, ANYCNN_NUM_THREADS="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(f"same weights {average}") == 2, out.stdout
    assert out.stderr.count("not averaged over them") == (0 if average else 2), out.stderr
