"""Model construction and weight loading (segmentation-models U-Net, ResNet34 encoder, tf.keras).

Importing this module sets SM_FRAMEWORK/TF_USE_LEGACY_KERAS before TensorFlow loads, so that
segmentation-models builds on tf.keras (tf-keras 2.x) rather than Keras 3.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

#: Root of the repository (weights/ lives there).
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WEIGHTS = REPO_ROOT / "weights" / "covidseg-unet-resnet34.h5"
#: Marker attribute of our compact weights format (see `save_weights`).
_FORMAT_ATTR = "covidseg_weights_format"


def configure_devices() -> str:
    """Use a GPU when TensorFlow sees one (memory growth on, so several workers can share it); else the CPU.

    Returns "gpu" or "cpu".
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: growth can no longer change, still usable
            pass
    return "gpu" if gpus else "cpu"


def build_unet(input_shape=(None, None, 1), precision: str = "fp32"):
    """Unet('resnet34') with one sigmoid output; encoder_weights=None (no download at run time).

    precision="bf16" builds under the mixed_bfloat16 policy; the output is cast back to float32 so the sigmoid
    probabilities and the loss stay in full precision. The weight list is identical in both precisions.
    """
    import segmentation_models as sm
    import tensorflow as tf

    keras = tf.keras
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    try:
        base = sm.Unet("resnet34", input_shape=input_shape, encoder_weights=None, classes=1,
                       activation="sigmoid")
    finally:
        keras.mixed_precision.set_global_policy(previous)
    if precision == "fp32":
        return base
    out = keras.layers.Activation("linear", dtype="float32", name="to_float32")(base.output)
    return keras.Model(base.input, out, name=base.name)


def save_weights(model, path, dtype: str = "float16", metadata: dict | None = None) -> Path:
    """Weights-only file: one HDF5 dataset per weight, in model order, stored as float16 by default (half the
    size of Keras' fp32 file; the U-Net's outputs change by < 1e-3). `load_weights` reads it back.
    """
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs[_FORMAT_ATTR] = 1
        f.attrs["metadata"] = json.dumps(metadata or {})
        for i, (var, value) in enumerate(zip(model.weights, model.get_weights())):
            ds = f.create_dataset(f"w{i:04d}", data=value.astype(dtype))
            ds.attrs["name"] = var.name
    os.replace(tmp, path)
    return path


def read_weights(path) -> tuple[list[np.ndarray], dict] | None:
    """(arrays in model order, metadata) of a file in our format (`save_weights`); None for any other HDF5 file.
    Raises FileNotFoundError, or ValueError for a file that is not HDF5."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            if _FORMAT_ATTR not in f.attrs:
                return None
            keys = sorted(k for k in f.keys() if k.startswith("w"))
            return [f[k][()] for k in keys], json.loads(f.attrs.get("metadata", "{}"))
    except OSError as exc:
        raise ValueError(f"{path} is not an HDF5 weights file ({exc})") from None


def load_weights(model, path) -> None:
    """Load our compact format, or any Keras `save_weights`/`model.save` HDF5 file (e.g. the predecessor's)."""
    ours = read_weights(path)
    if ours is not None:
        values, expected = ours[0], model.get_weights()
        if len(values) != len(expected):
            raise ValueError(f"{path} holds {len(values)} weights; this model has {len(expected)}")
        model.set_weights([v.astype(e.dtype) for v, e in zip(values, expected)])
    else:
        model.load_weights(str(path))


def load_model(weights=None, precision: str = "fp32", input_shape=(None, None, 1)):
    """Build the U-Net and load `weights` (default: the shipped weights)."""
    configure_devices()
    model = build_unet(input_shape=input_shape, precision=precision)
    load_weights(model, weights or DEFAULT_WEIGHTS)
    return model
