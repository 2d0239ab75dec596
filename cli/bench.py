"""`covidseg bench`: per-slice latency and throughput of each backend, against the predecessor's per-request path.

Measured at 448x448 on real CT slices (tests/fixtures/slices, or --images) with the shipped weights (or
--weights), in one process, one after the other:
- per backend: model-only latency at batch 1, per-slice time and throughput at batch 8, achieved FLOP/s; and the
  whole path (decode PNG bytes, preprocess, infer, resize back, render mask + overlay PNGs) at batch 1 and 8;
- the predecessor ("seed") path, reproduced faithfully: cv2.imread, cv2.resize to 448 INTER_AREA, Keras
  model.predict on one slice, a 15x15-inch matplotlib figure with two imshows (slice, prediction), savefig PNG;
- ratio_vs_seed = seed seconds per slice / our whole-path seconds per slice at batch 8 with the auto backend
  (ratio_vs_seed_batch1: the same at batch 1, i.e. one slice per request like the seed).
- the worker's layout (--processes, default 2 = COVIDSEG_WORKER_CONCURRENCY's default): that many processes,
  each with its own session of the auto backend, run batch-8 model calls at the same time; their aggregate
  slices/s is the machine's model throughput as a worker pool sees it (one process leaves part of the cores idle
  in the model's serial sections and between operators).
Times are medians of --repeats rounds after a warm-up; each round runs every measurement once (interleaved), so
changing background load affects all contenders alike. Wall-clock numbers still depend on other load on the
machine: the JSON records the load average and the process CPU seconds per slice next to them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--weights", help="weights file (default: the shipped weights)")
    p.add_argument("--backends", default="fp32,bf16,int8",
                   help="comma-separated backends to time (default fp32,bf16,int8)")
    p.add_argument("--images", help="folder of CT slices to time on (default: tests/fixtures/slices)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (default 3)")
    p.add_argument("--no-seed", action="store_true", help="skip the predecessor path")
    p.add_argument("--processes", type=int, default=2,
                   help="also time the auto backend in this many concurrent processes, like a worker pool "
                        "(default 2; 1 skips it)")


def conv_flops(model) -> dict:
    """FLOPs of one forward pass of a batch-1 Keras model with a fixed input size (multiply-add = 2 FLOPs).

    Convolutions (+ bias), batch-norm (scale and shift: 2 per element), ReLU / Add (1 per element), sigmoid
    (~4 per element). Up-sampling, concatenation and padding count 0.
    """
    import tensorflow as tf

    conv = other = 0
    for layer in model.layers:
        try:
            out_shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        n_out = int(np.prod([d for d in out_shape[1:] if d is not None]))
        if isinstance(layer, tf.keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            cin = int(layer.input.shape[-1]) // getattr(layer, "groups", 1)
            conv += 2 * n_out * kh * kw * cin + (n_out if layer.use_bias else 0)
        elif isinstance(layer, tf.keras.layers.BatchNormalization):
            other += 2 * n_out
        elif isinstance(layer, (tf.keras.layers.ReLU, tf.keras.layers.Add)):
            other += n_out
        elif isinstance(layer, tf.keras.layers.Activation):
            act = getattr(layer.activation, "__name__", "")
            other += (4 if act == "sigmoid" else 1 if act in ("relu", "linear") else 2) * n_out
    return {"conv": conv, "other": other, "total": conv + other}


def _slice_files(folder) -> list[Path]:
    from shared.core.model import REPO_ROOT

    root = Path(folder) if folder else REPO_ROOT / "tests" / "fixtures" / "slices"
    files = sorted(p for p in root.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"))
    return files


def seed_path(model, path: Path) -> bytes:
    """The predecessor's per-request path, as it was: imread, INTER_AREA resize, model.predict on one slice,
    a 15x15-inch matplotlib figure with the slice and the prediction, saved as PNG."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    img = cv2.resize(img, (448, 448), interpolation=cv2.INTER_AREA)
    pred = model.predict(img.reshape(1, 448, 448, 1).astype(np.float32), verbose=0)
    fig = plt.figure(figsize=(15, 15))
    plt.subplot(1, 2, 1)
    plt.imshow(img, cmap="gray")
    plt.subplot(1, 2, 2)
    plt.imshow(pred[0, :, :, 0])
    buf = io.BytesIO()
    plt.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def our_path(seg, datas: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Our whole path for a batch of uploads: decode, preprocess + infer (batched), resize back, render PNGs."""
    from shared.core.imageio import decode_image_bytes
    from shared.core.render import mask_png, overlay_png

    grays = [decode_image_bytes(d) for d in datas]
    probs = seg.predict(grays, batch_size=len(grays))
    return [(mask_png(p), overlay_png(g, p)) for g, p in zip(grays, probs)]


def run(args) -> int:
    from cli import CLIError
    from shared.core.inference import BACKENDS, Segmenter, cpu_flags, inspect_weights
    from shared.core.model import DEFAULT_WEIGHTS

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS or b == "auto"]
    if bad or not backends:
        raise CLIError(f"--backends: unknown backend(s) {', '.join(bad) or '(none)'}; choose from fp32, bf16, int8")
    if args.repeats < 1:
        raise CLIError("--repeats must be >= 1")
    if not 1 <= args.processes <= 64:
        raise CLIError("--processes must be between 1 and 64")
    weights = Path(args.weights) if args.weights else DEFAULT_WEIGHTS
    inspect_weights(weights)
    files = _slice_files(args.images)
    if not files:
        raise CLIError(f"no CT slices to time on in {args.images or 'tests/fixtures/slices'}")
    datas = [f.read_bytes() for f in files]
    datas8 = [datas[i % len(datas)] for i in range(8)]
    load0 = os.getloadavg()
    flags = cpu_flags()
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "avx512_vnni": "avx512_vnni" in flags, "avx512_bf16": "avx512_bf16" in flags,
                    "amx": any(f.startswith("amx") for f in flags), "loadavg_start": [round(v, 2) for v in load0],
                    "python": platform.python_version()},
        "input_size": 448, "n_slices_source": len(files), "weights": str(weights), "repeats": args.repeats,
        "backends": {},
    }
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    ref = Segmenter(weights, backend="fp32", log=log)
    flops = conv_flops(ref.keras_model())
    result["flops_per_slice"] = flops["total"]
    result["flops_breakdown"] = flops
    x1 = ref.prepare([datas_to_gray(datas[0])])
    x8 = ref.prepare([datas_to_gray(d) for d in datas8])
    segs = {b: ref if b == "fp32" else Segmenter(weights, backend=b, log=log) for b in backends}
    auto = Segmenter(weights, backend="auto", log=log)  # the rule the service uses (int8 on CPU if Dice holds)
    result["auto_backend"] = auto.backend
    segs.setdefault(auto.backend, auto)
    # every measurement as a named closure; all of them run once per round, rounds interleave them, so a change
    # of background load hits every contender alike (medians over rounds)
    jobs = {}
    for b, seg in segs.items():
        jobs[(b, "model1")] = (lambda seg=seg: seg.predict_model_input(x1), 1)
        jobs[(b, "model8")] = (lambda seg=seg: seg.predict_model_input(x8), 8)
        jobs[(b, "path1")] = (lambda seg=seg: our_path(seg, datas[:1]), 1)
        jobs[(b, "path8")] = (lambda seg=seg: our_path(seg, datas8), 8)
    if not args.no_seed:
        from shared.core.model import build_unet, load_weights

        with contextlib.redirect_stdout(sys.stderr):
            seed_model = build_unet(input_shape=(448, 448, 1))
        load_weights(seed_model, weights)
        seed_model.predict(np.zeros((1, 448, 448, 1), np.float32), verbose=0)
        seed_files = iter(files * (args.repeats + 1))
        jobs[("seed", "path1")] = (lambda: seed_path(seed_model, next(seed_files)), 1)
    pool = ParallelModel(weights, auto.backend, args.processes, x8) if args.processes > 1 else None
    for fn, _ in jobs.values():  # warm-up (graph tracing, ORT arenas, matplotlib font cache)
        fn()
    walls: dict = {k: [] for k in jobs}
    cpus: dict = {k: [] for k in jobs}
    for r in range(args.repeats):
        print(f"round {r + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
        for key, (fn, n) in jobs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            walls[key].append((time.perf_counter() - t0) / n)
            cpus[key].append((time.process_time() - c0) / n)
        if pool is not None:
            wall, cpu = pool.round()
            walls.setdefault("parallel", []).append(wall)
            cpus.setdefault("parallel", []).append(cpu)
    if pool is not None:
        pool.close()
    med = {k: statistics.median(v) for k, v in walls.items()}
    cmed = {k: statistics.median(v) for k, v in cpus.items()}
    for b in backends:
        seg = segs[b]
        result["backends"][b] = {
            "effective_backend": seg.backend,
            "latency_batch1_s": med[(b, "model1")], "per_slice_batch8_s": med[(b, "model8")],
            "throughput_batch8_slices_per_s": 1.0 / med[(b, "model8")],
            "achieved_gflops_per_s_batch8": flops["total"] / med[(b, "model8")] / 1e9,
            "cpu_s_per_slice_batch1": cmed[(b, "model1")], "cpu_s_per_slice_batch8": cmed[(b, "model8")],
            "whole_path_batch1_s": med[(b, "path1")], "whole_path_per_slice_batch8_s": med[(b, "path8")],
            "whole_path_cpu_s_per_slice_batch8": cmed[(b, "path8")],
        }
        if seg.int8_info:
            result["backends"][b]["int8_check"] = {k: seg.int8_info.get(k) for k in
                                                   ("dice_fp32", "dice_int8", "agreement_dice", "n_images")}
    a = auto.backend
    if pool is not None:
        per_slice = statistics.median(walls["parallel"])
        result["parallel"] = {"backend": a, "processes": args.processes, "batch": 8,
                              "per_slice_batch8_s": per_slice, "throughput_batch8_slices_per_s": 1.0 / per_slice,
                              "achieved_gflops_per_s_batch8": flops["total"] / per_slice / 1e9,
                              "cpu_s_per_slice_batch8": statistics.median(cpus["parallel"])}
    ours = {"whole_path_batch1_s": med[(a, "path1")], "whole_path_per_slice_batch8_s": med[(a, "path8")]}
    if not args.no_seed:
        seed_s = med[("seed", "path1")]
        result["seed_s_per_slice"] = seed_s
        result["seed_cpu_s_per_slice"] = cmed[("seed", "path1")]
        result["ratio_vs_seed"] = seed_s / ours["whole_path_per_slice_batch8_s"]
        result["ratio_vs_seed_batch1"] = seed_s / ours["whole_path_batch1_s"]
        result["ratio_vs_seed_cpu"] = cmed[("seed", "path1")] / cmed[(a, "path8")]
    result["ours_whole_path_per_slice_batch8_s"] = ours["whole_path_per_slice_batch8_s"]
    result["ours_per_slice_batch8_s"] = result["backends"].get(auto.backend, {}).get("per_slice_batch8_s")
    result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    _print_table(result)
    if args.json:
        jp = Path(args.json)
        jp.parent.mkdir(parents=True, exist_ok=True)
        jp.write_text(json.dumps(result, indent=1))
        print(f"wrote {jp}")
    return 0


def _parallel_child(weights: str, backend: str, x8: np.ndarray, conn) -> None:
    """One process of ParallelModel: load the model, then run `n` batch-8 calls per request from the parent."""
    from shared.core.inference import Segmenter

    seg = Segmenter(weights, backend=backend, log=lambda m: None)
    seg.predict_model_input(x8)  # warm-up
    conn.send("ready")
    while (n := conn.recv()) is not None:
        c0 = time.process_time()
        for _ in range(n):
            seg.predict_model_input(x8)
        conn.send(time.process_time() - c0)


class ParallelModel:
    """`processes` processes with one model each (a worker pool's layout), timed together on fixed work."""

    def __init__(self, weights, backend: str, processes: int, x8: np.ndarray, calls_per_round: int = 3):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # no forked ORT/TF state
        self.calls = calls_per_round
        self.slices = processes * calls_per_round * len(x8)
        self.conns, self.procs = [], []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_parallel_child, args=(str(weights), backend, x8, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        for c in self.conns:
            c.recv()

    def round(self) -> tuple[float, float]:
        """(wall seconds per slice, CPU seconds per slice) of every process running its calls at once."""
        t0 = time.perf_counter()
        for c in self.conns:
            c.send(self.calls)
        cpu = sum(c.recv() for c in self.conns)
        return (time.perf_counter() - t0) / self.slices, cpu / self.slices

    def close(self) -> None:
        for c in self.conns:
            c.send(None)
        for p in self.procs:
            p.join(timeout=10)


def datas_to_gray(data: bytes) -> np.ndarray:
    from shared.core.imageio import decode_image_bytes

    return decode_image_bytes(data)


def _print_table(r: dict) -> None:
    print(f"448x448, {r['flops_per_slice'] / 1e9:.1f} GFLOP per slice; load average "
          f"{r['machine']['loadavg_start'][0]:.2f} -> {r['machine']['loadavg_end'][0]:.2f} on "
          f"{r['machine']['cpus']} CPUs")
    print(f"{'backend':8s} {'b1 lat s':>9s} {'b8 s/sl':>9s} {'sl/s b8':>8s} {'GFLOP/s':>8s} {'path b1':>8s} "
          f"{'path b8':>8s} {'cpu s/sl':>9s}")
    for b, v in r["backends"].items():
        name = b if v["effective_backend"] == b else f"{b}->{v['effective_backend']}"
        print(f"{name:8s} {v['latency_batch1_s']:9.3f} {v['per_slice_batch8_s']:9.3f} "
              f"{v['throughput_batch8_slices_per_s']:8.2f} {v['achieved_gflops_per_s_batch8']:8.1f} "
              f"{v['whole_path_batch1_s']:8.3f} {v['whole_path_per_slice_batch8_s']:8.3f} "
              f"{v['cpu_s_per_slice_batch8']:9.3f}")
    if "parallel" in r:
        v = r["parallel"]
        print(f"{v['backend']} x {v['processes']} processes (a worker pool): {v['per_slice_batch8_s']:.3f} s/slice "
              f"at batch 8 = {v['throughput_batch8_slices_per_s']:.2f} slices/s, "
              f"{v['achieved_gflops_per_s_batch8']:.1f} GFLOP/s, {v['cpu_s_per_slice_batch8']:.3f} CPU s/slice")
    if "seed_s_per_slice" in r:
        print(f"seed path {r['seed_s_per_slice']:.3f} s/slice; ours (auto={r['auto_backend']}, whole path) "
              f"{r['ours_whole_path_per_slice_batch8_s']:.3f} s/slice at batch 8 -> ratio_vs_seed "
              f"{r['ratio_vs_seed']:.1f}x (batch 1: {r['ratio_vs_seed_batch1']:.1f}x; "
              f"process CPU seconds: {r['ratio_vs_seed_cpu']:.1f}x)")
