"""`airlock`: the appliance's command line (inside the appliance container: `docker exec APPLIANCE airlock …`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from appliance.agent.status import State, read_status
from appliance.policy import PolicyError, load_locations, load_policy
from appliance.settings import Settings
from protocol.errors import UsageError


def cmd_check_config(settings: Settings, _args: argparse.Namespace) -> int:
    """Validate policy and locations; the appliance refuses to start when this fails."""
    try:
        policy = load_policy(settings.policy_dir)
        names: list[str] = []
        if Path(settings.locations_file).exists():
            names = [loc.name for loc in load_locations(settings.locations_file, policy)]
    except PolicyError as exc:
        print(f"airlock: configuration refused: {exc}", file=sys.stderr)
        return 2
    print(f"airlock: policy ok ({settings.policy_dir}); locations: {', '.join(names) or 'none'}")
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    while True:
        status = read_status(settings.state_dir)
        ready = status is not None and status.locations and all(
            s.state.value == args.wait for s in status.locations.values()
        )
        if not args.wait or ready or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if status is None:
        print("airlock: no status yet (is the agent running?)", file=sys.stderr)
        return 1
    if args.json:
        print(status.to_json())
    else:
        print(f"appliance {status.appliance_id}  (updated {time.time() - status.updated:.0f} s ago)")
        for s in status.locations.values():
            print(f"  {s.name:20} {s.state.value:8} {s.container or '-'}")
            if s.error and s.state is not State.LOADED:
                for line in s.error.splitlines()[-12:]:
                    print(f"      {line}")
    return 0 if not args.wait or ready else 1


def cmd_ping(settings: Settings, args: argparse.Namespace) -> int:
    from appliance.agent.health import ping
    from protocol.dagster_grpc import DEFAULT_PORT

    status = read_status(settings.state_dir)
    location = status.locations.get(args.location) if status else None
    if location is None or not location.container:
        print(f"airlock: location {args.location!r} has no code server (see `airlock status`)", file=sys.stderr)
        return 1
    worst = 0
    for _ in range(args.count):
        result = ping(f"{location.container}:{DEFAULT_PORT}", timeout=args.timeout)
        print(f"{args.location}: Ping via gRPC -> {'answered' if result.ok else 'FAILED'} "
              f"in {result.latency_ms:.1f} ms ({result.detail})")
        worst = worst or (0 if result.ok else 1)
    return worst


def cmd_health(settings: Settings, _args: argparse.Namespace) -> int:
    """The image's HEALTHCHECK: sockguard answers, the egress proxy listens, the agent reports."""
    problems = []
    sock_path = settings.docker_host.removeprefix("unix://")
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(3)
            s.connect(sock_path)
            s.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            if b" 200 " not in s.recv(128):
                problems.append("sockguard did not answer /_ping with 200")
    except OSError as exc:
        problems.append(f"sockguard: {exc}")
    try:
        socket.create_connection(("127.0.0.1", settings.egress_port), timeout=3).close()
    except OSError as exc:
        problems.append(f"egress proxy: {exc}")
    status = read_status(settings.state_dir)
    if status is None or time.time() - status.updated > 120:
        problems.append("agent: no status written in the last 120 s")
    for problem in problems:
        print(f"unhealthy: {problem}", file=sys.stderr)
    return 1 if problems else 0


def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    from appliance.doctor import run_doctor

    return run_doctor(settings, probe_image=args.probe_image, as_json=args.json)


def cmd_keys_rotate(settings: Settings, _args: argparse.Namespace) -> int:
    from appliance.agent.identity import KeyFile, rotate_key
    from appliance.agent.transport import GatewayClient, GatewayError, https_client

    if not settings.control_plane_url:
        print("airlock keys rotate: AIRLOCK_CONTROL_PLANE_URL is not set (a standalone appliance has no key to "
              "rotate)", file=sys.stderr)
        return 2
    client = GatewayClient(https_client(settings.control_plane_url, settings.ca_file), KeyFile(settings.state_dir))
    try:
        answer = rotate_key(client, settings.state_dir)
    except GatewayError as exc:
        print(f"airlock keys rotate: refused by the control plane: {exc}", file=sys.stderr)
        return 1
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(answer["previousKeyValidUntil"]))
    print(f"rotated {answer['agentId']}: now signing with {answer['keyId']}; the control plane accepts "
          f"{answer['previousKeyId']} until {until}. The agent and the metadata relay switch to the new key "
          "by themselves.")
    return 0


def cmd_bundle_keygen(_settings: Settings, args: argparse.Namespace) -> int:
    """A signing key for bundles (0600) and its public half next to it, the file importers pass as --trust-key."""
    from protocol.keys import SigningKey

    key, created = SigningKey.load_or_create(args.key)
    public = Path(f"{args.key}.pub")
    public.write_text(key.public_pem())
    print(f"airlock: {'created' if created else 'kept'} {args.key} ({key.key_id})")
    print(f"airlock: public key for importers (--trust-key): {public}")
    return 0


def cmd_bundle_export(_settings: Settings, args: argparse.Namespace) -> int:
    from appliance.bundle import DEFAULT_IMAGES, BundleError, DockerEngine, export_bundle
    from protocol.errors import SignatureError
    from protocol.keys import SigningKey

    refs = list(args.image) if args.only else [*DEFAULT_IMAGES, *args.image]
    started = time.monotonic()
    try:
        key = SigningKey.load(args.key)
        manifest = export_bundle(DockerEngine(), refs, Path(args.out), key)
    except FileNotFoundError:
        print(f"airlock: no signing key at {args.key} (create one: airlock bundle keygen --key {args.key})",
              file=sys.stderr)
        return 2
    except (BundleError, SignatureError) as exc:
        print(f"airlock: export failed: {exc}", file=sys.stderr)
        return 1
    size = Path(args.out).stat().st_size
    print(f"airlock: wrote {args.out}: {len(manifest.images)} images, {size / 1e6:,.1f} MB, signed by {key.key_id}, "
          f"in {time.monotonic() - started:.1f} s")
    return 0


def cmd_bundle_import(_settings: Settings, args: argparse.Namespace) -> int:
    """Verify everything (signature, members, every image's sha256) before the first docker load."""
    from appliance.bundle import BundleError, DockerEngine, load_trust_key, load_verified, preflight, verify_bundle

    allowlist = None if args.no_allowlist else Path(args.allowlist)
    started = time.monotonic()
    try:
        preflight(allowlist)
        verified = verify_bundle(args.bundle, load_trust_key(args.trust_key))
        verified_at = time.monotonic()
        loaded = load_verified(verified, DockerEngine(), allowlist)
    except BundleError as exc:
        print(f"airlock: bundle refused: {exc}", file=sys.stderr)
        return 1
    done = time.monotonic()
    for item in loaded:
        print(f"  {item.image.image_id[:19]}  {', '.join(item.image.tags) or '(no tag)'}"
              f"{'  + allowlisted' if item.allowlisted else ''}")
    print(f"airlock: imported {len(loaded)} images signed by {verified.key_id} (verify {verified_at - started:.1f} s, "
          f"load {done - verified_at:.1f} s)")
    if allowlist is not None and any(item.allowlisted for item in loaded):
        print(f"airlock: digest allowlist {allowlist} extended; restart the appliance to apply it")
    return 0


def cmd_images_allow(settings: Settings, args: argparse.Namespace) -> int:
    from appliance.policy import operator

    return _edit_operator_images(args.image, operator.add_entry, "allowed", "already allowed")


def cmd_images_revoke(settings: Settings, args: argparse.Namespace) -> int:
    from appliance.policy import operator

    return _edit_operator_images(args.image, operator.remove_entry, "revoked", "was not in the operator's allowlist")


def _edit_operator_images(refs: list[str], change, done: str, unchanged: str) -> int:
    """Validate every reference and the current file first; then one atomic write. Nothing changes on error."""
    from appliance.policy import operator

    path = operator.operator_file()
    try:
        entries = [operator.parse_reference(ref) for ref in refs]
        images = operator.read_operator_images(path)
        changed = []
        for entry in entries:
            images, did = change(images, entry)
            print(f"airlock: {entry} {done if did else unchanged}")
            changed.append(did)
        if any(changed):
            operator.write_operator_images(path, images)
            print(f"airlock: {path} updated; sockguard and the agent apply it now (no restart)")
    except PolicyError as exc:
        print(f"airlock: refused: {exc}", file=sys.stderr)
        return 2
    return 0


SOCKGUARD_USER = "airlock-sockguard"  # the only reader of a registry's login (images/appliance: its own uid)


def cmd_registry_add(settings: Settings, args: argparse.Namespace) -> int:
    """List a registry to pull from by digest; with --username, read the password from stdin into a file only
    sockguard can read (0600, its uid). The agent never sees it: sockguard adds the login to each pull."""
    import pwd

    from appliance.policy import operator
    from protocol.files import write_atomic

    path = operator.operator_file()
    try:
        images = operator.read_operator_images(path)
        credentials = None
        if args.username:
            password = sys.stdin.readline().rstrip("\n")
            if not password:
                raise UsageError("images registry add", "--username needs the password on stdin")
            credentials = operator.credentials_file_name(args.host)
            images = operator.set_registry(images, args.host, credentials=credentials)
            target = path.parent / credentials
            write_atomic(target, json.dumps({"username": args.username, "password": password}), mode=0o600)
            with contextlib.suppress(KeyError):  # outside the appliance image (tests): the owner stays as is
                os.chown(target, pwd.getpwnam(SOCKGUARD_USER).pw_uid, -1)
        else:
            images = operator.set_registry(images, args.host, credentials=None)
        operator.write_operator_images(path, images)
    except (PolicyError, UsageError) as exc:
        print(f"airlock: refused: {exc}", file=sys.stderr)
        return 2
    print(f"airlock: pulls by digest from {args.host} allowed" + (" with a login" if credentials else "")
          + "; allow its repositories with `airlock images allow HOST/REPO` (globs allowed)")
    return 0


def cmd_registry_remove(settings: Settings, args: argparse.Namespace) -> int:
    from appliance.policy import operator

    path = operator.operator_file()
    try:
        images = operator.read_operator_images(path)
        old = next((r for r in images.registries if r.host == args.host), None)
        images, removed = operator.remove_registry(images, args.host)
        if removed:
            operator.write_operator_images(path, images)
            if old is not None and old.credentials:
                (path.parent / old.credentials).unlink(missing_ok=True)
    except PolicyError as exc:
        print(f"airlock: refused: {exc}", file=sys.stderr)
        return 2
    print(f"airlock: {args.host} " + ("removed" if removed else "was not listed"))
    return 0


def cmd_images_list(settings: Settings, args: argparse.Namespace) -> int:
    from appliance.policy import operator
    from appliance.policy.imported import IMPORTED_FILE, read_imported

    rows: list[dict[str, str]] = []
    try:
        baked = load_policy(settings.policy_dir).images
        imported = {i.digest for i in read_imported(Path(settings.policy_dir) / IMPORTED_FILE)}
    except PolicyError as exc:
        print(f"airlock: policy refused: {exc}", file=sys.stderr)
        return 2
    rows += [{"kind": "name", "value": n, "source": "policy/images.yaml"} for n in baked.names]
    rows += [{"kind": "digest", "value": d, "source": "bundle import" if d in imported else "policy/images.yaml"}
             for d in baked.digests]
    path = operator.operator_file()
    error = None
    try:
        listed = operator.read_operator_images(path)
        rows += [{"kind": e.kind, "value": e.value, "source": "operator", "added": e.added} for e in listed.entries]
        rows += [{"kind": "pull", "value": r.host + (" (login)" if r.credentials else ""), "source": "operator",
                  "added": r.added} for r in listed.registries]
    except PolicyError as exc:
        error = str(exc)
    if args.json:
        print(json.dumps({"operator_file": str(path), "error": error, "allow": rows}, indent=2))
    else:
        print(f"{'KIND':<7} {'SOURCE':<19} VALUE")
        for row in rows:
            print(f"{row['kind']:<7} {row['source']:<19} {row['value']}")
        print(f"operator allowlist: {path}" + ("" if path.exists() else " (none yet)"))
    if error:
        print(f"airlock: the operator allowlist is ignored until fixed: {error}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airlock", description="airlock appliance")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check-config", help="validate policy/*.yaml and locations.yaml").set_defaults(func=cmd_check_config)
    p = sub.add_parser("status", help="code locations and their state")
    p.add_argument("--wait", choices=[s.value for s in State], help="wait until every location is in this state")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("ping", help="Dagster gRPC Ping a location's code server")
    p.add_argument("location")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_ping)
    sub.add_parser("health", help="container health check").set_defaults(func=cmd_health)
    p = sub.add_parser("doctor", help="what this Docker engine enforces, checked by a probe container")
    p.add_argument("--probe-image", help="image for the probe container (default: the first location's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)
    keys = sub.add_parser("keys", help="the appliance key").add_subparsers(dest="action", required=True)
    keys.add_parser("rotate", help="register a new key with the control plane (signed by the current one) and "
                                   "switch to it").set_defaults(func=cmd_keys_rotate)
    images = sub.add_parser("images", help="the operator's image allowlist (live: no restart)").add_subparsers(
        dest="images_command", required=True)
    for name, func, text in (("allow", cmd_images_allow, "allow images for code locations and runs"),
                             ("revoke", cmd_images_revoke, "take images off the operator's allowlist")):
        p = images.add_parser(name, help=text)
        p.add_argument("image", nargs="+", help="a repository ('acme/etl', or a glob 'acme/*'), an image id "
                                                "('sha256:<64 hex>') or 'repository@sha256:<digest>'; never a tag")
        p.set_defaults(func=func)
    registry = images.add_parser("registry", help="registries pulled from, by digest only").add_subparsers(
        dest="registry_command", required=True)
    p = registry.add_parser("add", help="pull code-location images from HOST (by digest), optionally with a login")
    p.add_argument("host", help="registry host[:port], e.g. registry.example.com or 127.0.0.1:5000")
    p.add_argument("--username", help="log in as this user; the password is read from stdin")
    p.set_defaults(func=cmd_registry_add)
    p = registry.add_parser("remove", help="stop pulling from HOST (and delete its login)")
    p.add_argument("host")
    p.set_defaults(func=cmd_registry_remove)
    p = images.add_parser("list", help="every allowed image and where the permission comes from")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_images_list)
    _add_bundle_parser(sub)
    return parser


def _add_bundle_parser(sub: argparse._SubParsersAction) -> None:
    """`airlock bundle keygen|export|import`: run on the host, against the real Docker engine."""
    bundle = sub.add_parser("bundle", help="air-gapped install: signed image bundles").add_subparsers(
        dest="bundle_command", required=True)
    p = bundle.add_parser("keygen", help="create a bundle signing key (and KEY.pub for importers)")
    p.add_argument("--key", required=True, help="private key file to create (0600)")
    p.set_defaults(func=cmd_bundle_keygen)
    p = bundle.add_parser("export", help="docker save the airlock images into one signed bundle")
    p.add_argument("--key", required=True, help="signing key (airlock bundle keygen)")
    p.add_argument("--out", required=True, help="bundle file to write")
    p.add_argument("--image", action="append", default=[], help="also export this user-code image (repeatable)")
    p.add_argument("--only", action="store_true", help="export only the --image images, not the airlock ones")
    p.set_defaults(func=cmd_bundle_export)
    p = bundle.add_parser("import", help="verify a bundle against a trusted key, then docker load it")
    p.add_argument("bundle", help="bundle file")
    p.add_argument("--trust-key", required=True, help="the exporter's public key (KEY.pub)")
    p.add_argument("--allowlist", default="/etc/airlock/images-imported.yaml",
                   help="digest allowlist to extend with the user-code images (mount it in the appliance at "
                        "/etc/airlock/policy/images-imported.yaml)")
    p.add_argument("--no-allowlist", action="store_true", help="load only; do not extend the digest allowlist")
    p.set_defaults(func=cmd_bundle_import)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"airlock: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(args.func(settings, args))


if __name__ == "__main__":
    main()
