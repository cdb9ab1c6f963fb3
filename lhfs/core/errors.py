"""The one error hierarchy of lhfs.

Every failure a user can cause or meet is an ``LhfsError``: it carries a one-line message meant
for a person and the exit status the command line returns. The command line prints the message
and exits; it never shows a traceback for these. The replica protocol carries the class name over
the wire so that a client re-raises the same kind of error the server met.
"""

from __future__ import annotations


class LhfsError(Exception):
    """Base of every expected failure; ``str(err)`` is the message shown to the user."""

    exit_code = 1


class UsageError(LhfsError):
    """The command line was given something it cannot accept (exit status 2)."""

    exit_code = 2


class ArgumentError(UsageError):
    """The command line's parser refused the arguments (its message names the command)."""


class NotFound(LhfsError):
    """A named thing (volume, snapshot, layer, replica) does not exist."""


class AlreadyExists(LhfsError):
    """A thing that must be new already exists."""


class InvalidArgument(LhfsError):
    """A value is out of range or malformed (offset past the end, bad size, bad name): bad
    usage, whoever gave it (exit status 2)."""

    exit_code = 2


class WrongState(LhfsError):
    """The request is fine but the thing is not in a state that allows it (a volume that is
    not attached, a DR standby, the last healthy replica)."""


class CorruptState(LhfsError):
    """On-disk state is damaged or does not match what was recorded."""


class DamagedLayers(CorruptState):
    """A replica directory's layer files are not what its metadata says (a data file cut,
    layer files the metadata lost): the replica refuses to open, and its engine sets the
    directory aside and rebuilds the replica when another one serves."""


class DamagedMeta(CorruptState):
    """A replica directory's ``volume.json`` is not one lhfs could have written (it does not
    parse, or a field is out of range): the replica refuses to open, and its engine sets the
    directory aside, layer files and all, and rebuilds the replica when another one serves.
    Not one a newer lhfs wrote (a newer format): that is plain ``CorruptState``, left as it is
    for an upgrade to open."""


class BackingImageMismatch(CorruptState):
    """The backing image's content differs from the content id the metadata records."""


class StorageError(LhfsError):
    """A disk refused an operation (full, read-only, I/O error)."""


class NoSpace(StorageError):
    """A replica's disk has no room for a write, and nothing of it was written (the space is
    claimed before any byte lands). A refusal, not a failure: every replica refusing a write
    leaves them equal, so the volume answers "no space" and serves on, where marking full
    replicas ERR would fault a volume whose replicas share one disk, reads included."""


class Busy(LhfsError):
    """Something else holds the resource (a replica directory opened by another process)."""


class NotInitialised(LhfsError):
    """A replica process serves a directory that holds no volume yet."""


class ProtocolError(LhfsError):
    """The peer broke the wire protocol (bad handshake, malformed frame)."""


class AuthenticationFailed(LhfsError):
    """A peer could not prove it holds the volume's key (or refused ours)."""


class WrongVolume(LhfsError):
    """A replica belongs to another volume than the one asked for; ``volume_id`` is its."""

    def __init__(
        self, message: str, volume_id: str = "", address: str = "", volume: str = ""
    ) -> None:
        super().__init__(message)
        self.volume_id = volume_id
        self.address = address  # (the replica's, when it was reached over the wire)
        self.volume = volume  # (the volume it was asked for)

    def naming(self, owner: str | None) -> str:
        """The refusal naming the volume the replica belongs to, ``owner`` (its name on this
        root, when the root has it): an operator knows volumes by name, not by a 32-digit id.
        ``replica add``, the rejoiner and doctor say it alike."""
        if not owner or not self.address:
            return str(self)
        return f"{self.address} serves a replica of volume {owner}, not of {self.volume}"


class NotPermitted(LhfsError):
    """The session may not ask for this (a read-only session asking to change something)."""


class Fenced(LhfsError):
    """A newer session of the volume took the replica over: this one may not change it."""


class ConnectionLost(LhfsError):
    """The connection to a replica broke before the answer arrived."""


class NoAnswer(ConnectionLost):
    """A replica took the connection (or left it pending) but answered nothing in time: it
    lives but is stuck, or its host is cut off; unlike a refusal or a reset."""


class PullFailed(LhfsError):
    """A replica could not fetch chunks straight from a peer replica (unreachable from where it
    runs, or not the peer expected): whoever asked must move the data itself."""


class RemoteError(LhfsError):
    """A replica reported an error of a kind this side does not know."""


def is_refusal(exc: BaseException) -> bool:
    """Whether a replica's error *answer* means it refused the request and changed nothing
    (a missing or existing name, a bad value, busy, no room on its disk), as opposed to a
    *failure* (its disk, its connection, its session): only a failure says something is wrong
    with the replica."""
    return isinstance(exc, _REFUSALS)


_REFUSALS = (
    NotFound,
    AlreadyExists,
    InvalidArgument,
    Busy,
    NotPermitted,
    NotInitialised,
    WrongState,
    NoSpace,
)
_BY_NAME: dict[str, type[LhfsError]] = {}


def _register() -> None:
    pending: list[type[LhfsError]] = [LhfsError]
    while pending:
        cls = pending.pop()
        _BY_NAME[cls.__name__] = cls
        pending.extend(cls.__subclasses__())


def from_wire(kind: str, message: str) -> LhfsError:
    """Rebuild an error sent by a peer; unknown kinds become ``RemoteError``."""
    if not _BY_NAME:
        _register()
    return _BY_NAME.get(kind, RemoteError)(message)


def sole(exc: BaseException) -> BaseException:
    """The one error inside ``exc``, if it is a group of one (nested groups too), else ``exc``.
    Why: an error raised in a task of a trio nursery reaches the caller wrapped in an exception
    group; a command must still report it as itself, in one line, not as "Exceptions from Trio
    nursery (1 sub-exception)"."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
