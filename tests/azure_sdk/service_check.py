"""Microsoft's azure-iot-hub service SDK against the fake IoT Hub.

Usage: service_check.py SERVICE_CONNECTION_STRING DEVICE_ID
(REQUESTS_CA_BUNDLE points at the test CA.) Updates desired properties, invokes
a direct method, reads the twin back, and prints one JSON line with the results.
"""
import json
import sys

from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties


def main():
    conn, device = sys.argv[1], sys.argv[2]
    rm = IoTHubRegistryManager.from_connection_string(conn)
    before = rm.get_twin(device)
    patch = Twin(properties=TwinProperties(desired={"colour": "blue", "level": 3}))
    after = rm.update_twin(device, patch, before.etag)
    call = CloudToDeviceMethod(method_name="echo", payload={"x": 1}, response_timeout_in_seconds=30)
    res = rm.invoke_device_method(device, call)
    twin = rm.get_twin(device)
    offline = None
    try:
        rm.invoke_device_method("nobody", CloudToDeviceMethod(method_name="echo", payload=None))
    except Exception as e:  # the SDK raises HttpOperationError
        offline = getattr(getattr(e, "response", None), "status_code", str(e))
    print(json.dumps({
        "desired_version": after.properties.desired.get("$version"),
        "desired": {k: v for k, v in after.properties.desired.items() if not k.startswith("$")},
        "method_status": res.status,
        "method_payload": res.payload,
        "reported": {k: v for k, v in twin.properties.reported.items() if not k.startswith("$")},
        "offline_status": offline,
    }), flush=True)


if __name__ == "__main__":
    main()
