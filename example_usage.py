#!/usr/bin/env python3
"""Chat with a fine-tuned Deep Tree Echo model (no system prompt unless you give one).

Examples:
  python example_usage.py --interactive                        # the model in ./echo-model
  python example_usage.py --prompt "Who are you?"              # prints only the answer
  echo "What is an echo state network?" | python example_usage.py --prompt -
  python example_usage.py --model echo-model/merged --greedy --prompt "Hello"
  python example_usage.py --provider openai --interactive      # reads echo-openai/openai_job.json
  python example_usage.py --serve --port 8000                  # an OpenAI-compatible server (transformers serve)
  python example_usage.py --base-url http://127.0.0.1:8000/v1 --interactive   # chat through that server

In the interactive chat: /reset forgets the conversation, /exit or Ctrl-D quits,
Ctrl-C stops the answer being written (not the program).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import errno
import functools
import json
import math
import os
import re
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import finetune
from finetune import UserError, log


def build_parser() -> argparse.ArgumentParser:
    parser = finetune.Parser(
        prog="example_usage.py", description="Chat with a fine-tuned Deep Tree Echo model.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="output folder, merged model, hub id or path (default: the --output-dir of config.json)")
    parser.add_argument("--provider", choices=("huggingface", "openai"), default="huggingface")
    parser.add_argument("--interactive", action="store_true", help="a multi-turn conversation")
    parser.add_argument("--prompt", help="one question; the answer alone goes to stdout ('-' reads stdin)")
    parser.add_argument("--system", help="a system prompt (default: none, the persona stands alone)")
    parser.add_argument("--config", metavar="FILE", help="settings file (default: ./config.json if present)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--greedy", action=argparse.BooleanOptionalAction, help="greedy decoding; --no-greedy samples (default: the model folder's generation_config.json)")
    parser.add_argument("--seed", type=int, help="makes sampled answers repeatable")
    parser.add_argument("--device", choices=finetune.CHOICES["device"])
    parser.add_argument("--precision", choices=finetune.CHOICES["precision"],
                        help="auto: bf16 where native, else fp32; int8: int8 linear weights, bf16 compute (about 1.5x faster "
                             "answers on a CPU with native bf16; slightly different answers from the bf16 model)")
    parser.add_argument("--max-context", type=int, metavar="TOKENS", help="trim the oldest turns beyond this (default: the model's)")
    parser.add_argument("--static-cache", action="store_true",
                        help="a key/value cache for the whole context, made once: on CUDA transformers then compiles the "
                             "decoding step (CUDA graphs; the first answer waits for it); on a CPU nothing is compiled and it is slower")
    parser.add_argument("--serve", action="store_true", help="serve the model over an OpenAI-compatible API (transformers serve); "
                        "an adapter is merged into MODEL/merged first")
    parser.add_argument("--host", default="127.0.0.1", help="--serve listens here (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="--serve listens on this port (default: 8000; 0 picks a free one)")
    parser.add_argument("--request-timeout", type=float, default=SERVE_TIMEOUT, metavar="SECONDS",
                        help=f"--serve stops a request that takes longer, waiting included (default: {SERVE_TIMEOUT})")
    parser.add_argument("--max-requests", type=int, default=SERVE_MAX_REQUESTS, metavar="N",
                        help=f"--serve holds at most N requests, waiting or answered; more get a 503 (default: {SERVE_MAX_REQUESTS})")
    parser.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction,
                        help="--serve generates requests that decode alike together (default: on a CPU or a CUDA GPU)")
    parser.add_argument("--api-key", help="with --provider openai: prefer the OPENAI_API_KEY environment variable (a flag shows "
                        "in ps and in shell history)")
    parser.add_argument("--base-url", metavar="URL", help="chat through an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 "
                        "(one started with --serve); no API key is sent")
    parser.add_argument("--output-dir", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="show tracebacks")
    return parser


# --------------------------------------------------------------------------------------------
# A local model: loaded once, answers streamed token by token, history trimmed to fit.
# --------------------------------------------------------------------------------------------
class LocalChat:
    def __init__(self, settings: dict, name: str, max_context: int | None, decoding: dict | None = None):
        model, self.tokenizer, _ = finetune.load_for_inference(chat_model(name))  # a wrong --model: the error before torch loads
        import torch

        self.model = finetune.merged(model)  # the chat never needs the base alone: merged, each token costs less
        self.settings = finetune.resolve_hardware(settings, training=False)
        torch.manual_seed(settings["seed"])  # what sampling draws from; transformers.set_seed would import peft, 2.5 s
        self.model = finetune.answering(self.model, self.settings)
        context = getattr(self.model.config, "max_position_embeddings", None) or 2048
        if max_context is not None and max_context > context:
            raise UserError(f"--max-context {max_context:,} is past the model's context of {context:,} tokens")
        self.max_context = max_context or context
        self.stopped = False  # the last answer was cut short by Ctrl-C
        self.decoding = decoding_overrides(decoding or {})  # the flags given; the folder's generation_config.json for the rest
        if (decoding or {}).get("static_cache"):  # one cache of the whole context: every turn the same shapes, one compile
            self.decoding.update(cache_implementation="static", max_cache_len=self.max_context)
        self.kept = None  # the last turn's key/value cache: the next reads only the new question (not with a static cache)
        self.torch = torch

    def answer_tokens(self) -> int:
        """The longest answer: --max-new-tokens, else the folder's generation_config.json, else 256. A base
        model's config often sets none, and generate() would then stop every answer at 20 tokens."""
        return self.decoding.get("max_new_tokens", self.model.generation_config.max_new_tokens or 256)

    def fit(self, messages: list[dict]) -> list[int]:
        """Drops the oldest exchanges (never the system prompt or the new question) until it fits; a question
        that does not fit alone is an error (cut, it lost its start and the chat template's header), and the
        conversation is left as it was."""
        answer = self.answer_tokens()
        budget = room_for_prompt(self.max_context, answer)
        kept, first = list(messages), 1 if messages[0]["role"] == "system" else 0

        def too_long(tokens: str) -> UserError:
            return UserError(f"the question is {tokens} tokens (with the chat template{' and the system prompt' if first else ''}); "
                             f"at most {budget:,} fit beside an answer of up to {answer:,} tokens in a context of "
                             f"{self.max_context:,} (--max-context, --max-new-tokens)")

        question = kept[-1]["content"]
        if isinstance(question, str) and len(question) > (budget + 2) * 8:  # tokenized whole, 40 MB took 33 s and 5.7 GB
            count, exact = prompt_tokens(self.tokenizer, question, budget)
            if count > budget:
                raise too_long(f"{'' if exact else 'at least '}{count:,}")
        while True:
            ids = finetune.render(self.tokenizer, kept, add_generation_prompt=True)["input_ids"]
            if len(ids) <= budget:
                messages[:] = kept
                return ids
            if len(kept) - first <= 1:
                raise too_long(f"{len(ids):,}")
            del kept[first : first + 2]

    def reply(self, messages: list[dict], write) -> str:
        """Streams the answer through `write` as it is generated. Generation runs in this thread: in a
        thread of its own, beside the one that writes, it answered about a third slower on 2 cores.
        Ctrl-C stops the answer at the token being computed, not the program."""
        from transformers import TextStreamer

        prompt = self.fit(messages)
        ids = self.torch.tensor([prompt], device=self.model.device)
        pieces, self.stopped = [], False

        class Writer(TextStreamer):
            def on_finalized_text(self, text, stream_end=False):
                if text:
                    pieces.append(text)
                    write(text)

        ends = finetune.end_of_turn_ids(self.tokenizer)
        kwargs = {"eos_token_id": ends, "pad_token_id": self.tokenizer.pad_token_id, **self.decoding, "max_new_tokens": self.answer_tokens()}
        keeping = "cache_implementation" not in self.decoding  # a static cache is made for the whole context
        if keeping:
            kwargs.update(cache=finetune.Kept.batch([prompt], [self.kept]), return_dict_in_generate=True)
            self.kept = None  # spent on this turn's cache; an answer stopped by Ctrl-C leaves none, and the next turn reads it all
        try:
            with self.torch.no_grad(), finetune.autocast(self.settings["device"], self.settings["precision"]):
                out = self.model.generate(input_ids=ids, attention_mask=self.torch.ones_like(ids),
                                          streamer=Writer(self.tokenizer, skip_prompt=True, skip_special_tokens=True), **kwargs)
            if keeping:
                [self.kept] = finetune.Kept.of_batch(out, [len(prompt)], len(prompt), ends)
        except KeyboardInterrupt:
            self.stopped = True
            write(" [stopped]")
        return "".join(pieces).strip()


def room_for_prompt(max_context: int, max_new_tokens: int) -> int:
    """The tokens a conversation may take: the context less the answer's room."""
    if max_context - max_new_tokens < 1:
        raise UserError(f"--max-context {max_context} leaves no room for the conversation beside an answer of up to "
                        f"{max_new_tokens} tokens; give a larger --max-context, or a smaller --max-new-tokens")
    return max_context - max_new_tokens


def chat_model(name: str) -> str:
    """What the chat loads: for an adapter folder its merge, MODEL/merged (written at the first chat,
    as --serve does, and reused while the adapter is unchanged: loading it skips peft and the merge,
    about 2 s of every --prompt); where that folder cannot be written, the adapter, merged in memory."""
    folder = Path(name)
    if folder.is_dir() and (folder / "adapter_config.json").is_file():
        try:
            return str(merged_model(folder))
        except UserError as exc:
            log(f"{exc}; merging in memory instead")
    return name


def decoding_overrides(flags: dict) -> dict:
    """generate() options for the decoding flags a user gave; the rest come from the model folder."""
    options = {key: flags[key] for key in ("temperature", "top_p", "repetition_penalty", "max_new_tokens") if flags.get(key) is not None}
    if flags.get("greedy") is not None:
        options["do_sample"] = not flags["greedy"]
    elif "temperature" in options or "top_p" in options:
        options["do_sample"] = True
    return options


# --------------------------------------------------------------------------------------------
# An OpenAI fine-tuned model: the id comes from the job record the OpenAI provider wrote.
# --------------------------------------------------------------------------------------------
class OpenAIChat:
    def __init__(self, settings: dict, model: str | None, api_key: str | None):
        self.settings = settings
        self.tuner = finetune.OpenAIFineTuner(api_key, settings.get("base_url"))
        self.model = model or self.model_from_record(settings["output_dir"])

    @staticmethod
    def model_from_record(output_dir: str) -> str:
        path = Path(output_dir) / finetune.OPENAI_JOB_RECORD
        record = finetune.read_job_record(output_dir)
        if not record:
            raise UserError(f"no {path}; start a job with finetune.py --provider openai, or pass --model ft:...")
        if not record.get("fine_tuned_model"):
            raise UserError(f"the job in {path} has no fine-tuned model yet; follow it with "
                            f"finetune.py --provider openai --follow {record.get('job_id')}")
        return record["fine_tuned_model"]

    def reply(self, messages: list[dict], write) -> str:
        import openai

        s = self.settings
        try:
            text = self.tuner.chat(self.model, messages, max_completion_tokens=s["max_new_tokens"], top_p=s["top_p"], seed=s["seed"],
                                   temperature=0 if s["greedy"] else s["temperature"])
        except openai.APIError as exc:
            client = self.tuner.client
            message = finetune.describe_api_error(exc, client.base_url, client.max_retries)
            raise UserError(finetune.redact(message, client.api_key), exit_code=1) from None
        write(text)
        return text.strip()


# --------------------------------------------------------------------------------------------
# A model behind an OpenAI-compatible server (--serve starts one): the openai client, streamed.
# --------------------------------------------------------------------------------------------
class ServerChat:
    """Chats through a server such as the one --serve starts. The decoding is the served folder's
    generation_config.json with the flags given on top, sent as transformers serve's `generation_config`
    field (without it the server would raise max_new_tokens to 1024). The history is trimmed like the
    local chat's, oldest exchange first, by an estimate calibrated on the token counts the server reports."""

    DEFAULT_CONTEXT = 2048

    def __init__(self, base_url: str, model: str | None, max_context: int | None, decoding: dict | None = None,
                 seed: int | None = None):
        import openai

        self.base_url = base_url.rstrip("/")
        self.shown_url = finetune.without_password(self.base_url)  # what messages name: a password in the URL is no one's business
        self.stopped = False
        # The --serve server checks no key: a placeholder keeps the client happy. OPENAI_API_KEY is never
        # sent: it would go to whatever listens at the URL.
        self.client = openai.OpenAI(base_url=self.base_url, api_key="not-needed", max_retries=1, timeout=600)
        self.decoding = decoding_overrides(decoding or {})
        self.seed = seed
        self.max_context = max_context or self.DEFAULT_CONTEXT
        self.tokens_per_char = 0.5  # cautious until the server has counted a prompt
        self.model = model or self.served_model()
        self.finish_reason = self.usage = None

    def call(self, request):
        import openai

        try:
            return request()
        except openai.APIConnectionError:
            raise UserError(f"cannot reach a server at {self.shown_url}: is it running? "
                            f"Start one with: python example_usage.py --serve", exit_code=1) from None
        except openai.APIStatusError as exc:
            detail = finetune.first_line(Exception(api_detail(exc)))
            raise UserError(f"the server at {self.shown_url} answered {exc.status_code}: {detail}", exit_code=1) from None
        except openai.APIError as exc:
            raise UserError(f"the server at {self.shown_url} failed: {finetune.first_line(exc)}", exit_code=1) from None

    def served_model(self) -> str:
        models = self.call(lambda: list(self.client.models.list()))
        if not models:
            raise UserError(f"the server at {self.shown_url} lists no model; pass --model NAME", exit_code=1)
        return models[0].id

    # Byte-level BPE makes at most one token of a byte. Other scripts than ASCII's come near it (SmolLM2 makes
    # about 3 tokens of an emoji's 4 bytes, 1.6 of a Chinese character's 3), so their bytes count at this rate,
    # and only ASCII text at the rate the server's counts show (0.22 tokens a character for English).
    TOKENS_PER_OTHER_BYTE = 0.8

    @staticmethod
    def other_bytes(text: str) -> int:
        return len(text.encode("utf-8", "replace")) - len(text.encode("ascii", "ignore"))

    def estimate(self, messages: list[dict]) -> int:
        return sum(int(len(m["content"].encode("ascii", "ignore")) * self.tokens_per_char
                       + self.other_bytes(m["content"]) * self.TOKENS_PER_OTHER_BYTE) + 8 for m in messages)

    def calibrate(self, chat: list[dict], prompt_tokens: int) -> None:
        """tokens_per_char (for ASCII text) from the prompt tokens the server counted for `chat`."""
        ascii_chars = sum(len(m["content"].encode("ascii", "ignore")) for m in chat)
        other = sum(self.other_bytes(m["content"]) for m in chat) * self.TOKENS_PER_OTHER_BYTE
        if ascii_chars:
            self.tokens_per_char = min(1.0, max(0.1, (prompt_tokens - 8 * len(chat) - other) / ascii_chars))

    def fit(self, messages: list[dict]) -> list[dict]:
        """The conversation less its oldest exchanges (never the system prompt or the new question), until it fits."""
        budget = room_for_prompt(self.max_context, self.decoding.get("max_new_tokens", 256))
        kept = list(messages)
        first = 1 if kept[0]["role"] == "system" else 0
        while self.estimate(kept) > budget and len(kept) - first > 1:
            del kept[first : first + 2]
        return kept

    def reply(self, messages: list[dict], write) -> str:
        """The answer; the conversation loses the exchanges that did not fit only once the server has answered (a
        question it refuses leaves the conversation as it was)."""
        kept = self.fit(messages)
        extra = {"generation_config": json.dumps(self.decoding)}
        if self.seed is not None:
            extra["seed"] = self.seed
        chat = [{"role": m["role"], "content": m["content"]} for m in kept]
        stream = self.call(lambda: self.client.chat.completions.create(model=self.model, messages=chat, stream=True,
                                                                       extra_body=extra))
        pieces, self.stopped = [], False
        try:
            self.call(lambda: self._read(stream, pieces, write))
        except KeyboardInterrupt:
            stream.close()  # the server notices the closed connection and stops generating
            self.stopped = True
            write(" [stopped]")
        if self.usage and self.usage.prompt_tokens:
            self.calibrate(chat, self.usage.prompt_tokens)
        messages[:] = kept
        return "".join(pieces).strip()

    def _read(self, stream, pieces: list[str], write) -> None:
        self.finish_reason = self.usage = None
        for chunk in stream:
            if chunk.usage:
                self.usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    pieces.append(choice.delta.content)
                    write(choice.delta.content)
                if choice.finish_reason:
                    self.finish_reason = choice.finish_reason


def api_detail(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        detail = body.get("detail", body.get("error", body.get("message")))
        if detail:
            return detail if isinstance(detail, str) else json.dumps(detail)
    return str(getattr(exc, "message", exc))


# --------------------------------------------------------------------------------------------
# --serve: the model, merged when it is an adapter, served by transformers serve.
# --------------------------------------------------------------------------------------------
MERGED = "merged"
MERGED_STAMP = "merged_from.json"  # in MODEL/merged when --serve wrote it: what it was merged from


def adapter_state(folder: Path) -> dict:
    """What a merge is made of: the adapter folder's files (sizes and times), its base model's name.
    evaluation.json is left out: --evaluate rewrites it without changing the model."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name != "evaluation.json":
            stat = path.stat()
            files[path.name] = [stat.st_size, stat.st_mtime_ns]
    return {"base_model": finetune.read_summary(folder).get("base_model"), "files": files}


def merged_is_current(target: Path, state: dict) -> bool:
    """A merge --serve wrote for these very files, or one that training wrote (--merge): the training
    writes its merge beside its adapter and replaces the whole folder, so that one cannot be stale."""
    if not (target / "config.json").is_file():
        return False
    try:
        return json.loads((target / MERGED_STAMP).read_text(encoding="utf-8")) == state
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False


def merged_model(folder: Path) -> Path:
    """MODEL/merged: the adapter merged into its base (peft merge_and_unload), with the tokenizer (the
    chat template training used) and generation_config.json. Written once, atomically, reused while the
    adapter is unchanged; a lock keeps two --serve runs from merging at once."""
    import fcntl

    target = folder / MERGED
    state = adapter_state(folder)
    if merged_is_current(target, state):
        log(f"using the merged model in {target}")
        return target
    try:
        with open(folder / ".merged.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if merged_is_current(target, state):
                return target
            started = time.time()
            log(f"merging the adapter into its base model's weights, written to {target} (once; reused until the adapter changes)")
            model, tokenizer, _ = finetune.load_for_inference(str(folder))
            merged = finetune.merged(model)
            finetune.load_generation_config(merged, folder)
            with finetune.staged(target) as partial:
                merged.save_pretrained(partial)
                tokenizer.save_pretrained(partial)
                (partial / MERGED_STAMP).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
                finetune.mark(partial)
            log(f"merged in {time.time() - started:.1f} s")
    except finetune.UserError:  # a full disk: already one line
        raise
    except OSError as exc:
        raise UserError(f"cannot write the merged model into {target}: {exc.strerror or exc}") from None
    return target


def model_to_serve(name: str) -> str:
    """A folder transformers serve loads as it is: an adapter's merge, a merged or full model, or a base."""
    folder = Path(name)
    if folder.is_dir():
        if (folder / "adapter_config.json").is_file():
            return str(merged_model(folder).resolve())
        if (folder / "config.json").is_file():
            return str(folder.resolve())
        if (folder / MERGED / "config.json").is_file():
            return str((folder / MERGED).resolve())
        raise UserError(f"{folder} holds no model (no adapter_config.json or config.json); train one first")
    return finetune.resolve_base(name)  # the alias, a .gguf file, a hub id; a missing folder is an error here


def check_port(host: str, port: int) -> None:
    """A port another program holds is one line, not uvicorn's log and exit (the model loads first)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"cannot listen on {host}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use (another server?); pick another with --port") from None
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


ROLES = ("system", "developer", "user", "assistant", "tool")  # the roles of OpenAI's chat API
MAX_STOPS, STOP_CHARS = 4, 32  # OpenAI takes up to 4 stop sequences. transformers' stop-string matcher holds
# about 0.75 MB per character of the longest, for each distinct set (it caches 8): one stop string of 100,000
# characters took 23 GB, and the server with it; 32 characters cost about 35 MB.
INT64 = 2**63  # a seed is a signed 64-bit integer (OpenAI's range, and torch.manual_seed's)


def request_problem(body: dict) -> str | None:
    """What is wrong with a chat completion request, for the 4xx answers transformers serve 5.24 does not
    give: a missing or malformed `messages`, or a parameter of the wrong type, is a 500 there; `n`,
    `logprobs` and `response_format` it would ignore, answering something other than what was asked."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "the request holds text that is not valid Unicode (a lone surrogate such as \\ud800)"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list of {role, content} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages[{i}] must be an object with a `role` of {', '.join(ROLES)}"
        content = message.get("content")
        parts_ok = isinstance(content, list) and all(isinstance(part, dict) and isinstance(part.get("type"), str)
                                                     and (part["type"] != "text" or isinstance(part.get("text"), str)) for part in content)
        if not (isinstance(content, str) or parts_ok or (content is None and message.get("tool_calls"))):
            return f"messages[{i}].content must be a string or a list of content parts"
    number = lambda **bounds: finetune.number(**bounds)[1]  # noqa: E731  config.json's rules, this server's words
    whole = lambda least, most=None: finetune.whole(least, most)[1]  # noqa: E731
    checks = {"model": (lambda v: isinstance(v, str), "a string"), "stream": (lambda v: isinstance(v, bool), "true or false"),
              "temperature": (number(least=0, most=2), "a number from 0 to 2"), "top_p": (number(above=0, most=1), "a number in (0, 1]"),
              "max_tokens": (whole(1), "an integer >= 1"), "max_completion_tokens": (whole(1), "an integer >= 1"),
              "frequency_penalty": (number(above=-1, most=2),
                                    "a number above -1 and at most 2 (it becomes a repetition penalty of 1 + frequency_penalty)"),
              "presence_penalty": (number(least=0, most=0), "0: this server does not apply it (frequency_penalty it does)"),
              "seed": (whole(-INT64, INT64 - 1), "a 64-bit integer"),
              "stop": (lambda v: stop_list(v) is not None and len(stop_list(v)) <= MAX_STOPS
                       and all(isinstance(x, str) and 0 < len(x) <= STOP_CHARS for x in stop_list(v)),
                       f"a string or a list of at most {MAX_STOPS} strings, each of 1 to {STOP_CHARS} characters"),
              "n": (whole(1, 1), "1: this server gives one choice per request"),
              "logprobs": (lambda v: v is False, "false: this server does not return log probabilities"),
              "top_logprobs": (whole(0, 0), "0: this server does not return log probabilities"),
              "response_format": (lambda v: isinstance(v, dict) and v.get("type") == "text",
                                  '{"type": "text"}: this server does not hold answers to a JSON format'),
              "logit_bias": (lambda v: isinstance(v, dict) and all(re.fullmatch(r"[0-9]{1,9}", key) and number(least=-100, most=100)(bias)
                                                                   for key, bias in v.items()),
                             "an object of token ids (as strings) to numbers from -100 to 100"),
              "chat_template_kwargs": (lambda v: isinstance(v, dict) and not set(v) & tokenizer_options(),
                                       "an object of the chat template's own variables; the tokenizer's options "
                                       "(padding, max_length, return_tensors...) are this server's to set")}
    for key, (ok, what) in checks.items():
        if body.get(key) is not None and not ok(body[key]):
            return f"`{key}` must be {what}"
    if body.get("generation_config") is not None:
        try:
            from transformers import GenerationConfig

            options = json.loads(body["generation_config"])
            GenerationConfig(**options).validate()
        except Exception as exc:  # not a string, not JSON, not an object, options generate() refuses
            return f"`generation_config` must be a JSON object of generation options: {finetune.first_line(exc)}"
        if other := sorted(set(options) - GENERATION_OPTIONS):  # a static cache of any length, beams, every step's logits kept...
            return (f"`generation_config` may set how tokens are chosen ({', '.join(sorted(GENERATION_OPTIONS))}); "
                    f"{', '.join(other)} this server sets itself")
        if options.get("max_new_tokens") is not None and not whole(1)(options["max_new_tokens"]):
            return "`generation_config`'s max_new_tokens must be an integer >= 1"
        ends = options.get("eos_token_id")
        if ends is not None and not all(type(end) is int and -1 <= end < 2**31 for end in (ends if isinstance(ends, list) else [ends])):
            return "`generation_config`'s eos_token_id must be a token id, a list of them, or -1 (none)"
        if options.get("stop_strings") is not None and not checks["stop"][0](options["stop_strings"]):
            return f"`generation_config`'s stop_strings must be {checks['stop'][1]}"
    return None


# What a request's `generation_config` may set: how tokens are chosen and how many (the end tokens too: -1, none, answers
# at exactly the length asked, as bench/serve_latency.py asks). The rest (the cache, beams, returned sequences, scores
# kept at every step) decides what a request holds in memory or what the server returns: a static cache of 40,000
# tokens took 1.8 GB for a 4-token answer.
GENERATION_OPTIONS = frozenset({"do_sample", "temperature", "top_p", "top_k", "min_p", "top_h", "typical_p", "epsilon_cutoff",
                                "eta_cutoff", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "sequence_bias",
                                "suppress_tokens", "begin_suppress_tokens", "renormalize_logits", "max_new_tokens", "min_new_tokens",
                                "stop_strings", "eos_token_id"})
GREEDY_BELOW = 1e-2  # a temperature this low is the most likely token (and near 0, logits / t overflow): decoded greedily


@functools.cache
def tokenizer_options() -> frozenset:
    """The names apply_chat_template and the tokenizer take as their own options: given in chat_template_kwargs, they
    changed the tokens the server counted (padding to 16,500 tokens passed a 15-token check and killed continuous
    batching for every later request). What is left is the template's own variables."""
    import inspect

    from transformers import PreTrainedTokenizerBase

    names = {parameter.name for method in (PreTrainedTokenizerBase.apply_chat_template, PreTrainedTokenizerBase.__call__)
             for parameter in inspect.signature(method).parameters.values() if parameter.kind is parameter.POSITIONAL_OR_KEYWORD}
    return frozenset(names - {"self"})


def openai_meaning(build):
    """transformers serve's generation config builder, with OpenAI's meaning of three parameters:
    - `temperature` above 0 or `top_p` below 1 samples. transformers serve set them on the folder's config and
      left its greedy decoding on, so an OpenAI client could never sample. A `do_sample` in the request's
      `generation_config` wins.
    - `logit_bias` takes integers (OpenAI's type): transformers serve passed them on as they are, and generate()
      failed on anything but floats (a 500).
    - `temperature` 0 (or below GREEDY_BELOW) is greedy, whatever `top_p` says, as OpenAI reads it: generate() refused
      a temperature of 0 with sampling on (a 422), and 1e-300 overflowed (a 500)."""
    def built(body: dict, shipped, use_cb: bool = False):
        greedy = body.get("temperature") is not None and body["temperature"] < GREEDY_BELOW
        config = build(dict(body, temperature=None) if greedy else body, shipped, use_cb=use_cb)
        asked = (body.get("temperature") or 0) > 0 or (body.get("top_p") is not None and body["top_p"] < 1)
        given = body.get("generation_config") is not None and "do_sample" in json.loads(body["generation_config"])
        if greedy and not given:
            config.do_sample = False
        elif asked and not given:
            config.do_sample = True
        if body.get("logit_bias"):
            config.sequence_bias = {(int(token),): float(bias) for token, bias in body["logit_bias"].items()}
        return config
    return built


# --------------------------------------------------------------------------------------------
# --serve's guard: what a server facing any client needs and transformers serve 5.24 does not do.
# A request is checked before any work, stops when its client leaves, its time is up or the server
# stops, and waits in a bounded queue; requests that decode alike are generated together.
# --------------------------------------------------------------------------------------------
SERVE_TIMEOUT = 300  # seconds a request may take, waiting included (--request-timeout)
SERVE_MAX_REQUESTS = 64  # requests in the server at once, waiting or answered (--max-requests); more get a 503
MAX_BODY_BYTES = 1_000_000  # a larger body is a 413: the model's whole context is ~40 KB of text
DRAIN_BYTES = 32_000_000  # a body too large is still read up to this, so that its client reads the 413, not a reset
BODY_SECONDS = 10  # a body that has not arrived by then is a 408: a slow sender holds a connection, never a worker
HEADER_SECONDS = 10  # a connection whose request headers have not all come by then is closed (idle, or half a request)
SERVED_POSTS = ("/v1/chat/completions",)  # transformers serve's other POSTs bypass the checks (/v1/completions),
# or change what the server holds (/load_model loads any model into memory, /reset unloads the served one)
CB_PAGE_TOKENS = 256  # continuous batching's page size (transformers' default)
CB_STEP_TOKENS = 512  # tokens in one batched step: a long prompt is read in such slices between the others' tokens
CURRENT = contextvars.ContextVar("echo_serve_call")  # the Call a request's task works for
NOT_BATCHED = {"max_new_tokens", "max_length", "eos_token_id", "use_cache", "transformers_version", "_from_model_config",
               "cache_implementation"}  # what continuous batching takes per request, or what does not decide a token
SAMPLING = {"temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"}


def prompt_tokens(tokenizer, text: str, limit: int) -> tuple[int, bool]:
    """(tokens, exact): tokenizing a 1 MB prompt takes seconds on two busy cores, and a prefix of
    (limit + 2) * 8 characters with more than limit + 1 tokens already says the whole is over `limit`."""
    head = text[: (limit + 2) * 8]
    count = len(tokenizer.encode(head, add_special_tokens=False))
    if len(head) == len(text):
        return count, True
    if count > limit + 1:
        return count, False
    return len(tokenizer.encode(text, add_special_tokens=False)), True


def asked_new_tokens(body: dict) -> int | None:
    """The answer length a request sets, in any of the three places transformers serve reads it."""
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            return body[key]
    return json.loads(body["generation_config"]).get("max_new_tokens") if body.get("generation_config") else None


def decoding(config, shipped) -> dict:
    """What decides the tokens of an answer, as generate() reads a request's config (unset values from the
    folder's), less what continuous batching takes per request (the length and the end tokens)."""
    import copy

    merged = copy.deepcopy(config)
    merged.update(**shipped.to_dict(), defaults_only=True)
    merged.update(**merged._get_default_generation_params(), defaults_only=True)
    options = {key: value for key, value in merged.to_dict().items() if key not in NOT_BATCHED}
    return options if options.get("do_sample") else {key: value for key, value in options.items() if key not in SAMPLING}


class Limits:
    """What a chat request may ask of the served model, checked before any work."""

    def __init__(self, model_id: str, model, tokenizer, handler, build, batching: bool):
        self.model_id, self.model, self.tokenizer, self.handler, self.build = model_id, model, tokenizer, handler, build
        self.context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.shipped = model.generation_config
        self.batched_config = build({}, self.shipped, use_cb=True) if batching else None  # what batching decodes with
        self.batched = decoding(self.batched_config, self.shipped) if batching else None

    def check(self, body: dict, call) -> None:
        """A 400 for another model, or for a prompt and answer that cannot fit the context; sets the room left."""
        from fastapi import HTTPException

        if body.get("model") is not None and body["model"] != self.model_id:
            raise HTTPException(400, f"this server serves {self.model_id!r} only; the request asked for {body['model']!r}")
        new = asked_new_tokens(body)
        if new is not None and new >= self.context:
            raise HTTPException(400, f"max_tokens {new:,} is past the model's context of {self.context:,} tokens")
        limit = self.context - (new or 1)
        count, exact = prompt_tokens(self.tokenizer, self.render(body), limit)
        if count > limit:
            size = f"{count:,} tokens" if exact else f"at least {count:,} tokens"
            beside = f"beside max_tokens {new:,}" if new else "with one left for the answer"
            raise HTTPException(400, f"the prompt is {size}; at most {limit:,} fit {beside} in the model's context of {self.context:,} tokens")
        call.room = self.context - count
        problem = self.decoding_problem(body)
        if problem:
            raise HTTPException(422, f"the request's decoding options cannot be used: {problem}")
        call.batchable = self.batchable(body)

    def decoding_problem(self, body: dict) -> str | None:
        """What generate() would fail on, found before any work: the request's generation config is checked
        and its logits processors (penalties, biases, bad words, top-k...) run on one made-up step. transformers
        serve alone answered a `generation_config` with top_k -3 or a bad word past the vocabulary with a 500."""
        import torch
        from transformers import LogitsProcessorList

        vocabulary = self.model.config.vocab_size
        if any(int(token) >= vocabulary for token in (body.get("logit_bias") or {})):
            return f"`logit_bias` names a token past the vocabulary of {vocabulary:,}"
        try:
            config = self.build(dict(body, seed=None), self.shipped)
            config.validate()
            self.model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=self.model.device)
            ids = torch.zeros((1, 1), dtype=torch.long, device=self.model.device)
            processors = self.model._get_logits_processor(generation_config=config, input_ids_seq_length=1, encoder_input_ids=ids,
                                                          logits_processor=LogitsProcessorList(), device=self.model.device, model_kwargs={})
            processors(ids, torch.zeros((1, vocabulary), device=self.model.device))
        except Exception as exc:  # ValueError, IndexError, TypeError: whatever a bad option raises
            return finetune.first_line(exc)
        return None

    def render(self, body: dict) -> str:
        """The prompt as the chat handler renders it (its messages, tools and template options)."""
        from fastapi import HTTPException
        from transformers.cli.serving.utils import Modality

        try:
            messages = self.handler.get_processor_inputs_from_messages(body["messages"], Modality.LLM)
            options = {**self.handler.chat_template_kwargs, **(body.get("chat_template_kwargs") or {})}
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=body.get("tools"), tokenize=False,
                                                      **options)
        except Exception as exc:  # a role or part the template refuses, tool calls it cannot read
            raise HTTPException(422, f"the messages do not fit the model's chat template: {finetune.first_line(exc)}") from None

    def batchable(self, body: dict) -> bool:
        """Continuous batching in transformers 5.24 decodes every request with the configuration it started with
        (only the length and the end tokens are per request): a request that asks for other decoding is
        generated on its own, by generate(), so that it gets what it asked for."""
        if self.batched is None:
            return False
        config = self.build(dict(body, seed=None), self.shipped, use_cb=True)
        return decoding(config, self.shipped) == self.batched and not (body.get("seed") is not None and config.do_sample)


class Call:
    """One request in the server: the id transformers serve and continuous batching know it by, its
    deadline, and whether it must stop (read between tokens by the thread that generates)."""

    def __init__(self, timeout: float):
        self.id = uuid.uuid4().hex
        self.deadline = time.monotonic() + timeout
        self.stopped = False
        self.reason: str | None = None
        self.why: str | None = None  # what its client is told when the guard stops it
        self.ended = asyncio.Event()
        self.reading = None  # the body's timeout while it arrives
        self.room = None  # tokens the answer may take: the context less the prompt
        self.batchable = self.batched = False
        self.config = None  # id() of its generation config, by which generate() finds it
        self.started = self.streaming = self.finished = self.answered = False

    def end(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.ended.set()
        if self.reading is not None:
            self.reading.reschedule(asyncio.get_running_loop().time())


def openai_error(status: int, message: str) -> dict:
    """An error as OpenAI's API answers one (its ErrorResponse), which OpenAI-compatible clients read."""
    return {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                      "param": None, "code": None}}


def error_message(body: bytes) -> str:
    """The message of an error body in any of the shapes the server's parts write: FastAPI's {"detail": ...}
    (a text, or its validation errors' list), transformers serve's {"error": "..."}, OpenAI's own."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()
    said = parsed.get("error", parsed.get("detail", parsed.get("message"))) if isinstance(parsed, dict) else parsed
    if isinstance(said, dict) and isinstance(said.get("message"), str):
        return said["message"]
    if isinstance(said, list) and all(isinstance(item, dict) for item in said):  # FastAPI's validation errors
        return "; ".join(f"{'.'.join(map(str, item.get('loc', ())))}: {item.get('msg', '')}".lstrip(": ") for item in said)
    return said if isinstance(said, str) else json.dumps(said)


async def send_rewritten(send, start: dict, body: bytes, json_body: bool = False) -> None:
    """A response held back and rewritten: its start with the new body's length (and type), then the body."""
    replaced = (b"content-length", b"content-type") if json_body else (b"content-length",)
    headers = [(key, value) for key, value in start.get("headers", []) if key not in replaced]
    headers += [(b"content-type", b"application/json")] if json_body else []
    await send(dict(start, headers=[*headers, (b"content-length", str(len(body)).encode())]))
    await send({"type": "http.response.body", "body": body})


def openai_errors(send):
    """`send` with every JSON or plain-text error answer (a status of 400 or more) rewritten in OpenAI's shape,
    whichever part of the server wrote it (Starlette answers an exception with a plain "Internal Server Error"),
    so that a client sees one shape: clients read error.message."""
    held: dict = {}

    async def sending(message):
        if message["type"] == "http.response.start" and message["status"] >= 400 and \
                dict(message.get("headers", [])).get(b"content-type", b"").startswith((b"application/json", b"text/plain")):
            held.update(start=message, body=[])
            return
        if not held or message["type"] != "http.response.body":
            return await send(message)
        held["body"].append(message.get("body", b""))
        if message.get("more_body"):
            return
        start = held.pop("start")
        body = json.dumps(openai_error(start["status"], error_message(b"".join(held.pop("body"))))).encode()
        await send_rewritten(send, start, body, json_body=True)

    return sending


class StopCut:
    """OpenAI's `stop`: an answer ends before the first stop string, which is left out; transformers keeps it in the
    answer. Text is fed as it comes; what could still be the start of a stop string is held back until it is not."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.cut = stops, "", False

    def feed(self, text: str) -> str:
        if self.cut:
            return ""
        self.held += text
        found = [at for stop in self.stops if (at := self.held.find(stop)) >= 0]
        if found:
            self.cut, out, self.held = True, self.held[: min(found)], ""
            return out
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if self.held.endswith(stop[:n])), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out

    def end(self) -> str:
        """What was held back, once the answer has ended without a stop string."""
        out, self.held = "" if self.cut else self.held, ""
        return out


def stop_list(stop) -> list | None:
    """OpenAI's `stop` as a list: one string or a list of them (None for anything else)."""
    return [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else None


def request_stops(body: bytes) -> list[str]:
    """The `stop` strings of a request's body (not yet checked: anything else is none)."""
    try:
        stops = stop_list(json.loads(body).get("stop")) or []
    except (ValueError, AttributeError):
        return []
    return [item for item in stops if isinstance(item, str) and item]


def answered_as_openai(send, stops: list[str]):
    """`send` with a successful answer as OpenAI gives it: the stop strings left out, plain (held until whole) or
    streamed (each event's text through one StopCut; the event that ends the answer carries what was held back),
    and a stream's error event in OpenAI's shape (transformers serve sends {"error": "..."}, of which the openai
    client reads only "An error occurred during streaming")."""
    state: dict = {"start": None, "body": [], "stream": False, "rest": b""}
    cut = StopCut(stops)

    def event(raw: bytes) -> bytes:
        if not raw.startswith(b"data: "):
            return raw
        try:
            chunk = json.loads(raw[6:])
            if isinstance(chunk.get("error"), str):
                return b"data: " + json.dumps(openai_error(500, chunk["error"])).encode()
            if not stops:
                return raw
            for choice in chunk["choices"]:
                delta = choice.setdefault("delta", {})
                if isinstance(delta.get("content"), str):
                    delta["content"] = cut.feed(delta["content"])
                if choice.get("finish_reason") and (held := cut.end()):
                    delta["content"] = delta.get("content", "") + held
        except (ValueError, KeyError, TypeError, AttributeError):  # an error event, or not a chunk: as it is
            return raw
        return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode()

    async def sending(message):
        if message["type"] == "http.response.start":
            kind = dict(message.get("headers", [])).get(b"content-type", b"")
            if message["status"] == 200 and kind.startswith(b"application/json") and stops:
                state["start"] = message  # its content-length changes: sent with the body
                return
            state["stream"] = message["status"] == 200 and kind.startswith(b"text/event-stream")
            return await send(message)
        if message["type"] != "http.response.body":
            return await send(message)
        if state["start"] is not None:
            state["body"].append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(state["body"])
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                answer = json.loads(body)
                for choice in answer["choices"]:
                    one = StopCut(stops)
                    choice["message"]["content"] = one.feed(choice["message"]["content"] or "") + one.end()
                body = json.dumps(answer, ensure_ascii=False).encode()
            start, state["start"] = state["start"], None
            return await send_rewritten(send, start, body)
        if state["stream"]:
            *events, state["rest"] = (state["rest"] + message.get("body", b"")).split(b"\n\n")
            body = b"".join(event(raw) + b"\n\n" for raw in events) + (b"" if message.get("more_body") else state["rest"])
            return await send(dict(message, body=body))
        return await send(message)

    return sending


async def reply(send, status: int, message: str = "", body: dict | None = None) -> None:
    """An error in OpenAI's words ({"error": {"message": ...}}), or `body`; the connection closes after it."""
    body = json.dumps(body or openai_error(status, message)).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """An ASGI middleware in front of transformers serve's app. A POST is refused at once when the server is
    full (503), its body is too large (413) or too slow (408); otherwise it runs in the app while the guard
    watches for its client leaving, its deadline and the server stopping, and stops its generation then."""

    def __init__(self, app, timeout: float, max_requests: int, verbose: bool = False):
        self.app, self.timeout, self.max_requests, self.verbose = app, timeout, max_requests, verbose
        self.calls: dict[str, Call] = {}
        self.by_config: dict[int, Call] = {}  # generation config id -> its Call, for generate() in its own thread
        self.closing = False
        self.cancel_batched = lambda request_id: None  # continuous batching's cancel_request, once it runs
        self.batching_error = lambda: None  # what stopped continuous batching's worker, once it runs (None: it runs)
        self.batching_said = False

    async def __call__(self, scope, receive, send):
        send = openai_errors(send) if scope["type"] == "http" else send
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/health":
            health = {"status": "stopping" if self.closing else "ok", "requests": len(self.calls), "max_requests": self.max_requests}
            if (error := self.batching_error()) is not None:  # it still answers, one request at a time
                health["degraded"] = f"continuous batching stopped ({finetune.first_line(error)}); requests are generated one at a time"
            return await reply(send, 200, body=health)
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if scope["path"] not in SERVED_POSTS:
            return await reply(send, 404, f"--serve answers POST {', '.join(SERVED_POSTS)} (and GET /v1/models, /health)")
        if self.closing:
            return await reply(send, 503, "the server is stopping")
        if len(self.calls) >= self.max_requests:
            return await reply(send, 503, f"the server is full: {len(self.calls)} requests in progress, its limit "
                                          "(--max-requests); try again shortly")
        call = Call(self.timeout)
        self.calls[call.id] = call
        try:
            body = await self.read_body(call, scope, receive, send)
            if body is not None:
                await self.answer(call, scope, body, receive, send)
        finally:
            del self.calls[call.id]
            self.by_config.pop(call.config, None)

    def close(self) -> None:
        """The server stops: every request ends (runs in the event loop's thread)."""
        self.closing = True
        for call in list(self.calls.values()):
            call.end("stopping")

    async def read_body(self, call: Call, scope, receive, send) -> bytes | None:
        """The whole body, or None once its client has been answered (413, 408, 503) or has left."""
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > DRAIN_BYTES:
            return await reply(send, 413, f"the request body is {int(declared):,} bytes; the limit is {MAX_BODY_BYTES:,}")
        chunks, size, seconds = [], 0, min(BODY_SECONDS, self.timeout)
        try:
            async with asyncio.timeout(seconds) as call.reading:
                while size <= DRAIN_BYTES:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    size += len(message.get("body", b""))
                    if size <= MAX_BODY_BYTES:
                        chunks.append(message.get("body", b""))
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            if call.reason == "stopping":
                return await reply(send, 503, "the server is stopping")
            if size <= MAX_BODY_BYTES:
                return await reply(send, 408, f"the request body did not arrive within {seconds:g} s")
        finally:
            call.reading = None
        if size > MAX_BODY_BYTES:
            return await reply(send, 413, f"the request body is over {MAX_BODY_BYTES:,} bytes, the limit")
        return b"".join(chunks)

    async def answer(self, call: Call, scope, body: bytes, receive, send) -> None:
        """The app answers, with the body replayed to it; the guard stops the call if its client leaves, its
        time runs out or the server stops."""
        gone = asyncio.Event()  # what the app hears as its client leaving: a stream ends itself on it
        pending = [body]
        send = answered_as_openai(send, request_stops(body))

        async def replay():
            if pending:
                return {"type": "http.request", "body": pending.pop(), "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def forward(message):
            if call.answered:  # the guard has answered for it
                return
            if message["type"] == "http.response.start":
                call.started = True
                call.streaming = dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                call.finished = True
                if call.streaming and call.why:  # a stream the guard stopped: its last event says why
                    await send(stream_error(call))
            await send(message)

        headers = [(key, value) for key, value in scope["headers"] if key != b"x-request-id"] + [(b"x-request-id", call.id.encode())]
        token = CURRENT.set(call)  # the app's task starts with a copy of this context
        app = asyncio.ensure_future(self.app(dict(scope, headers=headers), replay, forward))
        CURRENT.reset(token)
        waits = [asyncio.ensure_future(receive()), asyncio.ensure_future(call.ended.wait())]  # the body is in: only a disconnect can come
        try:
            done, _ = await asyncio.wait([app, *waits], timeout=max(0.0, call.deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if app not in done:
                call.end("gone" if waits[0] in done else "timeout")
                await self.stop(call, app, gone, send)
        finally:
            for wait in waits:
                wait.cancel()
        if not app.cancelled() and app.exception() is not None and not call.answered:
            await self.failed(call, app.exception(), send)

    async def failed(self, call: Call, exc: BaseException, send) -> None:
        """A request the app failed on (a case the checks do not foresee): one line in the server's log (the
        traceback with --verbose), and its client a 500 in the guard's words, or the end of its stream."""
        log(f"error: a request failed: {type(exc).__name__}: {finetune.first_line(exc)}"
            + ("" if self.verbose else " (run with --verbose for the traceback)"))
        if self.verbose:
            import traceback

            traceback.print_exception(exc)
        call.answered = True
        if not call.started:
            return await reply(send, 500, f"the server failed on this request: {finetune.first_line(exc)}")
        if not call.finished:
            call.why, call.reason = f"the server failed on this request: {finetune.first_line(exc)}", "error"
            if call.streaming:
                await send(stream_error(call))
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def stop(self, call: Call, app, gone: asyncio.Event, send) -> None:
        """Stops a call's generation and ends its answer: nothing more for a client that left; a 504 or a 503
        when nothing was sent yet; a stream's last event says why it ends."""
        call.stopped = True  # generate() stops at its next token, or at once if it waits its turn
        if call.batched:
            self.cancel_batched(call.id)
            app.cancel()  # the handler waits for a result continuous batching will no longer give
        call.why = {"timeout": f"the answer took longer than the server's limit of {self.timeout:g} s (--request-timeout)",
                    "stopping": "the server is stopping"}.get(call.reason)
        if call.why and not call.started:
            call.answered = True
            await reply(send, 504 if call.reason == "timeout" else 503, call.why)
        gone.set()  # the app ends a stream when its client leaves, and ends it as complete
        await asyncio.wait([app])
        if call.streaming and not call.finished and not call.answered:  # the app was cancelled mid-stream
            call.answered = True
            if call.why:
                await send(stream_error(call))
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def headers_in_time():
    """uvicorn's HTTP protocol (h11), with a deadline for each request's headers: uvicorn has none, so a client
    that opens connections and sends nothing, or half a request line, held each one for ever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadersInTime(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.header_deadline = self.loop.call_later(HEADER_SECONDS, self.headers_late)

        def handle_events(self):
            super().handle_events()
            if self.conn.their_state is not h11.IDLE and self.header_deadline is not None:  # the headers are in
                self.header_deadline.cancel()
                self.header_deadline = None

        def on_response_complete(self):
            super().on_response_complete()  # a kept-alive connection: its next request has the same time
            if self.header_deadline is None and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.header_deadline = self.loop.call_later(HEADER_SECONDS, self.headers_late)

        def connection_lost(self, exc):
            if self.header_deadline is not None:
                self.header_deadline.cancel()
            super().connection_lost(exc)

        def headers_late(self):
            self.header_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeadersInTime


def more_files() -> None:
    """The soft limit of open files raised to the hard one: each connection is a file."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def stream_error(call: Call) -> dict:
    """An error event as transformers serve sends one (the openai client raises it as an APIError)."""
    event = json.dumps({"error": {"message": call.why, "type": call.reason}})
    return {"type": "http.response.body", "body": f"data: {event}\n\n".encode(), "more_body": True}


def hook_generation(serve, guard: Guard, limits: Limits, model) -> None:
    """Where transformers serve 5.24 has no hook, this server's own objects are patched: its chat handler
    checks a request before any work (request_problem and the limits), each request goes to continuous
    batching or to generate(), and generate() stops between tokens when its request has stopped (a stream
    cut by its client transformers serve stops itself; a plain request, a deadline or a shutdown it would not)."""
    import torch
    from fastapi import HTTPException
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.cli.serving.utils import _GenerationCancelled

    handler, state = serve._chat_handler, serve._generation_state
    validate, build, use_batching, generate = handler._validate_request, limits.build, state.use_continuous_batching, model.generate

    def checked(body: dict) -> None:
        validate(body)
        problem = request_problem(body)
        if problem:
            raise HTTPException(status_code=422, detail=problem)
        limits.check(body, CURRENT.get())

    def routed(model, modality) -> bool:
        """Continuous batching where the request decodes as the batch does and its worker runs; where the worker has
        died (transformers serve then answers every request 503), generate(), one request at a time."""
        call, error = CURRENT.get(), guard.batching_error()
        if error is not None and not guard.batching_said:
            guard.batching_said = True
            log(f"warning: continuous batching stopped ({finetune.first_line(error)}); requests are generated one at a time")
        call.batched = call.batchable and error is None and use_batching(model, modality)
        return call.batched

    def built(body: dict, shipped, use_cb: bool = False):
        config, call = build(body, shipped, use_cb=use_cb), CURRENT.get()
        config.max_new_tokens = min(config.max_new_tokens or shipped.max_new_tokens or call.room, call.room)
        if not use_cb:
            call.config = id(config)
            guard.by_config[call.config] = call
        return config

    class Stopped(StoppingCriteria):
        def __init__(self, call: Call):
            self.call = call

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), self.call.stopped, dtype=torch.bool, device=input_ids.device)

    def stoppable(*args, **kwargs):
        call = guard.by_config.pop(id(kwargs.get("generation_config")), None)
        if call is not None and call.stopped:  # stopped while it waited its turn
            if kwargs.get("streamer") is not None:
                raise _GenerationCancelled  # transformers serve's own way to end a stream's generation
            return kwargs["input_ids"]
        if call is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([Stopped(call)])
        return generate(*args, **kwargs)

    handler._validate_request, handler._build_generation_config = checked, built
    state.use_continuous_batching, model.generate = routed, stoppable


def start_batching(serve, model_id: str, model, limits: Limits, guard: Guard) -> None:
    """Continuous batching set up before the first request, with the folder's decoding: transformers serve
    would set it up at the first request, with that request's decoding for everyone's."""
    manager = serve._generation_state.get_manager(model_id, use_cb=True)
    manager.init_cb(model, limits.batched_config)
    guard.cancel_batched = manager._cb.cancel_request
    status = getattr(manager._cb, "background_thread_status", None)  # transformers 5.24's record of a dead worker
    guard.batching_error = lambda: getattr(status, "fatal_error", None)


def batching_blocks(context: int) -> int:
    """Continuous batching's KV cache, in blocks of CB_PAGE_TOKENS: room for two requests of the whole context,
    or for dozens of short ones (transformers' default takes 60% of a CPU's memory)."""
    return 2 * -(-context // CB_PAGE_TOKENS)


def url_host(host: str) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


SERVE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def serve_command(args, settings: dict) -> int:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port (0 to 65535)")
    if not (math.isfinite(args.request_timeout) and args.request_timeout > 0) or args.max_requests < 1:
        raise UserError("--request-timeout must be a number of seconds above 0 and --max-requests at least 1")
    name = finetune.model_to_load(settings, args.model)
    check_port(args.host, args.port)
    model = model_to_serve(name)
    try:
        from transformers import AutoConfig
        from transformers.cli.serve import Serve
        from transformers.utils.import_utils import is_serve_available
    except ImportError as exc:
        raise UserError(f"transformers serve is missing ({finetune.first_line(exc)})") from None
    if not is_serve_available():
        raise UserError('--serve needs FastAPI and uvicorn: pip install "transformers[serving]==5.24.0"')
    hardware = finetune.resolve_hardware(settings, training=False)
    # The weights in the precision the chat and the evaluation answer in: bf16 where it is native.
    dtype = SERVE_DTYPES[hardware["precision"]]
    batching = args.continuous_batching if args.continuous_batching is not None else hardware["device"] in ("cpu", "cuda")
    context = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None) or 2048

    class Unstarted(Serve):
        def start_server(self):  # started below, once the guard stands in front of its app
            pass

    log(f"loading {model} into transformers serve ({hardware['device']}, {dtype})")
    serve = Unstarted(force_model=model, host=args.host, port=args.port, device=hardware["device"], dtype=dtype,
                      log_level="warning" if args.verbose else "error", default_seed=settings["seed"], non_blocking=True,
                      continuous_batching=batching, cb_num_blocks=batching_blocks(context), cb_max_batch_tokens=CB_STEP_TOKENS)
    # The process ends at once after the server (os._exit): unloading the model first, a gc.collect() that holds
    # the GIL, kept the main thread from its exit for up to 8 s on a busy CPU.
    serve._model_manager.shutdown = lambda: None
    model_id = serve._model_manager.process_model_name(model)
    loaded, tokenizer = serve._model_manager.load_model_and_processor(model_id)  # loaded already: the one served
    config = serve.server.config
    guard = Guard(config.app, args.request_timeout, args.max_requests, args.verbose)
    # Requests are bounded by the guard (--max-requests, a 503 in JSON). Connections are not counted against
    # them: uvicorn's own limit counted idle ones too, so 256 sockets that sent nothing shut every client out.
    # Each has HEADER_SECONDS to send its request's headers instead, and the process may hold as many as the
    # system lets it.
    config.app, config.timeout_graceful_shutdown, config.limit_concurrency = guard, 1, None
    config.http = headers_in_time()
    more_files()
    limits = Limits(model_id, loaded, tokenizer, serve._chat_handler, openai_meaning(serve._chat_handler._build_generation_config),
                    batching)
    hook_generation(serve, guard, limits, loaded)
    if batching:
        start_batching(serve, model_id, loaded, limits, guard)
    Serve.start_server(serve)
    code = run_server(args, serve, guard, model, describe_serving(batching, context, args))
    sys.stdout.flush()
    sys.stderr.flush()
    # Nothing is left to write. The interpreter's own teardown (torch, the model) took 1 to 17 s more on 2 busy
    # cores, and continuous batching's thread is no daemon: the process would wait for it.
    os._exit(code)


def describe_serving(batching: bool, context: int, args) -> str:
    queue = (f"at most {args.max_requests} requests at once, waiting or answered (--max-requests; more get a 503), "
             f"{args.request_timeout:g} s each (--request-timeout)")
    if batching:
        return (f"continuous batching: requests that decode with the model folder's settings are generated together "
                f"(KV cache for {batching_blocks(context) * CB_PAGE_TOKENS:,} tokens), others one at a time beside them; {queue}")
    return f"one request at a time (no continuous batching); {queue}"


def run_server(args, serve, guard: Guard, model: str, serving: str) -> int:
    """Waits for the server; Ctrl-C or SIGTERM stops it within about two seconds, ending open answers."""
    import logging

    server, thread = serve.server, serve._thread
    for handler in logging.getLogger("uvicorn.access").handlers:  # uvicorn logs requests on stdout; this tool logs on stderr
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)

    def stop(signum, frame):  # a service manager's SIGTERM stops the server as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while not server.started:
            if not thread.is_alive():
                raise UserError(f"the server could not listen on {args.host}:{args.port} (in use?); pick another with --port")
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://{url_host(args.host)}:{port}/v1"
        log(f"serving {model} at {url} (OpenAI-compatible: transformers serve); Ctrl-C stops it")
        log(serving)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            log(f"warning: listening on {args.host}: anyone who reaches this machine can use the model (no key is checked)")
        log(f"chat with it: python example_usage.py --base-url {url} --interactive")
        log(f"or any OpenAI client: base_url={url!r}, model={model!r}, any api_key")
        # sleep, not join(timeout): a join that Ctrl-C interrupts marks the thread stopped (Python 3.11, bpo-45274)
        while thread.is_alive():
            time.sleep(0.2)
    except KeyboardInterrupt:
        log("stopping the server (Ctrl-C again stops it at once)")
        shut_down(serve, guard)
    finally:
        server.should_exit = True
    log("server stopped")
    return 0


def shut_down(serve, guard: Guard) -> None:
    """Open answers end (a stream with a last event saying why), generation stops between tokens, and uvicorn
    closes; after 1 s the process exits whatever still runs (serve_command ends it with os._exit)."""
    server, thread = serve.server, serve._thread
    if server.started:
        server.servers[0].get_loop().call_soon_threadsafe(guard.close)
    server.should_exit = True
    deadline = time.monotonic() + 1.0  # open streams end within 0.2 s (measured); SIGTERM to exit must stay under 2 s
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    except KeyboardInterrupt:
        pass
    server.force_exit = True


# --------------------------------------------------------------------------------------------
# The conversation loop and the command line.
# --------------------------------------------------------------------------------------------
def interactive(chat, system: str | None) -> None:
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    log("Chatting with the model: /reset forgets, /exit or Ctrl-D quits, Ctrl-C stops an answer.")
    while True:
        try:
            text = readable(input("you> ")).strip()
            if not sys.stdin.isatty():
                print(text)  # piped questions: show them, so the output reads as a transcript
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to quit)")
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(start)
            print("(conversation forgotten)")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("echo> ", end="", flush=True)
        try:
            answer = chat.reply(history, lambda piece: print(piece, end="", flush=True))
        except UserError as exc:  # this question's problem (too long, the server refused it or is down): ask another
            print()
            log(f"error: {exc}")
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": answer})


def readable(text: str) -> str:
    """Text as typed, with bytes that are not UTF-8 (Python reads them as lone surrogates, which the tokenizer
    and the openai client refuse with a TypeError) shown as U+FFFD."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return finetune.run_command(lambda: chat_command(args), args.verbose)


def chat_command(args) -> int:
    if args.serve and (args.interactive or args.prompt is not None or args.base_url):
        raise UserError("--serve runs a server; chat with it from another terminal with --base-url")
    if args.serve and args.precision == "int8":
        raise UserError("--serve runs transformers serve, which takes --precision fp32, bf16 or fp16; int8 is for the chat")
    if args.serve and args.provider == "openai":
        raise UserError("--serve serves a local model (--provider huggingface)")
    if not args.serve and not args.interactive and args.prompt is None:
        raise UserError("give --prompt TEXT (or - for stdin), or --interactive (or --serve)")
    takes, fits = finetune.whole(1)  # the rule finetune.py's settings use
    if args.max_context is not None and not fits(args.max_context):
        raise UserError(f"--max-context must be {takes} (got {args.max_context})")
    keys = ("temperature", "top_p", "repetition_penalty", "max_new_tokens", "greedy", "seed", "device", "precision", "output_dir")
    settings, _ = finetune.load_settings(args.config, {k: getattr(args, k) for k in keys})
    settings = finetune.output_dir_for(settings, args.provider)
    flags = {key: getattr(args, key) for key in ("temperature", "top_p", "repetition_penalty", "max_new_tokens", "greedy")}
    if args.static_cache and (args.serve or args.base_url or args.provider == "openai"):
        raise UserError("--static-cache is for a local model's chat and --prompt (--serve batches requests its own way)")
    if args.serve:
        return serve_command(args, settings)
    system = readable(args.system) if args.system else None
    prompt = None
    if sys.stdin is None and (args.interactive or args.prompt == "-"):  # started with stdin closed (<&-, some service managers)
        raise UserError(f"{'--interactive' if args.interactive else '--prompt -'} reads standard input, and it is closed here; "
                        f"give the question as --prompt TEXT, or pipe it in")
    if not args.interactive:  # read before the model loads: an empty prompt is an error at once
        prompt = readable(sys.stdin.read() if args.prompt == "-" else args.prompt).strip()
        if not prompt:
            raise UserError("the prompt is empty")
    if args.base_url:
        chat = ServerChat(args.base_url, args.model, args.max_context, flags, args.seed)
    elif args.provider == "openai":
        chat = OpenAIChat(settings, args.model, args.api_key or os.environ.get("OPENAI_API_KEY"))
    else:
        name = finetune.model_to_load(settings, args.model)
        if settings["precision"] == "int8":
            finetune.check_int8(finetune.resolve_device(settings["device"]))
        chat = LocalChat(settings, name, args.max_context, dict(flags, static_cache=args.static_cache))
    if args.interactive:
        interactive(chat, system)
        return 0
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    print(chat.reply(messages, lambda piece: None))
    if getattr(chat, "stopped", False):
        log("stopped by Ctrl-C: the answer above is cut short")
        return 130
    return 0


if __name__ == "__main__":
    finetune.exit_without_teardown(main())
