"""Hosts on one machine, for tests and benchmarks: Linux network namespaces on a bridge.

Each host is a network namespace with its own address on a bridge in the root namespace (which
has the first address of the subnet, so the processes of the root namespace — an engine, the
test itself — reach every host, and every host reaches them). A host's link can be cut and
restored (its veth is set down and up: packets are dropped both ways, nothing is reset), and a
host can "reboot": every process in it is killed, its namespace deleted and made again with the
same address and hardware address (as a machine's network card keeps its own: a new one would
leave the other hosts sending to the old one until their neighbour entries expire, up to a
minute). Its processes run through ``ip netns exec``; files are shared (one file system).

    python -m tools.hosts up 3      # hosts lhfs-h1..h3 at 10.217.77.11-13 (or the next free /24)
    python -m tools.hosts down      # remove them and the bridge, killing what runs in them

``Cluster`` is the same from Python (the tests' fixture); ``down`` always removes everything it
made, and also what an interrupted earlier run of the same prefix left.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.217.77"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _mac(address: str) -> str:
    """A locally administered hardware address made of an IPv4 address: the same after every
    reboot of a host, and for the bridge (which would otherwise take the lowest of its ports',
    changing when a rebooted host's new port has a lower one)."""
    return "02:00:" + ":".join(f"{int(octet):02x}" for octet in address.split("."))


@dataclass
class Host:
    """One namespace host: ``name`` (the namespace), ``address`` on the bridge."""

    name: str
    address: str
    veth: str  # the root namespace's end of its link

    def command(self, args: Sequence[str]) -> list[str]:
        """``args`` run inside this host."""
        return ["ip", "netns", "exec", self.name, *args]

    def start(self, args: Sequence[str], **popen: object) -> subprocess.Popen:
        return subprocess.Popen(self.command(args), **popen)  # type: ignore[call-overload]

    def run(self, args: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(args), **kwargs)  # type: ignore[call-overload]

    @property
    def mac(self) -> str:
        return _mac(self.address)

    def cut(self) -> None:
        """The link goes down: nothing passes either way, no connection is told."""
        _ip("link", "set", self.veth, "down")

    def restore(self) -> None:
        _ip("link", "set", self.veth, "up")

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(pid) for pid in out.split()]

    def kill_all(self) -> None:
        """SIGKILL every process of the host (a power cut)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def hosts_file(self) -> Path:
        """The host's own /etc/hosts (``ip netns exec`` mounts it over /etc/hosts)."""
        return Path("/etc/netns") / self.name / "hosts"


class Cluster:
    """Hosts ``<prefix>-h1``.. on bridge ``<prefix>-br``; the root namespace is ``gateway``."""

    def __init__(self, prefix: str = "lhfs", subnet: str | None = None) -> None:
        self.prefix = prefix
        self.wanted = subnet
        self.subnet = subnet or SUBNET
        self.bridge = f"{prefix}-br"
        self.hosts: list[Host] = []

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    def up(self, count: int) -> list[Host]:
        """Make ``count`` hosts. Without a subnet named, the first /24 from ``SUBNET`` up that no
        link of this namespace holds: two clusters on one subnet would split its routes, and
        neither would reach its hosts."""
        self.down()  # whatever an interrupted run left
        share_mounts()
        self.subnet = self.wanted or free_subnet()
        _ip("link", "add", self.bridge, "address", _mac(self.gateway), "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for number in range(1, count + 1):
            host = Host(f"{self.prefix}-h{number}", f"{self.subnet}.{10 + number}", "")
            host.veth = f"{self.prefix}-v{number}"
            self._make(host)
            self.hosts.append(host)
        return self.hosts

    def _make(self, host: Host) -> None:
        _ip("netns", "add", host.name)
        inside = f"{self.prefix}-i{host.name.rsplit('h', 1)[1]}"
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", host.name)
        _ip("link", "set", host.veth, "master", self.bridge)
        _ip("link", "set", host.veth, "up")
        inner = ["netns", "exec", host.name, "ip"]
        _ip(*inner, "link", "set", "lo", "up")
        _ip(*inner, "link", "set", inside, "name", "eth0")
        _ip(*inner, "link", "set", "eth0", "address", host.mac)
        _ip(*inner, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip(*inner, "link", "set", "eth0", "up")
        hosts_file = host.hosts_file()
        hosts_file.parent.mkdir(parents=True, exist_ok=True)
        if not hosts_file.exists():
            hosts_file.write_text(Path("/etc/hosts").read_text())

    def reboot(self, host: Host) -> None:
        """Kill every process of ``host``, delete its namespace and make it again (same name,
        same address, link up): what the rest of the network sees of a reboot."""
        host.kill_all()
        _ip("netns", "del", host.name)
        _ip("link", "del", host.veth, check=False)  # (gone with the namespace, usually)
        self._make(host)

    def down(self) -> None:
        """Remove every host of this prefix (killing what runs in them) and the bridge."""
        listed = _ip("netns", "list", check=False).stdout.split("\n")
        names = [line.split()[0] for line in listed if line.startswith(f"{self.prefix}-h")]
        for name in names:
            Host(name, "", "").kill_all()
            _ip("netns", "del", name, check=False)
            with contextlib.suppress(OSError):
                (Path("/etc/netns") / name / "hosts").unlink()
                (Path("/etc/netns") / name).rmdir()
        links = _ip("-o", "link", "show", check=False).stdout.splitlines()
        for line in links:
            link = line.split(":")[1].strip().split("@")[0]
            if link.startswith(f"{self.prefix}-v") or link == self.bridge:
                _ip("link", "del", link, check=False)
        self.hosts = []


def share_mounts() -> None:
    """Make the root mount shared where it is private (some containers; systemd makes it
    shared). ``ip netns exec`` runs a host's processes in a mount namespace of their own (to
    put the host's /etc/hosts in place): a copy of this one's mounts, a slave of it. With a
    private root nothing unmounted here afterwards is unmounted there: a file system mounted
    meanwhile by anything on the machine stays mounted in every host process, and its loop
    device stays busy (a volume's ``umount`` then finds it in use) until they all end."""
    found = subprocess.run(["findmnt", "-no", "PROPAGATION", "/"], capture_output=True, text=True)
    if found.stdout.strip() == "private":
        subprocess.run(["mount", "--make-rshared", "/"], check=True)


def free_subnet() -> str:
    """The first ``10.217.N`` (N from ``SUBNET``'s) no address of this namespace is in."""
    held = _ip("-o", "-4", "addr", "show", check=False).stdout
    first = int(SUBNET.rsplit(".", 1)[1])
    for third in range(first, 255):
        subnet = f"{SUBNET.rsplit('.', 1)[0]}.{third}"
        if f" {subnet}." not in held:
            return subnet
    raise RuntimeError(f"no free subnet from {SUBNET}.0/24 up")


def sweep_orphans(stem: str) -> None:
    """Remove the clusters named ``<stem><pid>`` whose process is gone (a run killed before it
    could clean up), so their bridges and namespaces do not pile up."""
    names = _ip("netns", "list", check=False).stdout.split()
    names += [
        line.split(":")[1].strip() for line in _ip("-o", "link", check=False).stdout.splitlines()
    ]
    owners = {name.removeprefix(stem).split("-", 1)[0] for name in names if name.startswith(stem)}
    for owner in owners:
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            Cluster(f"{stem}{owner}").down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("count", nargs="?", type=int, default=3, help="hosts to make (up)")
    parser.add_argument("--prefix", default="lhfs", help="names: PREFIX-h1.., PREFIX-br")
    args = parser.parse_args(argv)
    cluster = Cluster(args.prefix)
    try:
        if args.action == "up":
            for host in cluster.up(args.count):
                print(f"{host.name} {host.address}")
            print(f"gateway (this namespace) {cluster.gateway} on {cluster.bridge}")
        else:
            cluster.down()
    except RuntimeError as exc:
        print(f"hosts: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
