"""Write the held-out validation sets as plain image/mask folders that `covidseg evaluate` reads.

    python -m training.validation_sets --covid-root D --medseg-root M --out V
    covidseg evaluate --images V/covid/images --masks V/covid/masks --json covid.json
    covidseg evaluate --images V/medseg/images --masks V/medseg/masks --json medseg.json

V/covid/{images,masks}: the slices of the held-out patient groups of `training.data.split` (covid19-ct-seg-256);
V/medseg/{images,masks}: the 15 held-out MedSeg images. Files are copied unchanged (same names), plus a
manifest.csv per set (file, group). Either root may be omitted.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from training import data


def write_sets(covid_root=None, medseg_root=None, out="val") -> dict[str, int]:
    _, val_c, val_m = data.split(covid_root, medseg_root)
    out = Path(out)
    counts = {}
    for name, samples, root in (("covid", val_c, covid_root), ("medseg", val_m, medseg_root)):
        if not root:
            continue
        img_dir, mask_dir = out / name / "images", out / name / "masks"
        img_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        rows = ["file,mask,group"]
        for s in samples:
            if not s.image.is_file() or not s.mask.is_file():
                raise FileNotFoundError(f"missing image or mask for {s.image.name} in {root}")
            shutil.copy2(s.image, img_dir / s.image.name)
            shutil.copy2(s.mask, mask_dir / s.mask.name)
            rows.append(f"{s.image.name},{s.mask.name},{s.group}")
        (out / name / "manifest.csv").write_text("\n".join(rows) + "\n")
        counts[name] = len(samples)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.validation_sets", description=__doc__.split("\n")[0])
    p.add_argument("--covid-root", help="covid19-ct-seg-256 folder (images/, masks/, slice_to_volume.csv)")
    p.add_argument("--medseg-root", help="medseg-100-train folder (images/, masks/)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    if not args.covid_root and not args.medseg_root:
        print("error: give --covid-root and/or --medseg-root", file=sys.stderr)
        return 2
    for opt, root, need in (("--covid-root", args.covid_root, "slice_to_volume.csv"),
                            ("--medseg-root", args.medseg_root, "images")):
        if root and not (Path(root) / need).exists():
            print(f"error: {opt} {root}: no {need} in this folder", file=sys.stderr)
            return 2
    try:
        counts = write_sets(args.covid_root, args.medseg_root, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, n in counts.items():
        print(f"{name}: {n} held-out slices -> {Path(args.out) / name}/{{images,masks}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
