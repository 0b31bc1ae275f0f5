"""Rotation, colour jitter, random erasing, MixUp/CutMix and their composition
(anycnn.data.pipeline): each against a per-image reference written with plain NumPy (and the
standard library's colorsys for hue) on numpy, array_api_strict and torch; their draws,
determinism and exact resume; the --augment syntax and records; the mixed-target loss."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest

import anycnn
from anycnn import checkpoint as C
from anycnn import optim
from anycnn.backend import to_numpy
from anycnn.data.augment import Augment, Normalize, _read_augment, parse_augment, read_preprocess
from anycnn.data.color import ColorJitter
from anycnn.data.dataloader import DataLoader
from anycnn.data.erasing import RandomErasing
from anycnn.data.mixing import BatchMix
from anycnn.data.pipeline import AugmentPipeline, op_generator
from anycnn.data.rotation import RandomRotation
from anycnn.errors import ConfigError, ShapeError
from anycnn.nn.losses import SoftmaxCrossEntropy
from anycnn.train.trainer import Trainer
from tests.test_augment import make_dataset, run_loader, train_argv
from tests.test_reliability import isolated_env, run_main, tiny_data  # noqa: F401
from tests.test_train import StopAfter, assert_same_run, tiny_model

BACKENDS = ["numpy", "array_api_strict", "torch"]


def on(name):
    if name == "torch":
        pytest.importorskip("torch")
    return anycnn.use_backend(name)


def run_op(name, op, images, params):
    with on(name):
        return to_numpy(op.apply(anycnn.asarray(images), anycnn.asarray(params)))


def float_images(n=6, h=7, w=9, c=3, seed=0):
    return np.random.default_rng(seed).random((n, h, w, c), dtype=np.float32)


# ----------------------------------------------------------------------------------- rotation


def reference_rotation(images, params):
    """Per image and pixel: the documented source point, four taps, zero outside."""
    out = np.zeros(images.shape, np.float64)
    n, h, w, _ = images.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    for b in range(n):
        cos, sin = params[:, b]
        for y in range(h):
            for x in range(w):
                xs = cx + cos * (x - cx) - sin * (y - cy)
                ys = cy + sin * (x - cx) + cos * (y - cy)
                x0, y0 = math.floor(xs), math.floor(ys)
                for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                    if 0 <= yy < h and 0 <= xx < w:
                        weight = (1 - abs(ys - yy)) * (1 - abs(xs - xx))
                        out[b, y, x] += weight * images[b, yy, xx]
    return out


@pytest.mark.parametrize("name", BACKENDS)
def test_rotation_matches_the_per_image_reference(name):
    images = float_images()
    op = RandomRotation(30)
    params = op.draw(np.random.default_rng(1), len(images))
    angles = np.degrees(np.arctan2(params[1], params[0]))
    assert (np.abs(angles) <= 30).all() and np.ptp(angles) > 10
    got = run_op(name, op, images, params)
    assert got.shape == images.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_rotation(images, params), rtol=0, atol=2e-6)
    assert not np.allclose(got, images, atol=1e-2)  # it does rotate


def test_rotation_by_a_quarter_turn_is_rot90_and_zero_is_identity():
    images = float_images(n=2, h=5, w=5)
    quarter = np.array([[0.0, 0.0], [1.0, -1.0]])  # rows cos, sin of +90 and -90 degrees
    got = run_op("numpy", RandomRotation(90), images, quarter)
    np.testing.assert_allclose(got[0], np.rot90(images[0]), atol=1e-6)  # counter-clockwise
    np.testing.assert_allclose(got[1], np.rot90(images[1], -1), atol=1e-6)
    same = run_op("numpy", RandomRotation(5), images, np.array([[1.0, 1.0], [0.0, 0.0]]))
    np.testing.assert_array_equal(same, images)


# ------------------------------------------------------------------------------------ jitter


def reference_jitter(images, params, op):
    out = []
    for b in range(len(images)):
        x = images[b].astype(np.float64)
        fb, fc, fs, fh = params[:, b]

        def grey(v):
            return v @ np.array([0.299, 0.587, 0.114])[:, None] if v.shape[2] == 3 else v

        if op.brightness:
            x = np.clip(x * fb, 0, 1)
        if op.contrast:
            x = np.clip(fc * x + (1 - fc) * grey(x).mean(), 0, 1)
        if x.shape[2] == 3 and op.saturation:
            x = np.clip(fs * x + (1 - fs) * grey(x), 0, 1)
        if x.shape[2] == 3 and op.hue:
            for i in range(x.shape[0]):
                for j in range(x.shape[1]):
                    hh, ss, vv = colorsys.rgb_to_hsv(*x[i, j])
                    x[i, j] = colorsys.hsv_to_rgb((hh + fh) % 1.0, ss, vv)
        out.append(x)
    return np.stack(out)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(("c", "kwargs"), [
    (3, dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)),
    (3, dict(hue=0.5)),
    (3, dict(contrast=0.8, saturation=0.3)),
    (1, dict(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1)),
])
def test_jitter_matches_the_per_image_reference(name, c, kwargs):
    images = float_images(c=c, seed=2)
    op = ColorJitter(**kwargs)
    params = op.draw(np.random.default_rng(3), len(images))
    got = run_op(name, op, images, params)
    assert got.shape == images.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_jitter(images, params, op), rtol=0, atol=3e-6)
    assert not np.allclose(got, images, atol=1e-3)


def test_jitter_draws_only_what_is_enabled():
    params = ColorJitter(brightness=0.4, hue=0.1).draw(np.random.default_rng(0), 500)
    assert (params[1:3] == 1).all()
    assert 0.6 <= params[0].min() < 0.65 and 1.35 < params[0].max() <= 1.4
    assert -0.1 <= params[3].min() < -0.09 and 0.09 < params[3].max() <= 0.1
    with pytest.raises(ShapeError, match="1- or 3-channel"):
        ColorJitter(0.1).apply(np.zeros((1, 2, 2, 2), np.float32), params[:, :1])


# ----------------------------------------------------------------------------------- erasing


def reference_erasing(images, params):
    out = images.copy()
    for b in range(len(images)):
        top, left, h, w, erase = params[:, b]
        if erase:
            out[b, top:top + h, left:left + w, :] = 0
    return out


@pytest.mark.parametrize("name", BACKENDS)
def test_erasing_matches_the_per_image_reference(name):
    images = float_images(n=40, h=12, w=10) - 0.5  # normalised data has both signs
    op = RandomErasing(p=0.6)
    params = op.draw(np.random.default_rng(4), len(images), 12, 10)
    top, left, h, w, erase = params
    assert 0.3 < erase.mean() < 0.9 and len(set(zip(h, w))) > 5
    assert ((top + h <= 12) & (left + w <= 10) & (h < 12) & (w < 10)).all()
    got = run_op(name, op, images, params)
    np.testing.assert_array_equal(got, reference_erasing(images, params), strict=True)


def test_erasing_areas_follow_scale():
    params = RandomErasing(1.0, scale=(0.1, 0.2)).draw(np.random.default_rng(0), 2000, 50, 60)
    share = params[2] * params[3] / 3000
    assert params[4].all() and 0.08 < share.min() and share.max() < 0.23


# ------------------------------------------------------------------------------------ mixing


def reference_mix(images, labels, mix, k):
    onehot = np.eye(k)[labels]
    out, targets = [], []
    for i, j in enumerate(mix.perm):
        if mix.cutmix:
            top, bottom, left, right = mix.box
            x = images[i].copy()
            x[top:bottom, left:right] = images[j, top:bottom, left:right]
        else:
            x = mix.lam * images[i] + (1 - mix.lam) * images[j]
        out.append(x)
        targets.append(mix.lam * onehot[i] + (1 - mix.lam) * onehot[j])
    return np.stack(out), np.stack(targets)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixing_matches_the_per_image_reference(name, kind):
    images, labels = float_images(n=8, h=10, w=12), np.arange(8) % 5
    op = BatchMix(**{kind: 1.0})
    mix = op.draw(np.random.default_rng(5), 8, 10, 12)
    assert mix.cutmix == (kind == "cutmix") and 0 < mix.lam < 1
    assert sorted(mix.perm) == list(range(8)) and (mix.perm != np.arange(8)).any()
    if mix.cutmix:
        top, bottom, left, right = mix.box
        assert mix.lam == 1 - (bottom - top) * (right - left) / 120 and bottom > top
    with on(name):
        x, t = op.apply(anycnn.asarray(images), anycnn.asarray(labels), mix, 5)
        x, t = to_numpy(x), to_numpy(t)
    want_x, want_t = reference_mix(images, labels, mix, 5)
    assert t.shape == (8, 5) and t.dtype == np.float32
    np.testing.assert_allclose(x, want_x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(t, want_t, rtol=0, atol=1e-6)
    np.testing.assert_allclose(t.sum(axis=1), 1, atol=1e-6)


def test_both_mixes_alternate_and_draws_follow_alpha():
    op = BatchMix(mixup=0.2, cutmix=1.0)
    draws = [op.draw(np.random.default_rng([0, b]), 16, 8, 8) for b in range(200)]
    share = np.mean([d.cutmix for d in draws])
    assert 0.35 < share < 0.65
    lams = np.array([d.lam for d in draws if not d.cutmix])
    assert ((lams < 0.1) | (lams > 0.9)).mean() > 0.5  # Beta(0.2, 0.2) piles up at the ends


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mix_loss_is_lam_ce_a_plus_one_minus_lam_ce_b(smoothing):
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(8, 5)).astype(np.float64)
    labels = np.arange(8) % 5
    mix = BatchMix(mixup=0.4).draw(rng, 8, 4, 4)
    _, soft = BatchMix(mixup=0.4).apply(np.zeros((8, 4, 4, 1)), labels, mix, 5)
    loss = SoftmaxCrossEntropy(smoothing)
    got, grad = float(loss.forward(logits, soft)), loss.backward()
    ce_a, ce_b = SoftmaxCrossEntropy(smoothing), SoftmaxCrossEntropy(smoothing)
    want = mix.lam * float(ce_a.forward(logits, labels)) + (1 - mix.lam) * float(
        ce_b.forward(logits, labels[mix.perm]))
    want_grad = mix.lam * ce_a.backward() + (1 - mix.lam) * ce_b.backward()
    assert got == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(grad, want_grad, atol=1e-14)
    # integer labels (validation) give SoftmaxCrossEntropy's loss
    assert float(loss.forward(logits, labels)) == float(ce_a.forward(logits, labels))
    with pytest.raises(ShapeError, match="soft targets"):
        loss.forward(logits, soft[:, :4])


# ---------------------------------------------------------------------- the loader, resume


SPEC = "crop=2,flip,rotate=15,jitter=0.4,hue=0.1,erase=0.5,mixup=0.5,cutmix=1"


def reference_loader_batches(ds, spec, batch_size, seed, epoch, norm):
    """The documented pipeline, one batch at a time, through the reference functions above
    (the geometry through the Augment loader, checked against its own reference elsewhere)."""
    pipeline = parse_augment(spec, ds.image_shape)
    plain = DataLoader(ds, batch_size, shuffle=True, seed=seed, augment=pipeline.geometry)
    plain.set_epoch(epoch)
    out = []
    for b, (x, y) in enumerate(plain):
        x, y = to_numpy(x), to_numpy(y)
        n, h, w = x.shape[:3]

        def draw(step, *size, b=b, n=n):
            return step.draw(op_generator(seed, epoch, b, step.tag), n, *size)

        x = reference_rotation(x, draw(pipeline.rotate)).astype(np.float32)
        x = reference_jitter(x, draw(pipeline.jitter), pipeline.jitter).astype(np.float32)
        x = ((x - np.float32(norm.mean)) / np.float32(norm.std)).astype(np.float32)
        x = reference_erasing(x, draw(pipeline.erase, h, w))
        out.append(reference_mix(x, y, draw(pipeline.mix, h, w), ds.num_classes))
    return out


@pytest.mark.parametrize("name", BACKENDS)
def test_loader_runs_the_documented_pipeline(name):
    ds = make_dataset(n=21, h=8, w=9)
    norm = Normalize.from_images(ds.images)
    pipeline = parse_augment(SPEC, ds.image_shape)
    want = reference_loader_batches(ds, SPEC, 8, 3, 1, norm)
    for resident in (False, True):
        loader = DataLoader(ds, 8, shuffle=True, seed=3, augment=pipeline, normalize=norm,
                            device_resident=resident)
        got = run_loader(name, loader, epoch=1)
        assert len(got) == len(want) == 3
        for (x, t), (wx, wt) in zip(got, want):
            np.testing.assert_allclose(x, wx, rtol=0, atol=2e-5)
            np.testing.assert_allclose(t, wt, rtol=0, atol=1e-6)
    assert {bool(d.cutmix) for d in (pipeline.mix.draw(op_generator(3, 1, b, 4), 8, 8, 9)
                                      for b in range(3))} == {True, False}


def test_pipeline_batches_are_seeded_resumable_and_keep_the_geometry_stream():
    ds = make_dataset(n=30, h=8, w=8)
    norm = Normalize.from_images(ds.images)

    def loader(spec=SPEC, seed=5):
        return DataLoader(ds, 4, shuffle=True, seed=seed, augment=parse_augment(spec),
                          normalize=norm)

    first = run_loader("numpy", loader(), epoch=2)
    again = run_loader("numpy", loader(), epoch=2)
    for (a, s), (b, t) in zip(first, again):
        np.testing.assert_array_equal(a, b, strict=True)
        np.testing.assert_array_equal(s, t, strict=True)
    for start in (1, 5):  # mid-epoch resume: the same batches, bit for bit
        for (a, s), (b, t) in zip(run_loader("numpy", loader(), epoch=2, start=start),
                                  first[start:]):
            np.testing.assert_array_equal(a, b, strict=True)
            np.testing.assert_array_equal(s, t, strict=True)
    other = run_loader("numpy", loader(seed=6), epoch=2)
    assert not np.array_equal(other[0][0], first[0][0])
    # inside a pipeline the crop and flip are drawn exactly as on their own
    with_erase = run_loader("numpy", loader("crop=2,flip,erase=1"), epoch=2)
    alone = run_loader("numpy", DataLoader(ds, 4, shuffle=True, seed=5, augment=Augment(2, True),
                                           normalize=norm), epoch=2)
    for (a, _), (b, _) in zip(with_erase, alone):
        kept = a != 0
        assert kept.mean() < 0.99
        np.testing.assert_array_equal(a[kept], b[kept])


def test_strict_flags_and_non_default_device(monkeypatch):
    """Every step makes its arrays on the batch's device, with strict's flags on."""
    strict = pytest.importorskip("array_api_strict")
    from anycnn import backend as backend_module
    from anycnn.backend import Backend

    ds = make_dataset(n=12, h=8, w=9)
    norm = Normalize((0.5,) * 3, (0.25,) * 3)
    want = run_loader("numpy", DataLoader(ds, 4, shuffle=True, seed=1, normalize=norm,
                                          augment=parse_augment(SPEC)))
    device = strict.Device("device1")
    monkeypatch.setattr(backend_module, "_current",
                        Backend(name="array_api_strict", xp=strict, device=device, reason="test"))
    cpu = strict.Device("CPU_DEVICE")
    with strict.ArrayAPIStrictFlags(boolean_indexing=False, data_dependent_shapes=False):
        for resident in (False, True):
            loader = DataLoader(ds, 4, shuffle=True, seed=1, device_resident=resident,
                                augment=parse_augment(SPEC), normalize=norm)
            batches = list(loader)
            assert all(x.device == device and t.device == device for x, t in batches)
            for (x, t), (wx, wt) in zip(batches, want):
                np.testing.assert_allclose(np.asarray(x.to_device(cpu)), wx, atol=2e-5)
                np.testing.assert_allclose(np.asarray(t.to_device(cpu)), wt, atol=1e-6)


def test_mixing_loader_refuses_shards():
    loader = DataLoader(make_dataset(), 4, augment=parse_augment("mixup"))
    with pytest.raises(ConfigError, match="cannot be sharded"):
        loader.set_shard(0, 2)
    DataLoader(make_dataset(), 4, augment=parse_augment("rotate=5")).set_shard(0, 2)


def test_trainer_with_mixing_resumes_bit_identically(tmp_path):
    from anycnn.data.datasets import load_dataset

    sample = load_dataset("mnist-sample")
    train, val_set = sample.train.subset(np.arange(128)), sample.val.subset(np.arange(64))
    spec = "crop=2,rotate=10,jitter=0.3,erase=0.5,mixup=0.4,cutmix=1"

    def new_run(seed, path=None):
        anycnn.manual_seed(seed)
        model = tiny_model()
        trainer = Trainer(model, optim.Adam(model.parameters(), lr=3e-3), SoftmaxCrossEntropy(0.1),
                          checkpoint_path=path, progress=False)
        return trainer, DataLoader(train, 32, shuffle=True, seed=5,
                                   augment=parse_augment(spec, train.image_shape))

    with anycnn.use_backend("numpy") as backend:
        val = DataLoader(val_set, 64)
        straight, loader = new_run(1)
        straight.fit(loader, val, epochs=3)
        first, loader = new_run(1)
        stopper = StopAfter(loader, 1, 2)
        stopper.trainer = first
        first.fit(stopper, val, epochs=3)
        path = first.save(tmp_path / "stopped.safetensors")
        resumed, loader = new_run(42)
        resumed.resume(path)
        resumed.fit(loader, val, epochs=3)
        assert_same_run(backend, resumed, straight)
        plain, _ = new_run(1)
        plain.fit(DataLoader(train, 32, shuffle=True, seed=5), val, epochs=1)
        assert plain.history[0]["train_loss"] != straight.history[0]["train_loss"]
        end = resumed.save(tmp_path / "end.safetensors")
        saved = C.load_checkpoint(end).extra["config"]["preprocess"]
        assert saved["augment"]["kind"] == "pipeline"
        assert read_preprocess(saved)[0] == loader.augment


# ---------------------------------------------------------------------- syntax and records


@pytest.mark.parametrize(("spec", "expected"), [
    ("crop=4,flip", Augment(4, True)),
    ("flip", Augment(0, True)),
    ("none", None),
    ("rrc,flip,jitter=0.4,mixup=0.2", AugmentPipeline(
        parse_augment("rrc=32,flip"), jitter=ColorJitter(0.4, 0.4, 0.4),
        mix=BatchMix(mixup=0.2))),
    ("rotate=10,brightness=0.2,hue=0.05,erase,cutmix", AugmentPipeline(
        rotate=RandomRotation(10), jitter=ColorJitter(brightness=0.2, hue=0.05),
        erase=RandomErasing(0.5), mix=BatchMix(cutmix=1.0))),
    ("crop,pad=edge,jitter", AugmentPipeline(Augment(4, False, "edge"),
                                             jitter=ColorJitter(0.4, 0.4, 0.4))),
])
def test_parse_spec_and_record_round_trip(spec, expected):
    got = parse_augment(spec, (32, 32, 3))
    assert got == expected
    if got is not None:
        assert parse_augment(got.spec(), (32, 32, 3)) == got
        assert _read_augment(got.to_record()) == got


@pytest.mark.parametrize(("spec", "fragment"), [
    ("rotate", "bad item 'rotate'"),
    ("rotate=x", "rotate= needs a number"),
    ("rotate=0", "rotate=0 is out of range: rotate must be in (0, 180]"),
    ("jitter=0.4,contrast=0.2", "give it or them, not both"),
    ("hue=0.7", "hue=0.7 is out of range: hue must be in [0, 0.5]"),
    ("erase=1.5", "erase=1.5 is out of range: erase must be in (0, 1]"),
    ("mixup=-1", "mixup=-1 is out of range: mixup must be >= 0"),
    # issue 26 (new-user trial): jitter=2 was accepted (factors in [max(0, -1), 3])
    ("jitter=2", "jitter=2 is out of range: jitter must be in [0, 1] (brightness, contrast and "
                 "saturation factors lie in [1 - V, 1 + V])"),
    ("brightness=1.01", "brightness=1.01 is out of range: brightness must be in [0, 1]"),
    ("saturation=-0.1", "saturation=-0.1 is out of range"),
    ("mixup=nan", "mixup= needs a number"),
    ("crop=9,jitter", "crop=9 is too large"),
    ("rrc,crop,mixup", "rrc (random-resized crop) and crop do not go together"),
])
def test_bad_specs(spec, fragment):
    with pytest.raises(ConfigError) as info:
        parse_augment(spec, (12, 12, 3))
    assert fragment in str(info.value)


@pytest.mark.parametrize("kwargs", [dict(brightness=2), dict(contrast=1.5),
                                    dict(saturation=-0.2), dict(hue=0.6)])
def test_jitter_strengths_out_of_range_are_refused(kwargs):
    (name, value), = kwargs.items()
    high = 0.5 if name == "hue" else 1
    with pytest.raises(ConfigError, match=rf"ColorJitter: {name} must be a number in \[0, "
                                          rf"{high:g}\], got {value}"):
        ColorJitter(**kwargs)
    assert ColorJitter(**{name: high}).draw(np.random.default_rng(0), 1000)[:3].min() >= 0


def test_cli_refuses_an_augment_value_out_of_range_in_one_line(isolated_env, tiny_data,  # noqa: F811
                                                                capsys):
    rc, _, err = run_main(train_argv(tiny_data, isolated_env / "run", "--augment",
                                     "crop,jitter=2"), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--augment jitter=2 is out of range: jitter must be in [0, 1]" in err
    assert not (isolated_env / "run").exists()  # refused before any data or folder


@pytest.mark.parametrize("spec", ["crop=2,cutmix=1", "crop=2"])
def test_cli_says_how_train_accuracy_counts_mixed_images(isolated_env, tiny_data,  # noqa: F811
                                                         capsys, spec):
    from anycnn.cli.train import MIXED_ACCURACY

    argv = [a for a in train_argv(tiny_data, isolated_env / "run", "--augment", spec,
                                  "--limit", "32") if a != "--quiet"]
    rc, out, err = run_main(argv, capsys)
    assert rc == 0, err
    assert (MIXED_ACCURACY in out.splitlines()) == ("cutmix" in spec)
    assert "larger share" in MIXED_ACCURACY and "unmixed" in MIXED_ACCURACY


def test_cli_trains_with_mixing_and_resumes(isolated_env, tiny_data, capsys):  # noqa: F811
    out = isolated_env / "run"
    spec = "crop=2,rotate=10,jitter=0.3,erase=0.25,mixup=0.2"
    rc, _, err = run_main(train_argv(tiny_data, out, "--augment", spec), capsys)
    assert rc == 0, err
    config = C.load_checkpoint(out / "checkpoint.safetensors").extra["config"]
    assert config["augment"] == spec
    assert config["preprocess"]["augment"]["mix"] == {"mixup": 0.2, "cutmix": 0.0}
    rc, _, err = run_main(train_argv(tiny_data, out, "--epochs", "2", "--resume"), capsys)
    assert rc == 0, err
    resumed = C.load_checkpoint(out / "checkpoint.safetensors").extra["config"]
    assert resumed["preprocess"] == config["preprocess"]
