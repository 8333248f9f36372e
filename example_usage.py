#!/usr/bin/env python3
"""Chat with a fine-tuned Deep Tree Echo model (no system prompt unless you give one).

Examples:
  python example_usage.py --interactive                        # the model in ./echo-model
  python example_usage.py --prompt "Who are you?"              # prints only the answer
  echo "What is an echo state network?" | python example_usage.py --prompt -
  python example_usage.py --model echo-model/merged --greedy --prompt "Hello"
  python example_usage.py --provider openai --interactive      # reads echo-openai/openai_job.json

In the interactive chat: /reset forgets the conversation, /exit or Ctrl-D quits,
Ctrl-C stops the answer being written (not the program).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

import finetune
from finetune import UserError, log


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--max-context", type=int, metavar="TOKENS", help="trim the oldest turns beyond this (default: the model's)")
    parser.add_argument("--output-dir", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="show tracebacks")
    return parser


# --------------------------------------------------------------------------------------------
# A local model: loaded once, answers streamed token by token, history trimmed to fit.
# --------------------------------------------------------------------------------------------
class LocalChat:
    def __init__(self, settings: dict, name: str, max_context: int | None, decoding: dict | None = None):
        import torch
        from transformers import set_seed

        self.model, self.tokenizer, _ = finetune.load_for_inference(name)
        if hasattr(self.model, "merge_and_unload"):  # the chat never needs the base alone: merged, each token costs less
            self.model = self.model.merge_and_unload()
        self.settings = finetune.resolve_hardware(settings, training=False)
        set_seed(settings["seed"])
        self.model = finetune.answering(self.model, self.settings)
        self.max_context = max_context or getattr(self.model.config, "max_position_embeddings", 2048)
        self.decoding = decoding_overrides(decoding or {})  # the flags given; the folder's generation_config.json for the rest
        self.torch = torch

    def fit(self, messages: list[dict]) -> list[int]:
        """Drops the oldest exchanges (never the system prompt or the new question) until it fits."""
        budget = self.max_context - self.decoding.get("max_new_tokens", self.model.generation_config.max_new_tokens or 256)
        while True:
            ids = finetune.render(self.tokenizer, messages, add_generation_prompt=True)["input_ids"]
            first = 1 if messages[0]["role"] == "system" else 0
            if len(ids) <= budget or len(messages) - first <= 1:
                return ids[-budget:]
            del messages[first : first + 2]

    def reply(self, messages: list[dict], write) -> str:
        from transformers import StoppingCriteria, TextIteratorStreamer

        ids = self.torch.tensor([self.fit(messages)], device=self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()

        class StopOnRequest(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        kwargs = {"eos_token_id": finetune.end_of_turn_ids(self.tokenizer), "pad_token_id": self.tokenizer.pad_token_id, **self.decoding}
        worker = threading.Thread(target=self._generate, args=(ids, kwargs, streamer, StopOnRequest()))
        worker.start()
        pieces = []
        try:
            for piece in streamer:
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt:
            stop.set()
            for _ in streamer:  # let the generating thread finish its current token
                pass
            write(" [stopped]")
        finally:
            worker.join()
        return "".join(pieces).strip()

    def _generate(self, ids, kwargs, streamer, stopper):
        with self.torch.no_grad(), finetune.autocast(self.settings["device"], self.settings["precision"]):
            self.model.generate(input_ids=ids, attention_mask=self.torch.ones_like(ids), streamer=streamer,
                                stopping_criteria=[stopper], **kwargs)


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
    def __init__(self, settings: dict, model: str | None):
        self.settings = settings
        self.tuner = finetune.OpenAIFineTuner(os.environ.get("OPENAI_API_KEY"), settings.get("base_url"))
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
# The conversation loop and the command line.
# --------------------------------------------------------------------------------------------
def interactive(chat, system: str | None) -> None:
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    log("Chatting with the model: /reset forgets, /exit or Ctrl-D quits, Ctrl-C stops an answer.")
    while True:
        try:
            text = input("you> ").strip()
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
        answer = chat.reply(history, lambda piece: print(piece, end="", flush=True))
        print()
        history.append({"role": "assistant", "content": answer})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return finetune.run_command(lambda: chat_command(args), args.verbose)


def chat_command(args) -> int:
    if not args.interactive and args.prompt is None:
        raise UserError("give --prompt TEXT (or - for stdin), or --interactive")
    keys = ("temperature", "top_p", "repetition_penalty", "max_new_tokens", "greedy", "seed", "device", "precision", "output_dir")
    settings, _ = finetune.load_settings(args.config, {k: getattr(args, k) for k in keys})
    settings = finetune.output_dir_for(settings, args.provider)
    if args.provider == "openai":
        chat = OpenAIChat(settings, args.model)
    else:
        name = args.model or settings["output_dir"]
        if not Path(name).exists() and name == settings["output_dir"]:
            raise UserError(f"no model in {name}; train one with: python finetune.py --provider huggingface")
        flags = {key: getattr(args, key) for key in ("temperature", "top_p", "repetition_penalty", "max_new_tokens", "greedy")}
        chat = LocalChat(settings, name, args.max_context, flags)
    if args.interactive:
        interactive(chat, args.system)
        return 0
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UserError("the prompt is empty")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt.strip()}]
    print(chat.reply(messages, lambda piece: None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
