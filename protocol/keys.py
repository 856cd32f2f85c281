"""Ed25519 keys: the appliance's identity key on disk, public keys as PEM, key ids, detached signatures.

The private key never leaves the appliance, so the file is the secret: it is written 0600 from its first
byte (a private temp file renamed over the target, never a chmod after the fact) and a file that group or
other may read is refused rather than used, because by then it may already have been copied.

Key ids are derived from the public key, not chosen, so both sides compute the same id independently and a
keyid in a signature can never point at a key it was not made from.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import SignatureError
from protocol.files import write_atomic

KEY_ID_PREFIX = "ed25519:"
_KEY_FILE_MODE = 0o600


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """`ed25519:` + the first 32 hex digits (128 bits) of sha256 over the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_ID_PREFIX + hashlib.sha256(raw).hexdigest()[:32]


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """Parse a SubjectPublicKeyInfo PEM; anything that is not an Ed25519 public key is `bad-key`."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SignatureError("bad-key", "not a PEM public key (expected an Ed25519 'PUBLIC KEY' block)") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("bad-key", f"expected an Ed25519 public key, got {type(key).__name__}")
    return key


def verify_bytes(public_key: Ed25519PublicKey, data: bytes, signature_b64: str) -> None:
    """Check a detached base64 Ed25519 signature over `data` (work requests); raise `bad-signature` if not."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("bad-signature", "signature is not valid base64") from exc
    try:
        public_key.verify(signature, data)
    except InvalidSignature as exc:
        raise SignatureError("bad-signature", f"signature does not verify with key {key_id_of(public_key)}") from exc


def rotation_message(agent_id: str, old_key_id: str, new_key_id: str) -> bytes:
    """What the new key signs when an agent rotates to it: proof it holds the key it registers, bound to the
    agent and to the key it replaces (so the proof cannot be replayed for another agent or rotation)."""
    return f"airlock key rotation\nagent {agent_id}\nfrom {old_key_id}\nto {new_key_id}\n".encode()


class SigningKey:
    """An Ed25519 private key with the operations airlock needs; it never serialises itself except to `save`."""

    __slots__ = ("_private", "key_id", "public_key")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key: Ed25519PublicKey = private_key.public_key()
        self.key_id: str = key_id_of(self.public_key)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> tuple[SigningKey, bool]:
        """The key at `path`, creating it (0600) on first use; the flag says whether it was created."""
        try:
            return cls.load(path), False
        except FileNotFoundError:
            key = cls.generate()
            key.save(path)
            return key, True

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SigningKey:
        """Read a PKCS8 PEM key file, refusing one that group/other may read (it may already have leaked).

        The mode is checked on the opened descriptor, so the file checked is the file read.
        A missing file raises the usual FileNotFoundError: "no key yet" is for the caller to handle.
        """
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise SignatureError("insecure-key-file", f"key file {path} is not a regular file")
            if info.st_mode & 0o077:
                raise SignatureError(
                    "insecure-key-file",
                    f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}; group/other must have no access. "
                    f"If nobody else could have read it, run `chmod 600 {path}`; otherwise generate a new key.",
                )
            data = handle.read()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise SignatureError("bad-key", f"key file {path} is not an unencrypted PKCS8 PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise SignatureError("bad-key", f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key as PKCS8 PEM, mode 0600, atomically: a crash leaves the old file or the new one.

        mkstemp creates the temp file 0600 in the target directory (same filesystem, so the rename is
        atomic); fchmod pins the mode regardless of umask before any key byte is written.
        """
        target = Path(path)
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomic(target, pem, mode=_KEY_FILE_MODE)
        _fsync_dir(target.parent)

    def public_pem(self) -> str:
        """The public half as SubjectPublicKeyInfo PEM, what `enrollAgent` sends and `load_public_key` reads."""
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def sign_bytes(self, data: bytes) -> str:
        """Detached Ed25519 signature over `data`, standard base64 (work requests, bundle manifests)."""
        return base64.b64encode(self._private.sign(data)).decode("ascii")

    def sign_raw(self, data: bytes) -> bytes:
        """Raw 64-byte signature; what the RFC 9421 signer applies to the signature base it built."""
        return self._private.sign(data)

    def __repr__(self) -> str:
        return f"SigningKey({self.key_id})"


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; some filesystems refuse to open a directory, which is fine."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
