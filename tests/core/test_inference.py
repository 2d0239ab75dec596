"""Segmenter: train == serve preprocessing, output sizes, INT8 cache + fallback, auto, seed weights."""
from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest

from shared.core import inference
from shared.core.inference import Segmenter, WeightsError
from shared.core.preprocessing import preprocess
from training.augment import make_example

from .conftest import FIXTURES


def test_train_and_serve_preprocessing_identical(fixture_pairs, threshold_segmenter):
    imgs = [img for _, img, _ in fixture_pairs]
    served = threshold_segmenter.prepare(imgs)
    assert served.shape == (6, 448, 448, 1) and served.dtype == np.float32
    for (_, img, mask), x in zip(fixture_pairs, served):
        train_x, train_y = make_example(img, mask.astype(np.uint8), None)
        assert np.array_equal(train_x, x[..., 0])          # bit-identical
        assert np.array_equal(train_x, preprocess(img))
        assert train_y.shape == (448, 448) and set(np.unique(train_y)) <= {0.0, 1.0}


def test_predict_returns_maps_at_each_input_size(fixture_pairs, threshold_segmenter):
    imgs = [img for _, img, _ in fixture_pairs] + [np.zeros((17, 900), np.uint16)]
    probs = threshold_segmenter.predict(imgs, batch_size=3)
    assert [p.shape for p in probs] == [im.shape for im in imgs]
    assert all(p.dtype == np.float32 and 0.0 <= p.min() and p.max() <= 1.0 for p in probs)
    # the stand-in model is sigmoid(40 (x - 0.5)) of the preprocessed input, resized back with INTER_LINEAR
    x = preprocess(imgs[0])
    ref = cv2.resize(1 / (1 + np.exp(-(40 * x - 20))), imgs[0].shape[::-1], interpolation=cv2.INTER_LINEAR)
    assert np.allclose(probs[0], ref, atol=1e-5)


def test_real_model_predicts_at_input_size(fixture_pairs, real_segmenter):
    imgs = [img for _, img, _ in fixture_pairs[3:]]
    probs = real_segmenter.predict(imgs)
    assert [p.shape for p in probs] == [im.shape for im in imgs]
    assert real_segmenter.backend == "fp32"
    assert all(np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1 for p in probs)


def test_int8_cached_by_weights_hash_and_close_to_fp32(tmp_path, threshold_model, fixture_pairs, monkeypatch):
    seg = Segmenter(model=threshold_model, backend="int8", cache_root=tmp_path, log=None)
    assert seg.backend == "int8"
    files = sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx"))
    assert len(files) == 2 and all(f.startswith(seg.digest[:20]) for f in files)
    info = seg.int8_info
    assert info["n_images"] == 6 and abs(info["dice_int8"] - info["dice_fp32"]) <= 0.01
    imgs = [img for _, img, _ in fixture_pairs]
    fp32 = Segmenter(model=threshold_model, backend="fp32").predict(imgs)
    int8 = seg.predict(imgs)
    for a, b in zip(fp32, int8):
        agree = np.mean((a >= 0.5) == (b >= 0.5))
        assert agree > 0.99 and np.abs(a - b).mean() < 0.02
    # second Segmenter: served from the cache, no conversion
    monkeypatch.setattr(inference, "export_onnx", lambda *a, **k: pytest.fail("re-converted"))
    monkeypatch.setattr(inference, "quantize_int8", lambda *a, **k: pytest.fail("re-quantized"))
    again = Segmenter(model=threshold_model, backend="int8", cache_root=tmp_path, log=None)
    assert again.backend == "int8" and np.allclose(again.predict(imgs[:1])[0], int8[0])
    # auto on CPU picks int8 when its Dice matches fp32 ...
    assert Segmenter(model=threshold_model, backend="auto", cache_root=tmp_path, log=None).backend == "int8"
    # ... and fp32 when it does not
    monkeypatch.setattr(inference, "int8_dice_ok", lambda info: False)
    assert Segmenter(model=threshold_model, backend="auto", cache_root=tmp_path, log=None).backend == "fp32"


def test_int8_falls_back_to_fp32_with_warning(tmp_path, threshold_model, monkeypatch):
    def broken(*a, **k):
        raise ImportError("No module named 'tf2onnx'")

    monkeypatch.setattr(inference, "ensure_int8", broken)
    with pytest.warns(UserWarning, match="INT8 backend unavailable"):
        seg = Segmenter(model=threshold_model, backend="int8", cache_root=tmp_path, log=None)
    assert seg.backend == "fp32"
    assert seg.predict([np.zeros((10, 10), np.uint8)])[0].shape == (10, 10)


def test_bad_arguments_rejected(threshold_model, tmp_path):
    with pytest.raises(ValueError, match="backend"):
        Segmenter(model=threshold_model, backend="fp16")
    with pytest.raises(ValueError, match="preprocessing"):
        Segmenter(model=threshold_model, preprocessing="clahe")
    with pytest.raises(WeightsError, match="not found"):
        Segmenter(weights=tmp_path / "none.h5")
    (tmp_path / "t.h5").write_text("x")
    with pytest.raises(WeightsError, match="not a weights file"):
        Segmenter(weights=tmp_path / "t.h5")


@pytest.fixture(scope="module")
def seed_model():
    import segmentation_models as sm
    import tensorflow as tf

    tf.keras.utils.set_random_seed(7)
    return sm.Unet("resnet34", input_shape=(448, 448, 1), encoder_weights=None)


def test_seed_weights_match_keras_predict(tmp_path, fixture_pairs, seed_model):
    """A predecessor file (Unet('resnet34', input_shape=(448,448,1)), Keras HDF5) with raw 0..255 INTER_AREA input."""
    path = tmp_path / "seed.hdf5"
    seed_model.save_weights(str(path))
    seg = Segmenter(weights=path, backend="fp32", preprocessing="seed", log=None)
    assert seg.weights_format == "keras"
    img = fixture_pairs[5][1]  # a MedSeg slice of its own size (385x433)
    ours = seg.predict([img])[0]
    x = cv2.resize(img, (448, 448), interpolation=cv2.INTER_AREA).astype(np.float32)
    ref = seed_model.predict(x[None, ..., None], verbose=0)[0, ..., 0]
    ref = cv2.resize(ref, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
    assert ours.shape == img.shape and ours.std() > 0
    assert np.allclose(ours, ref, rtol=0, atol=1e-5)
    # the predecessor may also have used model.save(): the same weights load from that file
    full = tmp_path / "seed_full.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "HDF5 is legacy": that is the point
        seed_model.save(str(full))
    assert inference.inspect_weights(full)["format"] == "keras"
    model = seg.keras_model()
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])
    from shared.core.model import load_weights

    load_weights(model, full)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), seed_model.get_weights()))


def test_wrong_architecture_keras_file_is_a_weights_error(tmp_path):
    import tensorflow as tf

    small = tf.keras.Sequential([tf.keras.Input((8, 8, 1)), tf.keras.layers.Conv2D(2, 3)])
    small.save_weights(str(tmp_path / "small.h5"))
    with pytest.raises(WeightsError, match="does not fit"):
        Segmenter(weights=tmp_path / "small.h5", backend="fp32", log=None)


@pytest.mark.trained
def test_trained_weights_int8_dice_within_001_of_fp32(fixture_pairs):
    from .conftest import PERSISTENT_CACHE, trained_weights

    if not trained_weights():
        pytest.skip("the shipped weights are the random-init placeholder")
    from shared.core.metrics import dice_iou_counts

    fp32 = Segmenter(backend="fp32", log=None)
    int8 = Segmenter(backend="int8", cache_root=PERSISTENT_CACHE, log=None)  # built once, then cached
    imgs = [img for _, img, _ in fixture_pairs]
    d = {}
    for name, seg in (("fp32", fp32), ("int8", int8)):
        d[name] = np.mean([dice_iou_counts(p >= 0.5, m)[0]
                           for p, (_, _, m) in zip(seg.predict(imgs), fixture_pairs)])
    assert d["fp32"] > 0.4
    assert abs(d["int8"] - d["fp32"]) <= 0.01


def test_onnx_export_matches_keras_with_upsampling(tmp_path):
    """The exported graph, with all of `shared.core.onnx_graph`'s rewrites applied (U-Net-like: a skip concat after an
    upsampling, an upsampling straight into a 3x3 conv + ReLU, a BatchNormalization that cannot fold into a conv),
    computes what Keras computes, borders included."""
    import collections

    import onnx
    import onnxruntime as ort
    import tensorflow as tf

    keras = tf.keras
    tf.keras.utils.set_random_seed(0)
    inp = keras.Input((64, 64, 1))
    d = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    bn = keras.layers.BatchNormalization()
    d = bn(d)  # after a ReLU: tf2onnx cannot fold it into the conv
    p = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(keras.layers.MaxPooling2D(2)(d))
    u = keras.layers.UpSampling2D(2)(keras.layers.MaxPooling2D(2)(p))
    s = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(keras.layers.Concatenate()([u, p]))
    s = keras.layers.Conv2D(5, 3, padding="same")(keras.layers.UpSampling2D(2)(s))
    s = keras.layers.ReLU()(s)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid")(keras.layers.Concatenate()([s, d]))
    m = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    bn.set_weights([rng.uniform(0.5, 2, 4), rng.normal(0, 1, 4), rng.normal(0, 1, 4), rng.uniform(0.5, 2, 4)])
    path = inference.export_onnx(m, tmp_path / "m.onnx", input_size=64)
    nodes = onnx.load(str(path)).graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    assert ops["Resize"] == 0 and ops["BatchNormalization"] == 0
    rewritten = sorted(f"{n.op_type}{suffix}" for n in nodes for suffix in ("_subpixel_conv", "_x2_w2", "_depthwise")
                       if n.name.endswith(suffix))
    assert rewritten == ["Concat_x2_w2", "Conv_depthwise", "Conv_subpixel_conv"]
    x = rng.random((2, 64, 64, 1), dtype=np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(got - m.predict(x, verbose=0)).max() < 1e-5


def test_int8_weights_keep_to_7_bits_so_cpus_without_vnni_cannot_saturate(tmp_path):
    """onnxruntime's u8 x s8 kernels on AVX2/AVX-512 CPUs without VNNI sum pairs of products in int16: full 8-bit
    weights saturate there (the shipped weights lost 0.107 mean Dice on an AMD EPYC with AVX2). With every weight
    in [-64, 64], 255 * 64 * 2 < 2^15, so the integers are the same on every CPU."""
    import onnx
    import onnxruntime as ort
    import tensorflow as tf
    from onnx import numpy_helper

    keras = tf.keras
    tf.keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid")(h)
    m = keras.Model(inp, out)
    fp32 = inference.export_onnx(m, tmp_path / "m.onnx", input_size=32)
    x = np.random.default_rng(0).random((4, 32, 32, 1), dtype=np.float32)
    int8 = inference.quantize_int8(fp32, tmp_path / "m.int8.onnx", x)
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(int8)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and t.dims and len(t.dims) == 4]
    assert len(weights) == 2  # one per convolution (the other int8 tensors are zero points)
    # per channel, the largest weight maps to the 7-bit limit and none goes beyond it
    assert all((np.abs(w).reshape(len(w), -1).max(axis=1) == 64).all() for w in weights)
    got = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(got - m.predict(x, verbose=0)).max() < 0.05
