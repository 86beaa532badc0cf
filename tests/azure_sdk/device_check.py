"""Microsoft's azure-iot-device SDK against the fake IoT Hub.

Usage: device_check.py CONNECTION_STRING CA_PEM
Connects over MQTT/TLS (port 8883 of the connection string's host), reads the
twin, patches reported properties, sends a telemetry message, then prints READY
and waits for one desired-properties patch and one direct method call, which it
answers. Every step prints one JSON line; any failure exits non-zero.
"""
import json
import sys
import threading

from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse


def say(**kw):
    print(json.dumps(kw), flush=True)


def main():
    conn, ca = sys.argv[1], sys.argv[2]
    with open(ca) as f:
        cert = f.read()
    client = IoTHubDeviceClient.create_from_connection_string(
        conn, server_verification_cert=cert, keep_alive=30
    )
    got_patch = threading.Event()
    got_method = threading.Event()

    def on_patch(patch):
        say(step="desired", patch=patch)
        # The SDK also reports the twin's desired section after connecting.
        if "colour" in patch:
            got_patch.set()

    def on_method(req):
        say(step="method", name=req.name, payload=req.payload)
        client.send_method_response(
            MethodResponse.create_from_method_request(req, 200, {"echo": req.payload})
        )
        got_method.set()

    client.on_twin_desired_properties_patch_received = on_patch
    client.on_method_request_received = on_method
    client.connect()
    say(step="connected")
    twin = client.get_twin()
    say(step="twin", twin=twin)
    client.patch_twin_reported_properties({"sdk": "azure-iot-device", "nested": {"a": 1}})
    say(step="reported")
    msg = Message(json.dumps({"hello": "hub"}))
    msg.content_type = "application/json"
    msg.content_encoding = "utf-8"
    msg.custom_properties["kind"] = "greeting"
    client.send_message(msg)
    say(step="sent")
    say(step="READY")
    if not got_patch.wait(60) or not got_method.wait(60):
        say(step="timeout")
        sys.exit(3)
    client.shutdown()
    say(step="done")


if __name__ == "__main__":
    main()
