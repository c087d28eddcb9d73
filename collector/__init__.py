"""The Fleetmend collector service and the operators' CLI."""

__version__ = "0.1.0"
