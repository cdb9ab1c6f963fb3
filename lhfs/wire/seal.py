"""Frames that prove where they come from, on replica connections over TCP without TLS.

The handshake proves who is at the other end when a connection opens. Without TLS nothing
proved it afterwards: whoever sees a TCP connection's packets (a host on the path, or on the
same network segment) can rewrite a write in flight or slip frames of their own into the
stream, and the replica would apply them as its engine's. So on such a connection the frames
are *sealed*: every group of frames a side sends at once (a burst of requests, a group of
answers; at most about 1 MiB) is followed by a seal frame that carries a tag, a GMAC (AES-GCM
over no plaintext) of the group's bytes, under a key of that connection and direction derived
from the volume's secret and both handshake nonces (``auth.VolumeKey.frame_keys``), with the
group's number in its direction as the nonce. The receiver acts on no frame of a group before
its seal proved it: a frame changed, dropped, replayed, reordered or injected fails the check,
and the connection is closed at once.

The local socket (only its owner may connect: see ``replica.session``) and TLS (which
authenticates every record itself) carry no seals. Frames are built the same way either way.

Why a tag per group rather than per frame: a tag costs about 1 us whatever it covers (the
call), then about 45 us per MiB with AES in hardware. Per frame, replicas on other hosts lost a
quarter to a third of their 4 KiB writes; per group, about 15% (``bench/RESULTS.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lhfs.core.errors import ProtocolError

TAG = 16  # bytes of a seal frame's payload
GROUP = 1 << 20  # a sender seals what it queued once it holds this much, even before it sends
_JOINED = 256 << 10  # a group in pieces shorter than this is joined and tagged in one call

Part = bytes | bytearray | memoryview


class Seal:
    """One direction of a sealed connection: tags the groups of frames sent, or checks those
    received. Groups are numbered in the order they are tagged or checked, which is the order
    they travel in (a sender seals what it queued before it sends)."""

    __slots__ = ("_aead", "_count", "_key")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._aead = AESGCM(key)
        self._count = 0

    def _nonce(self) -> bytes:
        self._count += 1  # (2**96 groups: never repeats)
        return self._count.to_bytes(12, "little")

    def tag(self, pieces: Sequence[Part], size: int) -> bytes:
        """The tag of the next group, whose bytes are ``pieces`` in order, ``size`` in all."""
        nonce = self._nonce()
        if len(pieces) == 1:
            return self._aead.encrypt(nonce, b"", pieces[0])
        if size < _JOINED:
            return self._aead.encrypt(nonce, b"", b"".join(pieces))
        mac = Cipher(algorithms.AES(self._key), modes.GCM(nonce)).encryptor()
        for piece in pieces:  # (a large write's data is not copied to be tagged)
            mac.authenticate_additional_data(piece)
        mac.finalize()
        return mac.tag

    def check(self, group: Part, tag: Part) -> None:
        """Refuse the next group received unless ``tag`` is its own."""
        try:
            self._aead.decrypt(self._nonce(), tag, group)
        except InvalidTag:
            raise ProtocolError(
                "a frame failed its authentication check: it was changed on the way or does "
                "not come from the authenticated peer"
            ) from None


def pair(key: bytes, back: bytes) -> tuple[Seal, Seal]:
    """(sending, receiving) from the keys of the two directions, this side's first."""
    return Seal(key), Seal(back)
