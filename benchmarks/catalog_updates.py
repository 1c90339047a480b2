"""Catalog updates (issue 31): new items through PUT /items while the service serves, on loopback.

Takes a bundle trained on the new-item split (`genrec new-items`, training/splits.py): its held-out
items are in it, coded at training time. A copy without them (known items only) is served, and the
held-out items are added back through PUT /items with their text:

- peak: closed-loop /recommend throughput (bench_reliability.measure_peak, 32 clients);
- updates under load: open-loop /recommend at 50% of peak (benchmarks/loadgen.py) while 100 held-out
  items are PUT one after another: time from sending PUT to the item being recommendable (the service
  answers PUT once the item is in the trie the next batch reads) p50/p99, a probe /recommend right
  after each PUT whose history is the new item (it must be read as known), and failed requests
  (recommends and PUTs) during the updates (target 0);
- new-item quality: the rest of the held-out items PUT, then test users whose target is a held-out
  item, R@10/N@10 through /recommend; the same users against the full bundle (held-out items built in
  at training time), same service settings. Also the codes: how many PUT items got the codes the
  bundle gave them at training time.

Ends with one JSON line. Load from this process only, to 127.0.0.1, bounded in time and count.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import REPO, log  # first: puts the repository and benchmarks/ on sys.path

import loadgen  # noqa: E402
from bench_reliability import Redis, measure_peak, start_service  # noqa: E402
from serving_harness import request_factory, seed_users  # noqa: E402

from service.bundle import file_digests, load_bundle  # noqa: E402
from service.new_item_codes import NEW_ITEMS_KEY  # noqa: E402

HOST = "127.0.0.1"
TOKEN = "bench-catalog-admin"
UPDATES = 100


def put_json(port: int, path: str, payload: dict) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = (f"PUT {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode() + body


def newest_new_item_bundle() -> Path:
    for manifest in sorted((REPO / "models").glob("*/*/manifest.json"), key=lambda p: p.parent.name, reverse=True):
        if json.loads(manifest.read_text()).get("training", {}).get("config", {}).get("split") == "new-items":
            return manifest.parent
    raise SystemExit("catalog_updates: no bundle trained on the new-item split under models/; build one with "
                     "`genrec new-items --config scientific-rqkmeans-text` or pass --bundle")


def held_out_items(bundle) -> tuple[np.ndarray, object, object]:
    """(held-out item indices, the split, the dataset) as the bundle's training drew them."""
    from training.data import load_dataset
    from training.splits import new_item_split

    cfg = bundle.manifest.training["config"]
    dataset = load_dataset(cfg["dataset"])
    if dataset.item_ids != bundle.item_ids:
        raise SystemExit("catalog_updates: the dataset's items differ from the bundle's")
    split = new_item_split(dataset, cfg["model"]["max_history"], cfg["new_item_fraction"], cfg["new_item_seed"])
    return split.held_out, split, dataset


def known_items_bundle(bundle, held_out: np.ndarray, out_dir: Path) -> Path:
    """The bundle without the held-out items (re-indexed): what a shop had before they arrived. Only for
    graphs that do not embed item indices (no history item ids, no item head)."""
    config = bundle.manifest.model["config"]
    if config.get("item_head") or config.get("history_item_ids"):
        raise SystemExit("catalog_updates: this bundle's graph embeds item indices; use a codes-only configuration")
    target = out_dir / bundle.name / bundle.version
    shutil.copytree(bundle.path, target)
    keep = np.setdiff1d(np.arange(bundle.num_items), held_out)
    new_index = np.full(bundle.num_items, -1)
    new_index[keep] = np.arange(len(keep))
    np.save(target / "semantic_ids.npy", bundle.semantic_ids[keep])
    rows = (target / "items.jsonl").read_text().splitlines()
    (target / "items.jsonl").write_text("".join(rows[i] + "\n" for i in keep))
    popularity = new_index[bundle.popularity]
    np.save(target / "popularity.npy", popularity[popularity >= 0].astype(np.int32))
    manifest = json.loads((target / "manifest.json").read_text())
    # The nearest-neighbour fallback's table is per item; a text-code bundle has none to cut.
    if manifest["tokenizer"].get(NEW_ITEMS_KEY, {}).get("codes_from") == "nearest_text_neighbour":
        raise SystemExit("catalog_updates: needs a bundle with text codes")
    manifest["files"] = file_digests(target, manifest["files"])
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


async def updates_under_load(port: int, make, rate: float, items: list[dict], spacing_s: float) -> dict:
    """Open-loop recommends at `rate` for as long as the PUTs take (plus a second each side)."""
    pool = loadgen._Pool(HOST, port, 4)
    put_s: list[float] = []
    put_status: dict[int, int] = {}
    probes_known = 0
    duration = 2.0 + len(items) * spacing_s

    async def writer() -> None:
        nonlocal probes_known
        await asyncio.sleep(1.0)
        for item in items:
            started = time.perf_counter()
            status, _ = await loadgen.send(pool, put_json(port, f"/items/{item['item_id']}",
                                                          {"title": item["title"], "text": item["text"]}))
            put_status[status] = put_status.get(status, 0) + 1
            if status in (200, 201):
                put_s.append(time.perf_counter() - started)
                probe = loadgen.post_json(HOST, port, "/recommend", {"history": [item["item_id"]], "k": 10})
                status, body = await loadgen.send(pool, probe)
                if status == 200 and not any("unknown" in w for w in json.loads(body)["warnings"]):
                    probes_known += 1
            await asyncio.sleep(max(0.0, spacing_s - (time.perf_counter() - started)))

    load, _ = await asyncio.gather(loadgen.open_loop(HOST, port, make, rate, duration, seed=5), writer())
    pool.close()
    lat = np.asarray(put_s) * 1e3
    summary = load.summary()
    return {
        "offered_rps": round(rate, 1), "recommend": summary,
        "failed_recommends": summary["non_200"] + summary["errors"],
        "puts": len(items), "put_statuses": put_status,
        "failed_puts": sum(n for s, n in put_status.items() if s not in (200, 201)),
        "put_to_recommendable_p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "put_to_recommendable_p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "probes_reading_the_new_item": probes_known,
    }


async def put_all(port: int, items: list[dict]) -> dict[str, list[int]]:
    pool = loadgen._Pool(HOST, port, 2)
    codes = {}
    for item in items:
        status, body = await loadgen.send(pool, put_json(port, f"/items/{item['item_id']}",
                                                         {"title": item["title"], "text": item["text"]}))
        if status in (200, 201):
            codes[item["item_id"]] = json.loads(body)["codes"]
    pool.close()
    return codes


async def rank_users(port: int, histories: list[list[str]], k: int = 10) -> list[list[str]]:
    pool = loadgen._Pool(HOST, port, 4)

    async def one(history: list[str]) -> list[str]:
        status, body = await loadgen.send(pool, loadgen.post_json(HOST, port, "/recommend", {
            "history": history, "k": k, "exclude_history": False}))
        return [i["item_id"] for i in json.loads(body)["items"]] if status == 200 else []

    ranked = []
    for start in range(0, len(histories), 8):
        ranked += await asyncio.gather(*(one(h) for h in histories[start:start + 8]))
    pool.close()
    return ranked


def recall_ndcg(ranked: list[list[str]], targets: list[str], k: int = 10) -> dict:
    hits = [r[:k].index(t) if t in r[:k] else None for r, t in zip(ranked, targets)]
    return {"recall@10": round(float(np.mean([h is not None for h in hits])), 4),
            "ndcg@10": round(float(np.mean([1 / np.log2(h + 2) if h is not None else 0.0 for h in hits])), 4)}


def offline_new_target(bundle) -> dict | None:
    """The training summary's figure for held-out targets (torch beam search, all test users)."""
    rows = bundle.manifest.metrics.get("new_items", {}).get("rows", {})
    row = next((v for k, v in rows.items() if k.startswith("this model")), None)
    return None if row is None else {k: round(row["new_target"][k], 4) for k in ("recall@10", "ndcg@10")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="a bundle trained on the new-item split (default: newest)")
    parser.add_argument("--updates", type=int, default=UPDATES)
    parser.add_argument("--spacing-s", type=float, default=0.25, help="time between PUTs under load")
    args = parser.parse_args()

    full_dir = Path(args.bundle) if args.bundle else newest_new_item_bundle()
    full = load_bundle(full_dir)
    if NEW_ITEMS_KEY not in full.manifest.tokenizer:
        raise SystemExit(f"catalog_updates: {full_dir} has no text path for new items: `genrec text-path --bundle {full_dir}`")
    held_out, split, dataset = held_out_items(full)
    work = Path(tempfile.mkdtemp(prefix="bench-catalog-"))
    known_dir = known_items_bundle(full, held_out, work / "models")
    known = load_bundle(known_dir)
    items = [{"item_id": dataset.item_ids[i], "title": dataset.titles[i], "text": dataset.texts[i]} for i in held_out]
    out: dict = {"bundle": f"{full.name}/{full.version}", "dataset": full.dataset, "items_known": known.num_items,
                 "items_held_out": len(items), "codes_from": full.manifest.tokenizer[NEW_ITEMS_KEY]["codes_from"],
                 "cores": len(os.sched_getaffinity(0)), "load_average_1m": round(os.getloadavg()[0], 2)}
    users = [u for u in range(len(split.splits.test_targets)) if split.splits.test_targets[u] in set(held_out.tolist())]
    histories = [[dataset.item_ids[i] for i in split.splits.test_histories[u]] for u in users]
    targets = [dataset.item_ids[split.splits.test_targets[u]] for u in users]
    redis = Redis(work)
    redis.start()
    env = {"GENREC_ADMIN_TOKEN": TOKEN, "GENREC_LATENCY_BUDGET_MS": "0",
           "GENREC_CATALOG_STATE_DIR": str(work / "state")}
    try:
        user_ids = seed_users(redis.url, known, 2000, np.random.default_rng(0))
        svc = start_service(known_dir, redis.url, work, **env)
        try:
            make = request_factory(svc.port, user_ids, seed=0)
            measure_peak(svc, make, 2.0, windows=1)  # warm
            out["peak_rps"] = round(measure_peak(svc, make, 4.0), 1)
            log(f"peak (closed loop, 32 clients): {out['peak_rps']} req/s")
            under_load = loadgen.run(updates_under_load(svc.port, make, 0.5 * out["peak_rps"], items[:args.updates],
                                                         args.spacing_s))
            log(json.dumps(under_load))
            out |= {k: v for k, v in under_load.items() if k != "recommend"}
            out["recommend_p99_ms_during_updates"] = under_load["recommend"]["p99_ms"]
            codes = loadgen.run(put_all(svc.port, items[args.updates:]))
            codes |= {i: c for i, c in loadgen.run(put_all(svc.port, items[: args.updates])).items()}  # re-PUT: same codes
            trained_codes = {full.item_ids[i]: full.semantic_ids[i].tolist() for i in held_out}
            out["put_items_with_training_codes"] = sum(codes.get(i) == c for i, c in trained_codes.items())
            out["put_items_with_training_raw_codes"] = sum(codes.get(i, [None])[:-1] == c[:-1]
                                                           for i, c in trained_codes.items())
            added = recall_ndcg(loadgen.run(rank_users(svc.port, histories)), targets)
        finally:
            svc.stop()
        svc = start_service(full_dir, redis.url, work, **env)
        try:
            built_in = recall_ndcg(loadgen.run(rank_users(svc.port, histories)), targets)
        finally:
            svc.stop()
        out |= {"new_target_users": len(users), "added_via_put": added, "built_in_at_training": built_in,
                "offline_new_target": offline_new_target(full)}
    finally:
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
