"""The device side's one root error: everything the agent raises for people to read derives from it."""


class AgentError(Exception):
    """A failure the agent or its CLI reports as one line (what failed, the value, the fix)."""


class ConfigError(AgentError):
    """The agent's configuration is invalid; the daemon exits 78 (EX_CONFIG)."""
