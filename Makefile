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

.PHONY: run test check lint lock breaking api-baseline proto bench system-deps example-deps examples \
  go-example java-example clean

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

# Debian packages the Go and Java examples build with, offline: Go, grpc-go, protobuf-go and
# genproto as sources for the Go module's vendor/ (examples/go/debian-vendor.sh), the protoc
# plugins examples/buf.gen.yaml runs, protoc for its Java output, and a JDK with grpc-java 1.41,
# protobuf-java and what they need at run time (netty, perfmark, gson, javax.annotation).
EXAMPLE_DEBS := golang-go golang-google-grpc-dev golang-google-protobuf-dev \
  golang-github-golang-protobuf-1-5-dev golang-google-genproto-dev protoc-gen-go protoc-gen-go-grpc \
  protobuf-compiler protobuf-compiler-grpc-java-plugin \
  default-jdk-headless libgrpc-java libprotobuf-java libnetty-java libperfmark-java \
  libgoogle-gson-java libgeronimo-annotation-1.3-spec-java
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

# The quick loop, under 3 minutes on 2 cores: lint, every unit test, and the API end to end
# (tests/conftest.py QUICK_END_TO_END), on both cores; nothing needs root or Debian's packages
# (a test that would is skipped, one summary line per tool). Stops at the first failure.
check: $(STAMP) node_modules/.installed examples/node/node_modules/.installed
	node_modules/.bin/buf lint
	$(BIN)/ruff check service emulator tests bench examples
	$(BIN)/ruff format --check service emulator tests bench examples
	$(BIN)/mypy
	FLEXWEBCHAT_CHECK=1 $(BIN)/python -m pytest -x -q -n 2 -rs

# buf (proto lint) comes from the npm registry, pinned in package-lock.json.
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

lint: $(STAMP) node_modules/.installed breaking
	node_modules/.bin/buf lint
	$(BIN)/ruff check service emulator tests bench examples
	$(BIN)/ruff format --check service emulator tests bench examples
	$(BIN)/mypy

# requirements.lock: every package the image installs, pinned with its hashes (the runtime
# dependencies, the otel extra and the build backend), resolved for the image's Python (3.11)
# from the package index alone: this machine's pip configuration (local wheel folders, extra
# indexes) is left out, so the hashes are those of the files the image build downloads. Run it
# after changing a dependency in pyproject.toml; tests/test_lock.py fails until then. Versions
# already locked are kept when they still fit; `make lock UPGRADE=1` takes the newest.
LOCK := requirements.lock
lock: $(STAMP)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
	  echo "make lock resolves for the image's Python 3.11: make clean && make lock PYTHON=python3.11" >&2; \
	  exit 1; }
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
	  CUSTOM_COMPILE_COMMAND="make lock" \
	  $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --extra otel \
	  --all-build-deps --no-emit-index-url $(if $(UPGRADE),--upgrade) --output-file $(LOCK) pyproject.toml

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

# The Node.js, Go and Java callers in examples/, which tests/test_examples.py runs against the
# facade. Each is built again only when its sources change.
examples: examples/node/node_modules/.installed go-example java-example

examples/node/node_modules/.installed: examples/node/package.json examples/node/package-lock.json
	cd examples/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Go and Java code from examples/buf.gen.yaml, generated as a caller would. Debian names the Java
# plugin grpc_java_plugin; callers elsewhere have it as protoc-gen-grpc-java.
GEN := .build/gen
SERVICE_CONFIG := generated/flexwebchat/v1/service_config.json
$(GEN)/.generated: $(PROTO) examples/buf.gen.yaml node_modules/.installed | example-deps
	rm -rf $(GEN) && mkdir -p $(GEN)/bin
	ln -s /usr/bin/grpc_java_plugin $(GEN)/bin/protoc-gen-grpc-java
	PATH=$(CURDIR)/$(GEN)/bin:$$PATH node_modules/.bin/buf generate --template examples/buf.gen.yaml -o $(GEN)
	touch $@

# The Go example as a module (examples/go/go.mod), its service config built in, its vendor/
# made from Debian's packages: nothing is downloaded.
GO_BUILD := .build/go
go-example: $(GO_BUILD)/create-webchat
$(GO_BUILD)/create-webchat: examples/go/main.go examples/go/go.mod examples/go/debian-vendor.sh \
    $(SERVICE_CONFIG) $(GEN)/.generated
	rm -rf $(GO_BUILD) && mkdir -p $(GO_BUILD)/gen
	cp examples/go/main.go examples/go/go.mod $(SERVICE_CONFIG) $(GO_BUILD)/
	cp -r $(GEN)/gen/go $(GO_BUILD)/gen/
	examples/go/debian-vendor.sh $(GO_BUILD)
	cd $(GO_BUILD) && GOFLAGS=-mod=vendor GOPROXY=off go build -o create-webchat .

# The Java example, compiled once with javac against Debian's jars (grpc-java 1.41). Debian's
# proto-google-common-protos (1.16) has no com.google.rpc.ErrorInfo, so google/rpc's messages
# are generated here from the protos googleapis-common-protos ships, with Debian's protoc.
# $(JAVA_BUILD)/classpath is what runs it: java -cp "$$(cat .build/java/classpath)" CreateWebChat
JAVA_BUILD := .build/java
JAVA_JARS  := grpc-api grpc-context grpc-core grpc-netty grpc-protobuf grpc-protobuf-lite grpc-stub \
  protobuf protobuf-util guava gson perfmark-api geronimo-annotation-1.3-spec netty-buffer \
  netty-codec netty-codec-http netty-codec-http2 netty-codec-socks netty-common netty-handler \
  netty-handler-proxy netty-resolver netty-transport
java-example: $(JAVA_BUILD)/classpath
$(JAVA_BUILD)/classpath: examples/java/CreateWebChat.java $(SERVICE_CONFIG) $(GEN)/.generated $(STAMP)
	rm -rf $(JAVA_BUILD) && mkdir -p $(JAVA_BUILD)/rpc $(JAVA_BUILD)/classes/flexwebchat/v1
	protoc -I$$($(BIN)/python -c 'import pathlib, google.rpc.status_pb2 as m; print(pathlib.Path(m.__file__).parents[2])') \
	  -I/usr/include --java_out=$(JAVA_BUILD)/rpc google/rpc/status.proto google/rpc/error_details.proto
	javac -d $(JAVA_BUILD)/classes \
	  -cp $(subst $(eval) ,:,$(JAVA_JARS:%=/usr/share/java/%.jar)) \
	  $$(find $(GEN)/gen/java $(JAVA_BUILD)/rpc -name '*.java') examples/java/CreateWebChat.java
	cp $(SERVICE_CONFIG) $(JAVA_BUILD)/classes/flexwebchat/v1/
	echo "$(CURDIR)/$(JAVA_BUILD)/classes:$(subst $(eval) ,:,$(JAVA_JARS:%=/usr/share/java/%.jar))" >$@

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
