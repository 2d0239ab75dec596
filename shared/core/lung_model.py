"""The small learned lung model: a plain tf.keras U-Net on 8-bit slices (see `training/train_lung.py`).

    build_lung_unet()                      the architecture (input LUNG_INPUT_SIZE x LUNG_INPUT_SIZE x 1)
    prepare_lung_input(gray)               8-bit slice of any size -> model input (letterboxed square, preprocessed)
    LungModel.load(path).predict(slices)   -> list of float32 lung probabilities, each at its slice's own size

Input: the slice is padded to a square with its own darkest value (air; keeps the anatomy's aspect ratio), then
goes through `shared.core.preprocessing.preprocess` (the one recipe of the infection model: resize, per-image min-max,
CLAHE) at LUNG_INPUT_SIZE. Lung masks are smooth, so a 128-pixel grid loses little against the 256-pixel experts'
masks and trains in minutes on a CPU. TensorFlow is imported lazily: `shared.core.lung` stays importable without it.
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path

import cv2
import numpy as np

from shared.core.model import REPO_ROOT, load_weights
from shared.core.preprocessing import preprocess, to_gray_uint8

#: Shipped weights of the learned lung model (float16, `shared.core.model.save_weights` format).
LUNG_WEIGHTS = REPO_ROOT / "weights" / "covidseg-lung-unet-small.h5"
#: Side of the square model input.
LUNG_INPUT_SIZE = 128
#: Filters per encoder level; the bottleneck has twice the last.
LUNG_FILTERS = (16, 32, 64, 128)


def build_lung_unet(size: int | None = LUNG_INPUT_SIZE, filters=LUNG_FILTERS):
    """U-Net: per level two 3x3 conv + batch norm + ReLU, max-pool down, transposed conv up, skip concatenation;
    one sigmoid output channel. `size=None` builds a fully convolutional model (side divisible by 2**levels)."""
    import tensorflow as tf

    L = tf.keras.layers

    def block(x, f, name):
        for i in (1, 2):
            x = L.Conv2D(f, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
            x = L.BatchNormalization(name=f"{name}_bn{i}")(x)
            x = L.ReLU(name=f"{name}_relu{i}")(x)
        return x

    inp = L.Input((size, size, 1), name="image")
    x, skips = inp, []
    for i, f in enumerate(filters):
        x = block(x, f, f"enc{i}")
        skips.append(x)
        x = L.MaxPooling2D(2, name=f"pool{i}")(x)
    x = block(x, 2 * filters[-1], "bottleneck")
    for i in reversed(range(len(filters))):
        x = L.Conv2DTranspose(filters[i], 2, strides=2, name=f"up{i}")(x)
        x = L.Concatenate(name=f"skip{i}")([x, skips[i]])
        x = block(x, filters[i], f"dec{i}")
    out = L.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="lung")(x)
    return tf.keras.Model(inp, out, name="lung_unet_small")


def letterbox(gray: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Pad a 2-D uint8 image to a square with its minimum value -> (square, (top, left, h, w)) to undo it."""
    h, w = gray.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    if h == w:
        return gray, (0, 0, h, w)
    out = np.full((side, side), gray.min() if gray.size else 0, gray.dtype)
    out[top:top + h, left:left + w] = gray
    return out, (top, left, h, w)


def prepare_lung_input(image: np.ndarray, size: int = LUNG_INPUT_SIZE) -> tuple[np.ndarray, tuple]:
    """Slice of any size (gray or colour) -> (float32 (size, size) model input, geometry for `restore`)."""
    sq, geom = letterbox(to_gray_uint8(image))
    return preprocess(sq, size=size), geom + (sq.shape[0],)


def restore(prob: np.ndarray, geom: tuple) -> np.ndarray:
    """Model-grid probability -> float32 probability at the slice's own size (undo resize and letterbox)."""
    top, left, h, w, side = geom
    up = cv2.resize(prob.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    return up[top:top + h, left:left + w]


class LungModel:
    """A loaded lung U-Net. `predict` is thread-safe (one Keras call at a time)."""

    def __init__(self, model, size: int = LUNG_INPUT_SIZE, path: Path | None = None):
        self.model, self.size, self.path = model, size, path
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path=None) -> "LungModel":
        """Build the architecture and load weights (default: the shipped file). FileNotFoundError if missing."""
        path = Path(path or LUNG_WEIGHTS)
        if not path.is_file():
            raise FileNotFoundError(f"lung weights not found: {path}")
        model = build_lung_unet(LUNG_INPUT_SIZE)
        load_weights(model, path)
        return cls(model, LUNG_INPUT_SIZE, path)

    def predict(self, slices, batch_size: int = 16) -> list[np.ndarray]:
        """8-bit slices (any sizes) -> list of float32 lung probabilities, each at its slice's own size."""
        prepared = [prepare_lung_input(s, self.size) for s in slices]
        out: list[np.ndarray] = []
        for i in range(0, len(prepared), batch_size):
            batch = np.stack([x for x, _ in prepared[i:i + batch_size]])[..., None]
            with self._lock:
                probs = self.model(batch, training=False).numpy()[..., 0]
            out.extend(restore(p, g) for p, (_, g) in zip(probs, prepared[i:i + batch_size]))
        return out


_CACHE: dict[str, LungModel] = {}
_CACHE_LOCK = threading.Lock()


def get_lung_model(path=None) -> LungModel:
    """The model for `path` (default: the shipped weights), loaded once per process. FileNotFoundError when the
    file is missing, ValueError when it is not loadable lung weights."""
    path = Path(path or LUNG_WEIGHTS).resolve()
    key = str(path)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = LungModel.load(path)
        return _CACHE[key]


def get_lung_model_or_none(path=None) -> LungModel | None:
    """`get_lung_model`, or None when the weights are missing (or unloadable: warned) -> classical fallback."""
    try:
        return get_lung_model(path)
    except FileNotFoundError:
        return None
    except ValueError as exc:   # a damaged or foreign file should not stop a study: fall back, loudly
        warnings.warn(f"lung weights unusable ({exc}); using the classical lung mask", stacklevel=2)
        return None
