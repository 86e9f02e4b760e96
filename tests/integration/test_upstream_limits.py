"""The gateway against an upstream that enforces its own limits with real 429s (``tests/fakeprovider.py``
with ``limits``): configured at the upstream's limits it never draws a 429, however large the burst;
configured above them, it absorbs the upstream's 429s (shared cooldown, back to the head of the line)
and the callers still get their answers within max_wait.

Self-contained: its own fake upstreams, registry, API and two worker processes per provider. The two
scenarios that must cross a 60-second window (rpm, tpm) start in the background as soon as the stack
is up and are checked by the last two tests, so the module takes ~80 s rather than ~3 minutes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.fakeprovider import FakeProvider
from tests.integration.conftest import Api, Process, WorkerFactory, kill_all, wait_until

pytestmark = pytest.mark.integration

RPM = 12              # the rpm scenario: upstream and gateway both at 12 calls per minute
RPM_BURST = 20        # 12 start at once, 8 must wait for the window to slide (~60 s)
TPM = 300             # the tpm scenario: upstream and gateway both at 300 tokens per minute
TPM_BURST = 10        # 7 calls of 41 tokens fit (287), 3 must wait for the window to slide
WINDOW_MAX_WAIT = 100


@dataclass
class Stack:
    api: Api
    fakes: dict[str, FakeProvider]
    workers: list[Process]
    window_started: float = 0.0
    bursts: dict[str, list[Future]] = field(default_factory=dict)
    canary_429_at: float = 0.0


def chat(api: Api, model: str, content: str, max_wait: float = 30, **extra) -> requests.Response:
    return requests.post(f"{api.url}/v1/chat/completions", headers={"x-gateway-max-wait": str(max_wait)},
                         json={"model": model, "messages": [{"role": "user", "content": content}], **extra},
                         timeout=max_wait + 60)


def tpm_content(i: int) -> str:
    # 20 words, 60 characters: the fake bills 20 prompt + 21 completion ("echo: " + 20 words) = 41 tokens;
    # the gateway reserves ceil(60 / 3) + 4 + 3 + max_tokens 21 = 48, then settles to 41
    return f"c{i:02d}" + " ab" * 19


def _registry(fakes: dict[str, FakeProvider]) -> str:
    provider = ("  {name}:\n    kind: openai\n    base_url: {url}\n    api_key_env: FAKE_API_KEY\n"
                "    pool: 64\n    max_retries: 1\n    timeout: 30\n")
    model = ("  {alias}:\n    provider: {provider}\n    model: {upstream}\n    max_output_tokens: 64\n"
             "    price: {{input: 1.0, output: 2.0}}\n")
    return ("providers:\n"
            + provider.format(name="ul-conc", url=fakes["conc"].base_url)
            + provider.format(name="ul-rpm", url=fakes["rpm"].base_url) + f"    limits: {{rpm: {RPM}}}\n"
            + provider.format(name="ul-tpm", url=fakes["tpm"].base_url) + f"    limits: {{tpm: {TPM}}}\n"
            + "models:\n"
            # at the upstream's concurrency ...
            + model.format(alias="ul-exact", provider="ul-conc", upstream="up-exact")
            + "    limits: {concurrency: 3}\n"
            # ... and misconfigured above it (the upstream allows 2)
            + model.format(alias="ul-over", provider="ul-conc", upstream="up-over")
            + "    limits: {concurrency: 6}\n"
            + model.format(alias="ul-canary", provider="ul-conc", upstream="up-canary")
            + "    limits: {concurrency: 10}\n"
            + model.format(alias="ul-rpm", provider="ul-rpm", upstream="up-rpm")
            + model.format(alias="ul-tpm", provider="ul-tpm", upstream="up-tpm"))


@pytest.fixture(scope="module")
def stack(gateway_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    fakes = {"conc": FakeProvider(model_limits={"up-exact": {"concurrency": 3},
                                                "up-over": {"concurrency": 2}}),
             "rpm": FakeProvider(limits={"rpm": RPM}), "tpm": FakeProvider(limits={"tpm": TPM})}
    workers: list[Process] = []
    api: Api | None = None
    background = ThreadPoolExecutor(RPM_BURST + TPM_BURST)
    try:
        for fake in fakes.values():
            fake.start()
        logs: Path = tmp_path_factory.mktemp("upstream-limits")
        config = logs / "registry.yaml"
        config.write_text(_registry(fakes))
        env = {**gateway_env, "GATEWAY_CONFIG": str(config), "GATEWAY_MAX_WAIT": "30",
               "GATEWAY_MAX_WAIT_LIMIT": "120",
               # jobs wait in line up to ~60 s here: no redelivery of their messages meanwhile
               "GATEWAY_VISIBILITY_TIMEOUT": "300"}
        factory = WorkerFactory(env, logs)
        api = Api(env, logs / "api.log").launch()  # they all boot at once: ~5 s instead of ~20
        workers.extend(factory.spawn(p, f"{p}-{n}") for p in ("ul-conc", "ul-rpm", "ul-tpm") for n in "ab")
        for proc in workers:
            factory.wait_ready(proc)
        api.wait_ready()
        s = Stack(api, fakes, workers, window_started=time.monotonic())
        # one upstream 429 (refunded: its TPM entry settles to 0 tokens) for the last test to look back on
        fakes["conc"].configure(fail_next={"count": 1, "status": 429, "retry_after": 1})
        canary = chat(api, "ul-canary", "canary", 20)
        assert canary.status_code == 200 and fakes["conc"].stats()["by_status"].get("429") == 1, canary.text
        s.canary_429_at = time.monotonic()
        # the scenarios that need the 60 s window to slide run while the other tests do
        s.bursts["rpm"] = [background.submit(chat, api, "ul-rpm", f"rpm {i}", WINDOW_MAX_WAIT)
                           for i in range(RPM_BURST)]
        s.bursts["tpm"] = [background.submit(chat, api, "ul-tpm", tpm_content(i), WINDOW_MAX_WAIT,
                                             max_tokens=21)
                           for i in range(TPM_BURST)]
        yield s
    finally:
        if api is not None:
            api.kill()
        background.shutdown(wait=False, cancel_futures=True)
        kill_all(workers)
        for fake in fakes.values():
            fake.stop()


def _upstream_429s(fake: FakeProvider) -> dict[str, int]:
    return {k: v for k, v in fake.stats()["rate_limited"].items() if v}


def _no_upstream_429s(fake: FakeProvider) -> None:
    """At the upstream's own limits the gateway must never draw a 429. Across a window edge it did: the
    gateway stamped a call into its 60 s windows when it admits it (Redis TIME in the
    acquire script) and freed the slot 60.001 s later, while the upstream stamps the call when it
    arrives, 5–200 ms later on a busy machine. When an earlier call's dispatch took longer than the
    later one's, the gateway started the later call before the upstream has let the earlier one go, and
    the upstream answered 429 (absorbed: a cooldown of a few ms and a retry; the caller still gets 200).
    Found by this test; fixed by re-stamping window entries at release (common/limits.py _RELEASE)."""
    assert _upstream_429s(fake) == {}, "the gateway drew upstream 429s at the window edge at matching limits"


def test_gateway_at_the_upstreams_concurrency_never_draws_a_429(stack: Stack):
    fake = stack.fakes["conc"]
    fake.reset()
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda i: chat(stack.api, "ul-exact", f"sleep:0.3 exact {i}"), range(12)))
    assert [r.status_code for r in replies] == [200] * 12, [r.text for r in replies if r.status_code != 200]
    stats = fake.stats()
    assert _upstream_429s(fake) == {} and stats["by_status"] == {"200": 12}
    assert stats["concurrent_max"] == 3  # the limit, reached and never exceeded, by two worker processes


def test_a_burst_many_times_the_limit_is_served_when_max_wait_allows(stack: Stack):
    fake = stack.fakes["conc"]
    fake.reset()
    n = 45  # 15 times the concurrency of 3: 15 rounds of 0.2 s
    with ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(lambda i: chat(stack.api, "ul-exact", f"sleep:0.2 burst {i}", 30), range(n)))
    assert [r.status_code for r in replies] == [200] * n, [r.text for r in replies if r.status_code != 200]
    assert sorted(r.json()["choices"][0]["message"]["content"] for r in replies) == sorted(
        f"echo: sleep:0.2 burst {i}" for i in range(n))
    assert _upstream_429s(fake) == {} and fake.stats()["concurrent_max"] == 3
    waits = sorted(int(r.headers["x-gateway-queue-wait-ms"]) for r in replies)
    assert waits[-1] >= 2000  # the last ones really waited in line (14 rounds of 0.2 s ahead of them)


def test_gateway_configured_above_the_upstream_absorbs_its_429s(stack: Stack):
    fake = stack.fakes["conc"]
    fake.reset()
    n = 12  # the gateway lets 6 go at once, the upstream takes 2 and answers the others 429 (Retry-After 1 s)
    started = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(lambda i: chat(stack.api, "ul-over", f"sleep:0.3 over {i}", 30), range(n)))
    elapsed = time.monotonic() - started
    assert [r.status_code for r in replies] == [200] * n, [r.text for r in replies if r.status_code != 200]
    assert sorted(r.json()["choices"][0]["message"]["content"] for r in replies) == sorted(
        f"echo: sleep:0.3 over {i}" for i in range(n))
    stats = fake.stats()
    assert stats["rate_limited"]["concurrency"] > 0  # the misconfiguration was real ...
    assert stats["by_status"]["200"] == n            # ... and every call got through in the end
    assert stats["concurrent_max"] <= 6
    assert elapsed < 30


def test_retry_after_behind_a_full_rpm_window_is_when_the_window_frees(stack: Stack):
    def waiting() -> int:
        return requests.get(f"{stack.api.url}/v1/limits").json()["providers"]["ul-rpm"]["waiting_in_line"]
    wait_until(lambda: waiting() >= RPM_BURST - RPM, 30, interval=0.2)
    # 12 started at once, 8 wait for the window to slide: a call that gives up now would, retried,
    # start in the next window — ~60 s after the first ones, not "8 jobs / 0.2 completions a second"
    probe = chat(stack.api, "ul-rpm", "probe", 1)
    assert probe.status_code == 429
    frees_in = 60 - (time.monotonic() - stack.window_started)
    assert abs(int(probe.headers["Retry-After"]) - frees_in) <= 4, (probe.headers["Retry-After"], frees_in)


def test_gateway_at_the_upstreams_rpm_crosses_the_window_without_a_429(stack: Stack):
    replies = [f.result(timeout=WINDOW_MAX_WAIT + 60) for f in stack.bursts["rpm"]]
    assert [r.status_code for r in replies] == [200] * RPM_BURST, [
        r.text for r in replies if r.status_code != 200]
    fake = stack.fakes["rpm"]
    starts = sorted(t for t, _, outcome in fake.timeline()["events"] if outcome == "ok")
    assert len(starts) == RPM_BURST
    # the first 12 started at once; the other 8 only as the calls of a minute before left the window
    assert starts[RPM - 1] - starts[0] < 20
    assert all(later - earlier >= 60 for earlier, later in zip(starts, starts[RPM:], strict=False))
    _no_upstream_429s(fake)


def test_gateway_at_the_upstreams_tpm_crosses_the_window_without_a_429(stack: Stack):
    replies = [f.result(timeout=WINDOW_MAX_WAIT + 60) for f in stack.bursts["tpm"]]
    assert [r.status_code for r in replies] == [200] * TPM_BURST, [
        r.text for r in replies if r.status_code != 200]
    assert all(r.json()["usage"]["total_tokens"] == 41 for r in replies)
    fake = stack.fakes["tpm"]
    events = [(t, n) for t, n, outcome in fake.timeline()["events"] if outcome == "ok"]
    assert len(events) == TPM_BURST and sum(n for _, n in events) == 41 * TPM_BURST
    first_window = [t for t, _ in events if t - events[0][0] < 60]
    assert len(first_window) == TPM // 41  # 7: as many as the upstream allows, no fewer
    _no_upstream_429s(fake)


def test_a_scope_still_admits_a_minute_after_an_upstream_429(stack: Stack):
    # the canary call's 429 at setup left a 0-token entry in the scope's TPM window; once it has left the
    # window (60 s), the scope must still admit calls
    time.sleep(max(0.0, stack.canary_429_at + 61 - time.monotonic()))
    r = chat(stack.api, "ul-canary", "a minute later", 10)
    assert r.status_code == 200, r.text
