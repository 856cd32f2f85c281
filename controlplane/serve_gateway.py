"""`python -m controlplane.serve_gateway`: the agent API gateway over TLS (uvicorn).

The control plane's signing key and TLS material are created on first start in the state directory.
uvicorn handles signals: the first stops accepting and drains in-flight requests (long polls end at
their wait), a second forces exit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
import uvicorn

from controlplane.gateway.app import build_app
from controlplane.settings import ControlPlaneSettings
from controlplane.tls import ensure_tls
from protocol.signing import SigningKey

log = logging.getLogger("airlock.controlplane")


def control_plane_key(state_dir: str) -> SigningKey:
    path = Path(state_dir) / "controlplane.key"
    try:
        return SigningKey.load(path)
    except FileNotFoundError:
        key = SigningKey.generate()
        key.save(path)
        return key


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(name)s: %(message)s")
    settings = ControlPlaneSettings.from_env()
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
    key = control_plane_key(settings.state_dir)
    tls = ensure_tls(Path(settings.state_dir) / "tls", list(settings.tls_hostnames))
    engine = sa.create_engine(settings.database_url, pool_pre_ping=True)
    app = build_app(engine, key)
    log.info("gateway on https://%s:%d, control plane key %s", settings.gateway_host, settings.gateway_port,
             key.key_id)
    uvicorn.run(app, host=settings.gateway_host, port=settings.gateway_port, ssl_certfile=str(tls.cert),
                ssl_keyfile=str(tls.key), timeout_graceful_shutdown=35, log_level="info",
                access_log=False)  # every request is in the audit log; one line per long poll is noise


if __name__ == "__main__":
    main()
