"""deploy/systemd/regproxy.service passes ``systemd-analyze verify`` and has the hardening
the docs promise. verify needs the ExecStart binary to exist: the test runs it on a copy whose
only change is that path, pointed at the ``regproxy`` entry point installed for the tests."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "regproxy.service"
INSTALLED = "/opt/regproxy/bin/regproxy"  # where docs/deployment.md installs the venv


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze missing: bash scripts/install-test-deps.sh (systemd)"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, check=False)


def unit_copy(tmp_path: Path) -> Path:
    regproxy = shutil.which("regproxy")
    assert regproxy, "the regproxy entry point is missing: pip install -e ."
    text = UNIT.read_text()
    assert text.count(INSTALLED) == 1
    copy = tmp_path / "regproxy.service"
    copy.write_text(text.replace(INSTALLED, regproxy))
    return copy


def test_unit_verifies(tmp_path: Path) -> None:
    res = analyze("verify", str(unit_copy(tmp_path)))
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    # the check is real: an unknown directive is reported
    bad = tmp_path / "bad.service"
    bad.write_text(unit_copy(tmp_path).read_text().replace("NoNewPrivileges=", "NoNewPrivilegs="))
    assert "Unknown key 'NoNewPrivilegs'" in analyze("verify", str(bad)).stderr


def test_unit_hardening_and_lifecycle(tmp_path: Path) -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    svc = unit["Service"]
    assert svc["DynamicUser"] == "yes" and svc["StateDirectory"] == "regproxy"
    assert "--data-dir /var/lib/regproxy" in svc["ExecStart"]  # the StateDirectory
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"  # regproxy reloads its certificate
    assert svc["Restart"] == "on-failure"
    assert int(svc["TimeoutStopSec"]) > 30  # the 30 s drain after SIGTERM fits
    res = analyze("security", "--offline=yes", "--threshold=25", str(unit_copy(tmp_path)))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
