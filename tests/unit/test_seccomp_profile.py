"""Static checks on airlock's seccomp profile (policy/seccomp.json); no Docker needed.

The profile is Docker's default minus the syscalls listed in policy/seccomp-removed.yaml. These tests make
sure nothing listed there is allowed by any rule, that namespace creation through clone/clone3 stays
closed, and that the syscalls CPython/Dagster processes rely on are still allowed for every container.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILE_PATH = REPO_ROOT / "policy" / "seccomp.json"
REMOVED_PATH = REPO_ROOT / "policy" / "seccomp-removed.yaml"

ALLOW = "SCMP_ACT_ALLOW"
ENOSYS = 38

# CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
CLONE_NEW_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
NAMESPACE_MASK = 0x7E020000

AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
AF_ALG, AF_VSOCK = 38, 40

# Upstream gates these on CAP_SYS_ADMIN and they are harmless to keep gated; any other CAP_SYS_ADMIN-gated
# allow (mount, unshare, setns, clone, bpf, ...) must not come back with an upstream bump unreviewed.
SYS_ADMIN_GATED_OK = {"lsm_get_self_attr", "lsm_list_modules", "lsm_set_self_attr"}

# Syscalls an ordinary CPython process (Dagster code server, run worker, multiprocess executor child)
# needs: startup, imports, threads, fork/spawn/subprocess, pipes, sockets/gRPC, epoll, signals, shared
# memory. They must be allowed for every container: no capability, kernel-version, arch or argument
# condition. clone and socket are checked separately because they are (correctly) argument-filtered.
REQUIRED_UNCONDITIONAL = [
    # memory
    "mmap", "munmap", "mprotect", "mremap", "madvise", "brk", "membarrier", "memfd_create",
    # files
    "read", "write", "readv", "writev", "pread64", "pwrite64", "openat", "open", "close", "close_range",
    "lseek", "fstat", "newfstatat", "statx", "lstat", "stat", "getdents64", "fcntl", "ioctl", "dup",
    "dup2", "dup3", "access", "faccessat2", "readlink", "readlinkat", "getcwd", "chdir", "mkdir",
    "mkdirat", "unlink", "unlinkat", "rename", "renameat2", "fsync", "ftruncate", "flock", "umask",
    # processes and threads
    "futex", "set_robust_list", "get_robust_list", "set_tid_address", "rseq", "fork", "vfork",
    "execve", "execveat", "wait4", "waitid", "exit", "exit_group", "getpid", "getppid", "gettid",
    "getuid", "geteuid", "getgid", "getegid", "setsid", "setpgid", "prctl", "prlimit64", "getrlimit",
    "getrusage", "sched_getaffinity", "sched_yield", "pidfd_open", "pidfd_send_signal", "uname",
    "sysinfo",
    # signals
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigsuspend", "sigaltstack", "kill", "tgkill",
    # ipc / multiprocessing
    "pipe", "pipe2", "socketpair", "eventfd2", "shmget", "shmat", "shmdt", "shmctl",
    # sockets (socket itself is argument-filtered, see below)
    "connect", "bind", "listen", "accept", "accept4", "getsockname", "getpeername", "setsockopt",
    "getsockopt", "sendto", "recvfrom", "sendmsg", "recvmsg", "shutdown",
    # event loops
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "poll", "ppoll", "select", "pselect6",
    # time and randomness
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "getrandom",
]  # fmt: skip


def _load_profile() -> dict[str, Any]:
    return json.loads(PROFILE_PATH.read_text())


def _load_removed() -> dict[str, Any]:
    return yaml.safe_load(REMOVED_PATH.read_text())


def _removed_entries() -> list[dict[str, Any]]:
    return [entry for category in _load_removed()["categories"] for entry in category["syscalls"]]


def _removed_names() -> list[str]:
    return [entry["name"] for entry in _removed_entries()]


def _rules_for(profile: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [rule for rule in profile["syscalls"] if name in rule.get("names", [])]


def _is_unconditional(rule: dict[str, Any]) -> bool:
    """True when the rule applies to every container on every arch, for any arguments."""
    return not rule.get("args") and not rule.get("includes") and not rule.get("excludes")


def _has_caps_condition(rule: dict[str, Any]) -> bool:
    return bool(rule.get("includes", {}).get("caps") or rule.get("excludes", {}).get("caps"))


@pytest.fixture(scope="module")
def profile() -> dict[str, Any]:
    return _load_profile()


def test_profile_is_valid_json_with_deny_by_default(profile: dict[str, Any]) -> None:
    assert isinstance(profile, dict)
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 1  # EPERM, as upstream
    assert profile["archMap"], "archMap must be kept so the host's ABI is named"
    native = {entry["architecture"]: entry.get("subArchitectures") for entry in profile["archMap"]}
    # No 32-bit compat ABI: socketcall(2) would hide socket families from the filter (docs/SECURITY.md).
    assert not native["SCMP_ARCH_X86_64"] and not native["SCMP_ARCH_AARCH64"], native
    assert isinstance(profile["syscalls"], list) and profile["syscalls"]


def test_every_rule_is_well_formed(profile: dict[str, Any]) -> None:
    for rule in profile["syscalls"]:
        assert rule.get("names"), f"rule without syscall names: {rule}"
        assert rule["action"].startswith("SCMP_ACT_"), rule
        assert len(rule["names"]) == len(set(rule["names"])), f"duplicate names in rule: {rule}"
        for key in ("includes", "excludes"):
            if key in rule:
                assert rule[key], f"empty {key} in rule {rule['names']}"


def test_removed_yaml_is_well_formed() -> None:
    data = _load_removed()
    assert data["upstream"]["repo"] in {"moby/profiles", "moby/moby"}
    assert len(data["upstream"]["commit"]) == 40
    assert data["categories"], "no categories"
    names = _removed_names()
    assert len(names) == len(set(names)), "a syscall is listed twice in seccomp-removed.yaml"
    for category in data["categories"]:
        assert str(category.get("category", "")).strip(), category
        assert category["syscalls"], f"empty category {category['category']}"


@pytest.mark.parametrize("entry", _removed_entries(), ids=lambda e: e["name"])
def test_every_removal_has_a_reason(entry: dict[str, Any]) -> None:
    assert isinstance(entry.get("reason"), str) and entry["reason"].strip(), entry
    assert isinstance(entry.get("impact"), str) and entry["impact"].strip(), entry


@pytest.mark.parametrize("name", _removed_names())
def test_removed_syscall_is_never_allowed(profile: dict[str, Any], name: str) -> None:
    allowing = [rule for rule in _rules_for(profile, name) if rule["action"] == ALLOW]
    assert not allowing, f"{name} is removed by airlock but still allowed by: {allowing}"


def test_expected_removals_are_listed() -> None:
    # The brief for the profile; the yaml may list more, never less.
    must_be_listed = {
        "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp", "pidfd_getfd",
        "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
        "io_uring_setup", "io_uring_enter", "io_uring_register", "personality",
        "mount", "umount", "umount2", "mount_setattr", "move_mount", "open_tree", "fsopen", "fsconfig",
        "fsmount", "fspick", "pivot_root", "chroot", "unshare", "setns", "clone3",
        "kexec_load", "kexec_file_load", "reboot", "init_module", "finit_module", "delete_module",
        "acct", "swapon", "swapoff", "syslog", "quotactl", "quotactl_fd", "lookup_dcookie",
        "open_by_handle_at", "name_to_handle_at", "iopl", "ioperm", "settimeofday", "stime",
        "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64", "adjtimex", "vhangup",
        "nfsservctl", "bdflush", "sysfs", "uselib", "ustat", "_sysctl", "get_kernel_syms",
        "query_module", "create_module", "vm86", "vm86old", "fanotify_init", "setdomainname",
        "sethostname", "pciconfig_iobase", "pciconfig_read", "pciconfig_write",
    }  # fmt: skip
    missing = must_be_listed - set(_removed_names())
    assert not missing, f"not listed in seccomp-removed.yaml: {sorted(missing)}"


def test_no_capability_reopens_namespaces_or_mounts(profile: dict[str, Any]) -> None:
    # Upstream re-allows mount/unshare/setns/clone/... for CAP_SYS_ADMIN; airlock must not, whatever the spec.
    for rule in profile["syscalls"]:
        if rule["action"] != ALLOW:
            continue
        if "CAP_SYS_ADMIN" in rule.get("includes", {}).get("caps", []):
            unexpected = set(rule["names"]) - SYS_ADMIN_GATED_OK
            assert not unexpected, f"CAP_SYS_ADMIN-gated allow for {sorted(unexpected)}"


def test_capability_gated_rules_never_allow_clone(profile: dict[str, Any]) -> None:
    for rule in profile["syscalls"]:
        if rule["action"] == ALLOW and rule.get("includes", {}).get("caps"):
            assert not {"clone", "clone3"} & set(rule["names"]), rule


def test_clone3_is_never_allowed_and_fails_with_enosys(profile: dict[str, Any]) -> None:
    rules = _rules_for(profile, "clone3")
    assert not [rule for rule in rules if rule["action"] == ALLOW]
    enosys = [
        rule
        for rule in rules
        if rule["action"] == "SCMP_ACT_ERRNO" and rule.get("errnoRet") == ENOSYS and _is_unconditional(rule)
    ]
    # ENOSYS (not EPERM) makes glibc fall back to clone(2), whose flags seccomp can inspect.
    assert enosys, "clone3 must fail with ENOSYS for every container (no capability exclusion)"
    assert len(rules) == 1, f"unexpected extra clone3 rules: {rules}"


def test_namespace_mask_matches_clone_new_flags() -> None:
    combined = 0
    for flag in CLONE_NEW_FLAGS.values():
        combined |= flag
    assert combined == NAMESPACE_MASK


def _masks_namespace_flags(rule: dict[str, Any]) -> bool:
    args = rule.get("args") or []
    flags_index = {0, 1}  # 0 on most arches; 1 on s390/s390x where clone's arguments are swapped
    for arg in args:
        if (
            arg.get("op") == "SCMP_CMP_MASKED_EQ"
            and arg.get("index") in flags_index
            and arg.get("value", 0) & NAMESPACE_MASK == NAMESPACE_MASK
            and arg.get("valueTwo", 0) & NAMESPACE_MASK == 0
        ):
            return True
    return False


def test_every_clone_rule_masks_namespace_flags_or_denies(profile: dict[str, Any]) -> None:
    clone_rules = [rule for rule in profile["syscalls"] if any("clone" in n for n in rule["names"])]
    assert clone_rules
    for rule in clone_rules:
        if rule["action"] == "SCMP_ACT_ERRNO":
            continue
        assert rule["action"] == ALLOW, rule
        assert "clone3" not in rule["names"], rule
        assert _masks_namespace_flags(rule), f"clone allowed without masking CLONE_NEW* flags: {rule}"


def test_masked_clone_allowed_for_every_container(profile: dict[str, Any]) -> None:
    # Threads, fork and posix_spawn need clone without namespace flags, with or without extra capabilities.
    rules = [
        rule
        for rule in _rules_for(profile, "clone")
        if rule["action"] == ALLOW
        and _masks_namespace_flags(rule)
        and not _has_caps_condition(rule)
        and not rule.get("includes")
        and rule.get("args", [{}])[0].get("index") == 0
    ]
    assert rules, "no capability-independent masked clone rule for the common arches"
    # It may exclude s390/s390x (they get their own rule with the swapped argument order), nothing else.
    for rule in rules:
        assert set(rule.get("excludes", {})) <= {"arches"}
        assert set(rule.get("excludes", {}).get("arches", [])) <= {"s390", "s390x"}


def _arg_matches(arg: dict[str, Any], value: int) -> bool:
    ref = arg["value"]
    op = arg["op"]
    if op == "SCMP_CMP_MASKED_EQ":
        return value & ref == arg.get("valueTwo", 0)
    ops = {
        "SCMP_CMP_EQ": value == ref,
        "SCMP_CMP_NE": value != ref,
        "SCMP_CMP_LT": value < ref,
        "SCMP_CMP_LE": value <= ref,
        "SCMP_CMP_GT": value > ref,
        "SCMP_CMP_GE": value >= ref,
    }
    return ops[op]


def _socket_family_allowed(profile: dict[str, Any], family: int) -> bool:
    """Whether socket(family, ...) is allowed, for a container with no extra capabilities on x86_64."""
    for rule in _rules_for(profile, "socket"):
        if rule["action"] != ALLOW or rule.get("includes"):
            continue
        args = rule.get("args") or []
        assert all(arg["index"] == 0 for arg in args), f"unexpected socket filter: {rule}"
        if all(_arg_matches(arg, family) for arg in args):
            return True
    return False


def test_socket_rules_are_not_capability_dependent(profile: dict[str, Any]) -> None:
    rules = [rule for rule in _rules_for(profile, "socket") if rule["action"] == ALLOW]
    assert rules
    for rule in rules:
        assert not rule.get("includes") and not rule.get("excludes"), rule


@pytest.mark.parametrize("family", [AF_UNIX, AF_INET, AF_INET6, AF_NETLINK])
def test_socket_allowed_for_ordinary_families(profile: dict[str, Any], family: int) -> None:
    # gRPC, HTTP clients/servers, multiprocessing and getaddrinfo/getifaddrs (netlink) need these.
    assert _socket_family_allowed(profile, family)


@pytest.mark.parametrize("family", [AF_ALG, AF_VSOCK])
def test_socket_denied_for_alg_and_vsock(profile: dict[str, Any], family: int) -> None:
    # AF_ALG: CVE-2026-31431 ("Copy Fail"); AF_VSOCK: reaches the hypervisor host. Both blocked upstream too.
    assert not _socket_family_allowed(profile, family)


@pytest.mark.parametrize("name", REQUIRED_UNCONDITIONAL)
def test_cpython_dagster_syscall_still_allowed(profile: dict[str, Any], name: str) -> None:
    rules = [rule for rule in _rules_for(profile, name) if rule["action"] == ALLOW]
    assert any(_is_unconditional(rule) for rule in rules), f"{name} is not unconditionally allowed"


def test_required_and_removed_do_not_overlap() -> None:
    overlap = set(REQUIRED_UNCONDITIONAL) & set(_removed_names())
    assert not overlap, overlap


def test_arch_prctl_allowed_on_x86_64(profile: dict[str, Any]) -> None:
    # glibc sets up TLS with arch_prctl on x86_64; upstream scopes it to amd64/x32.
    rules = [rule for rule in _rules_for(profile, "arch_prctl") if rule["action"] == ALLOW]
    assert any("amd64" in rule.get("includes", {}).get("arches", []) for rule in rules)
    assert not any(_has_caps_condition(rule) for rule in rules)
