"""The fault harness's drain: it waits on progress, not on a fixed clock, and says why it gave up."""

from __future__ import annotations

from collections import Counter

from tests.chaos.harness import Scenario


def _scenario(sent: set[str], arrivals: list[set[str]]) -> Scenario:
    """A Scenario with only what drain() reads: the sent keys, and the keys each ledger has at
    each successive look (the last set repeats)."""
    s = Scenario.__new__(Scenario)
    s.sent = sent
    looks: list[int] = [0]

    def effects(variant: str) -> tuple[Counter[str], dict[str, int], list[float]]:
        i = min(looks[0] // 2, len(arrivals) - 1)  # both variants are read at each look
        looks[0] += 1
        return Counter(arrivals[i]), {}, []

    s.effects = effects  # type: ignore[method-assign]
    return s


async def test_drain_returns_when_every_sent_key_has_its_effect() -> None:
    keys = {"a", "b", "c"}
    s = _scenario(keys, [set(), {"a"}, keys])
    assert await s.drain(stall=5, timeout=30) == ""


async def test_drain_gives_up_when_no_effect_arrives_for_the_stall_window() -> None:
    s = _scenario({"a", "b"}, [{"a"}])
    why = await s.drain(stall=0.6, timeout=30)
    assert why == "drain gave up: no new effect for 0.6 s"


async def test_drain_keeps_waiting_while_effects_arrive_up_to_its_cap() -> None:
    # A new key at every look: never a stall, so only the overall cap ends the wait.
    arrivals = [{f"k{j}" for j in range(i)} for i in range(1, 200)]
    s = _scenario({"never"}, arrivals)
    why = await s.drain(stall=0.6, timeout=1.6)
    assert why == "drain gave up after 1.6 s, effects still arriving"
