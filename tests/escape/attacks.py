"""Attacks run INSIDE a container (`python3 -c <this file> NAME [ARGS]`); each prints one JSON result.

Standard library only. `{"ok": true}` means the action succeeded — an escape when run inside an
airlock user container, the expected outcome in the looser control container (the "allowed twin").
"""

import ctypes
import errno
import json
import os
import socket
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
NR = {"keyctl": 250, "unshare": 272, "ptrace": 101, "bpf": 321, "io_uring_setup": 425, "mount": 165}
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000


def result(ok, **detail):
    print(json.dumps({"ok": ok, **detail}))


def syscall(name, *args):
    ret = libc.syscall(NR[name], *args)
    err = ctypes.get_errno() if ret < 0 else 0
    return ret, err


def report_syscall(name, *args, success_errnos=()):
    """ok when the syscall ran (returned >= 0, or failed with an errno that only a running syscall gives)."""
    ret, err = syscall(name, *args)
    result(ret >= 0 or err in success_errnos, ret=ret, errno=err, error=errno.errorcode.get(err, ""))


def attack_mount():
    os.makedirs("/tmp/m", exist_ok=True)
    report_syscall("mount", b"none", b"/tmp/m", b"tmpfs", 0, None)


def attack_unshare_user():
    report_syscall("unshare", CLONE_NEWUSER)


def attack_unshare_mount():
    report_syscall("unshare", CLONE_NEWNS)


def attack_ptrace():
    """PTRACE_ATTACH to a sibling process of the same uid."""
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    try:
        ret, err = syscall("ptrace", 16, child, 0, 0)  # PTRACE_ATTACH
        result(ret >= 0, ret=ret, errno=err, error=errno.errorcode.get(err, ""))
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


def attack_raw_socket():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
        result(True)
    except OSError as exc:
        result(False, errno=exc.errno, error=errno.errorcode.get(exc.errno, ""))


def attack_write_file(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        os.unlink(path)
        result(True, path=path)
    except OSError as exc:
        result(False, path=path, errno=exc.errno, error=errno.errorcode.get(exc.errno, ""))


def attack_setuid():
    """Become root: setuid(0) directly, and note whether no-new-privileges would neuter setuid binaries."""
    with open("/proc/self/status") as f:
        nnp = next(line.split()[1] for line in f if line.startswith("NoNewPrivs"))
    try:
        os.setuid(0)
        result(os.geteuid() == 0, nnp=nnp)
    except OSError as exc:
        result(False, nnp=nnp, errno=exc.errno, error=errno.errorcode.get(exc.errno, ""))


def attack_docker_socket():
    """Look for any Docker socket (unix paths, TCP 2375/2376 on the gateway)."""
    found = []
    for path in ("/var/run/docker.sock", "/run/docker.sock", "/run/airlock/sockguard/docker.sock",
                 "/var/run/docker/docker.sock"):
        if os.path.exists(path):
            found.append(path)
    with open("/proc/net/route") as f:
        gateways = [line.split()[2] for line in list(f)[1:] if line.split()[2] != "00000000"]
    for gw_hex in gateways:
        gw = socket.inet_ntoa(bytes.fromhex(gw_hex)[::-1])
        for port in (2375, 2376):
            try:
                socket.create_connection((gw, port), timeout=2).close()
                found.append(f"{gw}:{port}")
            except OSError:
                pass
    result(bool(found), found=found)


def attack_unix_socket(path):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(3)
        s.connect(path)
        s.sendall(b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n")
        reply = s.recv(64).decode(errors="replace")
        result(" 200 " in reply, reply=reply[:40])
    except OSError as exc:
        result(False, errno=exc.errno, error=errno.errorcode.get(exc.errno or 0, str(exc)))


def attack_connect(host, port):
    try:
        s = socket.create_connection((host, int(port)), timeout=4)
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        reply = s.recv(200).decode(errors="replace")
        s.close()
        result(bool(reply), reply=reply.split("\r\n")[0])
    except OSError as exc:
        result(False, errno=exc.errno, error=errno.errorcode.get(exc.errno or 0, str(exc)))


def attack_reach(host, port):
    """Can this container reach host:port at all? A refused connection counts: the host answered."""
    try:
        socket.create_connection((host, int(port)), timeout=4).close()
        result(True, outcome="connected")
    except ConnectionRefusedError:
        result(True, outcome="refused")
    except OSError as exc:
        result(False, errno=exc.errno, error=errno.errorcode.get(exc.errno or 0, str(exc)))


def attack_gateway():
    """Print the default gateway (the host's address on this network, if it has one)."""
    with open("/proc/net/route") as f:
        for line in list(f)[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                result(True, gateway=socket.inet_ntoa(bytes.fromhex(fields[2])[::-1]))
                return
    result(False, gateway=None)


def attack_proxy(proxy_host, proxy_port, target_host, target_port):
    """CONNECT through the egress proxy, then speak HTTP to the target."""
    try:
        s = socket.create_connection((proxy_host, int(proxy_port)), timeout=5)
        s.sendall(f"CONNECT {target_host}:{target_port} HTTP/1.1\r\nHost: {target_host}:{target_port}\r\n\r\n".encode())
        head = s.recv(1024).decode(errors="replace")
        status = head.split("\r\n")[0]
        if " 200 " not in status + " ":
            reason = [h for h in head.split("\r\n") if h.lower().startswith("x-airlock-egress-reason")]
            result(False, status=status, reason=reason[0] if reason else "")
            return
        s.sendall(b"GET / HTTP/1.0\r\nHost: outside\r\n\r\n")
        body = s.recv(200).decode(errors="replace")
        s.close()
        result("200" in body.split("\r\n")[0], status=status, reply=body.split("\r\n")[0])
    except OSError as exc:
        result(False, errno=exc.errno, error=str(exc))


def attack_fork_bomb():
    """Fork until refused; every child sleeps, then all are reaped. Reports how many got through."""
    children = []
    refused = None
    for _ in range(5000):
        try:
            pid = os.fork()
        except OSError as exc:
            refused = errno.errorcode.get(exc.errno, str(exc))
            break
        if pid == 0:
            time.sleep(20)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, 9)
    for pid in children:
        os.waitpid(pid, 0)
    result(refused is None, forked=len(children), refused=refused)


def attack_memory(megabytes):
    """Allocate and touch MEGABYTES of memory; print how far it got before any kill."""
    blocks = []
    for i in range(int(megabytes)):
        blocks.append(bytearray(1024 * 1024))
        if i % 64 == 0:
            print(json.dumps({"progress_mb": i}), flush=True)
    result(True, allocated_mb=len(blocks))


def attack_keyctl():
    report_syscall("keyctl", 0, -3, 0)  # KEYCTL_GET_KEYRING_ID: returns a key serial when it runs


def attack_bpf():
    # BPF_MAP_CREATE with a zeroed (invalid) attr: EINVAL from a running syscall, EPERM when refused.
    attr = ctypes.create_string_buffer(64)
    report_syscall("bpf", 0, attr, 64, success_errnos=(errno.EINVAL,))


def attack_io_uring():
    params = ctypes.create_string_buffer(120)
    ret, err = syscall("io_uring_setup", 4, params)
    if ret >= 0:
        os.close(ret)
    result(ret >= 0, ret=ret, errno=err, error=errno.errorcode.get(err, ""))


def attack_read_path(path):
    try:
        if os.path.isdir(path):
            entries = os.listdir(path)
        else:
            with open(path) as f:
                entries = [f.read(64)]
        result(True, entries=entries[:5])
    except OSError as exc:
        result(False, errno=exc.errno, error=errno.errorcode.get(exc.errno, ""))


def attack_environ():
    """What secrets could user code find? Report env names and mount points (no values)."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    result(True, env=sorted(os.environ), mounts=mounts)


def attack_i386_socketcall():
    """An AF_ALG socket through the 32-bit ABI (`int 0x80`, socketcall(SYS_SOCKET)) from this 64-bit process.

    socketcall passes the address family behind a pointer seccomp cannot read, so only refusing the i386 ABI
    itself closes it. The machine code runs in a forked child: a refused ABI may kill the thread (SIGSYS)."""
    import mmap
    import signal
    import struct

    if os.uname().machine != "x86_64":
        return result(False, skipped="not x86_64")
    map_32bit = 0x40  # MAP_32BIT: int 0x80 sees only the low 32 bits of a pointer
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    page = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | map_32bit, -1, 0)
    if page in (None, ctypes.c_void_p(-1).value):
        return result(False, error="mmap", errno=ctypes.get_errno())
    args = page + 256
    ctypes.memmove(args, struct.pack("<III", 38, 5, 0), 12)  # AF_ALG, SOCK_SEQPACKET, 0
    code = (b"\x53"  # push rbx (callee-saved)
            + b"\xb8" + struct.pack("<I", 102)  # mov eax, 102 (i386 socketcall)
            + b"\xbb" + struct.pack("<I", 1)  # mov ebx, 1 (SYS_SOCKET)
            + b"\xb9" + struct.pack("<I", args)  # mov ecx, args
            + b"\xcd\x80"  # int 0x80
            + b"\x5b\xc3")  # pop rbx; ret
    ctypes.memmove(page, code, len(code))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        ret = ctypes.CFUNCTYPE(ctypes.c_int)(page)()
        os.write(write_end, str(ret).encode())
        os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    out = os.read(read_end, 32).decode()
    if os.WIFSIGNALED(status):
        return result(False, killed_by=signal.Signals(os.WTERMSIG(status)).name)
    ret = int(out)
    # A running socketcall gives a socket, or EAFNOSUPPORT on a kernel without AF_ALG; refused gives EPERM/ENOSYS.
    result(ret >= 0 or ret == -errno.EAFNOSUPPORT, ret=ret, error=errno.errorcode.get(-ret, "") if ret < 0 else "")


if __name__ == "__main__":
    globals()["attack_" + sys.argv[1]](*sys.argv[2:])
