"""The package layering of docs/ARCHITECTURE.md, checked on every import statement (module level or inside a
function) of the source tree:

    cli/            -> training, worker, api?, shared          (the top: nothing imports it)
    api/, worker/   -> shared                                  (api never loads TensorFlow)
    training/       -> shared.core
    shared/service/ -> the service libraries, not shared.core
    shared/core/    -> numpy, OpenCV, TensorFlow, pydicom, ...; no service library, nothing above it
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Libraries of the service layer: the domain core must run without any of them installed.
SERVICE_LIBRARIES = {"flask", "werkzeug", "celery", "kombu", "billiard", "sqlalchemy", "alembic", "psycopg2",
                     "minio", "redis", "gunicorn", "requests"}
#: Libraries that load a model runtime: the API process and the service plumbing must not import them.
MODEL_RUNTIMES = {"tensorflow", "tf_keras", "keras", "segmentation_models", "onnxruntime", "tf2onnx", "onnx"}

#: package (path prefix) -> forbidden import prefixes (a dotted name is forbidden if it equals a prefix or
#: starts with prefix + ".").
RULES: dict[str, set[str]] = {
    "shared/core": SERVICE_LIBRARIES | {"shared.service", "api", "worker", "training", "cli"},
    "shared/service": MODEL_RUNTIMES | {"shared.core", "api", "worker", "training", "cli"},
    "shared": {"api", "worker", "training", "cli"},
    "training": {"shared.service", "api", "worker", "cli"} | SERVICE_LIBRARIES,
    "worker": {"api", "training", "cli"},
    "api": MODEL_RUNTIMES | {"worker", "training", "cli", "shared.core.model", "shared.core.inference"},
}


def imported_names(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in a Python file; `from a import b` gives a and a.b."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def violations(root: Path = REPO, rules: dict[str, set[str]] = RULES) -> list[str]:
    """One message per import statement that breaks a rule of its package."""
    found = {}
    for prefix, forbidden in rules.items():
        for path in sorted((root / prefix).rglob("*.py")):
            for line, name in imported_names(path, root):
                where = f"{path.relative_to(root)}:{line}"
                if where not in found and any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                    found[where] = f"{where} imports {name} ({prefix}/ must not)"
    return sorted(found.values())


def test_the_source_tree_keeps_its_layers():
    assert violations() == []


def test_every_package_is_covered():
    """A new top-level package must be placed in the layering (or be tests/scripts/migrations)."""
    top = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    assert top == {"shared", "api", "worker", "training", "cli"}


@pytest.mark.parametrize("package, statement", [
    ("shared/core", "import flask"),
    ("shared/core", "from shared.service.db import Job"),
    ("shared/core", "    from celery import Celery"),  # inside a function counts too
    ("shared", "from cli import main"),
    ("shared/service", "import tensorflow as tf"),
    ("training", "from worker.tasks import process"),
    ("api", "from shared.core.inference import Segmenter"),
])
def test_the_check_finds_a_violation(tmp_path, package, statement):
    pkg = tmp_path / package
    pkg.mkdir(parents=True)
    body = f"def f():\n{statement}\n" if statement.startswith(" ") else statement + "\n"
    (pkg / "bad.py").write_text(body)
    assert len(violations(tmp_path)) == 1
