"""The host agent: one Kafka reader per host for every service on it (`configbus agent`)."""

from configbus.agent.server import Agent, AgentSettings

__all__ = ["Agent", "AgentSettings"]
