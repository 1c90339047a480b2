#!/usr/bin/env python3
"""Render docs/results.md from docs/results_records.jsonl. Standard library only.

    python docs/render_results.py           # write docs/results.md
    python docs/render_results.py --check   # exit 1 if docs/results.md is not what the records render

One JSON object per line, one results row each:
    table    which table below (TABLES)              method   what was run (the row's label)
    metrics  {column: value}, values as strings      dataset, config, seeds, wall, note: optional
    machine, date (YYYY-MM-DD), command: required for every measured row
    source: instead of machine/date/command, only in the "published" table (figures not run here)
To add a result, append its record and rerun this script; results.md is never edited by hand.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORDS = HERE / "results_records.jsonl"
OUTPUT = HERE / "results.md"

# (id, title, one sentence on what the table measures, layout). "rows": one line per record;
# "figures": one line per figure, one column per record (serving benchmarks: one run each).
TABLES: list[tuple[str, str, str, str]] = [
    ("quality", "Quality on the test split",
     "Amazon Beauty 2014 5-core and Amazon 2018 Scientific, leave-one-out, full ranking over the whole catalog, "
     "history ≤ 20, constrained beam search with beam 20, Recall@K = HR@K, checkpoint chosen on validation NDCG@10; "
     "where three seeds ran side by side the figures are mean ± std. Every row here but the last predates renormalized "
     "decoding (see below) and used raw code log-probabilities.", "rows"),
    ("letter_ablation", "LETTER ablation on Scientific",
     "Amazon 2018 Scientific, the same split and protocol as above, every row the same recommender (d 128, 4 + 4 "
     "layers, ranked by the codes alone unless a row adds the item head) for the same 10 epochs (validation every 5 on "
     "2,000 users); "
     "the tokenizer is what changes: RQ-VAE 3 x 256 on text embeddings (TIGER), LETTER's collaborative (alpha) and "
     "diversity (beta) losses with a Sinkhorn-balanced last level, and the ranking loss's temperature tau. "
     "Collisions: items sharing all three raw codes before the collision level; first-code cosine: mean SASRec "
     "cosine of items sharing a first code (any two items: .2152). Floors and SASRec on the same split beside them.",
     "rows"),
    ("letter_beauty", "LETTER against the TIGER baseline on Beauty",
     "Amazon Beauty 2014 5-core, the quality table's split and protocol, every row the same recommender (d 128, "
     "4 + 4 layers, batch 256, ranked by the codes alone) for the same 10 epochs (validation every 5 on 2,000 users, "
     "the checkpoint chosen on it), three seeds side by side; only the tokenizer changes, as in the Scientific "
     "ablation above, tau .7 taken from Scientific's validation sweep. A short schedule for Beauty (validation was "
     "still rising at epoch 10), so the absolute figures sit far below the 85-minute default's; the comparison is at "
     "equal epochs. Test by target popularity: R@10 for targets with <= 5, 6-20 and > 20 training interactions.",
     "rows"),
    ("etegrec", "ETEGRec ablation on Scientific",
     "Amazon 2018 Scientific, the same split and protocol as above, every row the same recommender (d 128, 4 + 4 "
     "layers, ranked by the codes alone unless a row adds the item head) for the same 10 epochs (13 where the row "
     "says so: the control's recommender then trains all 13, ETEGRec's 10 of them), validation every 5 on 2,000 users, "
     "the checkpoint chosen on it; seed 0 unless the row has three. The tokenizer: RQ-VAE 3 x 256 (32-d latent) pre-trained on SASRec's item table; "
     "ETEGRec trains it on with the recommender: 2 warm-up epochs (recommender alone), 6 alternating epochs (tokenizer "
     "epoch: tokenizer loss + SIA + PSA, recommender frozen, codes re-encoded after it; recommender epoch: code loss + "
     "SIA + PSA, tokenizer frozen), then fine-tuning (code loss only); SIA 1e-4, PSA 3e-4, tokenizer lr 1e-4 "
     "(the paper's). Unconstrained: the same model decoded without the trie, as the released code evaluates "
     "(a generated tuple that is no item is a miss). Recoded: items whose codes joint training changed.",
     "rows"),
    ("etegrec_beauty", "ETEGRec against the frozen control on Beauty",
     "Amazon 2014 Beauty, the same split and protocol as the quality table, every row the same recommender (d 128, "
     "4 + 4 layers, ranked by the codes alone) for 13 epochs (ETEGRec's recommender steps in 10 of them: 2 warm-up, "
     "3 of the 6 alternating, 5 fine-tuning), validation every 5 on 2,000 users, the checkpoint chosen on it; the "
     "tokenizer: RQ-VAE 3 x 256 pre-trained on SASRec's item table (one SASRec table, seed 0, for every row), collision "
     "level of 64. ETEGRec as in the Scientific table (SIA 1e-4, PSA 3e-4, the paper's sign). LETTER's 3-seed row "
     "(10 epochs) is in the LETTER table.",
     "rows"),
    ("store_warm", "STORE's tasks on the warm split (Scientific, Beauty)",
     "Amazon 2018 Scientific and Amazon 2014 Beauty, the leave-one-out split and protocol above; one STORE model (d 128, 4 + 4 layers, one "
     "vocabulary of WordPiece + task markers + codes; RQ-KMeans 3 x 256 codes of the MiniLM text embeddings, fixed) "
     "trained for the same wall time per row (train.max_train_seconds) or, where a row says so, the same epochs as the "
     "all-tasks row; the rows of a pair side by side on the 2 cores, one thread each; the checkpoint chosen on 2,000 "
     "validation users. A task's weight 0 switches it off. "
     "Valid at equal epochs: validation R@10 / N@10 of both rows at the epoch the slower one reached.",
     "rows"),
    ("new_items", "New items and the long tail (Scientific, new-item split)",
     "`genrec new-items`: 5% of the items held out (equally from 20 popularity strata), removed from every training "
     "sequence and from tokenizer fitting; at test time they get codes from the model's text-to-codes (STORE) or the "
     "tokenizer's encode. Test R@10 / N@10 by the test target: held out, long tail (<= 5 training interactions), "
     "popular (> 20), all users; the floors on the same users beside the model. Placed by shared prefix: TIGER's "
     "cold-start retrieval over the model's ranking (training/splits.py with_new_items_by_prefix): each ranked item "
     "brings the new items sharing its deepest code prefix (at least 2 of the 3 content levels) right after it, at "
     "most 1 new item in the top 10 (share .1, fixed in advance: no validation target is a new item). The 3-seed rows: "
     "STORE, TIGER (RQ-VAE 3 x 256 on the MiniLM text embeddings) and the plain recommender on STORE's own codes "
     "(RQ-KMeans 3 x 256 of the same embeddings), each with the same 18-minute training budget (early stop on "
     "validation), d 128, 4 + 4 layers, two runs side by side on the 2 cores, one thread each.", "rows"),
    ("new_items_beauty", "New items and the long tail (Beauty, new-item split)",
     "`genrec new-items` on Amazon 2014 Beauty, as the Scientific table above: 5% of the items held out (equally "
     "from 20 popularity strata), placed by shared prefix the same way. STORE (all tasks), TIGER (RQ-VAE 3 x 256 on "
     "the MiniLM text embeddings) and the plain recommender on STORE's codes (RQ-KMeans 3 x 256 of the same "
     "embeddings), each with the same 15-minute training budget, d 128, 4 + 4 layers, validation on 2,000 users, "
     "two runs side by side on the 2 cores, one thread each; three seeds, mean ± std. Test R@10 / N@10 by the test "
     "target: held out, long tail (<= 5 training interactions), popular (> 20), all users.", "rows"),
    ("long_tail", "The long tail on the warm split (Scientific)",
     "Amazon 2018 Scientific, leave-one-out, the quality table's protocol; every generative row the same recommender "
     "size (d 128, 4 + 4 layers) with the same 15-minute training budget (`train.max_train_seconds=900`, the "
     "configuration's own epoch cap or early stop where it comes first), seed 0, two runs side by side on the 2 "
     "cores, one thread each; test R@10 / N@10 by the target's training interactions (long tail <= 5, 6-20, > 20) "
     "beside SASRec (its cached table, seed 0) and the floors on the same users.", "rows"),
    ("fusion", "Transition fusion",
     "The served beam fused with the newest history item's 20 most frequent training successors by reciprocal rank "
     "(service/fusion.py), the weight chosen on all validation users (none if no weight raises NDCG@10): by "
     "`genrec fuse --bundle B` on the seed-0 bundles of the long-tail table above (weights .25 to 2), or by the "
     "pipeline itself (`choose_transition_fusion`, on in the best and derived configurations; weights .25 to 8). "
     "Test R@10 / N@10, beam alone and fused, beside the floors and SASRec on the same split.", "rows"),
    ("catalog", "Catalog updates: `make bench-catalog`",
     "A Scientific bundle trained on the new-item split (`genrec new-items`), served on loopback without its "
     "held-out items (service, Redis and the load generator on the same 2 cores); 100 of them added back through "
     "`PUT /items` with their text (codes from the bundle's ONNX MiniLM and numpy RQ-KMeans) while `/recommend` runs "
     "open-loop at 50% of the measured peak, then the rest; users whose test target is a held-out item ranked through "
     "`/recommend` (history from the request, k 10), against the same service serving the bundle with those items "
     "built in at training time.", "figures"),
    ("shaped_pilots", "Datasets of other shapes: the derived default against the floors (validation)",
     "`python -m training.shaped_data --out data-shaped` (training/shaped_data.py) writes `long-histories`: 600 items, "
     "2,000 users with 30-100 items each walking one of 240 random chains through the catalog (10% random detours), "
     "so the last item alone is ambiguous. `genrec pipeline --dataset data-shaped/long-histories --seed 0` with no "
     "flags (the derived configuration: history 93, batch 16, d 64, codebooks of 32, item head), validation R@10 / "
     "N@10 on 2,000 users beside the floors and SASRec on the same split; test figures where the run finished. The same "
     "command writes `short-sessions-beauty`: each Beauty user's last 4 items over the whole 12,101-item catalog.", "rows"),
    ("published", "Published figures on Beauty",
     "Other methods' published test figures under the same protocol, for comparison; not run here.", "rows"),
    ("tuning", "Beauty variants on an H100",
     "Test R@10 / N@10 of the same recommender with one thing changed, seed 0. The Beauty default's longest "
     "schedule on a lent GPU, three seeds side by side with their curves: `bash benchmarks/gpu_beauty_schedule.sh` "
     "(prepared and checked on a CPU; not yet run on a GPU).", "rows"),
    ("pilots_codes", "Validation pilots: which codes, warm or cold start",
     "Runs side by side on one 12-epoch schedule, stopped after epoch 6; validation R@10 / N@10 on 2,000 users.",
     "rows"),
    ("pilots_items", "Validation pilots: item identity in the encoder",
     "Runs side by side, stopped after epoch 6; validation R@10 / N@10 on 2,000 users.", "rows"),
    ("decoding", "Raw against renormalized code log-probabilities",
     "One Beauty `beauty-rqkmeans-cf-warm-items-head` seed-0 bundle (a 6-min run), beam 20, each code's "
     "log-probability raw or renormalized over the codes the catalog allows after its prefix (the default since "
     "2026-12-04).", "rows"),
    ("item_head_weight", "Weight of the item head in the ranking",
     "R@10 / N@10 of the seed-0 bundle of the 60-min item-head row, its beam's 20 items ranked by code "
     "log-probability + weight x item-head log-probability.", "rows"),
    ("beam", "Beam width",
     "The seed-0 model of the 3-seed text-code Beauty row at three beam widths, on 4,000 test users.", "rows"),
    ("training_speed", "Training throughput",
     "Variants of one training step on real Beauty batches, run in turns so the ratios share the machine's "
     "moments.", "rows"),
    ("serving_full", "Serving: `make bench-serving`",
     "Latest full run on 2 CPU cores shared by the service, Redis and the load generator (beam 20, k 10, history "
     "20): the engine against Hugging Face T5 `generate` with a prefix-constrained beam search, decode-step scaling "
     "of the trie to 10M items, throughput against the machine's matmul bound, and end to end through HTTP and Redis "
     "with the micro-batcher setting the sweep chose; the end-to-end targets are a share outside the engine at peak "
     "<= 0.25 and p99 <= 50 ms at 70% of peak (median of three windows).", "figures"),
    ("serving_fixed", "Serving: the service default as a fixed setting",
     "Latest run of the same benchmark with the micro-batcher setting given instead of swept.", "figures"),
    ("serving_quick", "Serving: `make bench-serving QUICK=1`",
     "Latest short run with figures (no 10M catalog).", "figures"),
    ("serving_gpu_engine", "Serving on a GPU: the engine alone",
     "The engine alone at several batch sizes against the usual way, both on the GPU; the trie stays on the "
     "device and a batch moves only its history tensors.", "figures"),
    ("serving_gpu_e2e", "Serving on a GPU: end to end",
     "The service answering from the GPU, with Redis and the load generators on the host's cores.", "figures"),
    ("serving_scaleout", "Serving: scale-out on one host",
     "One and two service processes behind haproxy (`deploy/scaleout.py`) sharing one Redis, all running at once and "
     "measured in turns in one run (4 windows each, in alternating order) on the same cores as Redis and the load "
     "generator (`/recommend` by user id, 20-item stored histories, k 10): a closed loop of 32 clients gives each "
     "setting's throughput and p99, then an open loop at half of one process's throughput gives the p99 at the same "
     "offered load; efficiency = two processes' req/s / (2 x one process's req/s). One process without the proxy "
     "shows what the proxy hop costs.", "figures"),
    ("serving_reliability", "Serving under faults and overload: `make bench-reliability`",
     "The service on loopback with a real Redis (AOF everysec), one run: open-loop overload at 2x the peak measured "
     "just before (old policy: only the queue bound; new: admission by expected latency against a 50 ms budget), "
     "Redis killed (SIGKILL, 5 s, restarted from its AOF) and paused (SIGSTOP, 3 s) under a 50/50 mix of events and "
     "recommends at half of peak, SIGTERM under load with a 2 s drain, then a 180 s soak at half of peak. A synthetic "
     "2,000-item catalog with the serving benchmark's model size.", "figures"),
    ("serving_constraints", "Serving: per-request constraints and model reload (`make bench-constraints`)",
     "The service on loopback with a real Redis, admission off (every request answered), `/recommend` by user id "
     "(20-item stored histories, k 10), one run: open loop at half of the unconstrained closed-loop peak, the same "
     "arrivals for each kind in two interleaved windows: no constraint, one filter shared by every request (one "
     "restricted trie, cached), a distinct 5-item exclude list per request (a restricted trie and an engine call per "
     "request); each kind's closed-loop peak; then 3 `POST /admin/reload` between two versions of the bundle under "
     "the same open-loop load.", "figures"),
    ("training_plots", "Training plots",
     "A bundle's training curve and its tokenizer's code usage, drawn by `docs/plot_bundle.py` from the bundle's own "
     "files (`make plots BUNDLE=...` writes them into the bundle; copies here).", "rows"),
]

REQUIRED = ("table", "method", "metrics")
MEASURED = ("machine", "date", "command")
OPTIONAL = ("dataset", "config", "seeds", "wall", "note", "source")
LEAD = ("dataset", "method", "config", "seeds")
TRAIL = ("wall", "machine", "date", "command", "note", "source")
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def load_records(path: Path = RECORDS) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            records.append(check_record(json.loads(line), f"{path.name}:{number}"))
    return records


def check_record(record: dict, where: str) -> dict:
    tables = {spec[0] for spec in TABLES}
    unknown = set(record) - set(REQUIRED) - set(MEASURED) - set(OPTIONAL)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    for key in REQUIRED:
        if not record.get(key):
            raise ValueError(f"{where}: {key!r} is missing or empty")
    if record["table"] not in tables:
        raise ValueError(f"{where}: table {record['table']!r} is not one of {sorted(tables)}")
    if not isinstance(record["metrics"], dict) or not all(isinstance(v, str) and v for v in record["metrics"].values()):
        raise ValueError(f"{where}: metrics must be a non-empty object of non-empty strings")
    if record["table"] == "published":
        if not record.get("source"):
            raise ValueError(f"{where}: a published figure needs its source")
    else:
        for key in MEASURED:
            if not str(record.get(key, "")).strip():
                raise ValueError(f"{where}: {key!r} is missing or empty (every measured row needs machine, date, command)")
        if not DATE.match(record["date"]):
            raise ValueError(f"{where}: date {record['date']!r} is not YYYY-MM-DD")
    return record


def cell(value: str, key: str = "") -> str:
    text = " ".join(str(value).split()).replace("|", "\\|")
    if key == "command" and "`" not in text:
        return f"`{text}`"
    return text


def metric_keys(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["metrics"] if k not in keys]
    return keys


def render_rows(rows: list[dict]) -> list[str]:
    columns = [(k, k) for k in LEAD if any(r.get(k) for r in rows)]
    columns += [(k, "metrics") for k in metric_keys(rows)]
    columns += [(k, k) for k in TRAIL if any(r.get(k) for r in rows)]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        values = [row["metrics"].get(name, "") if field == "metrics" else row.get(field, "") for name, field in columns]
        lines.append("| " + " | ".join(cell(v, name) for v, (name, _) in zip(values, columns)) + " |")
    return lines


def render_figures(rows: list[dict]) -> list[str]:
    lines = ["| figure | " + " | ".join(cell(r["method"]) for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for key in metric_keys(rows):
        lines.append(f"| {cell(key)} | " + " | ".join(cell(r["metrics"].get(key, "")) for r in rows) + " |")
    for key in TRAIL:
        if any(r.get(key) for r in rows):
            lines.append(f"| {key} | " + " | ".join(cell(r.get(key, ""), key) for r in rows) + " |")
    return lines


def anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def render(records: list[dict]) -> str:
    out = [
        "<!-- Generated by docs/render_results.py from docs/results_records.jsonl: edit the records, not this file. -->",
        "# Results",
        "",
        "Every measured row with its command, machine and date. `<bundle>`, `<it>` and `<B>` stand for the bundle the "
        "row names; the history of how each row came about is in git.",
        "",
    ]
    present = [spec for spec in TABLES if any(r["table"] == spec[0] for r in records)]
    out += [f"- [{title}](#{anchor(title)})" for _, title, _, _ in present] + [""]
    for table, title, about, layout in present:
        rows = [r for r in records if r["table"] == table]
        out += [f"## {title}", "", about, ""]
        out += render_figures(rows) if layout == "figures" else render_rows(rows)
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if results.md differs from the rendering")
    args = parser.parse_args(argv)
    records = load_records()
    text = render(records)
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            diff = difflib.unified_diff(current.splitlines(), text.splitlines(), "results.md", "rendered", lineterm="", n=0)
            sys.stderr.writelines(line + "\n" for line in list(diff)[:40])
            print("docs/results.md is out of date: run `python docs/render_results.py`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT} ({len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
