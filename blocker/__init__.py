"""blocker: a policy-enforcing DNS resolver for a fleet of managed smartphones."""

__version__ = "0.1.0"
