"""CIS Docker Benchmark (v1.6) section 5 container checks, judged from `docker inspect` and `docker info`.

Returns {"5.x name": "PASS ..." | "FAIL ..." | "N/A ..."}. Checks that concern the host or the
operator's habits rather than a container's configuration are reported N/A with the reason.
"""

from __future__ import annotations

from typing import Any

SENSITIVE = ("/", "/boot", "/dev", "/etc", "/lib", "/proc", "/sys", "/usr", "/var/run/docker.sock")


def _verdict(ok: bool, detail: str) -> str:
    return f"{'PASS' if ok else 'FAIL'} {detail}"


def cis_container_checks(attrs: dict[str, Any], info: dict[str, Any]) -> dict[str, str]:
    hc = attrs["HostConfig"]
    cfg = attrs["Config"]
    sec = hc.get("SecurityOpt") or []
    options = " ".join(info.get("SecurityOptions") or [])
    mounts = attrs.get("Mounts") or []
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    ports = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    restart = hc.get("RestartPolicy") or {}
    r: dict[str, str] = {}
    if "name=apparmor" in options:
        r["5.1 AppArmor profile"] = _verdict(
            attrs.get("AppArmorProfile") not in ("", "unconfined"), attrs.get("AppArmorProfile", "")
        )
    else:
        r["5.1 AppArmor profile"] = "N/A AppArmor is not available on this host"
    r["5.2 SELinux options"] = (
        "N/A SELinux is not enabled"
        if "name=selinux" not in options
        else _verdict(any(s.startswith("label") for s in sec), str(sec))
    )
    r["5.3 Linux kernel capabilities restricted"] = _verdict(
        (hc.get("CapDrop") or []) == ["ALL"] and not hc.get("CapAdd"),
        f"CapDrop={hc.get('CapDrop')} CapAdd={hc.get('CapAdd')}",
    )
    r["5.4 privileged containers not used"] = _verdict(
        hc.get("Privileged") is False, f"Privileged={hc.get('Privileged')}"
    )
    sensitive = [m["Source"] for m in mounts if m.get("Type") == "bind" and m.get("Source") in SENSITIVE]
    r["5.5 sensitive host directories not mounted"] = _verdict(not sensitive and not hc.get("Binds"), str(sensitive))
    r["5.6 sshd not run"] = _verdict("sshd" not in " ".join(cfg.get("Cmd") or []), " ".join(cfg.get("Cmd") or []))
    published = {k: v for k, v in ports.items() if v}
    r["5.7 privileged ports not mapped"] = _verdict(not published, str(published))
    r["5.8 only needed ports open"] = _verdict(not published and not hc.get("PublishAllPorts"), "nothing published")
    r["5.9 host network namespace not shared"] = _verdict(hc.get("NetworkMode") != "host", hc.get("NetworkMode", ""))
    r["5.10 memory usage limited"] = _verdict((hc.get("Memory") or 0) > 0, f"Memory={hc.get('Memory')}")
    r["5.11 CPU priority set"] = _verdict(
        (hc.get("NanoCpus") or 0) > 0 or (hc.get("CpuShares") or 0) > 0, f"NanoCpus={hc.get('NanoCpus')}"
    )
    r["5.12 root filesystem read-only"] = _verdict(
        hc.get("ReadonlyRootfs") is True, f"ReadonlyRootfs={hc.get('ReadonlyRootfs')}"
    )
    r["5.13 incoming traffic bound to a host interface"] = _verdict(not published, "no published ports")
    r["5.14 restart policy on-failure:5"] = _verdict(
        restart.get("Name") == "on-failure" and restart.get("MaximumRetryCount") == 5, str(restart)
    )
    r["5.15 host process namespace not shared"] = _verdict(
        hc.get("PidMode") in ("", None), f"PidMode={hc.get('PidMode')!r}"
    )
    r["5.16 host IPC namespace not shared"] = _verdict(
        hc.get("IpcMode") != "host" and not str(hc.get("IpcMode")).startswith("container:"),
        f"IpcMode={hc.get('IpcMode')}",
    )
    r["5.17 host devices not exposed"] = _verdict(not hc.get("Devices"), str(hc.get("Devices")))
    r["5.18 default ulimit overridden only if needed"] = _verdict(not hc.get("Ulimits"), str(hc.get("Ulimits")))
    r["5.19 mount propagation not shared"] = _verdict(
        not [m for m in mounts if m.get("Propagation") in ("shared", "rshared")], "no shared propagation"
    )
    r["5.20 host UTS namespace not shared"] = _verdict(hc.get("UTSMode") != "host", f"UTSMode={hc.get('UTSMode')!r}")
    seccomp = [s for s in sec if s.startswith("seccomp")]
    r["5.21 default seccomp profile not disabled"] = _verdict(
        bool(seccomp) and not any("unconfined" in s for s in seccomp), "airlock profile set" if seccomp else "none"
    )
    r["5.22 docker exec with privileged"] = "N/A operator practice; sockguard refuses exec entirely"
    r["5.23 docker exec with user=root"] = "N/A operator practice; sockguard refuses exec entirely"
    r["5.24 cgroup usage confirmed"] = _verdict(not hc.get("CgroupParent"), f"CgroupParent={hc.get('CgroupParent')!r}")
    r["5.25 no additional privileges"] = _verdict(
        any(s.startswith("no-new-privileges") for s in sec), str([s for s in sec if not s.startswith("seccomp")])
    )
    r["5.26 container health checked at runtime"] = _verdict(
        bool((cfg.get("Healthcheck") or {}).get("Test")), str((cfg.get("Healthcheck") or {}).get("Test"))
    )
    r["5.27 images always the latest"] = "N/A images are pinned by id on purpose (content-addressed)"
    r["5.28 PIDs cgroup limit"] = _verdict((hc.get("PidsLimit") or 0) > 0, f"PidsLimit={hc.get('PidsLimit')}")
    r["5.29 default bridge not used"] = _verdict(
        "bridge" not in networks and hc.get("NetworkMode") != "default", ", ".join(networks)
    )
    r["5.30 host user namespace not shared"] = _verdict(
        hc.get("UsernsMode") != "host", f"UsernsMode={hc.get('UsernsMode')!r}"
    )
    r["5.31 Docker socket not mounted"] = _verdict(
        not [m for m in mounts if "docker.sock" in str(m.get("Source"))], "no socket mount"
    )
    user = cfg.get("User") or ""
    r["4.1 (image) container runs as non-root"] = _verdict(
        user not in ("", "0", "root") and not user.startswith("0:"), f"User={user!r}"
    )
    return r
