"""The ``procmqtt`` command line: run, check, status, demo."""
