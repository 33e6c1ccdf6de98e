"""The base of every rule model: strict, immutable, unknown keys refused."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RuleModel(BaseModel):
    """Base of the rule models: unknown fields are errors, instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def not_supported_yet(kind: str) -> ValueError:
    """The error for a rule kind the rules file names but this version cannot enforce."""
    return ValueError(f"{kind} rules are not supported yet by this version of ymguard")
