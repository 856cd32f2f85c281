"""The appliance key's life on the real stack: `airlock keys rotate` inside the appliance switches the agent and
the metadata relay to a new key without a restart (a run still succeeds, heartbeats keep coming); the old key
keeps working for the control plane's grace period and is refused after it; revocation refuses at once; the
audit log shows each."""

from __future__ import annotations

import json
import time

import pytest

from appliance.agent.transport import GatewayClient, GatewayError, https_client
from protocol.signing import SigningKey
from tests.integration.stack import GRACE_SECONDS, launch, wait, wait_terminal


def _client(appliance, key: SigningKey) -> GatewayClient:
    ca = next(path for path, bind in appliance.extra_volumes.items() if bind["bind"] == "/etc/airlock/ca.pem")
    return GatewayClient(https_client(appliance.extra_env["AIRLOCK_CONTROL_PLANE_URL"], ca), key)


def _agent(cp, agent_id: str) -> dict:
    return next(a for a in json.loads(cp.cli("agent", "list", "--json")) if a["id"] == agent_id)


def test_rotation_keeps_the_appliance_working_and_retires_the_old_key_after_the_grace_period(loaded,
                                                                                            tmp_path) -> None:
    cp, appliance = loaded
    code, pem = appliance.exec("cat", "/var/lib/airlock/agent.key", user="airlock-agent")
    assert code == 0, pem
    copy = tmp_path / "old.key"  # what a thief of the old key would hold
    copy.write_text(pem)
    copy.chmod(0o600)
    old_key = SigningKey.load(copy)
    old = _client(appliance, old_key)
    agent_id = old.whoami()["id"]

    code, out = appliance.exec("airlock", "keys", "rotate", user="airlock-agent")
    print(out)
    assert code == 0 and "now signing with ed25519:" in out, out
    rotated_at = time.time()
    new_key_id = out.split("now signing with ", 1)[1].split(";", 1)[0]
    assert old.whoami()["id"] == agent_id  # the old key still works within the grace period
    keys = _agent(cp, agent_id)["keys"]
    assert [(k["key_id"], k["state"]) for k in keys][:2] == [(new_key_id, "current"), (old_key.key_id, "retiring")]

    # The running agent and relay signed with the new key from then on: a heartbeat under it, and a run.
    seen = _agent(cp, agent_id)["last_seen"]
    wait("a heartbeat after the rotation", lambda: _agent(cp, agent_id)["last_seen"] > max(seen, rotated_at), 60)
    assert wait_terminal(cp, launch(cp, "numbers_job")) == "SUCCESS"

    time.sleep(max(0.0, rotated_at + GRACE_SECONDS + 1 - time.time()))
    with pytest.raises(GatewayError) as refused:
        old.whoami()
    assert refused.value.status == 401 and refused.value.code == "retired"
    audit = cp.cli("audit", "--limit", "200")
    assert f"rotated from {old_key.key_id} to {new_key_id}" in audit
    assert any("refused" in line and "retired" in line and old_key.key_id in line for line in audit.splitlines())
    assert wait_terminal(cp, launch(cp, "numbers_job")) == "SUCCESS"  # and the appliance goes on


def test_revocation_refuses_the_agent_at_once_and_is_audited(loaded) -> None:
    cp, appliance = loaded
    key = SigningKey.generate()  # an agent of its own: revoking the session's appliance would end the suite
    client = _client(appliance, key)
    client.enroll(cp.cli("agent-token", "create").strip().splitlines()[-1], ["revoke-test"])
    agent_id = client.whoami()["id"]
    cp.cli("agent", "revoke", agent_id)
    with pytest.raises(GatewayError) as refused:
        client.whoami()
    assert refused.value.status == 403 and refused.value.code == "revoked"
    audit = cp.cli("audit", "--limit", "50")
    assert f"agent revoke key=- agent={agent_id} revoked by operator" in audit
    assert any("refused" in line and key.key_id in line and "revoked" in line for line in audit.splitlines())
