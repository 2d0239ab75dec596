"""Schemathesis hooks (SCHEMATHESIS_HOOKS=tests.service.fuzz_hooks): real uploads for the media types the
OpenAPI document names, so that schema-valid requests are also valid inputs and the fuzzer reaches the code
behind the upload checks (random bytes would only ever meet the 415 "not an image" answer).

- image/png, image/jpeg, image/tiff: random grayscale slices of 16-96 px a side (noise or a gradient, so that
  min-max scaling and CLAHE see both a flat and a textured image);
- application/gzip: a small NIfTI CT volume in HU (.nii.gz), the study upload that needs no DICOM series.
"""
from __future__ import annotations

import gzip
import io

import cv2
import numpy as np
import schemathesis
from hypothesis import strategies as st


@st.composite
def _gray(draw) -> np.ndarray:
    h = draw(st.integers(16, 96))
    w = draw(st.integers(16, 96))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        return rng.integers(0, 256, (h, w), dtype=np.uint8)
    return np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))


def _encoded(ext: str):
    return _gray().map(lambda img: cv2.imencode(ext, img)[1].tobytes())


@st.composite
def _nifti_gz(draw) -> bytes:
    import nibabel as nib

    n = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    vol = np.random.default_rng(seed).integers(-1000, 400, (32, 32, n)).astype(np.int16)
    img = nib.Nifti1Image(vol, np.diag([0.8, 0.8, 2.5, 1.0]))
    return gzip.compress(img.to_bytes(), mtime=0)


schemathesis.openapi.media_type("image/png", _encoded(".png"))
schemathesis.openapi.media_type("image/jpeg", _encoded(".jpg"))
schemathesis.openapi.media_type("image/tiff", _encoded(".tiff"))
schemathesis.openapi.media_type("application/gzip", _nifti_gz())
