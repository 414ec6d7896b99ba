"""The search the autotuner runs in one shape bucket: defaults first, slow backends dropped, then each stage's
knobs one stage at a time around the current best (greedy coordinate search), never the full product.

:class:`BucketSearch` is independent of KDA: it is given the backends' defaults and search spaces and a
``measure(backend, config) -> (ms or None, reason or None)`` callable, and hands the record it has so far to
``save`` after every measured config, so an interrupted run keeps every result and a rerun replays the timings
it already has (``prior``) instead of measuring them again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .buckets import with_bit_changing

DROP_RATIO = 1.5  # a backend whose default is slower than this times the best default is not searched
# Another backend replaces the one the dispatch runs untuned only when faster by more than this factor: the switch
# costs a second code path and its compile on a cold start (TileLang: 6-36 s per kernel), so a gain within timing
# noise does not pay (H200, 2026-12-02: TileLang decode 0.0842 ms against Triton's 0.0854 ms, safe gate)
SWITCH_MARGIN = 1.03


class OutOfTime(Exception):
    """Raised by ``measure`` when the time budget is spent; the search stops and keeps what it has."""


def stage_of(config: dict) -> frozenset:
    """The stage a search-space entry tunes: the prefixes (before the first ``_``, the second for the
    backward's ``bwd_`` knobs) of the knobs it sets, e.g. ``{"state_BV": 32, "state_warps": 8}`` ->
    ``{"state"}``, ``{"o_BK": 64}`` -> ``{"o"}``, ``{"bwd_state_BV": 32}`` -> ``{"bwd_state"}``."""
    return frozenset("_".join(key.split("_")[:2 if key.startswith("bwd_") else 1]) for key in config)


def stages(configs: list[dict]) -> list[list[dict]]:
    """The moves of each stage, stages in order of first appearance (:func:`stage_of`; the default ``{}``
    dropped).  A stage whose configs are the full product of their knobs' values (e.g. V block x warps x
    stages) is searched one knob at a time: its moves are ``{knob: value}``; any other stage (coupled knobs,
    such as a layout and its thread count) moves by whole configs."""
    groups: dict[frozenset, list[dict]] = {}
    for config in configs:
        if config:
            groups.setdefault(stage_of(config), []).append(config)
    out = []
    for group in groups.values():
        knobs = list(dict.fromkeys(key for config in group for key in config))
        values = {knob: list(dict.fromkeys(c.get(knob) for c in group)) for knob in knobs}
        product = 1
        for vals in values.values():
            product *= len(vals)
        full = len(knobs) > 1 and all(set(c) == set(knobs) for c in group) and \
            len({tuple(sorted(c.items(), key=str)) for c in group}) == product
        out.append([{knob: value} for knob in knobs for value in values[knob]] if full else group)
    return out


def _label(backend: str, config: dict) -> str:
    return f"{backend} {config}"


@dataclass
class Candidate:
    """A backend to search: its name, default config and search space."""

    name: str
    default: dict
    space: list[dict]


@dataclass
class BucketSearch:
    key: str
    candidates: list[Candidate]
    measure: Callable[[str, dict], tuple]
    save: Callable[[dict], None] = lambda record: None
    log: Callable[[str], None] = print
    step: Callable[[str], None] = lambda text: None
    fixed: tuple | None = None        # (backend, bit-changing knobs) of the sequence class's anchor
    untuned: str | None = None        # the backend the dispatch runs without a table
    prior: dict | None = None         # the record an earlier, interrupted run left
    max_configs: int | None = None    # per backend, default included
    extra: dict = field(default_factory=dict)  # fields copied into the record (shape, skipped...)
    timed: list = field(default_factory=list)  # [backend, config, ms or None, reason or None]
    unfit: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)
    done: bool = False

    # ------------------------------------------------------------------------------------------ the record
    def record(self) -> dict | None:
        # the winner comes from the backend and bit-changing knobs the sequence class fixed (others, such as the
        # untuned dispatch's default, are timed for the gain only)
        good = [(ms, name, cfg) for name, cfg, ms, _ in self.timed if ms is not None and self._allowed(name, cfg)]
        if not good:
            return None
        ms, backend, config = min(good, key=lambda t: t[0])
        home = min((t for t in good if t[1] == self.untuned), key=lambda t: t[0], default=None)
        if home is not None and backend != self.untuned and ms * SWITCH_MARGIN >= home[0]:
            ms, backend, config = home   # not worth leaving the untuned backend
        per_backend = {}
        for t_ms, name, cfg in sorted(good, key=lambda t: t[0]):
            per_backend.setdefault(name, {"config": cfg, "time_ms": t_ms})
        plain = {c.name: c.default for c in self.candidates}   # what the dispatch runs without a table
        defaults = {name: (cfg, t) for name, cfg, t, _ in self.timed if t is not None and cfg == plain.get(name)}
        untuned = self.untuned if self.untuned in defaults else min(defaults, key=lambda n: defaults[n][1],
                                                                   default=None)
        record = {"backend": backend, "config": config, "time_ms": ms, "bucket": self.key,
                  "per_backend": per_backend, "candidates": len(self.timed),
                  "rejected": {_label(n, c): why for n, c, t, why in self.timed if why},
                  "unfit": dict(self.unfit), "dropped": dict(self.dropped), "done": self.done,
                  "anchor": self.fixed is None, "timed": [list(entry) for entry in self.timed], **self.extra}
        if untuned is not None:
            record["default"] = {"backend": untuned, "config": defaults[untuned][0], "time_ms": defaults[untuned][1]}
        return record

    def _allowed(self, name: str, config: dict) -> bool:
        """Whether ``config`` of backend ``name`` may win: the class's backend and bit-changing knobs."""
        return self.fixed is None or (name == self.fixed[0] and self._constrain(name, config) == config)

    # ---------------------------------------------------------------------------------------- measuring
    def _start(self, cand: Candidate) -> dict:
        if self.fixed is not None:
            return with_bit_changing(cand.name, cand.default, self.fixed[1])
        return dict(cand.default)

    def _constrain(self, name: str, config: dict) -> dict:
        return with_bit_changing(name, config, self.fixed[1]) if self.fixed is not None else config

    def _time(self, name: str, config: dict, counts: dict) -> tuple:
        """(ms or None, reason or None) of one config, measured at most once per run."""
        for entry in self.timed:
            if entry[0] == name and entry[1] == config:
                return entry[2], entry[3]
        if self.max_configs is not None and counts.get(name, 0) >= self.max_configs:
            return None, None
        counts[name] = counts.get(name, 0) + 1
        replay = next((e for e in (self.prior or {}).get("timed", []) if e[0] == name and e[1] == config), None)
        if replay is not None:
            ms, why = replay[2], replay[3]
        else:
            ms, why = self.measure(name, dict(config))
        self.timed.append([name, dict(config), ms, why])
        self.step(f"{self.key} {name} config {counts[name]}: " +
                  (f"{ms:.3f} ms" if ms is not None else f"rejected ({why[:60]})") +
                  (" (from the earlier run)" if replay is not None else ""))
        record = self.record()
        if record is not None:
            self.save(record)
        return ms, why

    def run(self) -> dict | None:
        """Search; the final record (``done`` True), or the partial one when ``measure`` raised OutOfTime."""
        counts: dict[str, int] = {}
        try:
            cands = [c for c in self.candidates if self.fixed is None or c.name == self.fixed[0]]
            defaults = {}
            for cand in cands:
                ms, why = self._time(cand.name, self._start(cand), counts)
                if ms is not None:
                    defaults[cand.name] = ms
                elif why and not why.startswith("crashed"):
                    self.unfit[cand.name] = why  # outside the dtype's tolerance: never picked for this dtype
                    self.log(f"{self.key}: {cand.name} not searched: its default config {why}")
            if defaults:
                best = min(defaults.values())
                for name, ms in defaults.items():
                    if ms > DROP_RATIO * best:
                        self.dropped[name] = f"default {ms:.3f} ms > {DROP_RATIO}x the best default {best:.3f} ms"
                        self.log(f"{self.key}: dropped {name}: {self.dropped[name]}")
            untuned = next((c for c in self.candidates if c.name == self.untuned), None)
            if untuned is not None:  # the gain is measured against what the dispatch runs without a table
                self._time(untuned.name, dict(untuned.default), counts)
            for cand in cands:
                if cand.name not in defaults or cand.name in self.dropped:
                    continue
                current, current_ms = self._start(cand), defaults[cand.name]
                for stage in stages(cand.space):   # one stage at a time, around the current best
                    for alt in stage:
                        config = self._constrain(cand.name, {**current, **alt})
                        ms, _ = self._time(cand.name, config, counts)
                        if ms is not None and ms < current_ms:
                            current, current_ms = config, ms
            self.done = True
        except OutOfTime:
            pass
        record = self.record()
        if record is not None:
            self.save(record)
        return record
