"""Lung segmentation, the denominator of "percent of lung involved".

Entry points:

    segment_lungs(slices_u8, include=None)  8-bit slices (any sizes) -> bool masks; learned U-Net when its weights
                                          are present (`shared.core.lung_model`), the classical recipe below otherwise
    lung_mask_slice(gray)                 classical, 8-bit display slice (PNG/JPEG, any size) -> bool (H, W)
    lung_mask_hu(volume_hu, spacing)      classical, HU volume (Z, Y, X) from DICOM/NIfTI        -> bool (Z, Y, X)
    split_sides(mask, midline=None)       -> (image-left part, image-right part)

Held-out lung Dice on covid19-ct-seg-256 (`python -m training.eval_lung --method learned|classical`, mean per
image): learned 0.944, classical 0.890 (the learned model also keeps dense dependent consolidation).

Classical recipe (per slice, on a ~256-pixel working grid):
  1. body: everything brighter than the air/body threshold, largest component, closed, holes filled; the body is
     eroded a little so air outside it can never leak in.
  2. lung core: dark pixels inside the body (8-bit: a threshold relative to the body's own dark and soft-tissue
     levels; HU: < -320 HU), opened; components kept if they are lung-like: dark enough (median), not glued to the
     body rim (outside air, a mattress), not tiny relative to the largest. HU volumes pick components in 3-D and
     drop the trachea (small, pure-air, central components) where they are separate from the lungs.
  3. envelope, per lung side, so that lesions are not carved out: a closing with a 12-pixel disk (~17 mm) and hole
     filling; then, between the side and its convex hull, shallow pieces (<= 15 px from the lung) that are not
     bright as a whole, and otherwise the not-bright pixels (GGO, mixed consolidation) in pieces smaller than 30 %
     of that lung, connected to it; a final small closing and hole filling. Hole filling also reproduces the
     expert-mask convention of including what the lung encloses (diaphragm domes, lesions).

Limit of the classical recipe: dense consolidation flush with the chest wall (dependent, "white lung") has the
intensity of muscle and is partly missed by any such rule. Measured on covid19-ct-seg-256
(`python -m training.eval_lung --method classical`): 89 % of expert infection pixels inside the mask on the
training patients, 78 % on the held-out ones (one held-out patient has extensive dependent consolidation); the
learned model keeps 95 % on the held-out ones. When an infection mask is at hand (the model's prediction), pass it
as `include=`: its components touching the lung are merged, so percent involvement does not lose lesion pixels to
the lung mask.

The classical path is numpy + OpenCV only; TensorFlow is imported (lazily) only by the learned path of
`segment_lungs`. No Flask/Celery.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from shared.core.preprocessing import minmax_uint8, to_gray_uint8

#: Side (longest) of the working grid of 8-bit slices: the parameters were tuned at 256 px (covid19-ct-seg-256).
WORK_SIZE = 256
#: Pixel size (mm) of the working grid of HU volumes: a 256-pixel slice of a ~360 mm field of view.
WORK_PIXEL_MM = 1.4
#: Assumed in-plane field of view (mm) when `lung_mask_hu` gets no spacing.
DEFAULT_FOV_MM = 360.0


@dataclass(frozen=True)
class LungParams:
    """Tuned on the training patient groups of covid19-ct-seg-256 (radii and areas in working-grid pixels)."""

    # 8-bit path: denoising (the dataset's CLAHE makes air and lung speckled)
    median: int = 5
    sigma: float = 1.5
    # body
    body_open: int = 2
    body_close: int = 5
    body_erode: int = 2
    # 8-bit lung core: z = (s - lo) / (hi - lo); lo = 1st percentile in the body, hi = median of its tissue class
    dark_percentile: float = 1.0
    core_z: float = 0.55
    core_open: int = 2
    comp_median_z: float = 0.4    # a lung component's median z is below this (stomach, fat are brighter)
    comp_rim: float = 0.1         # at most comp_rim * 3.5 * sqrt(area) of its pixels on the body rim
    min_frac: float = 0.08        # components below this share of the largest one are dropped
    min_area: int = 40
    # envelope
    side_close: int = 12
    hull_z: float = 0.75          # hull pixels added only below this z (8-bit) ...
    hull_hu: float = -50.0        # ... or this HU
    hull_sigma: float = 2.0
    hull_max_frac: float = 0.3    # each added hull piece is smaller than this share of its lung
    hull_depth: float = 15.0      # whole shallow hull pieces (max distance to the lung <= this px) are added ...
    hull_piece_z: float = 0.9     # ... when their median z is below this ...
    hull_piece_hu: float = -50.0  # ... or this HU
    final_close: int = 3
    # HU path
    threshold_hu: float = -320.0
    comp_median_hu: float = -600.0   # lung-like: median below this ...
    pure_air_hu: float = -960.0      # ... but above this (pure air: bowel gas, an isolated trachea)
    airway_max_mm2: float = 600.0    # per-slice central pure-air components smaller than this are airways
    min_frac_3d: float = 0.05


DEFAULT_PARAMS = LungParams()


# ---------------------------------------------------------------------------------------------------- helpers


def _disk(r: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _u8(m: np.ndarray) -> np.ndarray:
    return m.astype(np.uint8)


def _open(m: np.ndarray, r: int) -> np.ndarray:
    return cv2.morphologyEx(_u8(m), cv2.MORPH_OPEN, _disk(r)).astype(bool) if r > 0 else m


def _erode(m: np.ndarray, r: int) -> np.ndarray:
    return cv2.erode(_u8(m), _disk(r)).astype(bool) if r > 0 else m


def _close(m: np.ndarray, r: int) -> np.ndarray:
    """Binary closing that behaves at the image border (zero padding of r+1 pixels)."""
    if r <= 0:
        return m
    p = r + 1
    padded = np.pad(_u8(m), p)
    return cv2.morphologyEx(padded, cv2.MORPH_CLOSE, _disk(r))[p:-p, p:-p].astype(bool)


def _fill_holes(m: np.ndarray) -> np.ndarray:
    """Fill background regions not 4-connected to the image border."""
    padded = np.pad(_u8(m), 1)
    ff_mask = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(padded, ff_mask, (0, 0), 2)
    return (padded != 2)[1:-1, 1:-1]


def _label(m: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components: (labels int32, count without background)."""
    n, lab = cv2.connectedComponents(_u8(m), connectivity=8)
    return lab, n - 1


def _select(lab: np.ndarray, n: int, ok) -> np.ndarray:
    lut = np.zeros(n + 1, bool)
    lut[1:] = ok
    return lut[lab]


def _connected_to(region: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Components of `region` that overlap `seed`."""
    lab, n = _label(region)
    if n == 0:
        return region
    lut = np.zeros(n + 1, bool)
    lut[np.unique(lab[seed])] = True
    lut[0] = False
    return lut[lab]


def _largest(m: np.ndarray) -> np.ndarray:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(_u8(m), connectivity=8)
    if n <= 1:
        return np.zeros(m.shape, bool)
    return lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _label_medians(values: np.ndarray, lab: np.ndarray, n: int) -> np.ndarray:
    """Median of `values` per label 1..n (NaN for empty labels)."""
    flat = lab.ravel()
    sel = flat > 0
    lv, vv = flat[sel], values.ravel()[sel]
    order = np.lexsort((vv, lv))
    lv, vv = lv[order], vv[order]
    counts = np.bincount(lv, minlength=n + 1)[1:]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.full(n, np.nan, np.float64)
    nz = counts > 0
    out[nz] = vv[(starts + counts // 2)[nz]]
    return out


def _otsu(values: np.ndarray) -> float:
    v = np.clip(values, 0, 255).astype(np.uint8).reshape(-1, 1)
    t, _ = cv2.threshold(v, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t)


def _hull(m: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(_u8(m), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros(m.shape, np.uint8)
    if contours:
        cv2.fillPoly(out, [cv2.convexHull(np.vstack(contours))], 1)
    return out.astype(bool)


def _body(bright: np.ndarray, p: LungParams) -> np.ndarray:
    """Largest bright component (opened to cut the table off), closed, holes filled."""
    b = _largest(_open(bright, p.body_open))
    return _fill_holes(_close(b, p.body_close))


def _midline(body: np.ndarray, fallback: float) -> float:
    xs = np.nonzero(body)[1]
    return float(xs.mean()) if xs.size else fallback


def _resize_mask(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if m.shape == shape:
        return m
    up = cv2.resize(m.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return up >= 0.5


def _resize_gray(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = img.shape
    if (h, w) == shape:
        return img
    interp = cv2.INTER_AREA if shape[0] * shape[1] < h * w else cv2.INTER_LINEAR
    return cv2.resize(img, (shape[1], shape[0]), interpolation=interp)


# ---------------------------------------------------------------------------------------------------- envelope


def _envelope(keep: np.ndarray, body: np.ndarray, score: np.ndarray, add_max: float, piece_max: float,
              p: LungParams, include: np.ndarray | None = None) -> np.ndarray:
    """Lung core -> lung mask with lesions: per side closing, hole filling, hull additions; final closing.

    `score` is the smoothed intensity (z or HU). Between a side and its convex hull, a whole piece is added when
    it is shallow (<= hull_depth from the lung) and its median score <= piece_max (a lesion against the wall or in
    a notch); otherwise only its pixels with score < add_max, in pieces smaller than hull_max_frac of the lung.
    """
    if include is not None and include.any() and keep.any():
        near = cv2.dilate(_u8(keep), _disk(2)).astype(bool)
        keep = keep | _connected_to(include, near)
    if not keep.any():
        return keep
    out = np.zeros_like(keep)
    for side in split_sides(keep, midline=_midline(body, keep.shape[1] / 2)):
        if not side.any():
            continue
        side = _fill_holes(_close(side, p.side_close))
        gap = _hull(side) & ~side & body
        lab, n = _label(gap)
        if n:
            depth = np.zeros(n + 1, np.float32)
            dist = cv2.distanceTransform(_u8(~side), cv2.DIST_L2, 5)
            np.maximum.at(depth, lab[gap], dist[gap])
            med = _label_medians(score, lab, n)
            whole = _select(lab, n, (depth[1:] <= p.hull_depth) & (med <= piece_max))
            part = gap & ~whole & (score < add_max)
            lab2, n2 = _label(part)
            if n2:
                area = np.bincount(lab2.ravel(), minlength=n2 + 1)[1:]
                part = _select(lab2, n2, area <= p.hull_max_frac * side.sum())
            side = _connected_to(side | whole | part, side)
        out |= side
    return _fill_holes(_close(out, p.final_close)) & body


def _select_components(core: np.ndarray, score: np.ndarray, max_median: float, min_median: float,
                       inner: np.ndarray, p: LungParams) -> np.ndarray:
    """Keep lung-like components of `core`: median score in (min_median, max_median], not on the body rim, big."""
    lab, n = _label(core)
    if n == 0:
        return core
    area = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.float64)
    med = _label_medians(score, lab, n)
    rim = inner & ~_erode(inner, 1)
    on_rim = np.bincount(lab[rim], minlength=n + 1)[1:]
    ok = (med <= max_median) & (med > min_median) & (on_rim <= p.comp_rim * 3.5 * np.sqrt(area))
    if not ok.any():
        return np.zeros_like(core)
    ok &= (area >= p.min_frac * area[ok].max()) & (area >= p.min_area)
    return _select(lab, n, ok)


# ---------------------------------------------------------------------------------------------------- 8-bit slices


def _work_shape(h: int, w: int, size: int = WORK_SIZE) -> tuple[int, int]:
    s = size / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def lung_mask_slice(gray: np.ndarray, include: np.ndarray | None = None,
                    params: LungParams = DEFAULT_PARAMS) -> np.ndarray:
    """8-bit display slice (any size; colour is converted to gray) -> bool lung mask of the same (H, W).

    Lungs are the dark regions inside the body. The image is min-max normalised like `shared.core.preprocessing`,
    worked on at 256 px (longest side), and the mask is resized back. `include`: optional (H, W) mask (e.g. the
    predicted infection) whose components touching the lung are merged into it.

    Needs the whole body cross-section in the field of view: in images cropped to the lungs (MedSeg-style), lungs
    touching the image border are indistinguishable from outside air and are dropped.
    """
    p = params
    g = to_gray_uint8(gray)
    shape = g.shape
    ws = _work_shape(*shape)
    g = minmax_uint8(_resize_gray(g, ws))
    empty = np.zeros(shape, bool)
    if not g.any():   # constant image
        return empty
    s = cv2.medianBlur(g, p.median)
    if p.sigma > 0:
        s = cv2.GaussianBlur(s, (0, 0), p.sigma)
    body = _body(s >= _otsu(s), p)
    inner = _erode(body, p.body_erode)
    v = s[inner]
    if v.size < 100:
        return empty
    t_in = _otsu(v)
    tissue = v[v >= t_in]
    lo = float(np.percentile(v, p.dark_percentile))
    hi = float(np.median(tissue)) if tissue.size else float(v.max())
    if hi - lo < 16:   # no dark/bright contrast inside the body
        return empty
    z = (s.astype(np.float32) - lo) / max(hi - lo, 1.0)
    core = _open(inner & (z < p.core_z), p.core_open)
    keep = _select_components(core, z, p.comp_median_z, -np.inf, inner, p)
    s2 = cv2.GaussianBlur(s, (0, 0), p.hull_sigma) if p.hull_sigma > 0 else s
    z2 = (s2.astype(np.float32) - lo) / max(hi - lo, 1.0)
    inc = None
    if include is not None:
        inc = _resize_mask(np.asarray(include) > 0, ws)
    m = _envelope(keep, body, z2, p.hull_z, p.hull_piece_z, p, inc)
    return _resize_mask(m, shape)


# ---------------------------------------------------------------------------------------------------- HU volumes


def _label3d(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """3-D components (8-connected in-plane, face-connected across slices) with cv2 + union-find."""
    z = mask.shape[0]
    labs = np.zeros(mask.shape, np.int64)
    offset = 0
    for k in range(z):
        lab, n = _label(mask[k])
        labs[k] = np.where(lab > 0, lab + offset, 0)
        offset += n
    parent = np.arange(offset + 1)

    def find(a):
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    for k in range(z - 1):
        both = (labs[k] > 0) & (labs[k + 1] > 0)
        if not both.any():
            continue
        pairs = np.unique(np.stack([labs[k][both], labs[k + 1][both]], 1), axis=0)
        for a, b in pairs:
            ra, rb = find(int(a)), find(int(b))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(offset + 1)])
    uniq, compact = np.unique(roots, return_inverse=True)   # root 0 (background) maps to 0
    return compact[labs], len(uniq) - 1


def lung_mask_hu(volume_hu: np.ndarray, spacing=None, include: np.ndarray | None = None,
                 params: LungParams = DEFAULT_PARAMS) -> np.ndarray:
    """HU volume (Z, Y, X) -> bool lung mask (Z, Y, X), lesions (consolidation, GGO) inside the lungs included.

    `spacing`: (dz, dy, dx) in mm (None: a ~360 mm field of view is assumed). A 2-D array is one slice.
    `include`: optional mask of the same shape (e.g. predicted infection) merged where it touches the lung.
    """
    p = params
    vol = np.asarray(volume_hu, dtype=np.float32)
    squeeze = vol.ndim == 2
    if squeeze:
        vol = vol[None]
        include = None if include is None else np.asarray(include)[None]
    if vol.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) volume, got shape {vol.shape}")
    nz, ny, nx = vol.shape
    if spacing is None:
        dy = dx = DEFAULT_FOV_MM / max(ny, nx)
    else:
        dy, dx = float(spacing[-2]), float(spacing[-1])
    ws = (max(1, round(ny * dy / WORK_PIXEL_MM)), max(1, round(nx * dx / WORK_PIXEL_MM)))
    px_mm2 = (ny * dy / ws[0]) * (nx * dx / ws[1])

    hu = np.empty((nz,) + ws, np.float32)
    body = np.zeros((nz,) + ws, bool)
    core = np.zeros((nz,) + ws, bool)
    inner = np.zeros((nz,) + ws, bool)
    for k in range(nz):
        sl = np.nan_to_num(vol[k], nan=-1024.0, posinf=3000.0, neginf=-1024.0)
        sl = np.clip(sl, -1100.0, 1500.0)
        sl = _resize_gray(sl, ws)
        sl = cv2.GaussianBlur(sl, (0, 0), 0.8)
        hu[k] = sl
        air = sl < p.threshold_hu
        body[k] = _body(~air, p)
        inner[k] = _erode(body[k], p.body_erode)
        core[k] = _open(inner[k] & air, p.core_open)

    # 3-D component choice: lung-like density, not on the body rim in most slices, not tiny.
    lab, n = _label3d(core)
    keep = np.zeros_like(core)
    if n:
        vox = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.float64)
        med = _label_medians(hu, lab, n)
        rim = inner & ~np.stack([_erode(inner[k], 1) for k in range(nz)])
        on_rim = np.bincount(lab[rim], minlength=n + 1)[1:]
        ok = (med <= p.comp_median_hu) & (med > p.pure_air_hu) & (on_rim <= p.comp_rim * 3.5 * np.sqrt(vox))
        if ok.any():
            ok &= (vox >= p.min_frac_3d * vox[ok].max()) & (vox >= p.min_area)
            keep = _select(lab, n, ok)

    out = np.zeros((nz,) + ws, bool)
    inc = None if include is None else np.asarray(include) > 0
    for k in range(nz):
        kk = keep[k]
        if not kk.any():
            continue
        kk = _drop_airways(kk, hu[k], body[k], px_mm2, p)
        s2 = cv2.GaussianBlur(hu[k], (0, 0), p.hull_sigma) if p.hull_sigma > 0 else hu[k]
        inc_k = None if inc is None else _resize_mask(inc[k], ws)
        out[k] = _envelope(kk, body[k], s2, p.hull_hu, p.hull_piece_hu, p, inc_k)
    res = np.stack([_resize_mask(out[k], (ny, nx)) for k in range(nz)])
    return res[0] if squeeze else res


def _drop_airways(keep: np.ndarray, hu: np.ndarray, body: np.ndarray, px_mm2: float, p: LungParams) -> np.ndarray:
    """Remove small, pure-air, central components of one slice (trachea, main bronchi outside the lungs)."""
    lab, n = _label(keep)
    if n < 2:
        return keep
    area = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    med = _label_medians(hu, lab, n)
    xs = np.nonzero(body)[1]
    if xs.size == 0:
        return keep
    mid, width = xs.mean(), xs.max() - xs.min() + 1
    cols = np.bincount(lab.ravel(), weights=np.tile(np.arange(lab.shape[1]), lab.shape[0]), minlength=n + 1)[1:]
    cx = cols / np.maximum(area, 1)
    airway = ((area * px_mm2 <= p.airway_max_mm2) & (med <= -930.0) & (np.abs(cx - mid) <= 0.15 * width)
              & (area < area.max()))
    return _select(lab, n, ~airway)


# ---------------------------------------------------------------------------------------------------- sides


def _split2d(mask: np.ndarray, midline: float) -> tuple[np.ndarray, np.ndarray]:
    left = np.zeros_like(mask)
    right = np.zeros_like(mask)
    lab, n = _label(mask)
    for i in range(1, n + 1):
        comp = lab == i
        cols = comp.sum(0)
        xs = np.nonzero(cols)[0]
        x0, x1 = int(xs[0]), int(xs[-1])
        cx = float((cols * np.arange(cols.size)).sum() / cols.sum())
        if x0 < midline <= x1 and x1 - x0 >= 8:
            lo, hi = x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4
            c = lo + int(np.argmin(cols[lo:hi + 1]))
            if cols[c] < 0.3 * min(cols[x0:c].max(initial=0), cols[c + 1:x1 + 1].max(initial=0)):
                left[:, :c] |= comp[:, :c]
                right[:, c:] |= comp[:, c:]
                continue
        (left if cx < midline else right)[comp] = True
    return left, right


def split_sides(mask: np.ndarray, midline: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lung mask (2-D or 3-D) -> (left, right) as seen in the image: columns left/right of the midline.

    Under the radiological display convention the image-left lung is the patient's RIGHT lung. Each connected
    component goes to the side of its centroid; a component straddling the midline with a clear waist (lungs
    touching at the anterior junction) is cut at the waist. `midline` (column) defaults to the centre of the
    mask's horizontal extent; pass the body centre when a slice may hold only one lung. 3-D masks use one
    midline for all slices.
    """
    m = np.asarray(mask) > 0
    if m.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D or 3-D mask, got shape {m.shape}")
    if not m.any():
        return np.zeros_like(m), np.zeros_like(m)
    if midline is None:
        cols = np.nonzero(m.any(axis=tuple(range(m.ndim - 1))))[0]
        midline = (cols[0] + cols[-1] + 1) / 2.0
    if m.ndim == 2:
        return _split2d(m, float(midline))
    parts = [_split2d(m[k], float(midline)) for k in range(m.shape[0])]
    return np.stack([a for a, _ in parts]), np.stack([b for _, b in parts])


# ---------------------------------------------------------------------------------------------------- batch API

#: Learned components smaller than this share of the slice area are dropped (specks outside the lungs).
MIN_COMPONENT_FRAC = 0.0005
#: Values of `segment_lungs(method=...)`.
LUNG_METHODS = ("auto", "learned", "classical")


def _as_include(include, n: int) -> list:
    incs = [None] * n if include is None else list(include)
    if len(incs) != n:
        raise ValueError(f"include has {len(incs)} masks for {n} slices")
    return incs


def _merge_include(mask: np.ndarray, include) -> np.ndarray:
    """Add the components of `include` (resized to the mask) that touch the lung, then fill enclosed holes."""
    if include is None:
        return mask
    inc = _resize_mask(np.asarray(include) > 0, mask.shape)
    if not (inc.any() and mask.any()):
        return mask
    r = max(1, round(2 * max(mask.shape) / WORK_SIZE))   # 2 px at 256: lesions flush with the lung edge
    near = cv2.dilate(_u8(mask), _disk(r)).astype(bool)
    return _fill_holes(mask | _connected_to(inc, near))


def lung_mask_from_probability(prob: np.ndarray, include=None, threshold: float = 0.5) -> np.ndarray:
    """Learned lung probability (H, W) -> bool mask: threshold, drop specks, fill enclosed holes (the experts'
    convention), then merge `include` where it touches the lung."""
    m = np.asarray(prob) >= threshold
    lab, n = _label(m)
    if n:
        area = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        m = _select(lab, n, area >= MIN_COMPONENT_FRAC * m.size)
    return _merge_include(_fill_holes(m), include)


def lung_method(weights=None) -> str:
    """What `segment_lungs(method="auto", weights=weights)` uses: "learned" when the weights load, else
    "classical" (for reports)."""
    from shared.core.lung_model import get_lung_model_or_none

    return "learned" if get_lung_model_or_none(weights) is not None else "classical"


def segment_lungs(slices_u8, include=None, *, method: str = "auto", weights=None,
                  batch_size: int = 16) -> list[np.ndarray]:
    """8-bit slices (each any size, gray or colour) -> list of bool lung masks, each at its slice's own size.

    The entry point for whole studies. method="auto": the learned lung U-Net (`shared.core.lung_model`, weights
    `weights` or the shipped `weights/covidseg-lung-unet-small.h5`) when its weights load, the classical
    `lung_mask_slice` otherwise (e.g. the file is missing); "learned" raises FileNotFoundError without weights;
    "classical" never touches TensorFlow. Slices should show the whole body cross-section (a lung window or a
    min-max of the HU range; the learned model was trained on min-max + CLAHE slices with window jitter).
    `include`: optional sequence (one per slice, entries may be None) of masks, e.g. the predicted infection,
    merged where they touch the lung.
    """
    if method not in LUNG_METHODS:
        raise ValueError(f"unknown lung method {method!r}; choose one of {', '.join(LUNG_METHODS)}")
    slices = list(slices_u8)
    incs = _as_include(include, len(slices))
    if not slices:
        return []
    model = None
    if method != "classical":
        from shared.core.lung_model import get_lung_model, get_lung_model_or_none

        model = get_lung_model(weights) if method == "learned" else get_lung_model_or_none(weights)
    if model is None:
        return [lung_mask_slice(s, include=i) for s, i in zip(slices, incs)]
    probs = model.predict(slices, batch_size=batch_size)
    return [lung_mask_from_probability(p, i) for p, i in zip(probs, incs)]
