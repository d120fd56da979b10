"""The worker processes: the user's ``Worker`` subclass, its loops, and its link to the agent."""
