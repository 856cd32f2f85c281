"""Hardened user containers from policy: specs, networks, and the Docker calls that make them."""
