"""Self-healing on the laptop: typed rules, a fixed set of safe actions, records.

Rules come from the policy (agent.healing.policy), are evaluated on the latest
readings by the engine (agent.healing.engine) under their local limits, and
act only through the actions in agent.healing.actions, which is an allowlist
in code: nothing here runs a command or a script that comes from outside the
agent.
"""
