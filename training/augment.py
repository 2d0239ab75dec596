"""Training-time augmentation on the 448 serving canvas.

Geometry is one affine warp straight from the native image to the 448 canvas (a single interpolation):
scale, rotation, flips, shift; MedSeg slices (cropped to the lungs, so anatomy ~2x larger) are zoomed out more
and sometimes turned by 90 degrees, covid slices are zoomed in and out around their serving scale. Appearance is
varied *before* the shared normalisation (gamma, contrast, blur, noise, JPEG re-encoding, CLAHE strength), so
the model sees what `shared.core.preprocessing.preprocess` makes of many looks. With augmentation off, a training
example is bit-identical to the serving input (tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from shared.core.preprocessing import CLAHE_CLIP, INPUT_SIZE, normalize_appearance, preprocess, resize_to_input


@dataclass(frozen=True)
class AugmentProfile:
    """How hard `make_example` varies an example. Probabilities are per example; ranges are uniform draws."""

    #: log-uniform zoom range per domain (relative to filling the 448 canvas, as serving does)
    zoom: dict
    #: rotation range in degrees (+/-)
    max_angle: float
    #: probability that a MedSeg slice is also turned by a multiple of 90 degrees
    medseg_turn_p: float
    #: log aspect change range (+/-)
    max_log_aspect: float
    #: shift range as a fraction of the canvas (+/-)
    max_shift: float
    gamma_p: float
    max_log_gamma: float
    contrast_p: float
    contrast: tuple
    max_brightness: float
    blur_p: float
    noise_p: float
    jpeg_p: float
    #: probability of the serving CLAHE clip limit (else a random one in `clahe_range`)
    clahe_serving_p: float
    clahe_range: tuple


#: the default: wide geometry and appearance ranges that bridge the two data domains.
FULL = AugmentProfile(zoom={"covid": (0.7, 1.6), "medseg": (0.45, 1.1)}, max_angle=15, medseg_turn_p=0.3,
                      max_log_aspect=0.1, max_shift=0.12, gamma_p=0.7, max_log_gamma=0.4, contrast_p=0.5,
                      contrast=(0.8, 1.2), max_brightness=0.08, blur_p=0.2, noise_p=0.3, jpeg_p=0.25,
                      clahe_serving_p=0.6, clahe_range=(1.5, 8.0))
#: for the end of a compute-bound run, when the model still fits its training patients no better than held-out
#: ones: the same kinds of variation, narrower and rarer, closer to what serving feeds the model.
LIGHT = AugmentProfile(zoom={"covid": (0.85, 1.25), "medseg": (0.6, 1.05)}, max_angle=7, medseg_turn_p=0.1,
                       max_log_aspect=0.05, max_shift=0.06, gamma_p=0.5, max_log_gamma=0.2, contrast_p=0.3,
                       contrast=(0.9, 1.1), max_brightness=0.04, blur_p=0.1, noise_p=0.15, jpeg_p=0.1,
                       clahe_serving_p=0.8, clahe_range=(2.0, 6.0))
PROFILES = {"full": FULL, "light": LIGHT}


def _affine(h: int, w: int, size: int, rng: np.random.Generator, domain: str,
            profile: AugmentProfile = FULL, zoom_domain: str | None = None) -> np.ndarray:
    lo, hi = profile.zoom.get(zoom_domain or domain, profile.zoom["covid"])
    zoom = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    angle = rng.uniform(-profile.max_angle, profile.max_angle)
    if domain == "medseg" and rng.random() < profile.medseg_turn_p:
        angle += 90 * rng.integers(1, 4)
    sx, sy = size / w * zoom, size / h * zoom
    sx *= math.exp(rng.uniform(-profile.max_log_aspect, profile.max_log_aspect))  # mild aspect change
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    # map native centre -> canvas centre (+ shift), rotate and scale about it
    lin = np.array([[c * sx, -s * sy], [s * sx, c * sy]])
    if rng.random() < 0.5:
        lin = lin @ np.array([[-1, 0], [0, 1]])
    shift = rng.uniform(-profile.max_shift, profile.max_shift, size=2) * size
    centre_in = np.array([(w - 1) / 2, (h - 1) / 2])
    centre_out = np.array([(size - 1) / 2, (size - 1) / 2]) + shift
    t = centre_out - lin @ centre_in
    return np.hstack([lin, t[:, None]]).astype(np.float32)


def _appearance(img: np.ndarray, rng: np.random.Generator, profile: AugmentProfile = FULL) -> np.ndarray:
    """uint8 -> uint8 with random gamma/contrast/blur/noise/JPEG."""
    f = img.astype(np.float32) / 255.0
    if rng.random() < profile.gamma_p:
        f = f ** math.exp(rng.uniform(-profile.max_log_gamma, profile.max_log_gamma))
    if rng.random() < profile.contrast_p:
        f = f * rng.uniform(*profile.contrast) + rng.uniform(-profile.max_brightness, profile.max_brightness)
    if rng.random() < profile.blur_p:
        f = cv2.GaussianBlur(f, (0, 0), rng.uniform(0.5, 1.3))
    if rng.random() < profile.noise_p:
        f = f + rng.normal(0, rng.uniform(0.005, 0.03), f.shape).astype(np.float32)
    out = np.clip(f * 255 + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < profile.jpeg_p:
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 95))])
        out = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    return out


def make_example(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None, domain: str = "covid",
                 size: int = INPUT_SIZE, profile: AugmentProfile = FULL,
                 zoom_domain: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(gray uint8 native, mask {0,1} native) -> (float32 size x size input, float32 size x size mask).

    `zoom_domain` picks the zoom range (default: `domain`'s). Lung-framed training passes "covid" for every
    slice: framed, both domains are served at the same scale, so MedSeg needs no zooming out.

    `rng=None` means no augmentation: the input is exactly `preprocess(image)` and the mask is resized the
    same way (nearest-area then threshold at 0.5).
    """
    if rng is None:
        m = resize_to_input(mask.astype(np.float32), size)
        return preprocess(image, size=size), (m > 0.5).astype(np.float32)
    M = _affine(image.shape[0], image.shape[1], size, rng, domain, profile, zoom_domain)
    img = cv2.warpAffine(image, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=0)
    m = cv2.warpAffine(mask.astype(np.float32), M, (size, size), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    img = _appearance(img, rng, profile)
    clip = CLAHE_CLIP if rng.random() < profile.clahe_serving_p else rng.uniform(*profile.clahe_range)
    x = normalize_appearance(img, clip).astype(np.float32) / np.float32(255.0)
    return x, (m > 0.5).astype(np.float32)


#: how random_crop picks the lesion a crop is centred on
LESION_SAMPLING = ("pixel", "component")


def random_crop(x: np.ndarray, y: np.ndarray, crop: int, rng: np.random.Generator,
                lesion_bias: float = 0.7, lesion_sampling: str = "pixel") -> tuple[np.ndarray, np.ndarray]:
    """Crop crop x crop; with probability `lesion_bias` the crop is centred near a lesion pixel.

    lesion_sampling: "pixel" draws the pixel uniformly from all lesion pixels, so big lesions are centred most
    often; "component" first draws one connected lesion (8-connected) uniformly, then a pixel in it, so a
    50-pixel focus is centred as often as a whole consolidated lobe."""
    if lesion_sampling not in LESION_SAMPLING:
        raise ValueError(f"lesion_sampling must be one of {LESION_SAMPLING}, not {lesion_sampling!r}")
    h, w = x.shape
    if crop >= h and crop >= w:
        return x, y
    ys, xs = np.nonzero(y)
    if len(ys) and rng.random() < lesion_bias:
        if lesion_sampling == "component":
            _, labels = cv2.connectedComponents((y > 0).astype(np.uint8), connectivity=8)
            lab = labels[ys, xs]
            pick = np.flatnonzero(lab == rng.integers(1, lab.max() + 1))
            i = pick[rng.integers(len(pick))]
        else:
            i = rng.integers(len(ys))
        cy = ys[i] + rng.integers(-crop // 3, crop // 3 + 1)
        cx = xs[i] + rng.integers(-crop // 3, crop // 3 + 1)
        top = int(np.clip(cy - crop // 2, 0, h - crop))
        left = int(np.clip(cx - crop // 2, 0, w - crop))
    else:
        top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    return x[top:top + crop, left:left + crop], y[top:top + crop, left:left + crop]
