"""protocol.signing / protocol.keys: every refusal reason provoked once, nonce bookkeeping, key files."""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import re
import stat
import types
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import ContentDigest, HTTPMessageSigner, MappingKeyResolver, algorithms

from protocol.errors import AirlockError, SignatureError
from protocol.signing import (
    COVERED,
    NonceCache,
    RequestVerifier,
    SigningKey,
    Verified,
    key_id_of,
    load_public_key,
    sign_request,
    verify_bytes,
)

NOW = 1_700_000_000
URL = "https://cp.example/agent/graphql?queue=default"
BODY = b'{"query":"{ work }"}'


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(key: SigningKey, clock: Clock) -> RequestVerifier:
    keys = {key.key_id: key.public_key}
    return RequestVerifier(keys.get, NonceCache(clock=clock), clock=clock)


def signed(key: SigningKey, method: str = "POST", url: str = URL, body: bytes = BODY, **kw: object) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    kw.setdefault("created", NOW)
    return headers | sign_request(method, url, headers, body, key, **kw)  # type: ignore[arg-type]


def library_signed(private: Ed25519PrivateKey, covered: tuple[str, ...], nonce: str | None) -> dict[str, str]:
    """A request signed validly by the library itself, but not to airlock's policy."""
    key_id = key_id_of(private.public_key())
    request = types.SimpleNamespace(
        method="POST",
        url=URL,
        headers={"Content-Digest": ContentDigest.create(BODY)},
    )
    signer = HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519,
        key_resolver=MappingKeyResolver(public_keys={}, private_keys={key_id: private}),
    )
    signer.sign(
        request,
        key_id=key_id,
        created=datetime.datetime.fromtimestamp(NOW, tz=datetime.UTC),
        nonce=nonce,
        label="airlock",
        covered_component_ids=covered,
        use_existing_digest=True,
    )
    return dict(request.headers)


def refused(
    verifier: RequestVerifier, headers: object, *, method: str = "POST", url: str = URL, body: bytes = BODY
) -> str:
    with pytest.raises(SignatureError) as info:
        verifier.verify(method, url, headers, body)  # type: ignore[arg-type]
    assert str(info.value)  # a human message, always
    return info.value.reason


# --- round trip -------------------------------------------------------------------------------------------


def test_round_trip(key: SigningKey, verifier: RequestVerifier) -> None:
    headers = signed(key, nonce="n-1")
    assert set(headers) >= {"content-digest", "signature-input", "signature"}
    assert headers["content-digest"].startswith("sha-256=:")
    sig_input = headers["signature-input"]
    assert sig_input.startswith('airlock=("@method" "@path" "@query" "content-digest");')
    assert 'alg="ed25519"' in sig_input and f'keyid="{key.key_id}"' in sig_input and f"created={NOW}" in sig_input
    assert verifier.verify("POST", URL, headers, BODY) == Verified(key_id=key.key_id, created=NOW, nonce="n-1")


def test_round_trip_asgi_style_headers_and_origin_form_url(key: SigningKey, verifier: RequestVerifier) -> None:
    lines = [(name.lower().encode(), value.encode()) for name, value in signed(key).items()]
    result = verifier.verify("POST", "/agent/graphql?queue=default", lines, BODY)  # type: ignore[arg-type]
    assert result.key_id == key.key_id and len(result.nonce) >= 22  # 128 random bits, urlsafe base64


def test_empty_body_round_trip(key: SigningKey, verifier: RequestVerifier) -> None:
    headers = signed(key, method="GET", url="https://cp.example/agent/poll", body=b"")
    assert verifier.verify("GET", "https://cp.example/agent/poll", headers, b"").key_id == key.key_id


def test_sign_request_supersedes_existing_signature_headers(key: SigningKey, verifier: RequestVerifier) -> None:
    stale = {"content-digest": "sha-256=:AAAA:", "Signature": "x=:AAAA:"}
    added = sign_request("POST", URL, stale, BODY, key, created=NOW)
    assert verifier.verify("POST", URL, added, BODY).key_id == key.key_id


def test_sign_request_maps_library_errors(key: SigningKey) -> None:
    with pytest.raises(SignatureError) as info:
        sign_request("post", URL, {}, BODY, key)  # the library wants the method as sent: uppercase
    assert info.value.reason == "malformed"
    with pytest.raises(SignatureError):
        sign_request("POST", "https://cp.example/has space", {}, BODY, key)


# --- each refusal reason -----------------------------------------------------------------------------------


def test_unsigned(key: SigningKey, verifier: RequestVerifier) -> None:
    assert refused(verifier, {"Content-Type": "application/json"}) == "unsigned"
    headers = signed(key)
    del headers["signature"]
    assert refused(verifier, headers) == "unsigned"


@pytest.mark.parametrize(
    "signature_input",
    [
        "airlock=(((",
        'other=("@method" "@path" "@query" "content-digest");created=1;keyid="k";nonce="n"',
        '"airlock"',
    ],
)
def test_malformed_signature_input(key: SigningKey, verifier: RequestVerifier, signature_input: str) -> None:
    assert refused(verifier, signed(key) | {"signature-input": signature_input}) == "malformed"


def test_malformed_signature_value_and_extra_label(key: SigningKey, verifier: RequestVerifier) -> None:
    headers = signed(key)
    assert refused(verifier, headers | {"signature": "airlock=12"}) == "malformed"
    extra = headers | {
        "signature-input": headers["signature-input"] + ', proxy=("@method");created=1;keyid="p"',
        "signature": headers["signature"] + ", proxy=:AAAA:",
    }
    assert refused(verifier, extra) == "malformed"


def test_missing_nonce_is_malformed() -> None:
    private = Ed25519PrivateKey.generate()
    keys = {key_id_of(private.public_key()): private.public_key()}
    strict = RequestVerifier(keys.get, NonceCache(clock=Clock()), clock=Clock())
    assert refused(strict, library_signed(private, COVERED, nonce=None)) == "malformed"


def test_covered_set_lacking_content_digest_is_malformed() -> None:
    private = Ed25519PrivateKey.generate()
    keys = {key_id_of(private.public_key()): private.public_key()}
    strict = RequestVerifier(keys.get, NonceCache(clock=Clock()), clock=Clock())
    headers = library_signed(private, ("@method", "@path", "@query"), nonce="n")
    assert "Content-Digest" in headers
    assert refused(strict, headers) == "malformed"
    assert strict.verify("POST", URL, library_signed(private, COVERED, nonce="n"), BODY).nonce == "n"


def test_unknown_key(verifier: RequestVerifier) -> None:
    assert refused(verifier, signed(SigningKey.generate())) == "unknown-key"


def test_signature_by_another_key_under_a_known_keyid(key: SigningKey, verifier: RequestVerifier) -> None:
    impostor = SigningKey.generate()
    impostor.key_id = key.key_id
    assert refused(verifier, signed(impostor)) == "bad-signature"


def test_tampered_body_is_digest_mismatch(key: SigningKey, verifier: RequestVerifier) -> None:
    assert refused(verifier, signed(key), body=BODY + b" ") == "digest-mismatch"


def test_missing_content_digest(key: SigningKey, verifier: RequestVerifier) -> None:
    headers = signed(key)
    del headers["content-digest"]
    assert refused(verifier, headers) == "digest-mismatch"


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("POST", "https://cp.example/agent/admin?queue=default"),  # path
        ("POST", "https://cp.example/agent/graphql?queue=other"),  # query
        ("POST", "https://cp.example/agent/graphql"),  # query dropped
        ("PUT", URL),  # method
    ],
)
def test_tampered_request_line_is_bad_signature(
    key: SigningKey, verifier: RequestVerifier, method: str, url: str
) -> None:
    assert refused(verifier, signed(key), method=method, url=url) == "bad-signature"


def test_changed_content_digest(key: SigningKey, verifier: RequestVerifier) -> None:
    forged_body = b'{"query":"mutation { evil }"}'
    headers = signed(key) | {"content-digest": ContentDigest.create(forged_body)}
    assert refused(verifier, headers, body=forged_body) == "bad-signature"
    assert refused(verifier, headers) == "digest-mismatch"  # checked against the body before any crypto


def test_expired_and_future(key: SigningKey, verifier: RequestVerifier, clock: Clock) -> None:
    assert refused(verifier, signed(key, created=NOW - 301)) == "expired"
    assert refused(verifier, signed(key, created=NOW + 301)) == "future"
    assert verifier.verify("POST", URL, signed(key, created=NOW - 300), BODY).created == NOW - 300
    assert verifier.verify("POST", URL, signed(key, created=NOW + 300), BODY).created == NOW + 300
    headers = signed(key)
    clock.now = NOW + 1000
    assert refused(verifier, headers) == "expired"


def test_replayed(key: SigningKey, verifier: RequestVerifier) -> None:
    headers = signed(key)
    verifier.verify("POST", URL, headers, BODY)
    assert refused(verifier, headers) == "replayed"


def test_refused_request_does_not_consume_its_nonce(key: SigningKey, verifier: RequestVerifier) -> None:
    headers = signed(key, nonce="only-once")
    assert refused(verifier, headers, url="https://cp.example/agent/other") == "bad-signature"
    assert refused(verifier, headers, body=b"tampered") == "digest-mismatch"
    impostor = SigningKey.generate()
    impostor.key_id = key.key_id
    assert refused(verifier, signed(impostor, nonce="only-once")) == "bad-signature"
    assert verifier.verify("POST", URL, headers, BODY).nonce == "only-once"
    assert refused(verifier, headers) == "replayed"


def test_no_library_exception_escapes(key: SigningKey, verifier: RequestVerifier) -> None:
    headers = signed(key)
    for method, url, extra in [
        ("post", URL, {}),
        ("POST", "https://cp.example/has space", {}),
        ("POST", URL, {"content-digest": "md5=:AAAA:"}),
        ("POST", URL, {"content-digest": "not a dictionary((("}),
        ("POST", URL, {"signature-input": headers["signature-input"] + ';alg="hmac-sha256"'}),
        ("POST", URL, {"signature-input": headers["signature-input"] + ";weird=1"}),
        ("POST", URL, {"signature-input": headers["signature-input"].replace(f"created={NOW}", 'created="x"')}),
    ]:
        with pytest.raises(SignatureError):
            verifier.verify(method, url, headers | extra, BODY)


def test_verifier_refuses_a_nonce_window_shorter_than_the_skew() -> None:
    with pytest.raises(ValueError, match="replayed"):
        RequestVerifier(lambda _: None, NonceCache(window_seconds=60), max_skew_seconds=300)


def test_signature_error_reasons_are_fixed() -> None:
    assert isinstance(SignatureError("expired", "old"), AirlockError)
    with pytest.raises(ValueError):
        SignatureError("nope", "x")  # type: ignore[arg-type]


# --- nonce cache -------------------------------------------------------------------------------------------


def test_nonce_cache_expires_entries_after_the_window() -> None:
    clock = Clock()
    cache = NonceCache(window_seconds=300, clock=clock)
    assert cache.check_and_add("k", "n", NOW)
    assert not cache.check_and_add("k", "n", NOW)
    assert cache.check_and_add("other-key", "n", NOW)  # nonces are per key
    clock.now = NOW + 300
    assert not cache.check_and_add("k", "n", NOW)  # still inside the window
    clock.now = NOW + 301
    assert len(cache) == 2
    assert cache.check_and_add("k", "fresh", NOW + 301)
    assert len(cache) == 1  # both expired entries pruned
    assert not cache.check_and_add("k", "stale", NOW)  # too old to track: refused, fail closed


def test_nonce_cache_is_bounded_and_evicts_the_oldest() -> None:
    cache = NonceCache(window_seconds=300, max_entries=3, clock=Clock())
    for i in range(3):
        assert cache.check_and_add("k", f"n{i}", NOW - 10 + i)
    assert cache.check_and_add("k", "n3", NOW)
    assert len(cache) == 3
    assert cache.check_and_add("k", "n0", NOW - 10)  # oldest was evicted, so it is no longer remembered
    assert not cache.check_and_add("k", "n3", NOW)
    assert not cache.check_and_add("k", "n2", NOW - 8)


# --- keys ----------------------------------------------------------------------------------------------------


def test_key_file_is_0600_even_with_a_permissive_umask(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "agent.key"
    old = os.umask(0)
    try:
        key.save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["agent.key"]  # no temp file left behind
    assert b"PRIVATE KEY" in path.read_bytes()
    assert SigningKey.load(path).key_id == key.key_id
    key.save(path)  # overwrite in place stays 0600
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_refuses_a_key_file_others_can_read(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "agent.key"
    key.save(path)
    path.chmod(0o644)
    with pytest.raises(SignatureError) as info:
        SigningKey.load(path)
    assert info.value.reason == "insecure-key-file" and "0644" in str(info.value)
    path.chmod(0o640)
    with pytest.raises(SignatureError):
        SigningKey.load(path)


def test_load_refuses_junk_and_non_ed25519(tmp_path: Path) -> None:
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key")
    junk.chmod(0o600)
    with pytest.raises(SignatureError) as info:
        SigningKey.load(junk)
    assert info.value.reason == "bad-key"
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ec_key.chmod(0o600)
    with pytest.raises(SignatureError, match="not an Ed25519"):
        SigningKey.load(ec_key)
    with pytest.raises(FileNotFoundError):
        SigningKey.load(tmp_path / "absent.key")


def test_key_id_is_stable_and_derived_from_the_public_key(key: SigningKey) -> None:
    assert re.fullmatch(r"ed25519:[0-9a-f]{32}", key.key_id)
    raw = key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key.key_id == "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]
    assert key_id_of(load_public_key(key.public_pem())) == key.key_id
    assert key.key_id == key_id_of(key.public_key) != SigningKey.generate().key_id


def test_load_public_key_refuses_junk() -> None:
    for pem in [
        "",
        "junk",
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
    ]:
        with pytest.raises(SignatureError) as info:
            load_public_key(pem)
        assert info.value.reason == "bad-key"


def test_sign_bytes_round_trip_and_tamper(key: SigningKey) -> None:
    signature = key.sign_bytes(b"work item 1")
    verify_bytes(key.public_key, b"work item 1", signature)
    for public_key, data, sig in [
        (key.public_key, b"work item 2", signature),
        (SigningKey.generate().public_key, b"work item 1", signature),
        (key.public_key, b"work item 1", "!!not base64!!"),
        (key.public_key, b"work item 1", base64.b64encode(b"short").decode()),
    ]:
        with pytest.raises(SignatureError) as info:
            verify_bytes(public_key, data, sig)
        assert info.value.reason == "bad-signature"
