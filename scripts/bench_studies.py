#!/usr/bin/env python3
"""Whole-study benchmark (part of `make bench`; issue 5).

Starts a throwaway stack on this machine (redis-server, SeaweedFS S3, SQLite — or PostgreSQL with
--db postgresql —, the API under gunicorn, and two Celery workers: one on the interactive queue and one, at a
lower CPU priority, on the bulk queue), then measures:

1. one study of --slices slices (default 300, 512x512, 0.7 x 0.7 mm pixels, 1.25 mm slices: a realistic chest
   CT) built from the real fixture slices, end to end: upload (POST /api/v1/studies) -> queued -> running ->
   succeeded -> report.json downloaded. Wall time, with the progress samples printed along the way.
   Target: < 120 s from upload to report.
2. interactive /predict latency when idle versus while --queued studies (default 10) wait on the bulk queue and
   one of them is running. Idle is measured before and after the loaded round (the machine's other load drifts
   over minutes) and both are pooled. Target: loaded median <= 3x idle median.

Prints a table and writes JSON (--json). The volume is synthetic but made of real CT slices (tests/fixtures,
see its ATTRIBUTION.md): each 256x256 slice is mapped to Hounsfield units, upsampled to 512x512 and blended
along z. Benchmarks never run as timed test assertions. Smoke-test with small sizes, e.g.
`nice -n 10 python scripts/bench_studies.py --slices 24 --size 256 --queued 3 --queued-slices 8 --predict-n 3`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
import localstack  # noqa: E402
# the test suite's DICOM series builder and fixture-slice loader (one implementation for tests and benchmarks)
from tests.core.helpers import fixture_slice_hu, write_dicom_series  # noqa: E402

SLICES = sorted((REPO / "tests" / "fixtures" / "slices").glob("covid_*.png"))
PREDICT_SLICE = REPO / "tests" / "fixtures" / "slices" / "covid_0300.png"
SPACING = (0.7, 0.7, 1.25)   # x, y (mm per pixel), z (mm between slices)


# --- a CT volume from the fixture slices ----------------------------------------------------------------------
def build_volume(n_slices: int, size: int) -> np.ndarray:
    """HU volume (z, y, x) int16: the fixture slices in HU (gray 0..255 -> -1350..150 HU, a lung window),
    resized to size x size and blended linearly between consecutive key slices along z."""
    keys = [fixture_slice_hu(p, size) for p in SLICES]
    vol = np.empty((n_slices, size, size), np.int16)
    span = max(1, n_slices - 1)
    for z in range(n_slices):
        t = z / span * (len(keys) - 1)
        k = min(int(t), len(keys) - 2)
        w = t - k
        vol[z] = np.clip(np.round((1 - w) * keys[k] + w * keys[k + 1]), -1024, 3071).astype(np.int16)
    return vol


def nifti_bytes(vol_zyx: np.ndarray) -> bytes:
    """.nii.gz bytes of the volume, x/y/z spacing SPACING (RAS-style affine, slices along +z)."""
    import gzip

    import nibabel as nib
    data = np.ascontiguousarray(vol_zyx.transpose(2, 1, 0))          # (x, y, z)
    affine = np.diag([SPACING[0], SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [-SPACING[0] * data.shape[0] / 2, -SPACING[1] * data.shape[1] / 2, -200.0]
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0)


def dicom_zip_bytes(vol_zyx: np.ndarray, folder: Path) -> bytes:
    """A zip of one CT series (one file per slice, IPP along +z, stored = HU + 1024) written into `folder`
    first and zipped the way `covidseg submit` zips a DICOM folder."""
    from cli.bulk import LocalStudy, write_study_zip
    files = write_dicom_series(folder, vol_zyx, spacing=(SPACING[1], SPACING[0]), dz=SPACING[2],
                               origin=(-180.0, -180.0, -200.0), order="spatial",
                               patient=("Bench^Phantom", "BENCH001"))
    buf = io.BytesIO()
    write_study_zip(LocalStudy(rel=".", kind="dicom", files=files), buf)
    return buf.getvalue()


# --- HTTP helpers -------------------------------------------------------------------------------------------------
class Api:
    def __init__(self, url: str, token: str):
        import requests
        self.url, self.s = url, requests.Session()
        self.s.headers["Authorization"] = f"Bearer {token}"

    def submit_study(self, name: str, payload: bytes, content_type: str) -> dict:
        r = self.s.post(self.url + "/api/v1/studies", files={"file": (name, payload, content_type)}, timeout=600)
        if r.status_code not in (200, 202):
            raise RuntimeError(f"POST /api/v1/studies -> {r.status_code}: {r.text[:300]}")
        return r.json()

    def study(self, sid: str) -> dict:
        r = self.s.get(f"{self.url}/api/v1/studies/{sid}", timeout=60)
        r.raise_for_status()
        return r.json()

    def get(self, path: str):
        r = self.s.get(self.url + path, timeout=120)
        r.raise_for_status()
        return r

    def predict(self, payload: bytes) -> float:
        t0 = time.perf_counter()
        r = self.s.post(self.url + "/predict", files={"file": ("slice.png", payload, "image/png")}, timeout=600)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"/predict -> {r.status_code}: {r.text[:300]}")
        return dt

    def active_studies(self) -> dict:
        out = {}
        for st in ("queued", "running"):
            r = self.s.get(self.url + "/api/v1/studies", params={"status": st, "limit": 200}, timeout=60)
            r.raise_for_status()
            out[st] = len(r.json().get("studies", []))
        return out


def study_end_to_end(api: Api, payload: bytes, name: str, content_type: str, n_slices: int,
                     timeout: float) -> dict:
    """Upload one study and follow it to its report; prints progress samples."""
    t0 = time.perf_counter()
    body = api.submit_study(name, payload, content_type)
    t_accepted = time.perf_counter() - t0
    sid = body["id"]
    print(f"  study {sid}: {len(payload) / 1e6:.1f} MB uploaded and accepted in {t_accepted:.1f} s", flush=True)
    samples, last_print, last_progress = [], -1e9, None
    t_started = None
    while True:
        now = time.perf_counter() - t0
        st = api.study(sid)
        status, progress = st["status"], float(st.get("progress") or 0)
        if status == "running" and t_started is None:
            t_started = now
        samples.append({"t": round(now, 2), "status": status, "progress": round(progress, 1)})
        if progress != last_progress and now - last_print >= 3 or status in ("succeeded", "failed", "cancelled"):
            print(f"  t={now:6.1f} s  {status:9s} {progress:5.1f} %", flush=True)
            last_print, last_progress = now, progress
        if status in ("succeeded", "failed", "cancelled"):
            break
        if now > timeout:
            raise RuntimeError(f"study {sid} not finished after {timeout:.0f} s: {st}")
        time.sleep(0.5)
    if status != "succeeded":
        raise RuntimeError(f"study {sid} {status}: {st.get('error')}")
    report_link = (st.get("links") or {}).get("report") or f"/api/v1/studies/{sid}/files/report.json"
    report = api.get(report_link).json()
    total = time.perf_counter() - t0
    print(f"  report.json after {total:.1f} s: CT score {report.get('ct_score')}, "
          f"{_num(report.get('percent_involved'))} % involved, lesion {_num(report.get('lesion_volume_ml'))} mL",
          flush=True)
    return {"study_id": sid, "slices": n_slices, "upload_bytes": len(payload),
            "upload_accepted_s": round(t_accepted, 2),
            "queued_s": round((t_started or total) - t_accepted, 2),
            "processing_s": round(total - (t_started or t_accepted), 2),
            "upload_to_report_s": round(total, 2), "slices_per_s": round(n_slices / total, 2),
            "target_s": 120, "met": total < 120,
            "progress_samples": samples[:: max(1, len(samples) // 60)] + samples[-1:],
            "report": {k: report.get(k) for k in ("ct_score", "percent_involved", "lesion_volume_ml",
                                                  "lung_volume_ml", "n_slices")}}


def _num(v) -> str:
    return f"{v:.1f}" if isinstance(v, (int, float)) else str(v)


def predict_latency(api: Api, payload: bytes, n: int, watch_bulk: bool) -> dict:
    lat, bulk = [], []
    for _ in range(n):
        before = api.active_studies() if watch_bulk else None
        lat.append(api.predict(payload))
        if watch_bulk:
            after = api.active_studies()
            bulk.append({"before": before, "after": after})
    out = {"n": n, "median_s": round(statistics.median(lat), 3), "min_s": round(min(lat), 3),
           "max_s": round(max(lat), 3), "all_s": [round(x, 3) for x in lat]}
    if watch_bulk:
        out["bulk_samples"] = bulk
        # fair only if bulk work was really there: a study running and others queued throughout
        out["bulk_busy_throughout"] = all(b["before"]["running"] >= 1 and b["after"]["running"] >= 1
                                          and b["after"]["queued"] >= 1 for b in bulk)
    return out


def wait_ready(log: Path, proc, timeout=600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}; see {log}")
        if localstack.worker_ready(log):
            return
        time.sleep(0.5)
    raise RuntimeError(f"worker not ready after {timeout:.0f} s; see {log}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(REPO / "artifacts" / "bench_studies.json"))
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--slices", type=int, default=300, help="slices of the end-to-end study (default 300)")
    ap.add_argument("--size", type=int, default=512, help="rows = columns of every slice (default 512)")
    ap.add_argument("--format", choices=("dicom", "nifti"), default="dicom",
                    help="upload the end-to-end study as a zipped DICOM series (default) or a .nii.gz")
    ap.add_argument("--queued", type=int, default=10, help="studies queued on the bulk queue in part 2")
    ap.add_argument("--queued-slices", type=int, default=60, help="slices of each queued study (part 2)")
    ap.add_argument("--predict-n", type=int, default=7, help="/predict calls per measurement")
    ap.add_argument("--backend", default="auto", help="COVIDSEG_INFERENCE_BACKEND of the workers")
    ap.add_argument("--bulk-nice", type=int, default=getattr(localstack, "BULK_NICE", 10),
                    help="nice level of the bulk worker (default: localstack.BULK_NICE, as `make run`)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="give up on a study after this long (s)")
    ap.add_argument("--skip-e2e", action="store_true", help="only part 2")
    ap.add_argument("--skip-predict", action="store_true", help="only part 1")
    args = ap.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="covidseg-bench-studies-"))
    services = api_proc = w_int = w_bulk = None
    ok = False
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "loadavg_before": [round(x, 2) for x in os.getloadavg()],
                           "note": "2 shared cores; other processes (e.g. a training run) may be using them"},
               "config": {k: getattr(args, k) for k in ("db", "slices", "size", "format", "queued", "queued_slices",
                                                          "predict_n", "backend", "bulk_nice")},
               "study_end_to_end": None, "predict": None}
    try:
        services = localstack.DataServices(base, args.db).start()
        env = dict(services.env, COVIDSEG_LOG_LEVEL="INFO", COVIDSEG_INFERENCE_BACKEND=args.backend)
        token = localstack.create_token(env, "bench-studies")
        port = localstack.free_port()
        api_proc = localstack.start_api(env, base / "api.log", port)
        from shared.service.settings import Settings
        s = Settings.from_env(env)
        # one worker per queue, the bulk one at a lower CPU priority (shared/service/celery_app.py), as `make run` does
        w_int = localstack.start_worker(env, base / "worker.log", name="bench-interactive",
                                        queues=s.queue_interactive)
        w_bulk = localstack.start_worker(env, base / "worker-bulk.log", name="bench-bulk", queues=s.queue_bulk,
                                         nice=args.bulk_nice)
        print(f"stack up in {base}; waiting for the workers to load the model ...", flush=True)
        wait_ready(base / "worker.log", w_int)
        wait_ready(base / "worker-bulk.log", w_bulk)
        api = Api(f"http://127.0.0.1:{port}", token)
        payload = PREDICT_SLICE.read_bytes()

        if not args.skip_predict:
            for _ in range(2):
                api.predict(payload)          # warm-up: first job of the process, connection pools
            print(f"/predict idle x{args.predict_n} ...", flush=True)
            idle = predict_latency(api, payload, args.predict_n, watch_bulk=False)
            print(f"  idle median {idle['median_s']} s (min {idle['min_s']}, max {idle['max_s']})", flush=True)
            results["predict"] = {"idle": idle}

        if not args.skip_e2e:
            print(f"building a {args.slices}-slice {args.size}x{args.size} {args.format} study ...", flush=True)
            vol = build_volume(args.slices, args.size)
            if args.format == "dicom":
                body = dicom_zip_bytes(vol, base / "series")
                name, ctype = "study.zip", "application/zip"
            else:
                body = nifti_bytes(vol)
                name, ctype = "volume.nii.gz", "application/gzip"
            del vol
            print(f"study end to end ({len(body) / 1e6:.1f} MB) ...", flush=True)
            results["study_end_to_end"] = study_end_to_end(api, body, name, ctype, args.slices, args.timeout)
            results["study_end_to_end"]["format"] = args.format
            del body

        if not args.skip_predict:
            qvol = build_volume(args.queued_slices, args.size)
            qbody = nifti_bytes(qvol)
            print(f"queueing {args.queued} studies of {args.queued_slices} slices on the bulk queue ...",
                  flush=True)
            ids = [api.submit_study(f"q{i}.nii.gz", qbody, "application/gzip")["id"] for i in range(args.queued)]
            deadline = time.monotonic() + 600
            while api.active_studies()["running"] < 1 and time.monotonic() < deadline:
                time.sleep(0.5)            # measure only once the bulk worker is busy
            print(f"/predict with {args.queued} studies on the bulk queue x{args.predict_n} ...", flush=True)
            loaded = predict_latency(api, payload, args.predict_n, watch_bulk=True)
            print(f"  loaded median {loaded['median_s']} s; bulk busy throughout: "
                  f"{loaded['bulk_busy_throughout']}", flush=True)
            for sid in ids:                # the rest is not needed: free the CPU
                api.s.post(f"{api.url}/api/v1/studies/{sid}/cancel", timeout=60)
            deadline = time.monotonic() + 600
            while api.active_studies()["running"] and time.monotonic() < deadline:
                time.sleep(0.5)            # a cancelled study stops at its next batch
            # idle again: other load on the machine changes over minutes; idle before AND after is fairer
            print(f"/predict idle again x{args.predict_n} ...", flush=True)
            idle_after = predict_latency(api, payload, args.predict_n, watch_bulk=False)
            idle = results["predict"]["idle"]
            idle_median = statistics.median(idle["all_s"] + idle_after["all_s"])
            ratio = loaded["median_s"] / idle_median if idle_median else None
            results["predict"].update({"idle_after": idle_after, "idle_median_s": round(idle_median, 3),
                                       "loaded": loaded, "ratio_median": round(ratio, 2) if ratio else None,
                                       "target_ratio": 3.0, "met": ratio is not None and ratio <= 3.0})
            print(f"  idle median (before and after) {idle_median:.3f} s -> loaded/idle {ratio:.2f}x", flush=True)
        results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        ok = True
    finally:
        for p in (w_bulk, w_int, api_proc):
            localstack.stop_process(p)
        if services:
            services.stop()
        if ok:      # hundreds of MB of series and stored objects; kept (with the logs) only after a failure
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"logs and data kept in {base}", file=sys.stderr)

    print("\n| measurement | value | target | met |")
    print("| --- | --- | --- | --- |")
    e = results["study_end_to_end"]
    if e:
        print(f"| {e['slices']}-slice {args.size}x{args.size} {e['format']} study, upload -> report | "
              f"{e['upload_to_report_s']} s (upload {e['upload_accepted_s']} s, queued {e['queued_s']} s, "
              f"processing {e['processing_s']} s; {e['slices_per_s']} slices/s) | < 120 s | "
              f"{'yes' if e['met'] else 'no'} |")
    p = results["predict"]
    if p and "loaded" in p:
        print(f"| /predict idle median (before + after) | {p['idle_median_s']} s | | |")
        print(f"| /predict median with {args.queued} studies queued | {p['loaded']['median_s']} s "
              f"({p['ratio_median']}x idle) | <= 3x | {'yes' if p['met'] else 'no'} |")
    print(f"load average before/after: {results['machine']['loadavg_before']} / "
          f"{results['machine'].get('loadavg_after')}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
