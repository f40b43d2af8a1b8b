"""The embedded backend end to end: the real model behind the real HTTP server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from booksmith.generation.embedded import EmbeddedServer, prepared_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CTX_PER_SEQ = 512  # small, so the too-long-prompt case is cheap to build


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    log = tmp_path_factory.mktemp("embedded") / "server.log"
    with EmbeddedServer(n_parallel=4, ctx_per_seq=CTX_PER_SEQ, log_path=log) as running:
        yield running


def _client(server: EmbeddedServer) -> Any:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def _post(url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def test_concurrent_completions(server: EmbeddedServer) -> None:
    client = _client(server)
    caps = [16, 24, 32, 48, 20, 40]
    topics = ["volcanoes", "fractions", "the moon", "rivers", "gravity", "bees"]
    responses = await asyncio.gather(
        *(
            client.chat.completions.create(
                model="anything",
                messages=[{"role": "user", "content": f"Write a textbook section about {t}."}],
                max_tokens=cap,
                temperature=0.7,
                seed=i,
            )
            for i, (t, cap) in enumerate(zip(topics, caps, strict=True))
        )
    )
    await client.close()
    for response, cap in zip(responses, caps, strict=True):
        choice = response.choices[0]
        assert response.model == "anything"
        assert response.object == "chat.completion"
        assert choice.message.role == "assistant"
        assert choice.message.content and choice.message.content.strip()
        usage = response.usage
        assert usage is not None
        assert 0 < usage.completion_tokens <= cap
        assert usage.prompt_tokens > 10  # chat template + system prompt + question
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        # "length" exactly when the cap was reached ("stop": the model ended before it)
        assert choice.finish_reason in ("stop", "length")
        assert (choice.finish_reason == "length") == (usage.completion_tokens == cap)


async def test_capped_completion_says_length(server: EmbeddedServer) -> None:
    client = _client(server)
    response = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Write a long essay about the history of Rome."}],
        max_completion_tokens=8,
        temperature=0.0,
    )
    await client.close()
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 8


async def test_same_seed_same_text(server: EmbeddedServer) -> None:
    client = _client(server)
    kwargs: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 16,
        "seed": 7,
    }
    first, second = await asyncio.gather(
        client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    )
    await client.close()
    assert first.choices[0].message.content == second.choices[0].message.content


async def test_frequency_penalty_breaks_greedy_loops(server: EmbeddedServer) -> None:
    # Greedy decoding of a small model loops; penalising repeated tokens must change the text
    # and leave fewer repeated words (the embedded default sampling relies on it).
    client = _client(server)
    kwargs: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "Write a long list of fruits."}],
        "max_tokens": 96,
        "temperature": 0.0,
    }
    plain, penalised = await asyncio.gather(
        client.chat.completions.create(**kwargs),
        client.chat.completions.create(**kwargs, frequency_penalty=1.5, presence_penalty=0.5),
    )
    await client.close()
    a = plain.choices[0].message.content or ""
    b = penalised.choices[0].message.content or ""
    assert a != b and b
    # fewer repeats: a larger share of distinct characters
    assert len(set(b)) / len(b) > len(set(a)) / len(a)


async def test_stop_string(server: EmbeddedServer) -> None:
    client = _client(server)
    response = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        max_tokens=48,
        temperature=0.0,
        stop=["5"],
    )
    await client.close()
    content = response.choices[0].message.content or ""
    # greedy: the model counts "1, 2, 3, 4, " and is cut at the stop string, before the cap
    assert "4" in content and "5" not in content
    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None and response.usage.completion_tokens < 48


async def test_n_greater_than_one_is_rejected(server: EmbeddedServer) -> None:
    client = _client(server)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=4
        )
    await client.close()
    assert info.value.body["param"] == "n"


def test_prompt_longer_than_context_is_400(server: EmbeddedServer) -> None:
    long_text = "word " * (CTX_PER_SEQ * 2)
    body = {"model": "m", "messages": [{"role": "user", "content": long_text}], "max_tokens": 4}
    status, payload = _post(f"{server.base_url}/chat/completions", json.dumps(body).encode())
    assert status == 400
    error = payload["error"]
    assert error["param"] == "messages"
    assert error["code"] == "context_length_exceeded"
    assert "context" in error["message"]


def _body(**fields: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "x"}], **fields}).encode()


@pytest.mark.parametrize(
    ("data", "param"),
    [
        (b"{not json", None),
        (json.dumps({"model": "m"}).encode(), "messages"),
        (_body(messages="hello"), "messages"),
        (_body(stream=True), "stream"),
        (_body(max_tokens=0), "max_tokens"),
        (_body(temperature=9), "temperature"),
        (_body(stop=3), "stop"),
        (_body(frequency_penalty=3), "frequency_penalty"),
    ],
)
def test_bad_requests_are_400(server: EmbeddedServer, data: bytes, param: str | None) -> None:
    status, payload = _post(f"{server.base_url}/chat/completions", data)
    assert status == 400
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["param"] == param
    assert payload["error"]["message"]


def test_health_and_models(server: EmbeddedServer) -> None:
    with urllib.request.urlopen(server.health_url, timeout=10) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{server.base_url}/models", timeout=10) as response:
        listing = json.loads(response.read())
    assert listing["data"][0]["id"] == server.model_name == "SmolLM2-135M-Instruct"


def _health(server: EmbeddedServer) -> dict[str, Any]:
    with urllib.request.urlopen(server.health_url, timeout=10) as response:
        return dict(json.loads(response.read()))


async def test_client_disconnect_frees_the_slot(server: EmbeddedServer) -> None:
    # Each request alone would run to the end of its context (hundreds of tokens, many seconds).
    client = openai.AsyncOpenAI(
        base_url=server.base_url, api_key="unused", max_retries=0, timeout=0.5
    )
    calls = [
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Write a very long story."}],
            max_tokens=5000,
            temperature=1.0,
            top_p=1.0,
            seed=i,
        )
        for i in range(4)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    await client.close()
    assert all(isinstance(r, openai.APITimeoutError) for r in results)
    for _ in range(100):
        if _health(server)["busy"] == 0:
            break
        await asyncio.sleep(0.05)
    assert _health(server) | {"status": "ok"} == {
        "status": "ok",
        "slots": 4,
        "busy": 0,
        "queued": 0,
    }


async def test_shutdown_with_requests_in_flight_is_prompt(tmp_path: Path) -> None:
    with EmbeddedServer(n_parallel=2, ctx_per_seq=2048, log_path=tmp_path / "log") as running:
        process = running.process
        assert process is not None
        client = _client(running)
        call = asyncio.ensure_future(
            client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "Write a very long story."}],
                max_tokens=2000,
                seed=1,
            )
        )
        while _health(running)["busy"] == 0:
            await asyncio.sleep(0.05)
    # stop() sends SIGTERM and escalates to SIGKILL only after 10 s of waiting; uvicorn re-raises
    # the SIGTERM it handled once it has shut down cleanly.
    assert process.returncode in (0, -signal.SIGTERM), running.log_tail()
    assert "Finished server process" in running.log_tail()
    with pytest.raises(openai.APIError):
        await call
    await client.close()


def test_launcher_leaves_no_process(tmp_path: Path) -> None:
    with EmbeddedServer(n_parallel=1, ctx_per_seq=256, log_path=tmp_path / "log") as running:
        assert running.process is not None
        pid = running.process.pid
        os.kill(pid, 0)  # alive
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(running.health_url, timeout=2)


def test_a_killed_launcher_leaves_no_server_and_no_log() -> None:
    """The server dies with its launcher (PR_SET_PDEATHSIG) and removes the temporary log."""
    import subprocess
    import sys
    import time

    script = (
        "import time\n"
        "from booksmith.generation.embedded import EmbeddedServer\n"
        "s = EmbeddedServer(n_parallel=1, ctx_per_seq=256).start()\n"
        "print(s.process.pid, s.log_path, flush=True)\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    pid_text, log_text = launcher.stdout.readline().split()
    pid, log = int(pid_text), Path(log_text)
    assert log.exists()
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the server outlived its launcher")
    assert not log.exists()


def test_prepared_model_is_q8_0_and_loads() -> None:
    import gguf
    import llama_cpp

    path = prepared_model()
    assert path.name.endswith(".Q8_0.gguf")
    reader = gguf.GGUFReader(path)
    types = {t.tensor_type.name for t in reader.tensors if t.name.endswith("ffn_up.weight")}
    assert types == {"Q8_0"}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False)
    try:
        assert llm.n_vocab() == 49152
        assert len(llm.tokenize(b"Photosynthesis")) > 0
    finally:
        llm.close()
