"""Storage RPC: run workers' instance storage calls, executed on the control plane's instance in scope."""
