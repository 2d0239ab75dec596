"""training.average: checkpoint weights are averaged element-wise; BatchNorm statistics become the plain mean of
the per-batch statistics; bad arguments give a message and exit code 2."""
from __future__ import annotations

import numpy as np
import pytest

from shared.core import model as model_lib
from training import average


def _tiny_model():
    import tensorflow as tf

    keras = tf.keras
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(3, 3, padding="same", use_bias=False)(inp)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid")(x))


def test_average_is_the_elementwise_mean(tmp_path):
    m = _tiny_model()
    rng = np.random.default_rng(0)
    sets = [[rng.normal(size=w.shape).astype(np.float32) for w in m.get_weights()] for _ in range(3)]
    paths = []
    for i, ws in enumerate(sets):
        m.set_weights(ws)
        paths.append(model_lib.save_weights(m, tmp_path / f"e{i}.h5", dtype="float32", metadata={"epoch": i + 1}))
    values, metas = average.average(paths)
    assert [meta["epoch"] for meta in metas] == [1, 2, 3]
    for got, *parts in zip(values, *sets):
        assert np.allclose(got, np.mean(parts, axis=0), atol=1e-6)


def test_batchnorm_update_is_the_mean_of_batch_statistics():
    m = _tiny_model()
    conv_w = m.layers[1].get_weights()[0]
    rng = np.random.default_rng(1)
    xs = [rng.normal(loc=i, size=(4, 8, 8, 1)).astype(np.float32) for i in range(5)]
    assert average.update_batchnorm(m, iter([(x, None) for x in xs]), len(xs)) == 1
    bn = m.layers[2]
    import tensorflow as tf

    conv = tf.keras.Model(m.input, m.layers[1].output)
    per_batch = [conv(x).numpy().reshape(-1, 3) for x in xs]
    moving_mean, moving_var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    assert np.allclose(moving_mean, np.mean([f.mean(0) for f in per_batch], axis=0), atol=1e-4)
    assert np.allclose(moving_var, np.mean([f.var(0, ddof=1) for f in per_batch], axis=0), rtol=1e-4)  # Keras: unbiased
    assert bn.momentum == 0.99 and np.array_equal(m.layers[1].get_weights()[0], conv_w)  # nothing else changed


@pytest.mark.parametrize("args, message", [
    (["--checkpoints", "nope.h5", "other.h5"], "not found"),
    (["--checkpoints", "A"], "at least 2"),
    (["--checkpoints", "A", "B"], "needs --covid-root"),
])
def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, args, message):
    for name in ("A", "B"):
        (tmp_path / name).write_bytes(b"x")
    args = [a if a in ("nope.h5", "other.h5") or a.startswith("--") else str(tmp_path / a) for a in args]
    assert average.main(["--run-dir", str(tmp_path), "--out", str(tmp_path / "o.h5"), *args]) == 2
    assert message in capsys.readouterr().err


def test_not_a_weights_file_exits_2(tmp_path, capsys):
    for name in ("A", "B"):
        (tmp_path / name).write_bytes(b"not hdf5")
    assert average.main(["--run-dir", str(tmp_path), "--out", str(tmp_path / "o.h5"), "--no-bn-update",
                         "--checkpoints", str(tmp_path / "A"), str(tmp_path / "B")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "o.h5").exists()
