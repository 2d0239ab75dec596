"""Framing: which part of a slice the infection model sees, shared by training and serving.

    frames = frame_slices(images, "lung")        # one Frame per slice (learned lung mask -> its bounding box)
    crop = frames[i].crop(images[i])              # what goes through `preprocessing.preprocess`
    prob = frames[i].paste(prob_on_crop)          # back to the slice's own geometry (0 outside the frame)

Why: the two training domains are framed differently. MedSeg slices were cut to the lungs by their preparer and
are stretched to the 448 canvas from that box; COVID-19-CT-Seg slices (and the DICOM/NIfTI a hospital sends) are
full-field, so the lungs fill ~60 % of the canvas and lesions are ~1.5x smaller in pixels. `framing="lung"` cuts
every slice to its lung bounding box first (the learned lung U-Net, `shared.core.lung_model`, plus a margin), so
both domains reach the model framed the way MedSeg is. `framing="full"` is the identity (the whole slice).

Which framing a set of weights expects is part of the weights: `save_weights(metadata={"framing": ...})`, read
by `shared.core.inference.Segmenter` (weights without the key are "full").
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Accepted framing names.
FRAMINGS = ("full", "lung")
#: Margin added on each side of the lung bounding box, as a fraction of the box's height / width.
LUNG_BOX_MARGIN = 0.05
#: A frame spans at least this fraction of the slice's height and of its width (grown about its centre): small
#: lungs (apex, bases) are zoomed at most 2.5x per axis instead of being stretched to the whole canvas.
MIN_FRAME_FRACTION = 0.4
#: A lung mask smaller than this fraction of the slice is not trusted: the slice is framed whole.
MIN_LUNG_FRACTION = 0.02
#: A slice whose border ring is less than this fraction air is already cut to the body or the lungs (as MedSeg's
#: are) and is framed whole. Measured on the training data (ring 2 % of the side, air = below 40 of 255 after
#: min-max): COVID-19-CT-Seg slices 0.10-0.97 (5th percentile 0.26), MedSeg 0.00-0.13.
PRECROPPED_AIR_FRACTION = 0.2
#: Gray level (of 255, after per-slice min-max) below which a border pixel counts as air.
AIR_LEVEL = 40


@dataclass(frozen=True)
class Frame:
    """A rectangle [top, bottom) x [left, right) inside a slice of shape (height, width)."""

    top: int
    bottom: int
    left: int
    right: int
    height: int
    width: int

    @classmethod
    def whole(cls, shape) -> "Frame":
        h, w = int(shape[0]), int(shape[1])
        return cls(0, h, 0, w, h, w)

    @property
    def is_whole(self) -> bool:
        return (self.top, self.left, self.bottom, self.right) == (0, 0, self.height, self.width)

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The framed part of `image` (any dtype, 2-D or (H, W, C)); the image itself when whole."""
        if image.shape[0] != self.height or image.shape[1] != self.width:
            raise ValueError(f"frame is for a {self.height}x{self.width} slice, image is "
                             f"{image.shape[0]}x{image.shape[1]}")
        return image if self.is_whole else image[self.top:self.bottom, self.left:self.right]

    def paste(self, prob: np.ndarray) -> np.ndarray:
        """A float map over the frame (any size; resized with INTER_LINEAR) -> float32 (height, width) map,
        0 outside the frame."""
        fh, fw = self.bottom - self.top, self.right - self.left
        p = np.asarray(prob, dtype=np.float32)
        if p.shape != (fh, fw):
            p = cv2.resize(p, (fw, fh), interpolation=cv2.INTER_LINEAR)
        if self.is_whole:
            return np.ascontiguousarray(p)
        out = np.zeros((self.height, self.width), np.float32)
        out[self.top:self.bottom, self.left:self.right] = p
        return out

    def to_dict(self) -> dict:
        return {"top": self.top, "bottom": self.bottom, "left": self.left, "right": self.right}


def _span(lo: int, hi: int, margin: float, min_len: int, n: int) -> tuple[int, int]:
    """[lo, hi) widened by margin of its length on each side, grown about its centre to min_len, kept in [0, n)."""
    d = int(round(margin * (hi - lo)))
    lo, hi = lo - d, hi + d
    if hi - lo < min_len:
        c = (lo + hi) / 2
        lo, hi = int(round(c - min_len / 2)), int(round(c - min_len / 2)) + min_len
    shift = max(0, -lo) - max(0, hi - n)  # slide back inside the slice before clipping
    return max(0, lo + shift), min(n, hi + shift)


def lung_frame(lung_mask: np.ndarray, margin: float = LUNG_BOX_MARGIN,
               min_fraction: float = MIN_LUNG_FRACTION, min_frame: float = MIN_FRAME_FRACTION) -> Frame:
    """Bounding box of a bool lung mask, widened by `margin` of its size on each side, at least `min_frame` of
    the slice's height and width, inside the slice; the whole slice when the mask covers less than
    `min_fraction` of it (no lung found: nothing to zoom on)."""
    m = np.asarray(lung_mask, dtype=bool)
    h, w = m.shape
    if m.sum() < min_fraction * m.size:
        return Frame.whole(m.shape)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    top, bottom = _span(int(rows[0]), int(rows[-1]) + 1, margin, int(np.ceil(min_frame * h)), h)
    left, right = _span(int(cols[0]), int(cols[-1]) + 1, margin, int(np.ceil(min_frame * w)), w)
    return Frame(top, bottom, left, right, h, w)


def border_air_fraction(gray_u8: np.ndarray, ring: float = 0.02) -> float:
    """Fraction of the slice's border ring (`ring` of the shorter side, at least 2 px) that is air."""
    from shared.core.preprocessing import minmax_uint8

    g = minmax_uint8(gray_u8)
    b = max(2, int(ring * min(g.shape)))
    edge = np.concatenate([g[:b].ravel(), g[-b:].ravel(), g[:, :b].ravel(), g[:, -b:].ravel()])
    return float(np.mean(edge < AIR_LEVEL))


def frame_slices(images, framing: str = "full", lung_weights=None, batch_size: int = 16) -> list[Frame]:
    """One Frame per slice (any sizes, gray or colour). framing="lung": slices already cut close to the body
    (border ring mostly not air, `PRECROPPED_AIR_FRACTION`) are framed whole, as they are; the others by the
    learned lung U-Net's mask (weights `lung_weights` or the shipped ones; FileNotFoundError when they are
    missing: a lung-framed model must not silently see whole slices)."""
    if framing not in FRAMINGS:
        raise ValueError(f"unknown framing {framing!r}; choose one of {', '.join(FRAMINGS)}")
    images = list(images)
    if framing == "full" or not images:
        return [Frame.whole(np.asarray(im).shape) for im in images]
    from shared.core.lung import lung_mask_from_probability
    from shared.core.lung_model import get_lung_model
    from shared.core.preprocessing import to_gray_uint8

    grays = [to_gray_uint8(im) for im in images]
    frames = [Frame.whole(g.shape) if border_air_fraction(g) < PRECROPPED_AIR_FRACTION else None for g in grays]
    todo = [i for i, f in enumerate(frames) if f is None]
    if todo:
        probs = get_lung_model(lung_weights).predict([grays[i] for i in todo], batch_size=batch_size)
        for i, p in zip(todo, probs):
            frames[i] = lung_frame(lung_mask_from_probability(p))
    return frames
