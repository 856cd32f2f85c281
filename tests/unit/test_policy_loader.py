"""policy/*.yaml and locations.yaml: the shipped files load; every bad file is refused naming file and field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.policy import PolicyError, load_locations, load_policy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policy"
    shutil.copytree(ROOT / "policy", target)
    return target


def test_shipped_policy_loads() -> None:
    policy = load_policy(ROOT / "policy")
    assert policy.hardening.user == "10001:10001"
    assert policy.hardening.limits.memory == 1024**3
    assert policy.hardening.limits.pids == 256
    assert policy.hardening.seccomp_file.endswith("seccomp.json")
    assert '"defaultAction"' in policy.hardening.seccomp_profile
    assert policy.images.allow_pull is False
    assert any(reason == "cloud metadata" for _, reason in policy.egress.always_deny)


@pytest.mark.parametrize(
    ("file", "old", "new", "field", "problem"),
    [
        ("hardening.yaml", 'user: "10001:10001"', 'user: "0:0"', "defaults.user", "non-root"),
        ("hardening.yaml", 'user: "10001:10001"', "user: root", "defaults.user", "non-root"),
        ("hardening.yaml", "memory: 1g", "memory: lots", "defaults.limits.memory", "size"),
        ("hardening.yaml", "memory: 1g", "memory: 8g", "defaults.limits.memory", "bounds.memory_max"),
        ("hardening.yaml", "pids: 256", "pids: 0", "defaults.limits.pids", "at least"),
        ("hardening.yaml", "runtime: runc", "runtime: kata", "defaults.runtime", "bounds.runtimes"),
        ("hardening.yaml", "seccomp: seccomp.json", "seccomp: missing.json", "", "cannot read"),
        ("hardening.yaml", "  log:\n", "  logs: {}\n  log:\n", "defaults.logs", "unknown field"),
        ("hardening.yaml", "mode=1777", "mode=1777,exec", "defaults.tmpfs./tmp", "exec"),
        ("hardening.yaml", "version: 1", "version: 2", "version", "unsupported version"),
        ("images.yaml", "allow_pull: false", "allow_pull: maybe", "allow_pull", "true or false"),
        ("images.yaml", "- name: airlock/example-location", "- digest: sha256:abc", "allow[0].digest",
         "does not match"),
        ("egress.yaml", "cidrs: [100.64.0.0/10]", "cidrs: [100.64.0.0/99]", "always_deny[4].cidrs[0]", "not a CIDR"),
        ("egress.yaml", "port: 3128", "port: [1]", "port", "whole number"),
        ("egress.yaml", "always_deny:", "always_deny: {}\nx:", "always_deny", "must be a list"),
        ("hardening.yaml", "bounds:", "bounds: [\n", "line", "not valid YAML"),
    ],
)
def test_bad_policy_is_refused_naming_file_and_field(
    policy_dir: Path, file: str, old: str, new: str, field: str, problem: str
) -> None:
    path = policy_dir / file
    text = path.read_text()
    assert old in text, f"fixture drift: {old!r} not in {file}"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(PolicyError) as excinfo:
        load_policy(policy_dir)
    message = str(excinfo.value)
    assert file in message or "missing.json" in message
    assert field in message
    assert problem in message


def test_bad_seccomp_json_is_refused(policy_dir: Path) -> None:
    (policy_dir / "seccomp.json").write_text('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}')
    with pytest.raises(PolicyError, match=r"seccomp.json: defaultAction: must deny by default"):
        load_policy(policy_dir)


LOCATION = """version: 1
locations:
  - name: example
    image: airlock/example-location:abc
    module: example_location.definitions
{extra}"""


def _locations(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "locations.yaml"
    path.write_text(LOCATION.format(extra=extra))
    return path


def test_location_tightens_and_loosens_within_bounds(tmp_path: Path) -> None:
    policy = load_policy(ROOT / "policy")
    extra = "    resources: {memory: 256m, pids: 2000}\n".replace("2000", "1024")
    (loc,) = load_locations(_locations(tmp_path, extra), policy)
    assert loc.limits.memory == 256 * 1024**2
    assert loc.limits.pids == 1024
    assert loc.limits.cpus == policy.hardening.limits.cpus


@pytest.mark.parametrize(
    ("extra", "field", "problem"),
    [
        ("    resources: {memory: 16g}\n", "locations[0].resources.memory", "bounds.memory_max"),
        ("    resources: {pids: 5000}\n", "locations[0].resources.pids", "bounds.pids_max"),
        ("    resources: {cpus: 8}\n", "locations[0].resources.cpus", "bounds.cpus_max"),
        ("    runtime: kata\n", "locations[0].runtime", "not allowed"),
        ("    package: pkg\n", "locations[0].module", "exactly one"),
        ("    env: {AIRLOCK_TOKEN: x}\n", "locations[0].env.AIRLOCK_TOKEN", "reserved"),
        ("    env: {HTTP_PROXY: http://evil}\n", "locations[0].env.HTTP_PROXY", "reserved"),
        ("    egress: {allow: [pypi.org]}\n", "locations[0].egress.allow[0]", "host:port"),
        ("    egress: {allow_cidrs: [10.0.0.0/99]}\n", "locations[0].egress.allow_cidrs[0]", "not a CIDR"),
        ("    privileged: true\n", "locations[0].privileged", "unknown field"),
        ("  - name: example\n    image: x\n    module: m\n", "locations[1].name", "duplicate"),
    ],
)
def test_bad_location_is_refused(tmp_path: Path, extra: str, field: str, problem: str) -> None:
    policy = load_policy(ROOT / "policy")
    with pytest.raises(PolicyError) as excinfo:
        load_locations(_locations(tmp_path, extra), policy)
    assert "locations.yaml" in str(excinfo.value)
    assert field in str(excinfo.value)
    assert problem in str(excinfo.value)


def test_egress_allowlist_parsing(tmp_path: Path) -> None:
    policy = load_policy(ROOT / "policy")
    extra = '    egress: {allow: ["pypi.org:443", "*.example.com:*"], allow_cidrs: [10.1.0.0/16]}\n'
    (loc,) = load_locations(_locations(tmp_path, extra), policy)
    hosts = loc.egress.hosts
    assert hosts[0].matches("pypi.org", 443) and not hosts[0].matches("pypi.org", 80)
    assert hosts[1].matches("api.example.com", 8443) and not hosts[1].matches("example.com.evil", 443)
    assert str(loc.egress.cidrs[0]) == "10.1.0.0/16"


# -- what a control plane's desired set may not ask for (local bounds) -------------------------------------
@pytest.mark.parametrize("name", ["PYTHONSTARTUP", "PYTHONPATH", "PYTHONWARNINGS", "PYTHONHOME", "LD_PRELOAD",
                                  "LD_LIBRARY_PATH", "DYLD_INSERT_LIBRARIES", "BASH_ENV", "ENV", "PATH",
                                  "DAGSTER_CLI_API_GRPC_PYTHON_FILE", "NODE_OPTIONS", "JAVA_TOOL_OPTIONS",
                                  "PERL5OPT", "GCONV_PATH", "GLIBC_TUNABLES", "BASH_FUNC_x%%"])
def test_env_that_chooses_code_at_start_up_is_refused_by_class(name: str) -> None:
    from appliance.policy.loader import desired_set_from_data

    policy = load_policy(ROOT / "policy")
    entry = {"name": "alpha", "image": "i", "module": "m", "env": {name: "x"}}
    checked = desired_set_from_data({"version": 1, "locations": [entry]}, policy, source="control plane")
    assert checked.accepted == () and "alpha" in checked.refused
    assert f"env.{name}" in checked.refused["alpha"]
    assert ("changes how the interpreter" in checked.refused["alpha"]
            or "not a valid environment variable name" in checked.refused["alpha"])


def test_ordinary_env_still_passes() -> None:
    from appliance.policy.loader import desired_set_from_data

    policy = load_policy(ROOT / "policy")
    entry = {"name": "alpha", "image": "i", "module": "m",
             "env": {"ACME_ENV": "prod", "DAGSTER_DEPLOYMENT": "x", "PIP_INDEX": "y", "pythonic": "z"}}
    checked = desired_set_from_data({"version": 1, "locations": [entry]}, policy, source="control plane")
    assert [loc.name for loc in checked.accepted] == ["alpha"] and checked.refused == {}


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0", "169.254.169.254/32", "10.0.0.0/8", "127.0.0.0/8",
                                  "fd00::/8", "172.16.5.0/24"])
def test_the_control_plane_cannot_open_refused_ranges_local_policy_did_not_hand_it(cidr: str) -> None:
    from appliance.policy.loader import desired_set_from_data

    policy = load_policy(ROOT / "policy")
    entry = {"name": "alpha", "image": "i", "module": "m", "egress": {"allow_cidrs": [cidr]}}
    checked = desired_set_from_data({"version": 1, "locations": [entry]}, policy, source="control plane")
    assert checked.accepted == () and "only this appliance's local policy may open" in checked.refused["alpha"]
    assert "egress.allow_cidrs[0]" in checked.refused["alpha"]


def test_a_public_cidr_and_ranges_local_policy_opens_pass(tmp_path) -> None:
    import shutil

    from appliance.policy.loader import desired_set_from_data

    shutil.copytree(ROOT / "policy", tmp_path / "policy")
    egress = tmp_path / "policy" / "egress.yaml"
    egress.write_text(egress.read_text() + "control_plane_may_open: [10.20.0.0/16]\n")
    policy = load_policy(tmp_path / "policy")
    entry = {"name": "alpha", "image": "i", "module": "m",
             "egress": {"allow_cidrs": ["93.184.216.0/24", "10.20.30.0/24"]}}
    checked = desired_set_from_data({"version": 1, "locations": [entry]}, policy, source="control plane")
    assert [loc.name for loc in checked.accepted] == ["alpha"], checked.refused
    wider = {**entry, "egress": {"allow_cidrs": ["10.0.0.0/8"]}}  # wider than what was handed over
    assert "alpha" in desired_set_from_data({"version": 1, "locations": [wider]}, policy, source="cp").refused
    # locations.yaml is local policy: the operator may open any range there
    local = tmp_path / "locations.yaml"
    local.write_text("version: 1\nlocations:\n  - {name: alpha, image: i, module: m, "
                     "egress: {allow_cidrs: [10.0.0.0/8]}}\n")
    from appliance.policy import load_locations

    assert [loc.name for loc in load_locations(local, policy)] == ["alpha"]
