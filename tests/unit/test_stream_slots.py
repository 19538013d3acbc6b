"""serving/boundary.py Boundary: stream items waiting for an in-flight slot."""
import asyncio
import threading

from serving.boundary import Boundary
from serving.metrics import GatewayMetrics


def _run(coro_fn) -> None:
    """``asyncio.run`` in a thread of its own: another test of the session (Playwright's sync API) may
    leave an event loop running in this one."""
    failure = []

    def target():
        try:
            asyncio.run(coro_fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test's thread
            failure.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the scenario hung"
    if failure:
        raise failure[0]


def test_a_woken_item_cancelled_before_it_runs_passes_the_slot_on():
    async def scenario():
        b = Boundary(GatewayMetrics(), executor=None, max_in_flight=1, stream_idle_s=1.0)
        await b._acquire("Stream.Predict")  # A holds the only slot
        waiting_b = asyncio.ensure_future(b._acquire("Stream.Predict"))
        waiting_c = asyncio.ensure_future(b._acquire("Stream.Predict"))
        await asyncio.sleep(0)
        assert not waiting_b.done() and not waiting_c.done()
        b._release("Stream.Predict")  # wakes B ...
        waiting_b.cancel()  # ... which is cancelled before it can run
        await asyncio.wait_for(waiting_c, 2.0)  # C must get the slot, not wait for another release
        assert b.in_flight == 1
        b._release("Stream.Predict")
        assert b.in_flight == 0 and not b._waiters

    _run(scenario)


def test_items_take_slots_in_arrival_order():
    async def scenario():
        b = Boundary(GatewayMetrics(), executor=None, max_in_flight=2, stream_idle_s=1.0)
        order = []

        async def item(name):
            await b._acquire("Stream.Predict")
            order.append(name)

        await b._acquire("Stream.Predict")
        await b._acquire("Stream.Predict")
        tasks = [asyncio.ensure_future(item(n)) for n in "xyz"]
        await asyncio.sleep(0)
        for _ in range(3):
            b._release("Stream.Predict")
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert order == ["x", "y", "z"]

    _run(scenario)
