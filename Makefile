# The contract for setting up, generating, running and testing the facade.
# Every target works from a fresh clone: the first one run creates .venv.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTO  := proto/flexwebchat/v1/webchat.proto

.PHONY: run test lint breaking api-baseline proto bench system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Debian packages the tests use: real Redis; podman, runc and debootstrap to build and run the
# image (tests/test_image.py); promtool (package prometheus) to check the alert rules. Installs
# only what is missing.
DEBIAN_DEPS := redis-server:redis-server podman:podman runc:runc debootstrap:debootstrap \
               promtool:prometheus
system-deps:
	@missing=""; for dep in $(DEBIAN_DEPS); do \
	  command -v $${dep%%:*} >/dev/null || PATH="$$PATH:/usr/sbin:/sbin" command -v $${dep%%:*} >/dev/null \
	    || missing="$$missing $${dep#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages: run 'sudo apt-get install$$missing'" >&2; exit 1; fi; fi

# Regenerates the committed Python code from the proto: messages, gRPC stubs, and typed .pyi
# for both (the gRPC one by mypy-protobuf). tests/test_generated_code.py runs this target.
GENERATED ?= generated
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=$(GENERATED) --pyi_out=$(GENERATED) \
	  --grpc_python_out=$(GENERATED) --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	  --mypy_grpc_out=$(GENERATED) $(PROTO)

# Runs the facade. Without Twilio credentials it runs against the bundled emulator, and says so.
run: $(STAMP)
	$(BIN)/python -m emulator.devrun

test: $(STAMP) system-deps node_modules/.installed
	$(BIN)/python -m pytest

# buf (proto lint) comes from the npm registry, pinned in package-lock.json.
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

lint: $(STAMP) node_modules/.installed breaking
	node_modules/.bin/buf lint
	$(BIN)/ruff check service emulator tests bench examples
	$(BIN)/ruff format --check service emulator tests bench examples
	$(BIN)/mypy

# The breaking-change gate: the proto must stay compatible with the last released API, the
# committed buf image $(BASELINE), by buf's FILE rules (callers' generated code keeps compiling).
# API= points it at another checkout of buf.yaml + proto/ (tests/test_breaking.py does).
BASELINE := api-baseline.binpb
API      ?= .
breaking: node_modules/.installed
	node_modules/.bin/buf breaking $(API) --against $(API)/$(BASELINE)

# Run at release time: the released proto becomes the baseline the next changes are held to.
api-baseline: node_modules/.installed
	node_modules/.bin/buf build --exclude-source-info -o $(BASELINE)

bench: $(STAMP) system-deps
	$(BIN)/python -m bench --json bench/results.json

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis
