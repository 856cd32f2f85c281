"""What one extra gRPC hop costs, compiled vs Python: the floor under the relay's targets 2 and 3.

The relay puts two gRPC hops between a caller and a code server: the relay's listener on the control plane
and the agent's call on the appliance (plus the work channel between them). This bench measures those hops
with nothing else around them, on loopback, against a Python gRPC echo server standing in for the code server:

  direct          caller -> echo server
  nginx 1 hop     caller -> nginx grpc_pass -> echo server            (a compiled HTTP/2 proxy)
  nginx 2 hops    caller -> nginx -> nginx -> echo server
  python 1 hop    caller -> grpc.aio raw-bytes relay on uvloop -> echo server   (how controlplane/relay serves)
  python 2 hops   caller -> grpc.aio relay -> grpc.aio relay -> echo server
  fastpath        caller -> airlock-fastpath edge -> Noise tunnel -> airlock-fastpath agent -> echo server
                  (the relay's compiled data path, docs/FASTPATH.md; built with `make fastpath`)

For each: sequential p50/p99 (one channel), then 8 caller threads for a few seconds (calls/s) and the CPU
the hop processes spent per call. nginx comes from Debian (`apt-get install nginx-light`); without it those
rows are skipped. Everything listens on 127.0.0.1 and is stopped at the end.

    python bench/grpc_hop.py [--calls 2000] [--seconds 4] [--callers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

SERVICE, METHOD = "bench.Echo", "Ping"
PATH = f"/{SERVICE}/{METHOD}"
FASTPATH_BIN = Path(__file__).resolve().parent.parent / "fastpath" / "target" / "release" / "airlock-fastpath"


def _ident(data: bytes) -> bytes:
    return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_echo(port: int) -> None:
    """The stand-in code server: sync gRPC, a thread pool, echoes the request."""
    server = grpc.server(ThreadPoolExecutor(8))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, _context: request, _ident, _ident)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def serve_python_hop(port: int, upstream: str) -> None:
    """A grpc.aio generic handler passing raw bytes upstream on one cached channel, on uvloop: the relay's shape."""
    import uvloop

    async def main() -> None:
        channel = grpc.aio.insecure_channel(upstream)
        forward = channel.unary_unary(PATH)

        async def relay(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
            return await forward(request)

        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(relay, _ident, _ident)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


def nginx_conf(workdir: Path, name: str, port: int, upstream: str) -> Path:
    conf = workdir / f"{name}.conf"
    conf.write_text(f"""daemon off; worker_processes 1; error_log {workdir}/{name}.err; pid {workdir}/{name}.pid;
events {{ worker_connections 1024; }}
http {{ access_log off; client_body_temp_path {workdir}/{name}-body;
  upstream next {{ server {upstream}; keepalive 16; }}
  server {{ listen 127.0.0.1:{port} http2; location / {{ grpc_pass grpc://next; }} }} }}
""")  # keepalive: reuse upstream connections, as the relay's own hops do (without it, one TCP connect per call)
    return conf


def start_fastpath(binary: str, upstream: str,
                   start: Callable[..., subprocess.Popen[bytes]]) -> tuple[int, list[int]]:
    """An edge and an agent joined by a tunnel, Ping on the fast path, the echo server as the location's code
    server: driven over stdin as the gateway and the agent drive them. Returns (the location's port, pids)."""
    key, port = os.urandom(32).hex(), _free_port()
    edge = start(binary, "edge", "--tunnel-listen", "127.0.0.1:0", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    agent = start(binary, "agent", stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def send(child: subprocess.Popen[bytes], **command: object) -> None:
        assert child.stdin is not None
        child.stdin.write(json.dumps(command).encode() + b"\n")
        child.stdin.flush()

    def event(child: subprocess.Popen[bytes], name: str) -> dict[str, object]:
        assert child.stdout is not None
        while line := child.stdout.readline():
            if (parsed := json.loads(line)).get("event") == name:
                return parsed
        raise RuntimeError(f"airlock-fastpath ended before {name}")

    tunnel_port = event(edge, "ready")["tunnel_port"]
    send(edge, op="methods", methods=[PATH])
    send(edge, op="listen", location="bench", address=f"127.0.0.1:{port}", fallback="127.0.0.1:9",
         deployment="prod", queue="default")
    send(edge, op="ticket", channel="bench", key=key, deployment="prod", queues=["default"])
    send(agent, op="methods", methods=[PATH])
    send(agent, op="servers", servers={"bench": upstream})
    send(agent, op="connect", channel="bench", key=key, address=f"127.0.0.1:{tunnel_port}")
    event(edge, "tunnel_up")
    return port, [edge.pid, agent.pid]


def process_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their children (nginx's worker is the master's child)."""
    total = 0.0
    for pid in pids:
        for task in [pid, *_children(pid)]:
            try:
                fields = Path(f"/proc/{task}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def sequential(target: str, calls: int) -> tuple[float, float]:
    channel = grpc.insecure_channel(target)
    ping = channel.unary_unary(PATH)
    for _ in range(300):
        ping(b"ping")
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        ping(b"ping")
        samples.append(time.perf_counter() - started)
    channel.close()
    samples.sort()
    return statistics.median(samples) * 1e3, samples[int(len(samples) * 0.99)] * 1e3


def throughput(target: str, pids: list[int], seconds: float, callers: int) -> tuple[float, float]:
    counts = [0] * callers
    ready = threading.Barrier(callers + 1)
    deadline = [0.0]

    def run(i: int) -> None:
        channel = grpc.insecure_channel(target)
        ping = channel.unary_unary(PATH)
        ping(b"ping")
        ready.wait()
        while time.monotonic() < deadline[0]:
            ping(b"ping")
            counts[i] += 1
        channel.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + seconds
    cpu_before = process_cpu(pids)
    ready.wait()
    for t in threads:
        t.join()
    calls = sum(counts)
    return calls / seconds, (process_cpu(pids) - cpu_before) / max(calls, 1) * 1e3


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per path (2000)")
    parser.add_argument("--seconds", type=float, default=4.0, help="throughput window per path (4 s)")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers (8)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="airlock-grpc-hop-"))
    children: list[subprocess.Popen[bytes]] = []

    def start(*argv: str, **popen: Any) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(list(argv), **({"stdout": subprocess.DEVNULL} | popen))
        children.append(child)
        return child

    me = [sys.executable, __file__]
    try:
        echo = _free_port()
        start(*me, "--serve-echo", str(echo))
        paths: list[tuple[str, int, list[int]]] = [("direct", echo, [])]
        nginx = shutil.which("nginx")
        if nginx:
            first, second = _free_port(), _free_port()
            n1 = start(nginx, "-e", str(workdir / "n1.log"), "-p", str(workdir), "-c",
                       str(nginx_conf(workdir, "n1", first, f"127.0.0.1:{echo}")))
            n2 = start(nginx, "-e", str(workdir / "n2.log"), "-p", str(workdir), "-c",
                       str(nginx_conf(workdir, "n2", second, f"127.0.0.1:{first}")))
            paths += [("nginx grpc_pass, 1 hop", first, [n1.pid]),
                      ("nginx grpc_pass, 2 hops", second, [n1.pid, n2.pid])]
        else:
            print("nginx not installed (apt-get install nginx-light): the compiled rows are skipped")
        first, second = _free_port(), _free_port()
        p1 = start(*me, "--serve-hop", str(first), f"127.0.0.1:{echo}")
        p2 = start(*me, "--serve-hop", str(second), f"127.0.0.1:{first}")
        paths += [("python grpc.aio relay, 1 hop", first, [p1.pid]),
                  ("python grpc.aio relay, 2 hops", second, [p1.pid, p2.pid])]
        binary = os.environ.get("AIRLOCK_FASTPATH_BIN") or str(FASTPATH_BIN)
        if os.access(binary, os.X_OK):
            port, pids = start_fastpath(binary, f"127.0.0.1:{echo}", start)
            paths.append(("airlock fastpath (edge+agent)", port, pids))
        else:
            print(f"{binary} not built (make fastpath): the fastpath row is skipped")
        for _, port, _ in paths:
            wait_listening(port)
        print(f"airlock gRPC hop bench  {os.cpu_count()} CPUs  Python {sys.version.split()[0]}  "
              f"grpcio {grpc.__version__}  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"{'path':32} {'p50':>8} {'p99':>8}   {'+p50':>8}   {args.callers} callers   hop CPU per call")
        base = None
        for name, port, pids in paths:
            p50, p99 = sequential(f"127.0.0.1:{port}", args.calls)
            rate, cpu = throughput(f"127.0.0.1:{port}", pids, args.seconds, args.callers)
            base = base or (p50, rate)
            extra = f"{p50 - base[0]:+6.3f} ms" if pids else " " * 9
            hop_cpu = f"{cpu:.3f} ms" if pids else "-"
            ratio = rate / base[1]
            print(f"{name:32} {p50:6.3f} ms {p99:6.3f} ms   {extra}   {rate:6.0f}/s ({ratio:4.2f})   {hop_cpu}",
                  flush=True)
        return 0
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-echo"]:
        serve_echo(int(sys.argv[2]))
    elif sys.argv[1:2] == ["--serve-hop"]:
        serve_python_hop(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(main())
