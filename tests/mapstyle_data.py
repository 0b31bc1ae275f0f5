"""Toy map-style datasets for tests/test_mapstyle.py, in a module of their own so that worker
processes can import them (the dataset is pickled by reference to its class)."""

from __future__ import annotations

import os
import threading

import numpy as np


class ToyImages:
    """``n`` images ``(hw, hw, c)`` of ``dtype``, each a pure function of its index; with
    ``noise`` each read also adds a draw from NumPy's global generator (seeded per batch by the
    loader) to a pixel, so a batch shows which seed it was read under."""

    def __init__(self, n: int = 23, hw: int = 5, c: int = 2, dtype: str = "uint8",
                 noise: bool = False, num_classes: int = 7, targets: bool = False) -> None:
        self.n, self.hw, self.c, self.dtype, self.noise = n, hw, c, dtype, noise
        self.num_classes, self.targets = num_classes, targets

    def __len__(self) -> int:
        return self.n

    def image(self, i: int) -> np.ndarray:
        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 256, (self.hw, self.hw, self.c), dtype=np.uint8)
        return pixels if self.dtype == "uint8" else (pixels / 255).astype(self.dtype)

    def label(self, i: int):
        """A class id, or with ``targets`` a multi-label 0/1 vector (the bits of ``i + 1``)."""
        if self.targets:
            return np.array([(i + 1) >> k & 1 for k in range(self.num_classes)], np.float32)
        return (3 * i + 1) % self.num_classes

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        image = self.image(i)
        if self.noise:
            image[0, 0, 0] = np.random.randint(0, 256)  # noqa: NPY002 (the seeded global one)
        return image, self.label(i)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All images ``(n, hw, hw, c)`` and labels ``int64 (n,)``."""
        labels = [self.label(i) for i in range(self.n)]
        return (np.stack([self.image(i) for i in range(self.n)]),
                np.stack(labels) if self.targets else np.array(labels, np.int64))


class RaisesOn(ToyImages):
    """Raises ``KeyError`` when example ``bad`` is read."""

    def __init__(self, bad: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad = bad

    def __getitem__(self, i: int):
        if i == self.bad:
            raise KeyError(f"toy failure reading example {i}")
        return super().__getitem__(i)


class ExitsOn(ToyImages):
    """Ends its process with ``os._exit(3)`` when example ``bad`` is read."""

    def __init__(self, bad: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad = bad

    def __getitem__(self, i: int):
        if i == self.bad:
            os._exit(3)
        return super().__getitem__(i)


class PILImages(ToyImages):
    """The same images as PIL images (mode ``L`` for one channel, ``RGB`` for three)."""

    def __getitem__(self, i: int):
        from PIL import Image

        image, label = super().__getitem__(i)
        return Image.fromarray(image[..., 0] if self.c == 1 else image), label


class InfoImages(ToyImages):
    """Pixel ``[0, 0, 0]`` holds ``worker + 1`` (0 in the calling process) and the label the
    batch number, both from :func:`anycnn.data.worker_info`."""

    def __getitem__(self, i: int):
        from anycnn.data import worker_info

        image, _ = super().__getitem__(i)
        info = worker_info()
        image[0, 0, 0] = 0 if info.worker is None else info.worker + 1
        return image, info.batch


class Unpicklable(ToyImages):
    """Holds a lambda: cannot be sent to worker processes."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hook = lambda i: i


class BadAt(ToyImages):
    """Example ``bad`` is broken in the way ``how`` names."""

    def __init__(self, bad: int, how: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad, self.how = bad, how

    def __getitem__(self, i: int):
        image, label = super().__getitem__(i)
        if i != self.bad:
            return image, label
        if self.how == "shape":
            return image[1:], label
        if self.how == "dtype":
            return image.astype(np.int16), label
        if self.how == "range":
            return np.full(image.shape, 2.0, np.float32), label
        if self.how == "label":
            return image, 1.5
        if self.how == "chw":
            return np.zeros((3, 8, 8), np.uint8), label
        return image  # "pair": not an (image, label) pair


class NiceImages(ToyImages):
    """The label is the reading process's nice value (``os.nice(0)``)."""

    def __getitem__(self, i: int):
        image, _ = super().__getitem__(i)
        return image, os.nice(0)


class SliceImages(ToyImages):
    """The label is the reading thread's time slice in microseconds (Linux ``/proc`` ``se.slice``,
    kernel 6.12 or later)."""

    def __getitem__(self, i: int):
        image, _ = super().__getitem__(i)
        with open(f"/proc/self/task/{threading.get_native_id()}/sched") as f:
            line = next(line for line in f if line.startswith("se.slice"))
        return image, int(line.split(":")[1]) // 1000


class BatchedImages(ToyImages):
    """The same samples through ``__getitems__``; ``calls`` records each call's index count
    (in the process that makes it)."""

    def __init__(self, short: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.short, self.calls = short, []

    def __getitems__(self, indices: list[int]):
        self.calls.append(len(indices))
        samples = [self[i] for i in indices]
        return samples[:-1] if self.short else samples
