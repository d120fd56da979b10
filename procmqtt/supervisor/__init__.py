"""The supervisor process: forks the agent and the workers, restarts, reloads, stops."""
