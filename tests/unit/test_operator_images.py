"""The operator's image allowlist: references, the file, its live reader and `airlock images allow|list|revoke`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance import cli
from appliance.policy import PolicyError, load_policy
from appliance.policy.operator import (
    LiveImages,
    OperatorImages,
    parse_reference,
    read_operator_images,
    write_operator_images,
)

POLICY = Path(__file__).resolve().parents[2] / "policy"
ID = "sha256:" + "3" * 64


@pytest.mark.parametrize(("text", "kind", "value"), [
    (ID, "digest", ID),
    (f"registry.local:5000/acme/etl@{ID}", "digest", ID),
    ("acme/etl", "name", "acme/etl"),
    ("acme/*", "name", "acme/*"),
    ("127.0.0.1:5000/acme/etl", "name", "127.0.0.1:5000/acme/etl"),
])
def test_references_an_operator_may_allow(text: str, kind: str, value: str) -> None:
    entry = parse_reference(text)
    assert (entry.kind, entry.value) == (kind, value)


@pytest.mark.parametrize(("text", "message"), [
    ("acme/etl:latest", "names a tag, and a tag can move: allow the repository (acme/etl)"),
    ("acme/etl@sha256:abc", "a digest is 'sha256:' and 64"),
    ("Acme/ETL", "neither a repository"),
    ("", "neither a repository"),
])
def test_references_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_reference(text)


def test_the_file_round_trips_and_a_bad_one_names_its_field(tmp_path: Path) -> None:
    path = tmp_path / "images.yaml"
    images = OperatorImages((parse_reference("acme/*"), parse_reference(ID)))
    write_operator_images(path, images)
    assert read_operator_images(path).entries == images.entries
    assert oct(path.stat().st_mode & 0o777) == "0o644"  # sockguard and the agent read it as their own users
    path.write_text("version: 1\nallow:\n  - name: acme/etl\n    tag: latest\n")
    with pytest.raises(PolicyError) as err:
        read_operator_images(path)
    assert err.value.field_path == "allow[0].tag" and "unknown field" in str(err.value)


def test_live_images_follow_the_file_and_keep_to_the_baked_in_policy_while_it_is_bad(tmp_path: Path) -> None:
    base = load_policy(POLICY).images
    path = tmp_path / "images.yaml"
    live = LiveImages(base, path)
    user = (ID, ("acme/etl:1",), ())
    assert live.current() is base and not live.current().decide(*user)[0]
    write_operator_images(path, OperatorImages((parse_reference("acme/etl"),)))
    allowed, why = live.current().decide(*user)
    assert allowed and "acme/etl" in why and live.error is None
    path.write_text("version: 2\n")
    assert live.current() is base and "version" in (live.error or "")
    assert live.current().decide("sha256:" + "1" * 64, ("airlock/example-location:x",), ())[0]  # baked-in still
    path.unlink()
    assert live.current() is base and live.error is None


def _cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *argv: str) -> int:
    monkeypatch.setenv("AIRLOCK_OPERATOR_DIR", str(tmp_path))
    monkeypatch.setenv("AIRLOCK_POLICY_DIR", str(POLICY))
    with pytest.raises(SystemExit) as done:
        cli.main(list(argv))
    return int(done.value.code or 0)


def test_airlock_images_allow_list_revoke(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(monkeypatch, tmp_path, "images", "allow", "acme/etl", ID) == 0
    assert "acme/etl allowed" in capsys.readouterr().out
    assert [e.value for e in read_operator_images(tmp_path / "images.yaml").entries] == ["acme/etl", ID]
    before = (tmp_path / "images.yaml").read_text()

    assert _cli(monkeypatch, tmp_path, "images", "allow", "acme/other", "acme/etl:latest") == 2  # one bad: none
    assert "a tag can move" in capsys.readouterr().err
    assert (tmp_path / "images.yaml").read_text() == before

    assert _cli(monkeypatch, tmp_path, "images", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    sources = {(r["value"], r["source"]) for r in listed["allow"]}
    assert ("acme/etl", "operator") in sources and ("airlock/example-location", "policy/images.yaml") in sources

    assert _cli(monkeypatch, tmp_path, "images", "revoke", "acme/etl") == 0
    assert [e.value for e in read_operator_images(tmp_path / "images.yaml").entries] == [ID]
    assert _cli(monkeypatch, tmp_path, "images", "revoke", "acme/etl") == 0
    assert "was not in the operator's allowlist" in capsys.readouterr().out


def test_airlock_images_allow_says_where_to_mount_when_the_directory_is_missing(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(monkeypatch, tmp_path / "absent", "images", "allow", "acme/etl") == 2
    assert "does not exist: mount a volume there" in capsys.readouterr().err
