"""What a sharding run did: per-split counts, the slides skipped with why, one line per problem."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SplitCount:
    slides: int = 0
    samples: int = 0
    shards: int = 0


@dataclass
class ShardReport:
    """What a run did; ``ok`` is False when any slide, label row or annotation had a problem."""

    url: str
    counts: dict[str, SplitCount] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # slide path or id -> reason
    problems: list[str] = field(default_factory=list)  # one line each (labels CSV rows ...)
    notes: list[str] = field(default_factory=list)  # lines worth showing that are no problem
    done_before: int = 0  # slides already finished by an earlier run
    new_samples: int = 0
    seconds: float = 0.0
    published: bool = False  # manifest.parquet and dataset.json written (some slide was read)

    @property
    def ok(self) -> bool:
        return not self.skipped and not self.problems

    @property
    def tiles_per_s(self) -> float:
        return self.new_samples / self.seconds if self.seconds > 0 else 0.0

    def drop(self, found: dict[str, str], problems: list[str], skip: dict[str, str]) -> None:
        """Record an input check's problem lines and take the slides it skips out of ``found``."""
        self.problems.extend(problems)
        for sid, reason in skip.items():
            self.skipped[found.pop(sid)] = reason
