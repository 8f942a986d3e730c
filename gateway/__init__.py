"""MQTT gateway: session with manual acknowledgement, decoding, validation, dead letters."""
