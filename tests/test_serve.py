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

import finetune
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
@pytest.mark.parametrize("body, status", [
    ("{not json", 422),
    ("[1, 2]", 422),
    ("{}", 422),  # no messages: a 500 in transformers serve 5.24 alone; --serve adds the check
    ('{"messages": []}', 422),
    ('{"messages": "hi"}', 422),
    ('{"messages": [{"content": "hi"}]}', 422),
    ('{"messages": [{"role": "user", "content": 5}]}', 422),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 422),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', 422),
    ('{"messages": [{"role": "user", "content": "hi"}], "generation_config": "{oops"}', 422),
    ('{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}', 400),  # the server is pinned to its model
])
def test_malformed_requests_get_a_4xx_and_the_server_goes_on(served, body, status):
    _, server = served
    code, answer = post(server.url + "/chat/completions", body)
    assert code == status, answer
    assert "detail" in answer
    code, answer = post(server.url + "/chat/completions", json.dumps(
        {"model": server.model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}))
    assert code == 200 and answer["choices"][0]["message"]["content"], answer


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
