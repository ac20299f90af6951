"""The host side's one root error: the CLI turns it into ``Error: ...`` and exit code 1."""

from device_agent.formats import AgentError


class ToolchainError(Exception):
    """A failure people read as one line: what failed, the offending value, and the fix."""


# Device-side errors (bad bundle, bad statistics) reach host users through the same CLI path.
USER_ERRORS: tuple[type[BaseException], ...] = (ToolchainError, AgentError)
