"""The agent API gateway in-process: enrollment, long-poll work, results, and every kind of bad input
refused with a clear 4xx, an audit entry and no state change."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from appliance.agent import operations
from appliance.agent.results import MAX_RESULT_BYTES, ResultBatcher
from appliance.agent.transport import GatewayClient, GatewayError
from controlplane.gateway.app import build_app
from protocol.errors import SignatureError
from protocol.signing import SigningKey, sign_request
from protocol.work import ok_result

URL = "https://gateway/graphql"


@dataclass
class Gateway:
    app: object
    http: TestClient
    key: SigningKey

    @property
    def store(self):
        return self.app.state.store

    @property
    def queue(self):
        return self.app.state.queue

    def agent(self, labels: list[str] | None = None) -> GatewayClient:
        client = GatewayClient(self.http, SigningKey.generate())
        client.enroll(self.store.create_token("prod"), labels or ["default"])
        return client

    def state(self) -> tuple[int, int, int]:
        """(agents, pending work, claimed-or-done work): what a refused request must not change."""
        agents = len(self.store.list_agents())
        pending = self.queue.pending_count("prod", "default")
        with self.store.engine.connect() as conn:
            total = conn.execute(sa.text("select count(*) from airlock_work_items")).scalar_one()
        return agents, pending, total - pending


@pytest.fixture
def gw(tmp_path: Path) -> Gateway:
    key = SigningKey.generate()
    app = build_app(sa.create_engine(f"sqlite:///{tmp_path}/cp.db"), key)
    return Gateway(app, TestClient(app, base_url="https://gateway"), key)


def signed(key: SigningKey, body: bytes, *, created: int | None = None, extra: dict | None = None) -> dict[str, str]:
    headers = {"content-type": "application/json", **(extra or {})}
    headers.update(sign_request("POST", URL, headers, body, key, created=created))
    return headers


def body_of(query: str, variables: dict | None = None) -> bytes:
    return json.dumps({"query": query, "variables": variables or {}}).encode()


def test_enroll_whoami_and_pinned_key(gw: Gateway) -> None:
    agent = gw.agent(["default", "gpu"])
    me = agent.whoami()
    assert me["deployment"] == "prod" and me["labels"] == ["default", "gpu"]
    assert me["keyId"] == agent.key.key_id
    assert agent.pinned is not None
    assert any(e.operation == "enrollAgent" and e.accepted for e in gw.store.audit_entries())


def test_enrolled_agent_is_sent_its_desired_locations(gw: Gateway) -> None:
    agent = gw.agent()
    [work] = agent.claim_work(["default"], wait_seconds=0)
    assert work.kind == "RECONCILE_LOCATIONS" and json.loads(work.payload)["locations"] == []


def test_long_poll_wakes_on_enqueue_and_work_is_signed(gw: Gateway) -> None:
    agent = gw.agent()
    assert [w.kind for w in agent.claim_work(["default"], wait_seconds=0)] == ["RECONCILE_LOCATIONS"]
    timer = threading.Timer(0.3, lambda: gw.queue.enqueue("prod", "default", "GRPC_CALL", {"method": "Ping"}))
    timer.start()
    started = time.monotonic()
    work = agent.claim_work(["default"], wait_seconds=10)
    waited = time.monotonic() - started
    assert [w.kind for w in work] == ["GRPC_CALL"] and json.loads(work[0].payload) == {"method": "Ping"}
    assert waited < 5, waited  # woke on the enqueue, not at the end of the poll
    assert agent.post_results([{"id": work[0].id, "ok": True, "payload": json.dumps({"answer": 1})}]) == 1
    assert gw.queue.result(work[0].id).result == {"answer": 1}


def test_agent_refuses_work_not_signed_by_the_pinned_key(gw: Gateway) -> None:
    agent = gw.agent()
    agent.claim_work(["default"], wait_seconds=0)  # the desired set sent on enrollment
    gw.queue.enqueue("prod", "default", "LAUNCH_RUN", {"run": "r1"})
    raw = agent.execute(operations.CLAIM_WORK, {"queues": ["default"], "waitSeconds": 0})["claimWork"][0]
    agent.verify_work(raw)  # genuine
    with pytest.raises(SignatureError):
        agent.verify_work({**raw, "payload": json.dumps({"run": "r2"})})
    forged = SigningKey.generate()
    with pytest.raises(SignatureError):
        agent.verify_work({**raw, "signature": forged.sign_bytes(b"x"), "signedBy": forged.key_id})


def test_agent_cannot_claim_queues_it_does_not_serve(gw: Gateway) -> None:
    agent = gw.agent(["default"])
    gw.queue.enqueue("prod", "other", "GRPC_CALL", {})
    with pytest.raises(GatewayError, match="not among this agent's labels"):
        agent.claim_work(["other"], wait_seconds=0)
    assert gw.queue.pending_count("prod", "other") == 1


CLAIM = body_of(operations.CLAIM_WORK, {"queues": ["default"], "waitSeconds": 0})


def _bad_requests(gw: Gateway, enrolled: GatewayClient) -> dict[str, tuple[bytes, dict[str, str], int, str]]:
    key = enrolled.key
    stranger = SigningKey.generate()
    ok_headers = signed(key, CLAIM)
    forged = signed(stranger, CLAIM)
    forged["signature-input"] = forged["signature-input"].replace(stranger.key_id, key.key_id)
    tampered_digest = dict(ok_headers, **{"content-digest": "sha-256=:" + "A" * 43 + "=:"})
    return {
        "unsigned": (CLAIM, {"content-type": "application/json"}, 401, "unsigned"),
        "bad signature": (CLAIM, forged, 401, "bad-signature"),
        "tampered body": (CLAIM.replace(b'"waitSeconds": 0', b'"waitSeconds": 1'), signed(key, CLAIM), 401,
                          "digest-mismatch"),
        "wrong digest": (CLAIM, tampered_digest, 401, "digest"),
        "unknown key": (CLAIM, signed(stranger, CLAIM), 401, "unknown-key"),
        "expired": (CLAIM, signed(key, CLAIM, created=int(time.time()) - 3600), 401, "expired"),
        "future": (CLAIM, signed(key, CLAIM, created=int(time.time()) + 3600), 401, "future"),
        "malformed graphql": (b'{"query": "mutation {"}', signed(key, b'{"query": "mutation {"}'), 400, "malformed"),
        "malformed json": (b"{not json", signed(key, b"{not json"), 400, "malformed"),
        "two operations": (body_of("query A { agent { id } } query B { agent { id } }"),
                           signed(key, body_of("query A { agent { id } } query B { agent { id } }")), 400, "malformed"),
    }


def test_bad_input_is_refused_audited_and_changes_nothing(gw: Gateway) -> None:
    enrolled = gw.agent()
    gw.queue.enqueue("prod", "default", "GRPC_CALL", {"method": "Ping"})
    before = gw.state()
    audited = len(gw.store.audit_entries(1000))
    cases = _bad_requests(gw, enrolled)
    for name, (body, headers, status, code) in cases.items():
        response = gw.http.post("/graphql", content=body, headers=headers)
        assert response.status_code == status, (name, response.status_code, response.text)
        error = response.json()["errors"][0]
        assert code in error["extensions"]["code"], (name, error)
        assert error["message"], name
        assert gw.state() == before, name
    refusals = [e for e in gw.store.audit_entries(1000)[: len(gw.store.audit_entries(1000)) - audited]]
    assert len(refusals) == len(cases) and not any(e.accepted for e in refusals)


def test_replayed_request_is_refused_once_the_original_was_accepted(gw: Gateway) -> None:
    enrolled = gw.agent()
    headers = signed(enrolled.key, CLAIM)
    assert gw.http.post("/graphql", content=CLAIM, headers=headers).status_code == 200
    replay = gw.http.post("/graphql", content=CLAIM, headers=headers)
    assert replay.status_code == 401 and replay.json()["errors"][0]["extensions"]["code"] == "replayed"


def test_oversized_body_is_refused_before_anything_else(gw: Gateway) -> None:
    """1 MB for anyone; an enrolled agent's key (run metadata batches) may send up to 8 MB, not more."""
    enrolled, stranger = gw.agent(), SigningKey.generate()
    two_mb = body_of("query { agent { id } }", {"pad": "x" * (2 * 1024 * 1024)})
    response = gw.http.post("/graphql", content=two_mb, headers=signed(stranger, two_mb))
    assert response.status_code == 413 and "1048576 bytes" in response.json()["errors"][0]["message"]
    assert response.json()["errors"][0]["extensions"]["code"] == "too-large"
    assert gw.http.post("/graphql", content=two_mb, headers=signed(enrolled.key, two_mb)).status_code == 200
    nine_mb = body_of("query { agent { id } }", {"pad": "x" * (9 * 1024 * 1024)})
    response = gw.http.post("/graphql", content=nine_mb, headers=signed(enrolled.key, nine_mb))
    assert response.status_code == 413 and "8388608 bytes" in response.json()["errors"][0]["message"]
    gw.store.revoke(gw.store.by_key(enrolled.key.key_id).id)
    assert gw.http.post("/graphql", content=two_mb, headers=signed(enrolled.key, two_mb)).status_code == 413


def _claimed_calls(gw: Gateway, agent: GatewayClient, count: int) -> list[str]:
    agent.claim_work(["default"], wait_seconds=0)  # the enrollment's RECONCILE_LOCATIONS
    ids = [gw.queue.enqueue("prod", "default", "GRPC_CALL", {"method": "Ping", "n": i}) for i in range(count)]
    assert sorted(w.id for w in agent.claim_work(["default"], wait_seconds=0, limit=count)) == sorted(ids)
    return ids


def _finished(gw: Gateway, ids: list[str], timeout: float = 30.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        results = [gw.queue.result(i) for i in ids]
        if all(results):
            return results
        time.sleep(0.05)
    raise AssertionError(f"{sum(r is None for r in results)} of {len(ids)} results never arrived")


@pytest.mark.parametrize("trust_estimate", [True, False])
def test_results_over_the_body_limit_are_split_or_answered_with_an_error_and_nothing_waits(
        gw: Gateway, trust_estimate: bool) -> None:
    """The gateway refuses a postResults over 8 MB however often it is sent: the batcher must keep under it (its
    own estimate; or, with the estimate off, by halving what the gateway refuses as too large)."""
    agent, posts = gw.agent(), []

    def post(results: list[dict]) -> int:
        posts.append(len(results))
        return agent.post_results(results)

    batcher = ResultBatcher(post, max_bytes=MAX_RESULT_BYTES if trust_estimate else 1 << 40)
    try:
        medium, huge, small = _claimed_calls(gw, agent, 40), *_claimed_calls(gw, agent, 2)
        for i in medium:  # 40 x 300 kB: 12 MB in all, over the limit only together
            batcher.add(ok_result(i, {"blob": "x" * 300_000}))
        batcher.add(ok_result(huge, {"blob": "x" * (9 * 1024 * 1024)}))  # over the limit alone
        batcher.add(ok_result(small, {"answer": 1}))  # behind it, and not held up by it
        done = _finished(gw, [*medium, huge, small])
    finally:
        batcher.close()
    assert all(r.status == "done" and len(r.result["blob"]) == 300_000 for r in done[:40])
    assert done[40].status == "failed" and ("too large" in done[40].error or "over the" in done[40].error)
    assert done[41].status == "done" and done[41].result == {"answer": 1}
    assert len(posts) >= 3 and sum(1 for n in posts if n > 1) >= 1  # batched, not one POST per result


def test_enrollment_token_used_or_expired_is_refused(gw: Gateway) -> None:
    token = gw.store.create_token("prod")
    GatewayClient(gw.http, SigningKey.generate()).enroll(token, ["default"])
    agents = len(gw.store.list_agents())
    with pytest.raises(GatewayError, match="already used"):
        GatewayClient(gw.http, SigningKey.generate()).enroll(token, ["default"])
    expired = gw.store.create_token("prod", ttl_seconds=-1)
    with pytest.raises(GatewayError, match="expired"):
        GatewayClient(gw.http, SigningKey.generate()).enroll(expired, ["default"])
    with pytest.raises(GatewayError, match="unknown enrollment token"):
        GatewayClient(gw.http, SigningKey.generate()).enroll("airlock-enroll-guess", ["default"])
    assert len(gw.store.list_agents()) == agents
    enrollments = [e for e in gw.store.audit_entries(20) if e.operation == "enrollAgent"]
    assert [e.accepted for e in enrollments[:4]] == [False, False, False, True]  # newest first


def test_enrollment_must_be_signed_by_the_key_it_registers(gw: Gateway) -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    body = body_of(operations.ENROLL, {"token": gw.store.create_token("prod"), "publicKey": other.public_pem(),
                                       "labels": ["default"]})
    client = GatewayClient(gw.http, key)
    response = gw.http.post("/graphql", content=body, headers=signed(key, body, extra=_offer(key)))
    assert response.status_code == 400 and "not the key that signed" in response.text
    assert gw.store.list_agents() == []
    del client


def test_revoked_key_is_refused_at_once(gw: Gateway) -> None:
    agent = gw.agent()
    agent_id = agent.whoami()["id"]
    assert gw.store.revoke(agent_id)
    with pytest.raises(GatewayError) as excinfo:
        agent.whoami()
    assert excinfo.value.status == 403 and excinfo.value.code == "revoked"


def _offer(key: SigningKey) -> dict[str, str]:
    import base64

    from cryptography.hazmat.primitives import serialization

    raw = key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"x-airlock-public-key": base64.b64encode(raw).decode()}


def test_transport_errors_are_gateway_errors(gw: Gateway) -> None:
    client = GatewayClient(httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(502, text="bad")),
                                        base_url="https://gateway"), SigningKey.generate())
    with pytest.raises(GatewayError, match="without JSON"):
        client.whoami()


def test_key_rotation_new_key_accepted_old_one_until_the_grace_period_then_refused(gw: Gateway) -> None:
    from protocol.keys import rotation_message

    agent = gw.agent()
    agent_id = agent.whoami()["id"]
    old = GatewayClient(gw.http, agent.key)  # someone still holding the old key
    new_key = SigningKey.generate()
    answer = agent.rotate_key(agent_id, new_key)
    assert (answer["keyId"], answer["previousKeyId"]) == (new_key.key_id, old.key.key_id)
    new = GatewayClient(gw.http, new_key)
    assert new.whoami()["keyId"] == new_key.key_id
    assert old.whoami()["id"] == agent_id  # within the grace period (24 h by default)
    with pytest.raises(GatewayError, match="already rotated away from"):  # only the current key may rotate
        old.rotate_key(agent_id, SigningKey.generate())
    gw.store.clock = lambda: time.time() + 24 * 3600 + 1
    with pytest.raises(GatewayError) as refused:
        old.whoami()
    assert refused.value.status == 401 and refused.value.code == "retired"
    assert new.whoami()["id"] == agent_id
    keys = next(a for a in gw.store.list_agents() if a["id"] == agent_id)["keys"]
    assert [(k["key_id"], k["state"]) for k in keys] == [(new_key.key_id, "current"), (old.key.key_id, "retired")]
    audit = [e for e in gw.store.audit_entries(20) if e.operation in ("rotateAgentKey", "POST /graphql")]
    assert any(e.accepted and f"to {new_key.key_id}" in e.reason for e in audit)
    assert any(not e.accepted and "retired" in e.reason and e.key_id == old.key.key_id for e in audit)
    # A bad proof, or a proof made for another agent, changes nothing.
    gw.store.clock = time.time
    other = SigningKey.generate()
    bad_proof = other.sign_bytes(rotation_message("agent-someone-else", new_key.key_id, other.key_id))
    with pytest.raises(GatewayError, match="proof is not the new key's signature"):
        new.execute(operations.ROTATE_KEY, {"publicKey": other.public_pem(), "proof": bad_proof})
    assert new.whoami()["keyId"] == new_key.key_id


def test_revocation_refuses_every_key_of_the_agent_at_once(gw: Gateway) -> None:
    agent = gw.agent()
    agent_id = agent.whoami()["id"]
    old = GatewayClient(gw.http, agent.key)
    new_key = SigningKey.generate()
    agent.rotate_key(agent_id, new_key)
    assert gw.store.revoke(agent_id)
    for client in (old, GatewayClient(gw.http, new_key)):
        with pytest.raises(GatewayError) as refused:
            client.whoami()
        assert refused.value.status == 403 and refused.value.code == "revoked"


def test_airlock_keys_rotate_replaces_the_key_file_and_a_running_client_follows_it(gw: Gateway, tmp_path) -> None:
    from appliance.agent.identity import KeyFile, ensure_enrolled, rotate_key

    state = tmp_path / "state"
    state.mkdir()
    running = GatewayClient(gw.http, KeyFile(str(state), recheck_seconds=0))  # what the agent process holds
    ensure_enrolled(running, str(state), token=gw.store.create_token("prod"), queues=["default"])
    before = running.whoami()["keyId"]
    cli = GatewayClient(gw.http, KeyFile(str(state)))  # what `airlock keys rotate` builds
    answer = rotate_key(cli, str(state))
    assert answer["previousKeyId"] == before and SigningKey.load(state / "agent.key").key_id == answer["keyId"]
    assert not (state / "agent.key.next").exists()
    assert running.whoami()["keyId"] == answer["keyId"]  # the running client signs with the new key now
    gw.store.revoke(answer["agentId"])
    with pytest.raises(GatewayError, match="revoked"):
        rotate_key(cli, str(state))
    assert SigningKey.load(state / "agent.key").key_id == answer["keyId"]  # a refused rotation changes nothing
    assert not (state / "agent.key.next").exists()
