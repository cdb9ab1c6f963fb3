"""An S3 bucket (MinIO first, any S3) as the backup store's object layer.

Two rules shape this module. Every call goes through ``_call``, the one retry wrapper: a
transient failure (connection refused or reset, timeout, a host name that does not resolve, 5xx,
429/SlowDown) is retried with exponential backoff and jitter until a deadline; anything else is
final at once. And "not found" is an answer, "could not ask" is not: ``stat``/``get`` return
None only for NoSuchKey, never because the store could not be reached.

Endpoint and credentials come from ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION``; an ``http://`` endpoint means no TLS. Secrets never
appear in messages.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import check_bucket_name

from lhfs.core.errors import InvalidArgument, LhfsError

log = logging.getLogger("lhfs.s3")
T = TypeVar("T")

_TRANSIENT_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "OperationAborted",
}


class StoreUnavailable(LhfsError):
    """The store could not be asked (after retrying until the deadline)."""


class StoreRefused(LhfsError):
    """The store answered with a final error (access denied, no such bucket, ...)."""


@dataclass(frozen=True)
class Target:
    """``s3://BUCKET/PREFIX``."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise InvalidArgument(f"not a backup target: {url!r} (use s3://BUCKET/PREFIX)")
        try:
            check_bucket_name(parsed.netloc, strict=True)
        except ValueError as exc:
            raise InvalidArgument(f"{url!r}: {exc} (3-63 of a-z 0-9 . -)") from None
        return cls(parsed.netloc, parsed.path.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def is_transient(exc: BaseException) -> bool:
    """The one classification of failures: worth retrying, or final."""
    if isinstance(exc, S3Error):
        return exc.code in _TRANSIENT_CODES
    if isinstance(exc, ServerError):  # an HTTP error without an S3 error body
        return exc.status_code >= 500 or exc.status_code == 429
    if isinstance(exc, InvalidResponseError):  # a non-XML answer (a proxy's 502/503 page)
        status = getattr(exc, "_code", 0)  # the client keeps the status only here
        return isinstance(status, int) and (status >= 500 or status == 429)
    if isinstance(
        exc, urllib3.exceptions.HTTPError | socket.gaierror | ConnectionError | TimeoutError
    ):
        return True
    status = getattr(getattr(exc, "response", None), "status", None)
    return isinstance(status, int) and (status >= 500 or status == 429)


class Bucket:
    """One bucket of one endpoint, with retries; keys are full object names."""

    def __init__(
        self,
        target: Target,
        deadline: float = 300.0,
        first_delay: float = 0.2,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InvalidArgument(f"AWS_ENDPOINT_URL is not an http(s) URL: {endpoint!r}")
        self.target = target
        self.deadline = deadline
        self.first_delay = first_delay
        self.on_retry = on_retry  # told of every transient failure (a DR status shows it)
        self.endpoint = f"{parsed.scheme}://{parsed.netloc}"
        self._ensured = False
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10, read=60), retries=False, maxsize=16
        )
        self.client = Minio(
            parsed.netloc,
            access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            secure=parsed.scheme == "https",
            region=os.environ.get("AWS_REGION") or "us-east-1",
            http_client=http,
        )

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying transient failures with backoff and jitter until the deadline."""
        started = time.monotonic()
        delay = self.first_delay
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:
                if isinstance(exc, S3Error) and not is_transient(exc):
                    raise StoreRefused(f"{what}: {self.endpoint} answered {exc.code}") from None
                if not is_transient(exc):
                    raise
                attempt += 1
                left = self.deadline - (time.monotonic() - started)
                if left <= 0:
                    raise StoreUnavailable(
                        f"{self.endpoint} did not answer {what} for {self.deadline:.0f}s: "
                        f"{_describe(exc)}"
                    ) from None
                level = logging.WARNING if attempt >= 3 else logging.INFO
                log.log(level, "%s failed (%s), retrying in %.1fs", what, _describe(exc), delay)
                if self.on_retry:
                    self.on_retry(f"{what}: {_describe(exc)}")
                time.sleep(min(left, delay * random.uniform(0.5, 1.5)))
                delay = min(delay * 2, 30.0)

    def ensure(self) -> None:
        """Create the bucket if it does not exist (asked once per ``Bucket``)."""
        if self._ensured:
            return
        if not self._call("bucket check", lambda: self.client.bucket_exists(self.target.bucket)):
            self._call("bucket create", lambda: self.client.make_bucket(self.target.bucket))
        self._ensured = True

    def put(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        self._call(
            f"PUT {key}",
            lambda: self.client.put_object(
                self.target.bucket, key, io.BytesIO(data), len(data), metadata=metadata
            ),
        )

    def get(self, key: str) -> tuple[bytes, dict[str, str]] | None:
        """The object and its metadata, or None if there is no such object."""

        def fetch() -> tuple[bytes, dict[str, str]] | None:
            try:
                response = self.client.get_object(self.target.bucket, key)
            except S3Error as exc:
                if exc.code == "NoSuchKey":
                    return None
                raise
            try:
                body = response.read()
            except BaseException:
                response.close()  # a body read half-way: its connection cannot be reused
                raise
            finally:
                response.release_conn()  # (closing a fully read one would waste the connection)
            return body, {k.lower(): v for k, v in response.headers.items()}

        return self._call(f"GET {key}", fetch)

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
    if isinstance(exc, S3Error):
        return f"{exc.code}"
    text = str(exc).split("\n")[0]
    return f"{type(exc).__name__}: {text[:160]}"
