"""Installed into user-code images next to dagster; talks only to the appliance's metadata relay."""
