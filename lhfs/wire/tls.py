"""TLS for replicas on other hosts (optional): the operator's certificate and CA.

The key handshake (``auth``) already proves both sides hold the volume's secret, and nothing
secret crosses the wire; TLS adds confidentiality and integrity of the data itself on networks
the operator does not trust. A replica serves TLS with ``replica serve --tls-cert/--tls-key``
(on TCP; its local socket stays plain); an engine reaches it with the CA given at ``replica add
--tls-ca``, kept (it is public) in the volume's configuration, and checks the certificate
against the host name or address it connects to. A rebuild target that pulls from a TLS source
is handed the same CA.
"""

from __future__ import annotations

import os
import ssl
import stat
from datetime import UTC, datetime
from pathlib import Path

import trio

from lhfs.core.errors import InvalidArgument, NotFound

MAX_CA_PEM = 64 << 10


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for path in (cert, key):  # (a missing file is refused as every other one named is: 1)
        if not Path(path).exists():
            raise NotFound(f"{path} does not exist")
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"cannot use certificate {cert} with key {key}: {exc}") from None
    return context


def validity(cert: Path) -> str | None:
    """What is wrong with the dates of certificate ``cert`` (the first of its file), if
    anything: a replica serving an expired certificate, or one not valid yet, starts (the
    operator may be renewing it), but every engine refuses its TLS handshake, so it is said
    at start rather than found at the next reconnection."""
    from cryptography import x509  # (imported only when TLS is served)

    try:
        found = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    except (OSError, ValueError) as exc:
        return f"cannot read the dates of certificate {cert}: {exc}"
    now = datetime.now(UTC)
    if now > found.not_valid_after_utc:
        when = found.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
        return f"certificate {cert} expired on {when}: engines will refuse its TLS handshake"
    if now < found.not_valid_before_utc:
        when = found.not_valid_before_utc.strftime("%Y-%m-%d %H:%M UTC")
        return f"certificate {cert} is not valid before {when}: engines will refuse it until then"
    return None


def client_context(ca_pem: str) -> ssl.SSLContext:
    """A context that trusts only the operator's CA (given as PEM text): not the system's
    store too, where any public CA's certificate for the replica's name would pass."""
    if not ca_pem or len(ca_pem) > MAX_CA_PEM:
        raise InvalidArgument("a TLS CA certificate (PEM) of at most 64 KiB is expected")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # (host names checked, certificate needed)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cadata=ca_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise InvalidArgument(f"not a CA certificate in PEM form: {exc}") from None
    return context


def read_ca(path: Path) -> str:
    """The CA file an operator names, checked to be usable: a regular file (``/dev/zero``
    or a pipe would be read for ever; a pipe is opened without waiting for a writer), read no
    further than a CA may be long."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:  # (exit 1, as for every other file named that is missing)
        raise NotFound(f"CA certificate {path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read CA certificate {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArgument(f"CA certificate {path} is not a regular file")
        data = os.read(fd, MAX_CA_PEM + 1)
    except OSError as exc:
        raise InvalidArgument(f"cannot read CA certificate {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CA_PEM:
        raise InvalidArgument(f"CA certificate {path} is larger than a CA (64 KiB at most)")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise InvalidArgument(f"CA certificate {path} is not a PEM file (not text)") from None
    client_context(text)
    return text


async def wrap_client(stream: trio.SocketStream, ca_pem: str, host: str) -> trio.SSLStream:
    ssl_stream = trio.SSLStream(stream, client_context(ca_pem), server_hostname=host)
    await ssl_stream.do_handshake()
    return ssl_stream


async def wrap_server(stream: trio.SocketStream, context: ssl.SSLContext) -> trio.SSLStream:
    ssl_stream = trio.SSLStream(stream, context, server_side=True)
    await ssl_stream.do_handshake()
    return ssl_stream
