"""The gateway's TLS: a client that trusts the generated CA connects; one that trusts another CA refuses."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from controlplane.tls import ensure_tls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path):
    files = ensure_tls(tmp_path / "tls", ["localhost", "127.0.0.1"])
    app = Starlette(routes=[Route("/healthz", lambda _: PlainTextResponse("ok"))])
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, ssl_certfile=str(files.cert),
                            ssl_keyfile=str(files.key), log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield files, port
    srv.should_exit = True
    thread.join(5)


def test_files_and_modes(tmp_path: Path) -> None:
    files = ensure_tls(tmp_path, ["gateway"])
    assert files.key.stat().st_mode & 0o777 == 0o600
    again = ensure_tls(tmp_path, ["gateway"])
    assert again.cert.read_bytes() == files.cert.read_bytes()  # kept, not regenerated


def test_trusted_ca_connects_and_other_ca_is_refused(server, tmp_path: Path) -> None:
    files, port = server
    ok = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ssl.create_default_context(cafile=str(files.ca_cert)))
    assert ok.text == "ok"
    other = ensure_tls(tmp_path / "other", ["localhost", "127.0.0.1"])
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ssl.create_default_context(cafile=str(other.ca_cert)))
