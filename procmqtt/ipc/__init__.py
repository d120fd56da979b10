"""How the processes talk: socket-pair channels, shared memory words, signals, waiting."""
