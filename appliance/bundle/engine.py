"""The one place bundle code talks to Docker: docker SDK calls in, BundleError("docker", ...) out.

Export and import depend on the small `Engine` protocol, so their tests run against a fake engine
and can prove that a refused bundle never reaches `load`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import docker
import docker.errors
import requests.exceptions

from appliance.bundle.errors import BundleError

SAVE_CHUNK = 1 << 20
_TIMEOUT = 900  # seconds: loading a few hundred MB on a slow disk


@dataclass(frozen=True)
class ImageInfo:
    image_id: str
    tags: tuple[str, ...]
    created: str
    size: int  # the engine's size; a docker save tar is about this big (for the progress bar)


class Engine(Protocol):
    def inspect(self, ref: str) -> ImageInfo | None: ...
    def save(self, image_id: str) -> Iterator[bytes]: ...
    def load(self, chunks: Iterable[bytes]) -> list[str]: ...
    def tag(self, image_id: str, tag: str) -> None: ...
    def remove(self, image_id: str) -> None: ...


class DockerEngine:
    """The engine behind DOCKER_HOST (the real socket, on the host: sockguard refuses image loads)."""

    def __init__(self, client: docker.DockerClient | None = None) -> None:
        try:
            self.client = client or docker.from_env(timeout=_TIMEOUT)
        except docker.errors.DockerException as exc:
            raise BundleError("docker", f"cannot reach the Docker engine: {exc}") from None

    def inspect(self, ref: str) -> ImageInfo | None:
        try:
            image = self.client.images.get(ref)
        except docker.errors.ImageNotFound:
            return None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise BundleError("docker", f"cannot inspect image {ref}: {exc}") from None
        attrs = image.attrs
        return ImageInfo(image_id=image.id, tags=tuple(image.tags), created=str(attrs.get("Created", "")),
                         size=int(attrs.get("Size") or 0))

    def save(self, image_id: str) -> Iterator[bytes]:
        try:
            yield from self.client.api.get_image(image_id, chunk_size=SAVE_CHUNK)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise BundleError("docker", f"docker save {image_id} failed: {exc}") from None

    def load(self, chunks: Iterable[bytes]) -> list[str]:
        """POST /images/load with a streamed (chunked) body; the ids the engine reports as loaded."""
        loaded = []
        try:
            for message in self.client.api.load_image(chunks):
                if "errorDetail" in message:
                    raise BundleError("load", f"docker load failed: {message['errorDetail'].get('message', '')}")
                text = message.get("stream", "")
                if text.startswith("Loaded image ID: "):
                    loaded.append(text.removeprefix("Loaded image ID: ").strip())
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise BundleError("load", f"docker load failed: {exc}") from None
        return loaded

    def tag(self, image_id: str, tag: str) -> None:
        repository, _, name = tag.rpartition(":")
        try:
            self.client.api.tag(image_id, repository, name)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise BundleError("docker", f"cannot tag {image_id} as {tag}: {exc}") from None

    def remove(self, image_id: str) -> None:
        try:
            self.client.api.remove_image(image_id, noprune=False)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise BundleError("docker", f"cannot remove image {image_id}: {exc}") from None
