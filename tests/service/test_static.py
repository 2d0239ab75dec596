"""Static checks: settings, docker-compose, OpenAPI coverage, the API never importing TensorFlow, the sweep's
broker scan and upload sanitising (no services needed)."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.service.settings import Settings, SettingsError, env_name, settings_fields, settings_markdown_table

REPO = Path(__file__).resolve().parents[2]


def test_every_setting_is_documented_with_a_default():
    rows = settings_fields()
    assert len(rows) >= 30
    for name, typ, default, doc in rows:
        assert name.startswith("COVIDSEG_") and typ in ("str", "int", "float", "bool")
        assert default is not None and len(doc) > 10, name
    doc = (REPO / "docs" / "SERVICE.md").read_text()
    missing = [name for name, *_ in rows if f"`{name}`" not in doc]
    assert missing == [], f"docs/SERVICE.md lacks {missing}; regenerate the table (see docs/SERVICE.md)"
    # the whole table, defaults and meanings included, is the generated one: it cannot drift from the code
    assert settings_markdown_table() in doc, "docs/SERVICE.md's settings table is stale: python -m shared.service.settings"
    readme = (REPO / "README.md").read_text()
    shown = [name for name, *_ in rows if f"`{name}`" in readme]
    assert shown and "docs/SERVICE.md#settings" in readme


def test_settings_parse_and_validate():
    s = Settings.from_env({"COVIDSEG_MAX_PIXELS": "1_000", "COVIDSEG_S3_SECURE": "yes",
                           "COVIDSEG_STALE_AFTER": "12.5"})
    assert (s.max_pixels, s.s3_secure, s.stale_after) == (1000, True, 12.5)
    assert Settings.from_env(s.env()) == s                       # round trip through the environment
    with pytest.raises(SettingsError, match="COVIDSEG_MAX_PIXELS"):
        Settings.from_env({"COVIDSEG_MAX_PIXELS": "lots"})
    with pytest.raises(SettingsError, match="visibility"):
        Settings.from_env({"COVIDSEG_BROKER_VISIBILITY_TIMEOUT": "60"})   # below the hard time limit
    with pytest.raises(SettingsError, match="result_links"):
        Settings.from_env({"COVIDSEG_RESULT_LINKS": "ftp"})


def test_docker_compose_services_and_env_match_settings():
    import yaml
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"api", "worker", "redis", "minio", "createbuckets", "postgres", "flower", "migrate"} <= set(services)
    known = {env_name(f) for f in Settings.__dataclass_fields__}
    used = set()
    for svc in services.values():
        env = svc.get("environment", {})
        names = env.keys() if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        used |= {n for n in names if n.startswith("COVIDSEG_")}
    anchors = compose.get("x-covidseg-env", {})
    used |= {n for n in anchors if n.startswith("COVIDSEG_")}
    assert used and used <= known, used - known
    for name in ("api", "worker", "redis", "minio", "postgres"):
        assert "healthcheck" in services[name], name
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert set(compose["volumes"]) >= {"pgdata", "miniodata", "redisdata"}
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "gunicorn" in " ".join(services["api"]["command"])
    assert "celery" in " ".join(services["worker"]["command"])


def _replicas(value, default: int) -> int:
    """A compose `deploy.replicas`: an int, or "${VAR:-n}" (interpolated by compose) -> its default n."""
    import re
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*:-(\d+)\}", str(value))
    assert m, f"replicas {value!r} is neither an int nor ${{VAR:-n}}"
    return int(m.group(1)) if m else default


def test_docker_compose_scales_out_workers_and_api():
    """Scale-out (docs/SCALING.md): worker replicas per queue, and profile `scale` with more API replicas behind a
    round-robin proxy; the defaults keep today's single-replica stack."""
    import yaml
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("worker", "worker-bulk"):
        deploy = services[name]["deploy"]
        assert _replicas(deploy["replicas"], 1) >= 1, name
        assert "${" in str(deploy["replicas"]), f"{name}: the replica count should come from the environment"
        assert deploy["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"], name
        assert "%h" in " ".join(services[name]["command"]), f"{name}: replicas need distinct node names"
    assert "profiles" not in services["api"] and "profiles" not in services["worker"]   # default stack unchanged
    replica, lb = services["api-replica"], services["lb"]
    assert replica["profiles"] == ["scale"] and lb["profiles"] == ["scale"]
    assert _replicas(replica["deploy"]["replicas"], 2) >= 2
    assert "gunicorn" in " ".join(replica["command"]) and "ports" not in replica   # replicas cannot share a port
    assert replica["environment"]["COVIDSEG_API_BIND"].startswith("0.0.0.0:")
    assert replica["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "healthcheck" in replica and "healthcheck" in lb
    assert lb["ports"] == ["8080:8080"]
    conf_name = lb["configs"][0]["source"]
    conf = compose["configs"][conf_name]["content"]
    port = replica["environment"]["COVIDSEG_API_BIND"].rsplit(":", 1)[1]
    assert f"server api:{port};" in conf and f"server api-replica:{port};" in conf
    assert "$$host" in conf and "$host" not in conf.replace("$$host", "")   # compose interpolation escaped
    assert lb["depends_on"]["api-replica"]["condition"] == "service_healthy"


def test_api_never_imports_tensorflow():
    code = ("import sys, os; os.environ['COVIDSEG_DATABASE_URL']='sqlite://'\n"
            "from api import create_app\n"
            "import api.routes, api.uploads, api.openapi, shared.service.celery_app, shared.service.storage, shared.service.db\n"
            "app = create_app(); c = app.test_client(); assert c.get('/healthz').status_code == 200\n"
            "from api.uploads import check_upload; from shared.service.settings import get_settings\n"
            "check_upload(open('tests/fixtures/slices/covid_0300.png', 'rb').read(), 'x.png', get_settings())\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras',"
            " 'segmentation_models', 'worker'))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_an_int8_worker_process_never_imports_tensorflow(int8_cache):
    """A pool process's model load with COVIDSEG_TF_THREADS set: INT8 runs on onnxruntime and leaves TensorFlow
    (~7 s of CPU and hundreds of MB per process) unimported. (fp32 imports it and sizes its pools first: 20 s more
    here, left to the fp32 runs of tests/core.)"""
    backend = "int8"
    code = ("import sys\n"
            "from worker.tasks import resources\n"
            "seg = resources().get_segmenter()\n"
            "tf = sys.modules.get('tensorflow')\n"
            "print(seg.backend, tf is not None,"
            " tf and tf.config.threading.get_intra_op_parallelism_threads())\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("COVIDSEG_")},
           "COVIDSEG_DATABASE_URL": "sqlite://", "COVIDSEG_INFERENCE_BACKEND": backend, "COVIDSEG_TF_THREADS": "2",
           "COVIDSEG_CACHE_DIR": str(int8_cache)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "int8 False None"


def test_openapi_documents_every_route():
    import os
    os.environ.setdefault("COVIDSEG_DATABASE_URL", "sqlite://")
    from api import create_app
    from api.openapi import spec
    app = create_app(Settings.from_env({"COVIDSEG_DATABASE_URL": "sqlite://"}))
    doc = spec()
    paths = doc["paths"]
    for rule in app.url_map.iter_rules():
        if rule.endpoint.split(".")[0] not in ("v1", "predict", "health"):
            continue   # web pages and the admin dashboard (cookie sessions) are documented in docs/WEB.md
        path = rule.rule.replace("<", "{").replace(">", "}")
        assert path in paths, path
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in paths[path], (path, method)
    json.dumps(doc)
    assert doc["openapi"].startswith("3.")


def _kombu_message(job_ids, unacked=False):
    body = base64.b64encode(json.dumps([[], {"job_ids": job_ids}, {}]).encode()).decode()
    msg = {"body": body, "headers": {"task": "covidseg.process_jobs"},
           "properties": {"body_encoding": "base64"}}
    return json.dumps([msg, "covidseg", "q"] if unacked else msg)


def test_sweep_reads_job_ids_from_waiting_and_unacked_messages():
    from worker.sweep import _job_ids_of_message, jobs_in_broker

    class FakeRedis:
        lists = {"q1": [_kombu_message(["a", "b"])], "q2\x06\x163": [_kombu_message(["c"])]}
        unacked = {"tag": _kombu_message(["d"], unacked=True), "junk": "not json"}

        def llen(self, k):
            return len(self.lists.get(k, []))

        def lrange(self, k, a, b):
            return self.lists.get(k, [])

        def hlen(self, k):
            return len(self.unacked)

        def hvals(self, k):
            return list(self.unacked.values())
    assert jobs_in_broker(FakeRedis(), ["q1", "q2"]) == {"a", "b", "c", "d"}
    assert _job_ids_of_message(b"\xff") == set()


def test_chunking_keeps_batches_together():
    from shared.service.celery_app import chunk_jobs
    jobs = [(f"b{i}", "bulk", "B") for i in range(10)] + [("s1", "fast", None), ("s2", "fast", None)]
    chunks = chunk_jobs(jobs, 4)
    assert chunks[:3] == [("bulk", ["b0", "b1", "b2", "b3"]), ("bulk", ["b4", "b5", "b6", "b7"]),
                          ("bulk", ["b8", "b9"])]
    assert ("fast", ["s1"]) in chunks and ("fast", ["s2"]) in chunks


@pytest.mark.parametrize("raw,clean", [("../../etc/passwd", "passwd"), ("C:\\x\\scan 1.png", "scan_1.png"),
                                       ("..", None), ("", None), ("ümlaut\x00.png", "umlaut_.png"),
                                       ("a" * 500 + ".png", "a" * 128)])
def test_filename_sanitising(raw, clean):
    from api.uploads import sanitize_filename
    assert sanitize_filename(raw) == clean


def test_readme_stays_a_user_readme():
    """README.md is for users (under 12 KB); the run history and the benchmark detail live in docs/."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) < 12_000
    for doc in ("docs/MODEL.md", "docs/PERFORMANCE.md", "docs/SERVICE.md", "docs/ARCHITECTURE.md", "docs/STUDIES.md"):
        assert f"]({doc}" in readme and (REPO / doc).is_file(), doc
