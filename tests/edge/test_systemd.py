"""The systemd unit, snippets and install scripts, checked with systemd's own tools.

Needs systemd-analyze / systemd-sysusers / systemd-tmpfiles (Debian package ``systemd``;
.ci/run installs it). The unit is verified as shipped except for one substitution: its
ExecStart binary (/opt/camtrap-edge/venv/bin/camtrap-edge) does not exist on a build host, so a
copy pointing at a stand-in executable is verified too, and the shipped file must produce no
complaint other than that missing binary.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
UNIT = SYSTEMD / "camtrap-edge.service"
BIN = "/opt/camtrap-edge/venv/bin/camtrap-edge"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (apt-get install systemd; .ci/run does this)",
)
needs_root_tools = pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None or os.geteuid() != 0,
    reason="needs root and systemd-sysusers/systemd-tmpfiles (package systemd)",
)


def _directives(path: Path) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values, in order (systemd allows repeated keys)."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def _stand_in_unit(tmp_path: Path) -> Path:
    exe = tmp_path / "bin" / "camtrap-edge"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    unit = tmp_path / "camtrap-edge.service"
    unit.write_text(UNIT.read_text().replace(BIN, str(exe)))
    return unit


def _analyze(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"}
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120, env=env)


# --- the unit --------------------------------------------------------------------------------
TOLERATED_POISON_FRAMES = 3  # in one start-limit interval (docs/systemd.md)


def _seconds(value: str) -> float:
    """A systemd time span as seconds: '600', '10s', '30min', '1min 30s'."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(num) * units[unit]
    return total


def test_the_start_limit_follows_from_crash_attribution():
    """A poison frame costs up to DEATHS_PER_POISON_FRAME deaths before it is quarantined and the
    box carries on: the start limit must let TOLERATED_POISON_FRAMES of them through in one
    interval (StartLimitBurst=5 stopped the box in the middle of the second), yet still stop a
    crash loop no frame explains within the interval (a burst the window cannot fill at
    RestartSec would never trip)."""
    from edge.daemon import OFFENDER_RETRY_AFTER_S
    from edge.ledger import DEATHS_PER_POISON_FRAME, MAX_CRASHES

    d = _directives(UNIT)
    burst = int(d[("Unit", "StartLimitBurst")][-1])
    interval = _seconds(d[("Unit", "StartLimitIntervalSec")][-1])
    restart = _seconds(d[("Service", "RestartSec")][-1])
    assert DEATHS_PER_POISON_FRAME == 1 + MAX_CRASHES
    assert burst >= 1 + TOLERATED_POISON_FRAMES * DEATHS_PER_POISON_FRAME, burst  # the first start + every restart
    assert burst * restart < interval / 2, (burst, restart, interval)  # an endless loop trips the limit in time
    # the poison frames' restarts fit in the window: each takes at least its RestartSecs and the
    # hold before a frame with a crash against it (its last MAX_CRASHES - 1 deaths) is tried again
    per_frame = DEATHS_PER_POISON_FRAME * restart + (MAX_CRASHES - 1) * OFFENDER_RETRY_AFTER_S
    assert TOLERATED_POISON_FRAMES * per_frame <= interval, per_frame


def test_unit_has_the_required_directives():
    d = _directives(UNIT)
    svc = lambda k: d.get(("Service", k), [])  # noqa: E731
    assert svc("Type") == ["notify"] and svc("NotifyAccess") == ["main"]
    assert svc("ExecStart") == [f"{BIN} run --config /etc/camtrap-edge/config.yaml"]
    assert svc("ExecStartPre") == [f"{BIN} check-config --strict /etc/camtrap-edge/config.yaml"]
    assert svc("WatchdogSec") == ["60s"] and svc("Restart") == ["on-failure"]
    assert d[("Unit", "StartLimitIntervalSec")] and d[("Unit", "StartLimitBurst")]  # [Unit], where systemd reads them
    assert svc("User") == ["camtrap"] and svc("SupplementaryGroups") == ["video"]
    assert svc("NoNewPrivileges") == ["yes"] and svc("ProtectSystem") == ["strict"]
    assert "/var/lib/camtrap-edge" in svc("ReadWritePaths")
    assert svc("StateDirectory") == ["camtrap-edge"] and svc("ConfigurationDirectory") == ["camtrap-edge"]
    assert svc("PrivateDevices") in ([], ["no"])  # would hide /dev/nvhost-* from CUDA
    assert svc("MemoryDenyWriteExecute") in ([], ["no"])  # breaks CUDA JIT / TensorRT
    assert svc("RestrictAddressFamilies") == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    timeout = svc("TimeoutStartSec")[0]
    assert re.fullmatch(r"\d+min", timeout) and int(timeout[:-3]) >= 20  # TensorRT engine builds
    assert d[("Install", "WantedBy")] == ["multi-user.target"]


def test_unit_commands_exist_in_the_cli():
    from edge.cli import build_parser

    parser = build_parser()
    for cmd in (svc.split(" ", 1)[1] for svc in (_directives(UNIT)[("Service", "ExecStartPre")][0],
                                                 _directives(UNIT)[("Service", "ExecStart")][0])):  # fmt: skip
        args = parser.parse_args(cmd.split())
        assert callable(args.func), cmd


@needs_analyze
def test_systemd_analyze_verify(tmp_path):
    r = _analyze("verify", str(_stand_in_unit(tmp_path)))
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr
    # the shipped file: nothing to complain about but the binary that only exists once installed
    r = _analyze("verify", str(UNIT))
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert complaints, "verify should at least notice the missing binary (is it really checking?)"
    assert all(f"Command {BIN} is not executable" in line for line in complaints), complaints


@needs_analyze
def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    unit = _stand_in_unit(tmp_path)
    unit.write_text(unit.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    r = _analyze("verify", str(unit))
    assert "restart specifier" in (r.stdout + r.stderr).lower() and "sometimes" in r.stdout + r.stderr


def _security(unit: Path) -> subprocess.CompletedProcess:
    return _analyze("security", "--offline=true", "--no-pager", str(unit))


@needs_analyze
def test_security_score_matches_docs(tmp_path):
    r = _security(_stand_in_unit(tmp_path))
    if "--offline" in r.stderr or "unrecognized option" in r.stderr:
        pytest.skip("this systemd-analyze has no --offline security mode (needs systemd >= 250)")
    m = re.search(r"Overall exposure level for camtrap-edge\.service: (\d+\.\d+) (\w+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    score = float(m.group(1))
    assert score <= 2.5, f"hardening regressed: exposure {score}"
    doc = (REPO / "docs" / "systemd.md").read_text()
    version = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True).stdout.split()[1]
    recorded = re.search(r"systemd (\d+)[^|]*\| \*\*(\d+\.\d+) (\w+)\*\*", doc)
    assert recorded, "docs/systemd.md must record the score as '... systemd N ... | **X.Y LEVEL**'"
    if recorded.group(1) == version:
        assert (float(recorded.group(2)), recorded.group(3)) == (score, m.group(2)), "update docs/systemd.md"


# --- sysusers / tmpfiles ---------------------------------------------------------------------
@needs_root_tools
def test_sysusers_and_tmpfiles_in_a_scratch_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(["systemd-sysusers", f"--root={root}", str(SYSTEMD / "camtrap-edge.sysusers.conf")],
                   check=True, capture_output=True)  # fmt: skip
    passwd = (root / "etc" / "passwd").read_text()
    group = (root / "etc" / "group").read_text()
    user = next(line.split(":") for line in passwd.splitlines() if line.startswith("camtrap:"))
    assert user[5] == "/var/lib/camtrap-edge" and user[6] == "/usr/sbin/nologin"
    video = next(line.split(":") for line in group.splitlines() if line.startswith("video:"))
    assert "camtrap" in video[3].split(",")
    subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(SYSTEMD / "camtrap-edge.tmpfiles.conf")],
                   check=True, capture_output=True)  # fmt: skip
    uid = int(user[2])
    state = root / "var/lib/camtrap-edge"
    for sub in ("", "models", "engines", "records", "audit"):
        st = (state / sub).stat()
        assert st.st_uid == uid and (st.st_mode & 0o777) == 0o750, sub
    etc = (root / "etc/camtrap-edge").stat()
    assert etc.st_uid == 0 and (etc.st_mode & 0o777) == 0o750
    incoming = (root / "srv/camtrap/incoming").stat()
    assert incoming.st_uid == uid and (incoming.st_mode & 0o7777) == 0o2775


# --- install / uninstall -----------------------------------------------------------------------
@pytest.mark.parametrize("script", ["install.sh", "uninstall.sh"])
def test_scripts_parse_and_are_strict(script):
    text = (SYSTEMD / script).read_text()
    assert "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(SYSTEMD / script)], check=True)
    assert os.access(SYSTEMD / script, os.X_OK)


def test_install_dry_run_prints_the_steps_and_changes_nothing(tmp_path):
    r = subprocess.run([str(SYSTEMD / "install.sh"), "--dry-run", "--prefix", str(tmp_path / "root")],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    steps = [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")]
    joined = "\n".join(steps)
    for needle in ("systemd-sysusers", "systemd-tmpfiles", "--create", "venv --system-site-packages",
                   "[edge]", "pycuda", "camtrap-edge.service", "enable camtrap-edge.service",
                   "config.example.yaml"):  # fmt: skip
        assert needle in joined, needle
    assert not (tmp_path / "root").exists()


def test_uninstall_dry_run_keeps_data_unless_purge(tmp_path):
    def steps(*extra):
        r = subprocess.run([str(SYSTEMD / "uninstall.sh"), "--dry-run", "--prefix", str(tmp_path), *extra],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return "\n".join(line for line in r.stdout.splitlines() if line.startswith("+ "))

    plain, purge = steps(), steps("--purge")
    assert "camtrap-edge.service" in plain and "/var/lib/camtrap-edge" not in plain
    assert "/var/lib/camtrap-edge" in purge and "userdel" in purge
    assert "/srv/camtrap" not in purge  # the camera's images are never deleted


# --- install on a Jetson: JetPack detected from a faked /etc/nv_tegra_release ---------------------
TEGRA_R36 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 2025\n"
JETSON_ORT = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _fake_jetpack(tmp_path: Path, *, ort: tuple[str, ...] | None = JETSON_ORT) -> list[str]:
    """install.sh options for a faked JetPack 6: the L4T release file, a system Python whose site
    packages hold JetPack's tensorrt (and onnxruntime-gpu when ``ort``), a CUDA folder with nvcc."""
    site = tmp_path / "site"
    (site / "tensorrt").mkdir(parents=True)
    (site / "tensorrt" / "__init__.py").write_text('__version__ = "10.3.0"\n')
    if ort is not None:
        (site / "onnxruntime").mkdir()
        (site / "onnxruntime" / "__init__.py").write_text(
            f'__version__ = "1.20.0"\ndef get_available_providers():\n    return {list(ort)!r}\n')
    py = tmp_path / "python3"
    py.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    py.chmod(0o755)
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    nvcc.chmod(0o755)
    (tmp_path / "nv_tegra_release").write_text(TEGRA_R36)
    return ["--tegra-release", str(tmp_path / "nv_tegra_release"), "--python", str(py),
            "--cuda", str(tmp_path / "cuda")]


def _dry_run(tmp_path: Path, *options: str) -> tuple[list[str], subprocess.CompletedProcess]:
    r = subprocess.run([str(SYSTEMD / "install.sh"), "--dry-run", "--prefix", str(tmp_path / "root"), *options],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "root").exists()
    return [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")], r


def test_install_on_jetpack_uses_the_system_tensorrt_and_onnxruntime_gpu(tmp_path):
    steps, r = _dry_run(tmp_path, *_fake_jetpack(tmp_path))
    assert "Jetson: L4T R36.4.3 (JetPack 6)" in r.stdout
    assert "system TensorRT 10.3.0" in r.stdout and "system onnxruntime-gpu 1.20.0" in r.stdout
    venv = str(tmp_path / "root/opt/camtrap-edge/venv")
    assert f"{tmp_path / 'python3'} -m venv --system-site-packages {venv}" in steps
    pip = [s for s in steps if s.startswith(f"{venv}/bin/pip install numpy<2 ")]
    assert pip == [f"{venv}/bin/pip install numpy<2 {REPO}[edge-core]"]  # no PyPI onnxruntime over the GPU one
    assert not any("[edge]" in s or "onnxruntime" in s for s in steps)
    cuda = tmp_path / "cuda"
    pycuda = next(s for s in steps if s.endswith(" pycuda"))
    assert pycuda.startswith(f"env CUDA_ROOT={cuda} CPATH={cuda}/include LIBRARY_PATH={cuda}/lib64 PATH={cuda}/bin:")
    assert "numpy<2 pycuda" in pycuda
    config = tmp_path / "root/etc/camtrap-edge/config.yaml"
    check = steps.index(f"{venv}/bin/camtrap-edge check-config --strict {config}")
    assert steps[check + 1].startswith(f"systemctl --root={tmp_path / 'root'} enable camtrap-edge.service")


def test_install_on_jetpack_without_onnxruntime_gpu(tmp_path):
    opts = _fake_jetpack(tmp_path, ort=("AzureExecutionProvider", "CPUExecutionProvider"))  # a CPU build there
    steps, r = _dry_run(tmp_path, *opts, "--ort-wheel", "/srv/wheels/onnxruntime_gpu-1.20.0-cp310-linux_aarch64.whl")
    venv = str(tmp_path / "root/opt/camtrap-edge/venv")
    assert (f"{venv}/bin/pip install numpy<2 {REPO}[edge-core] "
            "/srv/wheels/onnxruntime_gpu-1.20.0-cp310-linux_aarch64.whl") in steps
    steps, r = _dry_run(tmp_path, *opts)  # neither: the CPU build, said out loud
    assert f"{venv}/bin/pip install numpy<2 {REPO}[edge-core] onnxruntime>=1.16" in steps
    assert "no onnxruntime-gpu" in r.stderr and "docs/jetson.md" in r.stderr


def test_install_off_jetson_uses_the_edge_extra(tmp_path):
    steps, r = _dry_run(tmp_path, "--tegra-release", str(tmp_path / "absent"))
    assert "Jetson" not in r.stdout
    assert any(s.endswith(f"pip install {REPO}[edge]") for s in steps)
    assert not any("numpy<2" in s or "edge-core" in s for s in steps)


def test_pyproject_edge_is_edge_core_plus_onnxruntime():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["edge"] == ["camtrap-cascade[edge-core]", "onnxruntime>=1.16"]
    assert not any(d.startswith("onnxruntime") for d in extras["edge-core"])


@needs_root_tools
def test_install_and_uninstall_into_a_prefix(tmp_path):
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    install = [str(SYSTEMD / "install.sh"), "--prefix", str(root), "--no-venv", "--python", sys.executable,
               "--tegra-release", str(tmp_path / "absent")]
    r = subprocess.run(install, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    unit = root / "etc/systemd/system/camtrap-edge.service"
    wants = root / "etc/systemd/system/multi-user.target.wants/camtrap-edge.service"
    assert unit.read_text() == UNIT.read_text()
    cfg = root / "etc/camtrap-edge/config.yaml"
    # the example config cannot run (no bundle, an example broker): installed, not enabled, and why
    assert not wants.exists() and "unit NOT enabled" in r.stdout
    assert "NOT enabled" in r.stderr
    assert f"{cfg}: mqtt.host broker.example.org is a reserved example name" in r.stdout
    assert f"{cfg}: bundle /var/lib/camtrap-edge/models/current does not exist" in r.stdout
    assert cfg.read_text() == (SYSTEMD / "config.example.yaml").read_text()
    assert (cfg.stat().st_mode & 0o777) == 0o640
    assert "camtrap:" in (root / "etc/passwd").read_text()
    (root / "var/lib/camtrap-edge/ledger.sqlite3").write_text("data")
    (root / "srv/camtrap/incoming/IMG_0001.JPG").write_text("image")
    (tmp_path / "bundle").mkdir()
    cfg.write_text(f"# edited\ndevice: {{id: trap-01}}\nwatch: {{folders: [{root}/srv/camtrap/incoming]}}\n"
                   f"bundle: {{path: {tmp_path}/bundle, require_signature: false}}\n")
    # a second install keeps the edited config, which passes the strict check: now it is enabled
    r = subprocess.run(install, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "unit enabled" in r.stdout, r.stdout + r.stderr
    assert cfg.read_text().startswith("# edited\n")
    assert wants.is_symlink()

    subprocess.run([str(SYSTEMD / "uninstall.sh"), "--prefix", str(root)], check=True, capture_output=True)
    assert not unit.exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/camtrap-edge.service").exists()
    assert (root / "var/lib/camtrap-edge/ledger.sqlite3").exists() and cfg.exists()

    subprocess.run([str(SYSTEMD / "uninstall.sh"), "--prefix", str(root), "--purge"], check=True,
                   capture_output=True)  # fmt: skip
    assert not (root / "var/lib/camtrap-edge").exists() and not cfg.exists()
    assert "camtrap:" not in (root / "etc/passwd").read_text()
    assert (root / "srv/camtrap/incoming/IMG_0001.JPG").read_text() == "image"
