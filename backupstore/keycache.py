"""A short-lived cache of an encrypted store's password-derived key, in the kernel's keyring.

Deriving the key that unwraps a store's keys takes scrypt's deliberate tenth of a second, at
every command: as long as an increment itself. The derived key is kept for ``TTL`` seconds
in the user's keyring of the kernel (``add_key(2)``), never in a file: readable only by
processes of the same user that possess it, gone at expiry or reboot. It is found again only
with the same password: the entry holds a hash of the store's salt and the password, which
the same user can compute anyway (they can read the password). Where the kernel refuses
keyrings (a container's seccomp profile), nothing is cached and every command derives.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import logging
import platform

log = logging.getLogger("lhfs.keycache")

TTL = 300  # seconds a derived key is kept after its last use
_SYSCALLS = {"x86_64": (248, 250), "aarch64": (217, 219)}  # add_key, keyctl
_USER_KEYRING = -4  # KEY_SPEC_USER_KEYRING
_SEARCH, _READ, _SET_TIMEOUT = 10, 11, 15


def _libc() -> tuple[ctypes.CDLL, int, int] | None:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        return None
    try:
        return ctypes.CDLL(None, use_errno=True), *numbers
    except OSError:
        return None


def _description(store_id: str) -> bytes:
    return f"lhfs:store:{store_id}".encode()


def _check(salt: bytes, password: bytes) -> bytes:
    return hmac.new(salt, b"lhfs-keycache\0" + password, hashlib.sha256).digest()


def lookup(store_id: str, salt: bytes, password: bytes) -> bytes | None:
    """The derived key cached for this store and password, or None."""
    found = _libc()
    if found is None:
        return None
    libc, _, keyctl = found
    key = libc.syscall(keyctl, _SEARCH, _USER_KEYRING, b"user", _description(store_id), 0)
    if key < 0:
        return None
    buffer = ctypes.create_string_buffer(64)
    length = libc.syscall(keyctl, _READ, key, buffer, 64)
    if length != 64:
        return None
    check, derived = buffer.raw[:32], buffer.raw[32:64]
    if not hmac.compare_digest(check, _check(salt, password)):
        return None
    libc.syscall(keyctl, _SET_TIMEOUT, key, TTL)
    return derived


def remember(store_id: str, salt: bytes, password: bytes, derived: bytes) -> None:
    """Keep ``derived`` for ``TTL`` seconds (silently nothing where keyrings are refused)."""
    found = _libc()
    if found is None or len(derived) != 32:
        return
    libc, add_key, keyctl = found
    payload = _check(salt, password) + derived
    key = libc.syscall(
        add_key, b"user", _description(store_id), payload, len(payload), _USER_KEYRING
    )
    if key < 0:
        log.debug("the kernel keyring refused to keep a derived key: errno %d", ctypes.get_errno())
        return
    libc.syscall(keyctl, _SET_TIMEOUT, key, TTL)
