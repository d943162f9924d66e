"""User groups: public attributes (age band, gender, region, interest) and a one-hot feature vector.

The hidden preferences live in the World (they are derived from the world's seed), not here: a
UserGroup is what a logged dataset may show.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ATTRIBUTES", "GROUP_FEATURE_NAMES", "UserGroup", "draw_groups", "MAX_GROUPS"]

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "age_band": ("18-24", "25-34", "35-44", "45-54", "55+"),
    "gender": ("female", "male"),
    "region": ("north", "south", "east", "west"),
    "interest": ("fashion", "tech", "outdoors", "food", "beauty", "home", "sports", "travel"),
}
GROUP_FEATURE_NAMES: tuple[str, ...] = tuple(
    f"{name}={value}" for name, values in ATTRIBUTES.items() for value in values
)
MAX_GROUPS = 64


@dataclass(frozen=True)
class UserGroup:
    group_id: int
    age_band: str
    gender: str
    region: str
    interest: str

    @property
    def attributes(self) -> dict[str, str]:
        return {"age_band": self.age_band, "gender": self.gender, "region": self.region, "interest": self.interest}

    @property
    def features(self) -> np.ndarray:
        """One-hot attribute vector in GROUP_FEATURE_NAMES order (19 values, four of them 1)."""
        attrs = self.attributes
        return np.array(
            [1.0 if attrs[name] == value else 0.0 for name, values in ATTRIBUTES.items() for value in values]
        )

    @property
    def name(self) -> str:
        return f"{self.age_band} {self.gender} {self.region} {self.interest}"

    def record(self) -> dict:
        """The group's entry in groups.json (public attributes only, never the hidden preferences)."""
        return {"group_id": self.group_id, **self.attributes, "features": [int(v) for v in self.features]}


def draw_groups(n_groups: int, rng: np.random.Generator) -> list[UserGroup]:
    """n distinct groups; interests cycle through a shuffled order so 8 groups cover all 8 interests."""
    if not 1 <= n_groups <= MAX_GROUPS:
        raise ValueError(f"n_groups must be from 1 to {MAX_GROUPS}, got {n_groups}")
    interests = ATTRIBUTES["interest"]
    order = rng.permutation(len(interests))
    groups: list[UserGroup] = []
    seen: set[tuple[str, ...]] = set()
    while len(groups) < n_groups:
        interest = interests[int(order[len(groups) % len(interests)])]
        combo = (
            ATTRIBUTES["age_band"][int(rng.integers(len(ATTRIBUTES["age_band"])))],
            ATTRIBUTES["gender"][int(rng.integers(len(ATTRIBUTES["gender"])))],
            ATTRIBUTES["region"][int(rng.integers(len(ATTRIBUTES["region"])))],
            interest,
        )
        if combo in seen:
            continue
        seen.add(combo)
        groups.append(UserGroup(len(groups), *combo))
    return groups
