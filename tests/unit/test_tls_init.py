"""`airlock-cp tls init`: a CA and a gateway certificate it signed, made once; no database is touched."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane import cli


def _init(tmp_path: Path, *args: str) -> int:
    return cli.main(["--db", f"sqlite:///{tmp_path}/absent/cp.db", "tls", "init", *args])


def test_init_makes_a_ca_and_a_certificate_signed_by_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tls"
    assert _init(tmp_path, "--hostnames", "controlplane, gateway2,10.0.0.5", "--out", str(out), "--days", "30") == 0
    printed = capsys.readouterr().out
    assert f"{out / 'ca.pem'}" in printed and "AIRLOCK_CA_FILE" in printed
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((out / "gateway.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["controlplane", "gateway2"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < datetime.timedelta(days=31)
    assert (out / "gateway.key").stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in (out / "ca.pem").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "gateway.key", "gateway.pem"]  # no CA key kept
    assert not (tmp_path / "absent").exists()  # needs no database


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tls"
    assert _init(tmp_path, "--hostnames", "controlplane", "--out", str(out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _init(tmp_path, "--hostnames", "controlplane", "--out", str(out)) == 2
    assert "already holds ca.pem, gateway.pem, gateway.key; --force replaces them" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _init(tmp_path, "--hostnames", "controlplane", "--out", str(out), "--force") == 0
    assert (out / "ca.pem").read_bytes() != before["ca.pem"]
    new_ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    old_ca = x509.load_pem_x509_certificate(before["ca.pem"])
    assert new_ca.subject != old_ca.subject  # each CA has a name of its own
    assert isinstance(new_ca.public_key(), ec.EllipticCurvePublicKey)


def test_init_needs_hostnames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("AIRLOCK_CP_TLS_HOSTNAMES", raising=False)
    assert _init(tmp_path, "--out", str(tmp_path / "tls")) == 2
    assert "tls init: give the names appliances reach the gateway by" in capsys.readouterr().err
    assert not (tmp_path / "tls").exists()
    with pytest.raises(SystemExit):
        _init(tmp_path, "--hostnames", " , ", "--out", str(tmp_path / "tls"))


def test_the_gateway_uses_what_init_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from controlplane.settings import ControlPlaneSettings
    from controlplane.tls import ensure_tls

    monkeypatch.setenv("AIRLOCK_CP_STATE_DIR", str(tmp_path))
    assert _init(tmp_path, "--hostnames", "controlplane") == 0  # default --out: <state dir>/tls
    made = (tmp_path / "tls" / "gateway.pem").read_bytes()
    files = ensure_tls(ControlPlaneSettings.from_env().tls_dir, ["other-name"])  # what serve_gateway calls
    assert files.cert.read_bytes() == made
