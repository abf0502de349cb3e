"""End to end: the real server, real worker processes, the official `openai` client."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from warmserve.cluster.manager import LocalCluster
from warmserve.config import parse_config
from warmserve.controller.loop import Controller
from warmserve.server.app import create_app

KEY = "sk-test"


def _config(**server) -> dict:
    return {
        "cluster": {"nodes": [{"name": "local", "host_memory_gib": 4, "pinned_cache_gib": 1,
                               "devices": [{"type": "cpu", "count": 2, "memory_gib": 0.5}]}]},
        "models": [{"name": m, "checkpoint": "synth:tiny", "dtype": "float32",
                    "max_context": 512} for m in ("tiny-a", "tiny-b")],
        "engine": {"kv_cache_gib": 0.01},
        "policy": {"page_size_mib": 2},
        "server": {"api_keys": [KEY], "max_body_bytes": 4096} | server,
    }


class _Server:
    def __init__(self, config_dict: dict, tmp: Path, cache_dir: Path,
                 controller: bool = False) -> None:
        import yaml

        path = tmp / "cluster.yaml"
        path.write_text(yaml.safe_dump(config_dict))
        self.config = parse_config(config_dict)
        self.cluster = LocalCluster(str(path), self.config, cache_dir, poll_interval_s=0.2)
        self.cluster.start()
        self.cluster.warm_up()
        self.controller = Controller(self.cluster, self.config) if controller else None
        if self.controller:
            self.controller.start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.cluster, self.config,
                                                               self.controller),
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        if self.controller:
            self.controller.stop()
        self.cluster.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, cache_dir, tiny_checkpoint):
    srv = _Server(_config(), tmp_path_factory.mktemp("srv"), cache_dir)
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_and_chat(client):
    assert {m.id for m in client.models.list()} == {"tiny-a", "tiny-b"}
    reply = client.chat.completions.create(
        model="tiny-a", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
        temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0


def test_streaming_equals_non_streaming(client):
    kwargs = {"model": "tiny-b", "messages": [{"role": "user", "content": "stream"}],
              "max_tokens": 10, "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = client.chat.completions.create(**kwargs, stream=True,
                                            stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in chunks:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(pieces) == whole and usage.completion_tokens == 10


def test_text_completions(client):
    reply = client.completions.create(model="tiny-a", prompt="abc", max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4 and reply.object == "text_completion"


def test_errors_are_openai_objects(server, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny-a", messages=[])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny-a", max_tokens=0,
                                       messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context"):
        client.chat.completions.create(model="tiny-a", max_tokens=100_000,
                                       messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    bad = httpx.post(server.url + "/v1/chat/completions", content=b"{nope", headers=headers)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    for field, value in (("stream", "yes"), ("max_tokens", "5"), ("temperature", True)):
        # types as OpenAI's API takes them: no string for a flag or a count
        loose = httpx.post(server.url + "/v1/chat/completions", headers=headers, json={
            "model": "tiny-a", "messages": [{"role": "user", "content": "x"}], field: value})
        assert loose.status_code == 400 and loose.json()["error"]["param"] == field, field
    big = httpx.post(server.url + "/v1/completions", headers=headers,
                     json={"model": "tiny-a", "prompt": "x" * 10_000})
    assert big.status_code == 413 and "exceeds" in big.json()["error"]["message"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'warmserve_ttft_seconds_count{model="tiny-a"}' in metrics
    assert "warmserve_prewarm_hits" in metrics and "warmserve_cold_starts" in metrics
    assert httpx.get(server.url + "/v1/cluster", headers=headers).json()["workers"]


def test_killed_worker_fails_fast_and_is_replaced(server, client):
    worker = next(w for w in server.cluster.workers if w.state_of("tiny-a") == "active")
    stream = client.chat.completions.create(
        model="tiny-a", messages=[{"role": "user", "content": "long"}], max_tokens=400,
        temperature=0, stream=True)
    next(iter(stream))
    started = time.monotonic()
    worker.process.kill()
    with pytest.raises(Exception):  # noqa: B017 (an error event or a broken stream)
        for chunk in stream:
            if not chunk.choices:
                raise RuntimeError("error event")
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the supervisor starts a new worker
        if worker.alive:
            break
        time.sleep(0.2)
    assert worker.alive and server.cluster.replacements >= 1
    reply = client.chat.completions.create(  # served again (activated anew on some worker)
        model="tiny-a", messages=[{"role": "user", "content": "again"}], max_tokens=3)
    assert reply.usage.completion_tokens == 3


def test_a_request_handed_over_goes_on_from_another_worker(server, client):
    """A drained worker hands its requests over mid-stream: the client's one stream goes on
    from the other worker, with every token it asked for and its own token counts."""
    cluster = server.cluster
    if sum(w.state_of("tiny-b") == "active" for w in cluster.workers) < 2:
        cluster.activate_elsewhere("tiny-b")
    kwargs = {"model": "tiny-b", "messages": [{"role": "user", "content": "hand me over"}],
              "max_tokens": 120, "temperature": 0, "extra_body": {"ignore_eos": True},
              "stream": True, "stream_options": {"include_usage": True}}
    stream = client.chat.completions.create(**kwargs)
    chunks = iter(stream)
    pieces = [next(chunks).choices[0].delta.content or ""]
    worker = next(w for w in cluster.workers if w.inflight["tiny-b"])
    cluster.drain(worker, "tiny-b")
    try:
        cluster.hand_over(worker, "tiny-b")
        usage = None
        for chunk in chunks:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            usage = chunk.usage or usage
        assert worker.inflight["tiny-b"] == 0
        assert any(w.inflight["tiny-b"] == 0 and w is not worker for w in cluster.workers)
    finally:
        cluster.undrain(worker, "tiny-b")
    assert usage.completion_tokens == 120
    metrics = httpx.get(server.url + "/metrics").text
    assert 'warmserve_hand_overs_total{model="tiny-b"} 1.0' in metrics
    whole = client.chat.completions.create(**{**kwargs, "stream": False,
                                              "stream_options": None})
    assert whole.usage.prompt_tokens == usage.prompt_tokens
    assert "".join(pieces) == whole.choices[0].message.content  # greedy: as if never moved


def test_full_queue_answers_429(tmp_path, cache_dir, tiny_checkpoint):
    srv = _Server(_config(max_queued_per_model=1), tmp_path, cache_dir)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        long = client.chat.completions.create(
            model="tiny-a", messages=[{"role": "user", "content": "x"}], max_tokens=300,
            stream=True)
        next(iter(long))
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="tiny-a", max_tokens=2,
                                           messages=[{"role": "user", "content": "y"}])
        assert err.value.response.headers["retry-after"] == "1"
        long.close()
    finally:
        srv.close()


@pytest.mark.slow
def test_embedded_default_serves_real_smollm2(tmp_path, smollm2_checkpoint):
    """`warmserve serve`'s embedded default: two SmolLM2-135M-Instruct models, real weights."""
    import yaml

    from warmserve.config import builtin_config_text

    config = yaml.safe_load(builtin_config_text("cpu-local"))
    srv = _Server(config | {"server": {"api_keys": [KEY]}}, tmp_path,
                  smollm2_checkpoint.parent.parent)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        for model in ("smollm2-135m-instruct", "smollm2-135m-instruct-b"):
            reply = client.chat.completions.create(
                model=model, temperature=0, max_tokens=30,
                messages=[{"role": "user", "content": "What is the capital of France?"}])
            assert reply.choices[0].message.content == "The capital of France is Paris."
            assert reply.choices[0].finish_reason == "stop"
        deadline = time.monotonic() + 60  # the warm-up's spare copies finish prewarming
        while time.monotonic() < deadline:
            srv.cluster.refresh()
            states = sorted(s for w in srv.cluster.workers
                            for s in (w.state_of(m) for m in ("smollm2-135m-instruct",
                                                              "smollm2-135m-instruct-b")) if s)
            if states == ["active", "active", "prewarmed", "prewarmed"]:
                break
            time.sleep(0.5)
        assert states == ["active", "active", "prewarmed", "prewarmed"]
    finally:
        srv.close()


def test_controller_scales_a_model_up_under_load(tmp_path, cache_dir, tiny_checkpoint):
    config = _config() | {"policy": {"page_size_mib": 2, "instance_capacity": 2,
                                     "load_window_s": 1.0, "control_interval_s": 0.2}}
    srv = _Server(config, tmp_path, cache_dir, controller=True)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        streams = [client.chat.completions.create(
            model="tiny-a", messages=[{"role": "user", "content": f"load {i}"}],
            max_tokens=450, stream=True) for i in range(4)]
        for stream in streams:
            next(iter(stream))
        deadline = time.monotonic() + 20
        active = 1
        while time.monotonic() < deadline and active < 2:
            active = sum(w.state_of("tiny-a") == "active" for w in srv.cluster.workers)
            time.sleep(0.2)
        assert active == 2  # activated where it was prewarmed
        assert srv.cluster.prewarm_hits >= 1
        actions = httpx.get(srv.url + "/v1/cluster",
                            headers={"authorization": f"Bearer {KEY}"}).json()
        assert any(a["action"] == "activate" for a in actions["controller_actions"])
        # the engines' counters reach the cluster view (the controller's prefill signal)
        engines = [w["stats"]["models"]["tiny-a"] for w in actions["workers"]
                   if w["stats"].get("models", {}).get("tiny-a", {}).get("state") == "active"]
        assert sum(e.get("prompt_tokens", 0) for e in engines) > 0
        for stream in streams:
            stream.close()
    finally:
        srv.close()


def test_bench_replays_open_loop_with_simulate_keys(server):
    import json as _json

    from typer.testing import CliRunner

    from warmserve.cli import app

    result = CliRunner().invoke(app, [
        "bench", "--url", server.url, "--workload", "azure-conv", "--rate", "4",
        "--duration", "3", "--models", "tiny-a,tiny-b", "--api-key", KEY,
        "--max-input-tokens", "32", "--max-output-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    live = _json.loads(result.stdout)["live"]
    assert {"ttft_p50_s", "ttft_p99_s", "tpot_mean_s", "completed", "dropped", "throughput_rps",
            "slo_attainment", "gpu_seconds_busy", "cold_starts", "prewarm_hits"} <= set(live)
    assert live["completed"] >= 5 and live["dropped"] == 0
    assert 0 < live["ttft_p50_s"] < 5


def test_bench_checks_the_endpoint_before_sending_a_request(server):
    from typer.testing import CliRunner

    from warmserve.cli import app

    def bench(*args: str) -> str:
        result = CliRunner().invoke(app, ["bench", "--url", server.url, "--duration", "3",
                                          *args])
        assert result.exit_code == 2, result.output
        return " ".join(result.output.split())

    assert "does not serve nope (it serves: tiny-a, tiny-b)" in bench(
        "--api-key", KEY, "--models", "tiny-a,nope")
    assert f"{server.url}/v1/models: Client error '401 Unauthorized'" in bench()  # no key


def test_shutdown_drains_in_flight_requests(tmp_path, cache_dir, tiny_checkpoint):
    srv = _Server(_config(), tmp_path, cache_dir)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        stream = client.chat.completions.create(
            model="tiny-b", messages=[{"role": "user", "content": "drain"}], max_tokens=200,
            temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = iter(stream)
        next(chunks)
        srv.server.should_exit = True  # what SIGINT/SIGTERM do: stop accepting, then drain
        usage = None
        for chunk in chunks:
            usage = chunk.usage or usage
        assert usage is not None and usage.completion_tokens == 200  # finished, not cut off
    finally:
        srv.close()


def test_controller_lends_no_kv_it_cannot_use_and_takes_lent_kv_back_under_load(
        tmp_path, cache_dir, tiny_checkpoint):
    """Both models are resident on both workers (one active, one prewarmed copy each), so the
    windows have nothing to prewarm: the controller lends nothing (lent blocks would only be
    reclaimed again). Blocks lent all the same come back when requests need them."""
    config = _config() | {"policy": {"page_size_mib": 2, "instance_capacity": 4,
                                     "window_s": 1.0, "control_interval_s": 0.2}}
    srv = _Server(config, tmp_path, cache_dir, controller=True)
    try:
        time.sleep(3.5)  # three windows close
        assert "lend" not in [a for _, a, _, _ in srv.controller.actions]
        worker = next(w for w in srv.cluster.workers if w.state_of("tiny-a") == "active")
        assert worker.client.lend("tiny-a", 10**6) > 0  # every whole page of free KV
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        streams = [client.chat.completions.create(
            model="tiny-a", messages=[{"role": "user", "content": f"kv {i}"}], max_tokens=300,
            stream=True) for i in range(3)]
        for stream in streams:
            next(iter(stream))
        actions = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "reclaim" not in actions:
            actions = [a for _, a, _, _ in srv.controller.actions]
            time.sleep(0.2)
        assert "reclaim" in actions
        for stream in streams:  # the requests finish on the reclaimed cache
            assert sum(1 for _ in stream) > 0
    finally:
        srv.close()


def test_requests_waiting_for_lent_kv_get_it_back(tmp_path, cache_dir, tiny_checkpoint):
    """The live deadlock of 2026-11-28, end to end: an active model with its whole KV cache lent
    and nothing running gets a request too long for the blocks left. It waits in the engine; the
    controller must take the blocks back (it counted running requests only, so it never did:
    this request then timed out), and it finishes. The controller's tick is a minute away: the
    check of lending workers between ticks is what takes the blocks back."""
    config = _config() | {"policy": {"page_size_mib": 2, "instance_capacity": 4,
                                     "window_s": 120.0, "control_interval_s": 60.0}}
    srv = _Server(config, tmp_path, cache_dir, controller=True)
    try:
        worker = next(w for w in srv.cluster.workers if w.state_of("tiny-a") == "active")
        assert worker.client.lend("tiny-a", 10**6) > 0  # every whole page of free KV
        left = worker.client.stats()["models"]["tiny-a"]["blocks_free"]
        tokens = 400 + 100
        assert left * 16 < tokens  # 16-token blocks: what is left cannot hold the request
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0,
                               timeout=30)
        reply = client.completions.create(model="tiny-a", prompt=[5 + i % 300 for i in range(400)],
                                          max_tokens=100, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 100
        assert "reclaim" in [a for _, a, _, _ in srv.controller.actions]
    finally:
        srv.close()


def _one_slot_server(tmp_path, cache_dir, wait_for_room_s: float) -> _Server:
    """One worker with room for one active model (tiny-a, after a first request), not two."""
    config = _config(wait_for_room_s=wait_for_room_s)
    config["cluster"]["nodes"][0]["devices"] = [{"type": "cpu", "count": 1, "memory_gib": 0.03}]
    srv = _Server(config, tmp_path, cache_dir)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    client.chat.completions.create(model="tiny-a", max_tokens=2,
                                   messages=[{"role": "user", "content": "a"}])
    return srv


def test_a_request_for_a_model_without_room_waits_for_one(tmp_path, cache_dir, tiny_checkpoint):
    """A request for a model no worker can take now waits for room instead of failing at once,
    counted in flight (what the controller's load and rebalancing see), and is served once a
    worker frees."""
    srv = _one_slot_server(tmp_path, cache_dir, wait_for_room_s=30.0)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        replies = []
        waiting = threading.Thread(target=lambda: replies.append(client.chat.completions.create(
            model="tiny-b", max_tokens=4, messages=[{"role": "user", "content": "b"}])))
        waiting.start()
        deadline = time.monotonic() + 10
        while srv.cluster.inflight("tiny-b") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)  # a few rounds of asking the cluster again
        assert srv.cluster.inflight("tiny-b") == 1 and waiting.is_alive() and not replies
        srv.cluster.deactivate(srv.cluster.workers[0], "tiny-a")  # what a rebalance does
        waiting.join(30)
        assert replies and replies[0].choices[0].finish_reason == "length"
        assert srv.cluster.workers[0].state_of("tiny-b") == "active"
        assert srv.cluster.inflight("tiny-b") == 0
    finally:
        srv.close()


def test_a_request_that_finds_no_room_in_time_gets_503(tmp_path, cache_dir, tiny_checkpoint):
    srv = _one_slot_server(tmp_path, cache_dir, wait_for_room_s=1.0)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="tiny-b", max_tokens=4,
                                           messages=[{"role": "user", "content": "b"}])
        assert time.monotonic() - start >= 0.9
        assert err.value.status_code == 503 and err.value.response.headers["retry-after"] == "2"
        assert "tiny-b" in str(err.value) and "pages" in str(err.value)  # why: the worker's
        assert srv.cluster.inflight("tiny-b") == 0
    finally:
        srv.close()


def test_requests_waiting_on_an_activation_do_not_hold_up_other_models(tmp_path, cache_dir,
                                                                       tiny_checkpoint):
    """Live on two H200s, a 17 s activation of one model stalled every model's requests: each
    request for it took a thread of the server's pool to wait, and other models' requests
    found none free. Now one request per model waits on the cluster, whatever the number, and
    the others wait their turn counted in flight."""
    srv = _one_slot_server(tmp_path, cache_dir, wait_for_room_s=1.0)
    activation = srv.cluster._activation_locks["tiny-b"]
    activation.acquire()  # tiny-b is being activated, slowly
    http = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=60, limits=httpx.Limits(max_connections=64))

    def ask(model: str) -> httpx.Response:
        return http.post("/v1/completions", json={"model": model, "prompt": "x",
                                                  "max_tokens": 2})

    waiting = [threading.Thread(target=ask, args=("tiny-b",)) for _ in range(40)]
    try:
        for thread in waiting:
            thread.start()
        deadline = time.monotonic() + 10
        while srv.cluster.inflight("tiny-b") < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        answers = []
        other = threading.Thread(target=lambda: answers.append(ask("tiny-a")))
        other.start()
        other.join(20)
        assert answers and answers[0].status_code == 200  # while tiny-b still activates
        assert srv.cluster.inflight("tiny-b") == 40
    finally:
        activation.release()
        for thread in waiting:
            thread.join(60)
        http.close()
        srv.close()
    assert srv.cluster.inflight("tiny-b") == 0


def test_rebalancing_frees_a_worker_for_a_model_without_room(tmp_path, cache_dir,
                                                             tiny_checkpoint):
    """The two-GPU live run on the CPU: two workers, each with room for one active model and
    nothing else. tiny-a, kept busy by four clients, is active on both; a request for tiny-b
    waits for room, the controller sees it, drains one of tiny-a's instances (handing its
    requests over), deactivates it, and activates tiny-b there, evicting tiny-a's prewarmed
    weights. No request of either model fails."""
    config = _config(wait_for_room_s=60.0) | {"policy": {
        "page_size_mib": 2, "instance_capacity": 2, "load_window_s": 1.0,
        "control_interval_s": 0.2, "new_instance_protect_s": 0.5, "min_instances": 0,
        "rebalance_reserve_s": 5.0}}
    config["cluster"]["nodes"][0]["devices"] = [{"type": "cpu", "count": 2, "memory_gib": 0.016}]
    srv = _Server(config, tmp_path, cache_dir, controller=True)
    stop, failures, done = threading.Event(), [], []

    def keep_a_busy(i: int) -> None:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0,
                               timeout=120)
        while not stop.is_set():
            try:
                client.completions.create(model="tiny-a", prompt=f"a {i}", max_tokens=400)
                done.append(i)
            except openai.APIError as exc:
                failures.append(exc)

    clients = [threading.Thread(target=keep_a_busy, args=(i,)) for i in range(4)]
    try:
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 30  # a's load (4 > 0.8 x 2) brings a second instance
        while time.monotonic() < deadline and sum(
                w.state_of("tiny-a") == "active" for w in srv.cluster.workers) < 2:
            time.sleep(0.1)
        assert sum(w.state_of("tiny-a") == "active" for w in srv.cluster.workers) == 2
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0,
                               timeout=120)
        reply = client.completions.create(model="tiny-b", prompt="b", max_tokens=8)
        assert reply.choices[0].finish_reason == "length"
        assert "rebalance" in [a for _, a, _, _ in srv.controller.actions]
    finally:
        stop.set()
        for thread in clients:
            thread.join(60)
        srv.close()
    assert not failures and done


def test_a_worker_ends_with_the_process_that_started_it(tmp_path, cache_dir, tiny_checkpoint):
    """Its standard input stays open while that process lives; closing it is what that
    process's end, however abrupt (SIGKILL too), looks like to the worker."""
    import yaml

    from warmserve.cluster.local import LocalWorkerProcess

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(_config()))
    worker = LocalWorkerProcess(str(path), "local", 0, cache_dir)
    try:
        worker.process.stdin.close()
        worker.process.wait(timeout=30)
    finally:
        worker.close()
    assert worker.process.returncode == 0


def test_sigterm_stops_serve_with_its_workers(tmp_path, cache_dir, tiny_checkpoint):
    """A process manager stops a server with SIGTERM: it drains, closes its workers and exits
    143. (uvicorn raises the signal again after its graceful stop, which used to end the
    process before it closed its workers, and they lived on.)"""
    import os
    import signal
    import subprocess
    import sys

    import yaml

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(_config()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = subprocess.Popen([sys.executable, "-m", "warmserve.cli", "--cache-dir",
                              str(cache_dir), "serve", "--config", str(path), "--port",
                              str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        children = [pid for task in Path(f"/proc/{serve.pid}/task").iterdir()
                    for pid in (task / "children").read_text().split()]
        assert len(children) == 2  # one worker per device
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 143
    finally:
        serve.kill()
    for pid in map(int, children):
        for _ in range(40):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.25)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"worker {pid} outlived the server")
