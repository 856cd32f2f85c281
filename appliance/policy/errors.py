"""The one error a bad policy or locations file raises: it names the file, the field and the problem."""

from __future__ import annotations


class PolicyError(ValueError):
    """A policy or locations file is invalid; nothing from it was loaded.

    ``str()`` reads ``file: field.path: problem`` so an operator can go straight to the line.
    """

    def __init__(self, file: str, field_path: str, message: str) -> None:
        self.file = file
        self.field_path = field_path
        self.message = message
        where = f"{file}: {field_path}" if field_path else file
        super().__init__(f"{where}: {message}")
