"""Runs INSIDE the appliance as airlock-agent (a stand-in for a compromised agent): asks sockguard for
forbidden things and one allowed hardened create; prints one JSON line per attempt.

argv: JSON {"run": str, "image": str, "foreign_image": str, "network": str, "victim": str}
"""

import copy
import json
import os
import sys

import docker
import docker.errors

from appliance.launcher.spec import hardened_kwargs
from appliance.policy import load_policy
from protocol.locations import ARTIFACTS_DIR

args = json.loads(sys.argv[1])
client = docker.DockerClient(base_url=os.environ["AIRLOCK_DOCKER_HOST"], version="1.41")
api = client.api
policy = load_policy(os.environ["AIRLOCK_POLICY_DIR"])
hk = hardened_kwargs(policy, policy.hardening.limits, policy.hardening.runtime)
host_config = api.create_host_config(
    cap_drop=hk["cap_drop"], security_opt=hk["security_opt"], read_only=True, tmpfs=hk["tmpfs"],
    mem_limit=hk["mem_limit"], memswap_limit=hk["memswap_limit"], nano_cpus=hk["nano_cpus"],
    pids_limit=hk["pids_limit"], init=True, log_config=hk["log_config"], network_mode=args["network"],
    ipc_mode="private",
)
good = docker.types.ContainerConfig(
    api._version, args["image"], ["true"], user=hk["user"], host_config=host_config,
    labels={"airlock.managed": "true", "airlock.role": "probe", "airlock.appliance-id": args["run"],
            "airlock.attempt": args["run"]},
)


def hc(**changes):
    def apply(body):
        body["HostConfig"].update(changes)
    return apply


def top(**changes):
    def apply(body):
        body.update(changes)
    return apply


def secopt(*options):
    return hc(SecurityOpt=list(options))


seccomp = next(o for o in hk["security_opt"] if o.startswith("seccomp="))
CREATES = [
    ("privileged", hc(Privileged=True)),
    ("cap-add", hc(CapAdd=["SYS_ADMIN"])),
    ("cap-drop", hc(CapDrop=[])),
    ("network-mode", hc(NetworkMode="host")),
    ("pid-mode", hc(PidMode="host")),
    ("ipc-mode", hc(IpcMode="host")),
    ("uts-mode", hc(UTSMode="host")),
    ("userns-mode", hc(UsernsMode="host")),
    ("devices", hc(Devices=[{"PathOnHost": "/dev/mem", "PathInContainer": "/dev/mem",
                             "CgroupPermissions": "rwm"}])),
    ("binds", hc(Binds=["/:/host"])),
    ("binds", hc(Mounts=[{"Type": "bind", "Source": "/var/run/docker.sock", "Target": "/d.sock"}])),
    ("mounts", hc(Mounts=[{"Type": "volume", "Source": "airlock-state-x", "Target": "/state"}])),
    # the example location's artifact volume exists, but this container is not of that location
    ("mounts", hc(Mounts=[{"Type": "volume", "Source": f"airlock-{args['run']}-example-artifacts",
                           "Target": ARTIFACTS_DIR, "VolumeOptions": {"NoCopy": True}}])),
    ("ports", hc(PortBindings={"4000/tcp": [{"HostPort": "4000"}]})),
    ("ports", hc(PublishAllPorts=True)),
    ("seccomp", secopt("no-new-privileges:true")),
    ("seccomp", secopt("no-new-privileges:true", "seccomp=unconfined")),
    ("seccomp", secopt("no-new-privileges:true", 'seccomp={"defaultAction":"SCMP_ACT_ALLOW"}')),
    ("apparmor", secopt("no-new-privileges:true", seccomp, "apparmor=unconfined")),
    ("no-new-privileges", secopt(seccomp)),
    ("readonly-rootfs", hc(ReadonlyRootfs=False)),
    ("user", top(User="0")),
    ("user", top(User="")),
    ("memory", hc(Memory=0)),
    ("memory", hc(Memory=64 * 1024**3, MemorySwap=64 * 1024**3)),
    ("pids", hc(PidsLimit=0)),
    ("pids", hc(PidsLimit=-1)),
    ("masked-paths", hc(MaskedPaths=[])),
    ("sysctls", hc(Sysctls={"net.ipv4.ip_unprivileged_port_start": "0"})),
    ("cgroup-parent", hc(CgroupParent="/")),
    ("oom-kill-disable", hc(OomKillDisable=True)),
    ("runtime", hc(Runtime="io.containerd.runc.v2")),
    ("init", hc(Init=False)),
    ("labels", top(Labels={"airlock.attempt": args["run"]})),
    ("image", top(Image=args["foreign_image"])),
    ("unknown-field", top(privileged=True)),
]


def attempt(name, call):
    try:
        result = call()
        print(json.dumps({"attempt": name, "status": 200, "result": str(result)[:200]}))
    except docker.errors.APIError as exc:
        print(json.dumps({"attempt": name, "status": exc.status_code, "message": str(exc.explanation)}))


for i, (rule, mutate) in enumerate(CREATES):
    body = copy.deepcopy(good)
    mutate(body)
    attempt(f"create:{rule}", lambda b=body, i=i: api._result(api._post_json(
        api._url("/containers/create"), data=b, params={"name": f"airlock-{args['run']}-attempt-{i}"}), True))

victim = args["victim"]
attempt("foreign:inspect", lambda: api.inspect_container(victim))
attempt("foreign:stop", lambda: api.stop(victim, timeout=1))
attempt("foreign:kill", lambda: api.kill(victim))
attempt("foreign:logs", lambda: api.logs(victim))
attempt("foreign:remove", lambda: api.remove_container(victim, force=True))
attempt("foreign:exec", lambda: api.exec_create(victim, ["id"]))
attempt("foreign:archive", lambda: api.put_archive(victim, "/tmp", b""))
attempt("build", lambda: api._result(api._post(api._url("/build"), data=b""), False))
attempt("pull", lambda: api.pull("airlock/example-location", tag="latest"))
attempt("volume-create", lambda: api.create_volume("airlock-attempt", labels={"airlock.managed": "true"}))
evil = f"airlock-{args['run']}-evil-artifacts"
evil_labels = {"airlock.managed": "true", "airlock.role": "artifacts-layer", "airlock.location": "evil",
               "airlock.appliance-id": args["run"]}
attempt("volume-host-path", lambda: api.create_volume(f"{evil}-upper", driver="local", labels=evil_labels,
                                                      driver_opts={"type": "none", "o": "bind", "device": "/"}))
attempt("volume-exec-overlay", lambda: api.create_volume(evil, driver="local", labels=evil_labels | {
    "airlock.role": "artifacts"}, driver_opts={"type": "overlay", "device": "overlay",
                                               "o": "lowerdir=/etc,upperdir=/tmp/u,workdir=/tmp/w"}))
attempt("network-not-internal", lambda: api.create_network(f"airlock-{args['run']}-open", driver="bridge",
                                                          labels={"airlock.managed": "true"}))
attempt("container-list-unfiltered", lambda: [c["Id"] for c in api.containers(all=True) if c["Id"] == victim])

def run_and_remove(body, suffix):
    """Create, start, wait for and remove a container from exactly this body; its exit status."""
    created = api._result(api._post_json(api._url("/containers/create"), data=body,
                                         params={"name": f"airlock-{args['run']}-attempt-{suffix}"}), True)
    api.start(created["Id"])
    status = api.wait(created["Id"], timeout=60)["StatusCode"]
    api.remove_container(created["Id"], force=True)
    return f"exit {status}"


# The allowed twin: exactly the hardened spec, created, started, waited for and removed.
attempt("allowed:hardened-create", lambda: run_and_remove(good, "ok"))


def allowed_artifacts():
    """The twin of the refused mount: the same container, of the example location, mounts its volume."""
    body = copy.deepcopy(good)
    body["Labels"]["airlock.location"] = "example"
    body["HostConfig"]["Mounts"] = [{"Type": "volume", "Source": f"airlock-{args['run']}-example-artifacts",
                                     "Target": ARTIFACTS_DIR, "VolumeOptions": {"NoCopy": True}}]
    body["Cmd"] = ["sh", "-c", f"test -w {ARTIFACTS_DIR}"]
    return run_and_remove(body, "art")


attempt("allowed:artifacts-mount", allowed_artifacts)
