"""Runs on the control plane's side: the run launcher Dagster calls, and what a run container is given."""
