"""The pieces of the MQTT link that are pure logic: batch acknowledgements, flow control, write coalescing."""

import asyncio

import pytest

from gateway.mqtt_link import AckTracker, Backoff, SessionLost, WriteCoalescer


def test_a_batch_settles_only_when_sealed_and_every_publish_was_acknowledged():
    async def scenario():
        tracker = AckTracker()
        batch = tracker.open()
        tracker.push_message(1, b"p1")
        tracker.push_message(2, b"p2")
        tracker.seal()
        tracker.remove_message_by_mid(1)
        assert not batch.future.done()
        tracker.remove_message_by_mid(2)
        assert batch.future.done() and batch.published == 2
        empty = tracker.open()
        tracker.seal()
        assert empty.future.done()  # nothing to wait for

    asyncio.run(scenario())


def test_a_lost_session_fails_the_batches_still_waiting():
    async def scenario():
        tracker = AckTracker()
        batch = tracker.open()
        tracker.push_message(7, b"p")
        tracker.seal()
        tracker.clear()
        with pytest.raises(SessionLost):
            await batch.future

    asyncio.run(scenario())


def test_publishers_wait_for_room_until_half_the_window_is_free():
    async def scenario():
        tracker = AckTracker()
        tracker.limit = 4
        tracker.open()
        for mid in range(1, 5):
            tracker.push_message(mid, b"p")
        waiter = asyncio.create_task(tracker.wait_for_room())
        await asyncio.sleep(0)
        tracker.remove_message_by_mid(1)
        await asyncio.sleep(0)
        assert not waiter.done()  # 3 in flight: still more than half the window
        tracker.remove_message_by_mid(2)
        await asyncio.wait_for(waiter, 1)

    asyncio.run(scenario())


def test_backoff_grows_is_capped_and_jittered():
    b = Backoff(base=0.5, cap=4.0)
    delays = [b.next_delay() for _ in range(10)]
    assert all(0.25 <= d <= 4.0 for d in delays)
    assert max(delays[5:]) > 0.5  # it grew
    b.reset()
    assert b.next_delay() <= 0.5


class FakeTransport:
    def __init__(self):
        self.writes, self.closed = [], False

    def write(self, data):
        self.writes.append(data)

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def get_extra_info(self, name):
        return ("127.0.0.1", 1)


def test_writes_in_one_loop_pass_reach_the_socket_as_one_write():
    async def scenario():
        raw = FakeTransport()
        t = WriteCoalescer(raw)
        t.write(b"a")
        t.write(b"b")
        assert raw.writes == []
        await asyncio.sleep(0)
        assert raw.writes == [b"ab"]
        t.write(b"c")
        t.close()  # a DISCONNECT written right before close still goes out
        assert raw.writes == [b"ab", b"c"] and raw.closed
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)

    asyncio.run(scenario())
