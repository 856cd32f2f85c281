"""On-prem configuration: the Postgres URL the control plane builds, and its Dagster instance file."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
import yaml

from controlplane.settings import ControlPlaneSettings

IMAGE = Path(__file__).resolve().parents[2] / "images" / "controlplane"


def test_postgres_url_from_the_environment_with_the_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("p@ss/w:rd\n")
    env = {"AIRLOCK_CP_POSTGRES_HOST": "postgres", "AIRLOCK_CP_POSTGRES_PASSWORD_FILE": str(secret)}
    url = sa.make_url(ControlPlaneSettings.from_env(env).database_url)
    assert (url.drivername, url.host, url.port, url.username, url.database) == (
        "postgresql+psycopg2", "postgres", 5432, "airlock", "airlock")
    assert url.password == "p@ss/w:rd"
    assert "p@ss" not in url.render_as_string(hide_password=True)


def test_an_explicit_url_wins_and_sqlite_is_the_default() -> None:
    assert ControlPlaneSettings.from_env({"AIRLOCK_CP_DB": "sqlite://", "AIRLOCK_CP_POSTGRES_HOST": "pg"}) \
        .database_url == "sqlite://"
    settings = ControlPlaneSettings.from_env({"AIRLOCK_CP_STATE_DIR": "/s"})
    assert (settings.database_url, settings.tls_dir) == ("sqlite:////s/cp.db", "/s/tls")


def test_the_postgres_instance_differs_from_the_default_only_in_storage() -> None:
    default = yaml.safe_load((IMAGE / "dagster.yaml").read_text())
    postgres = yaml.safe_load((IMAGE / "dagster-postgres.yaml").read_text())
    storage = postgres.pop("storage")
    assert "storage" not in default and postgres == default
    db = storage["postgres"]["postgres_db"]
    assert db["password"] == {"env": "AIRLOCK_CP_POSTGRES_PASSWORD"}  # never written into the file
    assert db["scheme"] == "postgresql+psycopg2"
