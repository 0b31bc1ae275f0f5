"""ImageNet-style preprocessing in ``anycnn train``: ``--preprocess``, ``--normalize imagenet``
and the image-folder geometry they imply.

``--preprocess SPEC`` (image folders only) is ``imagenet`` (shorter side 256, centre crop 224,
ImageNet mean/std: torchvision's evaluation transform for its weights) or
``resize=R,crop=S`` (``imagenet,crop=S`` etc. override one of them). Then:

* validation and test images are decoded resized to shorter side ``R`` and centre-cropped to
  ``S x S`` (:class:`~anycnn.data.eval_transform.EvalTransform`), and so are the training
  images, unless the augmentation is a random-resized crop (``--augment rrc,flip``), which
  samples from ``R x R`` training images (shorter side ``R``, centre ``R x R``) and resamples
  its boxes to ``S x S`` on the device;
* ``--normalize`` defaults to ``imagenet`` with ``imagenet`` (else as without
  ``--preprocess``);
* the checkpoint records the transform (``config["preprocess"]["eval"]``), which ``anycnn
  evaluate`` and ``anycnn predict`` apply.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

#: ``--preprocess imagenet``: (resize, crop)
IMAGENET_GEOMETRY = (256, 224)

NORMALIZE_CHOICES = ("auto", "none", "imagenet")


def parse_preprocess(text: str | None) -> tuple[int, int, bool] | None:
    """``--preprocess`` as ``(resize, crop, imagenet)`` (``imagenet``: the spec named it, so
    ImageNet's mean/std are the default normalisation), or None for ``none``/unset.

    Raises:
        ConfigError: an unknown or repeated item, a size that is not a positive integer, a
            crop larger than the resize, or a size missing without ``imagenet``.
    """
    if text is None or text.strip().lower() == "none":
        return None
    items: dict[str, str] = {}
    for item in (part.strip() for part in text.strip().lower().split(",")):
        key, eq, value = item.partition("=")
        if key in items or key not in ("imagenet", "resize", "crop") or (
                (key == "imagenet") == bool(eq)):
            raise ConfigError(f"--preprocess: bad item {item!r} in {text!r}; expected none, "
                              "imagenet, or resize=R,crop=S (imagenet,crop=S overrides one)")
        items[key] = value
    resize, crop = IMAGENET_GEOMETRY if "imagenet" in items else (None, None)
    try:
        resize = int(items["resize"]) if "resize" in items else resize
        crop = int(items["crop"]) if "crop" in items else crop
    except ValueError:
        raise ConfigError(f"--preprocess: resize= and crop= take integers (pixels), got "
                          f"{text!r}") from None
    if resize is None or crop is None:
        raise ConfigError(f"--preprocess {text}: give both resize=R and crop=S (or imagenet)")
    if not 1 <= crop <= resize:
        raise ConfigError(f"--preprocess {text}: need 1 <= crop <= resize, got resize={resize}, "
                          f"crop={crop}")
    return resize, crop, "imagenet" in items


def canonical_preprocess(text: str) -> str | None:
    """``--preprocess`` text in one spelling per meaning (what checkpoints record and
    ``--resume`` compares): ``imagenet`` (plus the sizes that differ from it) or
    ``resize=R,crop=S``; None for ``none``. An argparse ``type``: bad text is an
    :class:`argparse.ArgumentTypeError` with :func:`parse_preprocess`'s message."""
    import argparse

    try:
        parsed = parse_preprocess(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if parsed is None:
        return None
    resize, crop, imagenet = parsed
    if not imagenet:
        return f"resize={resize},crop={crop}"
    changed = [f"{k}={v}" for k, v, d in zip(("resize", "crop"), (resize, crop),
                                              IMAGENET_GEOMETRY) if v != d]
    return ",".join(["imagenet", *changed])


def add_preprocess_option(parser: Any) -> None:
    """``--preprocess SPEC`` of ``anycnn train`` (dest ``preprocess_spec``)."""
    parser.add_argument("--preprocess", dest="preprocess_spec", default=None, metavar="SPEC",
                        type=canonical_preprocess,
                        help="image folders: ImageNet-style geometry: imagenet (resize the "
                        "shorter side to 256, centre crop 224, ImageNet mean/std) or "
                        "resize=R,crop=S; validation images are resized and cropped so, "
                        "training images too, or to RxR for --augment rrc; recorded for "
                        "evaluate and predict (default: none, images stretched to "
                        "--image-size)")


def check_preprocess_options(args: Any) -> None:
    """``--preprocess``'s conflicts, before any data is loaded; with ``imagenet``,
    ``--normalize`` defaults to ``imagenet``."""
    parsed = parse_preprocess(getattr(args, "preprocess_spec", None))
    if parsed is None:
        return
    if getattr(args, "image_size", None) is not None:
        raise ConfigError("--image-size and --preprocess both set the image size: --preprocess "
                          "resize=R,crop=S makes S x S images; drop --image-size")
    if parsed[2] and args.normalize is None:
        args.normalize = "imagenet"


def folder_geometry(args: Any) -> dict[str, Any]:
    """The :func:`~anycnn.data.imagefolder.load_image_folder` keywords of ``--preprocess``
    (``{}`` without it): ``resize_shorter``, ``image_size`` (the crop) and ``train_size``
    (``R`` with a random-resized-crop ``--augment``, else the crop)."""
    parsed = parse_preprocess(getattr(args, "preprocess_spec", None))
    if parsed is None:
        return {}
    resize, crop, _ = parsed
    spec = (getattr(args, "augment", None) or "").lower()
    rrc = any(item.strip().partition("=")[0] == "rrc" for item in spec.split(","))
    return {"resize_shorter": resize, "image_size": crop, "train_size": resize if rrc else crop}


def normalization(args: Any, data: Any, recorded: Any):
    """The :class:`~anycnn.data.augment.Normalize` of ``--normalize`` (``args.normalize``
    resolved already): ImageNet's for ``imagenet``, the recorded statistics of a resumed run
    or the training split's for ``auto``, None for ``none``."""
    from ..data.augment import Normalize
    from ..data.eval_transform import IMAGENET_MEAN, IMAGENET_STD

    if args.normalize == "none":
        return None
    if args.normalize == "imagenet":
        if data.image_shape[2] != 3:
            raise ConfigError(f"--normalize imagenet is for RGB images; these have "
                              f"{data.image_shape[2]} channel(s) (--channels 3 converts them)")
        return Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return recorded or Normalize.from_images(data.train.images)


def eval_transform(args: Any, normalize: Any):
    """The :class:`~anycnn.data.eval_transform.EvalTransform` a checkpoint records for
    ``--preprocess`` (with the run's normalisation), or None without it."""
    from ..data.eval_transform import EvalTransform

    parsed = parse_preprocess(getattr(args, "preprocess_spec", None))
    if parsed is None:
        return None
    resize, crop, _ = parsed
    return EvalTransform(resize, crop, None if normalize is None else normalize.mean,
                         None if normalize is None else normalize.std)


def check_augment_output(augment: Any, data: Any) -> None:
    """Refuse an augmentation whose training batches would not have the validation images'
    size (the model's input), e.g. ``rrc=S`` without ``--preprocess ...,crop=S``."""
    if augment is None:
        return
    h, w, _ = data.train.image_shape
    out, val = augment.output_shape(h, w), data.val.image_shape[:2]
    if tuple(out) != tuple(val):
        raise ConfigError(f"--augment {augment.spec()} makes {out[0]}x{out[1]} training images "
                          f"but the validation images are {val[0]}x{val[1]}: use the same size "
                          "(--augment rrc takes it from --preprocess resize=R,crop=S)")
