"""serving/budget.py Alarms: the one thread behind the deadlines of onnxruntime runs."""
import threading
import time

from serving.budget import Alarms


def test_alarms_fire_in_time_order_and_cancelled_ones_never_fire():
    alarms = Alarms()
    fired: list[str] = []
    done = threading.Event()
    alarms.arm(0.30, lambda: (fired.append("late"), done.set()))
    alarms.arm(0.10, lambda: fired.append("early"))  # earlier than the head: must wake the thread
    cancelled = alarms.arm(0.05, lambda: fired.append("cancelled"))
    cancelled.cancel()
    alarms.arm(0.20, lambda: 1 / 0)  # a failing callback must not stop the others
    t = time.monotonic()
    assert done.wait(5.0)
    assert fired == ["early", "late"]
    assert 0.25 <= time.monotonic() - t < 3.0


def test_many_cancelled_alarms_do_not_pile_up():
    alarms = Alarms()
    for _ in range(1000):
        alarms.arm(60.0, lambda: None).cancel()
    assert len(alarms._heap) <= 64 + 1


def test_a_zero_or_negative_delay_fires_at_once():
    alarms = Alarms()
    done = threading.Event()
    alarms.arm(-1.0, done.set)
    assert done.wait(2.0)
