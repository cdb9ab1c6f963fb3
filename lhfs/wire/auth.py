"""Who may talk to a replica: the volume's key, and the proofs of the handshake.

Every volume has a key, made at ``volume create``: an identity (16 random bytes, public: a
replica directory records it, a replica announces it) and a secret (32 random bytes, never on
the wire, never on a command line). A key file holds both, as JSON, readable by its owner only;
a key file that others may read is refused, as ssh refuses such a private key.

The handshake (see ``protocol``) is a mutual challenge-response: each side sends a fresh random
nonce, and each proves it knows the secret with an HMAC-SHA256 over both nonces, the volume's
identity and a label saying which side it is (a proof made for one side is worth nothing for
the other). The client's proof also covers the role and the session epoch it asks for, so they
cannot be changed on the way. A recorded handshake is worthless: the other side's nonce is new
each time. On TCP without TLS the frames that follow are sealed under keys derived here from
the same secret and both nonces (see ``seal``).
"""

from __future__ import annotations

import hmac
import json
import secrets
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from lhfs.core.durable import atomic_write
from lhfs.core.errors import InvalidArgument
from lhfs.core.private import read_private

ID_BYTES = 16
SECRET_BYTES = 32
NONCE_BYTES = 32
PROOF_BYTES = 32
_FORMAT = 1


@dataclass(frozen=True)
class VolumeKey:
    """A volume's identity and secret; ``volume`` is its name, for messages only."""

    volume: str
    id: bytes
    secret: bytes

    def __repr__(self) -> str:  # never print the secret, whatever logs the object
        return f"VolumeKey(volume={self.volume!r}, id={self.id.hex()})"

    @classmethod
    def new(cls, volume: str) -> VolumeKey:
        return cls(volume, secrets.token_bytes(ID_BYTES), secrets.token_bytes(SECRET_BYTES))

    @property
    def id_hex(self) -> str:
        return self.id.hex()

    @classmethod
    def load(cls, path: Path) -> VolumeKey:
        """Read a key file; one clear error for a missing, unsafe or malformed one."""
        raw = read_private(Path(path), "key file")
        try:
            doc = json.loads(raw)
            key = cls(str(doc["volume"]), bytes.fromhex(doc["id"]), bytes.fromhex(doc["secret"]))
            valid = doc.get("format") == _FORMAT
        except (ValueError, KeyError, TypeError, AttributeError):
            valid = False
        if not valid or len(key.id) != ID_BYTES or len(key.secret) != SECRET_BYTES:
            raise InvalidArgument(f"{path} is not an lhfs volume key file")
        return key

    def save(self, path: Path) -> None:
        """Write the key file crash-safely, readable by its owner only."""
        doc = {
            "format": _FORMAT,
            "volume": self.volume,
            "id": self.id.hex(),
            "secret": self.secret.hex(),
        }
        atomic_write(Path(path), json.dumps(doc, indent=1).encode() + b"\n")

    # -- proofs -------------------------------------------------------------------------------

    def server_proof(self, client_nonce: bytes, server_nonce: bytes, epoch: int) -> bytes:
        """The replica's proof; it covers the epoch it announces, which the engine builds on."""
        return self._mac(b"lhfs-replica", client_nonce, server_nonce, epoch.to_bytes(8, "little"))

    def client_proof(
        self, server_nonce: bytes, client_nonce: bytes, role: int, epoch: int, owner: bytes
    ) -> bytes:
        fields = (bytes([role]), epoch.to_bytes(8, "little"), owner)
        return self._mac(b"lhfs-client", server_nonce, client_nonce, *fields)

    def frame_keys(self, client_nonce: bytes, server_nonce: bytes) -> tuple[bytes, bytes]:
        """The keys of a connection's seals (``seal``): (client to replica, replica to
        client). Both nonces are fresh, so every connection has keys of its own."""
        up = self._mac(b"lhfs-frames-up", client_nonce, server_nonce)
        down = self._mac(b"lhfs-frames-down", client_nonce, server_nonce)
        return up, down

    def _mac(self, label: bytes, *parts: bytes) -> bytes:
        return hmac.new(self.secret, b"\0".join((label, self.id, *parts)), sha256).digest()


def same(a: bytes, b: bytes) -> bool:
    """Compare proofs in constant time."""
    return hmac.compare_digest(a, b)


def nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)
