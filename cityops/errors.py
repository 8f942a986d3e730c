"""One exception root for cityops; foreign errors are translated where they enter."""

from __future__ import annotations


class CityopsError(Exception):
    """Root of every error cityops raises on purpose."""


class ConfigError(CityopsError):
    """A setting is missing or invalid; the message names it."""


class DatabaseError(CityopsError):
    """The database refused or could not be reached."""


class MigrationError(DatabaseError):
    """A migration could not be applied."""


class EmbeddedServiceError(CityopsError):
    """An embedded PostgreSQL or broker could not be started."""


class ImportFileError(CityopsError):
    """A device file has bad lines; nothing was imported."""

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        self.problems = problems
        shown = "\n".join(f"  line {line}: {why}" for line, why in problems[:50])
        more = f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} bad line(s), nothing imported:\n{shown}{more}")
