"""shared.core.dicom_seg: exact round trip of several segments (empty ones included: a healthy patient), SNOMED coding,
refusal of inputs that cannot make a SEG."""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from shared.core import dicom_seg, imageio

from .helpers import blob_volume, write_dicom_series, write_nifti


@pytest.fixture(scope="module")
def series_volume(tmp_path_factory):
    hu, _ = blob_volume((4, 32, 40))
    folder = tmp_path_factory.mktemp("seg") / "s"
    write_dicom_series(folder, hu, seed=2)
    return imageio.read_dicom_series(folder)


def test_round_trip_with_an_empty_segment(series_volume):
    vol = series_volume
    lung = np.zeros(vol.slices.shape, np.uint8)
    lung[:, 4:28, 5:35] = 1
    lung[2] = 0                                                # a slice without lung: its frame is omitted
    empty = np.zeros_like(lung)                                # no infection found
    data = dicom_seg.dicom_seg_bytes(vol, [(dicom_seg.INFECTION, empty), (dicom_seg.LUNG, lung)],
                                     **dicom_seg.model_identity("/w/covidseg-unet-resnet34.h5", "ab" * 32, "int8"))
    masks, uids = dicom_seg.read_dicom_seg_masks(data)
    assert uids == [d.SOPInstanceUID for d in vol.source_datasets]
    assert np.array_equal(masks[dicom_seg.LUNG.label], lung)
    assert masks[dicom_seg.INFECTION.label].shape == lung.shape and masks[dicom_seg.INFECTION.label].sum() == 0
    ds = pydicom.dcmread(io.BytesIO(data))
    assert int(ds.NumberOfFrames) == 3                        # lung on 3 slices; nothing else stored
    segs = {s.SegmentLabel: s for s in ds.SegmentSequence}
    inf = segs[dicom_seg.INFECTION.label]
    assert inf.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"          # SCT Lesion
    assert inf.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"      # morphologically abnormal
    assert segs[dicom_seg.LUNG.label].SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"   # SCT Lung
    assert inf.SegmentAlgorithmType == "AUTOMATIC" and inf.SegmentAlgorithmName == "covidseg-unet-resnet34"
    assert ds.ManufacturerModelName == "covidseg-unet-resnet34" and ds.SeriesNumber == dicom_seg.SEG_SERIES_NUMBER
    assert inf.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "abababababababab int8"


def test_refusals(series_volume, tmp_path):
    vol = series_volume
    with pytest.raises(dicom_seg.DicomSegError, match="shape"):
        dicom_seg.build_dicom_seg(vol, [(dicom_seg.INFECTION, np.zeros((4, 32, 39), np.uint8))],
                                  model_name="m", model_version="v")
    with pytest.raises(dicom_seg.DicomSegError, match="no segment"):
        dicom_seg.build_dicom_seg(vol, [], model_name="m", model_version="v")
    hu, _ = blob_volume((2, 16, 16))
    nifti = imageio.read_nifti(write_nifti(tmp_path / "v.nii.gz", hu.transpose(2, 1, 0), np.eye(4)))
    with pytest.raises(dicom_seg.DicomSegError, match="DICOM series"):
        dicom_seg.build_dicom_seg(nifti, [(dicom_seg.INFECTION, np.zeros(nifti.slices.shape, np.uint8))],
                                  model_name="m", model_version="v")
