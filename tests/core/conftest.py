"""Fixtures of the core suite (no services, no /work/shared).

- The int8/ONNX cache goes to a session temp dir (COVIDSEG_CACHE_DIR, inherited by CLI subprocesses; the
  `_isolated_cache` fixture of tests/conftest.py, shared with the service stacks).
- The real (shipped) model is loaded at most once per backend per session via `shared.core.inference.get_segmenter`.
- `threshold_model`: a one-layer Keras "U-Net stand-in" whose output is sigmoid(40 * (x - 0.5)) of the
  preprocessed input: bright structures become the mask. It makes geometry tests meaningful whatever the shipped
  weights hold (they are a random-init placeholder until the lead ships trained weights).
- Tests that need *trained* weights are marked `@pytest.mark.trained` and skipped while the placeholder ships.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FIXTURES = REPO / "tests" / "fixtures"
#: the user's persistent cache (before the session isolates it): trained-weights tests reuse built INT8 models
PERSISTENT_CACHE = os.environ.get("COVIDSEG_CACHE_DIR") or str(Path.home() / ".cache" / "covidseg")


def pytest_configure(config):
    config.addinivalue_line("markers", "trained: needs trained weights (skipped while the placeholder ships)")


@pytest.fixture(scope="session")
def fixture_pairs():
    """[(stem, gray uint8, mask bool)] of the real fixture slices."""
    out = []
    for p in sorted((FIXTURES / "slices").iterdir()):
        img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        m = cv2.imread(str(FIXTURES / "masks" / f"{p.stem}.png"), cv2.IMREAD_GRAYSCALE) > 0
        out.append((p.stem, img, m))
    assert len(out) == 6
    return out


@pytest.fixture(scope="session")
def real_segmenter():
    """The shipped weights, fp32 TensorFlow, loaded once (shared with in-process CLI calls)."""
    from shared.core.inference import get_segmenter

    return get_segmenter(None, "fp32", "covidseg")


@pytest.fixture(scope="session")
def threshold_model():
    from shared.core import model as _  # noqa: F401  (sets the Keras environment first)
    import tensorflow as tf

    keras = tf.keras
    inp = keras.Input((448, 448, 1), name="input_1")
    out = keras.layers.Conv2D(1, 1, activation="sigmoid", name="thresh")(inp)
    m = keras.Model(inp, out)
    m.get_layer("thresh").set_weights([np.full((1, 1, 1, 1), 40.0, np.float32), np.array([-20.0], np.float32)])
    return m


@pytest.fixture(scope="session")
def threshold_segmenter(threshold_model):
    from shared.core.inference import Segmenter

    return Segmenter(model=threshold_model, backend="fp32")


def trained_weights() -> bool:
    from shared.core.inference import inspect_weights
    from shared.core.model import DEFAULT_WEIGHTS

    meta = inspect_weights(DEFAULT_WEIGHTS).get("metadata", {})
    return "placeholder" not in str(meta.get("note", "")) and bool(meta)
