"""``python tests/fdhog.py ARGS``: procmqtt's CLI with ~1,100 descriptors already open (and the
limit raised to allow more), so every socket and pipe procmqtt creates, and every child inherits,
is numbered above 1023: ``select``'s FD_SETSIZE. Used by tests/test_agent_loop.py."""

from __future__ import annotations

import os
import resource
import sys

HELD = 1100

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(HELD)]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from procmqtt.cli.main import entry  # noqa: E402 - after the descriptors are taken

sys.argv[0] = "procmqtt"
entry()
