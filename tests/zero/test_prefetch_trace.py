"""ZeRO-3's gather prefetch (qft_ds/zero/prefetch.py) on one process, with shards that record when their
gathers start and finish: the trace, what is started ahead, misses, restarts and cuts. The 2-rank runs
that train with it are in test_zero3_prefetch.py."""
import logging

import pytest

from qft_ds.zero.prefetch import GatherPrefetcher


class _Pending:
    def __init__(self, log, name, version):
        self.log, self.name, self.version, self.done = log, name, version, False

    def wait(self):
        self.done = True
        return (self.name, self.version)


class _Shard:
    """Stands for a WeightShard: its 'state' is a version number the optimizer bumps."""

    def __init__(self, name, log):
        self.name, self.log, self.version = name, log, 0

    def start_gather(self):
        self.log.append(("start", self.name))
        return _Pending(self.log, self.name, self.version)

    def finish_gather(self, pending):
        return pending.wait()


def _setup(depth=2, names="abcde"):
    log = []
    return GatherPrefetcher(depth), {n: _Shard(n, log) for n in names}, log


def _step(pf, shards, order):
    got = [pf.use(shards[n]) for n in order]
    pf.end_step()
    return got


def test_first_step_is_traced_then_each_use_starts_the_next_two():
    pf, s, log = _setup()
    _step(pf, s, "abcd")
    assert [e for e in log] == [("start", n) for n in "abcd"] and pf.prefetched == 0
    log.clear()
    _step(pf, s, "abcd")
    # a: gathered at its use (nothing crosses a step's end), then b and c ahead; b's use starts d
    assert log == [("start", "a"), ("start", "b"), ("start", "c"), ("start", "d")]
    assert (pf.prefetched, pf.misses, pf.inflight) == (3, 0, {})


def test_depth_bounds_the_gathers_in_flight():
    for depth in (1, 2, 3):
        pf, s, log = _setup(depth, "abcdefg")
        _step(pf, s, "abcdefg")
        pf.use(s["a"])
        assert len(pf.inflight) == depth and [e[1] for e in log[7:]] == list("abcd"[:depth + 1])


def test_an_update_drops_a_gather_started_before_it():
    pf, s, _ = _setup()
    _step(pf, s, "abc")
    pf.use(s["a"])  # b and c in flight, read at version 0
    s["c"].version = 1
    pf.forget(s["c"])
    assert pf.use(s["b"]) == ("b", 0) and pf.use(s["c"]) == ("c", 1)  # c gathered again: not stale


def test_a_use_out_of_order_is_a_miss_then_the_next_step_is_traced_again(caplog):
    pf, s, log = _setup()
    _step(pf, s, "abcd")
    with caplog.at_level(logging.WARNING, logger="qft_ds"):
        got = _step(pf, s, "acbd")  # c where b was expected
    assert got == [(n, 0) for n in "acbd"]  # every use still gets its weight
    assert pf.misses == 1 and "out of the traced order" in caplog.text
    assert pf.inflight == {} and pf.recording == []  # the next step is recorded
    _step(pf, s, "acbd")
    log.clear()
    _step(pf, s, "acbd")
    assert pf.misses == 1 and [e[1] for e in log] == list("acbd") and pf.prefetched == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qft_ds"):
        _step(pf, s, "dcba")
    assert pf.misses == 2 and caplog.text == ""  # logged once


def test_a_pass_from_the_first_weight_restarts_the_trace():
    pf, s, _ = _setup()
    _step(pf, s, "abcdb")  # b is used twice (a tied weight)
    pf.use(s["a"]), pf.use(s["b"])  # an evaluation forward between steps, then the step's own
    _step(pf, s, "abcdb")
    assert (pf.misses, pf.restarts, pf.trace is not None) == (0, 1, True)


def test_a_step_that_ends_early_keeps_the_part_it_used():
    pf, s, log = _setup()
    _step(pf, s, "abcdcd")  # the first step ran clipping's norm-only backward: c d twice
    _step(pf, s, "abcd")
    assert (pf.misses, pf.cuts, [x.name for x in pf.trace]) == (0, 1, list("abcd"))
    log.clear()
    _step(pf, s, "abcd")
    assert [e[1] for e in log] == list("abcd") and pf.cuts == 1


def test_a_pass_over_a_prefix_at_the_step_end_does_not_cut_the_trace():
    pf, s, log = _setup()
    _step(pf, s, "abcd")
    _step(pf, s, "abcdab")  # the outlier re-selection inside step() reads the weights in order
    assert (pf.misses, pf.cuts, pf.restarts, len(pf.trace)) == (0, 0, 1, 4)
    log.clear()
    _step(pf, s, "abcd")
    assert pf.misses == 0 and [e[1] for e in log] == list("abcd")


def test_a_tied_head_forward_then_another_forward_restarts_without_a_miss(caplog):
    """a is the tied embedding and LM head: the forward's last use and the backward's first. A forward
    followed by a forward (evaluation batches, then the step's own) first reads as forward then backward."""
    pf, s, log = _setup()
    _step(pf, s, "abca" + "acb")  # forward (a: embedding ... head), backward (a: head first)
    with caplog.at_level(logging.WARNING, logger="qft_ds"):
        for _ in range(3):
            got = _step(pf, s, "abca" * 2 + "abca" + "acb")  # two evaluation batches, then the step
            assert got == [(n, 0) for n in "abca" * 3 + "acb"]
        evals = [pf.use(s[n]) for n in "abca" * 3]  # the evaluation after the last step
    assert evals == [(n, 0) for n in "abca" * 3]
    assert (pf.misses, pf.restarts, caplog.text) == (0, 3 * 2 + 2, "")
    assert [x.name for x in pf.trace] == list("abcaacb")
    # a restart is read one use late: the gathers started along the backward reading are dropped and the
    # use that shows the restart is gathered then; every other use but a step's first was prefetched
    step_uses, evaluation_uses, restarts_per_pass = 3 * 4 + 3, 3 * 4, 2
    assert pf.prefetched == 3 * (step_uses - 1 - restarts_per_pass) + (evaluation_uses - 1 - restarts_per_pass)


def test_a_restarted_step_cuts_the_trace_to_its_furthest_pass():
    pf, s, log = _setup()
    _step(pf, s, "abcdcd")  # the first step ran clipping's norm-only backward: c d twice
    _step(pf, s, "abc" + "abcd")  # an evaluation forward (a prefix), then the step's own
    assert (pf.misses, pf.restarts, pf.cuts, [x.name for x in pf.trace]) == (0, 1, 1, list("abcd"))
    log.clear()
    _step(pf, s, "abcd")
    assert [e[1] for e in log] == list("abcd")  # nothing started for the norm pass's c d


def test_an_evaluation_before_the_first_step_is_not_traced():
    pf, s, _ = _setup()
    for _ in range(2):
        pf.use(s["a"]), pf.use(s["b"]), pf.use(s["c"]), pf.use(s["b"])  # evaluation forwards (b: tied)
    _step(pf, s, "abcbdcb")
    assert [x.name for x in pf.trace] == list("abcbdcb")
    _step(pf, s, "abcbdcb")
    assert pf.misses == 0 and pf.prefetched == 6


def test_gradient_accumulation_traces_one_micro_batch_and_restarts_it():
    pf, s, log = _setup()
    _step(pf, s, "abcb" * 3)  # three micro-batches of forward and backward per step
    assert [x.name for x in pf.trace] == list("abcb")
    log.clear()
    _step(pf, s, "abcb" * 3)
    assert (pf.misses, pf.restarts, pf.cuts, pf.prefetched) == (0, 2, 0, 9)


def test_depth_zero_gathers_each_use_and_traces_nothing():
    pf, s, log = _setup(0)
    for _ in range(2):
        _step(pf, s, "abc")
    assert [e[1] for e in log] == list("abcabc") and pf.prefetched == 0 and pf.trace is None
    with pytest.raises(ValueError, match="depth"):
        GatherPrefetcher(-1)
