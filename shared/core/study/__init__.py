"""Whole CT studies: safe unpacking and de-identification of uploads, analysis, and the result files.

The path of one study (the same for `covidseg study` and the service's worker):

    meta = unpack_study_upload(files, folder)          # what a client sent -> normalised, de-identified folder
    volume = load_study(folder)                          # -> shared.core.imageio.Volume (HU, geometry kept)
    analysis = analyse_study(volume, segmenter, progress=..., should_stop=...)
    for name, data, content_type in study_outputs(volume, analysis): store(name, data)

Submodules (the names above are re-exported here; import them from `shared.core.study`):

- `upload`: `unpack_study_upload`: recognising uploaded files from their content, zip extraction under file and
  byte budgets, NIfTI checks, DICOM series selection and checks, writing the normalised folder.
- `deidentify`: `deidentify_dataset` (DEID_REMOVE, DEID_EMPTY, `remap_uid`) and the salted series-UID hash.
- `analysis`: `load_study`, `analyse_study` -> `StudyAnalysis` (masks, volumes, `ct_score`, the report dict).
- `outputs`: `study_outputs` and `n_outputs`: report.json, NIfTI masks, DICOM SEG, `summary_png`, `overlay_slice`.
- `errors`: `StudyError`, `StudyCancelled` and the constants shared by the others (caps, threshold, salt).

No Flask, no Celery, no TensorFlow import here (the Segmenter is passed in).
"""
from __future__ import annotations

# every public name of the former single module shared/core/study.py, so `study.X` keeps working
from shared.core.study.analysis import StudyAnalysis, analyse_study, ct_score, load_study
from shared.core.study.deidentify import DEID_EMPTY, DEID_REMOVE, deidentify_dataset, remap_uid
from shared.core.study.errors import (
    DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES, DEFAULT_SALT, MAX_SLICE_SIDE, NIFTI_NAME, SPACING_TOLERANCE, THRESHOLD,
    StudyCancelled, StudyError,
)
from shared.core.study.outputs import LUNG_BGR, n_outputs, overlay_slice, study_outputs, summary_png
from shared.core.study.upload import unpack_study_upload

__all__ = ["StudyError", "StudyCancelled", "StudyAnalysis", "unpack_study_upload", "load_study", "analyse_study",
           "study_outputs", "deidentify_dataset", "remap_uid", "ct_score", "summary_png", "overlay_slice",
           "n_outputs", "DEFAULT_MAX_FILES", "DEFAULT_MAX_BYTES"]
