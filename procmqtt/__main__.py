from procmqtt.cli.main import entry

entry()
