"""Bad input -> `error: <message>` on stderr, exit code 2, no traceback (the CLI run as a subprocess).

All of these fail before TensorFlow is imported, so each run takes about a second.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from .conftest import FIXTURES, REPO

SLICE = FIXTURES / "slices" / "covid_0300.png"


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=120)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "text.png").write_text("this is a text file, renamed to .png\n")
    png = SLICE.read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 3])
    (d / "empty.png").write_bytes(b"")
    (d / "weights.h5").write_text("not weights\n")
    with h5py.File(d / "other.h5", "w") as f:
        f["data"] = np.arange(10)
    bomb = bytearray(png)
    bomb[16:24] = (60000).to_bytes(4, "big") * 2
    (d / "bomb.png").write_bytes(bytes(bomb))
    (d / "empty_dir").mkdir()
    for sub, size in (("images", (20, 20)), ("masks", (24, 24))):
        (d / "mm" / sub).mkdir(parents=True)
        cv2.imwrite(str(d / "mm" / sub / "x.png"), np.zeros(size, np.uint8))
    (d / "other_masks").mkdir()
    cv2.imwrite(str(d / "other_masks" / "y.png"), np.zeros((20, 20), np.uint8))
    (d / "bad_preds").mkdir()
    (d / "bad_preds" / "y.png").write_text("not a png")
    (d / "notvol.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    return d


CASES = {
    "missing file": lambda d: ["predict", d / "nope.png", "--out", d / "o"],
    "text file renamed .png": lambda d: ["predict", d / "text.png", "--out", d / "o"],
    "truncated PNG": lambda d: ["predict", d / "truncated.png", "--out", d / "o"],
    "empty file": lambda d: ["predict", d / "empty.png", "--out", d / "o"],
    "decompression bomb": lambda d: ["predict", d / "bomb.png", "--out", d / "o"],
    "wrong weights file (text)": lambda d: ["predict", SLICE, "--out", d / "o", "--weights", d / "weights.h5"],
    "wrong weights file (other HDF5)": lambda d: ["predict", SLICE, "--out", d / "o", "--weights", d / "other.h5"],
    "missing weights file": lambda d: ["evaluate", "--images", FIXTURES / "slices", "--masks", FIXTURES / "masks",
                                       "--weights", d / "missing.h5"],
    "unknown backend": lambda d: ["predict", SLICE, "--out", d / "o", "--backend", "fp8"],
    "bad preprocessing": lambda d: ["predict", SLICE, "--out", d / "o", "--preprocessing", "magic"],
    "bad threshold": lambda d: ["predict", SLICE, "--out", d / "o", "--threshold", "1.5"],
    "bad window": lambda d: ["predict", SLICE, "--out", d / "o", "--window", "wide"],
    "mismatched mask size": lambda d: ["evaluate", "--images", d / "mm" / "images", "--masks", d / "mm" / "masks"],
    "empty folder": lambda d: ["evaluate", "--images", d / "empty_dir", "--masks", FIXTURES / "masks"],
    "empty input folder": lambda d: ["predict", d / "empty_dir", "--out", d / "o"],
    "no pairs": lambda d: ["evaluate", "--images", d / "mm" / "images", "--masks", d / "other_masks"],
    "unreadable prediction": lambda d: ["evaluate", "--masks", d / "other_masks", "--predictions", d / "bad_preds"],
    "damaged NIfTI": lambda d: ["predict", d / "notvol.nii.gz", "--out", d / "o"],
    "convert: image instead of volume": lambda d: ["convert", SLICE, "--out", d / "c"],
    "convert: --every 0": lambda d: ["convert", d / "notvol.nii.gz", "--out", d / "c", "--every", "0"],
    "bench: unknown backend list": lambda d: ["bench", "--backends", "fp32,tpu"],
    "bench: --processes 0": lambda d: ["bench", "--processes", "0"],
    "unknown command": lambda d: ["segment-everything"],
    "train: missing data folder": lambda d: ["train", "--covid-root", d / "nope", "--run-dir", d / "run"],
}


@pytest.fixture(scope="module")
def results(bad):
    """All cases run once, 4 subprocesses at a time (each is a fresh interpreter: ~1 s, mostly imports)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_cli, *make(bad)) for name, make in CASES.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_error_line(results, name):
    r = results[name]
    assert r.returncode == 2, (name, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert lines, r.stderr
    assert len(lines[-1]) > len("error: ") + 10  # a real message, not just the prefix
    if name in MESSAGES:
        assert MESSAGES[name] in lines[-1]


#: what the message must say for some of the cases
MESSAGES = {
    "truncated PNG": "truncated PNG",
    "text file renamed .png": "text file",
    "mismatched mask size": "20x20",
    "decompression bomb": "too large",
    "wrong weights file (text)": "not a weights file",
    "unreadable prediction": "y.png: not an image",
    "empty file": "empty file",
    "missing file": "no such file",
    "bench: --processes 0": "--processes must be between 1 and 64",
}


def test_help_and_module_entry_point():
    r = run_cli("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("convert", "train", "evaluate", "predict", "bench"))
    exe = Path(sys.executable).with_name("covidseg")
    if exe.exists():  # the console script installed by `pip install -e .`
        r2 = subprocess.run([str(exe), "predict", "--help"], capture_output=True, text=True, timeout=60)
        assert r2.returncode == 0 and "--backend" in r2.stdout
