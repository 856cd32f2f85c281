"""Bundles without Docker: a fake engine proves that a refused bundle is never loaded, whatever was changed."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from appliance import cli
from appliance.bundle import BundleError, ImageInfo, Manifest, export_bundle, load_verified, verify_bundle
from appliance.bundle.archive import Writer
from appliance.bundle.manifest import MANIFEST, SIGNATURE, sign_manifest
from appliance.policy import PolicyError, load_policy
from appliance.policy.imported import IMPORTED_FILE, read_imported
from protocol.keys import SigningKey

ROOT = Path(__file__).resolve().parents[2]
APP_ID, CODE_ID = "sha256:" + "a" * 64, "sha256:" + "c" * 64


class FakeEngine:
    """Images as bytes; `load` consumes the stream like docker does and registers only a complete one."""

    def __init__(self) -> None:
        self.images: dict[str, bytes] = {APP_ID: b"appliance-image" * 5000, CODE_ID: b"usercode" * 300_000}
        self.refs = {"airlock/appliance:latest": APP_ID, "acme/etl:v1": CODE_ID}
        self.tags: dict[str, str] = {}
        self.load_calls = 0
        self.loaded: list[bytes] = []

    def inspect(self, ref: str) -> ImageInfo | None:
        image_id = self.refs.get(ref, ref if ref in self.loaded_ids() else None)
        if image_id is None:
            return None
        tags = tuple(r for r, i in self.refs.items() if i == image_id)
        return ImageInfo(image_id=image_id, tags=tags, created="2024-01-01T00:00:00Z", size=len(self.images[image_id]))

    def save(self, image_id: str) -> Iterator[bytes]:
        data = self.images[image_id]
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    def load(self, chunks: Iterable[bytes]) -> list[str]:
        self.load_calls += 1
        data = b"".join(chunks)  # a broken stream raises here, before anything is registered
        self.loaded.append(data)
        return [i for i, d in self.images.items() if d == data]

    def loaded_ids(self) -> set[str]:
        return {i for i, d in self.images.items() if d in self.loaded}

    def tag(self, image_id: str, tag: str) -> None:
        self.tags[tag] = image_id

    def remove(self, image_id: str) -> None:  # pragma: no cover - not reached by these tests
        raise AssertionError("nothing to remove")


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def bundle(tmp_path: Path, key: SigningKey) -> Path:
    out = tmp_path / "airlock.bundle"
    export_bundle(FakeEngine(), ["airlock/appliance:latest", "acme/etl:v1"], out, key, stream=io.StringIO())
    return out


def _member_offset(path: Path, name: str) -> tuple[int, int]:
    with tarfile.open(path) as tar:
        member = tar.getmember(name)
        return member.offset_data, member.size


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _refused(path: Path, key: SigningKey, what: str, tmp_path: Path) -> tuple[BundleError, FakeEngine]:
    engine = FakeEngine()
    with pytest.raises(BundleError) as info:
        verified = verify_bundle(path, key.public_key, stream=io.StringIO())
        load_verified(verified, engine, tmp_path / IMPORTED_FILE, stream=io.StringIO())
    assert info.value.what == what, str(info.value)
    assert engine.load_calls == 0 and not engine.tags
    assert not (tmp_path / IMPORTED_FILE).exists()
    return info.value, engine


def _rewrite(src: Path, dst: Path, key: SigningKey, *, manifest_edit=None, extra: dict[str, bytes] | None = None,
             drop: str | None = None) -> None:
    """Rebuild a bundle, optionally editing (and re-signing) the manifest or adding/dropping members."""
    with tarfile.open(src) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    if manifest_edit is not None:
        data = json.loads(members[MANIFEST])
        manifest_edit(data)
        members[MANIFEST] = json.dumps(data).encode()
        members[SIGNATURE] = sign_manifest(members[MANIFEST], key)
    members.update(extra or {})
    members.pop(drop or "", None)
    with open(dst, "wb") as f:
        writer = Writer(f, 0)
        for name, data in members.items():
            writer.add_bytes(name, data)
        writer.close()


def test_manifest_round_trip(bundle: Path) -> None:
    with tarfile.open(bundle) as tar:
        raw = tar.extractfile(MANIFEST).read()  # type: ignore[union-attr]
    manifest = Manifest.from_bytes(raw)
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest
    assert manifest.to_bytes() == raw
    assert [(i.name, i.role, i.image_id) for i in manifest.images] == [
        ("appliance", "platform", APP_ID), ("etl", "usercode", CODE_ID)]
    etl = manifest.images[1]
    assert etl.file == "images/etl.tar" and etl.tags == ("acme/etl:v1",)
    assert etl.sha256 == hashlib.sha256(FakeEngine().images[CODE_ID]).hexdigest() and etl.size == 2_400_000


def test_import_loads_tags_and_allowlists_user_code_only(bundle: Path, key: SigningKey, tmp_path: Path) -> None:
    engine = FakeEngine()
    verified = verify_bundle(bundle, key.public_key, stream=io.StringIO())
    loaded = load_verified(verified, engine, tmp_path / IMPORTED_FILE, stream=io.StringIO())
    assert engine.loaded == [engine.images[APP_ID], engine.images[CODE_ID]]
    assert engine.tags == {"airlock/appliance:latest": APP_ID, "acme/etl:v1": CODE_ID}
    assert [(item.image.name, item.allowlisted) for item in loaded] == [("appliance", False), ("etl", True)]
    imported = read_imported(tmp_path / IMPORTED_FILE)
    assert [(i.digest, i.tags, i.signed_by) for i in imported] == [(CODE_ID, ("acme/etl:v1",), key.key_id)]


def test_signature_by_another_key_is_refused(bundle: Path, tmp_path: Path) -> None:
    error, _ = _refused(bundle, SigningKey.generate(), "signature", tmp_path)
    assert "not by the trusted key" in str(error) and SIGNATURE in str(error)


def test_flipped_byte_in_manifest_is_refused(bundle: Path, key: SigningKey, tmp_path: Path) -> None:
    offset, size = _member_offset(bundle, MANIFEST)
    _flip(bundle, offset + size // 2)
    error, _ = _refused(bundle, key, "signature", tmp_path)
    assert "does not verify" in str(error) and MANIFEST in str(error)


@pytest.mark.parametrize("name", ["images/appliance.tar", "images/etl.tar"])
def test_flipped_byte_in_an_image_is_refused(bundle: Path, key: SigningKey, tmp_path: Path, name: str) -> None:
    offset, size = _member_offset(bundle, name)
    _flip(bundle, offset + size - 1)  # the last byte: every earlier image verified, still nothing loads
    error, _ = _refused(bundle, key, "digest", tmp_path)
    assert name in str(error) and "sha256" in str(error)


def test_size_lie_in_a_signed_manifest_is_refused(bundle: Path, key: SigningKey, tmp_path: Path) -> None:
    bad = tmp_path / "bad.bundle"
    _rewrite(bundle, bad, key, manifest_edit=lambda m: m["images"][1].update(size=m["images"][1]["size"] + 1))
    error, _ = _refused(bad, key, "size", tmp_path)
    assert "images/etl.tar" in str(error)


def test_missing_member_is_refused(bundle: Path, key: SigningKey, tmp_path: Path) -> None:
    bad = tmp_path / "bad.bundle"
    _rewrite(bundle, bad, key, drop="images/etl.tar")
    error, _ = _refused(bad, key, "member", tmp_path)
    assert "images/etl.tar is listed in the manifest but missing" in str(error)


@pytest.mark.parametrize("name", ["images/extra.tar", "../evil", "/etc/cron.d/x", "images/../../x.tar", "notes.txt"])
def test_unexpected_member_is_refused(bundle: Path, key: SigningKey, tmp_path: Path, name: str) -> None:
    bad = tmp_path / "bad.bundle"
    _rewrite(bundle, bad, key, extra={name: b"x"})
    error, _ = _refused(bad, key, "member", tmp_path)
    assert "unexpected member" in str(error) and name.lstrip("/")[:5] in str(error)


def test_link_member_is_refused(bundle: Path, key: SigningKey, tmp_path: Path) -> None:
    bad = tmp_path / "bad.bundle"
    shutil.copy(bundle, bad)
    with tarfile.open(bad, "a") as tar:
        link = tarfile.TarInfo("images/link.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(link)
    error, _ = _refused(bad, key, "member", tmp_path)
    assert "images/link.tar" in str(error)


def test_bad_manifest_field_is_named(bundle: Path, key: SigningKey, tmp_path: Path) -> None:
    bad = tmp_path / "bad.bundle"
    _rewrite(bundle, bad, key, manifest_edit=lambda m: m["images"][0].update(file="../../appliance.tar"))
    error, _ = _refused(bad, key, "manifest", tmp_path)
    assert "images[0]: file" in str(error)


def test_bundle_changed_after_verification_is_cut_off(bundle: Path, key: SigningKey, tmp_path: Path) -> None:
    engine = FakeEngine()
    verified = verify_bundle(bundle, key.public_key, stream=io.StringIO())
    offset, size = _member_offset(bundle, "images/etl.tar")
    _flip(bundle, offset + size // 2)
    with pytest.raises(BundleError, match="changed after verification") as info:
        load_verified(verified, engine, tmp_path / IMPORTED_FILE, stream=io.StringIO())
    assert info.value.what == "digest"
    assert engine.loaded == [engine.images[APP_ID]]  # the etl stream broke before its end: not registered
    assert not (tmp_path / IMPORTED_FILE).exists()


def test_bad_allowlist_file_refuses_before_loading(bundle: Path, key: SigningKey, tmp_path: Path) -> None:
    allowlist = tmp_path / IMPORTED_FILE
    allowlist.write_text("version: 1\nimages:\n  - digest: sha256:nothex\n")
    engine = FakeEngine()
    verified = verify_bundle(bundle, key.public_key, stream=io.StringIO())
    with pytest.raises(BundleError, match=r"images\[0\]\.digest") as info:
        load_verified(verified, engine, allowlist, stream=io.StringIO())
    assert info.value.what == "allowlist" and engine.load_calls == 0


def test_cli_import_refuses_with_exit_code_and_message(bundle: Path, key: SigningKey, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    offset, _ = _member_offset(bundle, "images/etl.tar")
    _flip(bundle, offset + 7)
    pub = tmp_path / "trusted.pub"
    pub.write_text(key.public_pem())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bundle", "import", str(bundle), "--trust-key", str(pub), "--allowlist", str(tmp_path / "a.yaml")])
    assert exit_info.value.code == 1
    assert "bundle refused: images/etl.tar: sha256" in capsys.readouterr().err
    assert not (tmp_path / "a.yaml").exists()


def test_policy_loader_merges_imported_digests(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policy"
    shutil.copytree(ROOT / "policy", policy_dir)
    assert load_policy(policy_dir).images.decide(CODE_ID, (), ())[0] is False
    (policy_dir / IMPORTED_FILE).write_text(f"version: 1\nimages:\n  - digest: {CODE_ID}\n    tags: [acme/etl:v1]\n")
    images = load_policy(policy_dir).images
    assert images.decide(CODE_ID, (), ()) == (True, f"image id {CODE_ID} is in the digest allowlist")
    assert images.allow_pull is False and images.decide(APP_ID, ("acme/other:v1",), ())[0] is False


@pytest.mark.parametrize(("text", "where"), [
    ("images: []\n", "version"),
    ("version: 1\nimages:\n  - digest: sha256:abc\n", "images[0].digest"),
    (f"version: 1\nimages:\n  - digest: {CODE_ID}\n    name: '*'\n", "images[0].name"),
    ("version: 1\nallow_pull: true\n", "allow_pull"),
])
def test_bad_imported_file_refuses_the_policy(tmp_path: Path, text: str, where: str) -> None:
    policy_dir = tmp_path / "policy"
    shutil.copytree(ROOT / "policy", policy_dir)
    (policy_dir / IMPORTED_FILE).write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(policy_dir)
    assert info.value.file.endswith(IMPORTED_FILE) and info.value.field_path == where
