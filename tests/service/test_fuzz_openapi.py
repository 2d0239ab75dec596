"""Property-based testing of the API against its own OpenAPI document with schemathesis (an outside tool), on
the real stack: gunicorn, Redis, SeaweedFS, the database, a worker (so /predict answers).

Every operation, every check (`--checks all`: no 5xx, status codes, content types, headers and response schemas
as documented, schema-invalid data rejected, schema-valid data accepted, auth enforced, undeclared methods
answered 405 with Allow, response time), all four phases (examples, coverage, fuzzing, stateful). Uploads are
real images and NIfTI volumes (tests/service/fuzz_hooks.py). This bounded run is part of `make test`; `make fuzz`
runs the same with many more examples.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def run_schemathesis(url: str, token: str, max_examples: int, seed: int, out: Path, timeout: float) -> \
        subprocess.CompletedProcess:
    cmd = [str(SCHEMATHESIS), "--config-file", str(REPO / "tests" / "service" / "schemathesis.toml"), "--no-color",
           "run", f"{url}/api/v1/openapi.json", "--checks", "all", "-H", f"Authorization: Bearer {token}",
           "--max-examples", str(max_examples), "--seed", str(seed), "--workers", "1",
           # /predict waits for its job behind the fuzzer's own submissions, up to COVIDSEG_PREDICT_TIMEOUT (150 s
           # in the test stack) before its 504: the client must wait longer than that
           "--phases", "examples,coverage,fuzzing,stateful", "--request-timeout", "200",
           "--max-response-time", "180", "--generation-database", "none",
           "--report", "junit", "--report-junit-path", str(out)]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="tests.service.fuzz_hooks",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis is not installed (requirements.txt)")
# make test: the production database only; make fuzz: both
@pytest.mark.parametrize("stack", os.environ.get("COVIDSEG_FUZZ_BACKENDS", "postgresql").split(","), indirect=True)
def test_schemathesis_finds_nothing_on_any_operation(stack, tmp_path):
    stack.ensure_worker()
    res = run_schemathesis(stack.url, stack.token, max_examples=int(os.environ.get("COVIDSEG_FUZZ_EXAMPLES", 12)),
                           seed=20261203, out=tmp_path / "junit.xml", timeout=900)
    out = res.stdout + res.stderr
    (tmp_path / "schemathesis.log").write_text(out)
    summary = out.find("SUMMARY")
    print(out[summary:] if summary >= 0 else out[-2000:])  # shown with `pytest -s` (make fuzz)
    failures = out.find("FAILURES")
    assert res.returncode == 0, out[failures:failures + 8000] if failures >= 0 else out[-6000:]
    # every operation of the document was selected and tested
    selected, tested = re.search(r"Selected: (\d+)/(\d+)", out), re.search(r"Tested: (\d+)", out)
    assert selected and tested, out[-3000:]
    assert selected.group(1) == selected.group(2) == tested.group(1) and int(tested.group(1)) >= 16
