"""example_usage.py --serve (transformers serve on the merged tiny fine-tune) and --base-url chat through it.

One server for the module, on a free loopback port (--port 0; the URL is read from its stderr). The
tiny model (2 training steps) cannot be asked to answer as Echo: these tests check the plumbing (the
merge, the chat template, decoding parity with the local chat, concurrency, errors), not the persona.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import example_usage
import finetune
from bench import serve_latency as load
from conftest import PY, ROOT, cli

slow = pytest.mark.slow  # the tests that load the model and generate (-m "not slow" leaves them out)

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


class Server:
    """example_usage.py --serve as a user runs it; stderr is read as it comes, so the pipe never fills."""

    def __init__(self, *args, timeout: float = 300):
        self.process = subprocess.Popen([PY, str(ROOT / "example_usage.py"), "--serve", "--port", "0", *map(str, args)],
                                        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.lines: list[str] = []
        self.out: list[str] = []
        self.readers = [threading.Thread(target=self.read, args=(stream, into), daemon=True)
                        for stream, into in ((self.process.stderr, self.lines), (self.process.stdout, self.out))]
        for reader in self.readers:
            reader.start()
        deadline = time.monotonic() + timeout
        while not (match := re.search(r"^serving (.+) at (http://\S+/v1) ", self.stderr, re.M)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"the server did not start:\n{self.stderr}")
            time.sleep(0.1)
        self.model, self.url = match.group(1), match.group(2)

    @staticmethod
    def read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        """Ctrl-C, as a user stops it."""
        self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        for reader in self.readers:
            reader.join(5)
        return code


def post(url: str, body: bytes | str, timeout: float = 120) -> tuple[int, dict]:
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with DIRECT.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def client(url: str):
    import openai

    return openai.OpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """The tiny fine-tune (a copy: the merge is written into it), served; stopped with Ctrl-C at the end."""
    out, _ = tiny_model
    folder = tmp_path_factory.mktemp("serve") / "tiny"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("checkpoints", "merged"))
    server = Server("--model", folder, "--precision", "fp32")  # fp32: the same answers on every CPU
    yield folder, server
    code = server.stop()
    assert code == 0, server.stderr
    assert "server stopped" in server.stderr and "Traceback" not in server.stderr, server.stderr
    assert "POST /v1/chat/completions" in server.stderr and not server.out  # the request log too goes to stderr


@slow
def test_the_adapter_is_merged_once_with_the_training_template(served):
    folder, server = served
    merged = folder / "merged"
    assert server.model == str(merged.resolve())
    assert "merging the adapter" in server.stderr
    stamp = json.loads((merged / "merged_from.json").read_text())
    assert "adapter_model.safetensors" in stamp["files"]
    assert {path.stat().st_mode & 0o777 for path in merged.iterdir()} == {0o666 & ~finetune._UMASK}  # not safetensors' 0600
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == \
        json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    # The served template is the one training used: an empty system turn, never SmolLM's default message.
    tokenizer = finetune.load_tokenizer(str(merged))
    assert tokenizer.chat_template == finetune.load_tokenizer(str(folder)).chat_template
    question = [{"role": "user", "content": "Who are you?"}]
    assert finetune.default_system_text(tokenizer) == ""
    expected = len(finetune.render(tokenizer, question, add_generation_prompt=True)["input_ids"])
    answer = client(server.url).chat.completions.create(model=server.model, messages=question, max_tokens=2)
    assert answer.usage.prompt_tokens == expected  # what the server fed the model is that template's rendering
    # A second --serve reuses the merge (and the port the first holds is refused before any loading).
    again = cli("--serve", "--model", folder, "--port", server.url.rsplit(":", 1)[1].split("/")[0], script="example_usage.py",
                timeout=60)
    assert again.returncode != 0 and again.stderr.count("\n") == 1 and "in use" in again.stderr, again.stderr


@slow
def test_sixteen_concurrent_streaming_chats_all_complete(served):
    _, server = served
    openai_client = client(server.url)

    def chat(i: int) -> tuple[str, str | None]:
        stream = openai_client.chat.completions.create(
            model=server.model, stream=True, max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": f"Question {i}: what is the sea?"}])
        text, finish = [], None
        for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        return "".join(text), finish

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(chat, range(16)))
    assert len(results) == 16
    for text, finish in results:
        assert text.strip() and finish in ("stop", "length"), results


@slow
@pytest.mark.parametrize("body, status, says", [
    ("{not json", 422, ""),
    ("[1, 2]", 422, ""),
    ("{}", 422, ""),  # no messages: a 500 in transformers serve 5.24 alone; --serve adds the check
    ('{"messages": []}', 422, ""),
    ('{"messages": "hi"}', 422, ""),
    ('{"messages": [{"content": "hi"}]}', 422, ""),
    ('{"messages": [{"role": "user", "content": 5}]}', 422, ""),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 422, ""),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', 422, ""),
    ('{"messages": [{"role": "user", "content": "hi"}], "generation_config": "{oops"}', 422, ""),
    ('{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}', 400, "asked for 'gpt-4o'"),  # the server is pinned to its model
    (json.dumps({"messages": [{"role": "user", "content": "word " * 9000}], "max_tokens": 8}), 400, "at most 8,184 fit"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000}), 400, "context of 8,192 tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 240_000}]}), 413, "1,000,000 bytes"),  # 1.2 MB
    # Each below was a 500 or was accepted in transformers serve 5.24 alone; the first took 23 GB and the server with it.
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 100_000]}), 422, "at most 4 strings, each of 1 to 32"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}), 422, "at most 4 strings"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "generation_config": json.dumps({"stop_strings": ["x" * 40]})}), 422, "32"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}), 422, "64-bit"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": -1}), 422, "above -1"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"abc": 5}}), 422, "token ids"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999999": 5}}), 422, "past the vocabulary"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "generation_config": json.dumps({"top_k": -3, "do_sample": True})}), 422, "top_k"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "generation_config": json.dumps({"bad_words_ids": [[99999999]]})}), 422, "99999999"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 3}), 422, "one choice"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}), 422, "JSON"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), 422, "`role` of system"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}', 422, "not valid Unicode"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', 422, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}), 422, "from 0 to 2"),
    # Each below killed continuous batching for every later request (padding past the cache, counted as 15 tokens),
    # held 1.8 GB for a 4-token answer (a static cache), or was a plain-text 500.
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"padding": "max_length", "max_length": 16500}}),
     422, "the tokenizer's options"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"return_tensors": "np"}}), 422, "tokenizer"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "generation_config": json.dumps({"cache_implementation": "static",
                                                                                                   "max_cache_len": 40000})}),
     422, "cache_implementation, max_cache_len this server sets itself"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "generation_config": json.dumps({"num_return_sequences": 3, "do_sample": True})}), 422, "itself"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "generation_config": json.dumps({"eos_token_id": 1.5})}), 422, "eos_token_id must be a token id"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"²": 1}}), 422, "token ids"),  # a digit to isdigit()
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"7" * 5000: 1}}), 422, "token ids"),
])
def test_malformed_requests_get_a_4xx_at_once_and_the_server_goes_on(served, body, status, says):
    _, server = served
    start = time.perf_counter()
    code, answer = post(server.url + "/chat/completions", body)
    assert code == status and time.perf_counter() - start < 1, answer  # checked before any work
    # OpenAI's shape, whichever part of the server refused it (FastAPI, transformers serve, --serve's checks)
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}, answer
    assert answer["error"]["type"] == "invalid_request_error" and says in answer["error"]["message"], answer  # the limit is in it
    code, answer = post(server.url + "/chat/completions", json.dumps(
        {"model": server.model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}))
    assert code == 200 and answer["choices"][0]["message"]["content"], answer


@slow
def test_an_openai_client_reads_every_error_in_openais_shape(served):
    """OpenAI's ErrorResponse ({"error": {"message", "type", "param", "code"}}) is what OpenAI-compatible clients
    read: the openai client takes an exception's type and body from it (from FastAPI's {"detail": ...} its type
    was None and its body had no message); a GET the server has no route for is answered in it too."""
    import openai

    _, server = served
    with pytest.raises(openai.BadRequestError) as error:
        client(server.url).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert error.value.type == "invalid_request_error" and "asked for 'gpt-4o'" in error.value.body["message"], error.value.body
    try:
        DIRECT.open(server.url + "/no-such-route", timeout=30)
        pytest.fail("a route that is not there was answered")
    except urllib.error.HTTPError as answer:  # FastAPI's own 404, rewritten
        assert answer.code == 404 and json.loads(answer.read()) == {
            "error": {"message": "Not Found", "type": "invalid_request_error", "param": None, "code": None}}


def test_error_messages_are_read_from_each_shape_the_servers_parts_write():
    read = example_usage.error_message
    assert read(b'{"detail": "prompt must be a string."}') == "prompt must be a string."  # FastAPI's HTTPException
    assert read(b'{"detail": [{"loc": ["body", "messages"], "msg": "Field required", "type": "missing"}]}') == "body.messages: Field required"
    assert read(b'{"error": "no such model"}') == "no such model"  # transformers serve's 503
    assert read(b'{"error": {"message": "said", "type": "x"}}') == "said" and read(b"Internal Server Error") == "Internal Server Error"


@slow
def test_openai_parameters_mean_what_they_mean_at_openai(served):
    """temperature above 0 samples (transformers serve alone stayed greedy: every answer the same), and logit_bias
    takes OpenAI's integers (transformers serve alone failed on them with a 500)."""
    _, server = served
    ask = lambda **extra: post(server.url + "/chat/completions", json.dumps(  # noqa: E731
        {"messages": [{"role": "user", "content": "Write a poem about the sea."}], "max_tokens": 12, **extra}))
    answers = {seed: ask(temperature=1.0, seed=seed) for seed in (1, 2, 1)}
    assert all(code == 200 for code, _ in answers.values()), answers
    text = {seed: answer["choices"][0]["message"]["content"] for seed, (_, answer) in answers.items()}
    assert text[1] != text[2], text  # sampled: another seed, another answer
    _, greedy = ask(temperature=0)
    first = greedy["choices"][0]["message"]["content"]
    from transformers import AutoTokenizer

    token = AutoTokenizer.from_pretrained(served[0] / "merged").encode(first, add_special_tokens=False)[0]
    code, biased = ask(temperature=0, logit_bias={str(token): -100})  # the greedy answer's first token, barred
    assert code == 200 and biased["choices"][0]["message"]["content"] != first, biased
    for extra in ({"temperature": 0, "top_p": 0.5}, {"temperature": 1e-300}):  # greedy, as OpenAI reads them (were a 422, a 500)
        code, answer = ask(**extra)
        assert code == 200 and answer["choices"][0]["message"]["content"] == first, (extra, answer)
    stop = first.split()[1]  # left out of the answer, as at OpenAI (transformers keeps it), streamed or not
    code, answer = ask(temperature=0, stop=[stop])
    assert code == 200 and answer["choices"][0]["message"]["content"] == first[: first.index(stop)], (stop, answer)
    stream = client(server.url).chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Write a poem about the sea."}],
                                                        max_tokens=12, temperature=0, stop=stop, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == first[: first.index(stop)]


@slow
def test_base_url_prompt_answers_as_the_local_chat_does(served):
    folder, server = served
    through = cli("--base-url", server.url, "--prompt", "Who are you?", "--max-new-tokens", "12", script="example_usage.py")
    assert through.returncode == 0, through.stderr
    assert through.stdout.strip() and "Traceback" not in through.stderr
    # Same folder, same decoding (its generation_config.json, greedy here), same fp32 weights: same answer.
    local = cli("--model", folder, "--prompt", "Who are you?", "--max-new-tokens", "12", "--precision", "fp32",
                script="example_usage.py")
    assert local.returncode == 0, local.stderr
    assert through.stdout == local.stdout


@slow
def test_base_url_interactive_keeps_history_and_resets(served):
    _, server = served
    questions = "Please say the word banana.\nSay it again.\n/reset\nPlease say the word banana.\nSay it again.\n/exit\n"
    result = cli("--base-url", server.url, "--interactive", "--max-new-tokens", "8", input=questions, script="example_usage.py")
    assert result.returncode == 0, result.stderr
    answers = re.findall(r"^echo> (.*)$", result.stdout, re.M)
    assert len(answers) == 4 and all(a.strip() for a in answers), result.stdout
    assert answers[:2] == answers[2:]  # greedy, and /reset started the conversation afresh


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    (["--base-url", f"http://127.0.0.1:{free_port()}/v1", "--prompt", "hi"], "cannot reach a server"),
    (["--serve", "--model", "no/such/folder/"], "there is no folder"),
    (["--serve", "--output-dir", "no-such-echo-model"], "no model in no-such-echo-model"),
    (["--serve", "--interactive"], "--base-url"),
])
def test_errors_are_one_line(args, message, tmp_path):
    result = cli(*args, cwd=tmp_path, script="example_usage.py", timeout=120)
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------
# A server facing misbehaving clients: work nobody waits for stops, load is served together,
# and the server stays within its limits (bench/serve_latency.py reports the same figures).
# --------------------------------------------------------------------------------------------
def long_stream(server: Server, batched: bool = True) -> tuple[socket.socket, bytes]:
    """A stream of 1,000 tokens whatever the model says, read up to its first piece (bench/serve_latency.py)."""
    return load.open_stream(server.url, load.long_body(server.model, 1000, stream=True, batched=batched))


def to_end(connection: socket.socket, received: bytes = b"") -> str:
    with connection:
        while piece := connection.recv(65536):
            received += piece
    return received.decode()


def events(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("data: ")]


@slow
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one-at-a-time"])
def test_a_dropped_stream_stops_its_generation_within_a_few_tokens(served, batched):
    _, server = served
    pid = server.process.pid
    before = load.cpu_seconds(pid)
    code, answer = post(server.url + "/chat/completions", json.dumps(
        {"model": server.model, "max_tokens": 16, "messages": [{"role": "user", "content": "Count to twenty."}],
         "generation_config": json.dumps({"min_new_tokens": 16})}))
    assert code == 200, answer
    sixteen_tokens = load.cpu_seconds(pid) - before  # what 16 tokens cost the server, whatever the CPU's load
    long_stream(server, batched)[0].close()  # gone after its first piece; 1,000 tokens would cost ~60 times that
    time.sleep(0.5)
    after = load.cpu_seconds(pid)
    time.sleep(3)
    assert load.cpu_seconds(pid) - after < sixteen_tokens, (load.cpu_seconds(pid) - after, sixteen_tokens)


@slow
def test_thirty_two_chats_beside_misbehaving_clients_are_all_answered(served, capsys):
    """The load-and-abuse rounds of bench/serve_latency.py, with 8 new tokens a chat. Each misbehaving kind
    gets its 4xx at once, every ordinary chat its whole answer; their p95 is reported beside the same
    round without the misbehaving clients, and judged loosely where no other process shares the CPU."""
    _, server = served
    assert load.ordinary_chat(server.url, server.model, 0, 8) is not None  # warm: continuous batching's first step
    alone = load.load_round(server.url, server.model, server.process.pid, clients=32, tokens=8, abuse=False)
    abused = load.load_round(server.url, server.model, server.process.pid, clients=32, tokens=8, abuse=True)
    rss = load.peak_rss_mb(server.process.pid)
    with capsys.disabled():  # the figures, in make test's output
        print(f"\nserve load, 32 chats of 8 tokens: p95 {load.p95(alone):.2f} s alone, {load.p95(abused):.2f} s beside "
              f"misbehaving clients ({load.p95(abused) / load.p95(alone):.2f}x); other processes used "
              f"{load.busy_share(alone['others'])} and {load.busy_share(abused['others'])} of the CPUs; peak RSS {rss:,.0f} MB")
    assert None not in alone["latencies"] and None not in abused["latencies"]  # 0 lost
    for kind, status, seconds in abused["abuse"]:
        assert status == load.EXPECTED.get(kind, 200), (kind, status)
        assert kind in ("slow body", "dropped stream", "idle connections") or seconds < 2, (kind, seconds)
    if not load.shared(alone["others"], abused["others"]):  # a CPU others use too measures them: reported, not judged
        assert load.p95(abused) < 2.5 * load.p95(alone) + 2
    assert rss < 3000  # MB: the fp32 model (540), continuous batching's KV cache (755), torch and the rest


@pytest.fixture(scope="module")
def bounded(served):
    """A second server on the same folder, with room for three requests and eight seconds each. The last test
    that uses it stops it."""
    folder, _ = served
    server = Server("--model", folder, "--precision", "fp32", "--max-requests", 3, "--request-timeout", 8)
    yield server
    if server.process.poll() is None:
        server.process.kill()


@slow
def test_a_full_server_answers_503_at_once_and_goes_on(bounded):
    holders = [load.socket_to(bounded.url) for _ in range(3)]
    for holder in holders:  # three requests whose bodies are still on the way take the three places
        holder.sendall(load.headers_for(bounded.url, 100) + b"{")
    deadline, hi = time.monotonic() + 60, json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    while True:  # until the server has seen all three
        start = time.perf_counter()
        code, answer = post(bounded.url + "/chat/completions", hi)
        if code == 503 or time.monotonic() > deadline:
            break
    assert code == 503 and "--max-requests" in answer["error"]["message"] and time.perf_counter() - start < 1, answer
    for holder in holders:
        holder.close()
    code, answer = post(bounded.url + "/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000}))
    assert code == 400, answer  # let in again, and checked (a 400 needs no generation on a busy CPU)


def idle(server, seconds: float = 30) -> dict:
    """The server's /health once it holds no request (the test before may have left some ending)."""
    deadline = time.monotonic() + seconds
    while True:
        with DIRECT.open(server.url.removesuffix("/v1") + "/health", timeout=10) as response:
            health = json.loads(response.read())
        if health["requests"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


@slow
def test_a_request_past_its_time_limit_is_stopped_with_the_reason(bounded):
    assert idle(bounded) == {"status": "ok", "requests": 0, "max_requests": 3}
    start = time.perf_counter()
    sent = []
    for batched, stream in ((True, True), (False, True), (False, False)):
        body = load.long_body(bounded.model, 1000, stream=stream, batched=batched)
        sent.append(load.socket_to(bounded.url))
        sent[-1].sendall(load.headers_for(bounded.url, len(body)) + body)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(to_end, sent))
    assert 8 <= time.perf_counter() - start < 30
    limit = "the server's limit of 8 s (--request-timeout)"
    for answer in answers:  # a stream that has begun ends with an error event; one that has not is a 504
        assert limit in (events(answer)[-1] if answer.startswith("HTTP/1.1 200") else answer), answer[-300:]
    assert answers[2].startswith("HTTP/1.1 504")


@slow
def test_idle_connections_shut_no_one_out_and_are_closed(bounded):
    """Twenty connections that send nothing, or half a request, beside a server of three requests: uvicorn's own
    limit (4 x --max-requests) counted them and answered everyone else 503 for as long as they stayed open."""
    sockets = [load.socket_to(bounded.url) for _ in range(20)]
    for half in sockets[:5]:
        half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    start = time.perf_counter()
    with DIRECT.open(bounded.url.removesuffix("/v1") + "/health", timeout=10) as response:
        assert response.status == 200 and time.perf_counter() - start < 2
    code, answer = post(bounded.url + "/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000}))
    assert code == 400, answer  # checked, not turned away
    time.sleep(example_usage.HEADER_SECONDS + 3)
    for idle_socket in sockets:
        idle_socket.settimeout(5)
        assert idle_socket.recv(10) == b"", "the server kept a connection that sent no request"
        idle_socket.close()


@slow
def test_sigterm_mid_stream_ends_it_and_exits_within_two_seconds(bounded, capsys):
    stream = long_stream(bounded, batched=True)  # a batched stream, and the one-at-a-time one of the benchmark
    seconds, others = load.sigterm_to_exit(bounded.process, bounded.url, bounded.model)
    with capsys.disabled():
        print(f"\nserve SIGTERM while streaming, to exit: {seconds:.2f} s (other processes used "
              f"{load.busy_share(others)} of the CPUs)")
    assert bounded.process.returncode == 0
    assert seconds <= (2 if not load.shared(others) else 10)  # a starved process cannot keep time
    assert "the server is stopping" in events(to_end(*stream))[-1]
    for reader in bounded.readers:
        reader.join(5)
    assert bounded.stderr.rstrip().endswith("server stopped") and "Traceback" not in bounded.stderr, bounded.stderr


def test_stop_strings_are_left_out_of_an_answer_as_at_openai():
    """transformers keeps a stop string in the answer; OpenAI leaves it out. A stream holds back only what could
    still begin one, and gives it back when it did not."""
    import asyncio

    def streamed(pieces: list[str], stops: list[str]) -> list[str]:
        cut = example_usage.StopCut(stops)
        return [cut.feed(piece) for piece in pieces] + [cut.end()]

    assert streamed(["Hello", ",", " I", "'m", " Echo", ","], ["Echo,"]) == ["Hello", ",", " I", "'m", " ", "", ""]
    assert streamed(["Hello", " Ec", "ho"], ["Echo,"]) == ["Hello", " ", "", "Echo"]  # no stop string: what was held, at the end
    assert streamed(["a+b", "=c"], ["=", "+b="]) == ["a", "", ""]  # the first stop string in the text wins

    async def run(start: dict, bodies: list[bytes], stops: list[str]) -> list[dict]:
        sent = []

        async def send(message):
            sent.append(message)

        sending = example_usage.answered_as_openai(send, stops)
        await sending(start)
        for i, body in enumerate(bodies):
            await sending({"type": "http.response.body", "body": body, "more_body": i + 1 < len(bodies)})
        return sent

    plain = json.dumps({"choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": "Hi there. END"}}]}).encode()
    start, body = asyncio.run(run({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"),
                                                                                            (b"content-length", b"1")]}, [plain], ["END"]))
    assert json.loads(body["body"])["choices"][0]["message"]["content"] == "Hi there. "
    assert dict(start["headers"])[b"content-length"] == str(len(body["body"])).encode()
    chunk = lambda delta, finish=None: ("data: " + json.dumps({"choices": [{"delta": delta, "finish_reason": finish}]}) + "\n\n").encode()  # noqa: E731
    events = [chunk({"content": "Hi"}), chunk({"content": " EN"}) + chunk({"content": "D!"}), chunk({}, "stop")]
    sent = asyncio.run(run({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]},
                           [events[0], events[1][:20], events[1][20:], events[2]], ["END"]))
    text = b"".join(message.get("body", b"") for message in sent[1:]).decode()
    contents = [json.loads(line[6:])["choices"][0]["delta"].get("content") for line in text.split("\n\n") if line]
    assert "".join(c or "" for c in contents) == "Hi " and len(contents) == 4  # an event split across two sends is read whole
    assert example_usage.request_stops(b'{"stop": "END"}') == ["END"] and example_usage.request_stops(b"{oops") == []
    failed = asyncio.run(run({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]},
                             [chunk({"content": "Hi"}), b'data: {"error": "num_beams is not supported"}\n\n'], []))
    assert json.loads(failed[-1]["body"][6:]) == {"error": {"message": "num_beams is not supported", "type": "server_error", "param": None,
                                                            "code": None}}  # transformers serve's string: the openai client reads message


def test_a_dead_batching_worker_leaves_requests_to_generate_and_health_says_so(capsys):
    """transformers serve answers every request 503 once continuous batching's worker has died: the guard routes
    them to generate() instead, says so once in the log, and /health says the server is degraded."""
    import asyncio
    import types

    handler = types.SimpleNamespace(_validate_request=lambda body: None, _build_generation_config=lambda *a, **k: None)
    state = types.SimpleNamespace(use_continuous_batching=lambda model, modality: True)
    serve = types.SimpleNamespace(_chat_handler=handler, _generation_state=state)
    guard = example_usage.Guard(None, timeout=30, max_requests=2)
    example_usage.hook_generation(serve, guard, types.SimpleNamespace(build=None), types.SimpleNamespace(generate=None))
    call = example_usage.Call(30)
    call.batchable = True
    token = example_usage.CURRENT.set(call)
    try:
        assert state.use_continuous_batching(None, None) is True and call.batched
        guard.batching_error = lambda: RuntimeError("No requests can be scheduled\nmore")
        assert [state.use_continuous_batching(None, None) for _ in range(2)] == [False, False] and not call.batched
    finally:
        example_usage.CURRENT.reset(token)
    assert capsys.readouterr().err.count("continuous batching stopped (No requests can be scheduled)") == 1

    async def health() -> dict:
        sent = []

        async def send(message):
            sent.append(message)

        await guard({"type": "http", "method": "GET", "path": "/health", "headers": []}, None, send)
        return json.loads(sent[1]["body"])

    assert asyncio.run(health())["degraded"].startswith("continuous batching stopped (No requests can be scheduled); requests are")


def test_a_plain_text_error_is_answered_in_openais_shape():
    """Starlette answers an exception it catches with a plain-text "Internal Server Error": clients read error.message."""
    import asyncio

    async def run() -> list[dict]:
        sent = []

        async def send(message):
            sent.append(message)

        sending = example_usage.openai_errors(send)
        await sending({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                                                                (b"content-length", b"21")]})
        await sending({"type": "http.response.body", "body": b"Internal Server Error"})
        return sent

    start, body = asyncio.run(run())
    assert dict(start["headers"])[b"content-type"] == b"application/json"
    assert json.loads(body["body"]) == {"error": {"message": "Internal Server Error", "type": "server_error", "param": None, "code": None}}


def test_a_request_the_app_fails_on_is_a_500_in_json_and_one_line_in_the_log(capsys):
    """A failure no check foresees: its client gets a 500 in the guard's words, the log one line (uvicorn alone
    printed a traceback, and its client a plain-text 500)."""
    import asyncio

    async def app(scope, receive, send):
        await receive()
        raise RuntimeError("the kernel said no\nand more")

    async def run() -> list[dict]:
        sent, body = [], [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive():
            if body:
                return body.pop()
            await asyncio.Event().wait()  # the client stays

        async def send(message):
            sent.append(message)

        guard = example_usage.Guard(app, timeout=30, max_requests=2)
        await guard({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}, receive, send)
        return sent

    sent = asyncio.run(run())
    assert sent[0]["status"] == 500 and json.loads(sent[1]["body"]) == {"error": {
        "message": "the server failed on this request: the kernel said no", "type": "server_error", "param": None, "code": None}}
    log = capsys.readouterr().err
    assert log.count("\n") == 1 and "RuntimeError: the kernel said no" in log and "Traceback" not in log, log
