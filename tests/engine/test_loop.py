"""The threaded engine loop: sync and async streams, bad input, abort, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from warmserve.engine.engine import RequestOutput
from warmserve.engine.loop import EngineLoop, RequestStream
from warmserve.engine.sampling import InvalidRequestError, SamplingParams
from warmserve.engine.sequence import FinishReason

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture
def loop(make_engine):
    loop = EngineLoop(make_engine(), "tiny")
    yield loop
    loop.shutdown()


def test_sync_stream_collects_tokens_and_text(loop):
    result = loop.submit("hello there", GREEDY).collect()
    assert len(result.token_ids) == 12
    assert result.finish_reason is FinishReason.LENGTH
    assert result.num_prompt_tokens == len("hello there")  # byte-level tokenizer


def test_chat_messages_and_token_ids_are_accepted(loop):
    chat = loop.submit([{"role": "user", "content": "hi"}], GREEDY).collect()
    ids = loop.submit(list(range(3, 9)), GREEDY).collect()
    assert chat.num_output_tokens == ids.num_output_tokens == 12


def test_async_streams_run_concurrently(loop):
    async def run():
        streams = [loop.submit(f"prompt {i}", GREEDY) for i in range(4)]

        async def consume(stream):
            return [t async for out in stream for t in out.token_ids]

        return await asyncio.gather(*(consume(s) for s in streams))

    results = asyncio.run(run())
    assert [len(r) for r in results] == [12] * 4
    alone = loop.submit("prompt 2", GREEDY).collect().token_ids
    assert results[2] == alone


@pytest.mark.parametrize("prompt", ["", [], [{"role": "user"}, 3]])
def test_bad_prompt_raises_before_queueing(loop, prompt):
    with pytest.raises((InvalidRequestError, ValueError)):
        loop.submit(prompt, GREEDY)
    assert loop.submit("still fine", GREEDY).collect().num_output_tokens == 12


def test_abort_ends_stream_and_others_continue(loop):
    long = loop.submit("abort me", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    other = loop.submit("keep me", GREEDY)
    first = next(iter(long))
    assert not first.finished
    long.abort()
    rest = list(long)
    assert rest[-1].finished and rest[-1].finish_reason is FinishReason.ABORT
    assert other.collect().num_output_tokens == 12
    stats = loop.stats()
    assert stats.num_running == 0 and stats.num_blocks_free == stats.num_blocks_usable


def test_call_runs_on_loop_thread_and_propagates_errors(loop):
    assert loop.call(lambda engine: engine.block_manager.num_blocks) > 0
    with pytest.raises(ValueError, match="cannot lend"):
        loop.call(lambda engine: engine.block_manager.lend(10**9))


def test_shutdown_fails_pending_and_refuses_new(make_engine):
    loop = EngineLoop(make_engine(), "t")
    stream = loop.submit("x", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    loop.shutdown()
    outputs = list(stream)
    assert outputs[-1].finished
    with pytest.raises(RuntimeError, match="shut down"):
        loop.submit("y", GREEDY)


def test_a_call_to_a_shut_down_loop_fails_at_once(loop):
    """Never a wait for an answer that cannot come: before the shutdown it is answered, after
    it EngineShutDown is raised, also for a call queued behind the stop."""
    import threading
    import time

    from warmserve.engine.loop import EngineShutDown

    assert loop.call(lambda engine: 7) == 7
    release = threading.Event()
    loop.post(lambda engine: release.wait(5))  # the loop is busy: the next call queues
    result = {}

    def late_call():
        start = time.monotonic()
        try:
            loop.call(lambda engine: 1, timeout_s=10)
        except EngineShutDown:
            result["raised_after_s"] = time.monotonic() - start

    caller = threading.Thread(target=late_call)
    loop._commands.put(("stop", None))  # the stop goes in before the call
    caller.start()
    time.sleep(0.1)
    release.set()
    caller.join(5)
    assert result["raised_after_s"] < 2  # not the 10-s timeout
    loop._stopping.set()
    with pytest.raises(EngineShutDown):
        loop.call(lambda engine: 1)
    with pytest.raises(EngineShutDown):
        loop.submit("hi", GREEDY)


def test_a_slow_step_is_timed_logged_and_visible_while_it_runs(loop, monkeypatch, caplog):
    """A step longer than SLOW_STEP_S is logged with what it ran; while a step runs, other
    threads see for how long (how the worker tells a slow step from a loop that is busy)."""
    import threading
    import time

    import warmserve.engine.loop as loop_module

    monkeypatch.setattr(loop_module, "SLOW_STEP_S", 0.05)
    inside, release = threading.Event(), threading.Event()
    step = loop.engine.step

    def held_step():
        inside.set()
        release.wait(5)
        return step()

    loop.engine.step = held_step
    assert loop.step_running_for() is None
    stream = loop.submit("x", SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    assert inside.wait(5)
    time.sleep(0.1)
    assert loop.step_running_for() >= 0.1
    release.set()
    stream.collect()
    assert loop.num_steps >= 1 and loop.num_slow_steps >= 1
    assert "tiny: a step took" in caplog.text and "prefill_tokens" in caplog.text


def test_a_stalled_loop_waits_instead_of_spinning_and_a_reclaim_unstalls_it(loop):
    """All KV blocks lent: a request waits with nothing to run. The loop must not spin on empty
    steps (it would hold the GIL against every other engine in the process); the reclaim call
    that gives the blocks back gets the request going."""
    import time

    lent = loop.call(lambda engine: engine.block_manager.lend(
        engine.block_manager.num_free_blocks))
    stream = loop.submit("x", SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    time.sleep(0.3)
    steps = loop.num_steps
    assert steps <= 10  # a spinning loop makes thousands of empty steps in 0.3 s
    assert loop.call(lambda engine: engine.stats().num_waiting) == 1
    loop.call(lambda engine: engine.block_manager.reclaim(lent))
    assert stream.collect().num_output_tokens == 2


def test_slow_steps_are_reported_at_most_once_per_interval(loop, monkeypatch, caplog):
    """On a slow device every step may be slow: the log gets one line per interval, with the
    count of slow steps since the last one, not one line per step."""
    import warmserve.engine.loop as loop_module

    monkeypatch.setattr(loop_module, "SLOW_STEP_S", 0.0)
    stream = loop.submit("x", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    stream.collect()
    assert loop.num_slow_steps >= 8
    assert caplog.text.count("a step took") == 1


def test_a_forwarded_stream_hands_queued_then_new_outputs_to_its_sink():
    stream = RequestStream("r", 3, lambda request_id: None)
    first, second = (RequestOutput("r", [i], str(i)) for i in range(2))
    stream.put(first)  # before anyone listens
    got: list = []
    stream.forward(got.append)
    stream.put(second)
    stream.end()
    assert got == [first, second, None]
