"""Model commands: convert, train, evaluate, predict, bench (the U-Net on slices and volumes).

Inputs are validated (files exist, decode, sizes match, weights file looks right) before TensorFlow is loaded,
so bad input fails in about a second with `error: ...` and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from cli import CLIError, int_at_least

#: file name endings treated as 2-D images in folders (evaluate, predict, convert output)
FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")


# --------------------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------------------
def _add_model_options(p: argparse.ArgumentParser, batch: bool = True) -> None:
    from shared.core.inference import BACKENDS

    p.add_argument("--weights", help="weights file (default: the shipped weights/covidseg-unet-resnet34.h5); "
                   "a predecessor's Keras .hdf5 works with --preprocessing seed")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="inference backend (default auto: int8 on CPU when its Dice matches fp32, fp32 on GPU)")
    p.add_argument("--preprocessing", choices=("covidseg", "seed"), default="covidseg",
                   help="covidseg (our weights) or seed (predecessor weights: raw 0..255, INTER_AREA)")
    if batch:
        p.add_argument("--batch-size", type=_positive_int, default=8, help="slices per model call (default 8)")


_positive_int = int_at_least(1, "a positive integer")
_nonneg_int = int_at_least(0, "an integer >= 0")


def _threshold(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"threshold must be in (0, 1), got {text!r}")
    return v


def make_segmenter(args):
    """The Segmenter for these options (one per process and option set)."""
    from shared.core.inference import get_segmenter

    weights = str(Path(args.weights).expanduser()) if getattr(args, "weights", None) else None
    return get_segmenter(weights, args.backend, args.preprocessing)


def _check_weights(args) -> None:
    """Fail fast (before TensorFlow loads) on a missing or non-weights file."""
    from shared.core.inference import inspect_weights
    from shared.core.model import DEFAULT_WEIGHTS

    inspect_weights(Path(args.weights).expanduser() if args.weights else DEFAULT_WEIGHTS)


def _image_files(folder, option: str) -> dict[str, Path]:
    """stem -> path of the images in `folder`; CLIError when missing/empty/ambiguous."""
    path = Path(folder)
    if not path.exists():
        raise CLIError(f"{option} {folder}: no such folder")
    if not path.is_dir():
        raise CLIError(f"{option} {folder}: not a folder")
    out: dict[str, Path] = {}
    for p in sorted(path.iterdir()):
        if p.is_file() and p.suffix.lower() in FOLDER_IMAGE_SUFFIXES and not p.name.startswith("."):
            if p.stem in out:
                raise CLIError(f"{option} {folder}: two files with the stem {p.stem!r} "
                               f"({out[p.stem].name}, {p.name}); pairing by stem would be ambiguous")
            out[p.stem] = p
    if not out:
        raise CLIError(f"{option} {folder}: empty folder (no PNG/JPEG/TIFF/BMP/DICOM images)")
    return out


def _dims(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header (falls back to decoding for BMP)."""
    from shared.core.imageio import ImageDecodeError, image_dimensions, read_image

    data = path.read_bytes()
    if not data:
        raise ImageDecodeError(f"{path}: empty file")
    if data[:2] == b"BM":
        h, w = read_image(path).shape[:2]
        return w, h
    try:
        return image_dimensions(data)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{path}: {exc}") from None


def _unique_name(name: str, used: set[str]) -> str:
    base, n = name, 2
    while name in used:
        name = f"{base}_{n}"
        n += 1
    used.add(name)
    return name


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem if path.is_file() else name


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _fmt(v, digits=4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


# --------------------------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------------------------
def cmd_predict(args) -> int:
    from tqdm import tqdm

    from shared.core import imageio
    from shared.core.render import infected_fraction, mask_png, overlay_png, probability_png

    window = imageio.parse_window(args.window)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a folder")
    # 1. validate every input before the model loads
    images: list[tuple[Path, np.ndarray]] = []
    volumes: list[Path] = []
    for raw in args.inputs:
        path = Path(raw)
        kind = imageio.input_kind(path)
        if kind == "image":
            images.append((path, imageio.read_image(path, window=window)))
        elif kind == "image-folder":
            for p in sorted(path.iterdir()):
                if p.is_file() and p.suffix.lower() in imageio.IMAGE_SUFFIXES:
                    images.append((p, imageio.read_image(p, window=window)))
        else:
            if path.is_file() and imageio.is_nifti_path(path):
                imageio.read_nifti_header(path)
            volumes.append(path)
    _check_weights(args)
    seg = make_segmenter(args)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    results = []
    thr = args.threshold

    def write_slice(folder: Path, gray, prob) -> dict:
        _write_bytes(folder / "mask.png", mask_png(prob, thr))
        _write_bytes(folder / "probability.png", probability_png(prob))
        _write_bytes(folder / "overlay.png", overlay_png(gray, prob, thr))
        return {"mask": str(folder / "mask.png"), "probability": str(folder / "probability.png"),
                "overlay": str(folder / "overlay.png")}

    # 2. 2-D images, batched across files
    chunk = max(args.batch_size, 32)
    bar = tqdm(total=len(images), desc="predict", unit="slice", file=sys.stderr, disable=len(images) < 2)
    for i in range(0, len(images), chunk):
        part = images[i:i + chunk]
        probs = seg.predict([im for _, im in part], batch_size=args.batch_size)
        for (path, gray), prob in zip(part, probs):
            name = _unique_name(path.stem, used)
            files = write_slice(out / name, gray, prob)
            frac = infected_fraction(prob, thr)
            results.append({"name": name, "input": str(path), "kind": "image", "width": int(gray.shape[1]),
                            "height": int(gray.shape[0]), "infected_fraction": frac,
                            "infected_pixels": int(np.count_nonzero(prob >= thr)), "outputs": files})
        bar.update(len(part))
    bar.close()

    # 3. volumes: one at a time (memory), NIfTI mask on the input's own grid and affine
    for path in volumes:
        vol = imageio.read_volume(path)
        name = _unique_name(_stem(path), used)
        grays = vol.slice_images(window)
        probs = seg.predict_volume(vol, batch_size=args.batch_size, progress=True, images=grays)
        mask = (probs >= thr).astype(np.uint8)
        nifti_path = out / name / "mask.nii.gz"
        nifti_path.parent.mkdir(parents=True, exist_ok=True)
        import nibabel as nib

        nib.save(vol.mask_to_nifti(mask), str(nifti_path))
        seg_path, seg_error = None, None
        if vol.source_datasets and not args.no_dicom_seg:
            seg_path, seg_error = _write_dicom_seg(out / name, vol, mask, seg)
        slices = []
        for k in tqdm(range(vol.n_slices), desc=f"write {name}", unit="slice", file=sys.stderr,
                      disable=args.no_slice_images or vol.n_slices < 2):
            entry = {"index": k, "infected_fraction": float(mask[k].mean()),
                     "infected_pixels": int(mask[k].sum())}
            if not args.no_slice_images:
                entry["outputs"] = write_slice(out / name / f"slice_{k:04d}", grays[k], probs[k])
            slices.append(entry)
        voxel_ml = float(np.prod(vol.spacing)) / 1000.0
        results.append({"name": name, "input": str(path), "kind": "volume", "format": vol.kind,
                        "shape": [int(v) for v in (vol.source_shape or vol.slices.shape[::-1])],
                        "n_slices": vol.n_slices, "spacing_mm": [round(v, 6) for v in vol.spacing],
                        "orientation": vol.orientation, "infected_fraction": float(mask.mean()),
                        "infected_voxels": int(mask.sum()), "infected_volume_ml": int(mask.sum()) * voxel_ml,
                        "mask_nifti": str(nifti_path), "mask_dicom_seg": seg_path,
                        **({"dicom_seg_error": seg_error} if seg_error else {}), "slices": slices})
    summary = {"backend": seg.backend, "preprocessing": seg.preprocessing, "threshold": thr,
               "weights": str(seg.weights) if seg.weights else None, "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    # 4. table
    print(f"{'name':30s} {'kind':7s} {'size':>15s} {'infected':>9s}")
    for r in results:
        size = f"{r['width']}x{r['height']}" if r["kind"] == "image" else "x".join(map(str, r["shape"]))
        print(f"{r['name'][:30]:30s} {r['kind']:7s} {size:>15s} {100 * r['infected_fraction']:8.2f}%")
    print(f"backend {seg.backend}; outputs in {out}/ (results.json)")
    return 0


def _write_dicom_seg(folder: Path, vol, mask, seg) -> tuple[str | None, str | None]:
    """Write the infection mask as a DICOM SEG on the input series: (path, None), or (None, why) and a warning."""
    from shared.core import dicom_seg

    data, why = dicom_seg.dicom_seg_or_reason(vol, [(dicom_seg.INFECTION, mask)], weights=seg.weights,
                                              digest=seg.digest, backend=seg.backend)
    if data is None:
        print(f"warning: {vol.source}: DICOM SEG not written ({why})", file=sys.stderr)
        return None, why
    _write_bytes(folder / dicom_seg.FILE_NAME, data)
    return str(folder / dicom_seg.FILE_NAME), None


def _register_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment slices / volumes: mask, probability and overlay PNGs",
                       description="Segment CT slices (PNG/JPEG/TIFF/DICOM files or folders of them) and volumes "
                       "(NIfTI files, DICOM series folders). Per slice: mask.png, probability.png, overlay.png; "
                       "per volume also mask.nii.gz with the input's affine (and mask.seg.dcm, a DICOM SEG, for "
                       "a DICOM series); results.json with infected fractions.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, image folder, NIfTI file or DICOM folder")
    p.add_argument("--out", required=True, help="output folder")
    _add_model_options(p)
    p.add_argument("--threshold", type=_threshold, default=0.5, help="mask threshold (default 0.5)")
    p.add_argument("--window", default="lung",
                   help="HU window for DICOM/NIfTI: lung (-600,1500), LEVEL,WIDTH, or none (min-max)")
    p.add_argument("--no-slice-images", action="store_true",
                   help="volumes: write only mask.nii.gz and results.json, no per-slice PNGs")
    p.add_argument("--no-dicom-seg", action="store_true",
                   help="DICOM series: do not write mask.seg.dcm (the mask as a DICOM SEG for PACS viewers)")
    p.set_defaults(func=cmd_predict)


# --------------------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------------------
def _read_probability(path: Path) -> np.ndarray:
    """Probability/mask image -> float32 in [0, 1] (uint8 /255, uint16 /65535, float as is)."""
    from shared.core.imageio import read_image

    img = read_image(path, window=None)
    if img.dtype == np.uint8:
        return img.astype(np.float32) / np.float32(255.0)
    if img.dtype == np.uint16:
        return img.astype(np.float32) / np.float32(65535.0)
    return np.clip(img.astype(np.float32), 0.0, 1.0)


def _read_groups(path, stems: list[str]) -> dict[str, str]:
    """stem -> group from a CSV with a `group` column and a `file` (or `stem`/`name`/`image`) column, e.g. the
    manifest.csv that `python -m training.validation_sets` writes."""
    import csv

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--groups {path}: no such file")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = [(c or "").strip().lower() for c in reader.fieldnames or []]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CLIError(f"--groups {path}: not a readable CSV ({exc})") from None
    key = next((c for c in ("file", "stem", "name", "image") if c in fields), None)
    if "group" not in fields or key is None:
        raise CLIError(f"--groups {path}: needs a 'group' column and a 'file' (or stem/name/image) column; "
                       f"found {', '.join(fields) or 'no header'}")
    groups = {}
    for row in rows:
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if row.get(key):
            groups[Path(row[key]).stem] = row.get("group") or "ungrouped"
    missing = [s for s in stems if s not in groups]
    if missing:
        print(f"warning: {len(missing)} image(s) not in {path} are counted as 'ungrouped' (e.g. {missing[0]})",
              file=sys.stderr)
    return groups


def cmd_evaluate(args) -> int:
    import cv2
    from tqdm import tqdm

    from shared.core.imageio import read_image
    from shared.core.metrics import SUMMARY_KEYS, aggregate, aggregate_groups, image_scores, infection_size_groups
    from shared.core.render import probability_u8

    masks = _image_files(args.masks, "--masks")
    preds = _image_files(args.predictions, "--predictions") if args.predictions else None
    images = _image_files(args.images, "--images") if args.images else {}
    if preds is None and not images:
        raise CLIError("--images is required (or give --predictions to score existing prediction PNGs)")
    source = preds if preds is not None else images
    stems = sorted(set(source) & set(masks))
    what = "prediction" if preds is not None else "image"
    if not stems:
        raise CLIError(f"no {what}/mask pairs: no file stem is in both {args.predictions or args.images} "
                       f"and {args.masks}")
    unpaired = sorted(set(source) ^ set(masks))
    if unpaired:
        print(f"warning: {len(unpaired)} file(s) without a partner are skipped (e.g. {unpaired[0]})",
              file=sys.stderr)
    # validate sizes from headers before any model work
    sizes = {}
    for s in stems:
        mw, mh = _dims(masks[s])
        if s in images:
            iw, ih = _dims(images[s])
            if (iw, ih) != (mw, mh):
                raise CLIError(f"{s}: image {images[s].name} is {iw}x{ih} but mask {masks[s].name} is {mw}x{mh}")
        if preds is not None:
            _dims(preds[s])
        sizes[s] = (mw, mh)
    groups = _read_groups(args.groups, stems) if args.groups else None
    seg = None
    if preds is None:
        _check_weights(args)
        seg = make_segmenter(args)
    save_dir = Path(args.save_predictions) if args.save_predictions else None
    thr = args.threshold
    per_image = []
    keep = {}  # name -> (image, mask, prob) for the report, small images only
    bs = args.batch_size
    bar = tqdm(total=len(stems), desc="evaluate", unit="slice", file=sys.stderr, disable=len(stems) < 2)
    for i in range(0, len(stems), bs):
        part = stems[i:i + bs]
        gt = [read_image(masks[s], window=None) > 0 for s in part]
        imgs = [read_image(images[s]) if s in images else None for s in part]
        if seg is not None:
            probs = seg.predict(imgs, batch_size=bs)
        else:
            probs = [_read_probability(preds[s]) for s in part]
        for s, m, img, p in zip(part, gt, imgs, probs):
            if p.shape != m.shape:
                p = cv2.resize(p, (m.shape[1], m.shape[0]), interpolation=cv2.INTER_LINEAR)
            rec = image_scores(s, p >= thr, m)
            per_image.append(rec)
            if save_dir is not None:
                save_dir.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(save_dir / f"{s}.png"), probability_u8(p))
            if args.report:
                keep[s] = (img, m, p)
        bar.update(len(part))
    bar.close()
    agg = aggregate(per_image)
    result = {k: agg[k] for k in SUMMARY_KEYS}
    result["per_image"] = per_image
    if groups is not None:
        result["per_group"] = aggregate_groups(per_image, groups)
    result["per_infection_size"] = aggregate_groups(per_image, infection_size_groups(per_image))
    if args.json:
        jp = Path(args.json)
        jp.parent.mkdir(parents=True, exist_ok=True)
        jp.write_text(json.dumps(result, indent=1))
    for k in SUMMARY_KEYS:
        v = result[k]
        print(f"{k:12s} {v if isinstance(v, int) else _fmt(v)}")
    if groups is not None:
        print(_group_table(result["per_group"]))
    print(_group_table(result["per_infection_size"], SIZE_COLUMN))
    if args.report:
        info = {"source": f"predictions {args.predictions}" if preds is not None else f"images {args.images}",
                "masks": str(args.masks), "threshold": thr,
                "backend": seg.backend if seg else "n/a (--predictions)",
                "weights": str(seg.weights) if seg and seg.weights else ("n/a" if not seg else "model"),
                "preprocessing": seg.preprocessing if seg else "n/a"}
        write_report(Path(args.report), result, agg, keep, info, thr)
        print(f"report: {Path(args.report) / 'report.md'}")
    return 0


#: the first column of the table by infection size (shared.core.metrics.infection_size_groups)
SIZE_COLUMN = "infected share of the slice"


def _group_table(per_group: dict, title: str = "group") -> str:
    """Markdown table of `aggregate_groups` output."""
    lines = [f"| {title} | images | mean Dice | global Dice | mean IoU | sensitivity | specificity |",
             "|---|---|---|---|---|---|---|"]
    for g, r in per_group.items():
        lines.append(f"| {g} | {r['n_images']} | {_fmt(r['mean_dice'])} | {_fmt(r['global_dice'])} | "
                     f"{_fmt(r['mean_iou'])} | {_fmt(r['sensitivity'])} | {_fmt(r['specificity'])} |")
    return "\n".join(lines)


def write_report(folder: Path, result: dict, agg: dict, keep: dict, info: dict, thr: float, k: int = 4) -> None:
    """report.md (summary, settings, per-image table) + cases.png (best and worst cases by Dice)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared.core.metrics import SUMMARY_KEYS
    from shared.core.render import overlay_image

    folder.mkdir(parents=True, exist_ok=True)
    ranked = sorted(result["per_image"], key=lambda r: (r["dice"], r["name"]))
    k = max(1, min(k, (len(ranked) + 1) // 2))
    worst, best = ranked[:k], ranked[::-1][:k]
    cases = [("best", r) for r in best] + [("worst", r) for r in worst if r not in best]
    fig, axes = plt.subplots(len(cases), 3, figsize=(9, 3 * len(cases)), squeeze=False)
    for row, (label, r) in zip(axes, cases):
        img, m, p = keep[r["name"]]
        base = img if img is not None else (m * 255).astype(np.uint8)
        row[0].imshow(base, cmap="gray")
        row[0].set_title(f"{label}: {r['name']}", fontsize=9)
        row[1].imshow(overlay_image(base, m.astype(np.float32), outline=False)[..., ::-1])
        row[1].set_title("ground truth", fontsize=9)
        row[2].imshow(overlay_image(base, p, thr)[..., ::-1])
        row[2].set_title(f"prediction (Dice {r['dice']:.3f})", fontsize=9)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(folder / "cases.png", dpi=80)
    plt.close(fig)
    lines = ["# covidseg evaluation", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k_} | {v} |" for k_, v in info.items()]
    lines += ["", "| metric | value |", "|---|---|"]
    for key in SUMMARY_KEYS:
        v = result[key]
        lines.append(f"| {key} | {v if isinstance(v, int) else _fmt(v)} |")
    lines += ["", f"Pixel counts: TP {agg['tp']}, FP {agg['fp']}, FN {agg['fn']}, TN {agg['tn']}. "
              f"Threshold {thr}; mean = per-image average, global = from summed pixel counts.", "",
              f"![best and worst cases](cases.png)", ""]
    if "per_group" in result:
        lines += ["## Per group", "", _group_table(result["per_group"]), ""]
    if "per_infection_size" in result:
        lines += ["## By infection size", "", _group_table(result["per_infection_size"], SIZE_COLUMN), ""]
    lines += ["## Per image (worst first)", "",
              "| image | Dice | IoU | sensitivity | specificity | GT pixels | predicted pixels |",
              "|---|---|---|---|---|---|---|"]
    for r in ranked:
        lines.append(f"| {r['name']} | {r['dice']:.4f} | {r['iou']:.4f} | {_fmt(r['sensitivity'])} | "
                     f"{_fmt(r['specificity'])} | {r['tp'] + r['fn']} | {r['tp'] + r['fp']} |")
    (folder / "report.md").write_text("\n".join(lines) + "\n")


def _register_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice/IoU/sensitivity/specificity against ground-truth masks",
                       description="Pair images and masks by file stem (any image extension), predict (or read "
                       "--predictions), resize each prediction to its mask's size, threshold, and score. "
                       "Mask pixel > 0 is positive.")
    p.add_argument("--images", help="folder of CT slices")
    p.add_argument("--masks", required=True, help="folder of ground-truth masks (pixel > 0 = infection)")
    p.add_argument("--predictions", help="score these probability/mask PNGs (value/255) instead of running the "
                   "model")
    p.add_argument("--json", help="write the metrics (and the per-image list) to this JSON file")
    p.add_argument("--report", help="folder for report.md and cases.png (best and worst cases)")
    p.add_argument("--save-predictions", help="folder to write the model's probability PNGs into")
    p.add_argument("--groups", help="CSV with 'file' and 'group' columns (e.g. a patient per group, as in the "
                   "manifest.csv of training.validation_sets): adds per-group metrics to the output, JSON "
                   "(per_group) and report")
    p.add_argument("--threshold", type=_threshold, default=0.5, help="default 0.5 (prob >= threshold)")
    _add_model_options(p)
    p.set_defaults(func=cmd_evaluate)


# --------------------------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------------------------
def _parse_range(text: str | None) -> slice:
    if not text:
        return slice(None)
    try:
        a, b = text.split(":")
        return slice(int(a) if a.strip() else None, int(b) if b.strip() else None)
    except ValueError:
        raise CLIError(f"--range {text!r}: expected START:STOP slice indices such as 10:80 (0-based, STOP "
                       "excluded)") from None


def cmd_convert(args) -> int:
    import cv2
    from tqdm import tqdm

    from shared.core import imageio
    from shared.core.preprocessing import resize_to_input

    window = imageio.parse_window(args.window)
    if args.masks and len(args.masks) != len(args.volumes):
        raise CLIError(f"{len(args.volumes)} volume(s) but {len(args.masks)} mask volume(s): give one mask per "
                       "volume, in the same order")
    if args.only_with_mask and not args.masks:
        raise CLIError("--only-with-mask needs --masks")
    sel = _parse_range(args.range)
    for p in list(args.volumes) + list(args.masks or []):
        path = Path(p)
        if not path.exists():
            raise CLIError(f"{p}: no such file or folder")
        if imageio.input_kind(path) != "volume":
            raise CLIError(f"{p}: not a volume (expected a NIfTI file or a DICOM series folder)")
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if args.masks:
        (out / "masks").mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    rows = []
    for vi, vpath in enumerate(args.volumes):
        vol = imageio.read_volume(vpath)
        mvol = None
        if args.masks:
            mvol = imageio.read_volume(args.masks[vi], hu=False)
            if mvol.slices.shape != vol.slices.shape:
                raise CLIError(f"mask volume {args.masks[vi]} has shape {mvol.slices.shape[::-1]} but volume "
                               f"{vpath} has {vol.slices.shape[::-1]} (same grid expected)")
            if not np.allclose(mvol.affine, vol.affine, atol=1e-3):
                print(f"warning: {args.masks[vi]} and {vpath} have different affines; pairing voxels by index",
                      file=sys.stderr)
        # volume names without "_" so `covidseg train --images` groups slices by volume (prefix before "_")
        name = _unique_name(_stem(Path(vpath)).replace("_", "-").replace(" ", "-"), used)
        idx = list(range(vol.n_slices))[sel][::args.every]
        if mvol is not None and args.only_with_mask:
            idx = [k for k in idx if np.any(mvol.slices[k] > 0)]
        for k in tqdm(idx, desc=f"convert {name}", unit="slice", file=sys.stderr, disable=len(idx) < 2):
            img = _slice_u8(vol, k, window)
            m = (mvol.slices[k] > 0).astype(np.uint8) * 255 if mvol is not None else None
            if args.size:
                img = resize_to_input(img, args.size)
                if m is not None:
                    m = cv2.resize(m, (args.size, args.size), interpolation=cv2.INTER_NEAREST)
            fname = f"{name}_{k:04d}.png"
            imageio.write_png(out / "images" / fname, img)
            if m is not None:
                imageio.write_png(out / "masks" / fname, m)
            rows.append((fname, str(vpath), k, int(np.count_nonzero(m)) if m is not None else ""))
    with open(out / "slices.csv", "w") as f:
        f.write("file,volume,slice_index,mask_pixels\n")
        for r in rows:
            f.write(",".join(str(v) for v in r) + "\n")
    n_pos = sum(1 for r in rows if r[3] not in ("", 0))
    print(f"wrote {len(rows)} slice(s) from {len(args.volumes)} volume(s) to {out}/images"
          + (f" and masks to {out}/masks ({n_pos} with infection)" if args.masks else "")
          + f"; index in {out}/slices.csv")
    if not rows:
        print("warning: no slice selected (check --range / --every / --only-with-mask)", file=sys.stderr)
    return 0


def _slice_u8(vol, k: int, window) -> np.ndarray:
    from shared.core.imageio import window_to_uint8
    from shared.core.preprocessing import minmax_uint8

    s = vol.slices[k]
    return window_to_uint8(s, *window) if (vol.is_hu and window is not None) else minmax_uint8(s)


def _register_convert(sub) -> None:
    p = sub.add_parser("convert", help="volumes (NIfTI / DICOM series) -> 2-D slice PNGs (+ mask PNGs) for training",
                       description="Write axial slices of CT volumes as 8-bit PNGs in OUT/images (and the "
                       "matching slices of mask volumes, {0,255}, in OUT/masks) with the same file names, the "
                       "layout `covidseg train --images OUT/images --masks OUT/masks` and `covidseg evaluate` read.")
    p.add_argument("volumes", nargs="+", metavar="VOLUME", help="NIfTI file or DICOM series folder")
    p.add_argument("--masks", nargs="+", metavar="MASK", help="mask volumes, one per VOLUME in the same order "
                   "(voxel > 0 = infection)")
    p.add_argument("--out", required=True, help="output folder (images/, masks/, slices.csv)")
    p.add_argument("--window", default="lung", help="HU window: lung (-600,1500, default), LEVEL,WIDTH, or none "
                   "(per-slice min-max)")
    p.add_argument("--only-with-mask", action="store_true", help="keep only slices whose mask is not empty")
    p.add_argument("--every", type=_positive_int, default=1, help="keep every Nth slice (default 1)")
    p.add_argument("--range", help="slice index range START:STOP (0-based from the inferior end, STOP excluded)")
    p.add_argument("--size", type=_nonneg_int, default=0, help="resize slices to SIZE x SIZE (0 = keep, default)")
    p.set_defaults(func=cmd_convert)


# --------------------------------------------------------------------------------------------------------------
# train (training.train mounted as a sub-command)
# --------------------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from training import train as train_lib

    for opt in ("covid_root", "medseg_root", "images", "masks", "init_weights"):
        v = getattr(args, opt, None)
        if v and not Path(v).exists():
            raise CLIError(f"--{opt.replace('_', '-')} {v}: no such file or folder")
    if bool(args.images) != bool(args.masks):
        raise CLIError("--images and --masks go together")
    if not (args.images or args.covid_root or args.medseg_root) and not (Path(args.run_dir) / "state.json").exists():
        raise CLIError("no training data: give --covid-root/--medseg-root or --images/--masks")
    if args.init_weights:
        from shared.core.inference import inspect_weights

        inspect_weights(args.init_weights)
    return train_lib.run(args)


def _register_train(sub) -> None:
    from training import train as train_lib

    p = sub.add_parser("train", help="train the U-Net (checkpoints, resume, log, learning curves)",
                       description=(train_lib.__doc__ or "").split("\n")[0])
    train_lib.add_arguments(p)
    p.set_defaults(func=cmd_train)


# --------------------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------------------
def _register_bench(sub) -> None:
    from cli import bench

    p = sub.add_parser("bench", help="latency/throughput per backend vs the predecessor's per-request path",
                       description=(bench.__doc__ or "").split("\n")[0])
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)


def register(subparsers) -> None:
    _register_convert(subparsers)
    _register_train(subparsers)
    _register_evaluate(subparsers)
    _register_predict(subparsers)
    _register_bench(subparsers)
