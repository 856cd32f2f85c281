"""The relay swaps the control plane's InstanceRef for the userland one before a call is queued for the user side.
Runs inside the control plane image, where Dagster (and so serdes) is installed."""

from __future__ import annotations

import json

from tests import harness

CHECK = r'''
import json, os, subprocess, sys
from dagster._core.instance.ref import InstanceRef
from dagster._core.remote_origin import RemoteRepositoryOrigin, GrpcServerCodeLocationOrigin
from dagster._grpc.types import SensorExecutionArgs, ExternalScheduleExecutionArgs
from dagster._serdes import serialize_value, deserialize_value
from controlplane.relay.scrub import scrub_instance_ref
from protocol.dagster_grpc import encode_echo, decode_echo

os.makedirs("/var/lib/airlock-cp/dagster", exist_ok=True)
ref = InstanceRef.from_dir("/var/lib/airlock-cp/dagster")
origin = RemoteRepositoryOrigin(GrpcServerCodeLocationOrigin(host="127.0.0.1", port=4100, location_name="example"),
                                "__repository__")
out = {}
sensor = SensorExecutionArgs(repository_origin=origin, instance_ref=ref, sensor_name="s", cursor="7")
schedule = ExternalScheduleExecutionArgs(repository_origin=origin, instance_ref=ref, schedule_name="sch",
                                         scheduled_execution_timestamp=None, log_key=None)
for method, args in [  # the daemon calls the unary Sync* forms; the streaming ones are the fallback
    ("/api.DagsterApi/ExternalSensorExecution", sensor), ("/api.DagsterApi/SyncExternalSensorExecution", sensor),
    ("/api.DagsterApi/ExternalScheduleExecution", schedule),
    ("/api.DagsterApi/SyncExternalScheduleExecution", schedule),
]:
    sent = encode_echo(serialize_value(args))
    scrubbed = deserialize_value(decode_echo(scrub_instance_ref(method, sent)))
    out[method] = {"before_has_path": "/var/lib/airlock-cp" in decode_echo(sent),
                   "after_has_path": "/var/lib/airlock-cp" in serialize_value(scrubbed),
                   "instance_ref": scrubbed.instance_ref.run_storage_data.class_name == "RelayRunStorage",
                   "kept": getattr(scrubbed, "cursor", None) or getattr(scrubbed, "schedule_name", None)}
untouched = b"\x0a\x03abc"
out["other"] = scrub_instance_ref("/api.DagsterApi/Ping", untouched) == untouched
try:
    scrub_instance_ref("/api.DagsterApi/ExternalSensorExecution", encode_echo("{not serdes"))
    out["junk"] = "relayed"
except ValueError:
    out["junk"] = "refused"
# The gateway process imports nothing of Dagster's on its own: scrub in a fresh interpreter too.
sent = encode_echo(serialize_value(SensorExecutionArgs(repository_origin=origin, instance_ref=ref, sensor_name="s")))
fresh = subprocess.run([sys.executable, "-c",
    "import sys; from controlplane.relay.scrub import scrub_instance_ref as s; "
    "from protocol.dagster_grpc import decode_echo; "
    "m = '/api.DagsterApi/ExternalSensorExecution'; "
    "print('/var/lib/airlock-cp' in decode_echo(s(m, bytes.fromhex(sys.argv[1]))))",
    sent.hex()], capture_output=True, text=True)
out["fresh_process"] = fresh.stdout.strip() or fresh.stderr[-300:]
print(json.dumps(out))
'''


def test_instance_ref_never_leaves_the_control_plane() -> None:
    image = harness.images()["controlplane"]
    container = harness.client().containers.run(image, ["python", "-c", CHECK], entrypoint=[], detach=True,
                                                user="10200:10200")
    try:
        assert container.wait(timeout=120)["StatusCode"] == 0, container.logs().decode()[-2000:]
        output = container.logs(stdout=True, stderr=False)
    finally:
        container.remove(v=True, force=True)  # the image declares a state VOLUME: do not leave it behind
    result = json.loads(output.decode().strip().splitlines()[-1])
    for prefix in ("", "Sync"):
        sensor = result[f"/api.DagsterApi/{prefix}ExternalSensorExecution"]
        schedule = result[f"/api.DagsterApi/{prefix}ExternalScheduleExecution"]
        assert sensor == {"before_has_path": True, "after_has_path": False, "instance_ref": True, "kept": "7"}, \
            (prefix, sensor)
        assert schedule == {"before_has_path": True, "after_has_path": False, "instance_ref": True,
                            "kept": "sch"}, (prefix, schedule)
    assert result["other"] is True and result["junk"] == "refused"
    assert result["fresh_process"] == "False", result["fresh_process"]
