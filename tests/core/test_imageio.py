"""shared.core.imageio: sniffing, header-only sizes, decoding, DICOM series geometry, NIfTI geometry, windowing."""
from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest

from shared.core import imageio
from shared.core.imageio import ImageDecodeError

from .conftest import FIXTURES
from .helpers import blob_volume, write_dicom_series, write_nifti


def _png(img):
    return cv2.imencode(".png", img)[1].tobytes()


@pytest.fixture
def gray():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (37, 53), dtype=np.uint8)


def test_sniff_and_dimensions_from_header(gray, tmp_path):
    datas = {"png": _png(gray), "jpeg": cv2.imencode(".jpg", gray)[1].tobytes(),
             "tiff": cv2.imencode(".tiff", gray)[1].tobytes()}
    hu, _ = blob_volume((2, 37, 53))
    write_dicom_series(tmp_path / "d", hu)
    datas["dicom"] = next((tmp_path / "d").iterdir()).read_bytes()
    for fmt, data in datas.items():
        assert imageio.sniff_format(data) == fmt
        assert imageio.image_dimensions(data) == (53, 37), fmt
    assert imageio.sniff_format(b"hello world, not an image") is None
    assert imageio.sniff_format(b"") is None
    with pytest.raises(ImageDecodeError, match="text"):
        imageio.image_dimensions(b"just some text\n")


def test_decode_roundtrip_and_colour(gray):
    assert np.array_equal(imageio.decode_image_bytes(_png(gray)), gray)
    bgr = np.dstack([gray, gray // 2, 255 - gray])
    out = imageio.decode_image_bytes(_png(bgr))
    assert out.shape == gray.shape and np.array_equal(out, cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    g16 = (gray.astype(np.uint16) * 257)
    out16 = imageio.decode_image_bytes(_png(g16))
    assert out16.dtype == np.uint16 and np.array_equal(out16, g16)


def test_decompression_bomb_rejected_from_header(gray):
    data = bytearray(_png(gray))
    data[16:24] = struct.pack(">II", 60000, 60000)  # IHDR claims 3.6 gigapixels; no pixel is decoded
    assert imageio.image_dimensions(bytes(data)) == (60000, 60000)
    with pytest.raises(ImageDecodeError, match="too large"):
        imageio.decode_image_bytes(bytes(data), max_pixels=50_000_000)
    with pytest.raises(ImageDecodeError, match="too large"):
        imageio.decode_image_bytes(_png(gray), max_pixels=100)


@pytest.mark.parametrize("make,match", [
    (lambda png: b"", "empty"),
    (lambda png: png[: len(png) // 2], "truncated PNG"),
    (lambda png: b"plain text renamed to .png\n", "text"),
    (lambda png: b"\x00\x01\x02\x03" * 40, "unrecognised"),
])
def test_bad_bytes_raise_human_errors(gray, make, match):
    with pytest.raises(ImageDecodeError, match=match):
        imageio.decode_image_bytes(make(_png(gray)))


def test_truncated_jpeg_rejected(gray):
    jpg = cv2.imencode(".jpg", gray)[1].tobytes()
    assert imageio.decode_image_bytes(jpg).shape == gray.shape
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        imageio.decode_image_bytes(jpg[:-200])


def test_lung_window_values():
    hu = np.array([-1400, -1350, -600, 0, 150, 3000], np.float32)
    # [-1350, 150] -> [0, 255], linear, rounded: -600 -> 127.5 -> 128; 0 -> 229.5 -> 230
    assert imageio.window_to_uint8(hu).tolist() == [0, 0, 128, 230, 255, 255]
    assert imageio.parse_window("-500,1000") == (-500.0, 1000.0)
    assert imageio.parse_window("none") is None
    with pytest.raises(ImageDecodeError):
        imageio.parse_window("wide")


def test_single_dicom_file_is_lung_windowed(tmp_path):
    hu, _ = blob_volume((1, 20, 24))
    hu[0, 0, 0] = 0
    p = write_dicom_series(tmp_path, hu, slope=2.0, intercept=-2048.0)[0]
    img = imageio.decode_image_bytes(p.read_bytes())
    assert img.dtype == np.uint8 and img.shape == (20, 24)
    assert img[0, 0] == 230 and img[0, 1] == 60  # 0 HU -> 229.5, -1000 HU -> 59.5 through the lung window
    assert imageio.read_image(p)[0, 0] == 230


def test_dicom_series_sorted_by_position_with_geometry(tmp_path):
    hu, centres = blob_volume((6, 40, 48))
    write_dicom_series(tmp_path / "s", hu, spacing=(0.8, 0.7), dz=2.5, origin=(-20.0, -15.0, 40.0), seed=3)
    (tmp_path / "s" / "notes.txt").write_text("not dicom")  # ignored
    vol = imageio.read_dicom_series(tmp_path / "s")
    assert vol.slices.shape == (6, 40, 48) and vol.is_hu
    assert np.array_equal(vol.slices, hu.astype(np.float32))  # spatial order restored, HU via slope/intercept
    expected = np.array([[-0.7, 0, 0, 20.0], [0, -0.8, 0, 15.0], [0, 0, 2.5, 40.0], [0, 0, 0, 1]])
    assert np.allclose(vol.affine, expected)
    assert np.allclose(vol.spacing, (0.7, 0.8, 2.5))
    assert vol.orientation == "LPS"


def test_nifti_reoriented_to_display_and_back(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(30, 20, 7)).astype(np.float32)  # (i, j, k)
    # i -> posterior-to-anterior flipped onto y, j -> x, k -> z: a permuted, flipped grid
    affine = np.array([[0, 0.9, 0, -10], [-0.6, 0, 0, 25], [0, 0, 3.0, -50], [0, 0, 0, 1]], float)
    p = write_nifti(tmp_path / "v.nii.gz", data, affine)
    vol = imageio.read_nifti(p)
    assert vol.orientation == "LPS" and vol.n_slices == 7
    # display voxel (col, row, slice) and source voxel map to the same world point
    i, j, k = 4, 11, 5
    src = data[i, j, k]
    world = affine @ [i, j, k, 1]
    c, r, s = np.round(np.linalg.inv(vol.affine) @ world)[:3].astype(int)
    assert vol.slices[s, r, c] == src
    back = vol.mask_to_source_array(vol.slices)
    assert back.shape == data.shape and np.array_equal(back, data)
    img = vol.mask_to_nifti((vol.slices > 0).astype(np.uint8))
    assert np.allclose(img.affine, affine) and img.shape == data.shape


def test_input_kind(tmp_path, gray):
    (tmp_path / "a.png").write_bytes(_png(gray))
    assert imageio.input_kind(tmp_path / "a.png") == "image"
    assert imageio.input_kind(FIXTURES / "slices") == "image-folder"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageDecodeError, match="empty folder"):
        imageio.input_kind(tmp_path / "empty")
    with pytest.raises(ImageDecodeError, match="no such"):
        imageio.input_kind(tmp_path / "missing.png")
