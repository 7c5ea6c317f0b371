# The contract for setting up, generating, running and testing the facade.
# Every target works from a fresh clone: the first one run creates .venv.
# Python 3.11 to 3.13. PYTHON=... chooses one; else the first of these that is at least 3.11.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for py in python3 python3.13 python3.12 python3.11; do \
  $$py -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$py; break; }; done)
endif
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTO  := proto/flexwebchat/v1/webchat.proto

.PHONY: run test lint breaking api-baseline proto bench system-deps example-deps examples go-example clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "flexwebchat needs Python 3.11 or newer (3.11 to 3.13 are tested), and" \
	    "$(if $(PYTHON),'$(PYTHON)' is not one,none was found on PATH):" \
	    "install one (Debian: apt-get install python3; or pyenv install 3.13)," \
	    "or name it with 'make PYTHON=/path/to/python3.x'" >&2; exit 1; }
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

# Debian packages the Go example builds with, offline: Go, grpc-go, protobuf-go and genproto as
# GOPATH sources, the protoc plugins examples/buf.gen.yaml runs, and protoc for its Java output.
EXAMPLE_DEBS := golang-go golang-google-grpc-dev golang-google-protobuf-dev \
  golang-github-golang-protobuf-1-5-dev golang-google-genproto-dev protoc-gen-go protoc-gen-go-grpc \
  protobuf-compiler protobuf-compiler-grpc-java-plugin
example-deps:
	@missing=$$(for deb in $(EXAMPLE_DEBS); do \
	  dpkg-query -W -f='$${Status}\n' $$deb 2>/dev/null | grep -q ' installed' || echo $$deb; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "missing Debian packages: run 'sudo apt-get install" $$missing"'" >&2; exit 1; fi; fi

# Regenerates the committed Python code from the proto: messages, gRPC stubs, and typed .pyi
# for both (the gRPC one by mypy-protobuf). tests/test_generated_code.py runs this target.
GENERATED ?= generated
# Messages come from protoc 33.5 (pinned), whose gencode runs on protobuf 6.33.5 and later, so the
# flexwebchat-client package built from generated/ serves callers on protobuf 6 or 7.
proto: $(STAMP)
	$(BIN)/protoc -Iproto -I$(VENV)/include --python_out=$(GENERATED) --pyi_out=$(GENERATED) $(PROTO)
	$(BIN)/python -m grpc_tools.protoc -Iproto --grpc_python_out=$(GENERATED) \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$(GENERATED) $(PROTO)

# Runs the facade. Without Twilio credentials it runs against the bundled emulator, and says so.
run: $(STAMP)
	$(BIN)/python -m emulator.devrun

test: $(STAMP) system-deps node_modules/.installed examples
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

# The Node.js and Go callers in examples/, which tests/test_examples.py runs against the facade.
examples: examples/node/node_modules/.installed go-example

examples/node/node_modules/.installed: examples/node/package.json examples/node/package-lock.json
	cd examples/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Generates Go (and Java) code with examples/buf.gen.yaml, as a caller would, and builds the Go
# example in GOPATH mode from Debian's packages: nothing is downloaded. Debian names the Java
# plugin grpc_java_plugin; callers elsewhere have it as protoc-gen-grpc-java.
GO_BUILD := $(CURDIR)/.build/go
GO_PKG   := $(GO_BUILD)/src/example.com/flexwebchat/examples/go
go-example: node_modules/.installed example-deps
	rm -rf $(GO_BUILD) && mkdir -p $(GO_BUILD)/bin $(GO_PKG)
	ln -s /usr/bin/grpc_java_plugin $(GO_BUILD)/bin/protoc-gen-grpc-java
	PATH=$(GO_BUILD)/bin:$$PATH node_modules/.bin/buf generate --template examples/buf.gen.yaml -o $(GO_PKG)
	cp examples/go/main.go $(GO_PKG)/
	cd $(GO_PKG) && GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH=$(GO_BUILD):/usr/share/gocode \
	  go build -o $(GO_BUILD)/create-webchat .

# The benchmark runs the facade as the image does: the package installed with its runtime
# dependencies only (editable, so it is this checkout's code), none of the dev tools. In .venv,
# cryptography (a test tool) alone would add 10 MB to the facade's RSS: PyJWT loads it if present.
RUNTIME       := .venv-runtime
RUNTIME_STAMP := $(RUNTIME)/.installed
$(RUNTIME_STAMP): pyproject.toml $(STAMP)
	rm -rf $(RUNTIME)
	$(PYTHON) -m venv $(RUNTIME)
	$(RUNTIME)/bin/pip install -q -e .
	touch $@

bench: $(STAMP) $(RUNTIME_STAMP) system-deps
	FLEXWEBCHAT_FACADE_PYTHON=$(RUNTIME)/bin/python $(BIN)/python -m bench --json bench/results.json

clean:
	rm -rf $(VENV) $(RUNTIME) node_modules examples/node/node_modules .build .pytest_cache .mypy_cache .ruff_cache .hypothesis
