"""Policy as data: versioned YAML files -> validated, immutable model. See policy/*.yaml."""

from appliance.policy.loader import (
    DesiredSet,
    canonical_seccomp,
    desired_set_from_data,
    load_locations,
    load_policy,
    locations_from_data,
)
from appliance.policy.model import (
    Bounds,
    EgressAllow,
    EgressPolicy,
    Hardening,
    HostPort,
    ImagePolicy,
    Limits,
    Location,
    Policy,
)
from protocol.errors import PolicyError

__all__ = [
    "Bounds",
    "DesiredSet",
    "EgressAllow",
    "EgressPolicy",
    "Hardening",
    "HostPort",
    "ImagePolicy",
    "Limits",
    "Location",
    "Policy",
    "PolicyError",
    "canonical_seccomp",
    "desired_set_from_data",
    "load_locations",
    "load_policy",
    "locations_from_data",
]
