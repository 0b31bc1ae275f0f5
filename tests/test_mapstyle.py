"""Map-style datasets in the DataLoader (anycnn.data.mapstyle, workers, prefetch): the same
batches as an in-memory ArrayDataset for 0 and 2 workers, exact mid-epoch resume, per-batch
seeding, worker errors and deaths ending the epoch (never a hang), input validation."""

from __future__ import annotations

import os
import platform
import signal
import threading

import numpy as np
import pytest

import anycnn
import tests.mapstyle_data as toys
from anycnn import layers as L
from anycnn.backend import to_numpy
from anycnn.data import ArrayDataset, Augment, DataLoader, Normalize, priority
from anycnn.errors import ConfigError, DataError
from anycnn.train.callbacks import Callback
from anycnn.train.trainer import Trainer

WORKERS = [0, 2]


@pytest.fixture(autouse=True)
def no_hang():
    """A hang is a failure: every test here ends within 60 s."""
    def alarm(*_):
        raise TimeoutError("test took over 60 s (a DataLoader hang?)")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def as_arrays(toy: toys.ToyImages) -> ArrayDataset:
    return ArrayDataset(*toy.arrays(), toy.num_classes)


def collect(batches) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(to_numpy(x), to_numpy(y)) for x, y in batches]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for (xa, ya), (xb, yb) in zip(got, want):
        np.testing.assert_array_equal(xa, xb, strict=True)
        np.testing.assert_array_equal(ya, yb, strict=True)


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("options", [
    {},
    {"shuffle": True, "seed": 11, "drop_last": True},
    {"shuffle": True, "augment": Augment(crop=1, flip=True), "normalize": Normalize((.4, .5),
                                                                                    (.2, .3))},
    {"shuffle": True, "shard": (1, 3), "dtype": "float64"},
])
def test_same_batches_as_the_array_dataset(backend, workers, options):
    toy = toys.ToyImages(n=23, hw=5, c=2)
    want_loader = DataLoader(as_arrays(toy), 4, **options)
    with DataLoader(toy, 4, num_workers=workers, **options) as loader:
        for epoch in (0, 3):
            loader.set_epoch(epoch)
            want_loader.set_epoch(epoch)
            got = collect(loader)
            assert_same_batches(got, collect(want_loader))
            x, y = next(iter(loader))
            assert x.dtype == getattr(backend.xp, options.get("dtype", "float32"))
            assert y.dtype == backend.xp.int64
    assert loader.image_shape == (5, 5, 2)


@pytest.mark.parametrize("workers", WORKERS)
def test_target_vectors_and_mixing(backend, workers):
    """(K,) target vectors batch as float32 (B, K), as an ArrayDataset's (N, K) labels; MixUp
    and CutMix mix them (and class ids, given num_classes) the same way."""
    from anycnn.data import AugmentPipeline, BatchMix

    mix = AugmentPipeline(mix=BatchMix(mixup=0.4, cutmix=1.0))
    for toy in (toys.ToyImages(n=19, targets=True), toys.ToyImages(n=19)):
        for augment in (None, mix):
            want = collect(DataLoader(as_arrays(toy), 4, shuffle=True, augment=augment))
            got = collect(DataLoader(toy, 4, shuffle=True, augment=augment,
                                     num_workers=workers))
            assert_same_batches(got, want)
            if toy.targets or augment is not None:
                assert got[0][1].shape == (4, 7) and got[0][1].dtype == np.float32


@pytest.mark.parametrize("image_dtype", ["uint8", "float32"])
def test_pil_and_float_images(backend, image_dtype):
    if image_dtype == "uint8":
        toy, source = toys.ToyImages(n=9, hw=6, c=3), toys.PILImages(n=9, hw=6, c=3)
    else:
        toy = source = toys.ToyImages(n=9, hw=6, c=1, dtype="float32")
    assert_same_batches(collect(DataLoader(source, 4, shuffle=True, num_workers=2)),
                        collect(DataLoader(as_arrays(toy), 4, shuffle=True)))


@pytest.mark.parametrize("workers", WORKERS)
def test_iter_from_resumes_mid_epoch_exactly(backend, workers):
    toy = toys.ToyImages(n=23, noise=True)
    with DataLoader(toy, 4, shuffle=True, seed=3, num_workers=workers) as loader:
        loader.set_epoch(2)
        whole = collect(loader)
        assert_same_batches(collect(loader.iter_from(4)), whole[4:])
        assert_same_batches(collect(loader.iter_from(len(loader))), [])
        loader.set_epoch(3)
        other = collect(loader)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(whole, other))


def test_per_batch_seeding_does_not_depend_on_the_worker_count(backend):
    """__getitem__ draws from np.random: the draws depend on (seed, epoch, batch) only; the
    calling process's generator is left as it was."""
    runs = {}
    for workers in (0, 1, 2, 3):
        np.random.seed(123)  # noqa: NPY002 (the global generator the dataset uses)
        before = np.random.get_state()[1].copy()  # noqa: NPY002
        runs[workers] = collect(DataLoader(toys.ToyImages(n=23, noise=True), 4, shuffle=True,
                                           num_workers=workers))
        np.testing.assert_array_equal(np.random.get_state()[1], before)  # noqa: NPY002
    for workers in (1, 2, 3):
        assert_same_batches(runs[workers], runs[0])
    plain = collect(DataLoader(toys.ToyImages(n=23), 4, shuffle=True))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(runs[0], plain))


@pytest.mark.parametrize("workers", WORKERS)
def test_worker_info(backend, workers):
    batches = collect(DataLoader(toys.InfoImages(n=10), 4, num_workers=workers))
    for b, (x, y) in enumerate(batches):
        np.testing.assert_array_equal(y, np.full(len(y), b))
        tags = np.round(x[:, 0, 0, 0] * 255).astype(int)
        expected = 0 if workers == 0 else b % workers + 1
        np.testing.assert_array_equal(tags, np.full(len(y), expected))
    assert anycnn.data.worker_info() is None


def test_abandoned_iteration_leaves_no_stale_batches(backend):
    toy = toys.ToyImages(n=40)
    with DataLoader(toy, 4, shuffle=True, num_workers=2) as loader:
        want = collect(loader)
        for stop in (1, 3):
            for i, _ in enumerate(loader):
                if i == stop:
                    break
            assert_same_batches(collect(loader), want)
        it = iter(loader)
        next(it)
        assert_same_batches(collect(loader.iter_from(5)), want[5:])  # a new one replaces it


def test_close_ends_the_workers(backend):
    loader = DataLoader(toys.ToyImages(n=8), 4, num_workers=2)
    list(loader)
    processes = [p for p, _ in loader._pool._workers]
    assert all(p.is_alive() for p in processes)
    loader.close()
    assert not any(p.is_alive() for p in processes)
    assert len(list(loader)) == 2  # new workers


def test_raising_getitem_ends_the_epoch_with_the_worker_traceback(backend):
    # example 5: batch index 1 of epoch index 0, counted from 1 as everywhere else
    loader = DataLoader(toys.RaisesOn(bad=5, n=16), 4, num_workers=2)
    with pytest.raises(DataError, match="worker 1 failed building batch 2 of epoch 1;") as info:
        list(loader)
    message = str(info.value)
    assert "Traceback" in message and "KeyError: 'toy failure reading example 5'" in message
    assert "mapstyle_data.py" in message
    assert len(collect(loader.iter_from(2))) == 2  # the next iteration starts new workers
    loader.set_epoch(1)  # the run's second epoch
    with pytest.raises(DataError, match="building batch 2 of epoch 2;"):
        list(loader)
    with pytest.raises(KeyError, match="toy failure"):  # in this process: the error itself
        list(DataLoader(toys.RaisesOn(bad=5, n=16), 4))


def test_a_worker_that_exits_ends_the_epoch(backend):
    # example 9: batch 2, worker 0
    loader = DataLoader(toys.ExitsOn(bad=9, n=16), 4, num_workers=2)
    with pytest.raises(DataError, match=r"worker 0 \(pid \d+\) exited with code 3 while "
                                        r"building batch 3 of epoch 1:"):
        list(loader)
    assert len(collect(loader.iter_from(3))) == 1


def test_error_inside_training_ends_fit(backend):
    anycnn.manual_seed(0)
    model = anycnn.Sequential(L.Flatten(), L.Dense(50, 7))
    trainer = Trainer(model, anycnn.optim.SGD(model.parameters(), lr=0.1), progress=False)
    with pytest.raises(DataError, match="toy failure reading example 9"):
        trainer.fit(DataLoader(toys.RaisesOn(bad=9, n=16), 4, num_workers=2), epochs=1)


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.at = step

    def on_step_end(self, trainer, step, logs):
        if step == self.at:
            trainer.request_stop("test")


def _run(loader, seed=0):
    anycnn.manual_seed(seed)
    model = anycnn.Sequential(L.Conv2D(2, 3, 3), L.ReLU(), L.Flatten(), L.Dense(27, 7))
    return Trainer(model, anycnn.optim.Adam(model.parameters(), lr=3e-3), progress=False)


def test_training_stopped_mid_epoch_resumes_like_the_in_memory_run(backend, tmp_path):
    """Two workers, stopped at step 3 of epoch 1, saved, resumed by a new trainer with a new
    loader: the weights equal a straight run over the same data held as an ArrayDataset."""
    toy = toys.ToyImages(n=23, hw=5, c=2)
    straight = _run(None)
    straight.fit(DataLoader(as_arrays(toy), 4, shuffle=True, seed=5), epochs=2)

    first = _run(None)
    with DataLoader(toy, 4, shuffle=True, seed=5, num_workers=2) as loader:
        first.fit(loader, epochs=1)
        first.fit(loader, epochs=2, callbacks=[StopAt(3)])
        assert (first.epoch, first.step, first.stopped) == (1, 3, "test")
        path = first.save(tmp_path / "stopped.safetensors")
    resumed = _run(None, seed=9)
    resumed.resume(path)
    with DataLoader(toy, 4, shuffle=True, seed=5, num_workers=2) as loader:
        resumed.fit(loader, epochs=2)
    for (name, want), got in zip(straight.model.state_dict().items(),
                                 resumed.model.state_dict().values()):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want), err_msg=name)


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("how", "match"), [
    ("shape", r"dataset\[6\] is a uint8 image of shape \(4, 5, 2\), but dataset\[0\]"),
    ("dtype", r"dataset\[6\]'s image must be .* int16"),
    ("range", r"dataset\[6\] is a float image with values outside \[0, 1\]"),
    ("label", r"dataset\[6\]'s label must be an integer class id or a vector of targets "
              r"in \[0, 1\], got float 1.5"),
    ("chw", r"dataset\[6\]'s image of shape \(3, 8, 8\) looks channels first"),
    ("pair", r"dataset\[6\] must be an \(image, label\) pair, got ndarray"),
])
@pytest.mark.parametrize("workers", WORKERS)
def test_bad_samples_are_named(how, match, workers):
    dtype = "float32" if how == "range" else "uint8"
    loader = DataLoader(toys.BadAt(6, how, n=8, dtype=dtype), 4, num_workers=workers)
    with pytest.raises(DataError, match=match):
        list(loader)
    if how != "shape":  # dataset[0] sets the shape
        with pytest.raises(DataError, match=match.replace(r"\[6\]", r"\[0\]")):
            DataLoader(toys.BadAt(0, how, n=8, dtype=dtype), 4)  # dataset[0] is read at once


def test_options_refused_for_map_style_datasets():
    toy = toys.ToyImages(n=8)
    with pytest.raises(ConfigError, match="device_resident"):
        DataLoader(toy, 4, device_resident=True)
    with pytest.raises(ConfigError, match="auto"):
        DataLoader(toy, 4, normalize="auto")
    with pytest.raises(ConfigError, match="num_workers"):
        DataLoader(toy, 4, num_workers=-1)
    with pytest.raises(ConfigError, match="channel"):
        DataLoader(toy, 4, normalize=Normalize((0.5,), (0.2,)))
    with pytest.raises(ConfigError, match="ArrayDataset or a map-style"):
        DataLoader(object(), 4)
    with pytest.raises(ConfigError, match=r"cannot be pickled.*num_workers=0"):
        list(DataLoader(toys.Unpicklable(n=8), 4, num_workers=2))
    assert len(list(DataLoader(toys.Unpicklable(n=8), 4))) == 2
    from anycnn.data import AugmentPipeline, BatchMix

    pairs = [(np.zeros((4, 4), np.uint8), i % 2) for i in range(8)]  # a list: no num_classes
    with pytest.raises(ConfigError, match="num_classes attribute"):
        DataLoader(pairs, 4, augment=AugmentPipeline(mix=BatchMix(mixup=0.2)))


def test_labels_of_another_kind_are_named():
    class Mixed(toys.ToyImages):
        def __getitem__(self, i):
            image, label = super().__getitem__(i)
            return image, (np.ones(3) if i == 5 else label)

    with pytest.raises(DataError, match=r"dataset\[5\]'s label is a vector of 3 targets, but "
                                        r"dataset\[0\]'s is a class id"):
        list(DataLoader(Mixed(n=8), 4))
    with pytest.raises(DataError, match=r"dataset\[0\]'s targets must lie in \[0, 1\]"):
        DataLoader([(np.zeros((4, 4), np.uint8), [0.5, 2.0])], 1)


def test_a_list_of_pairs_and_an_empty_dataset():
    pairs = [(np.full((3, 3), i, np.uint8), i % 2) for i in range(5)]
    batches = collect(DataLoader(pairs, 2, num_workers=2))
    assert [x.shape for x, _ in batches] == [(2, 3, 3, 1)] * 2 + [(1, 3, 3, 1)]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), [0, 1, 0, 1, 0])
    empty = DataLoader([], 2, num_workers=2)
    assert len(empty) == 0 and list(empty) == [] and empty.image_shape is None


def test_batches_larger_than_a_pipe_buffer(backend):
    """Batches of 663 KB (float32 96x96x3) cross the workers' pipes without a stall."""
    toy = toys.ToyImages(n=15, hw=96, c=3, dtype="float32")
    with DataLoader(toy, 6, shuffle=True, num_workers=2) as loader:
        got = collect(loader)
        assert_same_batches(collect(loader.iter_from(1)), got[1:])
    assert_same_batches(got, collect(DataLoader(as_arrays(toy), 6, shuffle=True)))


@pytest.mark.skipif(not hasattr(os, "nice"), reason="no os.nice on this platform")
def test_workers_run_at_the_nice_value_asked_for():
    """worker_nice is added to the workers' nice value (default 5); the calling process's is
    untouched; values outside 0..19 are refused."""
    own = os.nice(0)
    toy = toys.NiceImages(n=8, num_classes=40)
    for nice, want in ((None, own + 5), (0, own), (3, own + 3)):
        options = {} if nice is None else {"worker_nice": nice}
        with DataLoader(toy, 4, num_workers=2, **options) as loader:
            labels = np.concatenate([y for _, y in collect(loader)])
        np.testing.assert_array_equal(labels, np.full(8, min(want, 19)))
    assert os.nice(0) == own
    assert np.all(np.concatenate([y for _, y in collect(DataLoader(toy, 4))]) == own)
    for bad in (-1, 20, 2.5, True):
        with pytest.raises(ConfigError, match="worker_nice"):
            DataLoader(toy, 4, num_workers=2, worker_nice=bad)


def _slice_us() -> int | None:
    """This thread's time slice in microseconds, or None where /proc does not show it."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/sched") as f:
            return next(int(line.split(":")[1]) // 1000 for line in f
                        if line.startswith("se.slice"))
    except (OSError, StopIteration, ValueError):
        return None


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(part) for part in platform.release().split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


@pytest.mark.skipif(_slice_us() is None or not _kernel_at_least(6, 12)
                    or platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"),
                    reason="needs Linux 6.12+ (custom slices) showing se.slice in /proc, on "
                           "x86-64 or arm64")
def test_workers_ask_for_short_time_slices():
    """With worker_nice > 0 the workers run in 0.1 ms slices (anycnn.data.priority); with 0
    their slice is the calling process's default; the caller's is never changed."""
    own = _slice_us()
    toy = toys.SliceImages(n=4, num_classes=10 ** 6)
    for nice, want in ((5, priority.SLICE_NS // 1000), (0, own)):
        with DataLoader(toy, 2, num_workers=2, worker_nice=nice) as loader:
            labels = np.concatenate([y for _, y in collect(loader)])
        np.testing.assert_array_equal(labels, np.full(4, want))
    assert _slice_us() == own


@pytest.mark.parametrize("workers", WORKERS)
def test_getitems_reads_a_batch_in_one_call(backend, workers):
    """A dataset with __getitems__ gets each batch's indices in one call and gives the very
    batches (per-batch seeding included) of the same dataset read item by item; a wrong count
    is named."""
    options = {"shuffle": True, "seed": 3, "num_workers": workers}
    batched = toys.BatchedImages(n=21, noise=True)
    want = collect(DataLoader(toys.ToyImages(n=21, noise=True), 4, **options))
    with DataLoader(batched, 4, **options) as loader:
        assert_same_batches(collect(loader), want)
        assert_same_batches(collect(loader.iter_from(3)), want[3:])
    if workers == 0:
        assert batched.calls == [4, 4, 4, 4, 4, 1, 4, 4, 1]  # the epoch, then iter_from(3)
    with pytest.raises(DataError, match=r"__getitems__ of 4 indices must return a list of as "
                                        r"many \(image, label\) pairs, got a list of 3"):
        list(DataLoader(toys.BatchedImages(short=True, n=8), 4, num_workers=workers))


def test_next_epoch_started_early_gives_the_same_batches(backend):
    """Once an epoch's batches are all asked for, the workers start the next epoch's first
    batches; the next iteration takes them only when it is exactly that epoch from batch 0,
    and every iteration gives the batches a fresh loader gives."""
    toy = toys.ToyImages(n=36, noise=True)  # 9 batches of 4: 4 are started early

    def fresh(epoch, start=0):
        loader = DataLoader(toy, 4, shuffle=True, seed=2)
        loader.set_epoch(epoch)
        return collect(loader.iter_from(start))

    with DataLoader(toy, 4, shuffle=True, seed=2, num_workers=2) as loader:
        assert_same_batches(collect(loader), fresh(0))
        pool = loader._pool
        started = pool._next[0]
        assert [b for b, _ in pool._next[3]] == [0, 1, 2, 3]
        loader.set_epoch(1)
        batches = loader.iter_from(0)
        first = collect([next(batches)])
        assert pool._token == started  # taken: no new request for epoch 1's first batches
        assert_same_batches(first + collect(batches), fresh(1))
        loader.set_epoch(2)
        assert_same_batches(collect(loader.iter_from(3)), fresh(2, 3))  # not taken: resumed
        loader.set_epoch(7)
        assert_same_batches(collect(loader), fresh(7))  # not taken: another epoch
        loader.set_epoch(8)
        assert_same_batches(collect(loader), fresh(8))  # taken again


def test_a_script_without_the_main_guard_is_told_to_add_it(tmp_path):
    """Workers import the main script: without ``if __name__ == "__main__":`` each fails while
    starting (multiprocessing's bootstrapping RuntimeError) and exits with code 1; the error
    names the guard."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "train_script.py"
    script.write_text(
        "import numpy as np\n"
        "from anycnn.data import DataLoader\n\n"
        "class Toy:\n"
        "    def __len__(self):\n"
        "        return 8\n\n"
        "    def __getitem__(self, i):\n"
        "        return np.zeros((4, 4, 3), np.uint8), i % 2\n\n"
        "for images, labels in DataLoader(Toy(), 4, num_workers=1):\n"
        "    pass\n")
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=50)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "exited with code 1" in last and 'if __name__ == "__main__":' in last, done.stderr
