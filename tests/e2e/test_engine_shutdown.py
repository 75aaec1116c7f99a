"""Engine SIGTERM under load, on the real OpenAI server: the publisher's flush completes within its
configured bounds, and every request that returned to its caller has exactly its event; a clean
SIGTERM leaves nothing in the outbox.

``main``: SIGTERM to the server's main process alone. That is what Kubernetes does (the kubelet
signals the container's PID 1, then SIGKILLs what is left after terminationGracePeriodSeconds), and
what the Helm chart runs (``command: ["vllm", "serve"]``: vLLM is PID 1) and OpenAIServer.stop does.
``group``: SIGTERM to the server's whole process group at once (EngineCore and its worker process
included), as an init that forwards signals to the group (dumb-init's default) or Ctrl-C does.

How vLLM 0.32 stops (``launcher.serve_http``, ``AsyncLLM.shutdown``, ``CoreEngineProcManager``):
the API server keeps serving HTTP, shuts its renderer down (requests still being preprocessed fail
with a 500) and stops the engine client with ``--shutdown-timeout`` as budget: SIGTERM to EngineCore,
``join(--shutdown-timeout)``, then SIGKILL. EngineCore drains what it runs (those responses still go
out), answers new requests with an abort, then tears down: the executor (the worker half of the
connector: it waits up to shutdown_timeout_s + 5 for the worker sidecar to store what it holds) and
then the scheduler (the scheduler half, likewise for publishing). Then the API server stops uvicorn
(which waits for every open HTTP request, with no time limit) and exits. The sidecars are detached
(not in the server's process group); each exits once it has reported, or on its own after its
engine died: flushing within shutdown_timeout_s, killed by its watchdog at shutdown_timeout_s + 10.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import psutil
import pytest
import requests
from publisher_checks import TAG, TEXT, chat, publisher_config, sidecars, summary

from openai_server import OpenAIServer, image_part
from pipeline import consume, stats_line

pytestmark = pytest.mark.e2e

PUBLISHER_SHUTDOWN_S = 10  # the publisher's shutdown_timeout_s: each sidecar's flush budget
# vLLM's --shutdown-timeout: EngineCore's drain and teardown (the connector's flush included) get this
# long, then the process manager SIGKILLs it. Set explicitly (OpenAIServer passes 30 too; the last wins).
VLLM_SHUTDOWN_S = 30
# vLLM's own margins, which it gives no budget: around EngineCore's, the process manager's SIGTERM
# and, past the budget, SIGKILL and join (milliseconds); after it, the API server closes its ZMQ
# sockets, stops uvicorn and exits (measured here: 0.3-1.2 s after EngineCore). Generous, because
# other engines share the two cores.
ENGINE_CORE_MARGIN_S = 5
API_SERVER_MARGIN_S = 15
# Each sidecar arms a watchdog of timeout + 10 s once it starts closing (publisher/sidecar/process.py).
SIDECAR_WATCHDOG_MARGIN_S = 10
# uvicorn's shutdown waits for every open request, and a request the API server admits while the
# engine goes away can wait for an answer that never comes: the server only exits when its client
# gives up. A request here takes well under a second; this bounds such a wait so that the server's
# exit stays measurable (OpenAIServer.chat would wait 60 s).
CLIENT_TIMEOUT_S = 20
CLIENTS = 3
LOAD_BEFORE_SIGTERM_S = 8


@dataclass
class Outcome:
    seed: int
    request_id: str  # the response's id and the event's request_id (chatcmpl-<the caller's request_id>)
    sent: float
    done: float
    status: int | None = None  # None: no response (connection refused, cut, or timed out)
    body: dict | None = None
    error: str = ""

    @property
    def answered(self) -> bool:
        """A 200 that answers names its event in ec_transfer_params."""
        return self.status == 200 and bool((self.body or {}).get("ec_transfer_params"))


def run_client(s: OpenAIServer, seeds, stop: threading.Event, out: list[Outcome]) -> None:
    from publisher.vllm.demo.tiny_llava import random_image

    while not stop.is_set():
        seed = next(seeds)
        rid = f"sigterm-{seed}"
        body = {"model": "tiny-llava", "max_tokens": 4, "temperature": 0, "request_id": rid,
                "messages": [{"role": "user", "content": [image_part(random_image(seed)), TEXT]}]}
        sent = time.monotonic()
        try:
            r = requests.post(f"{s.url}/v1/chat/completions", json=body, timeout=CLIENT_TIMEOUT_S)
        except requests.RequestException as e:
            out.append(Outcome(seed, f"chatcmpl-{rid}", sent, time.monotonic(), error=type(e).__name__))
            stop.wait(0.2)
            continue
        try:
            answer = r.json()
        except ValueError:
            answer = None
        out.append(Outcome(seed, f"chatcmpl-{rid}", sent, time.monotonic(), r.status_code, answer,
                           "" if r.status_code == 200 else r.text[:200]))
        if r.status_code != 200:
            stop.wait(0.2)  # the server is going: keep knocking, not hammering


def sidecars_of(tag: str) -> dict[str, psutil.Process]:
    """This server's sidecars by role (``python -c <code> worker|scheduler <fd>``, see Sidecar)."""
    return {f"{p.cmdline()[-2]} sidecar": p for p in sidecars(tag)}


def engine_core_of(s: OpenAIServer) -> psutil.Process:
    (core,) = [c for c in psutil.Process(s.proc.pid).children()
               if "EngineCore" in " ".join(c.cmdline())]  # vLLM titles it VLLM::EngineCore
    return core


def gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pending_in_outbox(config: dict) -> tuple[str, list]:
    """Open the spool as the next publisher would (once this one's sidecars are gone) and take what
    it would replay: the records the sink never acknowledged."""
    from publisher.config import PublisherConfig
    from publisher.sidecar.outbox import Outbox

    c = PublisherConfig.load(config)
    outbox = Outbox(c.spool_dir, c.event_sink, c.max_spool_bytes)
    try:
        return outbox.dir.name, outbox.take_replay()
    finally:
        outbox.close()


@pytest.mark.parametrize("target", ["main", "group"])
def test_sigterm_under_load_flushes_in_bounded_time_and_every_returned_request_has_its_event(
        tmp_path, tiny_llava, kafka, target):
    topic = f"shutdown.{uuid.uuid4().hex[:6]}"
    config = {**publisher_config(tmp_path, kafka, topic), "shutdown_timeout_s": PUBLISHER_SHUTDOWN_S}
    tag = uuid.uuid4().hex
    s = OpenAIServer(tiny_llava, config, tmp_path / "server", env={TAG: tag},
                     extra_args=("--shutdown-timeout", str(VLLM_SHUTDOWN_S))).wait_ready()
    stop = threading.Event()
    outcomes: list[Outcome] = []
    clients: list[threading.Thread] = []
    exited: dict[str, float] = {}
    try:
        warm = chat(s, 500)  # served before the load: must have its event too
        sidecars = sidecars_of(tag)
        assert sorted(sidecars) == ["scheduler sidecar", "worker sidecar"], sidecars
        watch = {"server": s.proc, "EngineCore": engine_core_of(s), **sidecars}
        seeds = itertools.count(1000)
        clients = [threading.Thread(target=run_client, args=(s, seeds, stop, outcomes), daemon=True)
                   for _ in range(CLIENTS)]
        for t in clients:
            t.start()
        time.sleep(LOAD_BEFORE_SIGTERM_S)
        assert any(o.answered for o in outcomes), [vars(o) for o in outcomes][-5:]

        t0 = time.monotonic()
        if target == "main":
            s.proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(s.proc.pid, signal.SIGTERM)
        # Watch the processes go while the clients keep sending.
        hard_deadline = t0 + VLLM_SHUTDOWN_S + API_SERVER_MARGIN_S + CLIENT_TIMEOUT_S + 60
        while len(exited) < len(watch) and time.monotonic() < hard_deadline:
            for name, p in watch.items():
                if name not in exited and (s.proc.poll() is not None if p is s.proc else gone(p)):
                    exited[name] = time.monotonic() - t0
            time.sleep(0.05)
    finally:
        stop.set()
        for t in clients:
            t.join(CLIENT_TIMEOUT_S + 30)
        log = s.stop()  # SIGKILLs what is left of the group if a bound below was missed
        for p in sidecars_of(tag).values():  # and any sidecar left behind, so that the spool is ours to read
            p.kill()

    timing = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(exited.items(), key=lambda kv: kv[1]))
    print(f"\nSIGTERM ({target}) -> exit: {timing}; returncode={s.proc.returncode}")
    ok = [o for o in outcomes if o.answered]
    cut = [o for o in outcomes if not o.answered]
    in_flight = [o for o in outcomes if o.sent < t0 < o.done]
    slow = [(o.seed, o.status, o.error[:60], round(o.sent - t0, 1), round(o.done - t0, 1))
            for o in outcomes if o.done - o.sent > 3]
    print(f"requests: sent={len(outcomes)} answered={len(ok)} (after SIGTERM {sum(o.done > t0 for o in ok)}) "
          f"cut={len(cut)} in flight at SIGTERM={len(in_flight)}; slow={slow}\n"
          f"cut: {dict(Counter((o.status, o.error[:70]) for o in cut))}")

    # ---- bounded --------------------------------------------------------------------------------
    assert f"stopping engine client mode=drain timeout={VLLM_SHUTDOWN_S}s" in log, log[-4000:]  # the budget used
    assert len(exited) == len(watch), f"still running at the hard deadline: {timing}"
    assert exited["EngineCore"] <= VLLM_SHUTDOWN_S + ENGINE_CORE_MARGIN_S, timing
    assert exited["server"] <= VLLM_SHUTDOWN_S + API_SERVER_MARGIN_S, (timing, slow, log[-3000:])
    # A sidecar closes when the connector tells it to (in EngineCore's teardown) or on EOF once
    # EngineCore is gone; either way it is gone within its flush budget plus its watchdog's margin.
    sidecars_gone = max(exited["worker sidecar"], exited["scheduler sidecar"])
    assert sidecars_gone <= exited["EngineCore"] + PUBLISHER_SHUTDOWN_S + SIDECAR_WATCHDOG_MARGIN_S, timing

    # ---- the flush completed and left nothing behind -----------------------------------------
    sched = stats_line(log, "scheduler")
    print("scheduler report from:", "the connector" if "side stopped" in sched else "the sidecar, after its engine")
    assert "'failed': 0" in sched and "'undelivered': 0" in sched and "'unspooled': 0" in sched, sched
    assert "shutdown left" not in log and "not delivered" not in log, log[-3000:]
    published = int(re.search(r"'published': (\d+)", sched).group(1))
    assert published == int(re.search(r"'accepted': (\d+)", sched).group(1)), sched
    # The worker's report: from the connector, or from its sidecar when vLLM killed the worker first.
    assert "'not_uploaded': 0" in stats_line(log, "worker"), stats_line(log, "worker")
    if target == "main":
        # The orderly path: EngineCore drained and tore down within its budget (no SIGKILL) and both
        # halves of the connector got their sidecar's report ("side stopped", not the sidecar's own
        # "sidecar stopped after its engine"): the flush was complete before the main process exited,
        # which is what counts in a container, where whatever outlives PID 1 is killed with it.
        assert "[shutdown] API server: engine client stopped" in log and "force killing" not in log, log[-3000:]
        assert "mm-events scheduler side stopped" in sched, sched
        assert "mm-events worker side stopped" in stats_line(log, "worker"), log[-3000:]
        assert exited["scheduler sidecar"] <= exited["server"], timing
    # group: vLLM's worker process stops on its own SIGTERM while EngineCore may still drain ("Worker
    # proc VllmWorker-0 died unexpectedly", EngineDeadError for what ran), and the process manager's
    # SIGTERM can reach EngineCore after it reset its handler to SIG_DFL for its teardown, killing it
    # mid-teardown: the scheduler sidecar then flushes on EOF ("sidecar stopped after its engine"),
    # racing the main process's exit. Checked here: bounded, and nothing lost or left in the outbox.

    # ---- the load was real, and cut through by the SIGTERM -------------------------------------
    assert in_flight, "no request was in flight at SIGTERM"
    for o in cut:  # a 200 that names no event: a request EngineCore refused during shutdown, never run
        assert o.status != 200 or o.body["choices"][0]["finish_reason"] == "abort", o.body
    for o in ok:
        assert o.body["id"] == o.request_id and o.body["choices"][0]["finish_reason"] in ("length", "stop"), o.body
        assert o.body["ec_transfer_params"]["event_id"], o.body

    # ---- every returned request has exactly its event; a cut one may have one ------------------
    returned = [warm] + [o.request_id for o in ok]
    events = [e for e, _ in consume(kafka.bootstrap, topic, expected=len(returned), timeout=120)]
    cut_with_event = sorted({e["request_id"] for e in events} & {o.request_id for o in cut})
    line = summary(kafka, topic, returned + cut_with_event)  # lost=0, one event_id each, objects' sha256
    print(f"{line}; cut requests with an event: {len(cut_with_event)}")
    assert published == len(returned) + len(cut_with_event), (published, line)
    by_id = {e["request_id"]: e for e in events}
    for o in ok:
        e = by_id[o.request_id]
        assert e["event_id"] == o.body["ec_transfer_params"]["event_id"], (e, o.body)
        assert e["finish_reason"] == o.body["choices"][0]["finish_reason"], (e, o.body)
        assert [x["uri"] for x in e["embeddings"]] == [
            x["uri"] for x in o.body["ec_transfer_params"]["mm_embeddings"]], (e, o.body)

    # ---- a clean SIGTERM leaves nothing in the outbox -----------------------------------------
    slot, pending = pending_in_outbox(config)
    assert slot == "slot-0", slot  # the slot the scheduler sidecar held (gone now: nobody holds it)
    assert pending == [], [r.request_id for r, _ in pending]
