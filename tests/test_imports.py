"""The import graph matches the layers of docs/architecture.md (scripts/check_imports.py):
no cycles, no module importing a layer above it, no private name across modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_keeps_its_layers() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_imports.py"),
                          str(ROOT / "proxy")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == "", run.stdout + run.stderr


def test_the_check_sees_a_cycle_an_upward_import_and_a_private_name(tmp_path: Path) -> None:
    """The checker itself: a throwaway package breaking each rule once."""
    pkg = tmp_path / "proxy"
    (pkg / "storage").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "reference.py").write_text("from proxy.app import wire\n")  # upward
    (pkg / "app.py").write_text("def wire() -> None: ...\n")
    (pkg / "storage" / "__init__.py").write_text("")
    (pkg / "storage" / "a.py").write_text("from proxy.storage.b import _hidden\n")
    (pkg / "storage" / "b.py").write_text("import proxy.storage.a\n_hidden = 1\n")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_imports.py"), str(pkg)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    assert "upward: proxy.reference (vocabulary) imports proxy.app (wiring and commands)" in lines
    assert "private: proxy.storage.a imports proxy.storage.b._hidden" in lines
    assert "cycle: proxy.storage.a <-> proxy.storage.b" in lines
