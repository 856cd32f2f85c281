"""Gather facts (engine info, a hardened probe container, sockguard and proxy checks) and judge them.

A check is *required* when the policy asks for that protection; a required check that fails makes
`airlock doctor` exit 1. Informational checks (AppArmor, user namespaces, gVisor) say what the host
offers, so an operator knows what is and is not there.
"""

from __future__ import annotations

import json
import socket
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from appliance import labels
from appliance.agent.status import read_status
from appliance.launcher.engine import NETWORK_OPTIONS, Engine, LauncherError
from appliance.launcher.spec import hardened_kwargs
from appliance.policy import Policy, PolicyError, load_locations, load_policy
from appliance.settings import Settings

PROBE = (Path(__file__).parent / "probe.py").read_text()
EPERM = 1


@dataclass(frozen=True)
class Check:
    name: str
    required: bool
    ok: bool
    found: str


def engine_checks(info: dict[str, Any], version: dict[str, Any], policy: Policy) -> list[Check]:
    options = " ".join(info.get("SecurityOptions") or [])
    runtimes = sorted(info.get("Runtimes") or {})
    needs_runsc = policy.hardening.runtime == "runsc"
    return [
        Check("engine", False, True,
              f"Docker {version.get('Version')} (API {version.get('ApiVersion')}), {info.get('Driver')} storage, "
              f"cgroup v{info.get('CgroupVersion', '?')}, kernel {info.get('KernelVersion')}"),
        Check("engine seccomp support", True, "name=seccomp" in options, options or "no security options reported"),
        Check("AppArmor", False, "name=apparmor" in options,
              "enabled" if "name=apparmor" in options
              else "not available on this host (seccomp, caps and NNP still apply)"),
        Check("user namespace remap", False, "name=userns" in options,
              "enabled" if "name=userns" in options else "off: container uid 10001 is host uid 10001 (non-root)"),
        Check("rootless engine", False, "name=rootless" in options, "yes" if "name=rootless" in options else "no"),
        Check("gVisor runtime (runsc)", needs_runsc, "runsc" in runtimes, f"runtimes: {', '.join(runtimes)}"),
    ]


def probe_checks(found: dict[str, Any], policy: Policy) -> list[Check]:
    limits = policy.hardening.limits
    memory = str(found.get("memory_limit"))
    return [
        Check("seccomp filter active", True, found.get("seccomp_mode") == "2",
              f"Seccomp mode {found.get('seccomp_mode')}"),
        Check("airlock seccomp profile (keyctl, unshare, io_uring refused)", True,
              found.get("keyctl_errno") == EPERM and found.get("unshare_user_errno") == EPERM
              and found.get("io_uring_errno") == EPERM,
              f"errno keyctl={found.get('keyctl_errno')} unshare={found.get('unshare_user_errno')} "
              f"io_uring={found.get('io_uring_errno')} (1 = EPERM)"),
        Check("no 32-bit syscall ABI (socketcall would hide socket families)", True,
              found.get("i386_abi") in ("refused", "n/a"), f"int 0x80 from the probe: {found.get('i386_abi')}"),
        Check("no-new-privileges", True, found.get("no_new_privs") == "1", f"NoNewPrivs {found.get('no_new_privs')}"),
        Check("all capabilities dropped", True, int(str(found.get("cap_eff") or "1"), 16) == 0
              and int(str(found.get("cap_bnd") or "1"), 16) == 0,
              f"CapEff {found.get('cap_eff')} CapBnd {found.get('cap_bnd')}"),
        Check("non-root user", True, found.get("uid") not in (None, 0), f"uid {found.get('uid')}"),
        Check("read-only root filesystem", True, found.get("root_writable") is False,
              "write to / refused" if found.get("root_writable") is False else "root is writable"),
        Check("memory limit (cgroup)", True, memory.isdigit() and int(memory) == limits.memory,
              f"{memory} (policy {limits.memory})"),
        Check("pids limit (cgroup)", True, str(found.get("pids_limit")) == str(limits.pids),
              f"{found.get('pids_limit')} (policy {limits.pids})"),
        Check("host unreachable from the location network", True, found.get("gateway_reachable") is False,
              f"gateway {found.get('gateway')}: {found.get('gateway_result')}"),
        Check("AppArmor confinement of the probe", False, bool(found.get("apparmor"))
              and found.get("apparmor") != "unconfined", str(found.get("apparmor"))),
    ]


def exit_code(checks: list[Check]) -> int:
    """1 when any protection the policy asks for is not enforced."""
    return 1 if any(c.required and not c.ok for c in checks) else 0


def run_probe(engine: Engine, policy: Policy, image: str, appliance_id: str) -> dict[str, Any]:
    """Start a probe exactly as user code is started (hardened spec, internal network) and read its report."""
    suffix = uuid.uuid4().hex[:8]
    network = engine.client.networks.create(
        f"airlock-{appliance_id}-doctor-{suffix}", driver="bridge", internal=True, options=NETWORK_OPTIONS,
        # role "probe", not "network": the agent removes location networks it does not expect.
        labels={labels.MANAGED: "true", labels.ROLE: labels.ROLE_PROBE, labels.APPLIANCE_ID: appliance_id},
    )
    container = None
    try:
        container = engine.client.containers.create(
            image=engine.resolve_image(image),
            command=["python3", "-c", PROBE],
            name=f"airlock-{appliance_id}-probe-{suffix}",
            network=network.name,
            labels={labels.MANAGED: "true", labels.ROLE: labels.ROLE_PROBE, labels.APPLIANCE_ID: appliance_id},
            **hardened_kwargs(policy, policy.hardening.limits, policy.hardening.runtime),
        )
        container.start()
        container.wait(timeout=120)
        output = container.logs(stdout=True, stderr=False).decode().strip().splitlines()
        return json.loads(output[-1])
    finally:
        if container is not None:
            container.remove(force=True)
        network.remove()


def sockguard_check(engine: Engine) -> Check:
    """sockguard must refuse a privileged container create, naming the rule, before Docker sees it."""
    try:
        engine.client.api.create_container("airlock/none", host_config={"Privileged": True},
                                           labels={labels.MANAGED: "true"})
    except docker.errors.APIError as exc:
        refused = exc.status_code == 403 and "sockguard" in str(exc.explanation)
        return Check("sockguard refuses an unhardened create", True, refused, str(exc.explanation)[:120])
    return Check("sockguard refuses an unhardened create", True, False, "a privileged create was accepted")


def egress_check(port: int) -> Check:
    """The proxy must answer, and refuse a request from a source that is no location's."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"CONNECT doctor.invalid:443 HTTP/1.1\r\nHost: doctor.invalid:443\r\n\r\n")
            reply = s.recv(256).decode(errors="replace")
    except OSError as exc:
        return Check("egress proxy refuses unknown sources", True, False, f"not reachable: {exc}")
    first = reply.splitlines()[0] if reply else "(no answer)"
    return Check("egress proxy refuses unknown sources", True, " 403 " in first + " ", first)


def _served_image(settings: Settings) -> str | None:
    """Connected to a control plane, locations.yaml is empty: probe with the image of a location being served."""
    status = read_status(settings.state_dir)
    return next((loc.image for loc in (status.locations.values() if status else ()) if loc.image), None)


def run_doctor(settings: Settings, *, probe_image: str | None, as_json: bool) -> int:
    try:
        policy = load_policy(settings.policy_dir)
        locations = load_locations(settings.locations_file, policy) if Path(settings.locations_file).exists() else ()
    except PolicyError as exc:
        print(f"airlock doctor: {exc}", file=sys.stderr)
        return 2
    engine = Engine.connect(settings.docker_host, settings.appliance_id)
    checks: list[Check] = []
    try:
        checks += engine_checks(engine.client.info(), engine.client.version(), policy)
    except docker.errors.DockerException as exc:
        checks.append(Check("Docker through sockguard", True, False, str(exc)))
    checks.append(sockguard_check(engine))
    checks.append(egress_check(policy.egress.port))
    image = probe_image or (locations[0].image if locations else None) or _served_image(settings)
    if image is None:
        checks.append(Check("probe container", True, False, "no image: pass --probe-image or configure a location"))
    else:
        try:
            checks += probe_checks(run_probe(engine, policy, image, settings.appliance_id), policy)
        except (docker.errors.DockerException, LauncherError, ValueError, IndexError) as exc:
            checks.append(Check("probe container", True, False, f"{type(exc).__name__}: {exc}"))
    failed = [c for c in checks if c.required and not c.ok]
    if as_json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "info")
            print(f"[{mark}] {c.name:58} {c.found}")
        print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed; "
              + ("every protection the policy asks for is enforced" if not failed
                 else f"{len(failed)} required protection(s) NOT enforced"))
    return exit_code(checks)
