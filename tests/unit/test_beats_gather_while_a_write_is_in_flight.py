"""Sockets' small writes gather into one while a write is in flight; each waiter learns its outcome."""

from __future__ import annotations

import asyncio

from marketplace.gateway.coalesce import Coalescer, coalescer


class SlowStore:
    """A write that takes a while, so that items arrive while it is in flight."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.writes: list[list[int]] = []
        self.gate = asyncio.Event()
        self.fail_on = fail_on

    async def write(self, items: list[int]) -> None:
        self.writes.append(items)
        await self.gate.wait()
        if self.fail_on in items:
            raise ConnectionError("the store is away")


def test_a_lone_item_is_written_at_once_without_waiting_for_a_timer() -> None:
    async def scenario() -> list[list[int]]:
        written: list[list[int]] = []

        async def write(items: list[int]) -> None:
            written.append(items)

        await asyncio.wait_for(Coalescer(write).add(7), timeout=1)
        return written

    assert asyncio.run(scenario()) == [[7]]


def test_items_added_during_a_write_go_together_in_the_next_one_and_each_waits_for_its_own() -> None:
    async def scenario() -> tuple[list[list[int]], list[bool]]:
        store = SlowStore()
        batches: Coalescer[int, None] = Coalescer(store.write)
        first = asyncio.ensure_future(batches.add(0))
        await asyncio.sleep(0.01)  # the first write is in flight, held at the gate
        rest = [asyncio.ensure_future(batches.add(n)) for n in range(1, 50)]
        await asyncio.sleep(0.01)
        waiting = [task.done() for task in [first, *rest]]
        store.gate.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), timeout=1)
        return store.writes, waiting

    writes, done_before_the_gate_opened = asyncio.run(scenario())
    assert writes == [[0], list(range(1, 50))]
    assert not any(done_before_the_gate_opened)


def test_a_failed_write_raises_in_every_waiter_of_its_batch_and_the_next_batch_still_goes() -> None:
    async def scenario() -> tuple[list[object], list[list[int]]]:
        store = SlowStore(fail_on=2)
        batches: Coalescer[int, None] = Coalescer(store.write)
        first = asyncio.ensure_future(batches.add(1))
        await asyncio.sleep(0.01)
        failing = [asyncio.ensure_future(batches.add(n)) for n in (2, 3)]
        store.gate.set()
        outcomes = await asyncio.gather(first, *failing, return_exceptions=True)
        await asyncio.wait_for(batches.add(4), timeout=1)
        return list(outcomes), store.writes

    outcomes, writes = asyncio.run(scenario())
    assert outcomes[0] is None
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes[1:])
    assert writes == [[1], [2, 3], [4]]


def test_each_event_loop_has_its_own_coalescer_for_a_key() -> None:
    async def write(items: list[int]) -> None:
        return None

    async def one() -> Coalescer[int, None]:
        same: Coalescer[int, None] = coalescer("beats", write)
        assert coalescer("beats", write) is same
        return same

    assert asyncio.run(one()) is not asyncio.run(one())
