"""The layout of DESIGN.md, enforced: each package's "knows nothing of" column as
import contracts (import-linter, configured in pyproject.toml), the Orthanc plugin's
import closure as the standard library, and the lint configuration clean (ruff).

Fast: static analysis plus one interpreter start without site-packages.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import PROJECT_ROOT

BIN = Path(sys.executable).parent


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)


def test_layout_contracts_hold():
    done = _run(str(BIN / "lint-imports"), "--no-cache")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout, done.stdout


def test_ruff_is_clean():
    done = _run(str(BIN / "ruff"), "check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_plugin_import_closure_is_the_standard_library(tmp_path):
    """Orthanc's embedded interpreter is Debian's python3 without the venv: load
    orthanc_plugin/plugin.py in an interpreter without site-packages (``-I -S``),
    against a stand-in for Orthanc's ``orthanc`` module, and check that setup
    succeeded and that every module it loaded is standard library or our own."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "orthanc.py").write_text(textwrap.dedent(f"""
        import json
        errors = []
        class DicomToJsonFormat: HUMAN = 0
        class DicomToJsonFlags: NONE = 0
        def GetConfiguration():
            return json.dumps({{"Medxplain": {{"ProjectRoot": {str(PROJECT_ROOT)!r},
                                               "QueuePath": {str(tmp_path / 'queue.db')!r}}}}})
        def LogError(message): errors.append(message)
        def LogWarning(message): pass
        def LogInfo(message): pass
        def _register(*args): pass
        RegisterOnStoredInstanceCallback = RegisterOnChangeCallback = RegisterRestCallback = _register
        RegisterIncomingHttpRequestFilter = RegisterIncomingCStoreInstanceFilter = _register
    """))
    code = textwrap.dedent(f"""
        import json, sys
        sys.path[:0] = [{str(stub)!r}, {str(PROJECT_ROOT)!r}]
        before = set(sys.modules)
        import runpy
        runpy.run_path({str(PROJECT_ROOT / 'orthanc_plugin' / 'plugin.py')!r}, run_name="medxplain_plugin")
        import orthanc
        ours = ("orthanc", "orthanc_plugin", "dicom_io", "pipeline", "medxplain_plugin")
        foreign = sorted(m for m in set(sys.modules) - before
                         if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] not in ours)
        print(json.dumps({{"errors": orthanc.errors, "foreign": foreign}}))
    """)
    done = _run(sys.executable, "-I", "-S", "-c", code)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["errors"] == [], report["errors"]
    assert report["foreign"] == [], f"the plugin's import closure loads non-stdlib modules: {report['foreign']}"


def test_the_registry_is_complete_without_the_pipeline():
    """explainers/ fills its own registry: no side-effect import elsewhere is needed."""
    code = ("import sys\nfrom explainers.base import available\n"
            "assert {'gradcam', 'ig', 'occlusion', 'sagen', 'exaggeration', 'gvr', 'cia', 'medxgan', 'medxgan_ig', 'sagen_ig'}"
            " <= set(available()), available()\n"
            "assert not any(m.startswith('pipeline') for m in sys.modules)\n")
    done = _run(sys.executable, "-c", code)
    assert done.returncode == 0, done.stderr
