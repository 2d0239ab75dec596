"""Score one set of weights at several serving scales on a held-out split: the 448 canvas as served, the
canvas enlarged before the model (`training.cv.ZOOM_PROBES`, the map shrunk back) and multi-scale means.

    python -m training.scale_probe --covid-root ../shared/data/covid19-ct-seg-256 \\
        --medseg-root ../shared/data/medseg-100-train --json docs/scale_probe.json

Default weights: the shipped ones; default split: the hold-out they never trained on (`training.data.split`
with fold None). fp32, threshold 0.5, Dice at each mask's own size, framed as the weights' metadata says: the
protocol of `covidseg evaluate` and of the CV fold metrics. The adoption rule for the shipped weights was fixed
before the first run (docs/MODEL.md, "Serving-scale probe").
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared.core import model as model_lib
from shared.core.preprocessing import INPUT_SIZE
from training.train import _fold_arg

#: what is scored: a name and the canvases whose maps are averaged (one canvas: a single-scale probe)
DEFAULT_PROBES = {"448": (INPUT_SIZE,), "512": (512,), "576": (576,), "448+512": (INPUT_SIZE, 512)}


def parse_probe(text: str) -> tuple[str, tuple[int, ...]]:
    """'512' -> ('512', (512,)); '448+512' -> ('448+512', (448, 512)). Canvases must be 448 or a ZOOM_PROBE."""
    from training.cv import ZOOM_PROBES

    try:
        canvases = tuple(int(c) for c in text.split("+"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a probe is canvases joined by '+', e.g. 448+512, not {text!r}") from None
    allowed = (INPUT_SIZE, *ZOOM_PROBES)
    if not canvases or any(c not in allowed for c in canvases):
        raise argparse.ArgumentTypeError(f"canvases must be among {allowed}, not {text!r}")
    return text, canvases


def probe(weights, covid_root, medseg_root, probes: dict[str, tuple[int, ...]], fold=None, batch_size=8) -> dict:
    """{"weights", "fold", "framing", "probes": {name: {"canvases", "covid": metrics, "medseg": metrics}}}, the
    metrics those of `training.publish.evaluate_samples`."""
    from training import data
    from training.cv import multiscale
    from training.publish import evaluate_samples

    _, val_c, val_m = data.split(covid_root, medseg_root, fold=fold)
    if not val_c and not val_m:
        raise ValueError(f"split {fold!r} holds nothing out")
    model = model_lib.build_unet()
    model_lib.load_weights(model, weights)
    ours = model_lib.read_weights(weights)
    framing = (ours[1] if ours else {}).get("framing", "full")

    def predict(x):
        return model.predict_on_batch(x)[..., 0]

    out = {"weights": str(weights), "fold": fold, "framing": framing, "probes": {}}
    for name, canvases in probes.items():
        run = multiscale(predict, canvases)
        out["probes"][name] = {"canvases": list(canvases), **{
            domain: evaluate_samples(run, samples, batch_size, desc=f"{name} {domain}", framing=framing)
            for domain, samples in (("covid", val_c), ("medseg", val_m)) if samples}}
    return out


def table(result: dict) -> str:
    """Markdown: one row per probe, mean Dice (and its change against the first probe) per set, sensitivity, and
    the covid mean Dice per infection-size bin."""
    probes = result["probes"]
    first = next(iter(probes.values()))
    bins = sorted(first.get("covid", {}).get("per_infection_size", {}))
    head = ["probe", "covid mean Dice", "Δ", "covid sensitivity", "MedSeg mean Dice", "Δ", "MedSeg sensitivity",
            *[f"covid {b}" for b in bins]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in probes.items():
        cells = [name]
        for domain in ("covid", "medseg"):
            m = r.get(domain)
            if not m:
                cells += ["–", "–", "–"]
                continue
            cells += [f"{m['mean_dice']:.4f}", f"{m['mean_dice'] - first[domain]['mean_dice']:+.4f}",
                      f"{m['sensitivity']:.3f}"]
        sizes = r.get("covid", {}).get("per_infection_size", {})
        cells += [f"{sizes[b]['mean_dice']:.3f} ({sizes[b]['n_images']})" if b in sizes else "–" for b in bins]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.scale_probe", description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=str(model_lib.DEFAULT_WEIGHTS), help="default: the shipped weights")
    p.add_argument("--covid-root", required=True, help="covid19-ct-seg-256 folder")
    p.add_argument("--medseg-root", required=True, help="medseg-100-train folder")
    p.add_argument("--fold", type=_fold_arg, default=None, help="CV fold K of training/folds.json to score on (default: the "
                   "fixed hold-out of training.data.split, the one the shipped weights never trained on)")
    p.add_argument("--probe", action="append", type=parse_probe, metavar="CANVASES",
                   help="a probe, canvases joined by '+' (e.g. 512 or 448+512); repeatable. Default: "
                   + ", ".join(DEFAULT_PROBES))
    p.add_argument("--json", help="write the metrics of every probe here")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args(argv)
    if not Path(args.weights).is_file():
        print(f"error: no weights file {args.weights}", file=sys.stderr)
        return 2
    probes = dict(args.probe) if args.probe else DEFAULT_PROBES
    try:
        result = probe(args.weights, args.covid_root, args.medseg_root, probes, fold=args.fold)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = table(result)
    print(text, end="")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
