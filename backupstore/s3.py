"""An S3 bucket (MinIO first, any S3) as the backup store's object layer.

Three rules shape this module. Every call goes through ``_call``, the one retry wrapper: a
transient failure (connection refused or reset, timeout, a host name that does not resolve,
5xx, 429/SlowDown) is retried with exponential backoff and jitter until a deadline; anything
else is final at once and becomes one line saying what the endpoint answered (``refusal``).
"Not found" is an answer, "could not ask" is not: ``stat``/``get`` return None only for
NoSuchKey, never because the store could not be reached. And nothing reaches the client that
it would refuse itself: a target is checked when it is parsed.

The endpoint and credentials (``Endpoint``) come from ``AWS_ENDPOINT_URL`` (or Amazon S3 of
``AWS_REGION``), ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``, or from a credentials file
(``KEY=value`` lines, readable by its owner only; a DR standby names one); an ``http://``
endpoint means no TLS. There is no default endpoint. Secrets never appear in messages.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import check_bucket_name

from lhfs.core.errors import CorruptState, InvalidArgument, LhfsError, UsageError
from lhfs.core.private import read_private
from lhfs.core.units import format_size

log = logging.getLogger("lhfs.s3")
T = TypeVar("T")

RETRY_TIMEOUT = 60.0  # how long an interactive command retries a store that does not answer
# what ``get`` reads at most unless told otherwise: a block of the largest block size (16 MiB)
# with its seal, with room to spare; a reader of larger objects (manifests) gives its own bound
GET_LIMIT = 17 << 20
_TRANSIENT_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "OperationAborted",
}
_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AuthorizationHeaderMalformed",
    "InvalidToken",
    "ExpiredToken",
}
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# (matched whole; in either case, as the S3 client takes it: RegionOne, a Swift default)
_REGION = re.compile(r"[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?", re.IGNORECASE)


# (what a DELETE the store did not answer says: whoever reports it must not say it stays)
NOT_CONFIRMED = "it may have been done all the same (not confirmed)"


class StoreUnavailable(LhfsError):
    """The store could not be asked (after retrying until the deadline)."""


class StoreRefused(LhfsError):
    """The store answered with a final error (access denied, no such bucket, not S3...)."""


class AccessDenied(StoreRefused):
    """The store refused these credentials what they asked (or refused them altogether)."""


@dataclass(frozen=True)
class Endpoint:
    """Where the store is and how to sign requests to it."""

    url: str  # scheme://host[:port]
    region: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, credentials_file: Path | None = None
    ) -> Endpoint:
        """The endpoint of the environment (or of ``AWS_ENDPOINT_URL`` in ``env``), with the
        credentials of ``credentials_file`` when one is named, else of the environment."""
        env = os.environ if env is None else env
        variable = "AWS_REGION" if env.get("AWS_REGION") else "AWS_DEFAULT_REGION"
        region = env.get(variable) or ""
        if region and not _REGION.fullmatch(region):  # (the S3 client's refusal: a traceback)
            raise UsageError(
                f"{variable} is not a region name: {region!r} (1-63 of a-z, 0-9, '-' and '_', "
                "starting and ending with a letter or digit, such as us-east-1)"
            )
        url = env.get("AWS_ENDPOINT_URL") or (region and f"https://s3.{region}.amazonaws.com")
        if not url:
            raise UsageError(
                "no S3 endpoint: set AWS_ENDPOINT_URL (for example http://127.0.0.1:9000 for a "
                "local MinIO), or AWS_REGION for Amazon S3"
            )
        endpoint = _endpoint_url(url)
        source = load_credentials(credentials_file) if credentials_file else env
        access, secret = source.get("AWS_ACCESS_KEY_ID"), source.get("AWS_SECRET_ACCESS_KEY")
        if not access or not secret:
            where = credentials_file or "the environment"
            raise UsageError(
                f"no S3 credentials in {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        return cls(endpoint, region or "us-east-1", access, secret)


def _endpoint_url(url: str) -> str:
    """``scheme://host[:port]`` of ``AWS_ENDPOINT_URL``, or one line (exit 2) saying what is
    wrong with it. Checked here, not by the S3 client, whose refusals are tracebacks. User
    info is refused without repeating the URL (it may hold a password), never kept: the
    endpoint is shown in messages and recorded in a DR standby's configuration."""
    if "@" in url:
        raise UsageError(
            "AWS_ENDPOINT_URL holds user info (USER:PASSWORD@): give the credentials in "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and only http(s)://HOST[:PORT] there"
        )
    bad = UsageError(f"AWS_ENDPOINT_URL is not an http(s)://HOST[:PORT] URL: {url!r}")
    try:
        parsed = urlparse(url)
    except ValueError:  # (an unclosed IPv6 bracket)
        raise bad from None
    try:
        port = parsed.port
    except ValueError:  # (not a number, or past 65535)
        port = 0
    if port == 0:
        raise UsageError(f"AWS_ENDPOINT_URL has a port that is not 1-65535: {url!r}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise bad
    if parsed.path.strip("/") or parsed.params or parsed.query or parsed.fragment:
        raise bad
    return f"{parsed.scheme}://{parsed.netloc}"


def load_credentials(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of a credentials file that only its owner may read. A file that
    is missing and one others may read are both a file to fix (exit 1), not bad usage of
    one command and a failure of another."""
    try:
        text = read_private(path, "credentials file").decode(errors="replace")
    except LhfsError as exc:
        raise LhfsError(str(exc)) from None
    found = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith("#"):
            found[name.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return found


@dataclass(frozen=True)
class Target:
    """``s3://BUCKET/PREFIX``."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Target:
        """A target URL, refused with one line (exit 2) unless every part is a name lhfs would
        make itself: a bucket name by S3's rules, prefix segments of letters, digits, ``.``,
        ``_`` and ``-`` starting with a letter or digit (so never ``.`` or ``..``)."""
        check_url_text(url, "s3://BUCKET/PREFIX")
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc or "?" in url or "#" in url:
            raise UsageError(f"not a backup target: {url!r} (use s3://BUCKET/PREFIX)")
        try:
            check_bucket_name(parsed.netloc, strict=True)
        except ValueError:
            raise UsageError(
                f"{url!r}: invalid bucket name {parsed.netloc!r} (3-63 of a-z, 0-9, '.' and "
                "'-', starting and ending with a letter or digit)"
            ) from None
        prefix = parsed.path.strip("/")
        for segment in prefix.split("/") if prefix else []:
            if not _SEGMENT.match(segment):
                raise UsageError(
                    f"{url!r}: invalid prefix segment {segment!r}: use letters, digits, '.', '_' "
                    "or '-', starting with a letter or digit"
                )
        if len(prefix) > 512:
            raise UsageError(f"{url!r}: the prefix is longer than 512 characters")
        return cls(parsed.netloc, prefix)

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def check_url_text(url: str, form: str) -> None:
    """Refuse a URL holding a control character, in one line showing it escaped: the URL
    parser drops tabs and newlines wherever they are, so ``s3://b/p<newline>q`` would become
    the prefix ``pq``, another store than the one typed."""
    bad = next((c for c in url if c < " " or c == "\x7f"), None)
    if bad is not None:
        raise UsageError(f"{url!r} holds a control character ({bad!r}): use {form}")


def _status(exc: BaseException) -> int | None:
    if isinstance(exc, ServerError):
        return exc.status_code
    if isinstance(exc, InvalidResponseError):
        code = getattr(exc, "_code", None)  # the client keeps the status only here
        return code if isinstance(code, int) else None
    status = getattr(getattr(exc, "response", None), "status", None)
    return status if isinstance(status, int) else None


def _cause(exc: BaseException) -> BaseException:
    """The innermost reason urllib3 wraps (a refused connection, a TLS failure)."""
    seen = exc
    while True:
        inner = getattr(seen, "reason", None) or seen.__cause__ or seen.__context__
        if inner is None or inner is seen or not isinstance(inner, BaseException):
            return seen
        seen = inner


def is_transient(exc: BaseException) -> bool:
    """The one classification of failures: worth retrying, or final."""
    if isinstance(exc, S3Error):
        return exc.code in _TRANSIENT_CODES
    status = _status(exc)
    if status is not None:
        return status >= 500 or status == 429
    cause = _cause(exc)
    if isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return True  # a pooled connection the server closed: the next one does
    if isinstance(cause, ssl.SSLError | ssl.CertificateError):
        return False  # TLS to a plain-HTTP server, or a certificate not trusted: never passes
    if isinstance(exc, urllib3.exceptions.ProtocolError) and "BadStatusLine" in repr(exc):
        return False  # plain HTTP to a TLS port, or a server that does not speak HTTP
    return isinstance(
        exc, urllib3.exceptions.HTTPError | socket.gaierror | ConnectionError | TimeoutError
    )


def refusal(what: str, endpoint: str, exc: BaseException) -> StoreRefused:
    """One line saying what the endpoint answered instead of doing ``what``."""
    if isinstance(exc, S3Error):
        if exc.code == "NoSuchBucket":
            return StoreRefused(f"{what}: bucket {exc.bucket_name!r} does not exist at {endpoint}")
        if exc.code in _ACCESS_CODES:
            return AccessDenied(
                f"{what}: {endpoint} refused access ({exc.code}): check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY"
            )
        return StoreRefused(f"{what}: {endpoint} answered {exc.code}")
    status = _status(exc)
    if status in (401, 403):
        return AccessDenied(
            f"{what}: {endpoint} refused access (HTTP {status}, no S3 error): check the "
            "credentials, and that AWS_ENDPOINT_URL is an S3 server"
        )
    if status is not None:
        kind = getattr(exc, "_content_type", None) or getattr(exc, "content_type", None)
        return StoreRefused(
            f"{what}: {endpoint} answered HTTP {status}"
            + (f" ({kind.split(';')[0]})" if kind else "")
            + ", not as S3 does: is AWS_ENDPOINT_URL an S3 server?"
        )
    cause = _cause(exc)
    if isinstance(cause, ssl.SSLError | ssl.CertificateError):
        return StoreRefused(
            f"{what}: TLS with {endpoint} failed ({_describe(cause)}): check http:// or "
            "https:// in AWS_ENDPOINT_URL, and the server's certificate"
        )
    return StoreRefused(f"{what}: {endpoint} did not answer as S3 does ({_describe(exc)})")


class Bucket:
    """One bucket of one endpoint, with retries; keys are full object names."""

    def __init__(
        self,
        target: Target,
        deadline: float = RETRY_TIMEOUT,
        first_delay: float = 0.2,
        on_retry: Callable[[str], None] | None = None,
        endpoint: Endpoint | None = None,
        patience: str = "--retry-timeout waits longer",
    ) -> None:
        endpoint = endpoint or Endpoint.from_env()
        parsed = urlparse(endpoint.url)
        self.target = target
        self.deadline = deadline
        self.first_delay = first_delay
        self.on_retry = on_retry  # told of every transient failure (a DR status shows it)
        self.endpoint = endpoint.url
        # what a store taken as gone is followed by: how to wait longer, as the caller knows
        # it (a command's option; a DR follower has none and tries again later)
        self.patience = patience
        self._ensured = False
        # A request gave up on the store and none has been answered since: the others give up
        # too, at once (see ``_call``); ``_gave_up`` wakes those waiting to retry.
        self._down = False
        self._gave_up = threading.Condition()
        # the calls under way: what each asks, and when it began (monotonic, wall clock)
        self._pending: dict[object, tuple[str, float, float]] = {}
        # a request that hangs waits no longer than the deadline (10 s at least: a large
        # block on a slow link is not a hung store), never the deadline several times over
        wait = min(60.0, max(10.0, deadline))
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10.0, read=wait), retries=False, maxsize=16
        )
        self.client = Minio(
            parsed.netloc,
            access_key=endpoint.access_key,
            secret_key=endpoint.secret_key,
            secure=parsed.scheme == "https",
            region=endpoint.region,
            http_client=http,
        )

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying transient failures with backoff and jitter until the deadline.

        The deadline is the command's, not each request's: once one request gave up, those
        retrying meanwhile give up at once, and later ones after a single try, until one is
        answered. Uploads in parallel, each retrying for the whole deadline in turn, made a
        backup whose store went away fail after several times ``--retry-timeout``."""
        started = time.monotonic()
        token = object()
        self._pending[token] = (what, started, time.time())
        try:
            return self._attempts(what, fn, started)
        finally:
            del self._pending[token]

    def waiting(self) -> tuple[str, float, float] | None:
        """The oldest call under way (what it asks, when it began: monotonic and wall
        clock), or None: a store that accepts connections and answers nothing holds a call
        for as long as its read timeout and retries last, and says nothing meanwhile; whoever
        shows the state of a long-running user of the store (a DR follower) asks this."""
        pending = list(self._pending.values())  # (taken whole: other threads add and remove)
        return min(pending, key=lambda call: call[1]) if pending else None

    def _attempts(self, what: str, fn: Callable[[], T], started: float) -> T:
        delay = self.first_delay
        attempt = 0
        while True:
            try:
                result = fn()
                self._down = False
                return result
            except LhfsError:
                raise
            except ValueError as exc:
                if "name" in str(exc):  # the client refused an object name: never sent
                    raise InvalidArgument(f"{what}: {exc}") from None
                raise refusal(what, self.endpoint, exc) from None  # an answer it cannot read
            except Exception as exc:
                if not is_transient(exc):
                    raise refusal(what, self.endpoint, exc) from None
                attempt += 1
                waited = time.monotonic() - started
                left = self.deadline - waited
                if left <= 0 or self._down:
                    raise self._unavailable(what, exc, waited) from None
                level = logging.WARNING if attempt >= 3 else logging.INFO
                log.log(level, "%s failed (%s), retrying in %.1fs", what, _describe(exc), delay)
                if self.on_retry:
                    self.on_retry(f"{what} at {self.endpoint}: {_describe(exc)}")
                with self._gave_up:
                    pause = min(left, delay * random.uniform(0.5, 1.5))
                    if self._gave_up.wait_for(lambda: self._down, pause):
                        raise self._unavailable(what, exc, waited) from None
                delay = min(delay * 2, 30.0)

    def _unavailable(self, what: str, exc: BaseException, waited: float) -> StoreUnavailable:
        """The store is taken as gone (for this request and, until one is answered, the
        others): the error that says so."""
        with self._gave_up:
            down, self._down = self._down, True
            self._gave_up.notify_all()
        if down:  # (another request waited the deadline out)
            waited = self.deadline
        said = _describe(exc)
        maybe = (  # (sent, and not answered: a frozen store may carry it out later)
            f": {NOT_CONFIRMED}" if what.startswith("DELETE ") and said == "timed out" else ""
        )
        return StoreUnavailable(
            f"{self.endpoint} did not answer {what} for {int(waited)}s ({said}){maybe}; "
            f"{self.patience}"
        )

    def ensure(self, create: bool = False) -> None:
        """Check that the bucket exists (asked once per ``Bucket``); with ``create``, make it
        when it does not. A typo in a bucket name must not become a new bucket silently.
        Asked with a listing rather than a HEAD: an S3 server answers it in XML, so a server
        that is not S3 (a web server's HTML page) is told apart from a missing bucket."""
        if self._ensured:
            return
        bucket = self.target.bucket

        def exists() -> bool:
            try:
                next(iter(self.client.list_objects(bucket, self.target.prefix or None)), None)
            except S3Error as exc:
                if exc.code == "NoSuchBucket":
                    return False
                raise
            return True

        if not self._call("bucket check", exists):
            if not create:
                # (named whole: most commands that find it missing have no --create-bucket)
                raise StoreRefused(
                    f"bucket {bucket!r} does not exist at {self.endpoint} (check the name; "
                    "'lhfs backup create' or 'lhfs backup init' with --create-bucket makes it)"
                )
            self._call("bucket create", lambda: self.client.make_bucket(bucket))
        self._ensured = True

    def put(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        self._call(
            f"PUT {key}",
            lambda: self.client.put_object(
                self.target.bucket, key, io.BytesIO(data), len(data), metadata=metadata
            ),
        )

    def put_new(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if no object has that name (a conditional PUT, ``If-None-Match:
        *``): False when one has. A store that ignores the condition overwrites; the caller
        reads the object back to find out who won."""

        def put() -> bool:
            try:
                # (the S3 client has no argument for the header: its request method is used)
                self.client._execute(
                    "PUT",
                    self.target.bucket,
                    key,
                    body=data,
                    headers={"If-None-Match": "*", "Content-Length": str(len(data))},
                )
            except S3Error as exc:
                if exc.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
            return True

        return self._call(f"PUT {key}", put)

    def get(self, key: str, limit: int = GET_LIMIT) -> tuple[bytes, dict[str, str]] | None:
        """The object and its metadata, or None if there is no such object. Whoever can write
        the bucket decides what is in it: an object larger than ``limit`` (the most its reader
        expects of its kind) is refused as corrupt, unread when its length says so; without a
        length it is read in pieces, no further than ``limit``. Its bytes are taken as stored,
        never decoded by a ``Content-Encoding`` its writer chose (a compression bomb)."""

        def fetch() -> tuple[bytes, dict[str, str]] | None:
            try:
                response = self.client.get_object(self.target.bucket, key)
            except S3Error as exc:
                if exc.code == "NoSuchKey":
                    return None
                raise
            try:
                body = self._body(response, key, limit)
            except BaseException:
                response.close()  # a body read half-way: its connection cannot be reused
                raise
            finally:
                response.release_conn()  # (closing a fully read one would waste the connection)
            return body, {k.lower(): v for k, v in response.headers.items()}

        return self._call(f"GET {key}", fetch)

    def _body(self, response: Any, key: str, limit: int) -> bytes:
        """The bytes of an answer, at most ``limit`` (see ``get``)."""
        length = response.headers.get("Content-Length", "")
        if length.isdigit():  # (what S3 does: never more is read than it says)
            if int(length) > limit:
                raise self._too_large(key, limit)
            return response.read(decode_content=False)
        pieces: list[bytes] = []
        size = 0
        for piece in response.stream(1 << 20, decode_content=False):
            size += len(piece)
            if size > limit:
                raise self._too_large(key, limit)
            pieces.append(piece)
        return b"".join(pieces)

    def _too_large(self, key: str, limit: int) -> CorruptState:
        return CorruptState(
            f"{key} in s3://{self.target.bucket} is larger than lhfs writes such an object "
            f"({format_size(limit)} at most): it is not lhfs's, refused"
        )

    def exists(self, key: str) -> bool:
        def stat() -> bool:
            try:
                self.client.stat_object(self.target.bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                    return False
                raise
            return True

        return self._call(f"HEAD {key}", stat)

    def modified(self, key: str) -> float:
        """When the server last wrote ``key``, by the server's clock (a reference "now" for
        the age of other objects, whatever the local clock says)."""
        stat = self._call(f"HEAD {key}", lambda: self.client.stat_object(self.target.bucket, key))
        return stat.last_modified.timestamp()

    def list(self, prefix: str) -> Iterator[Any]:
        """Objects under ``prefix`` (a listing error is raised, never read as "empty")."""
        return iter(
            self._call(
                f"LIST {prefix}",
                lambda: list(self.client.list_objects(self.target.bucket, prefix, recursive=True)),
            )
        )

    def list_upto(self, prefix: str, limit: int) -> list[Any] | None:
        """The objects under ``prefix`` if there are at most ``limit``, else None (without
        listing further)."""

        def fetch() -> list[Any]:
            objects = self.client.list_objects(self.target.bucket, prefix, recursive=True)
            return list(itertools.islice(objects, limit + 1))

        found = self._call(f"LIST {prefix}", fetch)
        return found if len(found) <= limit else None

    def delete(self, key: str) -> None:
        self._call(f"DELETE {key}", lambda: self.client.remove_object(self.target.bucket, key))


def _describe(exc: BaseException) -> str:
    """A failure in a few words: what the network said, not the layers it went through."""
    if isinstance(exc, S3Error):
        return f"{exc.code}"
    cause = _cause(exc)
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, ConnectionResetError):
        return "connection reset"
    if isinstance(cause, socket.gaierror):
        return f"the host name does not resolve ({cause.strerror})"
    if isinstance(cause, TimeoutError | socket.timeout) or "timed out" in str(cause):
        return "timed out"
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {cause.reason or cause}"
    text = str(cause).split("\n")[0]
    return f"{type(cause).__name__}: {text[:160]}"
