# The two front-door commands: `make run` and `make test`. Both install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DATASET ?= beauty
SEED ?= 0

.PHONY: install system-deps run test bench-quality bench-quality-seeds train-beauty train-scientific eval clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build: otherwise a dependency pulls the multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[train,serve,cpu,dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# redis-server backs the history-store tests (and the local Redis Cluster); promtool checks the Prometheus
# config and the dashboard's queries; haproxy fronts the scale-out processes; chromium + chromedriver
# drive the demo page's browser test.
system-deps:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	@command -v promtool >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus)
	@command -v haproxy >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends haproxy)
	@command -v chromedriver >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver)

# Serves on 127.0.0.1:8000 with the in-process history store; builds the Beauty demo bundle first if models/ has none.
# The demo page (http://127.0.0.1:8000/) offers Beauty's users: set GENREC_DEMO_USERS_FILE for another dataset.
run: $(STAMP)
	$(BIN)/genrec demo-bundle
	GENREC_HOST=$${GENREC_HOST:-127.0.0.1} GENREC_DEMO_USERS_FILE=$${GENREC_DEMO_USERS_FILE:-data/beauty/sequential_data.txt} \
	  $(BIN)/python -m service

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

# One row of the results table: embeddings, tokenizer, recommender, evaluation, export; ends with a JSON line.
# Without CONFIG it runs the best configuration for DATASET (training/configs.py BEST_CONFIG).
bench-quality: $(STAMP)
	$(BIN)/genrec pipeline --dataset $(DATASET) $(if $(CONFIG),--config $(CONFIG),) --seed $(SEED)

# The best configuration for DATASET over seeds 0, 1, 2 side by side (cores split): mean and spread.
bench-quality-seeds: $(STAMP)
	$(BIN)/genrec seeds --dataset $(DATASET) $(if $(CONFIG),--config $(CONFIG),)

# The full TIGER-style model on Beauty / Scientific; prints the validation and test table.
train-beauty: $(STAMP)
	$(BIN)/genrec pipeline --config beauty-tiger --seed $(SEED)

train-scientific: $(STAMP)
	$(BIN)/genrec pipeline --config scientific-tiger --seed $(SEED)

eval: $(STAMP)
	$(BIN)/genrec eval --bundle $(BUNDLE)

# The training curve and the tokenizer's code usage of BUNDLE as PNGs inside it (docs/plot_bundle.py).
.PHONY: plots
plots: $(STAMP)
	@test -n "$(BUNDLE)" || { echo "usage: make plots BUNDLE=models/<name>/<version>"; exit 2; }
	$(BIN)/python docs/plot_bundle.py $(BUNDLE)

clean:
	rm -rf $(VENV) .cache runs

# Training throughput side by side: one pass per sequence vs one pair per sample, bf16 vs fp32, sizes.
.PHONY: bench-training
bench-training: $(STAMP)
	$(BIN)/python benchmarks/bench_training.py

# Serving benchmark: engine vs the usual way, end-to-end goodput (req/s served with p99 <= 50 ms through
# HTTP + Redis) and the micro-batcher sweep that chooses by it, trie scaling, compute bound.
# Ends with one JSON line. QUICK=1 runs in about 90 s (no sweep, no 10M catalog); BUNDLE=dir picks the
# bundle; PROVIDERS=cuda times only the engine and the usual way, on the GPU (needs the gpu extra).
.PHONY: bench-serving
bench-serving: $(STAMP)
	$(BIN)/python benchmarks/bench_serving.py $(if $(QUICK),--quick,) $(if $(BUNDLE),--bundle $(BUNDLE),) $(if $(PROVIDERS),--providers $(PROVIDERS),)

# Study: does a wider beam find better items? BUNDLE's model on 4000 test users at beams 10, 20, 50.
.PHONY: bench-beam-sensitivity
bench-beam-sensitivity: $(STAMP)
	@test -n "$(BUNDLE)" || { echo "usage: make bench-beam-sensitivity BUNDLE=models/<name>/<version>"; exit 2; }
	$(BIN)/python benchmarks/beam_sensitivity.py --bundle $(BUNDLE)

# Study: how much should the item head count? BUNDLE's beam re-ranked by codes + w * item head, w = 0 to 4.
.PHONY: bench-item-head-weight
bench-item-head-weight: $(STAMP)
	@test -n "$(BUNDLE)" || { echo "usage: make bench-item-head-weight BUNDLE=models/<name>/<version>"; exit 2; }
	$(BIN)/python benchmarks/item_head_weight.py --bundle $(BUNDLE)

# Study: with the ranking loss's temperature (model.code_loss_temperature), decode with logits / tau or not.
.PHONY: bench-decode-temperature
bench-decode-temperature: $(STAMP)
	@test -n "$(BUNDLE)" || { echo "usage: make bench-decode-temperature BUNDLE=models/<name>/<version>"; exit 2; }
	$(BIN)/python benchmarks/decode_temperature.py --bundle $(BUNDLE)

# Scale-out on one host: 1 and 2 service processes behind haproxy (deploy/scaleout.py) sharing one Redis,
# side by side: req/s and p99 (closed loop, SECONDS each, then open loop at the same rate), the scaling
# efficiency. About 3 x (SECONDS + 10) s plus start-ups. Ends with one JSON line. BUNDLE=dir picks the bundle.
.PHONY: bench-scaleout
bench-scaleout: $(STAMP) system-deps
	$(BIN)/python benchmarks/bench_scaleout.py --seconds $(or $(SECONDS),20) $(if $(BUNDLE),--bundle $(BUNDLE),)

# Reliability under faults, on loopback: 2x-peak overload (old vs new admission policy side by side), Redis
# SIGKILL/SIGSTOP under events + recommends, SIGTERM under load, a soak (SOAK seconds, default 180). Ends with
# one JSON line. BUNDLE=dir picks the bundle (default: newest under models/, else a synthetic one is built);
# CLIENT_CPUS=N gives the load generator and Redis N CPUs of their own and the service the rest.
.PHONY: bench-reliability
bench-reliability: $(STAMP) system-deps
	$(BIN)/python benchmarks/bench_reliability.py $(if $(BUNDLE),--bundle $(BUNDLE),) $(if $(SOAK),--soak-seconds $(SOAK),) \
		$(if $(CLIENT_CPUS),--client-cpus $(CLIENT_CPUS),)

# Catalog updates on loopback (benchmarks/catalog_updates.py): a new-item-split bundle served without its held-out
# items, 100 of them PUT through /items under open-loop load at 50% of peak (time to recommendable p50/p99, failed
# requests), then all of them, and R@10/N@10 of users whose target is one, against the bundle with them built in.
# Ends with one JSON line. BUNDLE=dir picks the bundle (default: newest one trained by `genrec new-items`).
.PHONY: bench-catalog
bench-catalog: $(STAMP) system-deps
	$(BIN)/python benchmarks/catalog_updates.py $(if $(BUNDLE),--bundle $(BUNDLE),)

# Per-request constraints and model reload on loopback: open loop at 50% of peak without a constraint, with one
# shared filter and with a distinct exclude list per request (p50/p99, throughput, each kind's peak), then
# 3 POST /admin/reload under the same load (failed requests, target 0). About 3 min. Ends with one JSON line.
# BUNDLE=dir picks the bundle (default: newest under models/, else a synthetic serving-sized one is built).
.PHONY: bench-constraints
bench-constraints: $(STAMP) system-deps
	$(BIN)/python benchmarks/bench_constraints.py $(if $(BUNDLE),--bundle $(BUNDLE),) $(if $(SECONDS),--seconds $(SECONDS),)
