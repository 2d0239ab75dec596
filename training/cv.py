"""Patient-group cross-validation of a training recipe: train each fold, evaluate it, tabulate.

    python -m training.cv train    --recipe light16 --fold 0 --covid-root D --medseg-root M --run-root runs/cv
    python -m training.cv evaluate --recipe light16 --covid-root D --medseg-root M --run-root runs/cv
    python -m training.cv table    --run-root docs/cv --out docs/cv/results.md --plot docs/cv/curves.png
    python -m training.cv status   --run-root runs/cv          # epochs done, s/epoch, time left per fold
    python -m training.cv plan     --recipe light16 --threads 1  # before starting: hours per fold on this machine
    python -m training.cv publish  --recipe light16 --record docs/cv --run-root runs/cv --covid-root D --medseg-root M

The folds are fixed in `training/folds.json` (committed before any CV run). A recipe is a fixed set of
`covidseg train` arguments, chosen before it is run; a fold's result is always its LAST epoch, never the epoch
with the best validation score, so a recipe's CV number is what the same schedule gives on unseen patients.
The final model of a recipe is the same schedule with `--fold all` (every slice, no validation). A recipe may
add a fine-tune stage (`"then": {...}`): a second run with those arguments changed, initialised from the first
run's last epoch; `train` runs (or resumes) both in turn.

Each fold run is resumable (`train` again continues it) and lives in RUN_ROOT/<recipe>/fold<K>/. While `train`
runs it holds that folder's train.lock: a second `train` of the fold is refused, and `status` tells a fold that
is training from one whose process is gone.
`evaluate` scores each finished fold's last.h5 on the fold's full held-out slices (fp32, threshold 0.5, Dice at
each mask's own size: the protocol of `covidseg evaluate`) into metrics.json, which names the weights it scored by
their sha256; a fold whose metrics.json already scores its current last.h5 is kept as it is (`--force` scores it
again), so `evaluate` can be re-run as folds finish. `table` collects every recipe.

Run folders (checkpoints, weights) live only as long as the machine they were trained on, so
`evaluate --record docs/cv` also copies each fold's metrics.json and log.csv (a few KB) into
RECORD/<recipe>/fold<K>/, the same layout, which is committed: folds finished in different sessions add up
there, and `table --run-root docs/cv` reads them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

#: Recipes: name -> `covidseg train` arguments (the trainer's defaults for everything not named here).
#: Add a recipe before running it; never edit one that has fold results.
RECIPES: dict[str, dict] = {
    # the shipped weights' recipe, condensed to one run: r1 used 36 epochs of the full profile, r2 then
    # fine-tuned 4 epochs with the light one; the light profile from the start is the cheaper schedule
    "light16": {"epochs": 16, "augment": "light", "lr": 1e-3, "steps_per_epoch": 150, "batch_size": 8,
                "crop": 224, "val_limit": 64},
    # light16 made longer with what AMX-BF16 buys (2.2x per step, see training/train.py), and a larger MedSeg
    # share (0.3 instead of 0.2: MedSeg is the domain the independent test set comes from). Fixed before its
    # first fold ran; the final model is the same schedule on every slice.
    "light22-bf16": {"epochs": 22, "augment": "light", "lr": 1e-3, "steps_per_epoch": 150, "batch_size": 8,
                     "crop": 224, "val_limit": 48, "medseg_fraction": 0.3, "precision": "bf16"},
    # the same with lung framing (shared.core.framing): COVID-19-CT-Seg slices cut to their lung box as MedSeg's
    # already are (1.70x zoom on average, 0.01 % of infection pixels outside the frame: docs/cv/framing.json)
    "light22-bf16-lung": {"epochs": 22, "augment": "light", "lr": 1e-3, "steps_per_epoch": 150, "batch_size": 8,
                          "crop": 224, "val_limit": 48, "medseg_fraction": 0.3, "precision": "bf16",
                          "framing": "lung"},
    # light22-bf16 run 36 epochs instead of 22 (43,200 crops, about the 48,000 the shipped weights saw): its
    # folds 0/1 were still under-fitted at the last epoch (training loss falling, train IoU 0.63 / 0.64).
    # Fixed 2026-12-04 before any fold ran.
    "light36-bf16": {"epochs": 36, "augment": "light", "lr": 1e-3, "steps_per_epoch": 150, "batch_size": 8,
                     "crop": 224, "val_limit": 48, "medseg_fraction": 0.3, "precision": "bf16"},
    # light36-bf16 with crops centred on a random connected lesion instead of a random lesion pixel
    # (training.augment.random_crop): most slices the model loses have < 500 infected pixels. Fixed 2026-12-04
    # before any fold ran, when light36-bf16's folds 0/1 were at their last epochs.
    "light36-bf16-cc": {"epochs": 36, "augment": "light", "lr": 1e-3, "steps_per_epoch": 150, "batch_size": 8,
                        "crop": 224, "val_limit": 48, "medseg_fraction": 0.3, "precision": "bf16",
                        "lesion_sampling": "component"},
    # the shipped weights' own recipe (weights/covidseg-unet-resnet34.json), cross-validated to learn whether
    # the gap between the light recipes' CV (0.644 / 0.702) and the shipped weights' held-out 0.704 / 0.731 is
    # the recipe or the held-out patients: 36 epochs with the full augmentation profile (MedSeg share 0.2),
    # then a 4-epoch fine-tune with the light profile at lr 1.5e-4 from the first stage's last epoch. bf16
    # instead of fp32 (the only change, for time). Fixed 2026-12-04 before any fold ran.
    "shipped-cv": {"epochs": 36, "augment": "full", "lr": 1e-3, "steps_per_epoch": 150, "batch_size": 8,
                   "crop": 224, "val_limit": 48, "medseg_fraction": 0.2, "precision": "bf16",
                   "then": {"epochs": 4, "augment": "light", "lr": 1.5e-4}},
}

#: A recipe's optional fine-tune stage: `covidseg train` arguments that override the recipe's for a second run
#: started from the first run's last epoch (run folder <fold>/stage1 for the first, <fold> for the second).
THEN = "then"


def fold_dir(run_root, recipe: str, fold) -> Path:
    return Path(run_root) / recipe / (f"fold{fold}" if fold != "all" else "final")


#: held (flock) by the `train` process of a fold for as long as it runs; the kernel drops it when the process ends
TRAIN_LOCK = "train.lock"


class FoldBusy(RuntimeError):
    """Another process is training this fold."""


@contextlib.contextmanager
def training_lock(run_dir: Path):
    """Hold the fold's TRAIN_LOCK while training it: a second `train` of the same fold (another shell, a session
    that resumes a run still going) would write the same checkpoints; it gets FoldBusy instead. The file holds
    the holder's pid, for messages; the lock itself is the kernel's (gone with the process, however it ends)."""
    import fcntl
    import os

    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / TRAIN_LOCK, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FoldBusy(f"{run_dir} is being trained by another process (pid {training_pid(run_dir)})") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def training_pid(run_dir: Path) -> int | None:
    """The pid of the process training this fold now, or None when none holds its TRAIN_LOCK."""
    import fcntl

    path = Path(run_dir) / TRAIN_LOCK
    if not path.is_file():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = f.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _argv(options: dict, run_dir: Path, fold, covid_root, medseg_root) -> list[str]:
    argv = ["--covid-root", str(covid_root), "--medseg-root", str(medseg_root),
            "--run-dir", str(run_dir), "--fold", str(fold)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def train_stages(recipe: str, fold, covid_root, medseg_root, run_root) -> list[list[str]]:
    """The `covidseg train` argument lists of one fold of `recipe`, in order: one run, or with a `then` stage
    a first run in <fold>/stage1 and a fine-tune in <fold> initialised from the first run's last.h5."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(sorted(RECIPES))}")
    options = {k: v for k, v in RECIPES[recipe].items() if k != THEN}
    run_dir = fold_dir(run_root, recipe, fold)
    if THEN not in RECIPES[recipe]:
        return [_argv(options, run_dir, fold, covid_root, medseg_root)]
    first = run_dir / "stage1"
    then = {**options, **RECIPES[recipe][THEN], "init_weights": first / "last.h5"}
    return [_argv(options, first, fold, covid_root, medseg_root), _argv(then, run_dir, fold, covid_root, medseg_root)]


def train_argv(recipe: str, fold, covid_root, medseg_root, run_root) -> list[str]:
    """The `covidseg train` argument list of one fold of a single-stage `recipe` (its first stage otherwise)."""
    return train_stages(recipe, fold, covid_root, medseg_root, run_root)[0]


def _finished(run_dir: Path) -> dict | None:
    """run_dir's state.json when its run has reached its last epoch, else None."""
    path = run_dir / "state.json"
    state = json.loads(path.read_text()) if path.is_file() else None
    return state if state and state["epoch"] >= state["args"]["epochs"] else None


def _stage_dirs(run_dir: Path) -> list[Path]:
    """The earlier stages' run folders of a staged fold, in order (empty for a single-stage recipe)."""
    return sorted(p for p in run_dir.glob("stage*") if (p / "state.json").is_file())


def _epochs_of(argv: list[str]) -> int:
    return int(argv[argv.index("--epochs") + 1]) if "--epochs" in argv else 0


def fold_status(recipe: str, fold, run_root, now: float | None = None) -> dict:
    """Progress of one fold run over all its stages: epochs done and planned, the last epoch's validation-subset
    Dice, seconds per epoch (median of the last 5: one epoch that shared the CPU with a test run does not skew it),
    the time left at that pace, how long ago (at `now`, default the clock) the last epoch ended, and the pid of
    the `train` process that holds the fold's TRAIN_LOCK (None: no process trains it). A run with epochs left
    and no such process has `stopped` set; for runs started before the lock existed, one whose last epoch ended
    more than twice its pace ago: its process is gone (a session's end, a crash) and `train` again resumes it. Reads
    only the stages' log.csv, so it is safe while the run trains."""
    import statistics
    import time

    stages = train_stages(recipe, fold, "-", "-", run_root)
    planned = sum(_epochs_of(a) for a in stages)
    run_dir = fold_dir(run_root, recipe, fold)
    rows = fold_log_rows(run_dir)
    recent = [float(r["seconds"]) for r in rows[-5:]]
    pace = statistics.median(recent) if recent else None
    last = rows[-1] if rows else {}
    value = lambda key: float(last[key]) if last.get(key) else None  # noqa: E731
    logs = [log for log in (d / "log.csv" for d in [*_stage_dirs(run_dir), run_dir]) if log.is_file()]
    ago = (time.time() if now is None else now) - max(log.stat().st_mtime for log in logs) if rows else None
    pid = training_pid(run_dir)
    if pid is not None:
        stopped = False
    elif (run_dir / TRAIN_LOCK).is_file():
        stopped = len(rows) < planned
    else:
        stopped = bool(pace and len(rows) < planned and ago > 2 * pace)
    return {"recipe": recipe, "fold": fold, "epochs_done": len(rows), "epochs_planned": planned,
            "val_dice_covid": value("val_dice_covid"), "val_dice_medseg": value("val_dice_medseg"),
            "seconds_per_epoch": pace, "hours_left": (planned - len(rows)) * pace / 3600 if pace else None,
            "seconds_since_epoch": ago, "training_pid": pid, "stopped": stopped}


def status_table(run_root) -> str:
    """Markdown table of `fold_status` for every recipe folder under run_root that has started."""
    lines = ["| recipe | fold | epochs | val Dice covid | val Dice MedSeg | s/epoch | hours left | last epoch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    stopped = []
    for recipe_dir in sorted(p for p in Path(run_root).glob("*") if p.name in RECIPES):
        for fold_path in sorted(recipe_dir.glob("fold*")) + sorted(recipe_dir.glob("final")):
            fold = "all" if fold_path.name == "final" else fold_path.name[4:]
            st = fold_status(recipe_dir.name, fold, run_root)
            ago = st["seconds_since_epoch"]
            since = "–" if ago is None else f"{ago / 60:.0f} min ago"
            if st["training_pid"] is not None:
                since += f" (training, pid {st['training_pid']})"
            elif st["stopped"]:  # certain once a train process has held the fold's lock; a guess from the pace before
                since += " (stopped)" if (fold_path / TRAIN_LOCK).is_file() else " (stopped?)"
            if st["stopped"]:
                stopped.append(f"{st['recipe']} fold {fold}")
            lines.append(f"| {st['recipe']} | {fold} | {st['epochs_done']}/{st['epochs_planned']} | "
                         f"{fmt(st['val_dice_covid'], '.3f')} | {fmt(st['val_dice_medseg'], '.3f')} | "
                         f"{fmt(st['seconds_per_epoch'], '.0f')} | {fmt(st['hours_left'], '.2f')} | {since} |")
    if stopped:
        lines.append(f"\nNo process trains (or, for older runs, no epoch for more than twice the pace): "
                     f"{', '.join(stopped)}. `train` (or `make cv-train`) again resumes from the last epoch.")
    return "\n".join(lines) + "\n"


#: CPU flags with which bf16 training pays (AMX-BF16: 2.2x faster than fp32; without, on a Cascade Lake, 2.2x slower)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def _option(argv: list[str], name: str, default):
    return type(default)(argv[argv.index(name) + 1]) if name in argv else default


def fold_steps(recipe: str) -> int:
    """Training steps of one fold of `recipe`, over all its stages."""
    from training.train import DEFAULTS

    return sum(_option(a, "--epochs", DEFAULTS["epochs"]) *
               _option(a, "--steps-per-epoch", DEFAULTS["steps_per_epoch"])
               for a in train_stages(recipe, 0, "-", "-", "-"))


def time_training_step(recipe: str, threads: int = 0, steps: int = 3, precision: str | None = None) -> float:
    """Seconds per training step of `recipe`'s batch, crop and precision (or `precision`) on this machine: `steps`
    steps of `train_on_batch` on random crops after one warm-up step (the trainer's model, loss and optimiser).
    Must run before TensorFlow's first op in the process when `threads` is set."""
    import contextlib
    import time

    import numpy as np
    import tensorflow as tf

    with contextlib.redirect_stdout(sys.stderr):  # its banner: stdout is the plan's answer
        import segmentation_models  # noqa: F401

    from shared.core import model as model_lib
    from shared.core.preprocessing import INPUT_SIZE
    from training.train import DEFAULTS, training_loss

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    options = RECIPES[recipe]
    batch = options.get("batch_size", DEFAULTS["batch_size"])
    crop = options.get("crop", DEFAULTS["crop"]) or INPUT_SIZE
    model = model_lib.build_unet(precision=precision or options.get("precision", DEFAULTS["precision"]))
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=training_loss())
    rng = np.random.default_rng(0)
    x = rng.random((batch, crop, crop, 1), dtype=np.float32)
    y = (rng.random((batch, crop, crop, 1)) > 0.9).astype(np.float32)
    model.train_on_batch(x, y)
    t0 = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return (time.perf_counter() - t0) / steps


def plan(recipe: str, threads: int = 0, steps: int = 3, flags: set[str] | None = None,
         precision: str | None = None) -> dict:
    """What one fold of `recipe` costs on this machine: steps per fold, measured seconds per step, hours, and
    whether the CPU has what the recipe's precision (or `precision`, as `train --precision`) needs."""
    from shared.core.inference import cpu_flags

    flags = cpu_flags() if flags is None else flags
    precision = precision or RECIPES[recipe].get("precision", "fp32")
    seconds = time_training_step(recipe, threads, steps, precision)
    n = fold_steps(recipe)
    return {"recipe": recipe, "threads": threads or "all", "precision": precision, "steps_per_fold": n,
            "seconds_per_step": seconds, "hours_per_fold": n * seconds / 3600,
            "bf16_cpu": sorted(set(BF16_CPU_FLAGS) & flags), "warning": precision_warning(precision, flags)}


def precision_warning(precision: str, flags: set[str]) -> str | None:
    """Why `precision` is a poor choice on a CPU with these flags, or None."""
    if precision == "bf16" and not set(BF16_CPU_FLAGS) & flags:
        return f"the recipe trains in bf16 but this CPU has none of {', '.join(BF16_CPU_FLAGS)}: bf16 runs slower " \
               "than fp32 here"
    return None


#: serving-scale probes, fixed 2026-12-04 before any shipped-cv fold finished: the 448 canvas enlarged to 512
#: and 576 before the model (fully convolutional), the map shrunk back; lesions then reach the model 1.14x and
#: 1.29x larger, at 1.31x and 1.65x the compute (inside `covidseg bench`'s ratio_vs_seed >= 5 from 9.1x).
ZOOM_PROBES = (512, 576)


def zoomed(predict, canvas: int):
    """`predict` run on the 448 canvas resized to canvas x canvas (cubic), its map resized back (area)."""
    import cv2
    import numpy as np

    def run(x):
        n, h, w = x.shape[:3]
        big = np.stack([cv2.resize(im[..., 0], (canvas, canvas), interpolation=cv2.INTER_CUBIC) for im in x])
        big = np.clip(big, 0.0, 1.0)  # cubic overshoot: the model never saw values outside the canvas range
        probs = np.asarray(predict(big[..., None]), dtype=np.float32)
        return np.stack([cv2.resize(pr, (w, h), interpolation=cv2.INTER_AREA) for pr in probs])

    return run


def multiscale(predict, canvases):
    """The mean of `predict`'s maps over `canvases` (448 is the canvas itself, others through `zoomed`)."""
    import numpy as np

    from shared.core.preprocessing import INPUT_SIZE

    runs = [predict if c == INPUT_SIZE else zoomed(predict, c) for c in canvases]

    def run(x):
        return np.mean([np.asarray(r(x), dtype=np.float32) for r in runs], axis=0)

    return run


def metrics_name(canvas: int | None) -> str:
    return "metrics.json" if not canvas else f"metrics-canvas{canvas}.json"


def scored_metrics(run_dir: Path, canvas: int | None = None) -> dict | None:
    """run_dir's metrics file (`metrics_name(canvas)`) when it scored the weights now in run_dir/last.h5, else
    None: scoring a fold takes minutes of CPU, so `evaluate` re-scores only folds whose weights changed."""
    from shared.core.inference import file_digest

    path = run_dir / metrics_name(canvas)
    if not (path.is_file() and (run_dir / "last.h5").is_file()):
        return None
    metrics = json.loads(path.read_text())
    return metrics if metrics.get("weights_sha256") == file_digest(run_dir / "last.h5") else None


def evaluate_fold(run_dir: Path, covid_root, medseg_root, batch_size: int = 8, canvas: int | None = None) -> dict:
    """Score run_dir/last.h5 on its fold's held-out slices -> the metrics dict written to metrics.json (with
    `canvas`, a serving-scale probe: the model sees the canvas enlarged to canvas², into metrics-canvas<N>.json).
    The dict names the weights it scored by their sha256 (`scored_metrics`)."""
    from shared.core import model as model_lib
    from shared.core.inference import file_digest
    from training import data
    from training.publish import evaluate_samples

    state = json.loads((run_dir / "state.json").read_text())
    fold = state["args"]["fold"]
    _, val_c, val_m = data.split(covid_root, medseg_root, fold=fold)
    model = model_lib.build_unet()
    model_lib.load_weights(model, run_dir / "last.h5")

    def predict(x):
        return model.predict_on_batch(x)[..., 0]

    if canvas:
        predict = zoomed(predict, canvas)

    framing = state["args"].get("framing", "full")
    stages = [json.loads((d / "state.json").read_text()) for d in _stage_dirs(run_dir)] + [state]
    result = {"fold": fold, "epoch": sum(st["epoch"] for st in stages),
              "epochs": sum(st["args"]["epochs"] for st in stages),
              "train_hours": round(sum(st.get("train_seconds", 0.0) for st in stages) / 3600, 2),
              "framing": framing, "canvas": canvas or 448, "precision": state["args"].get("precision", "fp32"),
              "weights_sha256": file_digest(run_dir / "last.h5"),
              "covid": evaluate_samples(predict, val_c, batch_size, desc=f"fold {fold} covid", framing=framing),
              "medseg": evaluate_samples(predict, val_m, batch_size, desc=f"fold {fold} medseg", framing=framing)}
    (run_dir / metrics_name(canvas)).write_text(json.dumps(result, indent=1))
    return result


def fold_log_rows(run_dir: Path) -> list[dict]:
    """The rows of a fold's log.csv, a staged fold's stages one after another with epochs numbered on from stage
    to stage (values as the trainer wrote them, strings)."""
    import csv

    rows: list[dict] = []
    for log in (d / "log.csv" for d in [*_stage_dirs(run_dir), run_dir]):
        if log.is_file():
            with log.open() as f:
                rows += [{**row, "epoch": str(int(row["epoch"]) + len(rows))} for row in csv.DictReader(f)]
    return rows


def record_fold(run_dir: Path, record_root, recipe: str) -> Path:
    """Copy a fold's (or the final run's) metrics.json and log.csv into record_root/<recipe>/<run_dir.name>/.
    A staged fold's log.csv is `fold_log_rows`: its stages' logs one after another."""
    import csv

    dest = Path(record_root) / recipe / run_dir.name
    dest.mkdir(parents=True, exist_ok=True)
    for metrics in run_dir.glob("metrics*.json"):
        (dest / metrics.name).write_bytes(metrics.read_bytes())
    rows = fold_log_rows(run_dir)
    if rows:
        with (dest / "log.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    return dest


def plot_fold_curves(run_root, out_png) -> Path | None:
    """One panel per recipe: each fold's validation Dice (covid solid, MedSeg dashed) by epoch from its log.csv,
    on the val_limit subset logged during training, with the fold's full held-out score at the last epoch as a
    marker. A staged fold's curve runs through its stages (`fold_log_rows`). None when no recipe has a log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = {}
    for recipe_dir in sorted(p for p in Path(run_root).iterdir() if p.is_dir()):
        logs = {fd.name: fold_log_rows(fd) for fd in sorted(recipe_dir.glob("fold*"))}
        logs = {fold: rows for fold, rows in logs.items() if rows}
        if logs:
            recipes[recipe_dir.name] = logs
    if not recipes:
        return None
    fig, axes = plt.subplots(1, len(recipes), figsize=(6 * len(recipes), 4), squeeze=False)
    for ax, (name, logs) in zip(axes[0], recipes.items()):
        for i, (fold, rows) in enumerate(logs.items()):
            color = f"C{i}"
            epochs = [int(r["epoch"]) for r in rows]
            ax.plot(epochs, [float(r["val_dice_covid"]) for r in rows], color=color, label=f"{fold} covid")
            ax.plot(epochs, [float(r["val_dice_medseg"]) for r in rows], color=color, ls="--",
                    label=f"{fold} MedSeg")
            metrics = Path(run_root) / name / fold / "metrics.json"
            if metrics.is_file():
                m = json.loads(metrics.read_text())
                ax.plot([m["epoch"]], [m["covid"]["mean_dice"]], "o", color=color)
                ax.plot([m["epoch"]], [m["medseg"]["mean_dice"]], "s", color=color, mfc="none")
        ax.set(title=f"{name}: validation Dice by epoch (markers: full held-out fold)", xlabel="epoch",
               ylabel="mean per-image Dice", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def collect(run_root) -> dict:
    """{recipe: {"folds": {K: metrics}, "covid": (mean, sd), "medseg": (mean, sd), "hours": total}} of every
    fold with a metrics.json under run_root."""
    out = {}
    for recipe_dir in sorted(p for p in Path(run_root).iterdir() if p.is_dir()):
        folds = {}
        for fd in sorted(recipe_dir.glob("fold*")):
            if (fd / "metrics.json").is_file():
                folds[fd.name[4:]] = json.loads((fd / "metrics.json").read_text())
        if not folds:
            continue
        covid = [f["covid"]["mean_dice"] for f in folds.values()]
        medseg = [f["medseg"]["mean_dice"] for f in folds.values()]
        out[recipe_dir.name] = {"folds": folds, "covid": _mean_sd(covid), "medseg": _mean_sd(medseg),
                                "hours": round(sum(f["train_hours"] for f in folds.values()), 2)}
    return out


def markdown_table(results: dict, k: int) -> str:
    """One row per recipe: per-fold and mean ± sd (sample) of the per-image mean Dice, covid and MedSeg."""
    head = ("| recipe | folds done | covid mean Dice per fold | covid mean ± sd | MedSeg mean Dice per fold | "
            "MedSeg mean ± sd | CPU hours (training) |\n| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for name, r in results.items():
        per_c = ", ".join(f"{f}: {m['covid']['mean_dice']:.3f}" for f, m in r["folds"].items())
        per_m = ", ".join(f"{f}: {m['medseg']['mean_dice']:.3f}" for f, m in r["folds"].items())
        rows.append(f"| {name} | {len(r['folds'])} of {k} | {per_c} | {r['covid'][0]:.3f} ± {r['covid'][1]:.3f} | "
                    f"{per_m} | {r['medseg'][0]:.3f} ± {r['medseg'][1]:.3f} | {r['hours']} |")
    return "\n".join([head, *rows]) + "\n"


def main(argv=None) -> int:
    from training import data

    p = argparse.ArgumentParser(prog="python -m training.cv", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("train", "evaluate"):
        s = sub.add_parser(name)
        s.add_argument("--recipe", required=True, choices=sorted(RECIPES))
        s.add_argument("--covid-root", required=True)
        s.add_argument("--medseg-root", required=True)
        s.add_argument("--run-root", default="runs/cv")
        if name == "evaluate":
            s.add_argument("--record", help="also copy each evaluated fold's metrics.json and log.csv into "
                           "RECORD/<recipe>/fold<K>/ (committed, e.g. docs/cv)")
            s.add_argument("--force", action="store_true",
                           help="score every finished fold again, even one whose metrics file already scored its "
                           "current last.h5 (by default such a fold is kept as scored)")
            s.add_argument("--canvas", type=int, choices=ZOOM_PROBES,
                           help="serving-scale probe: score with the 448 canvas enlarged to this size "
                           "(metrics-canvas<N>.json; the recipe's CV number stays metrics.json)")
        if name == "train":
            s.add_argument("--fold", required=True, help="fold number, or 'all' for the final model")
            s.add_argument("--threads", type=int, default=0,
                           help="TensorFlow CPU threads (default 0: all cores; not part of the recipe)")
            s.add_argument("--precision", choices=["fp32", "bf16"],
                           help="train in this precision instead of the recipe's, on a CPU where the recipe's does "
                           "not pay (bf16 without AMX-BF16/AVX512-BF16: `plan` warns); kept in the fold's "
                           "state.json and metrics.json")
    pub = sub.add_parser("publish", help="ship the recipe's final model if its CV beats the shipped weights")
    pub.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    pub.add_argument("--record", default="docs/cv", help="the committed fold records (default docs/cv)")
    pub.add_argument("--run-root", default="runs/cv", help="where the final run (<recipe>/final) is")
    pub.add_argument("--covid-root", required=True)
    pub.add_argument("--medseg-root", required=True)
    pub.add_argument("--weights-out", help="weights file to write (default: the shipped one; its card beside it)")
    pub.add_argument("--force", action="store_true", help="publish even if the rule says no (not for shipping)")
    pl = sub.add_parser("plan", help="time a few training steps of the recipe here: hours per fold, before starting")
    pl.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    pl.add_argument("--threads", type=int, default=0, help="TensorFlow CPU threads, as the runs will use them "
                    "(default 0: all cores; 1 for two folds side by side)")
    pl.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default 3)")
    pl.add_argument("--precision", choices=["fp32", "bf16"], help="time this precision instead of the recipe's "
                    "(as `train --precision` would train)")
    st = sub.add_parser("status", help="epochs done, validation-subset Dice, s/epoch and hours left per fold run")
    st.add_argument("--run-root", default="runs/cv")
    t = sub.add_parser("table")
    t.add_argument("--run-root", default="runs/cv")
    t.add_argument("--out", help="write the markdown table here")
    t.add_argument("--json", help="write every fold's metrics here")
    t.add_argument("--plot", help="write each recipe's per-fold validation curves here (PNG)")
    args = p.parse_args(argv)

    k = len(data.load_folds())
    if args.cmd == "train":
        from training import train

        if args.fold != "all" and not (args.fold.isdigit() and int(args.fold) < k):
            print(f"error: --fold must be 0-{k - 1} or 'all'", file=sys.stderr)
            return 2
        stages = train_stages(args.recipe, args.fold, args.covid_root, args.medseg_root, args.run_root)
        try:
            with training_lock(fold_dir(args.run_root, args.recipe, args.fold)):
                for argv in stages:
                    run_dir = Path(argv[argv.index("--run-dir") + 1])
                    if len(stages) > 1 and _finished(run_dir):
                        print(f"{run_dir}: finished, next stage", flush=True)
                        continue
                    rc = train.main(argv + (["--threads", str(args.threads)] if args.threads else [])
                                    + (["--precision", args.precision] if args.precision else []))
                    if rc:
                        return rc
        except FoldBusy as exc:
            print(f"error: {exc}; `status` shows its progress", file=sys.stderr)
            return 2
        return 0
    if args.cmd == "publish":
        from training.publish_cv import publish

        return publish(args.recipe, args.record, args.run_root, args.covid_root, args.medseg_root, args.force,
                       Path(args.weights_out) if args.weights_out else None)
    if args.cmd == "evaluate":
        done = 0
        for fold in range(k):
            fd = fold_dir(args.run_root, args.recipe, fold)
            if not _finished(fd):
                state = json.loads((fd / "state.json").read_text()) if (fd / "state.json").is_file() else None
                print(f"fold {fold}: not finished ({state['epoch'] if state else 0} epochs), skipped")
                continue
            r = None if args.force else scored_metrics(fd, args.canvas)
            if r is not None:
                print(f"fold {fold}: {metrics_name(args.canvas)} already scores its last.h5, kept "
                      "(--force: score again)")
            else:
                r = evaluate_fold(fd, args.covid_root, args.medseg_root, canvas=args.canvas)
            if args.record:
                record_fold(fd, args.record, args.recipe)
            done += 1
            print(f"fold {fold}: covid {r['covid']['mean_dice']:.4f} (n {r['covid']['n_images']}), "
                  f"MedSeg {r['medseg']['mean_dice']:.4f} (n {r['medseg']['n_images']})")
        return 0 if done else 1
    if args.cmd == "plan":
        r = plan(args.recipe, args.threads, max(1, args.steps), precision=args.precision)
        print(f"{r['recipe']}: {r['steps_per_fold']} steps per fold, {r['precision']}, threads {r['threads']}: "
              f"{r['seconds_per_step']:.2f} s per step here, {r['hours_per_fold']:.2f} h per fold"
              f" (bf16 CPU flags: {', '.join(r['bf16_cpu']) or 'none'})")
        if r["warning"]:
            print(f"warning: {r['warning']}")
        return 0
    if args.cmd == "status":
        print(status_table(args.run_root), end="")
        return 0
    results = collect(args.run_root) if Path(args.run_root).is_dir() else {}
    table = markdown_table(results, k)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot and Path(args.run_root).is_dir():
        print(f"curves: {plot_fold_curves(args.run_root, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
