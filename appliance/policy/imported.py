"""images-imported.yaml: image digests that `airlock bundle import` added to the allowlist.

It sits next to images.yaml in the policy directory and only ever adds exact image ids (never names, never
allow_pull), so an import can admit the images it verified and nothing else. The loader merges it into
ImagePolicy.digests; a bad file refuses the whole policy, like any other policy file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from appliance.policy.files import read_yaml
from protocol.errors import PolicyError
from protocol.fields import SUPPORTED_VERSION
from protocol.files import write_atomic

IMPORTED_FILE = "images-imported.yaml"
DIGEST = r"sha256:[0-9a-f]{64}"
_HEADER = (
    "# Written by `airlock bundle import`: image ids whose bundle verified against a trusted key.\n"
    "# Merged into images.yaml's digest allowlist. Remove an entry to stop admitting that image.\n"
)


@dataclass(frozen=True)
class ImportedImage:
    digest: str  # the image id, as `docker images --no-trunc` shows it
    tags: tuple[str, ...] = ()
    bundle: str = ""  # sha256 of the manifest it came from
    signed_by: str = ""  # key id
    imported: str = ""  # UTC time


def read_imported(path: str | os.PathLike[str]) -> tuple[ImportedImage, ...]:
    """The file's entries, validated; a missing file is an empty list."""
    if not Path(path).exists():
        return ()
    f = read_yaml(Path(path))
    entries = []
    for entry in f.children("images", []):
        entries.append(ImportedImage(
            digest=entry.str("digest", pattern=DIGEST),
            tags=entry.str_list("tags", []),
            bundle=entry.str("bundle", ""),
            signed_by=entry.str("signed_by", ""),
            imported=entry.str("imported", ""),
        ))
        entry.done()
    f.done()
    return tuple(entries)


def write_imported(path: str | os.PathLike[str], added: Iterable[ImportedImage]) -> tuple[ImportedImage, ...]:
    """Merge `added` into the file (an entry for the same digest is replaced) and write it atomically, 0644."""
    target = Path(path)
    merged = {e.digest: e for e in read_imported(target)}
    merged.update((e.digest, e) for e in added)
    data = {"version": SUPPORTED_VERSION, "images": [
        {"digest": e.digest, "tags": list(e.tags), "bundle": e.bundle, "signed_by": e.signed_by,
         "imported": e.imported} for e in merged.values()
    ]}
    try:
        write_atomic(target, _HEADER + yaml.safe_dump(data, sort_keys=False), mode=0o644)  # sockguard reads it
    except OSError as exc:
        raise PolicyError(str(target), "", f"cannot write: {exc.strerror or exc}") from None
    return tuple(merged.values())


def check_writable(path: str | os.PathLike[str]) -> None:
    """Before an import loads anything: the existing file must be valid and its directory writable."""
    read_imported(path)
    directory = Path(path).parent
    if not directory.is_dir():
        raise PolicyError(str(path), "", f"directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PolicyError(str(path), "", f"directory {directory} is not writable by this user")
