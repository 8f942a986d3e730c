"""cityops shared core: settings, domain model, catalogue, wire contract, database, CLI."""

__version__ = "0.1.0"
