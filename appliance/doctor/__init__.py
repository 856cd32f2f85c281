"""`airlock doctor`: what this Docker engine really enforces, and whether sockguard and the proxy do."""

from appliance.doctor.report import run_doctor

__all__ = ["run_doctor"]
