"""Batched inference: `Segmenter` loads the model once and turns images of any size into probability maps.

Backends
- "fp32": the Keras model in TensorFlow, float32 (a compiled `tf.function`). Always available; the reference.
- "bf16": the same model under the mixed_bfloat16 policy (float32 output). Only pays on CPUs with AVX512-BF16/AMX
  or on GPUs; on this project's reference CPU (AVX-512 + VNNI, no BF16) it is ~2x *slower* than fp32.
- "int8": the model converted to ONNX (tf2onnx) and statically quantized with onnxruntime (QOperator, per-channel
  int8 weights kept to 7 bits (`reduce_range`), uint8 activations, MinMax calibration on real CT slices and their
  mirror images), run by
  onnxruntime without thread spinning (COVIDSEG_THREADS sets its thread count). The .onnx files are
  cached under $COVIDSEG_CACHE_DIR (default ~/.cache/covidseg), keyed by the weights file's SHA-256, so the
  one-time conversion (~2 min on 2 busy cores) happens once per weights file. If tf2onnx/onnxruntime are missing or
  fail, the Segmenter falls back to fp32 with a warning.
- "auto": on a GPU, fp32 (TensorFlow). On a CPU, int8 if its Dice on the labelled calibration slices stays within
  0.01 of fp32's (checked when the int8 model is built and stored next to it), else fp32. bf16 is never chosen.

  Why (measured on the reference machine: 2-core Xeon Cascade Lake, AVX-512 + VNNI, no AVX512-BF16/AMX, shared
  with a training run; see `covidseg bench`): per 448x448 slice at batch 8, int8 needs ~0.26-0.27 process-CPU
  seconds vs ~0.46-0.67 for TF fp32 and ~1.8-2.2 for bf16 (wall-clock ratios are similar but noisy under load).
  Validation Dice, `covidseg evaluate` on the held-out sets of `training.validation_sets` with an epoch-3
  checkpoint of the lead's run: covid19-ct-seg (284 slices) fp32 0.3591 / int8 0.3563, MedSeg (15) fp32 0.4319 /
  int8 0.4328 (epoch-1 checkpoint: 0.0793/0.0795 and 0.2531/0.2538): within 0.01, so int8 is the CPU default.
  `backend="fp32"` stays available (and is the reference of every check).

  Why 7-bit weights: on x86 CPUs without VNNI (AVX2 or AVX-512 only, e.g. an AMD EPYC with AVX2), onnxruntime
  multiplies uint8 activations by int8 weights with vpmaddubsw, whose int16 pair sums saturate for full-range
  weights. Measured on such a machine with the shipped weights, on the 6 fixture slices: full 8-bit weights
  fp32 0.7383 / int8 0.6310 mean Dice (agreement 0.77); 7-bit weights int8 0.7387 (agreement 0.986), at the
  same speed. With 7 bits no pair sum can saturate (255 x 63 x 2 < 2^15), so the int8 model computes the same
  integers on every CPU, VNNI or not, and a check made on one machine holds on another.

Contract: `Segmenter(...).predict(images)` -> list of float32 (H, W) probability maps, each at its input's own
size (the 448x448 output is resized back with INTER_LINEAR). Each input is first framed (`shared.core.framing`:
the whole image, or for weights trained with lung framing its lung bounding box, the map being 0 outside it),
then preprocessed with `shared.core.preprocessing.preprocess`: the same two functions training uses.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from shared.core import model as model_lib  # sets SM_FRAMEWORK / TF_USE_LEGACY_KERAS before TensorFlow loads
from shared.core.preprocessing import INPUT_SIZE, MODES, preprocess
from shared.core.framing import FRAMINGS, Frame, frame_slices

BACKENDS = ("auto", "fp32", "bf16", "int8")
#: "auto" keeps int8 only when its calibration-set Dice is within this of fp32's.
AUTO_MAX_DICE_DROP = 0.01
#: Bump when the conversion recipe changes (invalidates cached .onnx files). 6: 7-bit weights (reduce_range).
ONNX_RECIPE = 6
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class WeightsError(ValueError):
    """The weights file is missing, not a weights file, or does not fit the model."""


# --------------------------------------------------------------------------------------------------------------
# weights files
# --------------------------------------------------------------------------------------------------------------
def inspect_weights(path) -> dict:
    """Cheap check (no TensorFlow) that `path` is a covidseg or Keras HDF5 weights file -> {"format", "metadata"}."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    if not path.is_file():
        raise WeightsError(f"weights path is not a file: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if not h5py.is_hdf5(str(path)):
        what = "an empty file" if not head else "not an HDF5 file"
        raise WeightsError(f"{path} is not a weights file ({what}; expected a covidseg .h5 or a Keras "
                           "save_weights/model.save HDF5 file)")
    try:
        with h5py.File(path, "r") as f:
            if model_lib._FORMAT_ATTR in f.attrs:
                n = sum(1 for k in f.keys() if k.startswith("w"))
                try:
                    meta = json.loads(f.attrs.get("metadata", "{}"))
                except (TypeError, ValueError):
                    meta = {}
                return {"format": "covidseg", "n_weights": n, "metadata": meta}
            if "model_weights" in f or "layer_names" in f.attrs:
                return {"format": "keras", "metadata": {}}
    except OSError as exc:
        raise WeightsError(f"{path}: unreadable HDF5 file ({exc})") from None
    raise WeightsError(f"{path} is an HDF5 file but holds no Keras or covidseg model weights")


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_digest(model) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(str(w.shape).encode())
        h.update(np.ascontiguousarray(w).tobytes())
    h.update(model.to_json().encode())
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("COVIDSEG_CACHE_DIR") or Path.home() / ".cache" / "covidseg")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@contextlib.contextmanager
def _quiet_stdout():
    """segmentation-models prints its banner to stdout; keep stdout clean for JSON/tables."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _build_keras(weights, precision="fp32", input_size=INPUT_SIZE):
    with _quiet_stdout():
        import segmentation_models  # noqa: F401

        model_lib.configure_devices()
        model = model_lib.build_unet(input_shape=(input_size, input_size, 1), precision=precision)
    try:
        model_lib.load_weights(model, weights)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise WeightsError(f"{weights} does not fit the U-Net/ResNet34 model ({exc})") from None
    return model


def calibration_pairs(mode: str, directory=None) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(name, gray image, mask or None) of the real CT slices used to calibrate and check the int8 model.

    Default: tests/fixtures/{slices,masks} of the repository (6 held-out slices from both datasets);
    $COVIDSEG_CALIBRATION_DIR (a folder with images/ [+ masks/], or images directly) overrides.
    """
    import cv2

    from shared.core.imageio import IMAGE_SUFFIXES

    directory = directory or os.environ.get("COVIDSEG_CALIBRATION_DIR")
    root = Path(directory) if directory else model_lib.REPO_ROOT / "tests" / "fixtures"
    img_dir = root / "images" if (root / "images").is_dir() else root / "slices" if (root / "slices").is_dir() \
        else root
    mask_dir = root / "masks"
    out = []
    for p in sorted(img_dir.iterdir()) if img_dir.is_dir() else []:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if img is None:
            continue
        mask = None
        for ext in (".png", p.suffix):
            mp = mask_dir / (p.stem + ext)
            if mp.is_file():
                m = cv2.imread(str(mp), cv2.IMREAD_GRAYSCALE)
                mask = None if m is None or m.shape != img.shape else (m > 0)
                break
        out.append((p.stem, img, mask))
    return out


# --------------------------------------------------------------------------------------------------------------
# runners: (N, 448, 448, 1) float32 -> (N, 448, 448) float32
# --------------------------------------------------------------------------------------------------------------
def set_tf_threads(threads: int | None) -> None:
    """TensorFlow's intra-op (`threads`) and inter-op (half of it, at least 1) pools, process-wide. Only takes
    effect before TensorFlow's runtime starts (later calls are ignored), so it is called before a Keras model is
    built, and never by the INT8 path, which does not import TensorFlow at all."""
    if not threads or threads < 1:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, threads // 2))
    except RuntimeError:  # the runtime is already up (an earlier model in this process): it keeps its pools
        pass


class _KerasRunner:
    def __init__(self, model):
        import tensorflow as tf

        self.model = model
        self._fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        y = self._fn(tf.constant(x, dtype=tf.float32)).numpy()
        return y[..., 0].astype(np.float32, copy=False)


class _OrtRunner:
    def __init__(self, path, threads: int | None = None):
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # no deprecation chatter about tf2onnx's Resize attributes
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = threads or int(os.environ.get("COVIDSEG_THREADS", "0") or 0)
        if threads:
            so.intra_op_num_threads = threads
        # no busy-waiting between parallel sections: on a shared CPU (workers, training, other services) spinning
        # threads burn the cores the other thread needs. Measured at load 9 on 2 cores: 1.05 -> 0.75 s/slice and
        # 0.37 -> 0.26 CPU s/slice. COVIDSEG_ORT_SPIN=1 restores onnxruntime's default.
        so.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("COVIDSEG_ORT_SPIN", "0"))
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.path = Path(path)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return y[..., 0].astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------------------------
# ONNX conversion + static INT8 quantization (cached)
# --------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def onnx_cache_paths(digest: str, mode: str, root: Path | None = None) -> dict[str, Path]:
    from importlib.metadata import PackageNotFoundError, version

    try:  # versions from the package metadata: importing tf2onnx would import TensorFlow
        ort_v, t2o_v = version("onnxruntime"), version("tf2onnx")
    except PackageNotFoundError as exc:
        raise RuntimeError(f"{exc.name} is not installed") from None
    root = Path(root or cache_dir()) / "onnx"
    key = f"{digest[:20]}-{mode}-r{ONNX_RECIPE}-ort{ort_v}-tf2onnx{t2o_v}"
    return {"fp32": root / f"{key}.fp32.onnx", "int8": root / f"{key}.int8.onnx",
            "info": root / f"{key}.int8.json", "lock": root / f"{key}.lock"}


def export_onnx(keras_model, out_path: Path, input_size: int = INPUT_SIZE) -> Path:
    """Keras model -> ONNX (opset 17, dynamic batch, fixed input_size^2 x 1) with the exact graph rewrites of
    `shared.core.onnx_graph` applied, written atomically."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    from shared.core import onnx_graph

    spec = (tf.TensorSpec((None, input_size, input_size, 1), tf.float32, name="input"),)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".{os.getpid()}.tmp")
    with _quiet_stdout(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf2onnx.convert.from_keras(keras_model, input_signature=spec, opset=17, output_path=str(tmp))
    model = onnx.load(str(tmp))
    onnx_graph.optimize_for_int8(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp))
    os.replace(tmp, out_path)
    return out_path


def quantize_int8(fp32_path: Path, out_path: Path, calib_inputs: np.ndarray) -> Path:
    """Static INT8 quantization (QOperator, per-channel int8 weights in 7 bits, uint8 activations, MinMax
    calibration). The 7 bits (`reduce_range`) keep onnxruntime's u8 x s8 kernels on CPUs without VNNI from
    saturating (see the module docstring)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{"input": calib_inputs[i:i + 1]} for i in range(len(calib_inputs))])

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory(dir=out_path.parent) as td:
        pre = Path(td) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        tmp = Path(td) / "int8.onnx"
        quantize_static(str(pre), str(tmp), _Reader(), quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=True, extra_options={"ActivationSymmetric": False})
        os.replace(tmp, out_path)
    return out_path


def _calibration_inputs(pairs, mode: str, framing: str = "full") -> np.ndarray:
    """Preprocessed (framed) calibration slices plus their left-right mirrors (more varied activation ranges)."""
    xs = []
    imgs = [img for _, img, _ in pairs]
    for img, frame in zip(imgs, frame_slices(imgs, framing)):
        x = preprocess(frame.crop(img), mode)
        xs += [x, x[:, ::-1]]
    return np.ascontiguousarray(np.stack(xs)[..., None], dtype=np.float32)


def _dice_check(fp32_run, int8_run, pairs, mode: str, framing: str = "full") -> dict:
    """Mean per-image Dice (threshold 0.5, at the mask's size) of fp32 and int8 on the labelled pairs."""
    from shared.core.metrics import dice_iou_counts

    labelled = [(n, img, m) for n, img, m in pairs if m is not None]
    if not labelled:
        return {"n_images": 0}
    frames = frame_slices([img for _, img, _ in labelled], framing)
    x = np.stack([preprocess(f.crop(img), mode) for (_, img, _), f in zip(labelled, frames)])[..., None]
    out = {}
    probs = {}
    for name, run in (("fp32", fp32_run), ("int8", int8_run)):
        ps = np.concatenate([run(x[i:i + 4]) for i in range(0, len(x), 4)])
        probs[name] = [f.paste(p) for p, f in zip(ps, frames)]
        out[f"dice_{name}"] = float(np.mean([dice_iou_counts(p >= 0.5, m)[0]
                                             for p, (_, _, m) in zip(probs[name], labelled)]))
    out["agreement_dice"] = float(np.mean([dice_iou_counts(a >= 0.5, b >= 0.5)[0]
                                           for a, b in zip(probs["fp32"], probs["int8"])]))
    out["max_abs_diff"] = float(max(np.abs(a - b).max() for a, b in zip(probs["fp32"], probs["int8"])))
    out["n_images"] = len(labelled)
    return out


def ensure_int8(digest: str, mode: str, keras_factory, root=None, log=None, framing: str = "full") -> tuple[Path, dict]:
    """Return (int8 .onnx path, info) for these weights, converting + quantizing once (file-locked).
    `framing` is the weights' own (it is fixed by the weights, so the digest already names it)."""
    paths = onnx_cache_paths(digest, mode, root)
    if paths["int8"].is_file() and paths["info"].is_file():
        return paths["int8"], json.loads(paths["info"].read_text())
    with _file_lock(paths["lock"]):
        if paths["int8"].is_file() and paths["info"].is_file():  # another process finished meanwhile
            return paths["int8"], json.loads(paths["info"].read_text())
        pairs = calibration_pairs(mode)
        if not pairs:
            raise RuntimeError("no calibration slices found (tests/fixtures/slices or $COVIDSEG_CALIBRATION_DIR)")
        t0 = time.time()
        if log:
            log(f"building the INT8 model for these weights (one-time, cached in {paths['int8'].parent}) ...")
        keras_model = keras_factory()
        if not paths["fp32"].is_file():
            export_onnx(keras_model, paths["fp32"])
        calib = _calibration_inputs(pairs, mode, framing)
        quantize_int8(paths["fp32"], paths["int8"], calib)
        info = {"digest": digest, "preprocessing": mode, "framing": framing, "recipe": ONNX_RECIPE,
                "calibration_slices": len(pairs), "calibration_inputs": int(len(calib)),
                **_dice_check(_KerasRunner(keras_model), _OrtRunner(paths["int8"]), pairs, mode, framing),
                "seconds": round(time.time() - t0, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = paths["info"].with_name(paths["info"].name + ".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, paths["info"])
        if log:
            log(f"INT8 model ready in {info['seconds']:.0f} s (calibration Dice fp32 "
                f"{info.get('dice_fp32', float('nan')):.4f}, int8 {info.get('dice_int8', float('nan')):.4f})")
        return paths["int8"], info


def int8_dice_ok(info: dict) -> bool:
    if not info.get("n_images"):
        return True  # nothing labelled to compare on: agreement with fp32 was not measurable
    return abs(info["dice_int8"] - info["dice_fp32"]) <= AUTO_MAX_DICE_DROP


# --------------------------------------------------------------------------------------------------------------
# Segmenter
# --------------------------------------------------------------------------------------------------------------
def _stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Segmenter:
    """The U-Net, loaded once; `predict` maps images of any size to probability maps at their own size.

    weights=None -> the shipped weights. `model=` (a built Keras model) replaces weights, e.g. in tests.
    framing=None -> the weights' own (`metadata["framing"]`, "full" when absent; see `shared.core.framing`).
    threads -> onnxruntime's intra-op threads (int8), or TensorFlow's pools (`set_tf_threads`, fp32/bf16);
    None = the runtime's default (all cores).
    """

    def __init__(self, weights=None, backend: str = "auto", preprocessing: str = "covidseg", batch_size: int = 8,
                 *, model=None, cache_root=None, threads: int | None = None, log=_stderr_log,
                 framing: str | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if preprocessing not in MODES:
            raise ValueError(f"unknown preprocessing {preprocessing!r}; choose one of {', '.join(MODES)}")
        if int(batch_size) < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.preprocessing = preprocessing
        self.batch_size = int(batch_size)
        self.requested_backend = backend
        self.cache_root = cache_root
        self.threads = threads
        self._log = log or (lambda m: None)
        self._keras = model
        self.int8_info: dict | None = None
        if model is not None:
            self.weights = None
            self.weights_format = "model"
            self._digest = None
        else:
            self.weights = Path(weights) if weights else Path(model_lib.DEFAULT_WEIGHTS)
            info = inspect_weights(self.weights)
            self.weights_format = info["format"]
            self.weights_metadata = info.get("metadata", {})
            self._digest = None
        if model is not None:
            self.weights_metadata = {}
        self.framing = framing or self.weights_metadata.get("framing", "full")
        if self.framing not in FRAMINGS:
            raise ValueError(f"unknown framing {self.framing!r}; choose one of {', '.join(FRAMINGS)}")
        if self.framing == "lung":
            set_tf_threads(threads)  # the lung model that frames each slice runs on TensorFlow, whatever the backend
        self.device = self._device()
        self.backend = self._resolve(backend)
        self._runner = self._make_runner(self.backend)

    # ---- setup -----------------------------------------------------------------------------------------------
    @staticmethod
    def _device() -> str:
        if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not any(Path("/dev").glob("nvidia[0-9]*")):
            return "cpu"  # no NVIDIA device node: skip importing TensorFlow just to ask
        try:
            import tensorflow as tf

            return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
        except Exception:  # noqa: BLE001
            return "cpu"

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = _model_digest(self._keras) if self.weights is None else file_digest(self.weights)
        return self._digest

    def keras_model(self, precision: str = "fp32"):
        """The Keras model (built and loaded on first use; `threads` sizes TensorFlow's pools before that)."""
        set_tf_threads(self.threads)
        if precision == "fp32":
            if self._keras is None:
                self._keras = _build_keras(self.weights, "fp32")
            return self._keras
        if self.weights is None:
            m = model_lib.build_unet(input_shape=self._keras.input_shape[1:], precision=precision)
            m.set_weights(self._keras.get_weights())
            return m
        return _build_keras(self.weights, precision)

    def _resolve(self, backend: str) -> str:
        if backend != "auto":
            return backend
        if self.device == "gpu":
            return "fp32"
        return "int8"  # checked against fp32 Dice in _make_runner; falls back to fp32 there

    def _make_runner(self, backend: str):
        if backend == "fp32":
            return _KerasRunner(self.keras_model("fp32"))
        if backend == "bf16":
            return _KerasRunner(self.keras_model("bf16"))
        try:
            path, info = ensure_int8(self.digest, self.preprocessing, lambda: self.keras_model("fp32"),
                                     root=self.cache_root, log=self._log, framing=self.framing)
            runner = _OrtRunner(path, self.threads)
        except WeightsError:
            raise
        except Exception as exc:  # noqa: BLE001 - any conversion/runtime failure: fall back to fp32
            warnings.warn(f"INT8 backend unavailable ({type(exc).__name__}: {exc}); using fp32", stacklevel=3)
            self.backend = "fp32"
            return _KerasRunner(self.keras_model("fp32"))
        self.int8_info = info
        if self.requested_backend == "auto" and not int8_dice_ok(info):
            self._log(f"auto: INT8 Dice {info['dice_int8']:.4f} is more than {AUTO_MAX_DICE_DROP} from fp32 "
                      f"{info['dice_fp32']:.4f} on the calibration slices; using fp32")
            self.backend = "fp32"
            return _KerasRunner(self.keras_model("fp32"))
        return runner

    def describe(self) -> dict:
        return {"backend": self.backend, "requested_backend": self.requested_backend, "device": self.device,
                "preprocessing": self.preprocessing, "framing": self.framing,
                "weights": str(self.weights) if self.weights else None,
                "weights_format": self.weights_format, "batch_size": self.batch_size,
                **({"int8_check": self.int8_info} if self.int8_info else {})}

    # ---- inference -------------------------------------------------------------------------------------------
    def frames(self, images) -> list[Frame]:
        """Where the model looks in each image (`shared.core.framing`; the whole image for framing "full")."""
        return frame_slices(images, self.framing)

    def prepare(self, images, frames: list[Frame] | None = None) -> np.ndarray:
        """Images -> the float32 (N, 448, 448, 1) model input: `preprocess` of each image's frame (`frames`, or
        this Segmenter's framing of them)."""
        images = list(images)
        frames = self.frames(images) if frames is None else frames
        return np.stack([preprocess(f.crop(np.asarray(im)), self.preprocessing)
                         for im, f in zip(images, frames)])[..., None]

    def predict_model_input(self, x: np.ndarray) -> np.ndarray:
        """(N, 448, 448, 1) preprocessed batch -> (N, 448, 448) float32 probabilities (one runner call)."""
        return self._runner(np.asarray(x, dtype=np.float32))

    def predict(self, images, batch_size: int | None = None, progress: bool = False) -> list[np.ndarray]:
        """List of 2-D/3-D numeric images -> list of float32 (H, W) probability maps at each image's size."""
        images = list(images)
        if not images:
            return []
        bs = int(batch_size or self.batch_size)
        out: list[np.ndarray] = []
        bar = None
        if progress and len(images) > bs:
            from tqdm import tqdm

            bar = tqdm(total=len(images), desc="segmenting", unit="slice", file=sys.stderr)
        for i in range(0, len(images), bs):
            chunk = images[i:i + bs]
            frames = self.frames(chunk)
            probs = self.predict_model_input(self.prepare(chunk, frames))
            out.extend(f.paste(p) for f, p in zip(frames, probs))  # back to each image's size, 0 off-frame
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return out

    def predict_volume(self, volume, window=None, batch_size: int | None = None, progress: bool = False,
                       images: list | None = None) -> np.ndarray:
        """`shared.core.imageio.Volume` -> float32 (n_slices, rows, cols) probabilities on the volume's display grid.

        HU volumes are lung-windowed (`window`, default level -600 / width 1500) before preprocessing.
        """
        from shared.core.imageio import LUNG_WINDOW

        if images is None:
            images = volume.slice_images(LUNG_WINDOW if window is None else window)
        return np.stack(self.predict(images, batch_size=batch_size, progress=progress))


@functools.lru_cache(maxsize=4)
def get_segmenter(weights=None, backend: str = "auto", preprocessing: str = "covidseg") -> Segmenter:
    """One Segmenter per (weights, backend, preprocessing) per process (workers, repeated CLI calls in tests)."""
    return Segmenter(weights=weights, backend=backend, preprocessing=preprocessing)
