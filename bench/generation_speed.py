#!/usr/bin/env python3
"""Generation speed of a fine-tuned model: the chat command, the chat in process, the evaluation's batches.

Examples:
  python bench/generation_speed.py                        # the model in ./echo-model (a tiny one is trained if absent)
  python bench/generation_speed.py --model echo-model/merged --json gen.json
  python bench/generation_speed.py --shape 1.7b --tokenizer DIR   # random weights of a named shape (a GPU machine)

Side by side, in one run, greedy decoding throughout:
  (i)   the chat command end to end, in a subprocess: python example_usage.py --prompt "Explain how an
        echo state network learns, step by step." --model DIR --max-new-tokens 64 --greedy --precision P;
        wall seconds (Python start-up, imports, loading the model, one answer of up to 64 tokens; the
        report gives its length), the median of 3 runs;
  (ii)  the chat in process, through example_usage.LocalChat (the model loaded once, merged): time to
        first token, until the streaming reply's first write (the first text a user sees), and tokens/s
        over an answer of exactly 64 new tokens (min_new_tokens; --max-new-tokens sets the 64 throughout), the
        median of 3 after one warm-up;
  (ii') the same chat with example_usage.py --static-cache (a key/value cache of the whole context, made
        once; on CUDA transformers compiles the decoding step, which the untimed first answer waits for:
        its time is reported), tokens/s and the ratio to (ii);
  (iii) batched generation as the persona evaluation runs it (finetune.generate_answers: left-padded
        batches of eval_batch_size, 64 new tokens at most, answers end at their end-of-turn token or
        once they loop): generated tokens/s over one batch of the evaluation's English identity probes;
  (iv)  a conversation in the chat in process: CONVERSATION's questions in turn, each answer exactly 64
        tokens; at every turn the time to first token with the last turn's key/value cache kept (as the
        chat runs) and with the whole history read again (the same question asked again, nothing kept);
        the last turn's two figures, and whether every answer came out the same both ways;
  (v)   the evaluation's conversations (finetune.talk_histories: the drift, switch and interview probes,
        the model's own answers of up to 64 tokens kept in each history), seconds with each turn's cache
        kept and with each history read again, in that order, and whether the histories are the same;
        --conversations N takes N of them, one of each kind in turn (the tests take three).
(i) and (ii) run with --precision auto, and, on a CPU that computes bf16 natively, again with
--precision int8 (int8 linear weights): the ratio of their tokens/s is printed.
(ii) and (ii') also answer once more under torch.profiler, untimed: the ops the host dispatched per
generated token (the prompt's included). On a GPU each costs the host microseconds to dispatch and
launch, so a small model's tokens/s there is bound by their count, not by arithmetic.
--shape NAME measures a model of SmolLM2's architecture at that size (bench/gpu_train.py's shapes) with
random bf16 weights, for a machine that has no trained model and reaches no hub (a lent GPU): the time
per token is that of any model of that shape; its answers are noise (the report says how long they were).
"""
from __future__ import annotations

import argparse
import itertools
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import example_usage  # noqa: E402
import finetune  # noqa: E402
import gpu_train  # noqa: E402
from train_throughput import BUSY_WARNING, cpu_description, host_work, part  # noqa: E402

# --------------------------------------------------------------------------------------------
# Settings of the benchmark.
# --------------------------------------------------------------------------------------------
PROMPT = "Who are you?"
LONG_PROMPT = "Explain how an echo state network learns, step by step."  # (i): asks for more than PROMPT (the report says how many tokens came)
MAX_NEW_TOKENS = 64  # --max-new-tokens: the answers' length (the tests measure shorter ones)
RUNS = 3  # timed runs of (i) and (ii); the median is reported
TINY_TRAINING = ["--max-steps", "2", "--max-length", "48", "--batch-size", "2", "--no-eval"]
CONVERSATION = ["Who are you?", "What is an echo state network?", "How do you remember things?",
                "What is the capital of Spain?", "How do I boil an egg?", "Who made you?"]  # (iv)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--model", default=str(ROOT / "echo-model"), metavar="DIR",
                        help="a trained output folder or merged model (default: echo-model; if absent, a tiny model "
                             "is trained into a temporary folder first)")
    parser.add_argument("--shape", choices=gpu_train.SHAPES, help="random weights of SmolLM2's architecture at this size, instead of --model")
    parser.add_argument("--tokenizer", metavar="DIR", help="with --shape: a folder with SmolLM2's tokenizer, where the embedded model is not installed")
    parser.add_argument("--runs", type=int, default=RUNS, help=f"timed runs of (i) and (ii) (default {RUNS})")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, metavar="N",
                        help=f"new tokens an answer has (ii) or may have (i, iii) (default {MAX_NEW_TOKENS})")
    parser.add_argument("--conversations", type=int, metavar="N",
                        help="(v) on N of the evaluation's conversations, one of each kind in turn (default: all)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.max_new_tokens < 1 or (args.conversations is not None and args.conversations < 1):
        parser.error("--runs, --max-new-tokens and --conversations must be at least 1")
    if args.shape and args.model != parser.get_default("model"):
        parser.error("give --model or --shape, not both")
    if args.tokenizer and not args.shape:
        parser.error("--tokenizer goes with --shape (a model folder has its own tokenizer)")
    return args


# --------------------------------------------------------------------------------------------
# Data: the model folder (trained here when there is none) and the questions.
# --------------------------------------------------------------------------------------------
def train_tiny_model(folder: Path) -> None:
    """Two steps on short rows: a real output folder of this tool, in well under a minute of training.
    Its answers are no good; the time per token is that of any model of this size."""
    command = [sys.executable, str(ROOT / "finetune.py"), "--provider", "huggingface", "--output-dir", str(folder), *TINY_TRAINING]
    finetune.log(f"no model given and no echo-model here; training a tiny one: {shlex.join(command)}")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise finetune.UserError(f"training the tiny model failed: {done.stderr.strip().splitlines()[-1:]}", 1)


def evaluation_batch(settings: dict) -> list[list[dict]]:
    """The first eval_batch_size English identity probes, asked with no system message (as in the evaluation)."""
    probes = [p for p in finetune.load_probes(settings) if p["kind"] == "identity" and p["lang"] == "en"]
    return [[{"role": "user", "content": p["probe"]}] for p in probes[: settings["eval_batch_size"]]]


# --------------------------------------------------------------------------------------------
# (i) The chat command, end to end.
# --------------------------------------------------------------------------------------------
def run_command_line(model: str, runs: int, precision: str, new_tokens: int) -> dict:
    command = [sys.executable, str(ROOT / "example_usage.py"), "--prompt", LONG_PROMPT, "--model", model,
               "--max-new-tokens", str(new_tokens), "--greedy", "--precision", precision]
    seconds, answer = [], None
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise finetune.UserError(f"{shlex.join(command)} failed: {done.stderr.strip().splitlines()[-1:]}", 1)
        answer = done.stdout.strip()
    tokens = len(finetune.load_tokenizer(model)(answer, add_special_tokens=False)["input_ids"])
    return {"command": shlex.join(command), "seconds": seconds, "median_seconds": statistics.median(seconds),
            "answer": answer, "answer_tokens": tokens}


# --------------------------------------------------------------------------------------------
# (ii) The chat in process: time to first token and tokens/s of one streamed answer.
# --------------------------------------------------------------------------------------------
def timed(chat, messages: list[dict]) -> tuple[float, float, str]:
    """One streamed reply: seconds to its first write (the first text a user sees), seconds in all, the answer."""
    first = []
    start = time.perf_counter()
    answer = chat.reply(list(messages), lambda piece: first or first.append(time.perf_counter()))
    return first[0] - start, time.perf_counter() - start, answer


def run_chat(settings: dict, model: str, runs: int, new_tokens: int, static_cache: bool = False) -> dict:
    import torch

    flags = {"greedy": True, "max_new_tokens": new_tokens, "static_cache": static_cache}
    chat = example_usage.LocalChat(settings, model, None, flags)
    chat.decoding["min_new_tokens"] = new_tokens  # exactly that many new tokens: the count is known
    messages = [{"role": "user", "content": PROMPT}]

    def timed_reply() -> tuple[float, float, str]:
        chat.kept = None  # a first question: nothing kept from the run before (see (iv))
        return timed(chat, messages)

    warm_up = timed_reply()[1]  # first-call allocations, autocast caches; with a static cache on CUDA, compiling
    replies = [timed_reply() for _ in range(runs)]
    with torch.profiler.profile() as profiler:  # one more answer, not timed: the host's ops per token
        timed_reply()
    first_token = statistics.median(r[0] for r in replies)
    total = statistics.median(r[1] for r in replies)
    return {"precision": chat.settings["precision"], "first_token_seconds": [round(r[0], 3) for r in replies],
            "reply_seconds": [round(r[1], 3) for r in replies], "median_first_token_seconds": first_token,
            "median_reply_seconds": total, "new_tokens": new_tokens, "tokens_per_second": new_tokens / total,
            "warm_up_seconds": warm_up, "static_cache": static_cache,
            "host_ops_per_token": host_work(profiler)["ops"] / new_tokens,
            "answer": replies[-1][2]}


# --------------------------------------------------------------------------------------------
# (iii) Batched generation, as the evaluation runs it.
# --------------------------------------------------------------------------------------------
def run_batched(settings: dict, model_name: str, new_tokens: int) -> dict:
    """The model as the evaluation answers with it (finetune.answering: its device and precision, an
    adapter merged in as score_model merges it), one batch of probes; generated tokens are counted from
    generate()'s output: the positions after the prompt that are not padding."""
    model, tokenizer, _ = finetune.load_for_inference(model_name)
    model = finetune.answering(model, settings)
    if hasattr(model, "merge_adapter"):
        model.merge_adapter()
    conversations = evaluation_batch(settings)
    generated, generate = [], model.generate

    def counting_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        generated.append(int((out[:, kwargs["input_ids"].shape[1]:] != tokenizer.pad_token_id).sum()))
        return out

    model.generate = counting_generate
    finetune.generate_answers(model, tokenizer, conversations[:2], settings, max_new_tokens=8)  # warm-up
    generated.clear()
    start = time.perf_counter()
    answers = finetune.generate_answers(model, tokenizer, conversations, settings, max_new_tokens=new_tokens)
    seconds = time.perf_counter() - start
    return {"precision": settings["precision"], "conversations": len(conversations), "batch_size": settings["eval_batch_size"],
            "seconds": seconds, "generated_tokens": sum(generated), "tokens_per_second": sum(generated) / seconds,
            "answer": answers[0]}


# --------------------------------------------------------------------------------------------
# (iv) and (v) Conversations: each turn's cache kept, against each history read again.
# --------------------------------------------------------------------------------------------
def run_conversation(settings: dict, model: str, new_tokens: int) -> dict:
    """Each turn asked twice: first as the chat asks it (the last turn's cache kept), then again with nothing
    kept (the whole history read); that second reply's cache is what the next turn starts from."""
    chat = example_usage.LocalChat(settings, model, None, {"greedy": True, "max_new_tokens": new_tokens})
    chat.decoding["min_new_tokens"] = new_tokens  # the history grows by a known length
    timed(chat, [{"role": "user", "content": PROMPT}])  # warm-up
    chat.kept, history, turns = None, [], []
    for question in CONVERSATION:
        history.append({"role": "user", "content": question})
        tokens = len(finetune.render(chat.tokenizer, history, add_generation_prompt=True)["input_ids"])
        kept, _, answer = timed(chat, history)
        chat.kept = None
        again, _, fresh = timed(chat, history)
        turns.append({"prompt_tokens": tokens, "kept_seconds": round(kept, 3), "reread_seconds": round(again, 3), "same": answer == fresh})
        history.append({"role": "assistant", "content": answer})
    return {"precision": chat.settings["precision"], "turns": turns, "same_answers": all(t["same"] for t in turns)}


def run_conversations(settings: dict, model_name: str, new_tokens: int, count: int | None) -> dict:
    """finetune.talk_histories as the evaluation calls it (answers of up to `new_tokens`), with the caches kept
    and with them refused; on `count` of its conversations (None: all)."""
    settings = dict(settings, eval_max_new_tokens=new_tokens)
    model, tokenizer, _ = finetune.load_for_inference(model_name)
    model = finetune.answering(model, settings)
    probes = taken_in_turn(finetune.load_probes(settings), count)
    seconds, histories, kept_batch = {}, {}, finetune.Kept.batch
    try:
        for way, batch in (("kept", kept_batch), ("reread", lambda rows, kept: None)):
            finetune.Kept.batch = staticmethod(batch)
            start = time.perf_counter()
            histories[way] = finetune.talk_histories(model, tokenizer, probes, settings, "greedy")
            seconds[way] = time.perf_counter() - start
    finally:
        finetune.Kept.batch = staticmethod(kept_batch)
    turns = sum(len(finetune.questions_of(p)) for p in probes)  # taken_in_turn keeps only the conversations
    return {"precision": settings["precision"], "conversations": sum(map(len, histories["kept"].values())), "turns": turns,
            "kept_seconds": seconds["kept"], "reread_seconds": seconds["reread"], "same_histories": histories["kept"] == histories["reread"]}


def taken_in_turn(probes: list[dict], count: int | None) -> list[dict]:
    """The conversation probes (finetune.TALKS), `count` of them taken one of each kind in turn."""
    kinds = [[p for p in probes if p["kind"] == kind] for kind in finetune.TALKS]
    in_turn = [p for row in itertools.zip_longest(*kinds) for p in row if p]
    return in_turn[:count]


# --------------------------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------------------------
def format_report(results: dict) -> str:
    iii, cpu = results["batched"], results["cpu"]
    lines = [f"model: {results['model']}", "| measure | figure |", "|---|---:|"]
    for precision, i in results["command_line"].items():
        ii = results["chat"][precision]
        lines += [
            f"| (i) example_usage.py --prompt --precision {precision}, end to end, a {i['answer_tokens']}-token answer "
            f"(median of {len(i['seconds'])}) | {i['median_seconds']:.1f} s |",
            f"| (ii) chat in process, time to first token ({ii['precision']}) | {ii['median_first_token_seconds']:.2f} s |",
            f"| (ii) chat in process, {ii['new_tokens']}-token answer ({ii['precision']}) | {ii['tokens_per_second']:.1f} tok/s |",
        ]
    if static := results.get("chat_static_cache"):
        lines.append(f"| (ii) chat in process, example_usage.py --static-cache, {static['new_tokens']}-token answer ({static['precision']}; "
                     f"first answer {static['warm_up_seconds']:.1f} s) | {static['tokens_per_second']:.1f} tok/s |")
    lines.append(f"| (iii) evaluation batches, {iii['conversations']} probes, batch {iii['batch_size']} ({iii['precision']}) | "
                 f"{iii['tokens_per_second']:.1f} tok/s |")
    iv, v = results["conversation"], results["conversations"]
    last = iv["turns"][-1]
    lines += [
        f"| (iv) chat in process, turn {len(iv['turns'])} of a conversation ({last['prompt_tokens']} tokens), time to first token, "
        f"history read again ({iv['precision']}) | {last['reread_seconds']:.2f} s |",
        f"| (iv) the same, the last turn's cache kept ({iv['precision']}) | {last['kept_seconds']:.2f} s |",
        f"| (v) the evaluation's conversations, {v['conversations']} ({v['turns']} turns), histories read again ({v['precision']}) | "
        f"{v['reread_seconds']:.1f} s |",
        f"| (v) the same, each turn's cache kept ({v['precision']}) | {v['kept_seconds']:.1f} s |",
        f"conversation turn {len(iv['turns'])}, first token, kept / read again: {last['kept_seconds'] / last['reread_seconds']:.2f}x; "
        f"the evaluation's conversations, kept / read again: {v['kept_seconds'] / v['reread_seconds']:.2f}x; "
        f"the same answers: {'yes' if iv['same_answers'] and v['same_histories'] else 'NO'}",
    ]
    if static:
        auto = results["chat"]["auto"]
        lines.append(f"chat tok/s, --static-cache / default cache: {static['tokens_per_second'] / auto['tokens_per_second']:.2f}x"
                     + (" (compiled by transformers on CUDA)" if results["device"] == "cuda" else " (not compiled off CUDA)"))
    chats = {f"(ii) {ii['precision']}": ii for ii in results["chat"].values()} | ({"(ii') --static-cache": static} if static else {})
    lines.append("host ops dispatched per generated token: " + ", ".join(f"{name} {r['host_ops_per_token']:.0f}" for name, r in chats.items()))
    if "int8" in results["chat"]:
        auto, int8 = results["chat"]["auto"], results["chat"]["int8"]
        lines.append(f"chat tok/s, int8 / {auto['precision']}: {int8['tokens_per_second'] / auto['tokens_per_second']:.2f}x")
    lines.append("")
    for precision, i in results["command_line"].items():
        ii = results["chat"][precision]
        lines.append(f"{precision}: (i) runs: {', '.join(f'{s:.1f}' for s in i['seconds'])} s; (ii) first token: "
                     f"{', '.join(map(str, ii['first_token_seconds']))} s, replies: {', '.join(map(str, ii['reply_seconds']))} s")
    lines += [
        f"(iii) {iii['generated_tokens']} tokens in {iii['seconds']:.1f} s",
        "(iv) first token at each turn, kept / read again: " + ", ".join(
            f"{t['kept_seconds']} / {t['reread_seconds']} s ({t['prompt_tokens']} tokens)" for t in iv["turns"]),
        f"CPU: {cpu['model'] or 'unknown'}, capability {cpu['capability']}, native bf16 "
        f"{'yes' if cpu['native_bf16'] else 'no'}, torch threads {cpu['threads']} of {cpu['cores']} cores"
        + ("" if results["device"] == "cpu" else f"; device {results['device']} ({results['hardware']})"),
        "other processes used (share of all CPUs): " + ", ".join(
            f"{name} {'?' if p['others_busy'] is None else format(p['others_busy'], '.0%')}"
            for name, p in results["parts"].items() if name != "total"),
        "command: python " + shlex.join(sys.argv),
    ]
    busy = [p["others_busy"] for name, p in results["parts"].items() if name != "total" and p["others_busy"] is not None]
    if busy and max(busy) > BUSY_WARNING:
        lines.append(f"WARNING: other processes used up to {max(busy):.0%} of the CPUs; these rates understate this machine")
    lines.append("time: " + ", ".join(f"{name} {p['seconds']:.0f} s" for name, p in results["parts"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    finetune.quiet_libraries()
    parts = {}
    with part("total", parts), tempfile.TemporaryDirectory(prefix="bench-gen-") as scratch:
        model, trained_here = str(Path(args.model).resolve()), False
        if args.shape:
            with part(f"making a random {args.shape} model", parts):
                model = str(Path(scratch, f"random-{args.shape}"))
                parameters = gpu_train.make_model(args.shape, Path(model), finetune.DEFAULT_SETTINGS["seed"], args.tokenizer)
            finetune.log(f"random-weight model of the {args.shape} shape: {parameters / 1e6:.0f}M parameters")
        elif not Path(model).exists():
            if model != str(ROOT / "echo-model"):
                raise finetune.UserError(f"--model {model} does not exist")
            with part("training a tiny model", parts):
                model, trained_here = str(Path(scratch, "tiny-model")), True
                train_tiny_model(Path(model))
        settings = finetune.resolve_hardware(dict(finetune.DEFAULT_SETTINGS, eval_dataset=str(ROOT / "persona_eval.jsonl")),
                                             training=False)

        # int8 weights (--precision int8) where the CPU computes bf16 natively, beside the automatic choice
        precisions = ["auto", "int8"] if settings["device"] == "cpu" and finetune.cpu_has_native_bf16() else ["auto"]
        command_line, chat = {}, {}
        for precision in precisions:
            with part(f"(i) command line, {precision}", parts):
                command_line[precision] = run_command_line(model, args.runs, precision, args.max_new_tokens)
            finetune.log(f"(i) command line, {precision}: median {command_line[precision]['median_seconds']:.1f} s")
            with part(f"(ii) chat, {precision}", parts):
                chat[precision] = run_chat(dict(finetune.DEFAULT_SETTINGS, precision=precision), model, args.runs, args.max_new_tokens)
            finetune.log(f"(ii) chat, {precision}: first token {chat[precision]['median_first_token_seconds']:.2f} s, "
                         f"{chat[precision]['tokens_per_second']:.1f} tok/s")
        with part("(ii) chat, static cache", parts):
            chat_static = run_chat(dict(finetune.DEFAULT_SETTINGS), model, args.runs, args.max_new_tokens, static_cache=True)
        finetune.log(f"(ii) chat, static cache: first answer {chat_static['warm_up_seconds']:.1f} s, "
                     f"{chat_static['tokens_per_second']:.1f} tok/s")
        with part("(iii) batched", parts):
            batched = run_batched(settings, model, args.max_new_tokens)
        finetune.log(f"(iii) batched: {batched['tokens_per_second']:.1f} tok/s")
        with part("(iv) conversation", parts):
            conversation = run_conversation(dict(finetune.DEFAULT_SETTINGS), model, args.max_new_tokens)
        with part("(v) conversations", parts):
            conversations = run_conversations(settings, model, args.max_new_tokens, args.conversations)
        finetune.log(f"(v) the evaluation's conversations: {conversations['kept_seconds']:.1f} s kept, "
                     f"{conversations['reread_seconds']:.1f} s read again")

    described = (f"random bf16 weights of SmolLM2's {args.shape} shape, {parameters / 1e6:.0f}M parameters" if args.shape else
                 f"a tiny model trained for this run (finetune.py {shlex.join(TINY_TRAINING)}): no echo-model here"
                 if trained_here else model)
    results = {"model": described, "trained_here": trained_here, "shape": args.shape,
               "command_line": command_line, "chat": chat, "chat_static_cache": chat_static, "batched": batched,
               "conversation": conversation, "conversations": conversations, "cpu": cpu_description(),
               "device": settings["device"], "hardware": settings["hardware"], "parts": parts,
               "command": shlex.join(sys.argv)}
    print(format_report(results))
    if args.json:
        finetune.write_atomic(args.json, json.dumps(results, indent=2, ensure_ascii=False) + "\n", overwrite=True)
        finetune.log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    finetune.exit_without_teardown(finetune.run_command(main, verbose=True))  # a UserError is one line; anything else keeps its traceback
