"""Training speed from a map-style dataset of PNG files with worker processes, against the same
images as an in-memory ArrayDataset (issue 26: the target is >= 90% of the in-memory speed).

Writes N 28x28 grayscale PNGs (the first N images of the bundled MNIST sample) into a temporary
folder, then trains ``simple-cnn`` (SGD, batch 64, NumPy backend) for a few short epochs on each
source, alternating them so all see the same machine load. The files are read each epoch by a
map-style dataset in three ways: with Pillow (``Image.open``, then the pixels' bytes), and with
``anycnn.data.images.load_image`` (whose quick PNG path hands the image data to Pillow's PNG
decoder without ``Image.open``), and a batch at a time through ``__getitems__`` with
``anycnn.data.images.load_images`` (the batch's PNGs un-filtered by Pillow in one call); each
with the loaders' default ``worker_nice``, or with each value given to ``--worker-nice``. The
first epoch of each source is a warm-up (kernel compilation, worker start) and is reported
apart; the rate is the median of the other epochs (``Trainer`` history's ``images_per_s``), and
the median ratio of each epoch's rate to the in-memory epoch run just before it. The CPU seconds
per epoch (this process's threads and the workers') are printed too: on a busy machine they say
more than the rates, since the ratio of in-memory to worker CPU is the speed ratio once every
core is taken. Also times the two ways of sending a batch from a worker to the training process
(pickled over a pipe, or through shared memory) for 64 x 28x28x1 ``uint8`` and ``float32``
batches.

    PYTHONPATH=. python3 tools/bench_mapstyle.py [--images 2000] [--epochs 4] [--workers 2]
        [--worker-nice 0 5] [--no-transport] [--control]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from anycnn.data.dataloader import WORKER_NICE


class PNGFiles:
    """A map-style dataset of image files, decoded with Pillow in ``__getitem__``."""

    def __init__(self, paths: list[str], labels: np.ndarray) -> None:
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as image:  # tobytes: cheaper than np.asarray(image)
            pixels = np.frombuffer(image.tobytes(), np.uint8)
            return pixels.reshape(image.height, image.width, -1), int(self.labels[i])


class PNGFilesLoadImage(PNGFiles):
    """The same files read with ``anycnn.data.images.load_image`` (its quick PNG path: the chunks
    read in Python, the pixels by Pillow's PNG decoder without ``Image.open``)."""

    def __getitem__(self, i: int):
        from anycnn.data.images import load_image

        return load_image(self.paths[i], channels=1), int(self.labels[i])


class PNGFilesBatched(PNGFilesLoadImage):
    """The same files, a batch at a time: ``__getitems__`` reads the batch's files with
    ``anycnn.data.images.load_images`` (plain PNGs of one size decoded together)."""

    def __getitems__(self, indices: list[int]):
        from anycnn.data.images import load_images

        images = load_images([self.paths[i] for i in indices], channels=1)
        return [(image, int(self.labels[i])) for image, i in zip(images, indices, strict=True)]


class InMemory:
    """The same images as a map-style dataset without decoding (isolates the loader's cost)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def write_pngs(folder: Path, images: np.ndarray) -> list[str]:
    from PIL import Image

    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i:05d}.png"
        Image.fromarray(image[..., 0]).save(path)
        paths.append(str(path))
    return paths


def train_rates(sources: dict, epochs: int) -> dict:
    """Alternate the sources epoch by epoch; ``{name: (warm-up img/s, [img/s of the rest])}``."""
    import anycnn
    from anycnn.models import simple_cnn
    from anycnn.train import Trainer

    trainers, rates = {}, {name: [] for name in sources}
    cpu = {name: [] for name in sources}
    worker_cpu = {name: [] for name in sources}
    for name in sources:
        anycnn.manual_seed(0) if hasattr(anycnn, "manual_seed") else None
        model = simple_cnn()
        trainers[name] = Trainer(model, anycnn.optim.SGD(model.parameters(), lr=0.05,
                                                         momentum=0.9), progress=False)
    for epoch in range(1, epochs + 1):
        for name, loader in sources.items():
            before, workers_before = time.process_time(), _workers_cpu(loader)
            history = trainers[name].fit(loader, epochs=epoch)
            rates[name].append(history[-1]["images_per_s"])
            cpu[name].append(time.process_time() - before)
            worker_cpu[name].append(_workers_cpu(loader) - workers_before)
    return {name: (r[0], r[1:], statistics.median(cpu[name][1:]),
                   statistics.median(worker_cpu[name][1:])) for name, r in rates.items()}


def _workers_cpu(loader) -> float:
    """CPU seconds the loader's worker processes have used (Linux ``/proc/PID/schedstat``,
    nanoseconds; 0 elsewhere)."""
    pool = getattr(loader, "_pool", None)
    total = 0.0
    for process, _ in getattr(pool, "_workers", []):
        try:
            with open(f"/proc/{process.pid}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return total


def _pipe_worker(conn, dtype):
    x, y = np.ones((64, 28, 28, 1), dtype), np.arange(64)
    while (task := conn.recv()) is not None:
        conn.send((task, x, y))


def _shm_worker(conn, name, dtype):
    shm = shared_memory.SharedMemory(name=name)
    x, y = np.ones((64, 28, 28, 1), dtype), np.arange(64)
    while (task := conn.recv()) is not None:
        slot = task % 4
        np.ndarray(x.shape, dtype, shm.buf, offset=slot * x.nbytes)[...] = x
        conn.send((task, slot, y))
    shm.close()


def transport_us(kind: str, dtype: str, batches: int = 400) -> float:
    """Median microseconds per batch received (two batches in flight, a copy out of shared
    memory included), of 5 runs."""
    ctx = mp.get_context("forkserver")
    here, there = ctx.Pipe()
    nbytes = 64 * 28 * 28 * np.dtype(dtype).itemsize
    shm = shared_memory.SharedMemory(create=True, size=4 * nbytes) if kind == "shm" else None
    args = (there, dtype) if shm is None else (there, shm.name, dtype)
    worker = ctx.Process(target=_pipe_worker if shm is None else _shm_worker, args=args)
    worker.start()
    here.send(-1)
    here.recv()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        here.send(0)
        here.send(1)
        for i in range(batches):
            message = here.recv()
            if shm is not None:
                np.ndarray((64, 28, 28, 1), dtype, shm.buf, offset=message[1] * nbytes).copy()
            if i + 2 < batches:
                here.send(i + 2)
        runs.append((time.perf_counter() - t0) / batches * 1e6)
    here.send(None)
    worker.join()
    if shm is not None:
        shm.close()
        shm.unlink()
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-nice", type=int, nargs="+", default=[WORKER_NICE],
                        help="the loaders' worker_nice; several values: one loader each")
    parser.add_argument("--no-transport", action="store_true")
    parser.add_argument("--control", action="store_true",
                        help="also train from the arrays as a map-style dataset with workers")
    args = parser.parse_args()

    import anycnn
    from anycnn.data import ArrayDataset, DataLoader, load_dataset

    anycnn.use_backend("numpy")
    train = load_dataset("mnist-sample").train
    images, labels = train.images[:args.images], train.labels[:args.images]
    if not args.no_transport:
        for dtype in ("uint8", "float32"):
            print(f"transport {dtype:7s}: pickled over a pipe {transport_us('pipe', dtype):6.0f} "
                  f"us/batch, shared memory {transport_us('shm', dtype):6.0f} us/batch")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files = PNGFiles(write_pngs(Path(tmp), images), labels)
        print(f"wrote {len(files)} PNGs in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        decoded = np.stack([files[i][0] for i in range(len(files))])
        print(f"decoding them all in this process: {time.perf_counter() - t0:.2f} s")
        assert np.array_equal(decoded.reshape(images.shape), images)
        sources = {"in-memory ArrayDataset": DataLoader(ArrayDataset(images, labels, 10), 64,
                                                        shuffle=True)}
        readers = {"Pillow": files, "load_image": PNGFilesLoadImage(files.paths, labels),
                   "load_images batch": PNGFilesBatched(files.paths, labels)}
        for reader, dataset in readers.items():
            for nice in args.worker_nice:
                sources[f"PNG files ({reader}), {args.workers} workers, nice {nice}"] = \
                    DataLoader(dataset, 64, shuffle=True, num_workers=args.workers,
                               worker_nice=nice)
        if args.control:
            sources[f"arrays, map-style, {args.workers} workers"] = DataLoader(
                InMemory(images, labels), 64, shuffle=True, num_workers=args.workers)
        results = train_rates(sources, args.epochs)
        for loader in sources.values():
            loader.close()
    base = results["in-memory ArrayDataset"][1]
    base_cpu = results["in-memory ArrayDataset"][2]
    for name, (warm, rest, own, workers) in results.items():
        cpu = own + workers
        ratio = statistics.median(r / b for r, b in zip(rest, base, strict=True))
        print(f"{name:52s}: {statistics.median(rest):6.0f} img/s (median of {len(rest)} epochs: "
              f"{', '.join(f'{r:.0f}' for r in rest)}; warm-up epoch {warm:.0f}); median ratio "
              f"to the in-memory epoch run just before it: {ratio:.0%}; CPU per epoch "
              f"{cpu:.2f} s ({own:.2f} s this process, {workers:.2f} s the workers) = "
              f"{cpu / base_cpu:.0%} of in-memory")


if __name__ == "__main__":
    main()
