#!/usr/bin/env python3
"""Chat latency through `example_usage.py --serve` (transformers serve) beside transformers generate.

Examples:
  python bench/serve_latency.py                          # echo-model (or the base model), 8 requests of 32 tokens
  python bench/serve_latency.py --model echo-model --requests 16 --tokens 64

One run, the same model folder (the merged one --serve serves), the same prompts, greedy decoding with
exactly --tokens new tokens (min = max, so both sides count the same tokens), fp32, one request at a time:
  server:   the openai client, streaming, against `example_usage.py --serve --port 0` (started here, then stopped);
  generate: model.generate() in this process, after the server is gone (they never share the CPU);
  llama.cpp: the exported F16 GGUF in MODEL/gguf/, where there is one and llama-cpp-python is installed.
Latency is per request (first token: time to the first streamed text); tokens/s is new tokens over the
summed request time. One warm-up request on each side is not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import finetune  # noqa: E402

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
    args = parser.parse_args(argv)
    finetune.quiet_libraries()
    import torch

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests + 1)]  # the first is the warm-up
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average before {os.getloadavg()[0]:.2f}", flush=True)
    process, folder, url, lines = start_server(args.model)
    try:
        served = time_server(url, folder, prompts, args.tokens)[1:]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    generated = time_generate(folder, prompts, args.tokens)[1:]
    print(f"model {folder}; {args.requests} requests of {args.tokens} new tokens each, one at a time, greedy, fp32")
    print(f"{'':<9} {'p50':>9} {'p95':>9} {'1st token':>11} {'tokens/s':>9}")
    print(summary("server", served))
    print(summary("generate", generated))
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
    sys.exit(finetune.run_command(main, verbose=True))  # a UserError is one line; anything else keeps its traceback
