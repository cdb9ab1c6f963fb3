"""What a metrics endpoint does with clients that misbehave, and what it costs at most."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from conftest import needs_fuse
from prometheus_client.core import GaugeMetricFamily

from lhfs.core.procs import wait_for
from lhfs.engine.metrics import FRESH_FOR, serve
from lhfs.testing import Cli


class Counted:
    """A collector that counts how often it is asked."""

    def __init__(self) -> None:
        self.calls = 0

    def collect(self) -> list[GaugeMetricFamily]:
        self.calls += 1
        return [GaugeMetricFamily("lhfs_test_one", "one", value=1)]


def handlers() -> int:
    """Threads serving a metrics connection now (in this process)."""
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_clients_that_reset_before_the_answer_log_nothing(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Fifty clients that ask and reset the connection at once: nothing on standard error
    (each wrote a 23-line traceback into the service's log) and no log line."""
    host, port = serve("127.0.0.1:0", Counted())
    caplog.set_level(logging.DEBUG)
    for _ in range(50):
        with socket.create_connection((host, port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    wait_for(lambda: handlers() == 0, 20, "the connections to be served")
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.name.startswith("lhfs")], caplog.text


def test_a_scrape_that_fails_here_is_logged_in_one_line_a_minute(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A collector that fails: five scrapes make one log line, without a traceback."""

    class Failing:
        def collect(self) -> list[GaugeMetricFamily]:
            raise RuntimeError("no view")

    host, port = serve("127.0.0.1:0", Failing())
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert sock.recv(1 << 16) == b""  # (closed: no answer)
    wait_for(lambda: handlers() == 0, 20, "the scrapes to be served")
    assert "Traceback" not in capfd.readouterr().err
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lhfs")]
    assert len(lines) == 1 and "no view" in lines[0] and "\n" not in lines[0], lines


def read_all(host: str, port: int, request: bytes) -> bytes:
    """What the endpoint answers ``request`` with, until it closes the connection."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    return answer


def test_a_flood_of_scrapes_collects_once_a_second_and_stays_fresh() -> None:
    """Eight clients scraping as fast as they can: the collector (the engine's view, which read
    config.json) runs once a second at most, not once a scrape; a later scrape sees it anew."""
    collector = Counted()
    host, port = serve("127.0.0.1:0", collector)
    started = time.monotonic()
    answers: list[bytes] = []

    def scrape_many() -> None:
        for _ in range(25):
            answers.append(read_all(host, port, b"GET /metrics HTTP/1.0\r\n\r\n"))

    clients = [threading.Thread(target=scrape_many) for _ in range(8)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    took = time.monotonic() - started
    assert len(answers) == 200 and all(b"lhfs_test_one 1.0" in a for a in answers)
    assert collector.calls <= 2 + took / FRESH_FOR, (collector.calls, took)
    before = collector.calls
    wait_for(
        lambda: (
            b"lhfs_test_one" in read_all(host, port, b"GET /metrics HTTP/1.0\r\n\r\n")
            and collector.calls > before
        ),
        10,
        "a scrape to be collected anew",
    )


def test_only_metrics_is_served() -> None:
    """``/metrics`` (with a query too), ``/`` says where they are, any other path is not found
    (every path was answered with the metrics)."""
    host, port = serve("127.0.0.1:0", Counted())

    def get(path: str) -> tuple[str, bytes]:
        answer = read_all(host, port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        return head.split(b"\r\n")[0].decode(), body

    for path in ("/metrics", "/metrics?name[]=lhfs_test_one"):
        status, body = get(path)
        assert status.endswith(" 200 OK") and b"lhfs_test_one 1.0" in body, (path, status)
    assert get("/") == ("HTTP/1.0 200 OK", b"metrics: /metrics\n")
    for path in ("/foo", "/../../etc/passwd", "/metrics/", "/metricsx"):
        status, body = get(path)
        assert status == "HTTP/1.0 404 Not Found" and b"lhfs_test" not in body, (path, status)


@needs_fuse
def test_a_metrics_address_empty_or_not_of_this_host_is_refused(cli: Cli, tmp_path: Path) -> None:
    """``--metrics ""`` is usage (exit 2: it attached without metrics, exit 0); an address of
    another host or a name unknown is refused (exit 1), as ``replica serve`` refuses it;
    each in one line, the volume left detached and no device made."""
    cli.run("volume", "create", "v", "--size", "1M", "--replicas", "1")
    device = tmp_path / "dev"
    for address, code, said in (
        ("", 2, "argument --metrics: not a HOST:PORT address: ''"),
        ("192.0.2.1:9100", 1, "cannot serve metrics on 192.0.2.1:9100: "),
        ("nowhere.invalid:9100", 1, "cannot serve metrics on nowhere.invalid:9100: "),
    ):
        refused = cli.run(
            "volume", "attach", "v", "--device", str(device), "--metrics", address, check=False
        )
        assert refused.returncode == code, (address, refused)
        assert refused.stderr.count("\n") == 1 and said in refused.stderr, refused.stderr
        assert cli.info("v")["state"] == "detached" and not device.exists()
    refused = cli.run("dr", "create", "s", "--target", "s3://b/p", "--metrics", "", check=False)
    assert refused.returncode == 2 and "argument --metrics" in refused.stderr, refused


def _read_bytes() -> int:
    """Bytes this process has read so far (``rchar``: every read, page cache too)."""
    io = Path("/proc/self/io").read_text().split()
    return int(io[io.index("rchar:") + 1])


def test_an_image_is_hashed_without_reading_its_holes(tmp_path: Path) -> None:
    """The content id of sparse images is what reading them whole gives (data at the start,
    the end, in between, none at all), and a 4 GiB image holding 5 bytes is hashed reading
    a few MiB (all of its holes were read: a 10 TiB thin disk took hours)."""
    import random

    import xxhash

    from lhfs.store.backing import content_id

    rng = random.Random(5)
    image = tmp_path / "sparse.img"
    for size, writes in ((1, [0]), (4 << 20, []), ((9 << 20) + 7, [0, 5 << 20, (9 << 20) + 6])):
        image.unlink(missing_ok=True)
        with open(image, "wb") as f:
            f.truncate(size)
            for offset in writes:
                f.seek(offset)
                f.write(rng.randbytes(min(size - offset, 70000)))
        whole = image.read_bytes()
        assert content_id(image) == f"{xxhash.xxh3_128(whole).hexdigest()}-{size}", size
    image.unlink()
    with open(image, "wb") as f:
        f.truncate(4 << 30)
        f.seek(3 << 30)
        f.write(b"hello")
    told: list[tuple[int, int]] = []
    before = _read_bytes()
    found = content_id(image, lambda done, total: told.append((done, total)))
    assert _read_bytes() - before < 16 << 20, _read_bytes() - before
    digest = xxhash.xxh3_128()
    for offset in range(0, 4 << 30, 4 << 20):
        digest.update(b"hello" if offset == 3 << 30 else bytes(4 << 20))
        if offset == 3 << 30:
            digest.update(bytes((4 << 20) - 5))
    assert found == f"{digest.hexdigest()}-{4 << 30}"
    assert told[-1] == (4 << 30, 4 << 30) and len(told) > 100


def test_backing_image_create_shows_its_progress(cli: Cli, tmp_path: Path) -> None:
    """``backing-image create`` says how far it copied and hashed on stderr (it said nothing
    for as long as it took); ``--quiet`` says nothing."""
    image = tmp_path / "thin.img"
    with open(image, "wb") as f:
        f.truncate(1 << 30)
        f.write(b"boot")
    done = cli.run("backing-image", "create", "thin", "--from", str(image))
    assert "hashing thin: 100% 1G/1G" in done.stderr, done.stderr
    assert done.stdout.startswith("created backing image thin: 1G, id "), done.stdout
    quiet = cli.run("backing-image", "create", "other", "--from", str(image), "--quiet")
    assert quiet.stderr == "" and quiet.stdout.split()[-1] == done.stdout.split()[-1]


def test_doctor_says_what_failed_in_one_line_on_stderr(cli: Cli) -> None:
    """A failed check: exit 1 and stderr holds one line naming it (it held nothing), the
    report on stdout as ever; nothing failed, nothing on stderr."""
    import shutil

    cli.run("volume", "create", "v", "--size", "1M", "--replicas", "1")
    assert cli.run("doctor", "v").stderr == ""
    shutil.rmtree(cli.root / "volumes" / "v" / "replicas")
    failed = cli.run("doctor", "v", check=False)
    assert failed.returncode == 1 and "FAIL  replica r1" in failed.stdout, failed
    assert failed.stderr == "lhfs: 1 check(s) failed: replica r1\n", failed.stderr
    reported = cli.run("doctor", "v", "--json", check=False)
    assert reported.returncode == 1 and reported.stderr == failed.stderr, reported


def test_a_count_setting_is_kept_as_a_whole_number(cli: Cli) -> None:
    """``volume set --system-snapshots " 5"`` keeps 5 in config.json (it kept 5.0, a number
    a reader takes for a fraction); seconds stay numbers with fractions."""
    import json

    cli.run("volume", "create", "v", "--size", "1M", "--replicas", "1")
    cli.run("volume", "set", "v", "--system-snapshots", " 5", "--io-timeout", "2.5")
    kept = json.loads((cli.root / "volumes" / "v" / "config.json").read_text())["settings"]
    assert kept == {"system_snapshots": 5, "io_timeout": 2.5}, kept
    assert type(kept["system_snapshots"]) is int
    assert cli.json("volume", "set", "v")["settings"]["system_snapshots"] == 5


def test_sizes_are_ascii_and_nothing_around_them(cli: Cli) -> None:
    """``--size`` takes the forms the README gives (``64M``, ``64m``, ``64MiB``, bytes), not
    other scripts' digits nor a newline or spaces around (``１0M`` made a volume of 10M)."""
    from lhfs.core.units import parse_size

    assert [parse_size(t) for t in ("64M", "64m", "64MiB", "4096")] == [64 << 20] * 3 + [4096]
    for text in ("１0M", "10M\n", " 10M", "10 M", "٣M", "10M\t"):
        refused = cli.run("volume", "create", "v", "--size", text, check=False)
        assert refused.returncode == 2 and "not a size" in refused.stderr, (text, refused)
        assert refused.stderr.count("\n") == 1, refused.stderr
    assert cli.json("volume", "ls") == []


def test_sizes_that_would_read_alike_are_said_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume a little larger than the largest file the root's file system holds: the two
    sizes in bytes (it said "16T does not fit: ... at most 16.0T"); apart, rounded as ever."""
    from lhfs.core.errors import InvalidArgument
    from lhfs.core.units import format_sizes
    from lhfs.store import chunkstore

    assert format_sizes(16 << 40, 8 << 40) == ["16T", "8T"]
    monkeypatch.setattr(chunkstore, "largest_file", lambda d, up_to: (16 << 40) - 4096)
    with pytest.raises(InvalidArgument) as said:
        chunkstore.check_fits(tmp_path, 16 << 40)
    assert str(said.value) == (
        f"a volume of {16 << 40} bytes does not fit: the file system under {tmp_path} holds "
        f"files of at most {(16 << 40) - 4096} bytes"
    )


def test_every_positional_argument_says_what_it_is() -> None:
    """``--help`` of each verb of these groups describes its positional arguments (``name``,
    ``volume``, ``id``, ``url`` were listed bare)."""
    import argparse

    from lhfs.cli import build_parser

    def bare(parser: argparse.ArgumentParser, path: list[str]) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += bare(sub, [*path, name])
            elif not action.option_strings and not action.help:
                found.append(" ".join([*path, action.dest]))
        return found

    groups = ("volume", "replica", "dr", "snapshot", "backing-image", "system", "backup")
    top = next(a for a in build_parser([])._actions if isinstance(a, argparse._SubParsersAction))
    assert [b for g in groups for b in bare(top.choices[g], [g])] == []


def test_the_answers_kept_are_two_kinds_whatever_a_client_accepts() -> None:
    """A client's ``Accept`` (its version and escaping text, anything) makes no answer of
    its own: an answer per distinct header was built and kept for ever (memory without
    bound, and no bound on the work either)."""
    from prometheus_client import CollectorRegistry, Counter

    from lhfs.engine.metrics import Answers

    registry = CollectorRegistry()
    Counter("lhfs_probe", "a probe", registry=registry).inc()
    answers = Answers(registry)
    for n in range(200):
        accept = f"application/openmetrics-text; version=1.0.{n}" if n % 2 else f"text/{n}"
        _, zipped, body = answers.get(accept, None)
        assert b"lhfs_probe" in body and not zipped
    assert len(answers.made) == 2, list(answers.made)
