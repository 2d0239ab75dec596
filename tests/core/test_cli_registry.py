"""The command registry: modules listed in cli.COMMAND_MODULES; a broken optional module breaks nothing."""
from __future__ import annotations

import sys

import pytest

import cli as cli
from cli import model as model_commands


@pytest.fixture
def broken_module(tmp_path, monkeypatch):
    (tmp_path / "covidseg_broken_cli.py").write_text("import not_installed_dependency_xyz\n")
    (tmp_path / "covidseg_bad_register.py").write_text("def register(sub):\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for m in ("covidseg_broken_cli", "covidseg_bad_register"):
        sys.modules.pop(m, None)


def test_broken_optional_modules_do_not_break_core(broken_module, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["cli.model", "covidseg_broken_cli",
                                                 "covidseg_bad_register", "covidseg_absent_module_xyz"])
    parser = cli.build_parser()
    assert set(parser.unavailable) == {"covidseg_broken_cli", "covidseg_bad_register"}
    args = parser.parse_args(["evaluate", "--masks", "m", "--predictions", "p"])
    assert args.func is model_commands.cmd_evaluate
    assert cli.main(["token", "create", "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "covidseg_broken_cli" in err and "boom" in err


def test_train_is_mounted_from_training_train(monkeypatch, tmp_path):
    from training import train

    seen = {}
    monkeypatch.setattr(train, "run", lambda args: seen.setdefault("args", args) and 0)
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    rc = cli.main(["train", "--images", str(tmp_path / "i"), "--masks", str(tmp_path / "m"),
                   "--run-dir", str(tmp_path / "run"), "--epochs", "3", "--crop", "0"])
    assert rc == 0
    a = seen["args"]
    assert (a.epochs, a.crop, a.batch_size, a.precision) == (3, 0, 8, "fp32")  # train's own defaults


def test_flops_per_slice(real_segmenter):
    from cli.bench import conv_flops

    f = conv_flops(real_segmenter.keras_model())
    assert 40e9 < f["total"] < 55e9  # ~47 GFLOP per 448x448 slice
    assert f["conv"] > 0.9 * f["total"]
