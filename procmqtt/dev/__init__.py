"""Tools for local development: the embedded broker and ``procmqtt demo``."""
