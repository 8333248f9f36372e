#!/usr/bin/env python3
"""Chat latency through `example_usage.py --serve` (transformers serve) beside transformers generate.

Examples:
  python bench/serve_latency.py                          # echo-model (or the base model), 8 requests of 32 tokens
  python bench/serve_latency.py --model echo-model --requests 16 --tokens 64
  python bench/serve_latency.py --clients 32 --load-tokens 16     # the load rounds' defaults

One run, the same model folder (the merged one --serve serves), the same prompts, greedy decoding with
exactly --tokens new tokens (min = max, so both sides count the same tokens), fp32, one request at a time:
  server:   the openai client, streaming, against `example_usage.py --serve --port 0` (started here, then stopped);
  generate: model.generate() in this process, after the server is gone (they never share the CPU);
  llama.cpp: the exported F16 GGUF in MODEL/gguf/, where there is one and llama-cpp-python is installed.
Latency is per request (first token: time to the first streamed text); tokens/s is new tokens over the
summed request time. One warm-up request on each side is not counted.

Then load and abuse, on the same server: --clients ordinary chats at once (--load-tokens each, greedy, half
of them streamed), alone, then again beside misbehaving clients (ABUSE below: dropped streams, prompts past
the context, bodies over 1 MB, malformed JSON, a body sent a byte at a time, a stop string of 100,000
characters, 256 connections that send nothing). It reports the ordinary chats'
p50/p95 in both rounds and their ratio, how many were answered, each misbehaving kind's answer and time,
the server's peak RSS (VmHWM), and the seconds from SIGTERM (sent while it streams) to its exit.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import finetune  # noqa: E402
from train_throughput import BUSY_WARNING, machine_busy_seconds  # noqa: E402

PROMPTS = ["Who are you?", "What is an echo state network?", "Describe yourself in three words.",
           "Give me a tip for sleeping better.", "What is a membrane P-system?", "Qui es-tu ?"]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def start_server(model: str) -> tuple[subprocess.Popen, str, str, list[str]]:
    process = subprocess.Popen([sys.executable, str(ROOT / "example_usage.py"), "--serve", "--port", "0", "--model", model,
                                "--precision", "fp32"], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line) for line in process.stderr], daemon=True).start()
    while not (match := re.search(r"^serving (.+) at (http://\S+/v1) ", "".join(lines), re.M)):
        if process.poll() is not None:
            sys.exit("the server did not start:\n" + "".join(lines))
        time.sleep(0.1)
    return process, match.group(1), match.group(2), lines


def time_server(url: str, model: str, prompts: list[str], tokens: int) -> list[tuple[float, float, int]]:
    import openai

    client = openai.OpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=600)
    options = json.dumps({"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False})
    rows = []
    for prompt in prompts:
        start, first, count = time.perf_counter(), None, 0
        stream = client.chat.completions.create(model=model, stream=True, messages=[{"role": "user", "content": prompt}],
                                                extra_body={"generation_config": options})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage:
                count = chunk.usage.completion_tokens
        end = time.perf_counter()
        rows.append((end - start, (first or end) - start, count))
    return rows


def time_generate(folder: str, prompts: list[str], tokens: int) -> list[tuple[float, float, int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = []
    for prompt in prompts:
        start = time.perf_counter()
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        out = {}

        def run():
            with torch.no_grad():
                out["ids"] = model.generate(**ids, streamer=streamer, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

        worker = threading.Thread(target=run)
        worker.start()
        first = None
        for piece in streamer:
            if piece and first is None:
                first = time.perf_counter()
        worker.join()
        end = time.perf_counter()
        rows.append((end - start, (first or end) - start, out["ids"].shape[-1] - ids["input_ids"].shape[-1]))
    return rows


def time_llama_cpp(gguf: Path, prompts: list[str], tokens: int) -> list[tuple[float, float, int]]:
    """llama.cpp on the exported F16 GGUF (python finetune.py --export gguf), its own chat template,
    the end-of-turn token biased away so that every answer has exactly `tokens` tokens."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=os.cpu_count(), verbose=False)
    rows = []
    for prompt in prompts:
        start, first, count = time.perf_counter(), None, 0
        for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0,
                                                repeat_penalty=1.0, logit_bias={llm.token_eos(): -1000.0}, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                first, count = first or time.perf_counter(), count + 1  # one token per streamed piece
        end = time.perf_counter()
        rows.append((end - start, (first or end) - start, count))
    return rows


# --------------------------------------------------------------------------------------------
# Load and abuse: many ordinary chats at once, with and without misbehaving clients beside them.
# tests/test_serve.py runs the same rounds (fewer tokens) and asserts loose bounds on them.
# --------------------------------------------------------------------------------------------
IDLE_SOCKETS = 256  # uvicorn's limit_concurrency, which counted connections: this many shut every client out
ABUSE = {  # what each misbehaving client does, and the answer it must get
    "dropped stream": "streams a 256-token answer and hangs up after its first piece",
    "prompt past the context": "asks with 9,000 words (over 8,192 tokens): 400",
    "body over 1 MB": "sends 1.2 MB: 413",
    "malformed JSON": "sends '{not json': 422",
    "slow body": "sends its body a byte every 0.5 s: 408 after 10 s",
    "long stop string": "asks to stop at a string of 100,000 characters (it took 23 GB, and the server): 422",
    "idle connections": f"opens {IDLE_SOCKETS} connections and sends nothing (they shut every client out): each closed after 10 s",
}
ONCE = ("slow body", "idle connections")  # the others come `repeats` times
LONG_PROMPT = "Write the numbers from 1 to 1000, one per line."  # the base model goes on past 300 tokens, greedy
EXPECTED = {"prompt past the context": 400, "body over 1 MB": 413, "malformed JSON": 422, "slow body": 408, "long stop string": 422,
            "idle connections": f"{IDLE_SOCKETS}/{IDLE_SOCKETS} closed"}


def chat_body(model: str, question: str, tokens: int, stream: bool) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
                       "temperature": 0, "stream": stream}).encode()


def post(url: str, body: bytes, timeout: float = 600) -> tuple[int, float, bytes]:
    """One POST to the chat endpoint on a connection of its own: (status, seconds to the whole answer, body)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    start = time.perf_counter()
    try:
        connection.request("POST", parts.path + "/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        text = response.read()  # a stream's headers come at once: its time runs to the end of its body
        return response.status, time.perf_counter() - start, text
    except OSError as exc:  # a refused or reset connection: the status says which
        return type(exc).__name__, time.perf_counter() - start, b""
    finally:
        connection.close()


def whole_answer(text: bytes, stream: bool) -> bool:
    """Text and a finish reason, and no error event: what a client needs to call it answered."""
    if not stream:
        choice = json.loads(text)["choices"][0]
        return bool(choice["message"]["content"]) and choice["finish_reason"] in ("stop", "length")
    events = [json.loads(line[6:]) for line in text.decode().splitlines() if line.startswith("data: {")]
    content = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    finish = [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]
    return bool(content) and finish[-1:] in (["stop"], ["length"]) and not any("error" in e for e in events)


def ordinary_chat(url: str, model: str, i: int, tokens: int) -> float | None:
    """One ordinary question (streamed every other time): its latency, or None when it got no whole answer."""
    stream = i % 2 == 0
    status, seconds, text = post(url, chat_body(model, PROMPTS[i % len(PROMPTS)], tokens, stream))
    return seconds if status == 200 and whole_answer(text, stream) else None


def socket_to(url: str) -> socket.socket:
    parts = urllib.parse.urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=120)


def headers_for(url: str, length: int) -> bytes:
    path = urllib.parse.urlsplit(url).path + "/chat/completions"
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()


def long_body(model: str, tokens: int, stream: bool, batched: bool = True) -> bytes:
    """A request for an answer of exactly `tokens` tokens, whatever the model would say. Batched: no end token
    (-1; continuous batching takes the end tokens per request, so it stays batched). Not batched: min_new_tokens,
    decoding continuous batching does not do, so generate() answers it."""
    options = {"eos_token_id": -1} if batched else {"min_new_tokens": tokens}
    body = json.loads(chat_body(model, LONG_PROMPT, tokens, stream))
    return json.dumps(dict(body, generation_config=json.dumps(options))).encode()


def open_stream(url: str, body: bytes) -> tuple[socket.socket, bytes]:
    """A streamed request, read up to its first piece of text: (the connection, what came so far)."""
    connection = socket_to(url)
    connection.sendall(headers_for(url, len(body)) + body)
    received = b""
    while b'"content"' not in received and (piece := connection.recv(4096)):
        received += piece
    return connection, received


def drop_a_stream(url: str, model: str) -> tuple[int, float]:
    start = time.perf_counter()
    connection, received = open_stream(url, long_body(model, 256, stream=True))
    connection.close()
    return 200 if b'"content"' in received else 0, time.perf_counter() - start


def send_slowly(url: str, model: str) -> tuple[int, float]:
    body = chat_body(model, "Hello", 4, False)
    start = time.perf_counter()
    with socket_to(url) as connection:
        connection.sendall(headers_for(url, len(body)))
        try:
            for byte in body:
                connection.sendall(bytes([byte]))
                time.sleep(0.5)
        except OSError:  # the server answered and closed: read what it said
            pass
        status = connection.recv(4096).split(b" ", 2)[1:2]
    return int(status[0]) if status else 0, time.perf_counter() - start


def sit_idle(url: str) -> tuple[str, float]:
    """IDLE_SOCKETS connections that send nothing, each read until the server closes it: (how many it closed,
    seconds to the last)."""
    start = time.perf_counter()
    sockets = [socket_to(url) for _ in range(IDLE_SOCKETS)]
    closed = 0
    for connection in sockets:
        with connection:
            try:
                closed += connection.recv(1) == b""
            except OSError:  # still open at socket_to's timeout
                pass
    return f"{closed}/{IDLE_SOCKETS} closed", time.perf_counter() - start


def misbehave(url: str, model: str, kind: str) -> tuple[int | str, float]:
    """One misbehaving request of a kind in ABUSE: (status, seconds to the answer or to hanging up)."""
    if kind == "dropped stream":
        return drop_a_stream(url, model)
    if kind == "slow body":
        return send_slowly(url, model)
    if kind == "idle connections":
        return sit_idle(url)
    stop = dict(json.loads(chat_body(model, "Hello", 8, False)), stop=["x" * 100_000])
    body = {"prompt past the context": chat_body(model, "word " * 9000, 8, False), "malformed JSON": b"{not json",
            "body over 1 MB": chat_body(model, "word " * 240_000, 8, False), "long stop string": json.dumps(stop).encode()}[kind]
    status, seconds, _ = post(url, body)
    return status, seconds


def load_round(url: str, model: str, pid: int, clients: int, tokens: int, abuse: bool, repeats: int = 3) -> dict:
    """`clients` ordinary chats at once; with `abuse`, each kind of misbehaving client `repeats` times beside
    them (the slow body once). Returns the ordinary latencies (None for a request that got no whole answer),
    the misbehaving requests' (kind, status, seconds) and the CPU seconds the server (`pid`) used: on a
    shared CPU the latencies move with the neighbours' load (`others`: their share of all CPUs meanwhile)."""
    kinds = [kind for kind in ABUSE for _ in range(1 if kind in ONCE else repeats)] if abuse else []
    server, clients_cpu, busy, start = cpu_seconds(pid), time.process_time(), machine_busy_seconds(), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients + len(kinds)) as pool:
        bad = [(kind, pool.submit(misbehave, url, model, kind)) for kind in kinds]
        good = [pool.submit(ordinary_chat, url, model, i, tokens) for i in range(clients)]
        latencies = [future.result() for future in good]
        misbehaved = [(kind, *future.result()) for kind, future in bad]
    server, seconds = cpu_seconds(pid) - server, time.perf_counter() - start
    others = None if busy is None else others_share(machine_busy_seconds() - busy - server - (time.process_time() - clients_cpu), seconds)
    return {"latencies": latencies, "abuse": misbehaved, "cpu": server, "others": others}


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used (user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sigterm_to_exit(process: subprocess.Popen, url: str, model: str) -> tuple[float, float | None]:
    """Seconds from SIGTERM to the server's exit, sent while it streams a long answer, and the share of the CPUs
    other processes used meanwhile (the server, reaped, counts among this process's children)."""
    connection, _ = open_stream(url, long_body(model, 1000, stream=True, batched=False))
    with connection:
        server, children, own, busy = cpu_seconds(process.pid), children_cpu(), time.process_time(), machine_busy_seconds()
        start = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        seconds = time.perf_counter() - start
    if busy is None:
        return seconds, None
    server = children_cpu() - children - server
    return seconds, others_share(machine_busy_seconds() - busy - server - (time.process_time() - own), seconds)


def children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


def others_share(busy: float, seconds: float) -> float:
    """CPU seconds other processes used, as a share of all the CPUs over `seconds`."""
    return max(0.0, busy) / (seconds * (os.cpu_count() or 1))


def load_summary(alone: dict, abused: dict) -> list[str]:
    rows = [f"{'':<12} {'p50':>8} {'p95':>8} {'max':>8}  answered"]
    for name, result in (("alone", alone), ("with abuse", abused)):
        done = [x for x in result["latencies"] if x is not None]
        rows.append(f"{name:<12} {percentile(done, 0.5):6.2f} s {percentile(done, 0.95):6.2f} s {max(done):6.2f} s  "
                    f"{len(done)}/{len(result['latencies'])}")
    rows.append(f"p95 with abuse / alone: {p95(abused) / p95(alone):.2f}x; the server's CPU time: {alone['cpu']:.1f} s alone, "
                f"{abused['cpu']:.1f} s with abuse; other processes used {busy_share(alone['others'])} and "
                f"{busy_share(abused['others'])} of the CPUs")
    if shared(alone["others"], abused["others"]):
        rows.append(f"WARNING: other processes used over {BUSY_WARNING:.0%} of the CPUs: these latencies measure the neighbours too")
    for kind in ABUSE:
        answers = [(status, seconds) for name, status, seconds in abused["abuse"] if name == kind]
        statuses = ",".join(sorted({str(status) for status, _ in answers}))
        what = {"dropped stream": "hung up after its first piece", "idle connections": statuses}.get(kind, f"answered {statuses}")
        rows.append(f"{kind:<24} {len(answers)}x, {what} in at most {max(s for _, s in answers):.2f} s")
    return rows


def busy_share(share: float | None) -> str:
    return "?" if share is None else f"{share:.0%}"


def shared(*shares: float | None) -> bool:
    """Whether other processes took more than BUSY_WARNING of the CPUs (or it is unknown) in any of these."""
    return any(share is None or share > BUSY_WARNING for share in shares)


def p95(result: dict) -> float:
    return percentile([x for x in result["latencies"] if x is not None], 0.95)


def summary(name: str, rows: list[tuple[float, float, int]]) -> str:
    latencies, firsts = [r[0] for r in rows], [r[1] for r in rows]
    rate = sum(r[2] for r in rows) / sum(latencies)
    return (f"{name:<9} {percentile(latencies, 0.5):7.2f} s {percentile(latencies, 0.95):7.2f} s "
            f"{statistics.median(firsts):9.2f} s {rate:9.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default = "echo-model" if (ROOT / "echo-model").exists() else finetune.SMOLLM2_ALIAS
    parser.add_argument("--model", default=default, help=f"fine-tuned folder, merged model or base (default: {default})")
    parser.add_argument("--requests", type=int, default=8, help="timed requests per side (default 8)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request (default 32)")
    parser.add_argument("--clients", type=int, default=32, help="ordinary chats at once in the load rounds (default 32)")
    parser.add_argument("--load-tokens", type=int, default=16, help="new tokens per chat in the load rounds (default 16)")
    args = parser.parse_args(argv)
    finetune.quiet_libraries()
    import torch

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests + 1)]  # the first is the warm-up
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average before {os.getloadavg()[0]:.2f}", flush=True)
    process, folder, url, lines = start_server(args.model)
    try:
        served = time_server(url, folder, prompts, args.tokens)[1:]
        ordinary_chat(url, folder, 0, args.load_tokens)  # continuous batching's first step is slow: not counted
        alone = load_round(url, folder, process.pid, args.clients, args.load_tokens, abuse=False)
        abused = load_round(url, folder, process.pid, args.clients, args.load_tokens, abuse=True)
        rss = peak_rss_mb(process.pid)
        stopped, stop_others = sigterm_to_exit(process, url, folder)
    finally:
        if process.poll() is None:
            process.kill()
    generated = time_generate(folder, prompts, args.tokens)[1:]
    print(f"model {folder}; {args.requests} requests of {args.tokens} new tokens each, one at a time, greedy, fp32")
    print(f"{'':<9} {'p50':>9} {'p95':>9} {'1st token':>11} {'tokens/s':>9}")
    print(summary("server", served))
    print(summary("generate", generated))
    serving = next((line.strip() for line in lines if line.startswith(("continuous batching", "one request at a time"))), "")
    print(f"\nload: {args.clients} ordinary chats at once, {args.load_tokens} new tokens each (greedy, half of them streamed), "
          f"alone and then beside misbehaving clients; the server: {serving.split(';')[0]}")
    print("\n".join(load_summary(alone, abused)))
    print(f"SIGTERM while streaming, to exit: {stopped:.2f} s (other processes used {busy_share(stop_others)} "
          f"of the CPUs meanwhile); peak RSS of the server: {rss:,.0f} MB")
    ggufs = sorted(Path(args.model).glob("gguf/*-F16.gguf"))
    try:
        import llama_cpp  # noqa: F401  (make test-export installs it)
    except ImportError:
        print("llama.cpp  skipped: llama-cpp-python is not installed (make test-export builds it)")
        return 0
    if not ggufs:
        print(f"llama.cpp  skipped: no {args.model}/gguf/*-F16.gguf (python finetune.py --export gguf --model {args.model})")
        return 0
    print(summary("llama.cpp", time_llama_cpp(ggufs[0], prompts, args.tokens)[1:]) + f"   ({ggufs[0].name}, F16)")
    return 0


if __name__ == "__main__":
    finetune.exit_without_teardown(finetune.run_command(main, verbose=True))  # a UserError is one line; anything else keeps its traceback
