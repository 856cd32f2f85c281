"""The metadata relay: the only service run workers can reach in the appliance (besides the egress proxy).

Run workers send their storage calls here with a per-run capability token. Writes go to a durable on-disk
spool first and are forwarded in order, batched and signed with the appliance key; other calls are answered
by the control plane once the run's earlier writes are through. User code never holds the appliance key.

    tokens.py     mint and verify per-run tokens; revocation when the run ends
    spool.py      the bounded, fsynced, per-run write-ahead log
    forwarder.py  spool -> control plane, in order, batched, retried
    app.py        the HTTP API for run workers, and the agent's control API on a Unix socket
    __main__.py   serve both
"""
