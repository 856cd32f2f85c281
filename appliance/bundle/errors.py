"""The one error a bundle command raises: it names what failed, so an operator knows which file to distrust."""

from __future__ import annotations

from protocol.errors import PermanentError


class BundleError(PermanentError):
    """A bundle was refused (or could not be written); when raised before loading, nothing was loaded.

    ``what`` is a fixed word for tests and logs (signature, manifest, digest, size, member, load, allowlist,
    key, docker); ``str()`` is the operator's message and always names the file or image concerned.
    """

    def __init__(self, what: str, message: str) -> None:
        self.what = what
        self.message = message
        super().__init__(message)
