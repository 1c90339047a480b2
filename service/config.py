"""Every knob of the online service, in one typed place (env prefix `GENREC_`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENREC_", extra="ignore")

    # Bundle to serve, a `models/<name>/<version>` dir; unset -> newest bundle under models_root.
    bundle_dir: Path | None = None
    # Where to look for bundles when bundle_dir is unset (scans <models_root>/*/*/manifest.json).
    models_root: Path = Path("models")
    # Interface to bind; all interfaces by default because the service runs in a container.
    host: str = "0.0.0.0"
    # TCP port to listen on.
    port: int = Field(8000, ge=1, le=65535)
    # Redis URL for user histories (redis://host:6379/0); unset -> in-process store.
    redis_url: str | None = None
    # redis_url names one node of a Redis Cluster (any node: the client discovers the rest and follows
    # slot moves); a user's keys carry the user id as hash tag, so they live on one slot.
    redis_cluster: bool = False
    # Per-operation Redis timeout; a slow store must not eat the latency budget.
    redis_timeout_ms: float = Field(50.0, gt=0)
    # A user's stored history expires this long after their last event.
    history_ttl_s: int = Field(30 * 24 * 3600, ge=1)
    # History items fed to the model; unset -> the bundle's max_history (never more than it).
    max_history: int | None = Field(None, ge=1)
    # A micro-batch closes when it has this many requests...
    max_batch_size: int = Field(8, ge=1)
    # ...or when its first request has waited this long. Defaults (batches of 8, a 2 ms window, 2 engine
    # workers): on 2 CPU cores they served the most req/s within a 50 ms p99 and met every serving
    # target in the latest fixed-setting runs (docs/results.md). A GPU wants far larger batches: up to
    # batch 64 a call there costs about the same whatever its size.
    max_wait_ms: float = Field(2.0, ge=0)
    # A batch closes before max_wait_ms when nothing is queued, no request is reading its history and
    # another engine worker is free: waiting then only adds latency (p50 at 30% of peak 10.7 against
    # 11.8 ms on 2 cores). On the last free worker the window always runs, so bursts fill batches.
    close_when_none_coming: bool = True
    # Requests waiting for the engine beyond this many -> 429.
    max_queue_size: int = Field(256, ge=1)
    # Deadline per request from arrival; past it -> 503.
    request_timeout_ms: float = Field(1000.0, gt=0)
    # Larger request bodies -> 413.
    max_body_bytes: int = Field(64 * 1024, ge=256)
    # "auto" (CUDA if onnxruntime has it, else CPU) or a comma list such as "cpu" or "cuda,cpu".
    onnx_providers: str = "auto"
    # Micro-batches computed at once, one engine thread each; the next batch starts while one runs.
    engine_workers: int = Field(2, ge=1)
    # Nice value added to the engine worker threads (Linux): the event loop, which reads requests,
    # Redis replies and sends answers, then never waits behind a computing batch. 0 -> same priority.
    engine_nice: int = Field(10, ge=0, le=19)
    # Pin engine worker i to the i-th CPU this process may use (Linux). Unset: pin when the process
    # may use no more CPUs than there are engine workers (a small machine or a cpuset of its own);
    # on a large host shared through a CPU quota the scheduler places the threads better.
    pin_engine_threads: bool | None = None
    # How long the event loop may hold the GIL while an engine thread waits for it (Python's switch
    # interval, 5 ms by default): a batch needs the GIL to start and to hand back its result.
    gil_switch_interval_ms: float = Field(1.0, gt=0)
    # onnxruntime intra-op threads per batch; 0 -> one per CPU, for every worker (engine_threads, below).
    intra_op_threads: int = Field(0, ge=0)
    # Threads of a batch that starts while another batch is computing (CPU, more than one worker):
    # overlapping batches split the cores instead of contending for all of them. 0 -> intra_op_threads.
    busy_intra_op_threads: int = Field(1, ge=0)
    # One log line per HTTP request; off by default because /metrics already counts requests and
    # formatting the line costs CPU the engine needs on small machines.
    access_log: bool = False
    # "graph": the exported one-call beam search; "reference": the plain numpy twin (slow, for checks).
    engine: Literal["graph", "reference"] = "graph"
    # Seconds the batcher may take to finish queued work on shutdown.
    drain_timeout_s: float = Field(10.0, ge=0)
    # The demo page at GET / and its read-only helpers under /demo (service/routes/demo.py).
    demo_page: bool = True
    # A dataset's sequences file (`user_id item_id item_id ...` per line, e.g. data/beauty/sequential_data.txt):
    # the demo page offers its users, each with a held-out last item. Unset: items typed in only.
    demo_users_file: Path | None = None

    # --- overload: admission by expected latency --------------------------------------------------
    # A /recommend whose expected latency from joining the queue to its answer (the batches ahead of it
    # x the measured batch time, service/admission.py) passes this budget gets 429 at once instead of
    # waiting past it. 0 -> off (then only max_queue_size and request_timeout_ms bound the wait).
    latency_budget_ms: float = Field(50.0, ge=0)
    # With a budget, batches close at fewer than max_batch_size requests while a full batch takes more than
    # 40% of the budget (service/admission.py). Off by default: on 2 CPU cores at 2x peak it lowered
    # goodput without a steadier p99 (docs/results.md, bench-reliability).
    adaptive_batch_size: bool = False

    # --- shutdown ---------------------------------------------------------------------------------
    # On SIGTERM /health/ready answers 503 at once and the service keeps serving this many seconds, so
    # a load balancer polling readiness takes it out before the port closes; then it stops accepting,
    # answers what is in flight, flushes the event spool and exits. A second SIGTERM/SIGINT skips the wait.
    drain_seconds: float = Field(5.0, ge=0)

    # --- events: durability and idempotency -------------------------------------------------------
    # Append-only file that holds acknowledged events while Redis is unreachable (fsynced before the
    # answer), replayed into Redis in order when it is back. Used only with redis_url.
    event_spool_path: Path = Path("spool/events.jsonl")
    # The spool's size limit; beyond it an event write that cannot reach Redis gets 503.
    event_spool_max_bytes: int = Field(64 * 1024 * 1024, ge=4096)
    # Event ids remembered per user (Redis list beside the history, same ttl): a retry with the same
    # event_id / Idempotency-Key within the user's last this-many events is acknowledged, not re-applied.
    idempotency_window: int = Field(128, ge=1)

    # --- catalog changes (PUT/DELETE /items) ------------------------------------------------------
    # Without redis_url, catalog changes are kept in <catalog_state_dir>/catalog/<bundle>/<version>.jsonl
    # (never inside the bundle, which may be read-only); with Redis they live there, shared by replicas.
    catalog_state_dir: Path = Path("state")
    # How often a replica checks the shared catalog's version in Redis and re-applies other replicas' changes.
    catalog_poll_s: float = Field(1.0, gt=0)

    # --- clients ----------------------------------------------------------------------------------
    # API keys accepted in the X-API-Key header on /recommend and /users/{id}/events, comma-separated;
    # with api_keys_file (one key per line) both count. None configured -> those routes are open
    # (a warning is logged at startup). Health, /info and /metrics stay open for probes and scrapers.
    api_keys: str = ""
    api_keys_file: Path | None = None
    # Bearer token for the admin routes (catalog changes, model reload): `Authorization: Bearer <token>`.
    # Empty -> the admin routes are off (404), so a deployment without a token exposes none of them.
    admin_token: str = ""
    # Origins allowed by CORS (comma-separated, or "*"); empty -> no CORS headers (browsers on other
    # origins are refused by the browser).
    cors_origins: str = ""
    # Per-client token bucket on /recommend and /users/{id}/events, keyed by API key, else by client
    # address: this many requests per second sustained, bursts up to client_burst. 0 -> no limit.
    client_rate_per_s: float = Field(0.0, ge=0)
    client_burst: int = Field(50, ge=1)
    # A request whose header block is larger gets 431 and the connection is closed.
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    # A request's headers must arrive within this many seconds (from the connection's opening for its
    # first request, from the first byte for later ones), and then its body within as many again;
    # else 408 and the connection is closed (a connection that sent nothing is just closed).
    request_read_timeout_s: float = Field(10.0, gt=0)
    # An idle keep-alive connection is closed after this many seconds.
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    # Open connections (and tasks) beyond this many are answered 503 by the server.
    max_connections: int = Field(1000, ge=1)

    def resolved_bundle_dir(self) -> Path:
        """bundle_dir if set, else the newest bundle under models_root."""
        if self.bundle_dir is not None:
            return self.bundle_dir
        return find_newest_bundle(self.models_root)


def engine_threads(intra_op_threads: int, cores: int) -> int:
    """onnxruntime threads of an engine call that computes alone: `intra_op_threads` when set, else
    every core. Such a batch (the other worker's requests are between answer and next request, or
    the load is light) then uses every core instead of one: on 2 cores, 2 workers of batch 8,
    closed-loop throughput at one round of batches in flight 95% of the best, so the knee stays there
    (share outside the engine 0.18), against 87% with the workers splitting the cores (knee at 1.5
    rounds, share 0.37). A batch that starts while another computes takes busy_intra_op_threads
    instead (OnnxBeamEngine's second session)."""
    return intra_op_threads or cores


def find_newest_bundle(models_root: Path) -> Path:
    """Newest `<name>/<version>` by manifest created_at, then version string (timestamps sort)."""
    candidates: list[tuple[str, str, Path]] = []
    for manifest_path in Path(models_root).glob("*/*/manifest.json"):
        try:
            created_at = str(json.loads(manifest_path.read_text()).get("created_at", ""))
        except (OSError, ValueError):
            created_at = ""  # unreadable manifests still count; load_bundle will say what is wrong
        candidates.append((created_at, manifest_path.parent.name, manifest_path.parent))
    if not candidates:
        raise FileNotFoundError(
            f"no bundle found under {Path(models_root).resolve()} (expected <name>/<version>/manifest.json); "
            "set GENREC_BUNDLE_DIR or GENREC_MODELS_ROOT"
        )
    return max(candidates)[2]
