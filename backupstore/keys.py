"""A store's keys: what authenticates its manifests and, in an encrypted store, hides its
content and the digests of its blocks.

Every store has a record, ``lhfs-store.json`` at its prefix, written once (a conditional PUT:
two first backups at once agree on one record) and never changed:

- a plain store records a MAC key in clear. Manifests and ``volume.meta`` carry an HMAC-SHA256
  over their bytes and their name in the store, so an edit, a truncation, a swap of two digests
  or a manifest moved to another name is refused. Anyone who can write the bucket can also read
  the key: this guards against mistakes and damage, not against an attacker (encrypt for that).
  Blocks are named by the xxh3-128 of their content, which every read checks.
- an encrypted store records three random keys wrapped (AES-256-GCM) by a key derived from a
  password with scrypt (parameters in the record; the derived key is cached a few minutes in
  the kernel's keyring, see ``keycache``). Blocks and manifests are sealed with
  AES-256-GCM under a data key, each bound to its name in the store (the associated data): a
  block copied from another store or to another name does not open. A block's name is an
  HMAC-SHA256 of its content digest under a naming key: the store learns neither content nor
  digests, and equal content still has one name (deduplication within the store).

What stays visible in both: the names of volumes and backups, sizes, times and the number of
blocks; the compression method of a plain store's blocks (object metadata).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lhfs.core.errors import CorruptState, InvalidArgument, NotPermitted
from lhfs.core.private import read_private

from . import keycache, parse_json

RECORD = "lhfs-store.json"
RECORD_FORMAT = 2  # of the store record this lhfs writes and reads (a newer one: upgrade)
_PLAIN = b"LHS1"  # a sealed object of a plain store: magic, 32-byte MAC, payload
_SEALED = b"LHE1"  # of an encrypted store: magic, 12-byte nonce, ciphertext and tag
_KDF = {"name": "scrypt", "n": 1 << 15, "r": 8, "p": 1}  # 32 MiB of memory (128·n·r bytes)
_KDF_MEMORY = 256 << 20  # the most a record may make one key derivation take
_KEY_BYTES = 32


class WrongPassword(NotPermitted):
    """The password does not open the store's keys (or the record was tampered with)."""


def read_password(path: Path | None) -> bytes | None:
    """A store's password: the first line of ``path`` (a file only its owner may read), else
    ``$LHFS_BACKUP_PASSWORD``, else None (no password: a plain store). Never an argument on a
    command line, where other users would see it."""
    if path is None:
        text = os.environ.get("LHFS_BACKUP_PASSWORD")
        return None if text is None else _password(text, "LHFS_BACKUP_PASSWORD")
    text = read_private(path, "password file").decode(errors="replace")
    return _password(text.split("\n", 1)[0], f"password file {path}")


def _password(text: str, where: str) -> bytes:
    if not text.strip():
        raise InvalidArgument(f"{where} holds an empty password")
    return text.encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except ValueError:
        raise CorruptState(f"the store record's {what} cannot be read") from None


def _aead(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # (encrypted stores only)

    return AESGCM(key)


def _unwrap(wrapping: bytes, wrapped: bytes, store_id: str) -> bytes | None:
    from cryptography.exceptions import InvalidTag

    try:
        return _aead(wrapping).decrypt(wrapped[:12], wrapped[12:], store_id.encode())
    except (InvalidTag, ValueError):
        return None


def _scrypt(kdf: dict[str, Any], where: str) -> tuple[int, int, int]:
    """``(n, r, p)`` of a record's key derivation. The record is not authenticated before its
    key is derived (that key is what opens it), so whoever can write the bucket chooses them:
    only scrypt with n a power of two from 2^10, p 1 and a memory cost (128·n·r bytes) of at
    most ``_KDF_MEMORY``, eight times what lhfs writes, is derived; never 17 GB for an edit."""
    n, r, p = (kdf.get(key) for key in ("n", "r", "p"))
    if not (
        kdf.get("name") == "scrypt"
        and all(type(value) is int for value in (n, r, p))
        and n >= 1 << 10
        and n & (n - 1) == 0
        and r >= 1
        and p == 1
        and 128 * n * r <= _KDF_MEMORY
    ):
        raise CorruptState(
            f"the store record {where} asks for a key derivation lhfs refuses (scrypt, n a "
            f"power of two from 2^10, p 1, at most {_KDF_MEMORY >> 20} MiB of memory)"
        )
    return n, r, p


def _derive(password: bytes, params: tuple[int, int, int], salt: bytes) -> bytes:
    n, r, p = params
    memory = n * r * 129 + (1 << 20)
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=memory, dklen=32)


@dataclass(frozen=True)
class StoreKeys:
    """The keys of one store, opened."""

    store_id: str
    encrypted: bool
    mac_key: bytes
    data_key: bytes = b""
    name_key: bytes = b""

    # -- making and opening the record ----------------------------------------------------------

    @classmethod
    def new(cls, password: bytes | None) -> tuple[StoreKeys, bytes]:
        """New keys, and the record that keeps them (wrapped by ``password`` when given)."""
        store_id = secrets.token_hex(16)
        if password is None:
            keys = cls(store_id, False, secrets.token_bytes(_KEY_BYTES))
            record = {
                "format": RECORD_FORMAT,
                "id": store_id,
                "encrypted": False,
                "mac_key": _b64(keys.mac_key),
            }
            return keys, json.dumps(record).encode()
        keys = cls(
            store_id,
            True,
            secrets.token_bytes(_KEY_BYTES),
            secrets.token_bytes(_KEY_BYTES),
            secrets.token_bytes(_KEY_BYTES),
        )
        salt = secrets.token_bytes(16)
        nonce = secrets.token_bytes(12)
        wrapping = _derive(password, _scrypt(_KDF, "lhfs writes"), salt)
        keycache.remember(store_id, salt, password, wrapping)
        plain = keys.mac_key + keys.data_key + keys.name_key
        wrapped = _aead(wrapping).encrypt(nonce, plain, store_id.encode())
        record = {
            "format": RECORD_FORMAT,
            "id": store_id,
            "encrypted": True,
            "kdf": {**_KDF, "salt": _b64(salt)},
            "wrapped": _b64(nonce + wrapped),
        }
        return keys, json.dumps(record).encode()

    @classmethod
    def open(cls, record: bytes, password: bytes | None, where: str) -> StoreKeys:
        """The keys a record keeps; an encrypted store needs its password, a plain one none."""
        try:
            data = parse_json(record)
            found = data.get("format")
            if type(found) is int and found > RECORD_FORMAT:  # (not damaged: say what to do)
                raise CorruptState(
                    f"the store record {where} was written by a newer lhfs (format {found}): "
                    "upgrade lhfs"
                )
            store_id, encrypted = str(data["id"]), data["encrypted"]
            if found != RECORD_FORMAT or not isinstance(encrypted, bool):
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CorruptState(f"the store record {where} cannot be read") from None
        if not encrypted:
            if password is not None:
                raise InvalidArgument(
                    f"the store {where} is not encrypted, and a store is either encrypted or "
                    "not: give no password for it (LHFS_BACKUP_PASSWORD, --password-file)"
                )
            mac_key = _unb64(data.get("mac_key"), "MAC key")
            if len(mac_key) != _KEY_BYTES:
                raise CorruptState(f"the store record {where} holds a bad MAC key")
            return cls(store_id, False, mac_key)
        if password is None:
            raise NotPermitted(
                f"the store {where} is encrypted: give its password (LHFS_BACKUP_PASSWORD or "
                "--password-file)"
            )
        kdf = data.get("kdf")
        if not isinstance(kdf, dict):
            raise CorruptState(f"the store record {where} cannot be read")
        params = _scrypt(kdf, where)
        wrapped = _unb64(data.get("wrapped"), "wrapped keys")
        salt = _unb64(kdf.get("salt"), "salt")
        plain = None
        cached = keycache.lookup(store_id, salt, password)
        if cached is not None:
            plain = _unwrap(cached, wrapped, store_id)
        if plain is None:
            wrapping = _derive(password, params, salt)
            plain = _unwrap(wrapping, wrapped, store_id)
            if plain is None:
                raise WrongPassword(f"the password does not open the store {where}")
            keycache.remember(store_id, salt, password, wrapping)
        if len(plain) != 3 * _KEY_BYTES:
            raise CorruptState(f"the store record {where} holds keys of the wrong size")
        mac_key, data_key, name_key = (plain[i : i + _KEY_BYTES] for i in range(0, 96, 32))
        return cls(store_id, True, mac_key, data_key, name_key)

    # -- names, manifests, blocks ---------------------------------------------------------------

    def block_name(self, digest: str) -> str:
        """The object name of the block whose content has ``digest``."""
        if not self.encrypted:
            return digest
        return hmac.new(self.name_key, bytes.fromhex(digest), hashlib.sha256).hexdigest()[:32]

    def seal(self, name: str, payload: bytes) -> bytes:
        """``payload`` (a manifest, a volume's settings) as stored under ``name`` (its key
        relative to the store's prefix): authenticated, and encrypted in an encrypted store."""
        if self.encrypted:
            nonce = os.urandom(12)
            return _SEALED + nonce + _aead(self.data_key).encrypt(nonce, payload, name.encode())
        return _PLAIN + self._mac(name, payload) + payload

    def unseal(self, name: str, data: bytes) -> bytes:
        """What ``seal`` sealed; anything else (edited, truncated, moved, of another store)
        is refused as corrupt."""
        if self.encrypted and data.startswith(_SEALED):
            from cryptography.exceptions import InvalidTag

            try:
                return _aead(self.data_key).decrypt(data[4:16], data[16:], name.encode())
            except (InvalidTag, ValueError):
                pass
        elif not self.encrypted and data.startswith(_PLAIN) and len(data) >= 36:
            payload = data[36:]
            if hmac.compare_digest(data[4:36], self._mac(name, payload)):
                return payload
        raise CorruptState(f"{name} fails authentication: it was changed, or is not this store's")

    def _mac(self, name: str, payload: bytes) -> bytes:
        return hmac.new(self.mac_key, name.encode() + b"\0" + payload, hashlib.sha256).digest()

    def seal_block(self, name: str, method: str, packed: bytes) -> bytes:
        """An encrypted store's block object: the compression method and the bytes, sealed
        and bound to the block's name."""
        nonce = os.urandom(12)
        body = method.encode() + b"\0" + packed
        return _SEALED + nonce + _aead(self.data_key).encrypt(nonce, body, name.encode())

    def unseal_block(self, name: str, data: bytes) -> tuple[str, bytes]:
        """``(method, packed)`` of a sealed block; corrupt when it does not open."""
        from cryptography.exceptions import InvalidTag

        try:
            if not data.startswith(_SEALED):
                raise ValueError
            body = _aead(self.data_key).decrypt(data[4:16], data[16:], name.encode())
            method, packed = body.split(b"\0", 1)
            return method.decode(), packed
        except (InvalidTag, ValueError):
            raise CorruptState(
                f"block {name} does not open with this store's key: it was changed, or comes "
                "from another store"
            ) from None
