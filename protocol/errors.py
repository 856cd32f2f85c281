"""The airlock error tree: every failure airlock itself reports is one of these, so callers catch at any level.

```
AirlockError                          anything airlock refuses or cannot do, with a message a human can act on
├── TemporaryError                    may succeed later unchanged: retry with backoff (agent/backoff.py)
└── PermanentError                    will fail again as given: stop, and say why
    ├── PolicyError(file, field, msg) a policy file, location spec or deploy file is invalid; nothing loaded
    ├── UsageError(command, msg)      a command was called wrongly (a missing flag, an unknown agent id)
    └── SignatureError(reason, msg)   a key, a detached signature or an RFC 9421 request signature was refused
```

Foreign exceptions (cryptography, http-message-signatures, OS errors around key files) are mapped into this
tree at the boundary with `raise ... from exc`, so the original cause stays in the traceback but never
leaks out as the type a caller has to know about.

`SignatureError.reason` is a fixed machine code (the gateway turns it into a 4xx and logs it as the
decision reason); the message explains it to the operator. The codes:

| reason              | meaning                                                                       |
|---------------------|-------------------------------------------------------------------------------|
| unsigned            | no Signature / Signature-Input header at all                                  |
| malformed           | headers unparseable, label "airlock" or keyid/nonce/created missing, coverage |
|                     | lacks a required component, or a request that cannot be signed as given       |
| unknown-key         | the keyid is not registered (or was revoked)                                  |
| bad-signature       | the signature does not verify with the registered key                         |
| digest-mismatch     | Content-Digest missing, malformed or not matching the body                    |
| expired             | `created` is older than the allowed clock skew                                |
| future              | `created` lies further ahead than the allowed clock skew                      |
| replayed            | the nonce was already accepted for this key                                   |
| bad-key             | a PEM that is not an Ed25519 key                                              |
| insecure-key-file   | a private key file that group or other may read, or that is not a file       |
"""

from __future__ import annotations

from typing import Literal, get_args

SignatureReason = Literal[
    "unsigned",
    "malformed",
    "unknown-key",
    "bad-signature",
    "digest-mismatch",
    "expired",
    "future",
    "replayed",
    "bad-key",
    "insecure-key-file",
]
SIGNATURE_REASONS: frozenset[str] = frozenset(get_args(SignatureReason))


class AirlockError(Exception):
    """Root of everything airlock raises on purpose; `str()` is the human message."""


class TemporaryError(AirlockError):
    """The same call may succeed later (an engine, a network or a peer that did not answer): retry with backoff."""


class PermanentError(AirlockError):
    """The same call will fail again as given (refused, invalid, unknown): do not retry; report the reason."""


class PolicyError(PermanentError, ValueError):
    """A policy file, location spec or deploy file is invalid; nothing from it was loaded.

    ``str()`` reads ``file: field.path: problem`` so an operator can go straight to the line. It stays a
    ValueError too: it is one, and callers that validate input catch it as such.
    """

    def __init__(self, file: str, field_path: str, message: str) -> None:
        self.file = file
        self.field_path = field_path
        self.message = message
        where = f"{file}: {field_path}" if field_path else file
        super().__init__(f"{where}: {message}")


class UsageError(PermanentError):
    """A CLI command was misused: `str()` reads ``command: problem``; nothing was changed."""

    def __init__(self, command: str, message: str) -> None:
        self.command = command
        self.message = message
        super().__init__(f"{command}: {message}")


class SignatureError(PermanentError):
    """A signature, key or signed request was refused; `reason` is a fixed code from SIGNATURE_REASONS.

    The reason is validated so a typo cannot invent a code the gateway's status mapping does not know.
    """

    def __init__(self, reason: SignatureReason, message: str) -> None:
        if reason not in SIGNATURE_REASONS:
            raise ValueError(f"unknown SignatureError reason {reason!r}")
        super().__init__(message)
        self.reason: SignatureReason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"SignatureError({self.reason!r}, {self.message!r})"
