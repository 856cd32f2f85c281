"""The operator's image allowlist: outside the image, edited with `airlock images allow|list|revoke`, live.

policy/images.yaml is baked into the appliance image; a user's own code-location images are allowed here
instead, in `images.yaml` of the operator directory (AIRLOCK_OPERATOR_DIR, default /etc/airlock/operator: a
volume or a mounted directory, root-owned). Only root in the appliance writes it (`docker exec APPLIANCE airlock
images allow ...`); sockguard and the agent run as their own users and only read it. Neither the control plane
nor the agent can widen it: the control plane only names images, and the agent cannot write here.

    version: 1
    allow:
      - name: acme/etl            # a repository, or a glob like acme/*; never a tag (a tag can move)
      - digest: sha256:<64 hex>   # an image id, or the digest of a registry image (repo@sha256:...)
    registries:                   # pulled from, through sockguard, by digest only (`airlock images registry add`)
      - host: registry.example:5000
        credentials: registry-registry.example_5000.json   # in this directory, 0600, read by sockguard only

Readers re-read the file when it changes (LiveImages: a stat per decision), so an allowed image is in force
for the next container create, with no restart. A bad file never goes live: the readers keep to the baked-in
policy (plus bundle imports) and report the file's error, naming file and field.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from appliance.policy.files import file_stamp, read_yaml
from appliance.policy.model import ImagePolicy
from protocol.errors import PolicyError
from protocol.fields import SUPPORTED_VERSION
from protocol.files import write_atomic

__all__ = ["OPERATOR_FILE", "LiveImages", "OperatorImages", "Registry", "add_entry", "credentials_file_name",
           "operator_file", "parse_reference", "read_operator_images", "registry_auth", "remove_entry",
           "remove_registry", "set_registry", "write_operator_images"]

OPERATOR_FILE = "images.yaml"
DEFAULT_DIR = "/etc/airlock/operator"
DIGEST = r"sha256:[0-9a-f]{64}"
REGISTRY_HOST = r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?::[0-9]{1,5})?"
CREDENTIALS_FILE = r"registry-[A-Za-z0-9._-]{1,100}\.json"
# A repository (optionally registry host[:port]/...), globs allowed; no tag, no digest.
REPOSITORY = r"[a-z0-9][a-z0-9._-]*(?::[0-9]{1,5})?(?:/[a-z0-9*][a-z0-9._*-]*)*|\*"
_HEADER = ("# The operator's image allowlist (airlock images allow|list|revoke). Read live by sockguard and the\n"
           "# agent; merged with the image's policy/images.yaml. Names are repositories or globs; digests are ids.\n")


@dataclass(frozen=True)
class Entry:
    kind: str  # "name" or "digest"
    value: str
    added: str = ""  # UTC time, for the operator's own record

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Registry:
    """A registry the operator pulls code-location images from; `credentials` is a file in the operator dir."""

    host: str
    credentials: str | None = None
    added: str = ""


@dataclass(frozen=True)
class OperatorImages:
    entries: tuple[Entry, ...] = ()
    registries: tuple[Registry, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.value for e in self.entries if e.kind == "name")

    @property
    def digests(self) -> tuple[str, ...]:
        return tuple(e.value for e in self.entries if e.kind == "digest")


def operator_file(env: os._Environ[str] | dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("AIRLOCK_OPERATOR_DIR", DEFAULT_DIR)) / OPERATOR_FILE


def parse_reference(text: str, *, where: str = "airlock images allow") -> Entry:
    """`sha256:<id>`, `repo@sha256:<digest>` or a repository (glob); a tag is refused with the reason."""
    text = text.strip()
    if re.fullmatch(DIGEST, text):
        return Entry("digest", text)
    if "@" in text:
        repo, _, digest = text.rpartition("@")
        if re.fullmatch(DIGEST, digest) and re.fullmatch(REPOSITORY, repo):
            return Entry("digest", digest)
        raise PolicyError(where, "image", f"{text!r}: a digest is 'sha256:' and 64 lowercase hex digits")
    if re.fullmatch(REPOSITORY, text):
        return Entry("name", text)
    last = text.rsplit("/", 1)[-1]
    if ":" in last:
        repo = text.rsplit(":", 1)[0]
        raise PolicyError(where, "image", f"{text!r} names a tag, and a tag can move: allow the repository "
                                          f"({repo}) or the image itself (its id, `docker inspect --format "
                                          f"'{{{{.Id}}}}' {text}`)")
    raise PolicyError(where, "image", f"{text!r} is neither a repository (lowercase, globs allowed) nor "
                                      f"'sha256:<64 hex>'")


def read_operator_images(path: str | os.PathLike[str]) -> OperatorImages:
    """The file's entries, validated; a missing file is an empty allowlist."""
    path = Path(path)
    if not path.exists():
        return OperatorImages()
    f = read_yaml(path)
    entries = []
    for item in f.children("allow", []):
        added = item.str("added", "")
        if item.has("digest"):
            entries.append(Entry("digest", item.str("digest", pattern=DIGEST), added))
        else:
            entries.append(Entry("name", item.str("name", pattern=REPOSITORY), added))
        item.done()
    registries = []
    for item in f.children("registries", []):
        registries.append(Registry(item.str("host", pattern=REGISTRY_HOST),
                                   item.str("credentials", None, pattern=CREDENTIALS_FILE), item.str("added", "")))
        item.done()
    f.done()
    return OperatorImages(tuple(entries), tuple(registries))


def write_operator_images(path: str | os.PathLike[str], images: OperatorImages) -> None:
    """Render, check that the text reads back as the same entries, then replace the file atomically (0644)."""
    path = Path(path)
    data: dict = {"version": SUPPORTED_VERSION, "allow": [
        {e.kind: e.value, **({"added": e.added} if e.added else {})} for e in images.entries]}
    if images.registries:
        data["registries"] = [{"host": r.host, **({"credentials": r.credentials} if r.credentials else {}),
                               **({"added": r.added} if r.added else {})} for r in images.registries]
    text = _HEADER + yaml.safe_dump(data, sort_keys=False)
    if not path.parent.is_dir():
        raise PolicyError(str(path), "", f"directory {path.parent} does not exist: mount a volume there "
                                         "(docs/USER_CODE.md) or set AIRLOCK_OPERATOR_DIR")
    try:
        write_atomic(path, text, mode=0o644)
    except OSError as exc:
        raise PolicyError(str(path), "", f"cannot write: {exc.strerror or exc}") from None
    if read_operator_images(path) != images:  # the reader is the judge of what was written
        raise PolicyError(str(path), "", "the file written does not read back as the entries given")


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def add_entry(images: OperatorImages, entry: Entry) -> tuple[OperatorImages, bool]:
    if any(e.kind == entry.kind and e.value == entry.value for e in images.entries):
        return images, False
    return replace(images, entries=(*images.entries, replace(entry, added=_now()))), True


def remove_entry(images: OperatorImages, entry: Entry) -> tuple[OperatorImages, bool]:
    kept = tuple(e for e in images.entries if not (e.kind == entry.kind and e.value == entry.value))
    return replace(images, entries=kept), len(kept) != len(images.entries)


def credentials_file_name(host: str) -> str:
    return f"registry-{host.replace(':', '_')}.json"


def set_registry(images: OperatorImages, host: str, *, credentials: str | None) -> OperatorImages:
    """Add or replace the registry `host` (checked against REGISTRY_HOST)."""
    if not re.fullmatch(REGISTRY_HOST, host):
        raise PolicyError("airlock images registry add", "host", f"{host!r} is not a registry host[:port]")
    kept = tuple(r for r in images.registries if r.host != host)
    return replace(images, registries=(*kept, Registry(host, credentials, _now())))


def remove_registry(images: OperatorImages, host: str) -> tuple[OperatorImages, bool]:
    kept = tuple(r for r in images.registries if r.host != host)
    return replace(images, registries=kept), len(kept) != len(images.registries)


def registry_auth(path: str | os.PathLike[str]) -> dict[str, str]:
    """The {username, password} of a registry's credentials file; PolicyError (never the secret) if unusable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PolicyError(str(path), "", f"cannot read the registry credentials: {type(exc).__name__}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k] for k in ("username",
                                                                                               "password")):
        raise PolicyError(str(path), "", "registry credentials must be {\"username\": ..., \"password\": ...}")
    return {"username": data["username"], "password": data["password"]}


class LiveImages:
    """The image policy in force: the baked-in one plus the operator's file, re-read whenever it changes.

    A stat per call is cheap next to the container create it guards. `error` holds the operator file's
    problem while it is bad; the baked-in policy alone applies until it is fixed.
    """

    def __init__(self, base: ImagePolicy, path: str | os.PathLike[str] | None) -> None:
        self.base, self.path = base, Path(path) if path else None
        self.error: str | None = None
        self._lock = threading.Lock()
        self._stamp: object = None
        self._current = base

    def current(self) -> ImagePolicy:
        if self.path is None:
            return self.base
        stamp = file_stamp(self.path)
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                self._current, self.error = self._load()
            return self._current

    def _load(self) -> tuple[ImagePolicy, str | None]:
        try:
            extra = read_operator_images(self.path)  # type: ignore[arg-type]
        except PolicyError as exc:
            return self.base, f"operator image allowlist ignored until fixed: {exc}"
        if not extra.entries and not extra.registries:
            return self.base, None
        directory = self.path.parent  # type: ignore[union-attr]
        registries = {**self.base.registries, **{r.host: str(directory / r.credentials) if r.credentials else None
                                                  for r in extra.registries}}
        return ImagePolicy(allow_pull=self.base.allow_pull, names=(*self.base.names, *extra.names),
                           digests=(*self.base.digests, *extra.digests), registries=registries), None
