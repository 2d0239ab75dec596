"""`covidseg study`: whole CT studies on this machine, with the same code path as the service's study worker.

Each INPUT is one study: a DICOM series folder, a .zip of a DICOM series, a single DICOM file, or a
.nii/.nii.gz volume. Every input is unpacked and checked (shared.core.study.unpack_study_upload) before the model
loads, so a broken study fails in seconds with `error: ...` and exit code 2. Results go to OUT/<name>/:
report.json, mask.nii.gz, lung_mask.nii.gz, summary.png, overlays/NNNN.png.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from cli import CLIError


def _upload_from_path(path: Path) -> list[tuple[str, bytes]]:
    """A local input as the (name, bytes) pairs a client would upload; folders keep only their DICOM files."""
    from shared.core.imageio import sniff_format

    if not path.exists():
        raise CLIError(f"{path}: no such file or folder")
    if path.is_file():
        return [(path.name, path.read_bytes())]
    files = []
    for p in sorted(path.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        with open(p, "rb") as f:
            if sniff_format(f.read(132)) != "dicom":
                continue  # README, DICOMDIR viewers, thumbnails next to the series
        files.append((p.name, p.read_bytes()))
    if not files:
        raise CLIError(f"{path}: no DICOM files in this folder")
    return files


def _fmt(v, unit="", digits=1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}{unit}"


def cmd_study(args) -> int:
    from tqdm import tqdm

    from shared.core import study
    from cli.model import _check_weights, _stem, _unique_name, _write_bytes, make_segmenter

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a folder")
    with tempfile.TemporaryDirectory(prefix="covidseg-study-") as tmp:
        # 1. unpack and check every study before the model loads
        studies = []
        used: set[str] = set()
        for n, raw in enumerate(args.inputs):
            path = Path(raw)
            folder = Path(tmp) / f"{n:04d}"
            try:
                meta = study.unpack_study_upload(_upload_from_path(path), folder, series_uid=args.series_uid,
                                                 deidentify=True)
            except study.StudyError as exc:
                raise CLIError(f"{path}: {exc}") from None
            studies.append((path, _unique_name(_stem(path), used), folder, meta))
        _check_weights(args)
        seg = make_segmenter(args)
        rows = []
        # 2. one study at a time (memory): analyse with a progress bar, then write its files
        for path, name, folder, meta in studies:
            try:
                vol = study.load_study(folder)
            except study.StudyError as exc:
                raise CLIError(f"{path}: {exc}") from None
            with tqdm(total=vol.n_slices, desc=f"analyse {name}", unit="slice", file=sys.stderr) as bar:
                analysis = study.analyse_study(vol, seg, batch_size=args.batch_size,
                                               progress=lambda done, total: bar.update(done - bar.n))
            dest = out / name
            total = study.n_outputs(vol, overlays=not args.no_overlays)
            with tqdm(total=total, desc=f"write {name}", unit="file", file=sys.stderr) as bar:
                for fname, data, _ctype in study.study_outputs(vol, analysis, overlays=not args.no_overlays):
                    _write_bytes(dest / fname, data)
                    bar.update(1)
            r = analysis.report
            rows.append((name, meta, r))
    print(f"{'study':28s} {'slices':>6s} {'lesion mL':>10s} {'lung mL':>9s} {'involved':>9s} {'CT':>3s}")
    for name, meta, r in rows:
        ct = "n/a" if r["ct_score"] is None else str(r["ct_score"])
        print(f"{name[:28]:28s} {r['n_slices']:6d} {r['lesion_volume_ml']:10.1f} {r['lung_volume_ml']:9.1f} "
              f"{_fmt(r['percent_involved'], ' %'):>9s} {ct:>3s}")
    print(f"backend {seg.backend}; outputs in {out}/<study>/ (report.json, mask.nii.gz, lung_mask.nii.gz, "
          "summary.png, overlays/)")
    return 0


def register(subparsers) -> None:
    from cli.model import _add_model_options

    p = subparsers.add_parser(
        "study", help="whole CT studies: lesion and lung volume, percent involved, CT score, NIfTI masks",
        description="Analyse whole CT studies. Each INPUT is one study: a DICOM series folder, a .zip of a DICOM "
        "series, a DICOM file or a .nii/.nii.gz volume. Writes OUT/<name>/report.json (lesion and lung volume in "
        "mL, percent of lung involved, CT score 0-4, per-side split, key slices), mask.nii.gz and "
        "lung_mask.nii.gz (the input's grid and affine), summary.png and overlays/NNNN.png.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM folder, .zip, DICOM file or NIfTI file")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per study)")
    p.add_argument("--series-uid", default=None,
                   help="SeriesInstanceUID to analyse when an input holds several series (default: the largest)")
    p.add_argument("--no-overlays", action="store_true", help="skip the per-slice overlays/NNNN.png")
    _add_model_options(p)
    p.set_defaults(func=cmd_study)
