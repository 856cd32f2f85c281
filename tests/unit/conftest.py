"""Fixtures shared by the relay's tests (tests/unit/test_grpc_relay.py, tests/unit/test_fastpath.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from tests.unit.grpc_fakes import OPTIONS, FakeCodeServer


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The control plane's event loop, on its own thread, as in a real gateway process."""
    ev = asyncio.new_event_loop()
    thread = threading.Thread(target=ev.run_forever, daemon=True)
    thread.start()
    yield ev
    ev.call_soon_threadsafe(ev.stop)
    thread.join(5)


@pytest.fixture(scope="module")
def code_server() -> Iterator[tuple[FakeCodeServer, str]]:
    fake = FakeCodeServer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTIONS)
    server.add_generic_rpc_handlers([fake])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(0)
