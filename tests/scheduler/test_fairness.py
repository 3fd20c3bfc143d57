"""The virtual token counter serves users fairly by tokens."""

from __future__ import annotations

import pytest

from scheduler.fairness import VirtualTokenCounter


def test_light_user_is_not_starved_by_a_heavy_one() -> None:
    vtc: VirtualTokenCounter[str] = VirtualTokenCounter()
    for i in range(100):
        vtc.push("heavy", f"h{i}")
    served: list[str] = []
    for step in range(20):
        if step == 5:
            vtc.push("light", "l0")
        popped = vtc.pop()
        assert popped is not None
        user, _ = popped
        served.append(str(user))
        vtc.charge(user, 100, 200 if user == "heavy" else 10)
    # The light user arrived at step 5 and is served next or one after (a tie with the heavy user's
    # counter), not after the heavy user's 100 requests.
    assert served.index("light") in (5, 6)


def test_equal_users_alternate_by_tokens() -> None:
    vtc: VirtualTokenCounter[int] = VirtualTokenCounter()
    for i in range(10):
        vtc.push("a", i)
        vtc.push("b", i)
    share = {"a": 0, "b": 0}
    for _ in range(10):
        popped = vtc.pop()
        assert popped is not None
        user = str(popped[0])
        share[user] += 1
        vtc.charge(user, 50, 50)
    assert share == {"a": 5, "b": 5}


def test_idle_time_earns_no_credit() -> None:
    vtc: VirtualTokenCounter[int] = VirtualTokenCounter()
    vtc.push("busy", 0)
    popped = vtc.pop()
    assert popped is not None
    vtc.charge("busy", 0, 10_000)
    # "late" shows up after a long quiet spell; its counter is lifted to the last served counter.
    vtc.push("busy", 1)
    vtc.push("late", 0)
    assert vtc.counter("late") == pytest.approx(vtc.counter("busy"))


@pytest.mark.parametrize(
    ("prompt_weight", "completion_weight", "expected"),
    [
        (1.0, 2.0, 1 * 10 + 2 * 5),  # default: generated tokens cost twice
        (1.0, 1.0, 15),  # plain token count
    ],
)
def test_charge_weights(prompt_weight: float, completion_weight: float, expected: float) -> None:
    vtc: VirtualTokenCounter[int] = VirtualTokenCounter(
        prompt_weight=prompt_weight, completion_weight=completion_weight
    )
    vtc.charge("u", 10, 5)
    assert vtc.counter("u") == expected


def test_removed_requests_are_not_served() -> None:
    vtc: VirtualTokenCounter[str] = VirtualTokenCounter()
    vtc.push("u", "x")
    vtc.push("u", "y")
    assert vtc.remove("u", "x")
    assert not vtc.remove("u", "x")
    assert vtc.pop() == ("u", "y")
    assert vtc.pop() is None
    assert len(vtc) == 0


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"a": 1.0, "b": 1.0}, {"a": 6, "b": 6}),  # equal weights: equal service
        ({"a": 2.0, "b": 1.0}, {"a": 8, "b": 4}),  # a group of weight 2 gets twice the tokens while both wait
        ({"a": 3.0, "b": 1.0}, {"a": 9, "b": 3}),  # and three times at weight 3
    ],
)
def test_group_weights_share_the_queue(weights: dict[str, float], expected: dict[str, int]) -> None:
    vtc: VirtualTokenCounter[int] = VirtualTokenCounter()
    for i in range(20):
        for user, weight in weights.items():
            vtc.push(user, i, weight)
    share = dict.fromkeys(weights, 0)
    for _ in range(12):
        popped = vtc.pop()
        assert popped is not None
        user = str(popped[0])
        share[user] += 1
        vtc.charge(user, 50, 50)  # every request costs the same
    assert share == expected


def _served(
    vtc: VirtualTokenCounter[int], user: str, prompt: int, completion: int, weight: float = 1.0
) -> None:
    """``user`` sends one request, it is dispatched and charged."""
    vtc.push(user, 0, weight)
    assert vtc.pop_user(user) == 0
    vtc.charge(user, prompt, completion)


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        # one user served once, nobody waiting: ahead of a newcomer by the whole charge
        ([("served", "a", 10, 5)], {"a": (20.0, 0, 20.0)}),
        # the same user waits again: the floor is now their own counter, so they are next
        ([("served", "a", 10, 5), ("push", "a")], {"a": (20.0, 1, 0.0)}),
        # a light and then a heavy user wait: the light one is next, the heavy one behind by the difference
        (
            [("served", "h", 0, 100), ("served", "l", 0, 10), ("push", "l"), ("push", "h")],
            {"h": (200.0, 1, 180.0), "l": (20.0, 1, 0.0)},
        ),
        # a newcomer is lifted to the floor: next in line, beside whoever waits with the smallest counter
        (
            [("served", "h", 0, 100), ("push", "h"), ("push", "new")],
            {"h": (200.0, 1, 0.0), "new": (200.0, 1, 0.0)},
        ),
        # a user who waits nothing is compared with the floor the waiters set
        (
            [("served", "l", 0, 10), ("served", "h", 0, 100), ("push", "l")],
            {"h": (200.0, 0, 180.0), "l": (20.0, 1, 0.0)},
        ),
    ],
)
def test_standing_says_who_is_next_and_by_how_far(
    history: list[tuple[str, ...]], expected: dict[str, tuple[float, int, float]]
) -> None:
    vtc: VirtualTokenCounter[int] = VirtualTokenCounter()
    for step in history:
        if step[0] == "served":
            _served(vtc, step[1], int(step[2]), int(step[3]))
        else:
            vtc.push(step[1], 1)
    for user, (counter, waiting, ahead) in expected.items():
        standing = vtc.standing(user)
        assert standing is not None
        assert (standing.counter, standing.waiting, standing.ahead) == (counter, waiting, ahead)


def test_standing_of_an_unknown_user_and_a_weighted_one() -> None:
    vtc: VirtualTokenCounter[int] = VirtualTokenCounter()
    assert vtc.standing("nobody") is None
    _served(vtc, "double", 0, 100, weight=2.0)
    standing = vtc.standing("double")
    assert standing is not None
    assert (standing.weight, standing.counter, standing.ahead) == (2.0, 100.0, 100.0)  # charged half
    # Reading a standing changes nothing: the counter still serves the same way.
    assert vtc.counter("double") == 100.0 and len(vtc) == 0
