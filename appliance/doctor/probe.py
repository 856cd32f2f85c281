"""Runs INSIDE a hardened probe container (as `python3 -c`): report what the kernel actually enforces.

Standard library only; prints one JSON object. Never imported by the appliance itself.
"""

import ctypes
import errno
import json
import os

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


def default_route():
    with open("/proc/net/route") as f:
        return any(line.split()[1] == "00000000" for line in list(f)[1:] if len(line.split()) > 1)


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
    "root_writable": root_writable(),
    "memory_limit": memory,
    "pids_limit": read_first("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
    "apparmor": read_first("/proc/self/attr/apparmor/current", "/proc/self/attr/current"),
    "uid_map": read_first("/proc/self/uid_map"),
    "default_route": default_route(),
    "kernel": read_first("/proc/version"),
}))
