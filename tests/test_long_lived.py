"""What builds up over a long life: big and many logs, replicas and backup targets come and
gone. Each cost must stay in proportion to what is asked, and nothing must be kept for ever."""

from __future__ import annotations

import time
from pathlib import Path

from lhfs.core import logs
from lhfs.core.procs import wait_for
from lhfs.testing import Cli

LINE = b"2026-12-06T16:00:00.000Z lhfs.engine: replica r2 failed: connection lost (detail)\n"


def test_following_a_burst_costs_its_size(tmp_path: Path) -> None:
    """A follower stopped while 8 MiB were logged reads them at once, in time linear in
    their size (each line appended to what was read so far took minutes of CPU)."""
    path = tmp_path / "engine.log"
    path.write_bytes(b"")
    merger = logs.Merger([logs.Follower("engine", path)], window=0)
    count = (8 << 20) // len(LINE)
    with open(path, "ab") as f:
        f.write(LINE * count + b"2026-12-06T16:00:00.001Z half a li")
    began = time.monotonic()
    shown = merger.poll(now=time.time() + 10)
    took = time.monotonic() - began
    assert shown.count(b"\n") == count
    assert shown.endswith(b"[engine] " + LINE)
    assert took < 8, f"8 MiB followed in {took:.1f} s"
    with open(path, "ab") as f:
        f.write(b"ne\n")
    assert merger.poll(now=time.time() + 10) == b"[engine] 2026-12-06T16:00:00.001Z half a line\n"


def test_a_removed_replica_takes_its_log_with_it(cli: Cli, tmp_path: Path) -> None:
    """``replica rm`` of an attached volume and of a detached one deletes the replica's log
    and its rotated files (they stayed for ever, shown by no ``lhfs logs``)."""
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "3")
    cli.run("volume", "attach", "v", "--device", str(tmp_path / "v.dev"))
    folder = cli.root / "volumes" / "v"
    wait_for(lambda: (folder / "r3.log").exists(), 30, "r3 to log")
    (folder / "r3.log.1").write_bytes(LINE)
    cli.run("replica", "rm", "v", "r3")
    cli.run("volume", "detach", "v")
    cli.run("replica", "rm", "v", "r2")
    assert not list(folder.glob("r[23].log*"))
    assert (folder / "r1.log").exists()
    shown = cli.run("logs", "v", "--all").stdout
    assert "replica r2 removed" in shown and "[r2]" not in shown and "[r3]" not in shown


def test_what_commands_log_for_a_detached_volume_is_rotated(cli: Cli) -> None:
    """Snapshots taken while a volume stays detached log to its ``engine.log``, rotated at
    ``$LHFS_LOG_MAX_BYTES`` as the engine rotates it, three older files kept (it grew without
    bound until the next attach)."""
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
    engine_log = cli.root / "volumes" / "v" / "engine.log"
    files = [engine_log, *(engine_log.with_name(f"engine.log.{n}") for n in (1, 2, 3))]
    for n, path in enumerate(files):  # (the current file 32 bytes short of 4096)
        path.write_bytes(f"2026-12-06T16:00:00.00{n}Z file {n}\n".encode() * (127 - 27 * bool(n)))
        path.chmod(0o600)
    cli.env["LHFS_LOG_MAX_BYTES"] = "4096"
    for n in range(5):
        cli.run("snapshot", "create", "v", f"s{n}")
    assert not engine_log.with_name("engine.log.4").exists()
    held = [path.read_bytes() for path in files]
    assert held[0].count(b"\n") == 5 and b"snapshot s4 taken" in held[0]
    assert [h.split(b"\n")[0].split(b" ", 1)[1] for h in held[1:]] == [
        b"file 0",
        b"file 1",
        b"file 2",
    ]
    assert all(path.stat().st_mode & 0o077 == 0 for path in files)
    assert "snapshot s4 taken" in cli.run("logs", "v", "-n", "1").stdout


def test_a_target_given_up_lets_its_snapshot_go(cli: Cli, tmp_path: Path, s3_endpoint: str) -> None:
    """``volume info`` shows the snapshot each backup target keeps as its base; removing that
    backup (``backup rm``) drops the base, so housekeeping trims its snapshot once backups go
    to another target (it was kept for ever, shown nowhere), and the next backup to the first
    target is a whole one that succeeds."""
    a, b = "s3://long-lived/a", "s3://long-lived/b"
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
    cli.run("volume", "set", "v", "--system-snapshots", "1")
    cli.run("volume", "attach", "v", "--device", str(tmp_path / "v.dev"))
    url_a = cli.run("backup", "create", "v", "--target", a, "--create-bucket", "--quiet")
    url_a = url_a.stdout.strip().splitlines()[-1]
    [base] = cli.info("v")["backups"]
    assert base["target"] == a and url_a.endswith("backup=" + base["backup"])
    kept = base["snapshot"]
    assert f"last backup to {a}: {base['backup']}" in cli.run("volume", "info", "v").stdout
    removed = cli.run("backup", "rm", url_a).stdout
    assert f"no longer keeps snapshot {kept}" in removed, removed
    assert cli.info("v")["backups"] == []
    for _ in range(2):
        cli.run("backup", "create", "v", "--target", b, "--create-bucket", "--quiet")

    def trimmed() -> bool:
        return kept not in {s["name"] for s in cli.json("snapshot", "ls", "v")}

    wait_for(trimmed, 60, f"housekeeping to trim {kept}")
    assert [base["target"] for base in cli.info("v")["backups"]] == [b]
    again = cli.run("backup", "create", "v", "--target", a, "--quiet").stdout.strip()
    cli.run("backup", "restore", again.splitlines()[-1], "copy", "--replicas", "1")
    assert (
        cli.run("volume", "checksum", "copy").stdout.split()[1]
        == cli.run("volume", "checksum", "v").stdout.split()[1]
    )


def _write_log(path: Path, stamps: list[int], tag: str) -> None:
    """A log with an entry per stamp (milliseconds), some with continuation lines, in big
    writes; it begins with a line of no stamp (the end of an entry of the file before)."""
    out = [b"  continued from before\n"]
    for n, ms in enumerate(stamps):
        stamp = f"2026-12-06T{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}"
        out.append(f"{stamp}.{ms % 1000:03d}Z lhfs.{tag}: entry {n} {'x' * (n % 50)}\n".encode())
        if n % 7 == 0:
            out.append(b"Traceback (most recent call last):\n  ValueError: no\n")
    path.write_bytes(b"".join(out))


def test_the_last_lines_of_big_logs_read_their_ends_only(tmp_path: Path) -> None:
    """``lhfs logs -n N`` finds the last N entries of a volume's logs, merged by time, from
    the end of each file (it read every file whole: 146 MB of memory for 121 MB of logs);
    ``--all`` merges them as they are read, never holding them all. Either gives what
    sorting every entry gives."""
    import random
    import tracemalloc

    rng = random.Random(7)
    found = {"engine": tmp_path / "engine.log", "r1": tmp_path / "r1.log"}
    stamps = sorted(rng.randrange(0, 86_400_000) for _ in range(400_000))
    _write_log(found["engine"].with_name("engine.log.1"), stamps[:100_000:2], "old")
    _write_log(found["engine"], stamps[100_000::2], "engine")
    _write_log(found["r1"], stamps[1::2], "replica")
    assert found["engine"].stat().st_size > 8 << 20

    def every(rotated: bool) -> list[tuple[str, bytes, bytes]]:  # (all read, then sorted)
        tagged = [
            (stamp, label, n, text)
            for label, path in found.items()
            for n, (stamp, text) in enumerate(logs.entries(path, rotated))
        ]
        tagged.sort(key=lambda item: item[:3])
        return [(label, stamp, text) for stamp, label, _, text in tagged]

    everything, current = every(True), every(False)
    tracemalloc.start()
    try:
        shown = list(logs.merged(found, 10, False))
        tail_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        count = sum(1 for _ in logs.merged(found, 0, True))
        all_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tail_peak < 2 << 20, f"-n 10 held {tail_peak} bytes"
    assert all_peak < 4 << 20, f"--all held {all_peak} bytes"
    assert count == len(everything)
    assert shown == current[-10:]
    for lines in (1, 3000, 10**6):
        assert list(logs.merged(found, lines, False)) == current[-lines:]
    assert list(logs.merged(found, 0, True)) == everything


def test_the_last_lines_stop_where_a_follower_starts(tmp_path: Path) -> None:
    """``-n N -f``: the last lines are those before the follower's start, read from there
    backwards; a line begun before it is the history's, whole (as when read from the top)."""
    path = tmp_path / "engine.log"
    path.write_bytes(LINE * 5 + b"2026-12-06T16:00:00.001Z lhfs.engine: be")
    follower = logs.Follower("engine", path)
    with open(path, "ab") as f:
        f.write(b"gun\n" + LINE.replace(b"00.000Z", b"00.002Z") * 3)
    start = {"engine": follower.start}
    for lines in (1, 2, 6, 100):
        assert (
            list(logs.merged({"engine": path}, lines, False, start))
            == [
                ("engine", stamp, text) for stamp, text in logs.entries(path, False, follower.start)
            ][-lines:]
        )
    [(_, _, text)] = logs.merged({"engine": path}, 1, False, start)
    assert text == b"2026-12-06T16:00:00.001Z lhfs.engine: begun\n"


def test_a_target_lost_for_good_is_forgotten_by_name(cli: Cli, s3_endpoint: str) -> None:
    """``backup forget VOL --target URL`` drops the base of a target whose store cannot be
    asked any more, in one line; an unknown target or volume is refused, nothing changed."""
    kept, gone = "s3://long-lived/kept", "s3://long-lived/gone"
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
    for target in (kept, gone):
        cli.run("backup", "create", "v", "--target", target, "--create-bucket", "--quiet")
    before = cli.info("v")["backups"]
    config = (cli.root / "volumes" / "v" / "config.json").read_bytes()
    for args, says in (
        (("v", "--target", "s3://long-lived/other"), "records no backup to s3://long-lived/other"),
        (("ghost", "--target", gone), "no volume named 'ghost'"),
        (("v", "--target", "s3://Bad_Bucket/x"), "bucket"),
    ):
        refused = cli.run("backup", "forget", *args, check=False)
        assert refused.returncode != 0 and says in refused.stderr, refused
        assert refused.stderr.count("\n") == 1 and not refused.stdout
    assert (cli.root / "volumes" / "v" / "config.json").read_bytes() == config
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # (the store out of reach: not asked)
    forgot = Cli(cli.root, env).run("backup", "forget", "v", "--target", gone).stdout
    [snapshot] = [b["snapshot"] for b in before if b["target"] == gone]
    assert forgot.count("\n") == 1 and f"no longer keeps snapshot {snapshot}" in forgot
    assert cli.info("v")["backups"] == [b for b in before if b["target"] == kept]
