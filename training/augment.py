"""Training-time augmentation on the 448 serving canvas.

Geometry is one affine warp straight from the native image to the 448 canvas (a single interpolation):
scale, rotation, flips, shift; MedSeg slices (cropped to the lungs, so anatomy ~2x larger) are zoomed out more
and sometimes turned by 90 degrees, covid slices are zoomed in and out around their serving scale. Appearance is
varied *before* the shared normalisation (gamma, contrast, blur, noise, JPEG re-encoding, CLAHE strength), so
the model sees what `shared.preprocessing.preprocess` makes of many looks. With augmentation off, a training
example is bit-identical to the serving input (tested).
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from shared.preprocessing import CLAHE_CLIP, INPUT_SIZE, normalize_appearance, preprocess, resize_to_input

#: log-uniform zoom range per domain (relative to filling the 448 canvas, as serving does).
ZOOM = {"covid": (0.7, 1.6), "medseg": (0.45, 1.1)}


def _affine(h: int, w: int, size: int, rng: np.random.Generator, domain: str) -> np.ndarray:
    lo, hi = ZOOM.get(domain, ZOOM["covid"])
    zoom = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    angle = rng.uniform(-15, 15)
    if domain == "medseg" and rng.random() < 0.3:
        angle += 90 * rng.integers(1, 4)
    sx, sy = size / w * zoom, size / h * zoom
    sx *= math.exp(rng.uniform(-0.1, 0.1))  # mild aspect change
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    # map native centre -> canvas centre (+ shift), rotate and scale about it
    lin = np.array([[c * sx, -s * sy], [s * sx, c * sy]])
    if rng.random() < 0.5:
        lin = lin @ np.array([[-1, 0], [0, 1]])
    shift = rng.uniform(-0.12, 0.12, size=2) * size
    centre_in = np.array([(w - 1) / 2, (h - 1) / 2])
    centre_out = np.array([(size - 1) / 2, (size - 1) / 2]) + shift
    t = centre_out - lin @ centre_in
    return np.hstack([lin, t[:, None]]).astype(np.float32)


def _appearance(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 -> uint8 with random gamma/contrast/blur/noise/JPEG."""
    f = img.astype(np.float32) / 255.0
    if rng.random() < 0.7:
        f = f ** math.exp(rng.uniform(-0.4, 0.4))
    if rng.random() < 0.5:
        f = f * rng.uniform(0.8, 1.2) + rng.uniform(-0.08, 0.08)
    if rng.random() < 0.2:
        f = cv2.GaussianBlur(f, (0, 0), rng.uniform(0.5, 1.3))
    if rng.random() < 0.3:
        f = f + rng.normal(0, rng.uniform(0.005, 0.03), f.shape).astype(np.float32)
    out = np.clip(f * 255 + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.25:
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 95))])
        out = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    return out


def make_example(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None, domain: str = "covid",
                 size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(gray uint8 native, mask {0,1} native) -> (float32 size x size input, float32 size x size mask).

    `rng=None` means no augmentation: the input is exactly `preprocess(image)` and the mask is resized the
    same way (nearest-area then threshold at 0.5).
    """
    if rng is None:
        m = resize_to_input(mask.astype(np.float32), size)
        return preprocess(image, size=size), (m > 0.5).astype(np.float32)
    M = _affine(image.shape[0], image.shape[1], size, rng, domain)
    img = cv2.warpAffine(image, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=0)
    m = cv2.warpAffine(mask.astype(np.float32), M, (size, size), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    img = _appearance(img, rng)
    clip = CLAHE_CLIP if rng.random() < 0.6 else rng.uniform(1.5, 8.0)
    x = normalize_appearance(img, clip).astype(np.float32) / np.float32(255.0)
    return x, (m > 0.5).astype(np.float32)


def random_crop(x: np.ndarray, y: np.ndarray, crop: int, rng: np.random.Generator,
                lesion_bias: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Crop crop x crop; with probability `lesion_bias` the crop is centred near a random lesion pixel."""
    h, w = x.shape
    if crop >= h and crop >= w:
        return x, y
    ys, xs = np.nonzero(y)
    if len(ys) and rng.random() < lesion_bias:
        i = rng.integers(len(ys))
        cy = ys[i] + rng.integers(-crop // 3, crop // 3 + 1)
        cx = xs[i] + rng.integers(-crop // 3, crop // 3 + 1)
        top = int(np.clip(cy - crop // 2, 0, h - crop))
        left = int(np.clip(cx - crop // 2, 0, w - crop))
    else:
        top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    return x[top:top + crop, left:left + crop], y[top:top + crop, left:left + crop]
