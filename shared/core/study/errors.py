"""Constants and exceptions shared by the submodules of `shared.core.study`."""
from __future__ import annotations

#: Default caps of one upload: files (DICOM files + zip members) and bytes (uploaded + unpacked).
DEFAULT_MAX_FILES = 3000
DEFAULT_MAX_BYTES = 2 * 1024 ** 3
#: Largest accepted slice side (pixels) and the fewest slices of a study.
MAX_SLICE_SIDE = 4096
#: Threshold on the infection probability (`prob >= THRESHOLD`, the project-wide convention).
THRESHOLD = 0.5
#: Relative tolerance on slice spacing: a step this far from the median means missing or extra slices.
SPACING_TOLERANCE = 0.1
#: Salt of the series-UID hash when the caller gives none (services should pass a secret of their own).
DEFAULT_SALT = "covidseg-study"
NIFTI_NAME = "volume.nii.gz"


class StudyError(ValueError):
    """An upload or study that cannot be analysed; `str(exc)` is a message for users (no patient data)."""


class StudyCancelled(Exception):
    """`analyse_study` stopped because `should_stop()` returned True (not an error of the input)."""
