"""Dataset index and the patient-level split of the two real datasets (see ../shared/data/README.md).

covid19-ct-seg-256: split by `inferred_patient_group`, never by slice (neighbouring slices are near-identical).
medseg-100-train: 50 cropped slices from > 40 patients, no patient ids: 15 images held out (seed 1234).
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

#: Held-out covid19-ct-seg-256 patient groups (the same three as the measured baseline in the data README,
#: so numbers stay comparable): two coronacases volumes and one radiopaedia volume.
COVID_VAL_GROUPS = ("coronacases_003", "coronacases_009", "radiopaedia_40_86625_0")
MEDSEG_VAL_COUNT = 15
MEDSEG_SPLIT_SEED = 1234
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Sample:
    """One annotated slice: image and mask paths, its domain and patient group."""

    image: Path
    mask: Path
    domain: str  # "covid" or "medseg"
    group: str
    lung_mask: Path | None = None


def covid_samples(root) -> list[Sample]:
    root = Path(root)
    out = []
    with open(root / "slice_to_volume.csv", newline="") as f:
        for row in csv.DictReader(f):
            name = row["file"]
            lung = root / "lung-masks" / name
            out.append(Sample(root / "images" / name, root / "masks" / name, "covid",
                              row["inferred_patient_group"], lung if lung.exists() else None))
    return out


def medseg_samples(root) -> list[Sample]:
    root = Path(root)
    stems = sorted((p.stem for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS), key=int)
    return [Sample(root / "images" / f"{s}.jpg", root / "masks" / f"{s}.png", "medseg", f"medseg_{s}")
            for s in stems]


def medseg_val_stems(root) -> list[str]:
    """The 15 held-out MedSeg stems: random.Random(1234).sample over the numerically sorted stems."""
    stems = sorted(int(p.stem) for p in (Path(root) / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    return [str(s) for s in sorted(random.Random(MEDSEG_SPLIT_SEED).sample(stems, MEDSEG_VAL_COUNT))]


#: The committed cross-validation folds (patient groups and MedSeg stems); see its "description".
FOLDS_FILE = Path(__file__).with_name("folds.json")


def load_folds(path=None) -> list[dict]:
    """The folds of `path` (default FOLDS_FILE): [{"covid_groups": [...], "medseg_stems": [...]}, ...]."""
    return json.loads(Path(path or FOLDS_FILE).read_text())["folds"]


def heldout_of(fold: int | str | None, medseg_root=None, folds_file=None) -> tuple[set[str], set[str]]:
    """(held-out covid groups, held-out MedSeg stems) of a split.

    fold None: the fixed hold-out (COVID_VAL_GROUPS + the 15 seeded MedSeg images) the shipped weights up to
    run r2 were chosen on; an int K: fold K of `folds_file`; "all": nothing held out (a final model).
    """
    if fold is None:
        return set(COVID_VAL_GROUPS), set(medseg_val_stems(medseg_root)) if medseg_root else set()
    if fold == "all":
        return set(), set()
    folds = load_folds(folds_file)
    k = int(fold)
    if not 0 <= k < len(folds):
        raise ValueError(f"fold {fold} does not exist: {Path(folds_file or FOLDS_FILE).name} has folds "
                         f"0-{len(folds) - 1}")
    return set(folds[k]["covid_groups"]), set(folds[k]["medseg_stems"])


def split(covid_root=None, medseg_root=None, fold: int | str | None = None, folds_file=None):
    """-> (train, val_covid, val_medseg) lists of Sample for the split `fold` (see `heldout_of`)."""
    held_groups, held_stems = heldout_of(fold, medseg_root, folds_file)
    train, val_c, val_m = [], [], []
    if covid_root:
        for s in covid_samples(covid_root):
            (val_c if s.group in held_groups else train).append(s)
    if medseg_root:
        for s in medseg_samples(medseg_root):
            (val_m if s.image.stem in held_stems else train).append(s)
    return train, val_c, val_m


def read_gray(path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError(f"cannot read image {path}")
    return img


def read_mask(path) -> np.ndarray:
    """Mask file -> uint8 {0,1} (pixel > 0 is positive)."""
    return (read_gray(path) > 0).astype(np.uint8)
