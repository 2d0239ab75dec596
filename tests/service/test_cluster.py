"""Scale-out on one machine (scripts/cluster.py, issue "Scale-out shown, not claimed"): a services host (Redis,
SeaweedFS, PostgreSQL), an API host with two gunicorn replicas, a client and two worker hosts, each in its own
network namespace, reachable only at its namespace address. Two batches and a study are submitted; once both
worker hosts run jobs, one host's link is cut. Its leased jobs must be re-queued by the sweep and finish on the
other host, once each, with one result set each; when the link comes back, its late attempt must change no job
row. Takes ~1.5 minutes (fp32 workers: no INT8 build). Skipped where network namespaces cannot be made.

The namespaces and every process in them are removed even when the run fails or times out (`cluster.cleanup`).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import cluster  # noqa: E402

NICE = int(os.environ.get("COVIDSEG_TEST_NICE", "15"))


@pytest.fixture(scope="module")
def cutoff(tmp_path_factory):
    ok, why = cluster.namespaces_supported()
    if not ok:
        pytest.skip(f"network namespaces unavailable here: {why}")
    tag = "t" + secrets.token_hex(3)
    out = tmp_path_factory.mktemp("cluster") / "cluster.json"
    cmd = [sys.executable, str(REPO / "scripts" / "cluster.py"), "run", "--workers", "2", "--slices", "16",
           "--posts", "2", "--studies", "1", "--study-slices", "3", "--backend", "fp32", "--cut", "link",
           "--cut-after-done", "0", "--min-cut-seconds", "15", "--settle-min", "15", "--settle-timeout", "90",
           "--done-timeout", "150", "--probe-slices", "0", "--nice", str(NICE), "--tag", tag, "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDSEG_") or k == "COVIDSEG_CACHE_DIR"}
    proc = None
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        # whatever happened (failure, timeout: the supervisor is SIGKILLed), nothing of the run may stay
        removed = cluster.cleanup(tag)
        shutil.rmtree(cluster.STATE_ROOT / f"covidseg-cluster-{tag}", ignore_errors=True)
        assert cluster.run_namespaces(tag) == [], "namespaces left behind"
    log = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert out.exists(), log
    result = json.loads(out.read_text())
    result["_log"], result["_removed_by_cleanup"] = log, removed
    return result


def test_a_cut_off_worker_host_loses_and_duplicates_nothing(cutoff):
    s, log = cutoff["summary"], cutoff["_log"]
    assert s["jobs_submitted"] == 16 and s["studies_submitted"] == 1, log
    # 0 lost: every job and the study succeeded
    assert s["lost"] == 0 and s["jobs_succeeded"] == 16 and s["studies_succeeded"] == 1, (cutoff["lost_ids"], log)
    # the cut host held running jobs; each was re-queued and finished on the other host
    assert s["inflight_on_cut_host"] > 0, log
    assert s["inflight_finished_on_other_hosts"] == s["inflight_on_cut_host"], log
    assert set(cutoff["inflight_ids"]) <= set(cutoff["redelivered_ids"]), log
    other = [h for h in s["finished_per_host"] if h != s["cut_host"]]
    assert sum(s["finished_per_host"][h]["jobs"] for h in other) >= s["inflight_on_cut_host"], log
    # 0 duplicated: one result set per job and study (nothing else under their prefixes, never two different
    # contents under one key), matching the checksums in the rows
    assert s["duplicates"] == 0 and s["missing_results"] == 0 and s["checksum_mismatches"] == 0, \
        (cutoff["duplicate_keys"], cutoff["missing_results"], log)
    # the late attempt after the heal was refused by the lease: no job row changed (worker, attempts,
    # finished_at, claim, checksums), and nothing it may have re-sent changed any result's bytes
    assert s["rows_changed_after_restore"] == 0, cutoff["changed_rows"]
    assert s["objects_rewritten_with_other_bytes"] == 0, cutoff["rewritten_after_restore"]
    assert s["cut_host_tasks_open_at_end"] == 0, cutoff["cut_host_task_log"]
    assert all(r["status"] == "succeeded" for r in cutoff["rows"].values())
    # every component was reached at its namespace address only; the client used both API replicas
    assert all(n > 0 for n in cutoff["api_calls"].values()) and len(cutoff["api_calls"]) == 2
    assert s["ok"], log
    # the supervisor tore its namespaces down itself
    assert cutoff["teardown"]["left"] == [] and cutoff["_removed_by_cleanup"] == [], cutoff["teardown"]


@pytest.mark.xfail(strict=False, reason="results go to fixed keys: worker/tasks.py checks its lease before storing, "
                                        "but a PUT already in flight at the cut can still land after the heal and "
                                        "rewrite the object, with the same bytes (docs/SCALING.md, 'Known gap')")
def test_the_cut_host_rewrites_no_result_object_after_the_heal(cutoff):
    assert cutoff["summary"]["objects_rewritten_after_restore"] == 0, sorted(cutoff["rewritten_after_restore"])


def test_worker_log_bookkeeping():
    """The settle step's view of a worker log: tasks received but not ended (retry and reject end a run)."""
    log = "\n".join([
        "[x: INFO/MainProcess] Task covidseg.process_jobs[aaaa-1] received",
        "[x: INFO/ForkPoolWorker-1] Task covidseg.process_jobs[aaaa-1] retry: Retry in 1s",
        "[x: INFO/MainProcess] Task covidseg.process_jobs[aaaa-1] received",
        "[x: INFO/ForkPoolWorker-1] Task covidseg.process_jobs[aaaa-1] succeeded in 1.2s: {'claimed': 0}",
        "[x: INFO/MainProcess] Task covidseg.process_jobs[bbbb-2] received",
        "[x: WARNING/ForkPoolWorker-1] Task covidseg.process_jobs[bbbb-2] reject requeue=False: Error 113",
        "[x: INFO/MainProcess] Task covidseg.process_study[cccc-3] received",
    ])
    assert cluster.tasks_in_progress(log) == ["cccc-3"]
    assert cluster.host_of("cluster-w2@vm:1234") == "w2" and cluster.host_of(None) == "?"
    phases = cluster.task_phases("task timings: slices=8 claim=0.1 fetch=0.2 infer=2.0 store=0.5 other=0.0 "
                                 "total=2.8 total_cpu=1.6 infer_cpu=1.2\n")
    assert phases["slices"] == 8 and phases["infer_s_per_slice"] == 0.25 and phases["overhead_s_per_slice"] == 0.1
