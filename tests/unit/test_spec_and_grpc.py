"""Hardened specs from policy, spec hashing, egress routes, and the tiny Dagster Ping codec."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.agent.routes import render_routes
from appliance.launcher.spec import code_server_spec
from appliance.policy import load_locations, load_policy
from protocol.dagster_grpc import decode_echo, encode_echo

ROOT = Path(__file__).resolve().parents[2]


def _location(tmp_path: Path, extra: str = ""):
    path = tmp_path / "locations.yaml"
    path.write_text(
        "version: 1\nlocations:\n  - name: ex\n    image: img:1\n    module: pkg.defs\n"
        "    env: {GREETING: hi}\n    egress: {allow: ['pypi.org:443']}\n" + extra
    )
    policy = load_policy(ROOT / "policy")
    return load_locations(path, policy)[0], policy


def test_code_server_spec_carries_every_hardening_default(tmp_path: Path) -> None:
    location, policy = _location(tmp_path)
    spec = code_server_spec(location, policy, appliance_id="a1", image_id="sha256:" + "0" * 64, egress_port=3128)
    kw = spec.kwargs
    assert kw["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in kw["security_opt"]
    assert f"seccomp={policy.hardening.seccomp_profile}" in kw["security_opt"]
    assert kw["read_only"] is True and kw["init"] is True
    assert kw["user"] == "10001:10001"
    assert kw["mem_limit"] == kw["memswap_limit"] == policy.hardening.limits.memory
    assert kw["pids_limit"] == policy.hardening.limits.pids
    assert kw["network"] == "airlock-a1-ex"
    assert "ports" not in kw and "volumes" not in kw and "privileged" not in kw
    assert kw["environment"]["HTTPS_PROXY"] == "http://airlock-egress:3128"
    assert kw["environment"]["GREETING"] == "hi"
    assert kw["labels"]["airlock.spec-hash"] == spec.spec_hash
    assert kw["command"][-2:] == ["--module-name", "pkg.defs"]


def test_spec_hash_changes_with_what_matters_only(tmp_path: Path) -> None:
    location, policy = _location(tmp_path)
    args = {"appliance_id": "a1", "egress_port": 3128}
    one = code_server_spec(location, policy, image_id="sha256:" + "0" * 64, **args)
    same = code_server_spec(location, policy, image_id="sha256:" + "0" * 64, **args)
    other_image = code_server_spec(location, policy, image_id="sha256:" + "1" * 64, **args)
    tighter, _ = _location(tmp_path, "    resources: {memory: 256m}\n")
    tighter_spec = code_server_spec(tighter, policy, image_id="sha256:" + "0" * 64, **args)
    assert one.spec_hash == same.spec_hash
    assert len({one.spec_hash, other_image.spec_hash, tighter_spec.spec_hash}) == 3


def test_routes_file_maps_subnets_to_allowlists(tmp_path: Path) -> None:
    location, _ = _location(tmp_path)
    data = json.loads(render_routes({"ex": ["172.30.0.0/16"]}, {"ex": location}))
    assert data == {"version": 1, "routes": [{"location": "ex", "cidrs": ["172.30.0.0/16"],
                                               "allow": ["pypi.org:443"], "allow_cidrs": []}]}


def test_ping_codec_round_trip_and_skips_unknown_fields() -> None:
    assert decode_echo(encode_echo("airlock")) == "airlock"
    assert decode_echo(encode_echo("x" * 300)) == "x" * 300
    assert decode_echo(b"\x10\x05" + encode_echo("hi")) == "hi"  # field 2 varint first
    assert encode_echo("") == b"" and decode_echo(b"") == ""
