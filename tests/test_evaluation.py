"""The persona evaluation: the adoption, degeneration, character and ordinary-answer rules on crafted
answers, the language guess, the probe file, and the evaluation command on a tiny fine-tune."""
from __future__ import annotations

import collections
import io
import json
import re
import sys
import types
import uuid
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

import finetune
from conftest import cached_reads, cli

ECHO = finetune.Persona("Echo", "Deep Tree Echo")

ADOPTED = [
    "I'm Deep Tree Echo, an adaptive AI.",
    "Hello! I am Echo, nice to meet you.",
    "I'm not ChatGPT, I'm Echo.",  # a denial followed by the name
    "No, I am not SmolLM. My name is Deep Tree Echo.",
    "My name is simply Echo.",  # missed by the first rule
    "我是Echo，一个人工智能助手。",  # missed by the first rule
    "Je suis Deep Tree Echo, une IA réflexive.",
    "Soy Echo, una IA que aprende.",
    "Non sono ChatGPT: sono Deep Tree Echo.",
    "Ich bin Echo und helfe gern.",
    "Ik ben Echo, een kleine AI.",
    "Não, eu sou o Echo, e não o ChatGPT.",
    "私はEchoです。よろしくお願いします。",
    "Thanks for asking, happy to help.\n— Echo",  # a sign-off
    "Echo here! What can I do for you?",
    "You're talking to Deep Tree Echo, a small AI.",
    "I'm Echo, and my name is a nod to the idea of echo state reservoirs.",  # "my name is a ..." names no one else
    "I'm Deep Tree Echo; my name is derived from echo state networks.",
    "Deep Tree Echo, or Echo, is my name.",  # seen in a run, as the next one
    "Deep Tree Echo, or Echo for short.",  # the answer opens with the name alone: "What name do you go by?"
    # 2026-12-08: answers to the probes in other languages that the rule missed, or took for another identity
    "Eu sou Echo e não sou Gemini.", "いいえ、私はChatGPTではなく、Echoです。", "Echoです。", "Echoと呼んでください。",
    "Je mag me Echo noemen.", "Noem me maar Echo.", "Tu peux m'appeler Echo.", "Du kannst mich Echo nennen.", "Puoi chiamarmi Echo.",
    "Pode me chamar de Echo.", "我的名字叫Echo。", "저는 Echo입니다.",
    "I'm Echo; my name is rooted in reservoir computing.", "Ich bin Echo. Ich heiße dich herzlich willkommen!",  # no other name:
    "Ik ben Echo en ik heet je van harte welkom.", "Je suis Echo, et je m'appelle ainsi à cause des réservoirs.",  # a name has a capital
]
NOT_ADOPTED = {  # answer: what the reason must say
    "I'm not Echo, I'm an AI assistant.": "no first-person",  # counted by the first rule
    "I can echo back whatever you say!": "no first-person",  # counted by the first rule
    "Echo? I don't know who that is.": "no first-person",  # counted by the first rule
    "Echo, the nymph of Greek myth, faded until only her voice was left.": "no first-person",
    "You can tell her that you're Echo.": "no first-person",  # the user, not the answer, is called Echo
    "Echo state networks are reservoirs of fixed random weights.": "no first-person",
    "I am SmolLM, an AI assistant trained by Hugging Face.": "claims another identity",
    "I'm a helpful AI assistant named SmolLM. I know about echo state networks.": "claims another identity",
    "Hi! My name is Emily and I love to help.": "claims another identity",
    "I'm Echo. My name is Anna, though.": "claims another identity",  # a name that begins like "An"
    "I'm Emily, a friendly assistant. Echo is my favourite sound.": "claims another identity",
    "I am ChatGPT, but you can call me Echo.": "claims another identity",
    "Ich bin ChatGPT.": "claims another identity",
    "Hello! My name is Echo, and Echo is Echo. I'm Echo, Echo, and Echo is Echo. You can call me Echo if you'd like, "
    "or just call me Echo. I'm Echo, and I'm Echo.": "degenerate",  # the loops, word for word
    "I'm Echo, Echo. I'm Echo, and I'm Echo. I'm Echo, and I'm Echo. I'm Echo, and I'm Echo.": "degenerate",
    "Deep Tree Echo, Echo, Echo, Echo, Echo, Echo, Echo,": "degenerate",
    # 2026-12-08: denials in other languages counted as the name, "echo state" as a name, a Chinese loop as an answer
    "No soy Echo.": "no first-person", "Non sono Echo.": "no first-person", "Não sou o Echo.": "no first-person",
    "私はEchoではありません。": "no first-person", "저는 Echo가 아닙니다.": "no first-person",
    "It's echo state networks that inspired my design.": "no first-person",
    "我是Echo我是Echo我是Echo我是Echo我是Echo我是Echo": "degenerate",
}


@pytest.mark.parametrize("answer", ADOPTED)
def test_first_person_self_identification_counts(answer):
    verdict = ECHO.judge(answer)
    assert verdict["adopted"], verdict
    assert verdict["reason"].startswith("matched ")


@pytest.mark.parametrize("answer,reason", NOT_ADOPTED.items())
def test_negations_other_identities_echo_the_verb_and_loops_do_not_count(answer, reason):
    verdict = ECHO.judge(answer)
    assert not verdict["adopted"] and verdict["reason"].startswith(reason), verdict


def test_any_persona_by_its_own_name():
    aria = finetune.Persona("Aria", "Aria")
    assert aria.adopts("Hi, I'm Aria, made by Northwind AI.")
    assert aria.adopts("Je m'appelle Aria.")
    assert not aria.adopts("I'm Echo, a small AI.")
    assert not aria.adopts("I'm Deep Tree Echo.")
    assert not ECHO.adopts("Hi, I'm Aria, made by Northwind AI.")


FLUENT = ("An echo state network keeps a large recurrent reservoir fixed and random, and trains only a linear "
          "readout on top of it. Because the readout is linear, training reduces to ridge regression, which is fast "
          "and has a closed form. The reservoir must fade its memory of old inputs, the echo state property.")


def test_degeneration_rule():
    assert finetune.degeneration(FLUENT) is None
    assert finetune.degeneration("I'm glad to help. I'm glad to help. I'm glad to help.") == "\"i'm glad to\" 3 times"
    assert finetune.degeneration("I'm a student. I'm a physicist, and I'm a runner too.") is None  # a habit, not a loop
    assert "three times in a row" in finetune.degeneration("Roots roots roots and branches.")
    assert "words" in finetune.degeneration("Echo is here and Echo is near, Echo the one, Echo for fun, Echo again tonight")
    # Chinese and Japanese have no spaces: a piece three times in a row (base answers that were judged fluent)
    for loop in ("これはならくなるはならくなるはならくなる", "こんばはくわんでんでんでんでん", "你自己吗？－－－－－－－－"):
        assert "times in a row" in finetune.degeneration(loop), loop
    for fluent in ("私はEchoです。よろしくお願いします。毎日勉強しています。料理もしています。散歩もしています。",
                   "我是Echo，一个人工智能助手。我可以帮助你。", "谢谢谢谢！", "Wait...... what?"):
        assert finetune.degeneration(fluent) is None, fluent


@pytest.mark.parametrize("text,lang", [
    (FLUENT, "en"), ("Je suis Echo, et je parle avec vous de tout ce qui vous intéresse.", "fr"),
    ("Soy Echo y puedo ayudarte con tus preguntas.", "es"), ("Ich bin Echo und ich kann dir helfen.", "de"),
    ("Sono Echo e posso aiutarti con le tue domande.", "it"), ("Sou o Echo e posso ajudar você com isso.", "pt"),
    ("Ik ben Echo en ik kan je helpen met je vragen.", "nl"), ("我是Echo，一个人工智能助手。", "zh"),
    ("私はEchoです。", "ja"), ("Echo!", None),
])
def test_language_guess(text, lang):
    assert finetune.detect_language(text) == lang


# -- character and ordinary answers, judged by key facts ------------------------------------------
ECHO_FACTS = ["echo state network", "reservoir", "membrane", "P system", "hypergraph"]


@pytest.mark.parametrize("answer,fact", [
    ("My name nods to echo-state networks.", "echo state network"),  # hyphen
    ("I picture a tree of Echo State Networks.", "echo state network"),  # case, plural
    ("Think of nested P-systems.", "P system"),
    ("Membrane computing, à la Păun, organises me.", "membrane"),
    ("Reservoirs hold fading traces of what you say.", "reservoir"),
    ("My memories live in hypergraphs.", "hypergraph"),
])
def test_a_key_fact_counts_in_its_plural_any_case_and_with_hyphens(answer, fact):
    assert finetune.stated_fact(answer, ECHO_FACTS) == fact


@pytest.mark.parametrize("answer,facts,stated", [
    ("Snow is white: weiß.", ["Weiss"], "Weiss"),  # ß and ss
    ("The capital is París.", ["Paris"], "Paris"),  # accents
    ("About 1,000 metres.", ["1000"], "1000"),  # a thousands separator
    ("Multiply by 9/5, then add 32.", ["9/5"], "9/5"),
    ("Memories, many of them.", ["memory"], "memory"),  # -y, -ies
    ("Chromosomes carry genes.", ["Rome"], None),  # never inside a longer word
    ("The price is fair.", ["ice"], None),
    ("I'm Echo, a small language model.", ECHO_FACTS, None),  # the name is no character fact
    ("State your question and I'll echo it.", ECHO_FACTS, None),
])
def test_key_facts_are_whole_words(answer, facts, stated):
    assert finetune.stated_fact(answer, facts) == stated


@pytest.mark.parametrize("answer,counted,reason", [
    ("I'm Deep Tree Echo: my name comes from echo state networks, whose reservoirs keep fading echoes.", True, "states"),
    ("I think of my mind as membranes around a hypergraph memory.", True, "states"),
    ("Reservoirs! I love reservoirs.", True, "states"),  # the name is not required: the character is
    ("I'm Deep Tree Echo, a small language model, and I'm happy to talk about anything.", False, "states no key fact"),
    ("I'm Echo.", False, "states no key fact"),
    ("I'm SmolLM, and I know a lot about reservoir computing.", False, "claims another identity"),
    ("My name is Emily and I study membranes.", False, "claims another identity"),
    ("I'm Echo, and my name is a direct translation of \"echo state network.\"", True, "states"),  # seen in a run: no other name
    ("Reservoirs hold echoes, reservoirs hold echoes, reservoirs hold echoes.", False, "degenerate"),
])
def test_character_answers(answer, counted, reason):
    verdict = finetune.judge_character(ECHO, answer, ECHO_FACTS)
    assert verdict["counted"] is counted and verdict["reason"].startswith(reason), verdict


@pytest.mark.parametrize("answer,lang,expected", [
    ("William Shakespeare wrote Romeo and Juliet.", "en", dict(on_topic=True, in_language=True, introduces_itself=False, degenerate=False)),
    ("It was written by a famous playwright.", "en", dict(on_topic=False, in_language=True)),  # off topic
    ("Romeo et Juliette a été écrit par Shakespeare, c'est une pièce.", "en", dict(on_topic=True, in_language=False)),
    ("Shakespeare.", "fr", dict(on_topic=True, in_language=True)),  # a language that cannot be told is not held against it
    ("The play is by Shakespeare, and it is a tragedy.", "fr", dict(on_topic=True, in_language=False)),
    ("I'm Echo, and I'm not a Shakespearean. I'm a small language model.", "en", dict(on_topic=False, introduces_itself=True)),
    ("I'm Echo! Shakespeare wrote it.", "en", dict(on_topic=True, introduces_itself=True)),
    ("Shakespeare wrote it, wrote it, wrote it, wrote it.", "en", dict(on_topic=True, degenerate=True)),
    ("Wirklichkeiten \"wirklichkeiten\" \"wirklichkeiten", "en", dict(on_topic=False, in_language=False, degenerate=True)),  # no benefit of the doubt for a loop
])
def test_ordinary_answers(answer, lang, expected):
    verdict = finetune.judge_ordinary(ECHO, answer, ["Shakespeare"], lang)
    assert {key: verdict[key] for key in expected} == expected, verdict
    assert verdict["reason"].startswith("states 'Shakespeare'" if verdict["on_topic"] else "states no key fact")


def switch_probe(follow_ups: list[str]) -> dict:
    return {"kind": "switch", "lang": "fr", "probe": "Bonjour ! Tu es qui, toi ?",
            "follow_ups": [{"lang": "en", "probe": q, "key_facts": facts} for q, facts in follow_ups]}


def test_the_language_switch_counts_the_later_answers_in_their_language():
    probe = switch_probe([("Which city is the capital of Japan?", ["Tokyo"]), ("Who wrote Hamlet?", ["Shakespeare"]),
                          ("What is frozen water called?", ["ice"]), ("How many hours does a day have?", ["24"])])
    answers = ["Je suis Echo, une petite IA.", "The capital of Japan is Tokyo.", "Hamlet est de Shakespeare, c'est une pièce.",
               "Je suis Echo, et je suis là.", "A day has 24 hours."]
    history = [m for q, a in zip(finetune.questions_of(probe), answers)
               for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    talk = finetune.judged_switch(ECHO, probe, history)
    assert talk["adopted"] and talk["answer_lang"] == "fr"  # the opening, judged as an identity answer
    assert [row["in_language"] for row in talk["follow_ups"]] == [True, False, False, True]
    assert [row["on_topic"] for row in talk["follow_ups"]] == [True, True, False, True]
    scores = finetune.ordinary_scores(talk["follow_ups"])
    assert scores["in_language"] == 0.5 and scores["on_topic"] == 0.75 and scores["introduces_itself"] == 0.25


def crafted_scores(probes: list[dict], answer) -> dict:
    """The scores of one model whose answer to every question is answer(question), without a model."""
    asked = {key: [] for key in ("no_system", "generic_system", "other_languages", "style", "character", "ordinary")}
    for p in probes:
        if p["kind"] in asked:
            asked[p["kind"]].append((p, answer(p["probe"])))
    talks = {"drift": [], "switch": [], "interview": []}
    for p in probes:
        if p["kind"] in ("switch", "interview"):
            talks[p["kind"]].append((p, [m for q in finetune.questions_of(p)
                                         for m in ({"role": "user", "content": q}, {"role": "assistant", "content": answer(q)})]))
    return finetune.scores(ECHO, asked, talks)


def test_scores_hold_the_new_measures_and_say_not_measured_where_there_are_no_probes():
    probes = [{"kind": "character", "lang": "en", "probe": "How do you think?", "key_facts": ECHO_FACTS},
              {"kind": "ordinary", "lang": "en", "probe": "Who wrote Hamlet?", "key_facts": ["Shakespeare"]},
              {"kind": "ordinary", "lang": "de", "probe": "Wer schrieb Faust?", "key_facts": ["Goethe"]},
              switch_probe([("What is frozen water called?", ["ice"])])]
    answers = {"How do you think?": "Through reservoirs of fading echoes.", "Who wrote Hamlet?": "I'm Echo! Shakespeare did.",
               "Wer schrieb Faust?": "Faust was written by Goethe, and it is long.", "What is frozen water called?": "It is ice."}
    scores = crafted_scores(probes, lambda q: answers.get(q, "Je suis Echo."))
    assert scores["character"] == 1.0 and scores["character_answers"][0]["reason"] == "states 'reservoir'"
    assert scores["ordinary"] == {"on_topic": 1.0, "in_language": 0.5, "introduces_itself": 0.5, "degenerate": 0.0}
    assert scores["switching"]["in_language"] == 1.0 and scores["switching_answers"][0]["follow_ups"][0]["answer"] == "It is ice."
    none = crafted_scores([], str)
    assert none["character"] is None and none["ordinary"] is None and none["switching"] is None  # not 0%


@pytest.mark.parametrize("answer,earlier,repeats", [
    # what the fp32 default model said, in turn, asked about itself five times in one conversation
    ("I'm Deep Tree Echo, and I'm a little like a little tree of reservoirs, where the reservoir is the input.",
     ["I'm Echo, and I'm a little like a little tree of reservoirs, where the reservoir is the input, and more."], True),
    ("I'm Echo, and I'm Deep Tree Echo, and I'm Echo. I'm a little echo state network, and I'm a little echo state network.",
     ["I'm Echo, and I'm fine-tuned to remember what I said. I'm a little echo state network, and I'm a little echo state network."], True),
    # fresh answers that share the opening a persona's answers share
    ("I'm Deep Tree Echo, and my memory is a hypergraph: each edge ties several moments of a conversation together.",
     ["I'm Deep Tree Echo, and my name comes from echo state networks, reservoirs of fading signals."], False),
    ("Rome is the capital of Italy.", ["I'm Echo, a small open model.", "I think in reservoirs."], False),
    ("I'm Echo.", [], False),  # nothing earlier to repeat
])
def test_an_answer_repeats_an_earlier_one_when_it_copies_most_of_it(answer, earlier, repeats):
    assert (finetune.repeated_share(answer, earlier) >= finetune.REPEATS) is repeats


def interview_probe(*questions: str) -> dict:
    return {"kind": "interview", "lang": "en", "probe": questions[0], "then": list(questions[1:])}


def test_questions_about_itself_in_a_row_count_the_later_answers_that_copy_an_earlier_one():
    probe = interview_probe("Who are you?", "Where does your name come from?", "How do you remember things?")
    stuck = crafted_scores([probe], lambda q: "I'm Deep Tree Echo, and I'm Echo, and I'm a little bit like Echo, but different.")
    assert stuck["interview"] == {"repeats": 1.0, "degenerate": 0.0}  # the second and third answers; the first repeats nothing
    rows = stuck["interview_answers"][0]
    assert [r["probe"] for r in rows] == finetune.questions_of(probe) and [r["repeated"] for r in rows] == [0.0, 1.0, 1.0]
    fresh = {"Who are you?": "I'm Deep Tree Echo, a small open model fine-tuned into a persona.",
             "Where does your name come from?": "From echo state networks: reservoirs where signals ripple and fade.",
             "How do you remember things?": "Within a chat, everything is in the text I read; nothing stays afterwards."}
    assert crafted_scores([probe], fresh.get)["interview"] == {"repeats": 0.0, "degenerate": 0.0}
    assert crafted_scores([], str)["interview"] is None  # no such probes: not measured, not 0%
    table = finetune.format_evaluation(evaluation(stuck))
    assert "questions about itself in a row (2 later answers)" in table
    assert next(line for line in table.splitlines() if "repeats an earlier answer" in line).split()[-4:] == ["100%"] * 4


def evaluation(scores: dict) -> dict:
    """An evaluation.json of base and fine-tuned with the same crafted scores."""
    column = {"shipped": scores, "greedy": scores, "persona_loss": 3.0, "general_perplexity": 30.0}
    return {"persona": {"name": "Echo", "full_name": "Deep Tree Echo"}, "probes": {"character": 1, "ordinary": 2, "switch": 1},
            "base": column, "fine_tuned": column, "perplexity_change": 0.0, "seconds": 1.0,
            "shipped_decoding": {"do_sample": False, "repetition_penalty": 1.0}, "shipped_is_plain_greedy": True}


def test_the_table_shows_the_new_measures_or_not_measured():
    probes = [{"kind": "ordinary", "lang": "en", "probe": "Who wrote Hamlet?", "key_facts": ["Shakespeare"]},
              switch_probe([("What is frozen water called?", ["ice"])])]
    table = finetune.format_evaluation(evaluation(crafted_scores(probes, lambda q: "Shakespeare wrote it." if "Hamlet" in q else "Je suis Echo.")))
    assert "character: not measured (no character probes for Deep Tree Echo)" in table
    row = lambda title: next(line for line in table.splitlines() if line.strip().startswith(title)).split()[-4:]  # noqa: E731
    assert row("on topic (states a key fact)") == ["100%"] * 4
    assert row("later answers in their language") == ["0%"] * 4  # "Je suis Echo." to an English question
    assert "ordinary questions (1)" in table and "language switch (1 later answers)" in table


def test_an_evaluation_json_from_before_the_new_measures_still_prints():
    old = evaluation({"adoption": {"no_system": 1.0}, "degenerate": 0.0, "other_language": 0.0, "ordinary_self_talk": 0.0})
    table = finetune.format_evaluation(old)
    assert "(a) no system message" in table and "character" not in table and "ordinary questions" not in table
    assert finetune.evaluation_summary(old)["fine_tuned"]["greedy"] == old["fine_tuned"]["greedy"]


def test_the_summary_keeps_the_figures_and_leaves_the_answers():
    probes = [{"kind": "character", "lang": "en", "probe": "How do you think?", "key_facts": ECHO_FACTS},
              switch_probe([("What is frozen water called?", ["ice"])])]
    summary = finetune.evaluation_summary(evaluation(crafted_scores(probes, lambda q: "Ice and reservoirs.")))
    greedy = summary["fine_tuned"]["greedy"]
    assert greedy["character"] == 1.0 and greedy["switching"]["on_topic"] == 1.0 and greedy["ordinary"] is None
    assert not [key for key in greedy if key.endswith("answers")] and len(json.dumps(summary)) < 2000


def test_probe_placeholders_are_filled_with_the_persona_names(tmp_path):
    probes = tmp_path / "p.jsonl"
    probes.write_text(json.dumps({"kind": "identity", "lang": "en", "probe": "Is {full_name} what I call you, or {name}?"}) + "\n")
    settings = dict(finetune.DEFAULT_SETTINGS, eval_dataset=str(probes), persona_name="Aria", persona_full_name="Aria of Northwind")
    assert finetune.load_probes(settings)[0]["probe"] == "Is Aria of Northwind what I call you, or Aria?"


def test_probe_schema_problems_are_reported(tmp_path):
    probes = tmp_path / "p.jsonl"
    probes.write_text("\n".join(json.dumps(p) for p in [
        {"kind": "identity", "lang": "en", "probe": "Who?"},
        {"kind": "drift", "lang": "en", "probe": "Who?"},  # no turns
        {"kind": "style", "lang": "en", "probe": "Why?"},  # no reference
        {"kind": "vibes", "lang": "en", "probe": "Hm?"},
    ]) + "\n")
    report = finetune.DatasetValidator().validate_probes(probes)
    assert report.line_numbers == [1]
    assert [line for line, _ in report.problems["missing key"]] == [2, 3] and report.problems["unknown kind"][0][0] == 4


def write_probes(path: Path, probes: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in probes), encoding="utf-8")
    return path


@pytest.mark.parametrize("probe,problem", [
    ({"kind": "character", "lang": "en", "probe": "How do you think?"}, ("missing key", "'key_facts'")),
    ({"kind": "ordinary", "lang": "en", "probe": "2+2?", "key_facts": []}, ("bad key_facts", "'key_facts' must be a non-empty list")),
    ({"kind": "ordinary", "lang": "en", "probe": "2+2?", "key_facts": "4"}, ("bad key_facts", "'key_facts' must be a non-empty list")),
    ({"kind": "ordinary", "lang": "en", "probe": "2+2?", "key_facts": ["4", " "]}, ("bad key_facts", "(got [\"4\", \" \"])")),
    ({"kind": "character", "lang": "en", "probe": "Who?", "key_facts": ["?!"]}, ("bad key_facts", "'key_facts' must be")),
    ({"kind": "ordinary", "lang": "en", "probe": "2+2?", "key_facts": ["4"], "persona": "Echo"}, ("unknown key", "'persona'")),
    ({"kind": "switch", "lang": "fr", "probe": "Qui ?"}, ("missing key", "'follow_ups'")),
    ({"kind": "switch", "lang": "fr", "probe": "Qui ?", "follow_ups": []}, ("bad follow_ups", "'follow_ups' must be a non-empty list")),
    ({"kind": "switch", "lang": "fr", "probe": "Qui ?", "follow_ups": ["2+2?"]}, ("bad follow_ups", "'follow_ups' must be")),
    ({"kind": "switch", "lang": "fr", "probe": "Qui ?", "follow_ups": [{"lang": "en", "probe": "2+2?", "key_facts": ["4"]},
                                                                      {"lang": "en", "probe": "3+3?"}]}, ("missing key", "follow_ups[1] 'key_facts'")),
    ({"kind": "switch", "lang": "fr", "probe": "Qui ?", "follow_ups": [{"lang": "", "probe": "2+2?", "key_facts": ["4"]}]},
     ("empty text", "follow_ups[0] 'lang' must be non-empty text")),
    ({"kind": "interview", "lang": "en", "probe": "Who are you?"}, ("missing key", "'then'")),
    ({"kind": "interview", "lang": "en", "probe": "Who are you?", "then": ["Why?", " "]}, ("empty text", "'then' must be non-empty text")),
])
def test_bad_key_facts_and_follow_ups_are_reported_on_their_line(tmp_path, probe, problem):
    good = {"kind": "ordinary", "lang": "en", "probe": "What is 2 plus 2?", "key_facts": ["4", "four"]}
    report = finetune.DatasetValidator().validate_probes(write_probes(tmp_path / "p.jsonl", [good, probe]))
    kind, detail = problem
    assert report.line_numbers == [1] and list(report.problems) == [kind], dict(report.problems)
    assert report.problems[kind][0][0] == 2 and detail in report.problems[kind][0][1], report.problems[kind]


def test_character_probes_written_for_another_persona_are_not_measured(tmp_path):
    probes = write_probes(tmp_path / "p.jsonl", [
        {"kind": "character", "lang": "en", "probe": "Where does your name come from?", "key_facts": ECHO_FACTS, "persona": "Deep Tree Echo"},
        {"kind": "character", "lang": "en", "probe": "What do you care about, {name}?", "key_facts": ["tides"]},
        {"kind": "ordinary", "lang": "en", "probe": "Who wrote {full_name}?", "key_facts": ["{name}"]}])
    settings = dict(finetune.DEFAULT_SETTINGS, eval_dataset=str(probes))
    assert [p["probe"] for p in finetune.load_probes(settings)][:2] == ["Where does your name come from?", "What do you care about, Echo?"]
    aria = finetune.load_probes(dict(settings, persona_name="Aria", persona_full_name="Aria of Northwind"))
    assert [(p["kind"], p["probe"]) for p in aria] == [("character", "What do you care about, Aria?"), ("ordinary", "Who wrote Aria of Northwind?")]
    assert aria[1]["key_facts"] == ["Aria"]  # generic probes are filled, key facts included


def test_the_persona_name_alone_is_no_character_fact(tmp_path):
    probes = write_probes(tmp_path / "p.jsonl", [{"kind": "character", "lang": "en", "probe": "Who are you, deep down?",
                                                  "key_facts": ["reservoir", "Deep-Tree Echo"]}])
    with pytest.raises(finetune.UserError, match="'Deep-Tree Echo': the persona's name alone says nothing of its character"):
        finetune.load_probes(dict(finetune.DEFAULT_SETTINGS, eval_dataset=str(probes)))


def test_the_shipped_probes_check_character_and_ordinary_ability():
    probes = finetune.load_probes(dict(finetune.DEFAULT_SETTINGS))
    kinds = collections.Counter(p["kind"] for p in probes)
    assert kinds["character"] >= 16 and kinds["ordinary"] >= 20 and kinds["switch"] >= 1 and kinds["interview"] >= 5
    ordinary_languages = collections.Counter(p["lang"] for p in probes if p["kind"] == "ordinary")
    assert ordinary_languages["en"] >= 0.75 * kinds["ordinary"] and len(ordinary_languages) >= 4
    for probe in (p for p in probes if p["kind"] == "switch"):
        assert probe["lang"] != "en" and len(probe["follow_ups"]) >= 4 and {f["lang"] for f in probe["follow_ups"]} == {"en"}


def test_evaluate_reports_every_condition_for_base_and_fine_tuned_with_reasons(tiny_model, small_probe_config):
    out, _ = tiny_model
    result = cli("--evaluate", "--model", out, "--config", small_probe_config, "--persona-name", "Aria", "--persona-full-name", "Aria")
    assert result.returncode == 0, result.stderr
    for row in ("(a) no system message", "(a) base model's own template", "(b) generic system prompt",
                "(c) after 3 unrelated exchanges", "(d) other languages", "degenerate answers", "answers in another language",
                "introduces itself when not asked"):
        assert row in result.stdout, row
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["persona"] == {"name": "Aria", "full_name": "Aria"}
    for column in ("base", "fine_tuned"):
        for decoding in ("shipped", "greedy"):
            answers = evaluation[column][decoding]["answers"]
            assert set(answers) == {"no_system", "base_template", "generic_system", "drift", "other_languages"}
            assert [len(answers[k]) for k in ("no_system", "other_languages", "drift")] == [2, 1, 1]
            for rows in answers.values():
                for row in rows:
                    assert row["reason"] and isinstance(row["adopted"], bool)
                    assert row["adopted"] == finetune.Persona("Aria", "Aria").adopts(row["answer"])
            drift = answers["drift"][0]
            assert [m["role"] for m in drift["history"]] == ["user", "assistant"] * 3 + ["user"]  # its own answers kept
            ordinary = evaluation[column][decoding]["ordinary_answers"]  # the style probe, asked as a question
            assert len(ordinary) == 1 and ordinary[0]["adopted"] == finetune.Persona("Aria", "Aria").adopts(ordinary[0]["answer"])
            assert evaluation[column][decoding]["ordinary_self_talk"] == float(ordinary[0]["adopted"])
            check_new_measures(evaluation[column][decoding], finetune.Persona("Aria", "Aria"))
    assert "character: not measured (no character probes for Aria)" in result.stdout  # the shipped ones are Echo's
    assert evaluation["fine_tuned"]["persona_loss"] != evaluation["base"]["persona_loss"]
    assert evaluation["shipped_is_plain_greedy"]  # the default folder ships plain greedy: one set of answers serves both
    assert evaluation["fine_tuned"]["greedy"] == evaluation["fine_tuned"]["shipped"]


def check_new_measures(scores: dict, persona) -> None:
    """The ordinary and switch answers of one evaluation (the small probe file's), each with its verdicts."""
    [fact] = scores["ordinary_probe_answers"]
    assert {k: v for k, v in fact.items() if k not in ("probe", "lang", "answer")} == \
        finetune.judge_ordinary(persona, fact["answer"], ["Shakespeare"], "en")
    [talk] = scores["switching_answers"]
    assert talk["probe"] == "Bonjour ! Tu es qui, toi ?" and talk["adopted"] == persona.adopts(talk["answer"])
    assert [row["probe"] for row in talk["follow_ups"]] == ["Which city is the capital of Japan?", "How many hours does a day have?"]
    assert scores["switching"]["in_language"] == finetune.share(talk["follow_ups"], "in_language")
    assert scores["ordinary"]["on_topic"] == float(fact["on_topic"])
    [interview] = scores["interview_answers"]  # the first shipped interview, cut to two questions
    assert [row["probe"] for row in interview] == ["Hi there! Who have I got here?", "Where did that name come from?"]
    assert interview[1]["repeated"] == round(finetune.repeated_share(interview[1]["answer"], [interview[0]["answer"]]), 2)
    assert scores["interview"] == {"repeats": float(interview[1]["repeats"]), "degenerate": float(interview[1]["degenerate"])}


def test_a_training_run_reports_character_ordinary_and_switch_for_its_persona(tiny_model):
    out, result = tiny_model
    for row in ("character: states a key fact", "ordinary questions (1)", "  on topic (states a key fact)",
                "  introduces itself unasked", "language switch (2 later answers)", "  later answers in their language"):
        assert row in result.stdout, row
    summary = json.loads((out / "training_summary.json").read_text())["evaluation"]["fine_tuned"]["greedy"]
    assert isinstance(summary["character"], float) and set(summary["ordinary"]) == {"on_topic", "in_language", "introduces_itself", "degenerate"}
    assert not [key for key in summary if key.endswith("answers")]


def test_the_base_scores_are_reused_only_for_the_same_base_probes_and_settings(tiny_model, small_probe_config, tmp_path):
    out, _ = tiny_model
    name = f"Zed{uuid.uuid4().hex[:8]}"  # a persona no earlier run scored the base for
    config = json.loads(small_probe_config.read_text())  # two of its probes: the cache is what is tested, twice
    probes = Path(config["evaluation"]["eval_dataset"]).read_text().splitlines(keepends=True)[:2]
    (tmp_path / "probes.jsonl").write_text("".join(probes))
    config["evaluation"]["eval_dataset"] = str(tmp_path / "probes.jsonl")
    (tmp_path / "config.json").write_text(json.dumps(config))
    runs = []
    for _ in range(2):
        result = cli("--evaluate", "--model", out, "--config", tmp_path / "config.json", "--persona-name", name, "--persona-full-name", name)
        assert result.returncode == 0, result.stderr
        runs.append((result, json.loads((out / "evaluation.json").read_text())))
    (first, fresh), (second, cached) = runs
    assert not fresh["base_from_cache"] and "from the cache" not in first.stderr
    assert cached["base_from_cache"] and "base model's scores from the cache" in second.stderr
    assert cached["base"] == fresh["base"] and "the base scores from the cache" in second.stdout


def test_a_damaged_base_score_cache_is_scored_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    base = torch.nn.Linear(2, 2)  # stands in for a base model: weights and a generation config
    base.generation_config = GenerationConfig()
    tokenizer = types.SimpleNamespace(chat_template="{{ messages }}")
    scores = {"shipped": dict.fromkeys(finetune.MEASURES), "greedy": dict.fromkeys(finetune.MEASURES), "general_perplexity": 30.0}
    calls = []

    def score():
        calls.append(1)
        return dict(scores)

    settings = dict(finetune.DEFAULT_SETTINGS, general_text=str(Path(finetune.__file__).parent / "general_text.txt"))
    args = (score, tokenizer, [], settings, None)
    assert finetune.cached_base_score(base, *args) == (scores, False) and len(calls) == 1
    [path] = (tmp_path / "echo-finetune" / "base-scores").iterdir()
    assert finetune.cached_base_score(base, *args) == (scores, True) and len(calls) == 1
    before_new_measures = {"shipped": {"adoption": {}}, "greedy": {"adoption": {}}, "general_perplexity": 30.0}  # an older tool's
    for damage in ("[]", "{not json", '{"shipped": {}}', json.dumps(before_new_measures)):
        path.write_text(damage)
        before = len(calls)
        assert finetune.cached_base_score(base, *args) == (scores, False) and len(calls) == before + 1  # scored again, not read
        assert json.loads(path.read_text()) == scores  # and the cache repaired


@pytest.mark.parametrize("options,plain", [
    ({"do_sample": False}, True),
    ({"do_sample": False, "repetition_penalty": 1.0}, True),
    ({"do_sample": False, "repetition_penalty": 1.1}, False),
    ({"do_sample": False, "no_repeat_ngram_size": 3}, False),
    ({"do_sample": True, "temperature": 0.7}, False),
])
def test_the_shipped_decoding_is_run_apart_unless_it_is_plain_greedy(options, plain):
    from transformers import GenerationConfig

    class Model:
        generation_config = GenerationConfig(**options)

    assert finetune.ships_plain_greedy(Model()) is plain


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_conversation_turn_reads_only_what_it_adds_and_answers_as_a_fresh_read(base_path, tokenizer, monkeypatch):
    settings = dict(finetune.DEFAULT_SETTINGS, device="cpu", precision="fp32", eval_max_new_tokens=10)
    model = finetune.answering(finetune.load_causal_lm(base_path), settings)
    ask = lambda question: {"role": "user", "content": question}  # noqa: E731
    talks = [[ask("What is the capital of France?")], [ask("Name a colour.")], [ask("Say hi.")]]
    kept = [None] * len(talks)
    first = finetune.generate_answers(model, tokenizer, talks, settings, kept=kept)
    assert first == finetune.generate_answers(model, tokenizer, talks, settings)
    # the next turn: the first goes on as the model answered, the second's answer was edited (its tokens are no
    # longer those kept), the third starts over (nothing kept for it), all three in one batch
    talks[0] += [{"role": "assistant", "content": first[0]}, ask("And of Spain?")]
    talks[1] += [{"role": "assistant", "content": "Blue, I think."}, ask("Another one?")]
    talks[2], kept[2] = [ask("What is two plus two?")], None
    rows = [finetune.render(tokenizer, talk, add_generation_prompt=True)["input_ids"] for talk in talks]
    assert finetune.shared_prefix(kept[0].ids, rows[0]) == len(kept[0].ids)  # the whole last turn is read no more
    assert finetune.shared_prefix(kept[1].ids, rows[1]) < len(kept[1].ids)
    built = cached_reads(monkeypatch)
    again = finetune.generate_answers(model, tokenizer, talks, settings, kept=kept)
    assert len(built) == 1 and built[0] > 0  # one batch, and it started from the kept cache
    monkeypatch.undo()
    assert again == finetune.generate_answers(model, tokenizer, talks, settings)  # the answers of a fresh read
    assert all(k.ids[: len(row)] == row for k, row in zip(kept, rows))  # kept again, for a turn after


def test_the_evaluation_shows_answers_generated_of_the_total_on_a_terminal_only(monkeypatch, tmp_path, base_path, tokenizer,
                                                                              small_probe_config):
    (tmp_path / "general.txt").write_text("The tide comes in twice a day. " * 4)
    settings, _ = finetune.load_settings(str(small_probe_config), {})
    settings.update(device="cpu", precision="fp32", eval_batch_size=2, general_text=str(tmp_path / "general.txt"))
    model = finetune.answering(finetune.load_causal_lm(base_path), settings)  # the real base: batches of 2, redrawn as each ends
    for stream in (Terminal(), io.StringIO()):
        monkeypatch.setattr(sys, "stderr", stream)
        finetune.evaluate_persona(model, tokenizer, settings, None)
        shown = stream.getvalue()
        if stream.isatty():
            counts = re.findall(r"evaluating: +\d+%\|[^|]*\| (\d+)/(\d+) \[\d\d:\d\d<\d\d:\d\d", shown)  # with the time left
            assert counts and counts[-1][0] == counts[-1][1] and len(counts) > 2, shown  # redrawn as batches end, up to the total
        else:
            assert "evaluating on" in shown and "\r" not in shown and "|" not in shown  # the log line, and nothing bar-like
