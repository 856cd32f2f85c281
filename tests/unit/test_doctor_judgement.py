"""`airlock doctor` judges probe facts against the policy: a missing protection is a required failure."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from appliance.doctor.report import engine_checks, exit_code, probe_checks
from appliance.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]
POLICY = load_policy(ROOT / "policy")

ENFORCED = {
    "uid": 10001, "seccomp_mode": "2", "no_new_privs": "1", "cap_eff": "0000000000000000",
    "cap_bnd": "0000000000000000", "keyctl_errno": 1, "unshare_user_errno": 1, "io_uring_errno": 1,
    "i386_abi": "refused", "root_writable": False, "memory_limit": str(POLICY.hardening.limits.memory),
    "pids_limit": str(POLICY.hardening.limits.pids), "apparmor": None, "gateway": "172.18.0.1",
    "gateway_reachable": False, "gateway_result": "EHOSTUNREACH",
}


def test_fully_enforced_probe_passes() -> None:
    checks = probe_checks(ENFORCED, POLICY)
    assert exit_code(checks) == 0
    assert all(c.ok for c in checks if c.required)


@pytest.mark.parametrize(
    ("fact", "value", "check"),
    [
        ("seccomp_mode", "0", "seccomp filter active"),
        ("keyctl_errno", 0, "airlock seccomp profile"),
        ("i386_abi", "runs", "no 32-bit syscall ABI"),
        ("no_new_privs", "0", "no-new-privileges"),
        ("cap_eff", "00000000a80425fb", "all capabilities dropped"),
        ("uid", 0, "non-root user"),
        ("root_writable", True, "read-only root filesystem"),
        ("memory_limit", "9223372036854771712", "memory limit"),
        ("pids_limit", "max", "pids limit"),
        ("gateway_reachable", True, "host unreachable"),
    ],
)
def test_each_missing_protection_fails_the_doctor(fact: str, value: object, check: str) -> None:
    checks = probe_checks({**ENFORCED, fact: value}, POLICY)
    failed = [c for c in checks if c.required and not c.ok]
    assert [c.name for c in failed if c.name.startswith(check)], failed
    assert exit_code(checks) == 1


def test_gvisor_is_informational_unless_the_policy_asks_for_it() -> None:
    info = {"SecurityOptions": ["name=seccomp,profile=default"], "Runtimes": {"runc": {}}}
    version = {"Version": "20.10", "ApiVersion": "1.41"}
    assert exit_code(engine_checks(info, version, POLICY)) == 0
    wants_gvisor = replace(POLICY, hardening=replace(POLICY.hardening, runtime="runsc"))
    assert exit_code(engine_checks(info, version, wants_gvisor)) == 1
    info["Runtimes"]["runsc"] = {}
    assert exit_code(engine_checks(info, version, wants_gvisor)) == 0


def test_engine_without_seccomp_fails() -> None:
    assert exit_code(engine_checks({"SecurityOptions": []}, {}, POLICY)) == 1
