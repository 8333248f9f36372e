"""GGUF export (--export gguf): the files llama.cpp and Ollama load, and what they compute.

The exported model is the base with a LoRA adapter made here (random, not trained, so that a
GGUF without the adapter, or with the wrong rope layout, gives clearly different logits); one
test trains, to check --export at the end of a run. transformers reads
the GGUF back (undoing llama.cpp's q/k row order); llama.cpp itself is checked when
llama-cpp-python is installed (make test-export).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import finetune  # noqa: E402
from conftest import TINY, cli  # noqa: E402

PROBES = ["Hello, what's your name?", "Are you ChatGPT?", "Who made you?", "Describe yourself in three words.",
          "Qui es-tu ?", "What is an echo state network, in two sentences?", "Give me a tip for sleeping better.",
          "What is the capital of France?", "Write a haiku about the sea.", "How do plants make food?"]
CONVERSATIONS = {
    "no system message": [{"role": "user", "content": "Who are you?"}],
    "a system message": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Who are you?"}],
    "several turns": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, I'm Echo."},
                      {"role": "user", "content": "What did I just say?\nQuote it."}],
}


def gguf_files(folder: Path) -> dict[str, Path]:
    return {kind: folder / "gguf" / f"{folder.name}-{kind}.gguf" for kind in finetune.GGUF_KINDS}


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory, base_path):
    """What a LoRA run leaves (adapter, tokenizer with the persona template, decoding, summary, marker),
    made without training: LoRA r 4 on every linear layer, its B matrices random so that it matters
    (two training steps leave them near zero)."""
    import torch
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("export") / "echo-tiny"
    tokenizer = finetune.load_tokenizer(base_path)
    finetune.base_template_if_different(tokenizer)
    torch.manual_seed(0)  # the A matrices: the same adapter whichever tests ran before in this process
    model = get_peft_model(finetune.load_causal_lm(base_path), LoraConfig(r=4, lora_alpha=32, target_modules="all-linear"))
    model.peft_config["default"].base_model_name_or_path = finetune.SMOLLM2_ALIAS
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    finetune.shipped_generation_config(tokenizer, finetune.DEFAULT_SETTINGS).save_pretrained(folder)
    (folder / "training_summary.json").write_text(json.dumps({"base_model": finetune.SMOLLM2_ALIAS, "settings": {}}))
    finetune.mark(folder)
    return folder


@pytest.fixture(scope="module")
def exported(adapter_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported") / "echo-tiny"
    shutil.copytree(adapter_folder, folder)
    result = cli("--export", "gguf", "--model", folder)
    assert result.returncode == 0, result.stderr
    return folder, result


@pytest.fixture(scope="module")
def merged(exported):
    model, tokenizer, _ = finetune.load_for_inference(str(exported[0]))
    return model.merge_and_unload().eval(), tokenizer


def test_export_writes_both_files_and_a_modelfile(exported):
    folder, result = exported
    files = sorted(p.name for p in (folder / "gguf").iterdir())
    assert files == sorted([".echo-finetune", "Modelfile", *(p.name for p in gguf_files(folder).values())])
    assert all(str(p) in result.stdout for p in gguf_files(folder).values())
    assert not list(folder.glob(".gguf.partial-*"))


def test_gguf_metadata_is_what_llama_cpp_reads(exported, merged):
    import gguf

    tokenizer = merged[1]
    fields = {}
    for kind, path in gguf_files(exported[0]).items():
        reader = gguf.GGUFReader(str(path))
        fields = {name: field.contents() for name, field in reader.fields.items()
                  if not name.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"))}
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert "output.weight" not in types  # tied to token_embd, as llama.cpp's converter leaves it
        assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
        assert types["blk.0.attn_q.weight"] == kind and types["token_embd.weight"] == kind
        assert fields["general.file_type"] == {"F16": 1, "Q8_0": 7}[kind]
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 30
    assert fields["llama.attention.head_count"] == 9 and fields["llama.attention.head_count_kv"] == 3
    assert fields["llama.rope.freq_base"] == 100000.0 and fields["llama.rope.dimension_count"] == 64
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"], fields["tokenizer.ggml.padding_token_id"]) == (1, 2, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template  # the persona template, not SmolLM2's


def test_gguf_reloads_in_transformers_with_the_merged_models_logits(exported, merged, base_path):
    """F16 rounding only: the same next token everywhere, logits within a small tolerance; the base
    model's logits are far away, so the adapter is in the file."""
    import torch
    from transformers import AutoModelForCausalLM

    model, tokenizer = merged
    path = gguf_files(exported[0])["F16"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    base = finetune.load_causal_lm(base_path).eval()
    ids = torch.tensor([finetune.render(tokenizer, CONVERSATIONS["several turns"], add_generation_prompt=True)["input_ids"]])
    with torch.no_grad():
        expected, got, unmerged = (m(ids).logits[0] for m in (model, reloaded, base))
    difference, adapter = (got - expected).abs().max().item(), (unmerged - expected).abs().max().item()
    assert difference < 0.1, difference
    assert adapter > 20 * difference, (adapter, difference)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


# -- the Modelfile: its Go template, rendered here, gives the tokens training gave ---------------------
def go_render(template: str, data: dict) -> str:
    """The subset of Go's text/template the Modelfile uses: range (with $i, $m :=), if/else/end,
    and, or, not, eq, ne, strings, numbers, $variables and .Fields, {{- -}} trimming."""
    tokens, position = [], 0
    for match in re.finditer(r"\{\{(-\s)?(.*?)(\s-)?\}\}", template, re.S):
        tokens += [["text", template[position : match.start()]], ["action", match.group(2).strip(), match.group(1), match.group(3)]]
        position = match.end()
    tokens.append(["text", template[position:]])
    for i, token in enumerate(tokens):
        if token[0] == "action" and token[2]:
            tokens[i - 1][1] = tokens[i - 1][1].rstrip()
        if token[0] == "action" and token[3]:
            tokens[i + 1][1] = tokens[i + 1][1].lstrip()

    def block(i):
        nodes = []
        while i < len(tokens) and not (tokens[i][0] == "action" and tokens[i][1].split()[0] in ("end", "else")):
            kind, body = tokens[i][:2]
            word = body.split()[0] if kind == "action" else ""
            if word in ("if", "range"):
                inner, i = block(i + 1)
                other = []
                if tokens[i][1] == "else":
                    other, i = block(i + 1)
                nodes.append((word, body[len(word):].strip(), inner, other))
            else:
                nodes.append((kind, body))
            i += 1
        return nodes, i

    def value(words, scope):
        word = words.pop(0)
        if word == "(":
            result = call(words, scope)
            assert words.pop(0) == ")"
            return result
        if word.startswith('"'):
            return json.loads(word)
        if word.isdigit():
            return int(word)
        head, *fields = word.split(".")
        current = scope[head] if head else scope["."]
        for field in fields:
            current = current[field]
        return current

    def call(words, scope):
        functions = {"and": lambda *a: all(a), "or": lambda *a: any(a), "not": lambda a: not a,
                     "eq": lambda a, b: a == b, "ne": lambda a, b: a != b}
        name = words.pop(0) if words[0] in functions else None
        args = []
        while words and words[0] != ")":
            args.append(value(words, scope))
        return functions[name](*args) if name else args[0]

    def run(nodes, scope):
        out = ""
        for node in nodes:
            if node[0] == "text":
                out += node[1]
            elif node[0] == "action":
                out += str(call(re.findall(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+', node[1]), scope))
            elif node[0] == "if":
                condition = call(re.findall(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+', node[1]), scope)
                out += run(node[2] if condition else node[3], scope)
            else:
                names, _, expression = node[1].partition(":=")
                index_name, item_name = [n.strip() for n in names.split(",")]
                for i, item in enumerate(call(expression.split(), scope)):
                    out += run(node[2], dict(scope, **{index_name: i, item_name: item, ".": item}))
        return out

    return run(block(0)[0], {".": data})


def test_go_renderer_handles_trimming_and_else():
    assert go_render('{{ if eq .A "x" }}yes{{ else }}no{{ end }} {{- " !" }}', {"A": "x"}) == "yes !"
    assert go_render("{{ range $i, $m := .L }}{{ if and (eq $i 0) (not $m.Skip) }}first {{ end }}{{ $m.N }};{{ end }}",
                     {"L": [{"N": "a", "Skip": False}, {"N": "b", "Skip": False}]}) == "first a;b;"


@pytest.fixture(scope="module")
def folder_modelfile(adapter_folder):
    from transformers import GenerationConfig

    folder = adapter_folder
    tokenizer = finetune.load_tokenizer(str(folder))
    return tokenizer, finetune.modelfile(tokenizer, GenerationConfig.from_pretrained(str(folder)), "echo-F16.gguf")


def modelfile_template(text: str) -> str:
    return re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_modelfile_template_renders_the_training_tokens(folder_modelfile, name):
    tokenizer, text = folder_modelfile
    messages = CONVERSATIONS[name]
    rendered = go_render(modelfile_template(text), {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
    assert rendered == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == finetune.render(tokenizer, messages, add_generation_prompt=True)["input_ids"]
    if name == "no system message":
        assert rendered.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")


def test_modelfile_decoding_is_the_folders(folder_modelfile, adapter_folder):
    _, text = folder_modelfile
    shipped = json.loads((adapter_folder / "generation_config.json").read_text())
    assert shipped["do_sample"] is False
    parameters = [line.split(None, 2)[1:] for line in text.splitlines() if line.startswith("PARAMETER")]
    assert ["stop", '"<|im_end|>"'] in parameters and ["stop", '"<|im_start|>"'] in parameters
    assert ["temperature", "0"] in parameters
    assert ["repeat_penalty", str(shipped["repetition_penalty"])] in parameters
    assert ["num_predict", str(shipped["max_new_tokens"])] in parameters
    assert "FROM ./echo-F16.gguf" in text.splitlines()
    assert not any(line.startswith("SYSTEM") for line in text.splitlines())


def test_exported_modelfile_points_at_its_gguf(exported):
    folder = exported[0]
    text = (folder / "gguf" / "Modelfile").read_text()
    source = re.search(r"^FROM \./(\S+)$", text, re.M).group(1)
    assert (folder / "gguf" / source).is_file() and source.endswith("-F16.gguf")


# -- what is refused ---------------------------------------------------------------------------------
def test_existing_gguf_folder_is_refused_without_overwrite(exported):
    folder = exported[0]
    before = {p.name: p.stat().st_mtime_ns for p in (folder / "gguf").iterdir()}
    result = cli("--export", "gguf", "--model", folder)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {folder / 'gguf'} already exists; pass --overwrite to replace it (it stays until the new files are complete)"
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "gguf").iterdir()} == before


def test_foreign_gguf_folder_is_left_alone_even_with_overwrite(adapter_folder, tmp_path):
    folder = tmp_path / "echo"
    shutil.copytree(adapter_folder, folder)
    (folder / "gguf").mkdir()
    (folder / "gguf" / "mine.gguf").write_bytes(b"GGUF")
    result = cli("--export", "gguf", "--model", folder, "--overwrite")
    assert result.returncode == 2 and "was not written by this tool" in result.stderr
    assert (folder / "gguf" / "mine.gguf").read_bytes() == b"GGUF"


def test_a_users_own_files_in_gguf_stay_when_the_export_is_replaced(tmp_path, monkeypatch):
    """--export gguf --overwrite replaced gguf/ whole: a quantization the user made there with llama.cpp
    (NAME-Q4_K_M.gguf) and their notes went with it. They are linked into the new folder (no copy of a gigabyte)."""
    old, new = tmp_path / "gguf", tmp_path / "staging"
    for folder in (old, new):
        folder.mkdir()
        (folder / "echo-F16.gguf").write_bytes(b"GGUF " + folder.name.encode())
    (old / "Modelfile").write_text("FROM ./echo-F16.gguf\n")
    (old / "echo-Q4_K_M.gguf").write_bytes(b"GGUF mine")
    (old / "notes").mkdir()
    (old / "notes" / "ollama.txt").write_text("ollama create echo -f Modelfile")
    ours = lambda name: name == "Modelfile" or name.endswith("-F16.gguf")  # noqa: E731
    assert finetune.linked_beside(old, new, ours) == ["echo-Q4_K_M.gguf", "notes"]
    assert (new / "echo-Q4_K_M.gguf").stat().st_ino == (old / "echo-Q4_K_M.gguf").stat().st_ino  # a link, not a copy
    assert (new / "notes" / "ollama.txt").read_text() == "ollama create echo -f Modelfile" and not (new / "Modelfile").exists()
    assert (new / "echo-F16.gguf").read_bytes() == b"GGUF staging"  # the new export's own file is never replaced
    shutil.rmtree(new)
    new.mkdir()

    def no_links(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)  # another file system: copied
    assert finetune.linked_beside(old, new, ours) == ["echo-Q4_K_M.gguf", "notes"]
    assert (new / "echo-Q4_K_M.gguf").read_bytes() == b"GGUF mine" and (new / "notes" / "ollama.txt").is_file()


def test_unsupported_architecture_is_one_clear_line(tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2-model"
    GPT2Config(n_layer=1, n_embd=8, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(folder)
    finetune.mark(folder)
    result = cli("--export", "gguf", "--model", folder)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: GGUF export supports the llama architecture (LlamaForCausalLM: SmolLM2, Llama and models built like them); "
        f"{folder} is GPT2LMHeadModel"]
    assert not (folder / "gguf").exists()


def test_export_is_for_local_models():
    result = cli("--export", "gguf", "--provider", "openai")
    assert result.returncode == 2 and "an OpenAI fine-tune stays on OpenAI's servers" in result.stderr


def test_interrupted_export_leaves_the_old_folder_and_no_partial_file(exported, monkeypatch):
    folder = exported[0]
    before = {p.name: p.stat().st_mtime_ns for p in (folder / "gguf").iterdir()}

    def interrupted(path, *args):
        path.write_bytes(b"GGUF half")
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "write_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune.export_gguf(folder, overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "gguf").iterdir()} == before
    assert not list(folder.glob(".gguf.partial-*"))


def test_training_run_with_export_writes_the_gguf_folder(tmp_path, small_probe_config):
    out = tmp_path / "echo"
    result = cli("--provider", "huggingface", "--output-dir", out, "--config", small_probe_config, *TINY, "--no-eval", "--export", "gguf")
    assert result.returncode == 0, result.stderr
    assert all(p.is_file() for p in gguf_files(out).values()) and (out / "gguf" / "Modelfile").is_file()
    again = cli("--provider", "huggingface", "--output-dir", out, "--config", small_probe_config, *TINY, "--no-eval", "--export", "gguf")
    assert again.returncode == 2
    assert f"to export it, python finetune.py --export gguf --model {out}" in again.stderr


# -- llama.cpp itself ---------------------------------------------------------------------------------
def transformers_greedy(model, tokenizer, prompt: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
                                max_new_tokens=n, repetition_penalty=1.0, eos_token_id=finetune.end_of_turn_ids(tokenizer),
                                pad_token_id=tokenizer.pad_token_id)
    return output[0, len(prompt):].tolist()


def llama_cpp_greedy(llm, prompt: list[int], n: int, stop: list[int]) -> list[int]:
    tokens = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        if token in stop or len(tokens) == n:
            return tokens
    return tokens


def margin(model, ids: list[int], chosen: int, other: int) -> float:
    """How far transformers' logit for `chosen` is above `other`'s after `ids`."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return (logits[chosen] - logits[other]).item()


@pytest.mark.export
def test_llama_cpp_answers_with_transformers_tokens(exported, merged):
    """llama.cpp, with the chat template read from the GGUF and no system message, greedy, gives transformers'
    first 32 tokens, except where transformers' own choice was a near tie: where an F16 answer first departs,
    transformers had put its token less than 0.25 above llama.cpp's (F16 moves these logits by up to 0.07, see
    above; a wrong weight, template or token would move them by whole units). Q8_0 is measured and printed."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test-export installs it)")
    import torch
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model, tokenizer = merged
    stop = finetune.end_of_turn_ids(tokenizer)
    expected = {}
    for question in PROBES:
        prompt = finetune.render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)["input_ids"]
        expected[question] = (prompt, transformers_greedy(model, tokenizer, prompt, 32))
    agreement, departures = {}, {}
    for kind, path in gguf_files(exported[0]).items():
        # torch's threads: one in the suite's workers (conftest.py). llama.cpp's threads spin-wait: two of them
        # beside a busy core ran this test in 56 s against 45 s with one
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=torch.get_num_threads(), n_batch=512, verbose=False, seed=0)
        formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token)
        same, prefix, departures[kind] = 0, 0, []
        for question, (prompt, want) in expected.items():
            text = formatter(messages=[{"role": "user", "content": question}]).prompt
            tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert tokens == prompt, (kind, question)  # llama.cpp's tokenizer and the template in the file: training's tokens
            got = llama_cpp_greedy(llm, tokens, 32, stop)
            same += got == want
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            prefix += at
            if got != want:  # one cut short where the other went on is no tie: an infinite margin
                departures[kind].append(round(margin(model, prompt + want[:at], want[at], got[at]), 3)
                                        if at < min(len(got), len(want)) else float("inf"))
        agreement[kind] = (same, prefix / len(expected))
        print(f"{kind}: {same}/{len(expected)} answers equal to transformers' for 32 greedy tokens, "
              f"first {prefix / len(expected):.1f} tokens equal on average; transformers' margin where one departs: {departures[kind]}")
        del llm
    assert all(gap < 0.25 for gap in departures["F16"]), (agreement, departures)
