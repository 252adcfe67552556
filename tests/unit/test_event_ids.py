from gateway.event import new_event_id


def test_ids_are_unique_and_sort_in_creation_order_even_within_one_millisecond():
    ids = [new_event_id(now_ms=1_764_322_800_000) for _ in range(5000)]
    assert len(set(ids)) == 5000
    assert [i[:16] for i in ids] == sorted(i[:16] for i in ids)
    assert all(len(i) == 28 for i in ids)


def test_a_clock_that_steps_back_does_not_break_the_order():
    a = new_event_id(now_ms=1_900_000_000_000)
    b = new_event_id(now_ms=1_800_000_000_000)
    assert b[:16] > a[:16]
