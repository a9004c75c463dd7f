"""Experience replay for continual learning: a per-skill exemplar buffer filled by reservoir sampling.

A :class:`ReplayBuffer` keeps up to ``capacity_per_skill`` items for every skill. Items arrive as a
stream per skill (:meth:`ReplayBuffer.add`); reservoir sampling (Vitter's algorithm R) keeps each
skill's buffer a uniform sample without replacement of everything that skill has seen, whatever the
stream's length. :meth:`ReplayBuffer.mix` puts replayed items from earlier skills into a batch of the
current skill.

Items are any JSON-able values (example dicts, dataset indices, ...): they are stored as their JSON
round trip (tuples become lists), so :meth:`ReplayBuffer.state_dict` is plain JSON and
:meth:`ReplayBuffer.load_state_dict` restores the buffer exactly, its random state included: a resumed
run draws the same items as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["MIX_MODES", "ReplayBuffer", "ReplayConfig"]

#: How :meth:`ReplayBuffer.mix` adds replay items to a batch.
MIX_MODES = ("replace", "append")

Generator = random.Random | torch.Generator


@dataclass
class ReplayConfig:
    """Settings of a :class:`ReplayBuffer`.

    Attributes:
        capacity_per_skill: Items kept per skill (>= 1).
        ratio: Default fraction of a mixed batch that is replay (see :meth:`ReplayBuffer.mix`), in
            [0, 1] for ``mode="replace"`` and [0, 1) for ``mode="append"``.
        mode: ``"replace"`` (the batch keeps its size) or ``"append"`` (replay items are added).
        seed: Seed of the buffer's own ``random.Random`` (reservoir decisions and default draws).
    """

    capacity_per_skill: int = 256
    ratio: float = 0.25
    mode: str = "replace"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("capacity_per_skill", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.mode not in MIX_MODES:
            raise ValueError(f"mode must be one of {MIX_MODES}, got {self.mode!r}")
        self.ratio = _check_ratio(self.ratio, self.mode, "ratio")


def _check_ratio(ratio: object, mode: str, name: str) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise ValueError(f"{name} must be a finite number, got {ratio!r}")
    if mode == "replace" and not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] with mode='replace', got {ratio!r}")
    if mode == "append" and not 0.0 <= ratio < 1.0:
        raise ValueError(f"{name} must be in [0, 1) with mode='append', got {ratio!r}")
    return float(ratio)


def _check_skill(skill: object) -> Hashable:
    if isinstance(skill, bool) or not isinstance(skill, (int, str)):
        raise ValueError(f"skill must be an int or a str, got {skill!r}")
    return skill


def _jsonable(item: object) -> Any:
    """``item``'s JSON round trip (a private copy), or ValueError."""
    try:
        return json.loads(json.dumps(item, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"replay items must be JSON-able, got {type(item).__name__}: {err}") from err


def _choose(total: int, n: int, generator: Generator, replace: bool) -> list[int]:
    """``n`` indices into ``range(total)``: distinct unless ``replace``."""
    if isinstance(generator, torch.Generator):
        if replace:
            return torch.randint(total, (n,), generator=generator).tolist()
        return torch.randperm(total, generator=generator)[:n].tolist()
    if replace:
        return [generator.randrange(total) for _ in range(n)]
    return generator.sample(range(total), n)


class ReplayBuffer:
    """Per-skill exemplar buffers, each a uniform reservoir sample of its skill's stream.

    Args:
        config: Capacity, default mix ratio and mode, and seed; :class:`ReplayConfig`'s defaults when
            omitted.

    Raises:
        ValueError: If ``config`` is not a :class:`ReplayConfig`.
    """

    def __init__(self, config: ReplayConfig | None = None) -> None:
        config = ReplayConfig() if config is None else config
        if not isinstance(config, ReplayConfig):
            raise ValueError(f"config must be a ReplayConfig, got {type(config).__name__}")
        self.config = config
        self._rng = random.Random(config.seed)
        self._items: dict[Hashable, list[Any]] = {}
        self._seen: dict[Hashable, int] = {}

    # ------------------------------------------------------------------ contents
    @property
    def skills(self) -> list[Hashable]:
        """The skills with a buffer, in the order they were first added."""
        return list(self._items)

    def items(self, skill: int | str) -> list[Any]:
        """A copy of one skill's stored items (empty for an unknown skill)."""
        return list(self._items.get(skill, []))

    def seen(self, skill: int | str) -> int:
        """How many items of ``skill`` were offered to :meth:`add` in total."""
        return self._seen.get(skill, 0)

    def __len__(self) -> int:
        """Items stored over all skills."""
        return sum(len(v) for v in self._items.values())

    def add(self, skill: int | str, items: Iterable[Any]) -> None:
        """Offer a skill's next items to its reservoir (algorithm R).

        The t-th item of a skill (1-based, counted over all calls) is stored while the buffer has room;
        afterwards it replaces a uniformly chosen stored item with probability capacity / t. So after
        any number of items, each one seen is stored with the same probability.

        Args:
            skill: The skill (an int, e.g. a :class:`~riemix.continual.NoveltyDetector` index, or a str).
            items: JSON-able items, stored as their JSON round trip.

        Raises:
            ValueError: If ``skill`` is not an int or str, or an item is not JSON-able (nothing is
                added then).
        """
        skill = _check_skill(skill)
        if isinstance(items, (str, bytes, dict)):
            raise ValueError(f"items must be an iterable of items, got a {type(items).__name__}")
        new = [_jsonable(item) for item in items]
        buf = self._items.setdefault(skill, [])
        cap = self.config.capacity_per_skill
        for item in new:
            self._seen[skill] = t = self._seen.get(skill, 0) + 1
            if len(buf) < cap:
                buf.append(item)
            else:
                j = self._rng.randrange(t)  # uniform in [0, t)
                if j < cap:
                    buf[j] = item

    # ------------------------------------------------------------------ drawing
    def _pool(self, exclude: Iterable[int | str] | int | str | None) -> list[Any]:
        if exclude is None:
            excluded: set = set()
        elif isinstance(exclude, (int, str)):
            excluded = {exclude}
        else:
            excluded = set(exclude)
        return [item for skill, buf in self._items.items() if skill not in excluded for item in buf]

    def sample(
        self,
        n: int,
        generator: Generator | None = None,
        exclude: Iterable[int | str] | int | str | None = None,
        replace: bool = False,
    ) -> list[Any]:
        """Draw ``n`` stored items uniformly from the skills not excluded.

        The pool is every stored item of those skills (skills first added earlier come first, items
        in buffer order); the draw picks ``n`` positions uniformly, without replacement unless
        ``replace``, and returns those items in draw order.

        Args:
            n: Number of items (>= 0).
            generator: A ``random.Random`` or ``torch.Generator``; the buffer's own seeded
                ``random.Random`` (saved in :meth:`state_dict`) when None.
            exclude: A skill or skills whose items are not drawn (e.g. the current one).
            replace: Draw with replacement.

        Returns:
            The items (copies are not made: do not mutate them).

        Raises:
            ValueError: If ``n`` is not an int >= 0, ``generator`` has the wrong type, or more distinct
                items are asked for than the pool holds (or any with an empty pool).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        gen = self._rng if generator is None else generator
        if not isinstance(gen, (random.Random, torch.Generator)):
            raise ValueError(f"generator must be a random.Random or torch.Generator, got {type(gen).__name__}")
        pool = self._pool(exclude)
        if n and (not pool or (not replace and n > len(pool))):
            raise ValueError(f"n={n} items asked for but the replay pool holds {len(pool)}")
        return [pool[i] for i in _choose(len(pool), n, gen, replace)] if n else []

    def mix(
        self,
        batch_items: Sequence[Any],
        ratio: float | None = None,
        generator: Generator | None = None,
        exclude: Iterable[int | str] | int | str | None = None,
        mode: str | None = None,
    ) -> list[Any]:
        """Mix replayed items of earlier skills into a batch of the current skill.

        With B = ``len(batch_items)`` and ρ = ``ratio``, r replay items are drawn by :meth:`sample`
        (without replacement, or with it when the pool holds fewer than r items):

        * ``"replace"``: r = round(ρ·B); the result is B − r batch items, chosen uniformly and kept in
          their order, followed by the r replay items (length B).
        * ``"append"``: r = round(ρ·B / (1 − ρ)); the result is the whole batch followed by the r
          replay items (length B + r), so replay is a fraction ρ of it.

        ``round`` is Python's (half to even). With an empty pool (e.g. while learning the first skill)
        the batch is returned unchanged, as a new list.

        Args:
            batch_items: The current skill's batch.
            ratio: ρ, the fraction of the result that is replay; the config's when None.
            generator: As in :meth:`sample`; used for every draw here.
            exclude: The skill or skills not to replay, normally the current one.
            mode: ``"replace"`` or ``"append"``; the config's when None.

        Returns:
            The mixed list.

        Raises:
            ValueError: If ``mode`` is unknown, ``ratio`` is outside [0, 1] (``"replace"``) or [0, 1)
                (``"append"``), or ``generator`` has the wrong type.
        """
        mode = self.config.mode if mode is None else mode
        if mode not in MIX_MODES:
            raise ValueError(f"mode must be one of {MIX_MODES}, got {mode!r}")
        ratio = self.config.ratio if ratio is None else _check_ratio(ratio, mode, "ratio")
        gen = self._rng if generator is None else generator
        if not isinstance(gen, (random.Random, torch.Generator)):
            raise ValueError(f"generator must be a random.Random or torch.Generator, got {type(gen).__name__}")
        batch = list(batch_items)
        size = len(self._pool(exclude))
        if not size:
            return batch
        r = round(ratio * len(batch)) if mode == "replace" else round(ratio * len(batch) / (1.0 - ratio))
        replay = self.sample(r, gen, exclude, replace=r > size)
        if mode == "append":
            return batch + replay
        keep = sorted(_choose(len(batch), len(batch) - r, gen, replace=False))
        return [batch[i] for i in keep] + replay

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """The config, every skill's items and count, and the random state, as JSON-able data."""
        version, internal, gauss = self._rng.getstate()
        return {
            "config": asdict(self.config),
            "skills": [
                {"skill": skill, "seen": self._seen[skill], "items": list(buf)} for skill, buf in self._items.items()
            ],
            "rng": [version, list(internal), gauss],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output exactly (the config and random state too).

        Raises:
            ValueError: If ``state`` lacks a key, holds an invalid config, a skill twice, a count below
                its items, more items than the capacity, or an invalid random state.
        """
        missing = {"config", "skills", "rng"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        config = ReplayConfig(**state["config"])
        items: dict[Hashable, list[Any]] = {}
        seen: dict[Hashable, int] = {}
        for entry in state["skills"]:
            skill = _check_skill(entry["skill"])
            if skill in items:
                raise ValueError(f"skill {skill!r} appears twice in the state")
            buf = [_jsonable(item) for item in entry["items"]]
            if len(buf) > config.capacity_per_skill or entry["seen"] < len(buf):
                raise ValueError(
                    f"skill {skill!r}: {len(buf)} items with seen={entry['seen']} and "
                    f"capacity_per_skill={config.capacity_per_skill}"
                )
            items[skill], seen[skill] = buf, int(entry["seen"])
        rng = random.Random()
        try:
            version, internal, gauss = state["rng"]
            rng.setstate((version, tuple(internal), gauss))
        except (TypeError, ValueError) as err:
            raise ValueError(f"invalid rng state: {err}") from err
        self.config, self._rng, self._items, self._seen = config, rng, items, seen
