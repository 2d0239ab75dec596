"""The ONE preprocessing function, used by training and serving alike.

Why this recipe: the two training domains look different (covid19-ct-seg-256 was min-max normalised per slice
and CLAHE'd by its preparer; MedSeg is display-windowed JPEG). Normalising every input the same way (per-image
min-max, then CLAHE) makes both, and what users upload, look alike to the model; training then varies the look
with augmentation on top (see `training.augment`).
"""
from __future__ import annotations

import cv2
import numpy as np

#: Side of the square model input (the model card's 448x448).
INPUT_SIZE = 448
#: CLAHE settings of the standard recipe.
CLAHE_CLIP = 4.0
CLAHE_TILES = (8, 8)
#: Names accepted by `preprocess(mode=...)`.
MODES = ("covidseg", "seed")


def to_gray_uint8(image: np.ndarray) -> np.ndarray:
    """Any 2-D/3-D numeric image -> 2-D uint8 grayscale, min-max scaled per image when not already uint8.

    Colour images (H, W, 3|4) are converted with OpenCV's BGR weights (images are read with cv2, so BGR order).
    A constant image maps to all zeros rather than dividing by zero.
    """
    img = np.asarray(image)
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[:, :, 0]
        elif img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.dtype == np.uint8 else img.mean(axis=2)
        elif img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY) if img.dtype == np.uint8 else img[:, :, :3].mean(axis=2)
        else:
            raise ValueError(f"unsupported channel count {img.shape[2]}")
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    if img.dtype == np.uint8:
        return img
    return minmax_uint8(img)


def minmax_uint8(img: np.ndarray) -> np.ndarray:
    """Per-image min-max scaling to 0..255 uint8 (NaN/inf treated as the minimum)."""
    f = np.asarray(img, dtype=np.float32)
    finite = np.isfinite(f)
    if not finite.all():
        f = np.where(finite, f, np.nan)
        lo = np.nanmin(f) if finite.any() else 0.0
        f = np.nan_to_num(f, nan=lo)
    lo, hi = float(f.min()), float(f.max())
    if hi - lo < 1e-6:
        return np.zeros(f.shape, dtype=np.uint8)
    return np.clip((f - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def resize_to_input(gray: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Resize to size x size: INTER_AREA when shrinking (anti-aliased), INTER_CUBIC when enlarging."""
    h, w = gray.shape[:2]
    if (h, w) == (size, size):
        return gray
    interp = cv2.INTER_AREA if h * w > size * size else cv2.INTER_CUBIC
    return cv2.resize(gray, (size, size), interpolation=interp)


def normalize_appearance(gray_u8: np.ndarray, clahe_clip: float = CLAHE_CLIP) -> np.ndarray:
    """Min-max stretch then CLAHE; uint8 in, uint8 out. `clahe_clip<=0` skips CLAHE (augmentation only)."""
    img = minmax_uint8(gray_u8)
    if clahe_clip > 0:
        img = cv2.createCLAHE(clipLimit=float(clahe_clip), tileGridSize=CLAHE_TILES).apply(img)
    return img


def preprocess(image: np.ndarray, mode: str = "covidseg", size: int = INPUT_SIZE) -> np.ndarray:
    """Image of any size -> float32 (size, size) model input.

    mode="covidseg" (our weights): grayscale -> resize -> per-image min-max -> CLAHE(4, 8x8) -> /255.
    mode="seed" (the predecessor's weights): grayscale -> resize with INTER_AREA -> raw 0..255 floats, nothing else.
    """
    if mode == "seed":
        gray = to_gray_uint8(image)
        return cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    if mode != "covidseg":
        raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {MODES}")
    gray = resize_to_input(to_gray_uint8(image), size)
    return normalize_appearance(gray).astype(np.float32) / np.float32(255.0)


def preprocess_batch(images, mode: str = "covidseg", size: int = INPUT_SIZE) -> np.ndarray:
    """List of images -> float32 (N, size, size, 1) batch."""
    return np.stack([preprocess(im, mode, size) for im in images])[..., None]
