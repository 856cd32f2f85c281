"""Runs INSIDE a hardened probe container (as `python3 -c`): report what the kernel actually enforces.

Standard library only; prints one JSON object. Never imported by the appliance itself.
"""

import ctypes
import errno
import json
import os
import socket

libc = ctypes.CDLL(None, use_errno=True)
SYS_KEYCTL, SYS_UNSHARE, SYS_IO_URING_SETUP = 250, 272, 425  # x86_64
CLONE_NEWUSER = 0x10000000


def status_field(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return None


def syscall_errno(number, *args):
    result = libc.syscall(number, *args)
    return 0 if result >= 0 else ctypes.get_errno()


def read_first(*paths):
    for path in paths:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            continue
    return None


def root_writable():
    try:
        with open("/airlock-probe", "w"):
            pass
        os.unlink("/airlock-probe")
        return True
    except OSError as exc:
        return exc.errno not in (errno.EROFS, errno.EACCES)


def gateway():
    with open("/proc/net/route") as f:
        for line in list(f)[1:]:
            fields = line.split()
            if len(fields) > 2 and fields[1] == "00000000":
                return socket.inet_ntoa(bytes.fromhex(fields[2])[::-1])
    return None


def reach(address, port=9):
    """(reachable, what happened): a refused connection still proves the host answered."""
    if address is None:
        return False, "no default route"
    try:
        socket.create_connection((address, port), timeout=4).close()
        return True, "connected"
    except ConnectionRefusedError:
        return True, "connection refused (the host answered)"
    except OSError as exc:
        return False, errno.errorcode.get(exc.errno or 0, str(exc))


def i386_abi():
    """'refused' when a syscall through the 32-bit ABI (int 0x80, i386 getpid) is refused or kills the caller."""
    if os.uname().machine != "x86_64":
        return "n/a"
    import mmap

    code = b"\xb8\x14\x00\x00\x00\xcd\x80\xc3"  # mov eax, 20; int 0x80; ret
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    pid = os.fork()
    if pid == 0:  # a refused ABI may kill the thread (SIGSYS): try it in a child
        os._exit(0 if ctypes.CFUNCTYPE(ctypes.c_int)(address)() == os.getpid() else 3)
    _, status = os.waitpid(pid, 0)
    return "runs" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else "refused"


gw = gateway()
gateway_reachable, gateway_result = reach(gw)
memory = read_first("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
print(json.dumps({
    "uid": os.getuid(),
    "seccomp_mode": status_field("Seccomp"),
    "no_new_privs": status_field("NoNewPrivs"),
    "cap_eff": status_field("CapEff"),
    "cap_bnd": status_field("CapBnd"),
    "keyctl_errno": syscall_errno(SYS_KEYCTL, 0, -3, 0),  # KEYCTL_GET_KEYRING_ID, session keyring
    "unshare_user_errno": syscall_errno(SYS_UNSHARE, CLONE_NEWUSER),
    "io_uring_errno": syscall_errno(SYS_IO_URING_SETUP, 1, 0),
    "i386_abi": i386_abi(),
    "root_writable": root_writable(),
    "memory_limit": memory,
    "pids_limit": read_first("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
    "apparmor": read_first("/proc/self/attr/apparmor/current", "/proc/self/attr/current"),
    "uid_map": read_first("/proc/self/uid_map"),
    "gateway": gw,
    "gateway_reachable": gateway_reachable,
    "gateway_result": gateway_result,
    "kernel": read_first("/proc/version"),
}))
