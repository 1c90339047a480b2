"""STORE: one vocabulary and model for K2K, T2K, K2T and H2K; K2K served by the house's beam-search
graph; T2K exported as its own graph that the service runs without torch; codes from the model's own
text states; new items given codes by T2K on the new-item split."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from service.bundle import load_bundle
from training.configs import apply_overrides, get_config
from training.data import load_dataset, make_synthetic_dataset, write_dataset
from training.export import load_recommender
from training.store import ItemTexts, StoreMultitask, StoreTaskConfig, own_codes, text_to_codes, with_new_item_codes
from training.store_model import MARKERS, StoreConfig, StoreModel, TextToCodes, text_tokenizer
from training.tokenizers.base import CollisionOverflow, assign_semantic_ids

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """tiny-store on the new-item split with own codes from the first epoch on: one pipeline run
    (about 30 s here) that the tests below read."""
    from training.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("store")
    data_dir = write_dataset(make_synthetic_dataset(300, 60, seed=0), root / "data")
    cfg = apply_overrides(get_config("tiny-store", str(data_dir)),
                          ["split=new-items", "new_item_fraction=0.1", "store.codes=own", "store.own_codes_after=1"])
    return run_pipeline(cfg, seed=0, models_dir=root / "models", progress=False)


def test_one_vocabulary_holds_text_markers_and_codes() -> None:
    cfg = StoreConfig(codebook_sizes=[8, 4, 3], d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1)
    assert cfg.code_offsets == [30522 + len(MARKERS), 30522 + len(MARKERS) + 8, 30522 + len(MARKERS) + 12]
    assert cfg.vocab_size == 30522 + len(MARKERS) + 15
    model = StoreModel(cfg)
    assert model.token_embeddings.num_embeddings == cfg.vocab_size
    assert not hasattr(model, "heads") and not hasattr(model, "code_embeddings")
    # an item token is the sum of its code tokens' rows
    codes = torch.tensor([[3, 1, 2]])
    rows = model.token_embeddings.weight[[cfg.code_offsets[0] + 3, cfg.code_offsets[1] + 1, cfg.code_offsets[2] + 2]]
    torch.testing.assert_close(model.embed_items(codes)[0], rows.sum(0))
    assert text_tokenizer(16).get_vocab_size() == cfg.text_vocab_size


def test_the_graph_step_decode_equals_the_teacher_forced_decode() -> None:
    """T2K's greedy graph (decode_newest with a cache) picks what the full decoder ranks first."""
    torch.manual_seed(0)
    cfg = StoreConfig(codebook_sizes=[8, 4, 3], d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=2,
                      dropout=0.0, max_text_tokens=16, max_encoder_tokens=16)
    model = StoreModel(cfg).eval()
    texts = ItemTexts.from_texts(["red lipstick", "a microscope with two lenses", "pipette"], 16)
    ids, mask = torch.as_tensor(texts.ids), torch.as_tensor(texts.mask)
    codes = TextToCodes(model)(ids, mask)  # (3, 2)
    memory = model.encode_tokens(ids, mask)
    hidden = model.run_decoder(model.code_decoder_inputs(codes[:, :1], model.marker_embedding("t2k", 3)),
                               model.cross_keys_values(memory), model.memory_bias(mask))
    for level in range(2):
        assert torch.equal(model.level_log_probs(hidden[:, level], level).argmax(-1), codes[:, level])


def test_every_task_trains_the_shared_weights() -> None:
    torch.manual_seed(0)
    cfg = StoreConfig(codebook_sizes=[8, 4, 3], d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1,
                      dropout=0.0, max_text_tokens=16, max_encoder_tokens=16, text_output_size=5)
    model = StoreModel(cfg)
    model.set_text_output_ids(np.array([102, 1010, 2417, 3010, 4000]))
    text = torch.tensor([[101, 2417, 1010, 102], [101, 3010, 102, 0]])
    mask = text != 0
    targets = torch.tensor([[2, 1, 0], [3, 0, -100]])
    codes = torch.tensor([[1, 2], [3, 0]])
    losses = {"t2k": model.text_to_codes_loss("t2k", text, mask, codes),
              "k2t": model.codes_to_text_loss(codes, text, mask, targets),
              "h2k": model.text_to_codes_loss("h2k", text, mask, torch.tensor([[1, 2, 0], [3, 0, 1]]))}
    for task, loss in losses.items():
        model.zero_grad()
        loss.backward()
        assert loss.item() > 0
        assert model.encoder_layers[0].attn.q.weight.grad.abs().sum() > 0, task  # one encoder for every task
        assert model.token_embeddings.weight.grad[cfg.marker(task)].abs().sum() > 0, task  # its marker token
    # K2K is the seq2seq kind's forward; the multitask sum switches tasks off by weight
    item_codes = torch.tensor([[[1, 2, 0], [3, 0, 1], [1, 1, 0]]])
    seq_mask = torch.ones(1, 3, dtype=torch.bool)
    k2k, _ = model(item_codes, seq_mask)
    only_k2k = StoreMultitask(model, StoreTaskConfig(t2k_weight=0, k2t_weight=0, h2k_weight=0))
    torch.testing.assert_close(only_k2k(item_codes, seq_mask, None, text, mask, codes, targets)[0], k2k)


def test_own_codes_keep_code_identity_when_the_states_fit_them() -> None:
    """Residual k-means started from the current codes' centres: if the current codes are already
    the states' nearest centres, refreshing keeps them."""
    torch.manual_seed(0)
    cfg = StoreConfig(codebook_sizes=[4, 2], d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1,
                      dropout=0.0, max_text_tokens=16, max_encoder_tokens=16)
    model = StoreModel(cfg)
    dataset = make_synthetic_dataset(40, 40, seed=0, n_clusters=4)
    texts = ItemTexts.from_texts(dataset.texts, 16)
    first = own_codes(model, texts, np.zeros((40, 1), dtype=np.int64), np.arange(40), [4], iters=20, seed=0)
    again = own_codes(model, texts, first, np.arange(40), [4], iters=20, seed=1)
    np.testing.assert_array_equal(again, first)
    assert len(np.unique(first)) > 1


def test_a_sticky_own_code_refresh_keeps_codes_within_the_margin() -> None:
    torch.manual_seed(0)
    cfg = StoreConfig(codebook_sizes=[4, 2], d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1,
                      dropout=0.0, max_text_tokens=16, max_encoder_tokens=16)
    model = StoreModel(cfg)
    texts = ItemTexts.from_texts(make_synthetic_dataset(40, 40, seed=0, n_clusters=4).texts, 16)
    current = np.random.default_rng(0).integers(0, 4, size=(40, 1))  # codes the states do not fit
    nearest = own_codes(model, texts, current, np.arange(40), [4], iters=20, seed=0)
    assert (nearest != current).any()
    kept = own_codes(model, texts, current, np.arange(40), [4], iters=20, seed=0, keep_margin=1e9)
    np.testing.assert_array_equal(kept, current)
    some = own_codes(model, texts, current, np.arange(40), [4], iters=20, seed=0, keep_margin=0.25)
    assert (some == current).sum() >= (nearest == current).sum()


def test_new_items_take_collision_codes_after_the_catalog() -> None:
    raw = np.array([[0, 1], [0, 1], [2, 0], [1, 1]])
    ids, _ = assign_semantic_ids(raw, [3, 2], 3)
    out = with_new_item_codes(ids, np.array([3]), np.array([[0, 1]]), [3, 2, 3])
    assert out[3].tolist() == [0, 1, 2] and np.array_equal(out[:3], ids[:3])
    with pytest.raises(CollisionOverflow):
        with_new_item_codes(ids, np.array([3]), np.array([[0, 1]]), [3, 2, 2])


def test_store_bundle_serves_k2k_and_t2k_as_torch_does(store_run: dict) -> None:
    check = store_run["export_check"]
    assert check["served_top10_equal"] == check["users_checked"] == 16
    assert check["text_codes_equal"] == check["text_codes_checked"] == 16
    bundle = load_bundle(Path(store_run["bundle"]))
    assert bundle.manifest.model["kind"] == "store"
    assert {"beam_search.onnx", "t2k.onnx", "text_tokenizer.json"} <= set(bundle.manifest.files)


def test_own_codes_were_refreshed_and_t2k_learned(store_run: dict) -> None:
    curve = [json.loads(line) for line in (Path(store_run["bundle"]) / "training_curve.jsonl").read_text().splitlines()]
    assert all(point["codes_refreshed"] for point in curve)
    assert [point["phase"] for point in curve] == ["store", "store-own-codes", "store-own-codes"]
    fidelity = store_run["store"]["t2k_known_items"]
    assert fidelity["level0_accuracy"] > 0.5  # 8 codes: chance is about 1/8
    # constrained to the catalog's IDs, T2K finds an item's own ID at least as often within its beam
    assert fidelity["constrained_id_in_beam10"] >= fidelity["constrained_exact_id_rate"] > 0


def test_new_items_get_t2k_codes_and_the_service_gives_the_same_without_torch(store_run: dict) -> None:
    """The bundle's codes of the held-out items are T2K's; service/text_codes.py, in a process that
    never imports torch, gives those items the same full semantic IDs from their text."""
    rows = store_run["new_items"]["rows"]
    assert {"this model (new items: own-code centres)", "this model (new items: T2K)"} <= set(rows)
    bundle_dir = Path(store_run["bundle"])
    dataset = load_dataset(str(bundle_dir.parents[2] / "data"))
    bundle = load_bundle(bundle_dir)
    model = load_recommender(bundle_dir)
    from training.splits import new_item_split

    held_out = new_item_split(dataset, 20, 0.1, 0).held_out
    texts = ItemTexts.from_texts(dataset.texts, model.cfg.max_text_tokens)
    np.testing.assert_array_equal(bundle.semantic_ids[held_out, :-1], text_to_codes(model, texts, held_out))

    # the held-out items leave the catalog; the service gives them their codes back from text
    known = np.setdiff1d(np.arange(len(dataset.texts)), held_out)
    script = (
        "import json, sys, numpy as np\n"
        "from service.bundle import load_bundle\nfrom service.text_codes import TextCodes\n"
        f"bundle = load_bundle({str(bundle_dir)!r})\n"
        f"codes = TextCodes(bundle)\ncodes.catalog = codes.catalog[{known.tolist()}]\n"
        f"out = codes.semantic_ids({[dataset.texts[i] for i in held_out]!r})\n"
        "assert 'torch' not in sys.modules\nprint(json.dumps(out.tolist()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.array(json.loads(done.stdout)), bundle.semantic_ids[held_out])


def test_identity_ranks_count_the_catalog_items_closer_than_the_item() -> None:
    from training.store import identity_ranks

    catalog = np.eye(4, dtype=np.float32)
    queries = np.array([[1.0, 0.1, 0, 0], [0.9, 1.0, 0, 0], [1.0, 0, 0.5, 0]], dtype=np.float32)
    assert identity_ranks(queries, catalog, np.array([0, 0, 2])).tolist() == [0, 1, 1]


def test_k2t_writes_text_for_new_items_and_is_ranked_against_the_prefix_floor(store_run: dict) -> None:
    figures = store_run["store"]["k2t_new_items"]
    assert figures["items"] == 6
    for name in ("k2t", "longest_prefix_title"):
        assert 0.0 <= figures[f"{name}_r@1"] <= figures[f"{name}_r@10"] <= 1.0
    assert all(isinstance(example["k2t"], str) for example in figures["examples"])


def test_text_rows_can_start_from_minilm_word_embeddings() -> None:
    """The packaged MiniLM word embeddings, projected to d_model, keep which words are alike."""
    from training.store import minilm_token_table

    table = minilm_token_table(16, seed=0)
    assert table.shape == (30522, 16)
    vocab = text_tokenizer(16).get_vocab()

    def cosine(a: str, b: str) -> float:
        x, y = table[vocab[a]], table[vocab[b]]
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    assert cosine("red", "blue") > cosine("red", "microscope")
    assert cosine("hair", "skin") > cosine("hair", "voltage")


def test_the_task_starts_the_text_rows_from_minilm_when_asked() -> None:
    from training.store import StoreTask, minilm_token_table
    from training.tokenizers import CatalogCodes
    from training.train import TrainConfig

    dataset = make_synthetic_dataset(20, 12, seed=0)
    codes = CatalogCodes(np.arange(12)[:, None] % 4, [4], collision_capacity=4)
    cfg = StoreConfig(codebook_sizes=codes.codebook_sizes, d_model=16, n_heads=2, d_ff=32, encoder_layers=1,
                      decoder_layers=1, max_text_tokens=16, max_encoder_tokens=16)
    texts = ItemTexts.from_texts(dataset.texts, 16)
    cfg.text_output_size = len(texts.output_vocabulary(np.arange(12)))
    model = StoreModel(cfg)
    StoreTask(model, codes, TrainConfig(), dataset.sequences, dataset.sequences[:2], np.array([0, 1]), texts=texts,
              train_items=np.arange(12), store=StoreTaskConfig(init_text_from_minilm=True))
    table = torch.as_tensor(minilm_token_table(16, seed=0))
    torch.testing.assert_close(model.token_embeddings.weight[:30522], table)
    torch.testing.assert_close(model.output_embeddings.weight[:30522], table)
    assert not torch.equal(model.token_embeddings.weight[30522:30530], table[:8])  # markers and codes keep their init


def test_put_items_on_a_store_bundle_takes_t2k_codes(store_run: dict, tmp_path: Path) -> None:
    """STORE bundles give new items their codes with their own T2K graph through the catalog API."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.service.test_api import make_settings

    bundle_dir = Path(store_run["bundle"])
    bundle = load_bundle(bundle_dir)
    spec = bundle.manifest.tokenizer["new_items"]
    assert spec["codes_from"] == "t2k" and spec["parity"]["items_checked"] == bundle.num_items  # T2K is learned: not all equal
    dataset = load_dataset(str(bundle_dir.parents[2] / "data"))
    from training.splits import new_item_split

    item = int(new_item_split(dataset, 20, 0.1, 0).held_out[0])
    settings = make_settings(bundle_dir, admin_token="t", catalog_state_dir=tmp_path / "state")
    with TestClient(create_app(settings)) as client:
        response = client.put("/items/store-new", headers={"Authorization": "Bearer t"},
                              json={"title": "new", "text": dataset.texts[item]})
        assert response.status_code == 201, response.text
        assert response.json()["codes"][:-1] == bundle.semantic_ids[item, :-1].tolist()


def test_constrained_t2k_ranks_every_catalog_id_by_its_renormalized_score() -> None:
    """T2K assigning known items: only the catalog's raw IDs come out, best first, each scored by its
    code log-probabilities renormalized over the codes the catalog continues the prefix with."""
    from training.store import constrained_text_to_codes

    torch.manual_seed(1)
    cfg = StoreConfig(codebook_sizes=[4, 3, 8], d_model=16, n_heads=2, d_ff=32, encoder_layers=1, decoder_layers=2,
                      dropout=0.0, max_text_tokens=16, max_encoder_tokens=16)
    model = StoreModel(cfg).eval()
    texts = ItemTexts.from_texts(["red lipstick", "a microscope with two lenses", "pipette"], 16)
    valid = np.array([[0, 1], [0, 2], [2, 0], [3, 2], [0, 1]])  # the raw codes of five items, two sharing an ID
    ranked = constrained_text_to_codes(model, texts, np.arange(3), valid, beam=6)
    assert ranked.shape == (3, 6, 2)
    assert (ranked[:, 4:] == -1).all()  # four distinct IDs, so the last two slots stay empty
    unique = np.unique(valid, axis=0)
    for row in range(3):
        assert {tuple(r) for r in ranked[row, :4]} == {tuple(r) for r in unique}
        ids, mask = torch.as_tensor(texts.ids[row : row + 1]), torch.as_tensor(texts.mask[row : row + 1])
        memory = model.encode_tokens(ids, mask)

        @torch.no_grad()
        def score(codes: np.ndarray) -> float:
            hidden = model.run_decoder(model.code_decoder_inputs(torch.as_tensor(codes[None, :1]),
                                                                 model.marker_embedding("t2k", 1)),
                                       model.cross_keys_values(memory), model.memory_bias(mask))
            total = 0.0
            for level in range(2):
                allowed = sorted({int(u[level]) for u in unique if (u[:level] == codes[:level]).all()})
                log_probs = model.level_log_probs(hidden[0, level], level)[allowed].log_softmax(-1)
                total += float(log_probs[allowed.index(int(codes[level]))])
            return total

        scores = [score(r) for r in ranked[row, :4]]
        assert scores == sorted(scores, reverse=True)
