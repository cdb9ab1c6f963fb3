"""The systemd units in tools/systemd start what they say, with options lhfs takes."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

from lhfs.core.procs import LHFS

UNITS = Path(__file__).resolve().parents[1] / "tools" / "systemd"


def test_the_units_run_lhfs_commands_that_exist(tmp_path: Path) -> None:
    units = sorted(UNITS.glob("lhfs-*@.service"))
    assert {u.name for u in units} == {
        "lhfs-replica@.service",
        "lhfs-dr@.service",
        "lhfs-mount@.service",
    }
    for unit in units:
        parsed = configparser.ConfigParser(strict=False, interpolation=None)
        parsed.read(unit)
        for key in ("ExecStart", "ExecStop"):
            if not parsed.has_option("Service", key):
                continue
            command = shlex.split(parsed.get("Service", key))
            assert command[0] == "/usr/local/bin/lhfs", (unit.name, command)
            # the verb's --help parses: the group and verb exist, so do the options named
            verb = [arg for arg in command[1:] if not arg.startswith(("-", "$", "%"))][:2]
            if verb[0] in ("mount", "umount"):
                verb = verb[:1]
            result = subprocess.run([LHFS, *verb, "--help"], capture_output=True, text=True)
            assert result.returncode == 0, (unit.name, verb, result.stderr)
            for option in (arg for arg in command if arg.startswith("--")):
                assert option in result.stdout, (unit.name, option)
        # an instance of each, with the binary this checkout installs, for systemd-analyze
        (tmp_path / unit.name.replace("@", "@example")).write_text(
            unit.read_text().replace("/usr/local/bin/lhfs", LHFS)
        )
    verify = shutil.which("systemd-analyze")
    if verify:  # (present on these machines; the checks above run everywhere)
        result = subprocess.run(
            [verify, "verify", *map(str, sorted(tmp_path.glob("*.service")))],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_a_mount_unit_stop_never_signals_what_serves_a_busy_file_system() -> None:
    """A stop whose ``lhfs umount`` is refused (busy) signalled what was left in the unit's
    cgroup: the replicas ended under the mounted file system (SIGTERM's default), the engine
    with them. Only the main process is signalled (none, once the start is done), and the
    umount has time to write out the page cache."""
    parsed = configparser.ConfigParser(strict=False, interpolation=None)
    parsed.read(UNITS / "lhfs-mount@.service")
    assert parsed.get("Service", "KillMode") == "process"
    assert int(parsed.get("Service", "TimeoutStopSec")) >= 120
