"""A discrete-event simulator of a multi-LLM GPU cluster, deterministic for a workload.

Requests are modelled at request level: an instance admits a request if it has fewer than B
running and KV room for its prompt plus output; prefills run one after another on an instance;
decode runs at the step time of the batch the request joins. The controller ticks every
`control_interval_s` (the autoscaler); forecasts and prewarm placement run every window.
Instances and prewarms come and go through the capacity manager (capacity.py), which follows
the system's policy set (systems.py).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from warmserve.config import PolicyConfig
from warmserve.control.policies import autoscale, peak_recent_load, prefill_aware_load
from warmserve.control.predictor import Forecast, ModelForecaster
from warmserve.sim.capacity import CapacityManager
from warmserve.sim.events import EXPIRE, FINISH, READY, TICK, WINDOW, EventQueue
from warmserve.sim.profiles import DeviceProfile, ModelCost, prefill_steps
from warmserve.sim.state import Cluster, Instance, ModelState
from warmserve.sim.static import COLOCATION_SLOWDOWN, PlannedModel
from warmserve.sim.systems import SystemSpec
from warmserve.workload.builder import Workload


@dataclass(frozen=True)
class SimConfig:
    num_gpus: int
    gpus_per_node: int
    policy: PolicyConfig
    profile: DeviceProfile
    host_cache_bytes: int = 1 << 40  # pinned DRAM cache per node
    queue_timeout_s: float = 120.0  # a request waiting longer is dropped
    drain_s: float = 300.0  # after the last arrival, finish what runs
    # An engine runs up to this many requests at once while its KV cache has room (vLLM's
    # max_num_seqs, MuxServe's default). The autoscaling systems' router, as published, gives
    # an instance at most B (policy.instance_capacity) and queues the rest for new instances.
    max_batch: int = 256
    # An engine step's token budget (chunked prefill): EngineConfig.max_tokens_per_step.
    step_tokens: int = 2048


@dataclass
class SimResult:
    system: str
    duration_s: float
    ttft_s: np.ndarray  # per request; NaN if dropped
    tpot_s: np.ndarray
    dropped: np.ndarray  # bool
    model_index: np.ndarray
    gpu_seconds_busy: float
    cold_starts: int
    prewarm_hits: int
    keep_alive_hits: int
    kv_reclaims: int
    gpus_used: int
    timeline: dict = field(default_factory=dict)  # model -> lists, as `Simulator.timeline`
    models: tuple[str, ...] = ()  # names, by model index
    gpu_seconds_by_model: tuple[float, ...] = ()  # what each model's instances held
    # where a drain hands running requests over (hand_over_on_drain): for each hand-over, the
    # time from it to the request's next token on its new instance; None otherwise
    handover_stall_s: np.ndarray | None = None
    # per request: the longest wait for a next token after a hand-over (0 where none)
    stall_s: np.ndarray | None = None


class Simulator:
    def __init__(self, workload: Workload, costs: list[ModelCost], system: SystemSpec,
                 config: SimConfig) -> None:
        self.w = workload
        self.sys = system
        self.cfg = config
        self.B = config.policy.instance_capacity
        self.cluster = Cluster(config.num_gpus, config.gpus_per_node, config.profile.pool_bytes)
        samples = int(config.policy.load_window_s / config.policy.control_interval_s) + 1
        self.models = [ModelState(i, c, ModelForecaster(workload.num_windows,
                                                        config.policy.error_correction_windows,
                                                        system.forecast_extensions),
                                  tick_samples=deque(maxlen=samples))
                       for i, c in enumerate(costs)]
        for state, name in zip(self.models, workload.models, strict=True):
            if name in workload.history:
                h = workload.history[name]
                state.forecaster.seed({"avg_concurrency": h.avg_concurrency,
                                       "peak_concurrency": h.peak_concurrency,
                                       "rate_rps": h.rate_rps})
        self.events = EventQueue()
        self.cap = CapacityManager(self.cluster, self.models, workload.models,
                                   workload.spec.shares().tolist(), system, config, self.events)
        n = workload.num_requests
        # Per-request state as Python lists: the hot path reads and writes single elements,
        # which is several times faster on lists than on numpy arrays.
        self.ttft = [math.nan] * n
        self.tpot = [math.nan] * n
        self.dropped = np.zeros(n, bool)
        self.arrival = workload.arrival_s.tolist()
        self.model_of = workload.model_index.tolist()
        # a request handed over mid-stream: its prompt grows by the tokens sent, its output
        # shrinks by them (_hand_over)
        self.input_tokens = workload.input_tokens.tolist()
        self.output_tokens = workload.output_tokens.tolist()
        self._neighbours: dict[int, tuple[Instance, ...]] = {}  # MuxServe: see _slowdown
        tokens, out = workload.input_tokens.astype(np.int64), workload.output_tokens
        self.need_tokens = (tokens + out).tolist()  # KV a request reserves
        self.context = (tokens + out // 2).tolist()  # what decode steps read of it, on average
        self.prefill_alone = [0.0] * n  # on an idle instance of its model's shape: at arrival
        # hand-overs (hand_over_on_drain): the (instance id, request) finishes to ignore; each
        # handed-over request's first TTFT, when its current instance sends (or sent) its
        # next token, and since when it has waited for that token; the stalls, each and
        # the longest per request
        self._moved: set[tuple[int, int]] = set()
        self._first_ttft: dict[int, float] = {}
        self._resumes_at: dict[int, float] = {}
        self._waiting_since: dict[int, float] = {}
        self._stalls: list[float] = []
        self.stall = [0.0] * n
        if system.hand_over_on_drain:  # the request path keeps each instance's requests
            self._admit, self._finish = self._admit_tracked, self._finish_tracked
            self.cap.hand_over = self._hand_over
        # per model: per forecast window, its start, the average and peak concurrency seen
        # in it, the forecasts made for it and the prewarmed replicas planned at its start;
        # and the instances accepting requests at every control tick where their count moved
        self.timeline: dict[str, dict[str, list]] = {
            name: {"t": [], "avg": [], "peak": [], "forecast_avg": [], "forecast_peak": [],
                   "prewarms": [], "instances_t": [], "instances": []}
            for name in workload.models}

    @property
    def now(self) -> float:
        return self.events.now

    # --- the loop --------------------------------------------------------------------------

    def run(self, progress: Callable[[float], None] | None = None,
            stop_at_s: float | None = None) -> SimResult:
        """Simulate to the end (or only up to `stop_at_s`, leaving the state to inspect)."""
        self._start()
        arrivals = self.arrival
        end = self.w.spec.duration_s + self.cfg.drain_s
        if stop_at_s is not None:
            end = min(end, stop_at_s)
            arrivals = [t for t in arrivals if t < stop_at_s]
        next_progress = 0.0 if progress else math.inf
        events, handle = self.events, self._handle
        for i, t in enumerate(arrivals):  # events due before an arrival first; ties: arrival
            while events.next_time() < t:
                handle(*events.pop())
            events.now = t
            self._arrive(i)
            if t >= next_progress:
                progress(min(t, self.w.spec.duration_s))
                next_progress = t + 10.0
        while events.next_time() <= end and self._busy():  # the requests still in the system
            handle(*events.pop())
        if progress:
            progress(min(events.now, self.w.spec.duration_s))
        return self._result()

    def _busy(self) -> bool:
        return any(m.concurrency for m in self.models)

    def _handle(self, kind: int, obj: object) -> None:
        if kind == FINISH:
            self._finish(*obj)
        elif kind == READY:
            self.cap.on_ready(obj)
            self._drain_queue(self.models[obj.model])
        elif kind == TICK:
            self._tick()
        elif kind == WINDOW:
            self._window(obj)
        elif kind == EXPIRE:
            self.cap.expire(obj)

    def _start(self) -> None:
        counts = [self._initial_instances(state) for state in self.models]
        self.cap.place_initial(counts, self._average_load() if self.sys.colocate else [])
        if self.sys.autoscale:
            self.events.push(self.cfg.policy.control_interval_s, TICK)
        self.events.push(0.0, WINDOW, 0)

    def _average_load(self) -> list[PlannedModel]:
        """Each model's average rate and token lengths over the run (what MuxServe plans
        from; it is given the true averages)."""
        w, m = self.w, len(self.models)
        counts = np.bincount(w.model_index, minlength=m)
        per = np.maximum(counts, 1)  # a model without requests: zero means
        prompt = np.bincount(w.model_index, w.input_tokens, minlength=m) / per
        output = np.bincount(w.model_index, w.output_tokens, minlength=m) / per
        return [PlannedModel(s.index, s.cost, counts[s.index] / w.spec.duration_s,
                             float(prompt[s.index]), float(output[s.index]))
                for s in self.models]

    def _initial_instances(self, state: ModelState) -> int:
        if self.sys.dedicated:
            peak = self.w.actual[self.w.models[state.index]].peak_concurrency.max()
            return max(1, math.ceil(peak / (self.cfg.policy.scale_up_ratio * self.B)))
        state.forecast = state.forecaster.forecast()
        return max(1, math.ceil(state.forecast.avg_concurrency / self.B))

    # --- requests ---------------------------------------------------------------------------

    def _arrive(self, i: int) -> None:
        state = self.models[self.model_of[i]]
        self._change_concurrency(state, +1)
        alone = self.prefill_alone[i] = state.cost.prefill_s(self.input_tokens[i])
        state.prefill_work += alone
        state.arrived += 1
        state.output_tokens += self.output_tokens[i]
        state.prompt_tokens += self.input_tokens[i]
        if state.queue or not self._try_admit(state, i):
            state.queue.append(i)
            if self.sys.autoscale:  # the router queues and triggers a scale-up
                now = self.events.now
                pending = sum(1 for inst in state.instances
                              if inst.accepting and inst.ready_at > now)
                if pending * self.B < len(state.queue):
                    self.cap.scale_up(state, 1)

    def _try_admit(self, state: ModelState, i: int) -> bool:
        """Route to the least-loaded live instance with room (KV room too): below each
        instance's bound (B for the autoscaling systems' router); with `overflow`, then below
        the engine's bound, rather than queue for an instance that is not there yet."""
        return self._route(state, i, None) or (
            self.sys.overflow and self._route(state, i, self.cfg.max_batch))

    def _route(self, state: ModelState, i: int, bound: int | None) -> bool:
        need = self.need_tokens[i]
        best, best_running, now = None, math.inf, self.events.now
        for inst in state.instances:
            running = inst.running
            if (running < best_running and running < (bound or inst.max_batch)
                    and inst.accepting and inst.ready_at <= now):
                best, best_running = inst, running
                if running == 0:
                    break
        if best is None:
            return False
        if self._kv_fits(best, need):
            self._admit(state, best, i, need)
            return True
        for inst in sorted(state.instances, key=lambda x: x.running):  # rare: KV is short
            if (inst is not best and inst.running < (bound or inst.max_batch)
                    and inst.ready_at <= now and inst.accepting and self._kv_fits(inst, need)):
                self._admit(state, inst, i, need)
                return True
        return False

    def _kv_fits(self, inst: Instance, need: int) -> bool:
        if self.cluster.kv_room_tokens(inst, reclaim=False) >= need:
            return True
        if not self.sys.kv_lending or self.cluster.kv_room_tokens(inst, reclaim=True) < need:
            return False
        per_token = inst.kv_bytes_per_token
        for g in inst.gpus:  # take lent memory back: evict the lowest-scored prewarms there
            gpu = self.cluster.gpus[g]
            for p in sorted(gpu.prewarms, key=lambda p: p.score):
                if gpu.free_bytes() >= need * per_token:
                    break
                self.cap.evict(p)
                self.cap.counts["reclaim"] += 1
        return True

    def _admit(self, state: ModelState, inst: Instance, i: int, need: int) -> None:
        cost = inst.cost
        slowdown = self._slowdown(inst) if self.sys.colocate else 1.0
        now = self.events.now
        start = now if now > inst.prefill_free_at else inst.prefill_free_at
        tokens, out, step_tokens = self.input_tokens[i], self.output_tokens[i], self.cfg.step_tokens
        steps = prefill_steps(tokens, step_tokens, packed=start > now)
        # MuxServe may run a model over other GPUs than its own shape's
        alone = self.prefill_alone[i] if cost is state.cost else cost.prefill_s(tokens)
        first = start + cost.mixed_prefill_s(alone, inst.running, inst.context_tokens,
                                             steps) * slowdown
        inst.prefill_free_at = first
        stall_rate = inst.note_stall(now, cost.decode_stall_s(alone, steps),
                                     self.cfg.policy.load_window_s)
        inst.running += 1
        inst.context_tokens += self.context[i]
        self.cluster.change_kv(inst, need)
        tpot = cost.tpot_s(inst.running, inst.context_tokens, stall_rate, step_tokens) * slowdown
        self.ttft[i] = first - self.arrival[i]
        self.tpot[i] = tpot
        self.events.push(first + (out - 1 if out > 1 else 0) * tpot, FINISH, (state, inst, i, need))

    def _admit_tracked(self, state: ModelState, inst: Instance, i: int, need: int) -> None:
        """_admit, keeping the instance's requests (hand_over_on_drain); a request handed over
        keeps its first token's time, and its next token comes when this prefill ends."""
        Simulator._admit(self, state, inst, i, need)
        inst.requests[i] = need
        if i in self._first_ttft:
            self._resumes_at[i] = self.ttft[i] + self.arrival[i]
            self.ttft[i] = self._first_ttft[i]

    def _slowdown(self, inst: Instance) -> float:
        """MuxServe: co-located engines running requests slow this one's steps. Its placement
        is static, so each instance's neighbours are found once."""
        if not self.sys.colocate:
            return 1.0
        others = self._neighbours.get(inst.id)
        if others is None:
            gpus = self.cluster.gpus
            others = self._neighbours[inst.id] = tuple(
                {o.id: o for g in inst.gpus for o in gpus[g].instances if o is not inst}.values())
        if not others:
            return 1.0
        return 1.0 + COLOCATION_SLOWDOWN * sum(1 for o in others if o.running)

    def _finish_tracked(self, state: ModelState, inst: Instance, i: int, need: int) -> None:
        """_finish, keeping the instance's requests; a request handed over finishes where it
        went, not here."""
        if (inst.id, i) in self._moved:
            self._moved.discard((inst.id, i))
            return
        del inst.requests[i]
        self._end_stall(i)
        Simulator._finish(self, state, inst, i, need)

    def _end_stall(self, i: int) -> None:
        """A handed-over request's next token came: its stall, from the hand-over it had
        waited since, is over."""
        since = self._waiting_since.pop(i, None)
        if since is not None:
            stall = self._resumes_at[i] - since
            self._stalls.append(stall)
            if stall > self.stall[i]:
                self.stall[i] = stall

    def _finish(self, state: ModelState, inst: Instance, i: int, need: int) -> None:
        inst.running -= 1
        inst.context_tokens -= self.context[i]
        self.cluster.change_kv(inst, -need)
        self._change_concurrency(state, -1)
        if state.queue:
            self._drain_queue(state)
        if inst.draining and inst.running == 0:
            self.cap.release(inst)

    def _hand_over(self, inst: Instance) -> None:
        """A drained instance's running requests go back to the front of their model's queue,
        oldest first, and run again on its other instances, as the live router resumes them:
        the prompt and the tokens already sent are prefilled together, and only the rest of
        the output is decoded. The first token's time stays the one already sent. A request
        whose first token was not sent yet starts over as if it had just arrived."""
        state, now = self.models[inst.model], self.events.now
        for i in sorted(inst.requests, reverse=True):
            self.cluster.change_kv(inst, -inst.requests[i])
            inst.context_tokens -= self.context[i]
            self._moved.add((inst.id, i))
            state.queue.appendleft(i)
            first = self._resumes_at.get(i, self.arrival[i] + self.ttft[i])
            if now < first:  # nothing more was sent here
                if i not in self._first_ttft:
                    self.ttft[i] = math.nan
                state.prefill_work += self.prefill_alone[i]  # its prompt is given again
                continue
            self._end_stall(i)
            if i not in self._first_ttft:
                self._first_ttft[i] = self.ttft[i]
            sent = min(self.output_tokens[i] - 1, 1 + int((now - first) / self.tpot[i]))
            self.input_tokens[i] += sent
            self.output_tokens[i] -= sent
            self.prefill_alone[i] = state.cost.prefill_s(self.input_tokens[i])
            state.prefill_work += self.prefill_alone[i]  # as the live signal counts it
            self.context[i] = self.input_tokens[i] + self.output_tokens[i] // 2
            self._waiting_since[i] = now
        self.cap.counts["handed_over"] += inst.running
        inst.running = 0
        inst.requests.clear()
        self._drain_queue(state)

    def _drain_queue(self, state: ModelState) -> None:
        now, timeout = self.events.now, self.cfg.queue_timeout_s
        while state.queue:
            i = state.queue[0]
            if now - self.arrival[i] > timeout and i not in self._first_ttft:
                state.queue.popleft()
                self.dropped[i] = True
                self._change_concurrency(state, -1)
                continue
            if not self._try_admit(state, i):
                return
            state.queue.popleft()

    def _change_concurrency(self, state: ModelState, delta: int) -> None:
        now = self.events.now
        state.integral += state.concurrency * (now - state.last_change_s)
        state.last_change_s = now
        state.concurrency += delta
        if state.concurrency > state.window_peak:
            state.window_peak = state.concurrency

    # --- control ----------------------------------------------------------------------------

    def _tick(self) -> None:
        policy = self.cfg.policy
        for state in self.models:
            self._change_concurrency(state, 0)
            state.tick_samples.append((self.now, state.integral, state.prefill_work,
                                       state.arrived))
            old_t, old_i, old_p, old_a = state.tick_samples[0]  # it spans load_window_s
            span = self.now - old_t
            if self.sys.need_from_arrivals:  # over the whole window, as the controller
                state.arrival_rate = (state.arrived - old_a) / policy.load_window_s
                state.peak_rate = peak_recent_load(state.recent_rates, self.now,
                                                   state.arrival_rate, policy.rebalance_reserve_s)
            load = (state.integral - old_i) / span if span > 0 else state.concurrency
            if self.sys.prefill_aware and span > 0:
                state.prefill_load = (state.prefill_work - old_p) / span
                load = prefill_aware_load(load, state.prefill_load, self.B)
            state.load = load
            if self.sys.rebalance_lookback:
                state.peak_load = peak_recent_load(state.recent_loads, self.now, load,
                                                   policy.rebalance_reserve_s)
                state.peak_prefill = peak_recent_load(state.recent_prefill, self.now,
                                                      state.prefill_load,
                                                      policy.rebalance_reserve_s)
            live = state.live()
            desired = autoscale(load, len(live), self.B,
                                policy.scale_up_ratio, policy.scale_down_ratio)
            if state.queue and desired <= len(live) and all(i.ready_at <= self.now for i in live):
                desired = len(live) + 1  # requests wait and nothing is coming: scale up
            if desired > len(live):
                self.cap.scale_up(state, desired - len(live))
            elif desired < len(live):
                self.cap.scale_down(state, live, len(live) - desired)
            self._record_instances(state)
        if self.now < self.w.spec.duration_s + self.cfg.drain_s:
            self.events.push(self.now + policy.control_interval_s, TICK)

    # --- windows: forecasts and prewarm placement ------------------------------------------

    def _window(self, index: int) -> None:
        window_s = self.w.window_s
        for state in self.models:
            if index > 0:
                self._change_concurrency(state, 0)
                avg = (state.integral - state.window_start_integral) / window_s
                rate = (state.arrived - state.window_start_arrived) / window_s
                state.forecaster.observe(avg, state.window_peak, rate)
                observed = Forecast(avg, state.window_peak, rate)
                line = self.timeline[self.w.models[state.index]]
                line["avg"].append(avg)
                line["peak"].append(state.window_peak)
            else:
                observed = None
            state.window_start_integral = state.integral
            state.window_peak = state.concurrency
            state.window_start_arrived = state.arrived
            if self.sys.forecast or observed is None:
                state.forecast = state.forecaster.forecast()
            else:
                state.forecast = observed
        if self.sys.prewarm:
            self.cap.plan_prewarms()
        if self.now < self.w.spec.duration_s:
            for state in self.models:
                self._record_window(state)
                self._record_instances(state)  # systems that never tick have them here
            self.events.push(self.now + window_s, WINDOW, index + 1)

    def _record_window(self, state: ModelState) -> None:
        line = self.timeline[self.w.models[state.index]]
        line["t"].append(self.now)
        line["forecast_avg"].append(state.forecast.avg_concurrency)
        line["forecast_peak"].append(state.forecast.peak_concurrency)
        line["prewarms"].append(sum(1 for g in self.cluster.gpus for p in g.prewarms
                                    if p.model == state.index and p.gpus[0] == g.id))

    def _record_instances(self, state: ModelState) -> None:
        line = self.timeline[self.w.models[state.index]]
        count = len(state.live())
        if not line["instances"] or line["instances"][-1] != count:
            line["instances_t"].append(self.now)
            line["instances"].append(count)

    # --- results ----------------------------------------------------------------------------

    def _result(self) -> SimResult:
        for state in self.models:  # anything still waiting was never served
            for i in state.queue:
                self.dropped[i] = True
        for i, since in list(self._waiting_since.items()):  # resumed, still running at the end
            if self._resumes_at.get(i, -math.inf) >= since:
                self._end_stall(i)
        ttft, tpot = np.asarray(self.ttft), np.asarray(self.tpot)
        never = np.isnan(ttft) & ~self.dropped
        self.dropped |= never
        end = self.now
        by_model = [0.0] * len(self.models)
        for inst in self.cap.released + [i for s in self.models for i in s.instances]:
            by_model[inst.model] += ((inst.released_at or end) - inst.created_at) * len(inst.gpus)
        busy = sum(by_model)
        if self.sys.colocate:  # MuxServe holds every GPU throughout
            busy = len(self.cluster.gpus) * end
        used = sum(1 for g in self.cluster.gpus if g.instances) if self.sys.dedicated else len(
            self.cluster.gpus)
        counts = self.cap.counts
        return SimResult(self.sys.name, self.w.spec.duration_s, ttft, tpot,
                         self.dropped, self.w.model_index, busy, counts["cold"],
                         counts["prewarm"], counts["keep"], counts["reclaim"],
                         used, self.timeline, tuple(self.w.models), tuple(by_model),
                         np.asarray(self._stalls) if self.sys.hand_over_on_drain else None,
                         np.asarray(self.stall))
