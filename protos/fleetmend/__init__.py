"""Namespace of the Fleetmend wire contract; the generated code is in fleetmend.v1."""
