import paho.mqtt.client as mqtt
import pytest

pytestmark = pytest.mark.integration


def test_mosquitto_fixture_accepts_an_mqtt5_connection(mosquitto):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fixture-probe", protocol=mqtt.MQTTv5)
    host, port = mosquitto.address.split(":")
    assert client.connect(host, int(port)) == mqtt.MQTT_ERR_SUCCESS
    client.disconnect()
