"""What the logs say of a volume: every event an operator needs to reconstruct what happened
to it, each said once and truly (a reason never empty, a volume named by its name, a
condition that lasts until the operator acts not repeated at every attempt)."""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

from conftest import needs_fuse

from lhfs.core.procs import wait_for
from lhfs.replica.process import ReplicaProcess
from lhfs.testing import Cli, kill_engine, make_tls, remote_volume, write_direct
from lhfs.wire.client import answers_plain, parse_address
from tools.faultproxy import FaultProxy

pytestmark = needs_fuse
MIB = 1 << 20


def live_replica(cli: Cli, name: str, replica_id: str) -> dict:
    return next(r for r in cli.live(name)["replicas"] if r["id"] == replica_id)


def port_of(proc: ReplicaProcess) -> int:
    return parse_address(proc.address)[1]


def engine_lines(cli: Cli, name: str) -> str:
    """The volume's log as ``lhfs logs --component engine`` shows it."""
    return cli.run("logs", name, "--component", "engine", "-n", "0").stdout


def test_the_volume_log_tells_what_happened_to_it(cli: Cli, tmp_path: Path) -> None:
    """Each change an operator makes, attached or detached, and what the engine does of
    itself, is one line of the volume's log (it said the attach alone): settings, expansion
    (from what to what), snapshots taken, removed and reverted to, replicas added, rebuilt,
    failed and removed, housekeeping, the detach."""
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "2")
    cli.run("volume", "attach", "v", "--device", str(tmp_path / "v.dev"))
    cli.run("volume", "set", "v", "--io-timeout", "6", "--system-snapshots", "1")
    cli.run("volume", "expand", "v", "--size", "32M")
    cli.run("snapshot", "create", "v", "s1")
    cli.run("snapshot", "rm", "v", "s1")
    added = cli.run("replica", "add", "v").stdout.split()[2]
    added_again = cli.run("replica", "add", "v").stdout.split()[2]  # (a 2nd rebuild snapshot)
    cli.run("replica", "rm", "v", "r1")
    cli.run("volume", "detach", "v")
    cli.run("volume", "set", "v", "--rejoin-wait", "1")
    cli.run("volume", "expand", "v", "--size", "48M")
    cli.run("snapshot", "create", "v", "s2")
    cli.run("snapshot", "revert", "v", "s2")
    cli.run("snapshot", "rm", "v", "s2")
    cli.run("replica", "rm", "v", added_again)
    log = engine_lines(cli, "v")
    for said in [
        "settings changed: io-timeout 8 -> 6, system-snapshots 3 -> 1",
        f"expanded from {16 * MIB} to {32 * MIB} bytes",
        "snapshot s1 taken",
        "snapshot s1 removed",
        f"replica {added} added (local, under the root): it is rebuilt",
        f"rebuilding replica {added} from r1",
        f"replica {added} rebuilt:",
        "housekeeping: removed system snapshot rebuild-",
        "replica r1 removed",
        "detaching: the final flush reached the replicas",
        "detached: the engine ends",
        "settings changed: rejoin-wait 5 -> 1 (detached)",
        f"expanded from {32 * MIB} to {48 * MIB} bytes (detached)",
        "snapshot s2 taken (detached)",
        "reverted to snapshot s2 (detached)",
        "snapshot s2 removed (detached)",
        f"replica {added_again} removed (detached)",
    ]:
        assert said in log, f"{said!r} not in:\n{log}"
    stamped = re.compile(r"^\[engine\] \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
    assert all(stamped.match(line) for line in log.splitlines()), log
    order = [log.index("snapshot s1 taken"), log.index("detached: the engine ends"),
             log.index("reverted to snapshot s2")]  # fmt: skip
    assert order == sorted(order), log
    # an engine that cannot log its end (killed): the command that lets it go does
    cli.run("volume", "attach", "v", "--device", str(tmp_path / "v.dev"))
    kill_engine(cli, "v")
    cli.run("volume", "detach", "v")
    assert "lhfs.command: let go (crashed): " in engine_lines(cli, "v").splitlines()[-1]
    cli.run("volume", "attach", "v", "--device", str(tmp_path / "v.dev"))
    os.kill(cli.engine_pid("v"), signal.SIGSTOP)  # (stopped: killed by detach --force)
    cli.run("volume", "detach", "v", "--force")
    last = engine_lines(cli, "v").splitlines()[-1]
    assert "lhfs.command: let go (not answering): killed its engine (pid" in last, last


def test_a_replica_of_another_volume_is_named_by_its_name(cli: Cli, tmp_path: Path, serve) -> None:
    """At a failed replica's address answers a replica of another volume of this root: the
    engine's log, ``replica ls``, doctor and a refused attach name that volume, as ``replica
    add`` does (they said "another volume (id 32 hex digits)")."""
    _, (far,) = remote_volume(cli, tmp_path, serve, "a", 1)
    cli.run("volume", "create", "b", "--size", "16M", "--replicas", "1")
    cli.run("volume", "key", "b", "--out", str(tmp_path / "b.key"))
    port = port_of(far)
    far.kill()
    wait_for(lambda: cli.live("a")["state"] == "faulted", 30, "the volume to fault")
    serve(tmp_path / "b-there", tmp_path / "b.key", port)
    said = f"127.0.0.1:{port} serves a replica of volume b, not of a"
    wait_for(lambda: said in (live_replica(cli, "a", "r2")["rejoin"] or ""), 30, "the refusal")
    log = cli.engine_log("a")
    assert said in log and "another volume" not in log, log
    doctor = cli.run("doctor", "a", check=False).stdout
    assert said in doctor and "another volume" not in doctor, doctor
    cli.run("volume", "detach", "a")
    refused = cli.run("volume", "attach", "a", "--device", str(tmp_path / "a.dev"), check=False)
    assert refused.returncode == 1 and said in refused.stderr, refused.stderr


def test_a_tls_replica_lost_is_said_with_a_reason_and_a_probe_is_said_as_one(
    cli: Cli, tmp_path: Path, replica_factory
) -> None:
    """A replica over TLS killed: the engine says why its connection broke (it said "broke: "
    and nothing: a TLS stream's error says nothing itself). A replica served without TLS and
    added with ``--tls-ca`` is probed in plain to tell the engine's operator so: the replica's
    log says a TLS handshake came (it said "not an lhfs client", or that a client asked for
    "another volume (000...0)": the probe). A replica served with TLS says a client spoke
    without TLS (it said "wrong version number"), and nothing of the probe."""
    ca, cert, key = make_tls(tmp_path / "tls")
    cli.run("volume", "create", "t", "--size", "16M", "--replicas", "1")
    cli.run("volume", "attach", "t", "--device", str(tmp_path / "t.dev"))
    cli.run("volume", "key", "t", "--out", str(tmp_path / "t.key"))
    plain = replica_factory(tmp_path / "plain", tmp_path / "t.key")
    refused = cli.run("replica", "add", "t", "--address", plain.address, "--tls-ca", str(ca),
                      check=False)  # fmt: skip
    assert refused.returncode == 1 and "answers without TLS" in refused.stderr, refused.stderr
    wait_for(lambda: "TLS" in plain.log.read_text(), 10, "the replica to log the attempt")
    said = plain.log.read_text()
    assert "another volume" not in said and "0" * 32 not in said, said
    assert "a client began a TLS handshake: this replica serves without TLS" in said, said
    remote = replica_factory(tmp_path / "remote", tmp_path / "t.key", tls=(cert, key))
    assert not answers_plain(*parse_address(remote.address))  # (a probe: not logged)
    plain_add = cli.run("replica", "add", "t", "--address", remote.address, check=False)
    assert plain_add.returncode == 1 and "--tls-ca" in plain_add.stderr, plain_add.stderr
    handshakes = lambda: [  # noqa: E731
        line for line in remote.log.read_text().splitlines() if "during the handshake" in line
    ]
    wait_for(handshakes, 10, "the TLS replica to log the plain client")
    assert len(handshakes()) == 1, remote.log.read_text()  # (one a minute: the probe was not)
    assert "a client spoke without TLS: this replica serves TLS only" in handshakes()[0]
    far = cli.run("replica", "add", "t", "--address", remote.address, "--tls-ca", str(ca))
    far_id = far.stdout.split()[2]
    remote.kill()
    wait_for(lambda: live_replica(cli, "t", far_id)["mode"] == "ERR", 30, "the replica failed")
    failed = [line for line in cli.engine_log("t").splitlines() if f"{far_id} (" in line]
    assert failed and all(re.search(r"failed: .*\w.*: \S", line) for line in failed), failed
    assert all(not line.rstrip().endswith(":") for line in failed), failed
    cli.run("volume", "detach", "t")


def test_what_a_rebuild_relays_is_said_once_it_relayed(
    cli: Cli, tmp_path: Path, replica_factory
) -> None:
    """A new replica that cannot reach its source by the engine's address is fed by the
    engine: the log says the pull failed, then how many bytes were relayed, as ``replica
    ls`` counts them (it said "relays through the engine" before anything was)."""
    cli.run("volume", "create", "n", "--size", "16M", "--replicas", "1")
    cli.run("volume", "key", "n", "--out", str(tmp_path / "n.key"))
    remote = replica_factory(tmp_path / "remote", tmp_path / "n.key")
    proxy = FaultProxy(parse_address(remote.address))
    try:
        device = tmp_path / "dev"
        cli.run("volume", "attach", "n", "--device", str(device))
        write_direct(device, 0, b"\x5a" * (8 * MIB))
        cli.run("replica", "add", "n", "--address", f"127.0.0.1:{proxy.port}")
        cli.run("replica", "rm", "n", "r1")  # the remote replica is now the only source
        proxy.stop()
        near = cli.run("replica", "add", "n").stdout.split()[2]
        stats = live_replica(cli, "n", near)["rebuild_stats"]
        assert stats["bytes_relayed"] == 8 * MIB, stats
        log = cli.engine_log("n")
        assert "relays through the engine" not in log, log
        assert f"replica {near} cannot pull from r2: " in log, log
        relayed = f"replica {near}: {8 * MIB} of the {8 * MIB} bytes copied were relayed"
        assert log.count(relayed) == 1, log
        assert log.index("cannot pull") < log.index(relayed) < log.index(f"{near} rebuilt"), log
        cli.run("volume", "detach", "n")
    finally:
        proxy.close()


def test_another_directory_at_a_replicas_address_is_said_once(
    cli: Cli, tmp_path: Path, serve
) -> None:
    """A degraded volume's failed replica r3 comes back as another directory at its address:
    that lasts until the operator acts, so the log says it once, with what to do, and the
    engine keeps looking quietly (a warning at every attempt, up to 30 s apart, before);
    ``replica ls`` says why all along. Its own directory back, it is rebuilt."""
    key, (_, b) = remote_volume(cli, tmp_path, serve, "d", 2)
    port = port_of(b)
    b.kill()
    write_direct(tmp_path / "d.dev", 0, b"\x17" * MIB)
    wait_for(lambda: live_replica(cli, "d", "r3")["mode"] == "ERR", 30, "r3 failed")
    other = tmp_path / "other"
    shutil.copytree(b.dir, other)
    (other / "id").write_text(f"{'1' * 32}\n")
    stranger = serve(other, key, port)
    said = f"answers at its address with another replica's directory (id {'1' * 32}"
    wait_for(lambda: said in (live_replica(cli, "d", "r3")["error"] or ""), 30, "the refusal")
    # (the third attempt waits 4 s: two have been refused by then)
    wait_for(lambda: "in 4s" in (live_replica(cli, "d", "r3")["rejoin"] or ""), 30, "3 tries")
    listed = cli.run("replica", "ls", "d").stdout
    assert said in listed, listed
    log = cli.engine_log("d")
    lines = [line for line in log.splitlines() if said in line]
    assert len(lines) == 1, log
    assert "lhfs replica rm d r3" in lines[0] and "own directory back" in lines[0], lines
    assert stranger.stop() == 0
    serve(b.dir, key, port)
    wait_for(lambda: cli.live("d")["state"] == "healthy", 60, "r3 rebuilt")
    cli.run("volume", "detach", "d")
