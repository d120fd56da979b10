"""The agent process: holds the one broker connection and hands each message to a worker."""
