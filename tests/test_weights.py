"""Weight files in PyTorch's names and layouts (torchvision, timm), and torchvision's published
ImageNet weights: ``anycnn.load_weights(model, PATH | "imagenet")``,
``anycnn.io.from_torch_state_dict`` and ``anycnn.io.read_state_dict``.

The reference is a torch model with the anycnn model's tensor names (a hand-written mirror of a
forward-only model, or ``torch_module`` of a ``Sequential``) whose own random weights and
BatchNorm statistics are written with ``torch.save`` / ``safetensors.torch``: after loading, the
anycnn model's eval-mode logits equal torch's. Downloads go to a real HTTP server on 127.0.0.1
(``tests.test_datasets.file_server``); no test touches the network.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn.data import sources
from anycnn.errors import CheckpointError, ConfigError, DataError
from anycnn.io import from_torch_state_dict, pretrained, read_state_dict, to_torch_state_dict
from anycnn.io.checkpoint import load_checkpoint
from anycnn.io.interop import torch_module
from anycnn.models.presets import CifarResNetCode
from tests import test_datasets, test_reliability

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")
from torch import nn  # noqa: E402

file_server = test_datasets.file_server
run_main, assert_one_line_error = test_reliability.run_main, test_reliability.assert_one_line_error
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ torch mirrors


class TorchBlock(nn.Module):
    """torch twin of anycnn.models.presets.BasicBlock (same names, NCHW)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    """torch twin of CifarResNetCode(blocks, classes): torchvision's ResNet names."""

    def __init__(self, classes, blocks=1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        cin = 16
        for stage, width in enumerate((16, 32, 64), 1):
            layers = [TorchBlock(cin if b == 0 else width, width, 2 if stage > 1 and b == 0
                                 else 1) for b in range(blocks)]
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def trained_stats(module, seed=0):
    """Random BatchNorm statistics (non-trivial running mean/var, counters), eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.num_batches_tracked.fill_(7)
    return module.eval()


@pytest.fixture
def reference():
    """(torch model in float64 with its own weights, images NHWC float64)."""
    torch.manual_seed(0)
    ref = trained_stats(TorchResNet(5).double())
    images = np.random.default_rng(1).standard_normal((2, 16, 16, 3))
    return ref, images


def torch_logits(ref, images):
    with torch.no_grad():
        return ref(torch.from_numpy(np.transpose(images, (0, 3, 1, 2)))).numpy()


def anycnn_logits(model, images):
    model.eval()
    return anycnn.to_numpy(model.forward(anycnn.asarray(images, dtype="float64")))


def fresh(dtype="float64"):
    anycnn.manual_seed(3)
    return CifarResNetCode(1, num_classes=5).to(dtype)


# ------------------------------------------------------------------------------ file formats


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_file_round_trip_matches_torch(backend, reference, tmp_path, fmt):
    ref, images = reference
    path = tmp_path / f"weights.{fmt}"
    if fmt == "pth":
        torch.save(ref.state_dict(), path)
    else:
        st.save_file(ref.state_dict(), path)
    model = fresh()
    before = anycnn_logits(model, images)
    assert anycnn.load_weights(model, path) is model
    np.testing.assert_allclose(anycnn_logits(model, images), torch_logits(ref, images),
                               rtol=1e-10, atol=1e-12)
    assert not np.allclose(before, torch_logits(ref, images))  # the load changed something
    # and back: anycnn's export equals the file, name for name (num_batches_tracked aside)
    exported = to_torch_state_dict(model)
    for name, value in ref.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(exported[name], value.numpy(), err_msg=name)


def test_sequential_through_torch_module(backend, tmp_path):
    """A Sequential's torch twin from torch_module, re-initialised by torch, saved, loaded."""
    anycnn.manual_seed(0)
    model = anycnn.Sequential(L.Conv2D(3, 4, 3, padding=1), L.BatchNorm2D(4), L.ReLU(),
                              L.MaxPool2D(2), L.Flatten(), L.Dense(4 * 4 * 4, 3)).to("float64")
    twin = trained_stats(torch_module(model, (8, 8, 3), copy_weights=False))
    path = tmp_path / "seq.safetensors"
    st.save_file(twin.state_dict(), path)
    anycnn.load_weights(model, path)
    images = np.random.default_rng(2).standard_normal((3, 8, 8, 3))
    np.testing.assert_allclose(anycnn_logits(model, images), torch_logits(twin, images),
                               rtol=1e-10, atol=1e-12)


def test_dtypes_and_tensors_that_require_grad(backend, reference):
    """float64 values into a float32 model (cast to the model's dtype), torch Parameters that
    require grad, bfloat16 (widened exactly), NumPy values: all load."""
    ref, images = reference
    state = dict(ref.named_parameters())  # Parameters, requires_grad=True
    state.update(ref.named_buffers())
    model = fresh("float32")
    from_torch_state_dict(model, state)
    assert anycnn.to_numpy(model.conv1.weight.data).dtype == np.float32
    np.testing.assert_allclose(anycnn_logits(model.to("float64"), images),
                               torch_logits(ref, images), rtol=1e-5, atol=1e-6)
    half = {k: (v.detach().bfloat16() if v.is_floating_point() else v) for k, v in state.items()}
    from_torch_state_dict(model, half)
    np.testing.assert_array_equal(anycnn.to_numpy(model.fc.weight.data).T,
                                  half["fc.weight"].float().numpy())
    from_torch_state_dict(model, {k: v.detach().numpy() for k, v in state.items()})
    np.testing.assert_array_equal(anycnn.to_numpy(model.fc.bias.data),
                                  state["fc.bias"].detach().numpy())


def test_bfloat16_safetensors_without_torch_arrays(backend, reference, tmp_path):
    ref, _ = reference
    sd = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in ref.state_dict().items()}
    st.save_file(sd, tmp_path / "bf16.safetensors")
    loaded = read_state_dict(tmp_path / "bf16.safetensors")
    assert loaded["conv1.weight"].dtype == np.float32
    np.testing.assert_array_equal(loaded["conv1.weight"], sd["conv1.weight"].float().numpy())
    np.testing.assert_array_equal(loaded["bn1.num_batches_tracked"], 7)


def test_wrapped_checkpoints(backend, reference, tmp_path):
    """timm/Lightning {"state_dict": ...}, torchvision's reference scripts {"model": ...}
    with DataParallel's "module." prefix; other entries beside them are ignored."""
    ref, images = reference
    sd = ref.state_dict()
    torch.save({"state_dict": sd, "epoch": 3, "arch": "resnet"}, tmp_path / "timm.pth")
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 9},
               tmp_path / "ref.pth")
    st.save_file({"_orig_mod." + k: v for k, v in sd.items()}, tmp_path / "compiled.safetensors")
    for name in ("timm.pth", "ref.pth", "compiled.safetensors"):
        model = anycnn.load_weights(fresh(), tmp_path / name)
        np.testing.assert_allclose(anycnn_logits(model, images), torch_logits(ref, images),
                                   rtol=1e-10, atol=1e-12, err_msg=name)


def test_anycnn_files_still_load(backend, tmp_path):
    """anycnn.save's own files keep loading (anycnn names and layouts), strict or not."""
    model = fresh()
    anycnn.save(model, tmp_path / "own.safetensors")
    other = anycnn.load_weights(fresh("float64"), tmp_path / "own.safetensors")
    np.testing.assert_array_equal(anycnn.to_numpy(other.fc.weight.data),
                                  anycnn.to_numpy(model.fc.weight.data))
    bigger = CifarResNetCode(1, num_classes=7).to("float64")
    bigger.fc = L.Dense(64, 5).to("float64")  # same shapes as the file
    bigger.extra = L.Dense(2, 2)
    anycnn.load_weights(bigger, tmp_path / "own.safetensors", strict=False)
    np.testing.assert_array_equal(anycnn.to_numpy(bigger.fc.bias.data),
                                  anycnn.to_numpy(model.fc.bias.data))
    with pytest.raises(CheckpointError, match=r"extra\.weight"):
        anycnn.load_weights(bigger, tmp_path / "own.safetensors")


# ----------------------------------------------------------------------- strict and mistakes


def test_strict_false_returns_missing_and_unexpected(backend, reference):
    ref, _ = reference
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    state["head.weight"] = torch.zeros(2, 2)
    model = fresh()
    head = anycnn.to_numpy(model.fc.weight.data).copy()
    with pytest.raises(CheckpointError) as err:
        from_torch_state_dict(model, state)
    message = str(err.value)
    assert "missing 2 of the model's tensors ('fc.weight', 'fc.bias')" in message
    assert "unexpected 1 tensor(s) the model lacks ('head.weight')" in message
    assert "strict=False" in message
    assert np.array_equal(anycnn.to_numpy(model.conv1.weight.data),
                          anycnn.to_numpy(fresh().conv1.weight.data))  # unchanged
    result = from_torch_state_dict(model, state, strict=False)
    assert result == (["fc.weight", "fc.bias"], ["head.weight"])
    assert result.missing == ["fc.weight", "fc.bias"]
    np.testing.assert_array_equal(anycnn.to_numpy(model.fc.weight.data), head)  # kept
    np.testing.assert_array_equal(np.transpose(anycnn.to_numpy(model.conv1.weight.data),
                                               (3, 2, 0, 1)), state["conv1.weight"].numpy())
    assert from_torch_state_dict(model, ref.state_dict()) == ([], [])


def test_shape_mismatch_names_the_tensor_and_changes_nothing(backend, reference, tmp_path):
    ref, _ = reference
    state = dict(ref.state_dict())
    state["layer2.0.conv2.weight"] = torch.zeros(32, 16, 3, 3, dtype=torch.float64)
    model = fresh()
    before = {k: anycnn.to_numpy(v).copy() for k, v in model.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(CheckpointError, match=r"'layer2\.0\.conv2\.weight' has shape "
                           r"\(32, 16, 3, 3\).*needs \(32, 32, 3, 3\)"):
            from_torch_state_dict(model, state, strict=strict)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"layer2\.0\.conv2\.weight"):
        anycnn.load_weights(model, tmp_path / "bad.pth")
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(anycnn.to_numpy(value), before[name], err_msg=name)
    with pytest.raises(CheckpointError, match=r"'fc\.bias' is a str"):
        from_torch_state_dict(model, {**ref.state_dict(), "fc.bias": "zeros"})


def test_another_class_count_says_how_to_fine_tune(backend, tmp_path):
    from anycnn.models import build_model

    file = tmp_path / "mnv3s.safetensors"
    st.save_file({k: torch.from_numpy(v) for k, v in
                  to_torch_state_dict(build_model("mobilenet_v3_small", num_classes=1000)).items()},
                 file)
    model = build_model("mobilenet_v3_small", num_classes=3)
    for strict in (True, False):
        with pytest.raises(CheckpointError, match=r"'classifier\.3\.weight' has shape "
                           r"\(1000, 1024\).*needs \(3, 1024\).*classifier has 1000 classes: "
                           r"build the model with num_classes=1000, load the file, then call "
                           r"model\.reset_classifier\(3\)$"):
            anycnn.load_weights(model, file, strict=strict)
    with pytest.raises(CheckpointError) as info:  # not a classifier: no such advice
        from_torch_state_dict(model, {**read_state_dict(file),
                                      "classifier.3.weight": np.zeros((3, 8), np.float32)})
    assert "reset_classifier" not in str(info.value)


def bad_files(tmp_path, reference) -> dict[str, tuple[Path, str]]:
    ref, _ = reference
    good_pth, good_st = tmp_path / "good.pth", tmp_path / "good.safetensors"
    torch.save(ref.state_dict(), good_pth)
    st.save_file(ref.state_dict(), good_st)
    files = {
        "missing": (tmp_path / "nope.pth", "not found"),
        "folder": (tmp_path, "is a directory"),
        "empty": (tmp_path / "empty.pth", "is empty"),
        "png": (tmp_path / "cat.png", "is a PNG image, not a weight file"),
        "text": (tmp_path / "notes.safetensors", "is a text file"),
        "cut pth": (tmp_path / "cut.pth", "not a readable PyTorch file, truncated or corrupt"),
        "cut safetensors": (tmp_path / "cut.safetensors", "truncated or corrupt"),
        "objects": (tmp_path / "objects.pth", "holds Python objects besides tensors"),
        "no tensors": (tmp_path / "meta.pth", "holds no tensors: its top-level keys are 'epoch'"),
        "noise": (tmp_path / "noise.bin", "not a weight file anycnn knows"),
    }
    files["empty"][0].write_bytes(b"")
    files["png"][0].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    files["text"][0].write_text("these are not weights\n")
    data = good_pth.read_bytes()
    files["cut pth"][0].write_bytes(data[:len(data) // 2])
    data = good_st.read_bytes()
    files["cut safetensors"][0].write_bytes(data[:len(data) // 2])
    torch.save({"model": ref.state_dict(), "args": Path("x")}, files["objects"][0])
    torch.save({"epoch": 3, "lr": 0.1}, files["no tensors"][0])
    files["noise"][0].write_bytes(bytes(range(7, 200)))
    return files


def test_bad_files_are_one_clear_error(backend, reference, tmp_path):
    for kind, (path, fragment) in bad_files(tmp_path, reference).items():
        with pytest.raises(CheckpointError) as err:
            anycnn.load_weights(fresh(), path)
        message = str(err.value)
        assert fragment in message and str(path) in message, (kind, message)
        assert "\n" not in message, (kind, message)


# ---------------------------------------------------------------------------- without torch


@pytest.fixture
def no_torch(monkeypatch):
    """``import torch`` fails from here on (as on a machine without PyTorch)."""
    monkeypatch.setitem(sys.modules, "torch", None)


def test_safetensors_needs_no_torch_and_pth_says_so(backend, reference, tmp_path, request):
    ref, images = reference
    st.save_file(ref.state_dict(), tmp_path / "w.safetensors")
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    expected = torch_logits(ref, images)
    request.getfixturevalue("no_torch")
    with pytest.raises(ImportError):
        import torch as _  # noqa: F401 - the fixture works
    model = anycnn.load_weights(fresh(), tmp_path / "w.safetensors")
    np.testing.assert_allclose(anycnn_logits(model, images), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(CheckpointError) as err:
        anycnn.load_weights(fresh(), tmp_path / "w.pth")
    message = str(err.value)
    assert "\n" not in message and "needs PyTorch (pip install torch)" in message
    assert ".safetensors weight files load without it" in message and "w.pth" in message


# ------------------------------------------------------------------------ published weights


@pytest.fixture
def weights_env(tmp_path, monkeypatch, file_server, reference):
    """Pinned table replaced by one small "resnet20-code" entry whose file (the reference's
    weights, 1000 classes) is served on 127.0.0.1; isolated caches; no URL from the env."""
    root, url = file_server
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(pretrained.URL_ENV, raising=False)
    monkeypatch.setattr(sources, "DOWNLOAD_TIMEOUT", 5.0)
    torch.manual_seed(1)
    ref = trained_stats(TorchResNet(1000, blocks=3).double())  # resnet20-code
    data_path = tmp_path / "made.pth"
    torch.save(ref.state_dict(), data_path)
    data = data_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    name = f"tiny-{digest[:8]}.pth"
    (root / name).write_bytes(data)

    def pin(sha256=digest[:8], filename=name):
        entry = pretrained.PretrainedWeights(
            "resnet20-code", "IMAGENET1K_V1", f"https://download.invalid/models/{filename}",
            sha256, resize=36, crop=32, top1=50.0)
        monkeypatch.setitem(pretrained.PRETRAINED, "resnet20-code", {"IMAGENET1K_V1": entry})
        monkeypatch.setitem(pretrained.DEFAULT, "resnet20-code", "IMAGENET1K_V1")
        return entry

    return {"root": root, "url": url, "ref": ref, "data": data, "digest": digest,
            "name": name, "pin": pin, "cache": tmp_path / "cache" / "anycnn" / "weights"}


def build(num_classes=1000):
    anycnn.manual_seed(5)
    return anycnn.models.build_model("resnet20-code", num_classes=num_classes).to("float64")


def test_imagenet_download_verify_cache(backend, weights_env, monkeypatch):
    env = weights_env
    env["pin"]()
    images = np.random.default_rng(4).standard_normal((2, 32, 32, 3))
    model = anycnn.load_weights(build(), "imagenet", base_url=env["url"], progress=False)
    np.testing.assert_allclose(anycnn_logits(model, images), torch_logits(env["ref"], images),
                               rtol=1e-10, atol=1e-12)
    cached = env["cache"] / env["name"]
    assert cached.read_bytes() == env["data"]
    assert sorted(p.name for p in env["cache"].iterdir()) == [env["name"]]  # no temp files
    # the record: class names, preprocessing facts, where the file came from
    assert model.class_names == list(pretrained.imagenet_classes())
    assert model.pretrained["weights"] == "imagenet" and model.pretrained["name"] == (
        "resnet20-code") and model.pretrained["tag"] == "IMAGENET1K_V1"
    assert model.pretrained["preprocess"] == {
        "resize": 36, "crop": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear"}
    # a second load uses the cached file: nothing is served any more, the env URL is dead
    (env["root"] / env["name"]).unlink()
    monkeypatch.setenv(pretrained.URL_ENV, env["url"])
    again = anycnn.load_weights(build(), "IMAGENET", progress=False)
    np.testing.assert_array_equal(anycnn.to_numpy(again.fc.weight.data),
                                  anycnn.to_numpy(model.fc.weight.data))


def test_imagenet_from_env_url_and_full_hash(backend, weights_env, monkeypatch):
    env = weights_env
    env["pin"](sha256=env["digest"])
    monkeypatch.setenv(pretrained.URL_ENV, env["url"].rstrip("/"))
    model = anycnn.load_weights(build(), "imagenet1k_v1", progress=False)
    assert model.pretrained["sha256"] == env["digest"]
    assert (env["cache"] / env["name"]).is_file()


def test_wrong_hash_is_refused_and_not_kept(backend, weights_env):
    env = weights_env
    wrong = "0" * 8 if not env["digest"].startswith("0" * 8) else "f" * 8
    bad_name = f"tiny-{wrong}.pth"
    (env["root"] / bad_name).write_bytes(env["data"])
    env["pin"](sha256=wrong, filename=bad_name)
    model = build()
    before = anycnn.to_numpy(model.fc.weight.data).copy()
    with pytest.raises(DataError, match=f"SHA-256 mismatch: expected a digest starting {wrong}"):
        anycnn.load_weights(model, "imagenet", base_url=env["url"], progress=False)
    assert not env["cache"].exists() or not list(env["cache"].iterdir())
    np.testing.assert_array_equal(anycnn.to_numpy(model.fc.weight.data), before)
    assert not hasattr(model, "class_names")


def test_bad_cached_file_is_replaced(backend, weights_env):
    env = weights_env
    env["pin"]()
    env["cache"].mkdir(parents=True)
    (env["cache"] / env["name"]).write_bytes(b"a truncated earlier download")
    anycnn.load_weights(build(), "imagenet", base_url=env["url"], progress=False)
    assert (env["cache"] / env["name"]).read_bytes() == env["data"]


def test_torch_hub_cache_is_reused(backend, weights_env, tmp_path):
    env = weights_env
    env["pin"]()
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / env["name"]).write_bytes(env["data"])
    (env["root"] / env["name"]).unlink()  # not served: must come from torch's cache
    anycnn.load_weights(build(), "imagenet", base_url=env["url"], progress=False)
    assert not env["cache"].exists()


def test_imagenet_into_another_head_says_what_to_do(backend, weights_env):
    weights_env["pin"]()
    with pytest.raises(CheckpointError, match=r"'fc\.weight' has shape \(1000, 64\).*needs "
                       r"\(10, 64\).*build it with num_classes=1000, load, then replace"):
        anycnn.load_weights(build(10), "imagenet", base_url=weights_env["url"], progress=False)


def test_download_failure_says_where_to_put_the_file(backend, weights_env):
    env = weights_env
    env["pin"]()
    (env["root"] / env["name"]).unlink()
    with pytest.raises(DataError) as err:
        anycnn.load_weights(build(), "imagenet", base_url=env["url"], progress=False)
    message = str(err.value)
    assert f"{env['url']}{env['name']}" in message and "404" in message
    assert "anycnn.load_weights(model, PATH)" in message and str(env["cache"]) in message


def test_imagenet_needs_torch_before_downloading(backend, weights_env, no_torch):
    env = weights_env
    env["pin"]()
    with pytest.raises(CheckpointError, match="needs PyTorch") as err:
        anycnn.load_weights(build(), "imagenet", base_url=env["url"], progress=False)
    assert "\n" not in str(err.value)
    assert not env["cache"].exists()  # nothing was downloaded


def test_imagenet_names_and_mistakes(backend):
    with pytest.raises(ConfigError, match="no published ImageNet weights for model 'lenet5'; "
                       "models with them: resnet18, resnet34, resnet50"):
        anycnn.load_weights(anycnn.models.build_model("lenet5"), "imagenet")
    with pytest.raises(ConfigError, match="pass arch="):
        anycnn.load_weights(fresh(), "imagenet")
    with pytest.raises(ConfigError, match="'resnet18' has no 'imagenet1k_v2' weights; it has "
                       "imagenet1k_v1"):
        pretrained.lookup("resnet18", "imagenet1k_v2")
    with pytest.raises(ConfigError, match="hex digits"):
        sources.check_pin("f3707")
    assert sources.sha256_matches("F37072FD" + "0" * 56, "f37072fd")
    assert not sources.sha256_matches("f37072fe" + "0" * 56, "f37072fd")


def test_pinned_table_is_torchvisions():
    """Every pin carries the prefix in its URL's file name, points at download.pytorch.org,
    and 'imagenet' is torchvision's DEFAULT (V2 where torchvision publishes one)."""
    assert set(pretrained.PRETRAINED) == {
        "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small",
        "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"}
    for arch, files in pretrained.PRETRAINED.items():
        for tag, entry in files.items():
            assert entry.arch == arch and entry.tag == tag
            assert entry.url.startswith("https://download.pytorch.org/models/")
            prefix = entry.filename.rsplit("-", 1)[1].removesuffix(".pth")
            assert len(prefix) == 8 and entry.sha256.startswith(prefix)
            sources.check_pin(entry.sha256)
    v2 = {a for a, files in pretrained.PRETRAINED.items() if "IMAGENET1K_V2" in files}
    assert v2 == {"resnet50", "mobilenet_v2", "mobilenet_v3_large"}
    assert {a for a, t in pretrained.DEFAULT.items() if t == "IMAGENET1K_V2"} == v2
    assert pretrained.lookup("efficientnet_b0").preprocess()["interpolation"] == "bicubic"
    assert pretrained.lookup("convnext_tiny").resize == 236
    assert pretrained.lookup("resnet50").resize == 232


def test_class_names_ship_with_the_package():
    names = pretrained.imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[-1] == "toilet tissue"
    text = (ROOT / "pyproject.toml").read_text()
    assert '"io/*.txt"' in text  # package-data includes anycnn/io/imagenet_classes.txt
    spec = importlib.util.find_spec("torchvision")
    if spec is not None and spec.submodule_search_locations:  # torchvision's own list
        meta = Path(spec.submodule_search_locations[0]) / "models" / "_meta.py"
        tree = ast.parse(meta.read_text())
        value = next(node.value for node in tree.body if isinstance(node, ast.Assign) and
                     getattr(node.targets[0], "id", "") == "_IMAGENET_CATEGORIES")
        assert tuple(ast.literal_eval(value)) == names


def test_class_names_round_trip_and_predict(backend, weights_env, tmp_path, capsys):
    """save() keeps the record; load_weights puts it back; load_model + predict print names."""
    env = weights_env
    env["pin"]()
    model = anycnn.load_weights(build(), "imagenet", base_url=env["url"], progress=False)
    path = anycnn.save(model, tmp_path / "pretrained.safetensors")
    extra = load_checkpoint(path).extra
    assert extra["pretrained"]["classes"] == list(pretrained.imagenet_classes())
    assert extra["preprocess"]["class_names"] == list(pretrained.imagenet_classes())
    assert extra["preprocess"]["normalize"] == {"mean": [0.485, 0.456, 0.406],
                                                "std": [0.229, 0.224, 0.225]}
    assert extra["preprocess"]["image_size"] == [32, 32]
    back = anycnn.load_weights(build(), path)
    assert back.class_names == model.class_names and back.pretrained == model.pretrained
    # a replaced head: the names no longer fit, so no predict record (the facts stay)
    other = build(num_classes=3)
    other.pretrained = model.pretrained
    assert "preprocess" not in load_checkpoint(anycnn.save(other, tmp_path / "h.safetensors")
                                               ).extra
    image = pytest.importorskip("PIL.Image")
    png = tmp_path / "img.png"
    image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)).save(png)
    code, out, err = run_main(["predict", path, png, "--top-k", "2"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == str(png) and len(lines) == 3
    names = set(pretrained.imagenet_classes())
    assert all(line.split("  ")[2].strip() in names for line in lines[1:]), out
    code, _, err = run_main(["predict", tmp_path / "cat.pth", png], capsys)
    assert_one_line_error(code, err)


def test_importing_does_not_load_torch():
    code = ("import sys, anycnn.io.weights, anycnn.io.pretrained; "
            "anycnn.io.pretrained.imagenet_classes(); print('torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYCNN_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
