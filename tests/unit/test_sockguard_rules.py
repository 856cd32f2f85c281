"""sockguard's decisions, with fake engine look-ups: a hardened create passes, every single weakening fails."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import pytest

from appliance import artifacts
from appliance.labels import (
    APPLIANCE_ID,
    LOCATION,
    MANAGED,
    ROLE,
    ROLE_ARTIFACTS,
    ROLE_ARTIFACTS_LAYER,
    ROLE_ARTIFACTS_PREP,
)
from appliance.policy import Policy, PolicyError, load_policy
from appliance.sockguard import Decision, Found, ImageInfo, Table, load_table, rules
from appliance.sockguard.inspect import Refusal, read_body
from protocol.locations import ARTIFACTS_DIR

REPO_POLICY = Path(__file__).resolve().parents[2] / "policy"
MINE, FOREIGN, APPLIANCE = "a" * 64, "b" * 64, "c" * 64
NET, OPEN_NET, FOREIGN_NET = "d" * 64, "e" * 64, "f" * 64
DEL = object()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Policy, Table]:
    return load_policy(REPO_POLICY), load_table(REPO_POLICY, rules.CHECKS)


def vol_labels(location: str, role: str) -> dict[str, str]:
    return {MANAGED: "true", ROLE: role, LOCATION: location, APPLIANCE_ID: "app1"}


def artifact_volumes(location: str) -> dict[str, Found]:
    """A location's artifact overlay and its layers, as the engine reports them after the launcher made them."""
    name = artifacts.volume_name("app1", location)
    layers = {layer: Found(artifacts.layer_name(name, layer), vol_labels(location, ROLE_ARTIFACTS_LAYER),
                           driver="local", mountpoint=f"/var/lib/docker/volumes/{name}-{layer}/_data")
              for layer in artifacts.LAYERS}
    overlay = Found(name, vol_labels(location, ROLE_ARTIFACTS), driver="local",
                    options=artifacts.overlay_options({k: v.mountpoint for k, v in layers.items()}),
                    mountpoint=f"/var/lib/docker/volumes/{name}/_data")
    return {name: overlay} | {v.id: v for v in layers.values()}


class FakeLookups:
    """The engine as sockguard sees it: a few containers, networks and images, by id or name."""

    def __init__(self) -> None:
        self.containers = {
            "mine": Found(MINE, {MANAGED: "true", ROLE: "code-server"}),
            "foreign": Found(FOREIGN, {"com.example": "x"}),
            "appliance": Found(APPLIANCE, {ROLE: "appliance"}),
        }
        self.networks = {
            "airlock-net": Found(NET, {MANAGED: "true"}, internal=True),
            "open-net": Found(OPEN_NET, {MANAGED: "true"}, internal=False),
            "foreign-net": Found(FOREIGN_NET, {}, internal=True),
        }
        self.volumes = artifact_volumes("demo") | artifact_volumes("other") | {
            "foreign-vol": Found("foreign-vol", {}, driver="local", mountpoint="/var/lib/docker/volumes/f/_data"),
            # the right name and labels, but a plain volume (exec): a stand-in nobody made through sockguard
            "airlock-app1-plain-artifacts": Found("airlock-app1-plain-artifacts", vol_labels("plain", ROLE_ARTIFACTS),
                                                  driver="local", mountpoint="/var/lib/docker/volumes/p/_data")}
        tag = "airlock/example-location:latest"
        self.images = {
            tag: ImageInfo("sha256:" + "1" * 64, (tag,), ()),
            "evil/image:latest": ImageInfo("sha256:" + "2" * 64, ("evil/image:latest",), ()),
        }

    async def container(self, ident: str) -> Found | None:
        return self.containers.get(ident)

    async def network(self, ident: str) -> Found | None:
        return self.networks.get(ident)

    async def image(self, ref: str) -> ImageInfo | None:
        return self.images.get(ref)

    async def volume(self, name: str) -> Found | None:
        return self.volumes.get(name)


def good_create(policy: Policy) -> dict[str, Any]:
    """What the launcher sends for a code server: every hardening field set, all within bounds."""
    limits = policy.hardening.limits
    return {
        "Image": "airlock/example-location:latest",
        "User": "10001:10001",
        "Cmd": ["dagster", "api", "grpc", "--port", "4000"],
        "Env": ["DAGSTER_HOME=/home/dagster"],
        "Labels": {MANAGED: "true", ROLE: "code-server", LOCATION: "demo"},
        "HostConfig": {
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges", f"seccomp={policy.hardening.seccomp_profile}"],
            "ReadonlyRootfs": True,
            "Memory": limits.memory,
            "MemorySwap": limits.memory,
            "NanoCpus": limits.nano_cpus,
            "PidsLimit": limits.pids,
            "Init": True,
            "NetworkMode": "airlock-net",
            "Tmpfs": dict(policy.hardening.tmpfs),
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}},
            "Runtime": "runc",
            "RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 5},
        },
        "NetworkingConfig": {"EndpointsConfig": {"airlock-net": {"Aliases": ["demo"]}}},
    }


def mutate(body: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(body)
    for dotted, value in changes.items():
        *parents, key = dotted.split(".", 1) if dotted.startswith("HostConfig.") else [dotted]
        target = body[parents[0]] if parents else body
        if value is DEL:
            target.pop(key, None)
        else:
            target[key] = value
    return body


def decide(setup: tuple[Policy, Table], method: str, target: str | bytes, body: Any = b"", **kw: Any) -> Decision:
    policy, table = setup
    raw = target.encode() if isinstance(target, str) else target
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    lookups = kw.pop("lookups", FakeLookups())
    return asyncio.run(rules.decide(method, raw, data, table=table, policy=kw.pop("policy", policy), lookups=lookups))


def create(setup: tuple[Policy, Table], body: Any) -> Decision:
    return decide(setup, "POST", "/v1.41/containers/create?name=airlock-demo", body)


def test_hardened_create_is_allowed(setup: tuple[Policy, Table]) -> None:
    decision = create(setup, good_create(setup[0]))
    assert decision.allow, decision
    assert decision.rule == "container-create"
    assert decision.target == b"/v1.41/containers/create?name=airlock-demo"


NNP = "no-new-privileges"
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("privileged", {"HostConfig.Privileged": True}, "privileged"),
    ("privileged-lowercase-key", {"HostConfig.privileged": True}, "privileged"),
    ("privileged-wrong-type", {"HostConfig.Privileged": "true"}, "body"),
    ("case-duplicate-key", {"HostConfig.readonlyRootfs": False}, "body"),
    ("non-ascii-key", {"HostConfig.\u017fecurityOpt": []}, "body"),  # Go would fold the long s onto 'S'

    ("hostconfig-at-top-level", {"Privileged": True}, "unknown-field"),
    ("unknown-hostconfig-field", {"HostConfig.Annotations": {"a": "b"}}, "unknown-field"),
    ("cap-add", {"HostConfig.CapAdd": ["SYS_ADMIN"]}, "cap-add"),
    ("capabilities", {"HostConfig.Capabilities": ["CAP_SYS_ADMIN"]}, "cap-add"),
    ("cap-drop-missing", {"HostConfig.CapDrop": DEL}, "cap-drop"),
    ("cap-drop-partial", {"HostConfig.CapDrop": ["NET_RAW"]}, "cap-drop"),
    ("network-host", {"HostConfig.NetworkMode": "host", "NetworkingConfig": DEL}, "network-mode"),
    ("network-bridge", {"HostConfig.NetworkMode": "bridge", "NetworkingConfig": DEL}, "network-mode"),
    ("network-default", {"HostConfig.NetworkMode": DEL, "NetworkingConfig": DEL}, "network-mode"),
    ("network-container", {"HostConfig.NetworkMode": "container:mine", "NetworkingConfig": DEL}, "network-mode"),
    ("network-foreign", {"HostConfig.NetworkMode": "foreign-net", "NetworkingConfig": DEL}, "network-mode"),
    ("network-not-internal", {"HostConfig.NetworkMode": "open-net", "NetworkingConfig": DEL}, "network-mode"),
    ("endpoint-foreign", {"NetworkingConfig": {"EndpointsConfig": {"foreign-net": {}}}}, "network-mode"),
    ("pid-host", {"HostConfig.PidMode": "host"}, "pid-mode"),
    ("pid-container", {"HostConfig.PidMode": "container:mine"}, "pid-mode"),
    ("ipc-host", {"HostConfig.IpcMode": "host"}, "ipc-mode"),
    ("uts-host", {"HostConfig.UTSMode": "host"}, "uts-mode"),
    ("userns-host", {"HostConfig.UsernsMode": "host"}, "userns-mode"),
    ("cgroupns-host", {"HostConfig.CgroupnsMode": "host"}, "cgroupns-mode"),
    ("cgroup-parent", {"HostConfig.CgroupParent": "/"}, "cgroup-parent"),
    ("devices", {"HostConfig.Devices": [{"PathOnHost": "/dev/mem", "PathInContainer": "/dev/mem"}]}, "devices"),
    ("device-requests", {"HostConfig.DeviceRequests": [{"Driver": "nvidia", "Count": -1}]}, "devices"),
    ("device-cgroup-rules", {"HostConfig.DeviceCgroupRules": ["c 1:1 rwm"]}, "devices"),
    ("binds", {"HostConfig.Binds": ["/:/host"]}, "binds"),
    ("mount-bind", {"HostConfig.Mounts": [{"Type": "bind", "Source": "/", "Target": "/host"}]}, "binds"),
    ("mount-volume", {"HostConfig.Mounts": [{"Type": "volume", "Source": "v", "Target": "/v"}]}, "mounts"),
    ("volumes-from", {"HostConfig.VolumesFrom": ["foreign"]}, "binds"),
    ("config-volumes", {"Volumes": {"/data": {}}}, "binds"),
    ("port-bindings", {"HostConfig.PortBindings": {"4000/tcp": [{"HostPort": "4000"}]}}, "ports"),
    ("publish-all", {"HostConfig.PublishAllPorts": True}, "ports"),
    ("links", {"HostConfig.Links": ["foreign:db"]}, "links"),
    ("seccomp-missing", {"HostConfig.SecurityOpt": [NNP]}, "seccomp"),
    ("seccomp-unconfined", {"HostConfig.SecurityOpt": [NNP, "seccomp=unconfined"]}, "seccomp"),
    ("seccomp-other", {"HostConfig.SecurityOpt": [NNP, 'seccomp={"defaultAction":"SCMP_ACT_ALLOW"}']}, "seccomp"),
    ("seccomp-twice", {"HostConfig.SecurityOpt": "GOOD+seccomp=unconfined"}, "security-opt"),
    ("security-opt-unknown", {"HostConfig.SecurityOpt": "GOOD+systempaths=unconfined"}, "security-opt"),
    ("apparmor-unconfined", {"HostConfig.SecurityOpt": "GOOD+apparmor=unconfined"}, "apparmor"),
    ("label-disable", {"HostConfig.SecurityOpt": "GOOD+label=disable"}, "label-disable"),
    ("label-colon-disable", {"HostConfig.SecurityOpt": "GOOD+label:disable"}, "label-disable"),
    ("no-new-privileges-missing", {"HostConfig.SecurityOpt": "SECCOMP"}, "no-new-privileges"),
    ("no-new-privileges-false", {"HostConfig.SecurityOpt": "SECCOMP+no-new-privileges=false"}, "no-new-privileges"),
    ("masked-paths-empty", {"HostConfig.MaskedPaths": []}, "masked-paths"),
    ("readonly-paths-empty", {"HostConfig.ReadonlyPaths": []}, "masked-paths"),
    ("sysctls", {"HostConfig.Sysctls": {"net.ipv4.ip_forward": "1"}}, "sysctls"),
    ("writable-rootfs", {"HostConfig.ReadonlyRootfs": False}, "readonly-rootfs"),
    ("readonly-rootfs-missing", {"HostConfig.ReadonlyRootfs": DEL}, "readonly-rootfs"),
    ("user-missing", {"User": DEL}, "user"),
    ("user-root", {"User": "root"}, "user"),
    ("user-zero", {"User": "0"}, "user"),
    ("user-root-group", {"User": "10001:0"}, "user"),
    ("group-add-root", {"HostConfig.GroupAdd": ["0"]}, "group-add"),
    ("memory-missing", {"HostConfig.Memory": DEL, "HostConfig.MemorySwap": DEL}, "memory"),
    ("memory-over-bound", {"HostConfig.Memory": "MAXMEM+1", "HostConfig.MemorySwap": "MAXMEM+1"}, "memory"),
    ("memory-float", {"HostConfig.Memory": 1.5e9}, "body"),
    ("swap-unlimited", {"HostConfig.MemorySwap": -1}, "memory"),
    ("swap-default", {"HostConfig.MemorySwap": DEL}, "memory"),
    ("pids-missing", {"HostConfig.PidsLimit": DEL}, "pids"),
    ("pids-unlimited", {"HostConfig.PidsLimit": -1}, "pids"),
    ("pids-over-bound", {"HostConfig.PidsLimit": "MAXPIDS+1"}, "pids"),
    ("cpus-missing", {"HostConfig.NanoCpus": DEL}, "cpus"),
    ("cpus-over-bound", {"HostConfig.NanoCpus": "MAXCPU+1"}, "cpus"),
    ("cpu-quota", {"HostConfig.CpuQuota": 400000}, "cpus"),
    ("oom-kill-disable", {"HostConfig.OomKillDisable": True}, "oom-kill-disable"),
    ("oom-score-adj", {"HostConfig.OomScoreAdj": -1000}, "oom-score-adj"),
    ("runtime", {"HostConfig.Runtime": "nvidia"}, "runtime"),
    ("log-driver-syslog", {"HostConfig.LogConfig": {"Type": "syslog", "Config": {"syslog-address": "udp://1.2.3.4:514"}}},
     "log-driver"),
    ("tmpfs-exec", {"HostConfig.Tmpfs": {"/tmp": "rw,exec"}}, "tmpfs"),
    ("image-not-allowed", {"Image": "evil/image:latest"}, "image"),
    ("image-missing", {"Image": "nope:latest"}, "image"),
    ("labels-missing", {"Labels": DEL}, "labels"),
    ("labels-not-true", {"Labels": {MANAGED: "yes"}}, "labels"),
    ("labels-claim-appliance", {"Labels": {MANAGED: "true", ROLE: "appliance"}}, "labels"),
    ("init-missing", {"HostConfig.Init": DEL}, "init"),
    ("init-false", {"HostConfig.Init": False}, "init"),
]


def _resolve(policy: Policy, changes: dict[str, Any]) -> dict[str, Any]:
    """Placeholders that depend on the policy (bounds, the profile) in the table above."""
    seccomp, bounds = f"seccomp={policy.hardening.seccomp_profile}", policy.bounds
    values = {"MAXMEM+1": bounds.memory_max + 1, "MAXPIDS+1": bounds.pids_max + 1,
              "MAXCPU+1": int(bounds.cpus_max * 1e9) + 1}
    out = {}
    for key, value in changes.items():
        if isinstance(value, str) and value.startswith(("GOOD+", "SECCOMP")):
            head, _, extra = value.partition("+")
            value = ([NNP, seccomp] if head == "GOOD" else [seccomp]) + ([extra] if extra else [])
        out[key] = values.get(value, value) if isinstance(value, str) else value
    return out


@pytest.mark.parametrize(("changes", "rule"), [pytest.param(c, r, id=i) for i, c, r in CASES])
def test_each_weakening_is_refused(setup: tuple[Policy, Table], changes: dict[str, Any], rule: str) -> None:
    body = mutate(good_create(setup[0]), _resolve(setup[0], changes))
    decision = create(setup, body)
    assert not decision.allow
    assert decision.rule == rule, decision.reason
    assert decision.status in (403, 404)


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        (b"not json", "body"),
        (b"[1, 2]", "body"),
        (b'{"Image": "x"} {"HostConfig": {}}', "body"),
        (b'{"Image": "x", "Image": "y"}', "body"),
        (b'{"Memory": NaN}', "body"),
        ("{}".encode("utf-16"), "body"),
    ],
)
def test_malformed_bodies_are_refused(setup: tuple[Policy, Table], body: bytes, rule: str) -> None:
    decision = create(setup, body)
    assert (decision.allow, decision.rule) == (False, rule)


def test_oversized_body_is_413() -> None:
    events = iter([h11.Data(data=b"x" * 600_000), h11.Data(data=b"x" * 600_000), h11.EndOfMessage()])

    async def next_event() -> Any:
        return next(events)

    with pytest.raises(Refusal) as caught:
        asyncio.run(read_body(next_event))
    assert (caught.value.rule, caught.value.status) == ("body-size", 413)


@pytest.mark.parametrize(
    ("method", "target", "allow", "rule"),
    [
        ("GET", "/_ping", True, "endpoint"),
        ("HEAD", "/v1.41/_ping", True, "endpoint"),
        ("GET", "/v1.41/version", True, "endpoint"),
        ("get", "/v1.41/_ping", False, "endpoint"),
        ("GET", "/v1.23/_ping", False, "api-version"),
        ("GET", "/v1/_ping", False, "endpoint"),
        ("GET", "/v1.41/containers/%2e%2e/json", False, "path"),
        ("GET", "/v1.41/containers/mine/%2e%2e/%2e%2e/info", False, "path"),
        ("GET", "/v1.41/containers/%252e%252e/json", False, "path"),
        ("GET", "/v1.41/containers/m%C3%A9/json", False, "path"),
        ("GET", "/v1.41/containers/mine/json#x", False, "path"),
        ("GET", "http://docker/v1.41/_ping", False, "path"),
        ("GET", "/v1.41/volumes", True, "list-managed"),
        ("POST", "/v1.41/volumes/prune", False, "endpoint"),
        ("POST", "/v1.41/containers/mine/exec", False, "endpoint"),
        ("POST", "/v1.41/exec/123/start", False, "endpoint"),
        ("POST", "/v1.41/build", False, "endpoint"),
        ("POST", "/v1.41/commit?container=mine", False, "endpoint"),
        ("PUT", "/v1.41/containers/mine/archive?path=/", False, "endpoint"),
        ("GET", "/v1.41/containers/mine/archive?path=/", False, "endpoint"),
        ("POST", "/v1.41/containers/mine/update", False, "endpoint"),
        ("POST", "/v1.41/containers/mine/attach?stream=1", False, "endpoint"),
        ("POST", "/v1.41/system/prune", False, "endpoint"),
        ("GET", "/v1.41/events", False, "endpoint"),
        ("POST", "/v1.41/swarm/init", False, "endpoint"),
        ("GET", "/v1.41/containers/json/", False, "endpoint"),
    ],
)
def test_paths_are_normalized_then_matched(
    setup: tuple[Policy, Table], method: str, target: str, allow: bool, rule: str
) -> None:
    decision = decide(setup, method, target)
    assert (decision.allow, decision.rule) == (allow, rule), decision.reason


def test_forwarded_target_is_the_normalized_one(setup: tuple[Policy, Table]) -> None:
    decision = decide(setup, "GET", "//v1.41//containers/%6d%69%6e%65//json?size=1")
    assert decision.allow and decision.path == "/containers/mine/json"
    assert decision.target == f"/v1.41/containers/{MINE}/json?size=1".encode()  # rewritten to the checked id


def test_body_on_a_bodiless_endpoint_is_refused(setup: tuple[Policy, Table]) -> None:
    decision = decide(setup, "POST", "/v1.41/containers/mine/start", {"HostConfig": {"Privileged": True}})
    assert (decision.allow, decision.rule) == (False, "body")


def test_pull_follows_allow_pull(setup: tuple[Policy, Table]) -> None:
    policy = setup[0]
    pull = "/v1.41/images/create?fromImage=airlock/example-location&tag=latest"
    assert decide(setup, "POST", pull).rule == "pull"
    pulling = dataclasses.replace(policy, images=dataclasses.replace(policy.images, allow_pull=True))
    assert decide(setup, "POST", pull, policy=pulling).allow
    for refused in ("fromImage=evil/image&tag=latest", "fromSrc=-&repo=airlock/example-location", ""):
        decision = decide(setup, "POST", f"/v1.41/images/create?{refused}", policy=pulling)
        assert (decision.allow, decision.rule) == (False, "pull"), refused


DIGEST = "sha256:" + "ab" * 32


PULL_NAMES = ("127.0.0.1:5123/acme/*", "127.0.0.1:5999/acme/*")


def registry_policy(policy: Policy, tmp_path: Path, *, names: tuple[str, ...] = PULL_NAMES) -> Policy:
    creds = tmp_path / "registry-127.0.0.1_5123.json"
    creds.write_text(json.dumps({"username": "ci", "password": "s3cret-pass"}))
    images = dataclasses.replace(policy.images, names=(*policy.images.names, *names),
                                 registries={"127.0.0.1:5123": str(creds), "127.0.0.1:5999": None})
    return dataclasses.replace(policy, images=images)


def test_a_listed_registry_is_pulled_from_by_digest_with_sockguards_login(setup: tuple[Policy, Table],
                                                                         tmp_path: Path) -> None:
    import base64

    policy = registry_policy(setup[0], tmp_path)
    for query in (f"fromImage=127.0.0.1:5123/acme/etl&tag={DIGEST}", f"fromImage=127.0.0.1:5123/acme/etl@{DIGEST}"):
        decision = decide(setup, "POST", f"/v1.41/images/create?{query}", policy=policy)
        assert decision.allow, decision
        [(name, value)] = decision.headers
        assert name == b"x-registry-auth"
        assert json.loads(base64.urlsafe_b64decode(value)) == {"username": "ci", "password": "s3cret-pass",
                                                               "serveraddress": "127.0.0.1:5123"}
        assert "s3cret" not in json.dumps(decision.log_record("POST"))  # the login is never logged
    anonymous = decide(setup, "POST", f"/v1.41/images/create?fromImage=127.0.0.1:5999/acme/etl&tag={DIGEST}",
                       policy=policy)
    assert anonymous.allow and anonymous.headers == ()


@pytest.mark.parametrize(("query", "why"), [
    ("fromImage=127.0.0.1:5123/acme/etl&tag=1.4", "by digest only"),  # a tag can move
    ("fromImage=127.0.0.1:5123/acme/etl", "by digest only"),  # :latest, implicitly
    (f"fromImage=127.0.0.1:5123/other/etl&tag={DIGEST}", "not allowed by this appliance's image policy"),
    (f"fromImage=127.0.0.1:5124/acme/etl&tag={DIGEST}", "not a registry this appliance pulls from"),
    (f"fromImage=acme/etl&tag={DIGEST}", "docker.io is not a registry"),
])
def test_any_other_pull_is_refused_with_its_reason(setup: tuple[Policy, Table], tmp_path: Path, query: str,
                                                   why: str) -> None:
    decision = decide(setup, "POST", f"/v1.41/images/create?{query}", policy=registry_policy(setup[0], tmp_path))
    assert (decision.allow, decision.rule) == (False, "pull") and why in decision.reason, decision


def test_a_pulled_image_is_allowed_by_the_repository_of_its_repo_digest(setup: tuple[Policy, Table],
                                                                        tmp_path: Path) -> None:
    images = registry_policy(setup[0], tmp_path).images
    pulled = f"127.0.0.1:5123/acme/etl@{DIGEST}"
    assert images.decide("sha256:" + "cd" * 32, (), (pulled,))[0]  # pulled by digest: no tag at all
    assert not images.decide("sha256:" + "cd" * 32, (), (f"127.0.0.1:5123/other/etl@{DIGEST}",))[0]


@pytest.mark.parametrize(
    ("method", "action"),
    [("GET", "json"), ("GET", "logs?follow=1&stdout=1"), ("POST", "stop"), ("POST", "start"), ("POST", "kill"),
     ("POST", "restart"), ("POST", "wait"), ("DELETE", "")],
)
def test_container_scope(setup: tuple[Policy, Table], method: str, action: str) -> None:
    def target(name: str) -> str:
        return f"/v1.41/containers/{name}" + (f"/{action}" if action else "")

    mine = decide(setup, method, target("mine"))
    assert mine.allow and urlsplit(mine.target.decode()).path == urlsplit(target(MINE)).path
    assert (decide(setup, method, target("foreign")).rule, decide(setup, method, target("foreign")).status) == (
        "owner", 403)
    assert decide(setup, method, target("ghost")).status == 404
    appliance = decide(setup, method, target("appliance"))
    assert appliance.allow is (action == "json"), "only inspect may touch the appliance container"


def test_delete_link_is_refused(setup: tuple[Policy, Table]) -> None:
    assert decide(setup, "DELETE", "/v1.41/containers/mine?link=1").rule == "query"
    assert decide(setup, "DELETE", "/v1.41/containers/mine?force=1&v=1").allow
    assert decide(setup, "DELETE", "/v1.41/containers/mine?v=False&link=False&force=True").allow  # docker-py


def _forwarded_filters(decision: Decision) -> dict[str, Any]:
    query = parse_qs(urlsplit(decision.target.decode()).query)
    assert len(query["filters"]) == 1
    return json.loads(query["filters"][0])


@pytest.mark.parametrize("path", ["/v1.41/containers/json", "/v1.41/networks"])
def test_listings_get_the_label_filter(setup: tuple[Policy, Table], path: str) -> None:
    plain = decide(setup, "GET", f"{path}?all=1")
    assert plain.allow and _forwarded_filters(plain) == {"label": [f"{MANAGED}=true"]}
    mixed = decide(setup, "GET", f'{path}?filters={{"status":["running"],"label":["x=y"]}}')
    assert _forwarded_filters(mixed) == {"status": ["running"], "label": ["x=y", f"{MANAGED}=true"]}
    legacy = decide(setup, "GET", f'{path}?filters={{"label":{{"x=y":true}}}}')
    assert _forwarded_filters(legacy)["label"] == ["x=y", f"{MANAGED}=true"]
    assert decide(setup, "GET", f"{path}?filters=%7B%7D&filters=%7B%7D").rule == "query"
    assert decide(setup, "GET", f"{path}?filters=[1]").rule == "query"


def good_network() -> dict[str, Any]:
    return {"Name": "airlock-demo", "CheckDuplicate": True, "Driver": "bridge", "Internal": True,
            "Options": {"com.docker.network.bridge.inhibit_ipv4": "true"},
            "Labels": {MANAGED: "true", ROLE: "network"}}


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        ({}, None),
        ({"Internal": False}, "network-internal"),
        ({"Internal": DEL}, "network-internal"),
        ({"Labels": DEL}, "network-label"),
        ({"Labels": {MANAGED: "true", ROLE: "appliance"}}, "network-label"),
        ({"Driver": "macvlan"}, "network-driver"),
        ({"Options": {"com.docker.network.bridge.name": "docker0"}}, "network-options"),
        ({"Options": {"com.docker.network.bridge.enable_ip_masquerade": "true"}}, "network-options"),
        ({"Options": DEL}, "network-host-isolation"),
        ({"Options": {"com.docker.network.bridge.inhibit_ipv4": "false"}}, "network-options"),
        ({"Options": {"com.docker.network.driver.mtu": "1400"}}, "network-host-isolation"),
        ({"Options": {"com.docker.network.driver.mtu": "1400", "com.docker.network.bridge.inhibit_ipv4": "true"}},
         None),
        ({"IPAM": {"Driver": "default", "Config": [{"Subnet": "169.254.169.0/24"}]}}, "network-ipam"),
        ({"Ingress": True}, "network-scope"),
        ({"ConfigFrom": {"Network": "foreign-net"}}, "network-scope"),
        ({"Shared": True}, "unknown-field"),
    ],
)
def test_network_create(setup: tuple[Policy, Table], changes: dict[str, Any], rule: str | None) -> None:
    decision = decide(setup, "POST", "/v1.41/networks/create", mutate(good_network(), changes))
    assert decision.allow is (rule is None) and (rule is None or decision.rule == rule), decision


@pytest.mark.parametrize(
    ("network", "action", "container", "rule"),
    [
        ("airlock-net", "connect", "mine", None),
        ("airlock-net", "connect", "appliance", None),
        ("airlock-net", "disconnect", "appliance", None),
        ("airlock-net", "connect", "foreign", "owner"),
        ("foreign-net", "connect", "mine", "owner"),
        ("open-net", "connect", "mine", "network-internal"),
        ("airlock-net", "connect", "", "body"),
    ],
)
def test_network_attach(
    setup: tuple[Policy, Table], network: str, action: str, container: str, rule: str | None
) -> None:
    decision = decide(setup, "POST", f"/v1.41/networks/{network}/{action}", {"Container": container})
    assert decision.allow is (rule is None) and (rule is None or decision.rule == rule), decision
    if rule is None:
        assert decision.target == f"/v1.41/networks/{NET}/{action}".encode()


def test_network_scope(setup: tuple[Policy, Table]) -> None:
    assert decide(setup, "DELETE", "/v1.41/networks/airlock-net").allow
    assert decide(setup, "DELETE", "/v1.41/networks/foreign-net").rule == "owner"
    assert decide(setup, "GET", "/v1.41/networks/foreign-net").rule == "owner"


def test_image_inspect_is_open(setup: tuple[Policy, Table]) -> None:
    decision = decide(setup, "GET", "/v1.41/images/airlock/example-location:latest/json")
    assert decision.allow and decision.target == b"/v1.41/images/airlock/example-location:latest/json"


def test_shipped_policy_table_loads() -> None:
    table = load_table(REPO_POLICY, rules.CHECKS)
    assert {(e.method, e.path) for e in table.endpoints} >= {("POST", "/containers/create"), ("GET", "/_ping")}


def test_bad_table_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sockguard.yaml").write_text(
        'version: 1\nmin_api_version: "1.40"\nendpoints:\n  - {method: GET, path: /x, check: everything}\n'
    )
    with pytest.raises(PolicyError, match="unknown check"):
        load_table(tmp_path, rules.CHECKS)


# -- the location's artifact volume: the only volume a container may mount, the only volumes the agent may make ---
def artifact_mount(source: str = "airlock-app1-demo-artifacts", target: str = ARTIFACTS_DIR, **extra: Any) -> dict:
    return {"Type": "volume", "Source": source, "Target": target, "VolumeOptions": {"NoCopy": True}} | extra


def with_mount(setup: tuple[Policy, Table], mount: dict, role: str = "code-server") -> Decision:
    body = good_create(setup[0])
    body["Labels"] |= {APPLIANCE_ID: "app1", ROLE: role}
    body["HostConfig"]["Mounts"] = [mount]
    if role == ROLE_ARTIFACTS_PREP:
        body["HostConfig"]["Tmpfs"].pop("/tmp")
    return create(setup, body)


def test_the_locations_own_artifact_volume_mounts_at_its_place(setup: tuple[Policy, Table]) -> None:
    assert with_mount(setup, artifact_mount()).allow
    prep = artifact_mount(target="/tmp", VolumeOptions={"NoCopy": False})
    assert with_mount(setup, prep, role=ROLE_ARTIFACTS_PREP).allow


@pytest.mark.parametrize(("mount", "role", "rule"), [
    (artifact_mount("airlock-app1-other-artifacts"), "code-server", "mounts"),  # another location's files
    (artifact_mount("airlock-app1-demo-artifacts-upper"), "code-server", "mounts"),  # a layer: exec, unflagged
    (artifact_mount("foreign-vol"), "code-server", "mounts"),
    (artifact_mount("not-there"), "code-server", "mounts"),  # Docker would create it, plain, on the fly
    (artifact_mount(""), "code-server", "mounts"),  # an anonymous volume
    (artifact_mount("airlock-app1-plain-artifacts"), "code-server", "mounts"),  # right labels, not an overlay
    (artifact_mount(target="/usr/local/lib/python3.11"), "code-server", "mounts"),  # shadowing code
    (artifact_mount(VolumeOptions={"NoCopy": False}), "code-server", "mounts"),  # the image could re-own it
    (artifact_mount(target="/tmp", VolumeOptions={"NoCopy": True}), ROLE_ARTIFACTS_PREP, "mounts"),
    (artifact_mount(VolumeOptions={"NoCopy": True, "DriverConfig": {"Name": "local", "Options": {
        "type": "none", "o": "bind", "device": "/"}}}), "code-server", "unknown-field"),
    (artifact_mount(BindOptions={"Propagation": "rshared"}), "code-server", "unknown-field"),
])
def test_any_other_volume_mount_is_refused(setup: tuple[Policy, Table], mount: dict, role: str, rule: str) -> None:
    decision = with_mount(setup, mount, role=role)
    assert not decision.allow and decision.rule == rule, decision


def volume_create(setup: tuple[Policy, Table], body: dict) -> Decision:
    return decide(setup, "POST", "/v1.41/volumes/create", body)


def layer_body(layer: str = "upper", **changes: Any) -> dict:
    name = artifacts.layer_name("airlock-app1-new-artifacts", layer)
    labels = vol_labels("new", ROLE_ARTIFACTS_LAYER)
    return {"Name": name, "Driver": "local", "DriverOpts": {}, "Labels": labels} | changes


def overlay_body(location: str = "demo", **changes: Any) -> dict:
    name = artifacts.volume_name("app1", location)
    points = {layer: f"/var/lib/docker/volumes/{name}-{layer}/_data" for layer in artifacts.LAYERS}
    return {"Name": name, "Driver": "local", "DriverOpts": artifacts.overlay_options(points),
            "Labels": vol_labels(location, ROLE_ARTIFACTS)} | changes


def test_the_artifact_volume_and_its_layers_may_be_created(setup: tuple[Policy, Table]) -> None:
    for layer in artifacts.LAYERS:
        assert volume_create(setup, layer_body(layer)).allow
    assert volume_create(setup, overlay_body()).allow


@pytest.mark.parametrize(("body", "rule"), [
    (layer_body(DriverOpts={"type": "none", "o": "bind", "device": "/etc"}), "volume-shape"),  # the host's /etc
    (layer_body(Name="airlock-app1-new-artifacts-extra"), "volume-shape"),
    (layer_body(Driver="rexray"), "volume-driver"),
    (layer_body(Labels={MANAGED: "true", ROLE: ROLE_ARTIFACTS_LAYER}), "volume-label"),
    (layer_body(Labels=vol_labels("../x", ROLE_ARTIFACTS_LAYER)), "volume-label"),
    (layer_body(ClusterVolumeSpec={}), "unknown-field"),
    (overlay_body(DriverOpts={"type": "overlay", "device": "overlay",
                              "o": "lowerdir=/,upperdir=/tmp/u,workdir=/tmp/w,nosuid,nodev,noexec"}), "volume-shape"),
    (overlay_body(DriverOpts={**overlay_body()["DriverOpts"], "o": overlay_body()["DriverOpts"]["o"].replace(
        ",noexec", "")}), "volume-shape"),  # an overlay you could execute from
    (overlay_body(DriverOpts={**overlay_body()["DriverOpts"], "o": overlay_body()["DriverOpts"]["o"].replace(
        "demo-artifacts-upper", "other-artifacts-upper")}), "volume-shape"),  # another location's files
    (overlay_body("new"), "volume-shape"),  # its layers do not exist yet
    (overlay_body(Name="airlock-app1-demo-artifacts2"), "volume-shape"),
    (overlay_body(Labels=vol_labels("demo", "code-server")), "volume-shape"),
])
def test_every_other_volume_is_refused(setup: tuple[Policy, Table], body: dict, rule: str) -> None:
    decision = volume_create(setup, body)
    assert not decision.allow and decision.rule == rule, decision


def test_volumes_are_listed_narrowed_and_only_ours_removed(setup: tuple[Policy, Table]) -> None:
    listed = decide(setup, "GET", "/v1.41/volumes")
    assert listed.allow and b"airlock.managed%3Dtrue" in listed.target
    assert decide(setup, "DELETE", "/v1.41/volumes/airlock-app1-demo-artifacts").allow
    foreign = decide(setup, "DELETE", "/v1.41/volumes/foreign-vol")
    assert not foreign.allow and foreign.rule == "owner"
    assert decide(setup, "DELETE", "/v1.41/volumes/nope").status == 404
