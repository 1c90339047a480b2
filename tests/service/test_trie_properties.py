"""Property tests: the exported one-call beam search (STATIC-style trie arrays, KV-cached decoder,
fixed-grid top-k) against the plain twin (dict trie, Python beam search, one decoder call per step).

Each trie shape gets its own tiny random model, exported once per test session: a single level,
wide-and-shallow, a typical 3-level one, deep-and-narrow, one with codebooks so wide that its
deeper depths take padded CSR rows instead of dense ones, and the typical shape exported the way
graphs were before dense rows existed (CSR at every depth). Catalogs are drawn by hypothesis
(small codes, so prefixes collide often), from one item up to every code tuple the codebooks
allow; beams are wider than the valid continuations at some level of every shape.
"""
from __future__ import annotations

import dataclasses
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.bundle import Bundle, Manifest
from service.engine import OnnxBeamEngine
from service.reference import ReferenceBeamEngine
from service.trie import DENSE_ENTRIES_LIMIT, PrefixTrie, build_trie

SCORE_TOLERANCE = 1e-4
TIE = 1e-5  # scores closer than this may come out in either order
MAX_HISTORY = 6


@dataclasses.dataclass(frozen=True)
class Shape:
    codebook_sizes: tuple[int, ...]
    beam: int
    decoder_layers: int = 1
    all_csr: bool = False  # export with padded CSR at every depth, as graphs were before dense rows


SHAPES = {
    "single-level": Shape((23,), beam=7),
    "wide-shallow": Shape((40, 3), beam=16, decoder_layers=2),
    "typical": Shape((5, 4, 3), beam=10, decoder_layers=2),
    "deep-narrow": Shape((2, 2, 3, 2, 2), beam=6),
    "wide-codebooks": Shape((8192, 8192, 3), beam=5),  # 8192 x 8193 > DENSE_ENTRIES_LIMIT: depths 1, 2 are CSR
    "typical-all-csr": Shape((5, 4, 3), beam=10, decoder_layers=2, all_csr=True),
}


def export_shape(shape: Shape, out_dir: Path) -> Bundle:
    """A tiny random model of this shape, its three graphs, and a Bundle over its export catalog."""
    from training.beam import ConstrainedBeamSearch, trie_input_names, trie_tensors
    from training.graphs import export_seq2seq_graphs
    from training.model import GenerativeRecommender, Seq2SeqConfig

    torch.manual_seed(sum(shape.codebook_sizes) * 31 + shape.beam)
    cfg = Seq2SeqConfig(
        codebook_sizes=list(shape.codebook_sizes), d_model=16, n_heads=2, d_ff=32,
        encoder_layers=1, decoder_layers=shape.decoder_layers, dropout=0.0, max_history=MAX_HISTORY,
    )
    model = GenerativeRecommender(cfg).eval()
    with torch.no_grad():  # spread the logits well apart, so near-ties (either order is right) are rare
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.5)
    catalog = export_catalog(shape.codebook_sizes)
    out_dir.mkdir(parents=True, exist_ok=True)
    export_seq2seq_graphs(model, catalog, shape.beam, out_dir)
    if shape.all_csr:  # re-export the beam search with int32 CSR tables at every depth
        levels = len(shape.codebook_sizes)
        trie = trie_tensors(build_trie(catalog).as_feeds(dense_levels=0), levels)
        history = (torch.as_tensor(catalog[None, :3]).repeat(2, 1, 1), torch.ones(2, min(3, len(catalog)), dtype=torch.bool))
        axes = {"history_codes": {0: "batch", 1: "history"}, "history_mask": {0: "batch", 1: "history"},
                "trie_leaf_items": {0: "items"}, "item_indices": {0: "batch"}, "scores": {0: "batch"}}
        for d in range(levels):
            axes |= {f"trie_codes_{d}": {0: f"nodes_{d}", 1: f"width_{d}"}, f"trie_offsets_{d}": {0: f"nodes_{d}"}}
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(ConstrainedBeamSearch(model, shape.beam), (*history, *trie), buffer, dynamo=False,
                              opset_version=17, input_names=["history_codes", "history_mask", *trie_input_names(levels)],
                              output_names=["item_indices", "scores"], dynamic_axes=axes)
        (out_dir / "beam_search.onnx").write_bytes(buffer.getvalue())
    files = {name: "" for name in ("beam_search.onnx", "encoder.onnx", "decoder.onnx")}
    manifest = Manifest(name="prop", version="0", beam_size=shape.beam, max_history=MAX_HISTORY, files=files,
                        model={"kind": "seq2seq", "config": cfg.to_dict()})
    return catalog_bundle(Bundle(out_dir, manifest, catalog.astype(np.int32), [], [], np.zeros(0, np.int64), {}), catalog)


def export_catalog(codebook_sizes: tuple[int, ...]) -> np.ndarray:
    """Every code tuple when there are few, else a sample that still uses each level's largest code
    (the trie layout of the exported graph follows the export catalog's code bounds)."""
    if np.prod(codebook_sizes) <= 512:
        return all_code_tuples(codebook_sizes)
    rng = np.random.default_rng(0)
    rows = np.stack([rng.integers(0, v, size=64) for v in codebook_sizes], axis=1)
    rows[0] = np.asarray(codebook_sizes) - 1
    return np.unique(rows, axis=0).astype(np.int64)


def all_code_tuples(codebook_sizes: tuple[int, ...]) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(v) for v in codebook_sizes], indexing="ij")
    return np.stack([g.reshape(-1) for g in grids], axis=1).astype(np.int64)  # (prod V, L)


def catalog_bundle(bundle: Bundle, semantic_ids: np.ndarray) -> Bundle:
    """The same graphs over another catalog: the trie is a graph input, so no re-export."""
    n = len(semantic_ids)
    ids = [str(i) for i in range(n)]
    return dataclasses.replace(
        bundle, semantic_ids=np.asarray(semantic_ids, dtype=np.int32), item_ids=ids, titles=ids,
        popularity=np.arange(n, dtype=np.int64), index_of={item: i for i, item in enumerate(ids)},
    )


@pytest.fixture(scope="session")
def shape_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    root = tmp_path_factory.mktemp("trie-shapes")
    return {name: export_shape(shape, root / name) for name, shape in SHAPES.items()}


def catalogs(codebook_sizes: tuple[int, ...], max_items: int = 40) -> st.SearchStrategy[np.ndarray]:
    """Unique code tuples; hypothesis favours small codes, so many tuples share prefixes."""
    row = st.tuples(*[st.integers(0, v - 1) for v in codebook_sizes])
    capacity = int(np.prod(codebook_sizes))
    return st.lists(row, min_size=1, max_size=min(max_items, capacity), unique=True).map(
        lambda rows: np.asarray(rows, dtype=np.int64).reshape(len(rows), len(codebook_sizes))
    )


def assert_same_results(fast: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray]) -> None:
    fast_items, fast_scores = fast
    ref_items, ref_scores = reference
    assert fast_items.shape == ref_items.shape
    valid = ref_items >= 0
    np.testing.assert_array_equal(fast_items >= 0, valid)
    np.testing.assert_allclose(fast_scores[valid], ref_scores[valid], atol=SCORE_TOLERANCE, rtol=0)
    for row_fast, row_ref, scores in zip(fast_items, ref_items, ref_scores):
        for j in np.flatnonzero(row_fast != row_ref):
            tied = np.abs(scores - scores[j]) < TIE
            tied[j] = False
            assert tied.any(), f"item {row_fast[j]} != {row_ref[j]} at rank {j} (scores {scores})"


def check_against_reference(bundle: Bundle, semantic_ids: np.ndarray, histories: list[np.ndarray]) -> None:
    catalog = catalog_bundle(bundle, semantic_ids)
    fast = OnnxBeamEngine(catalog, providers="cpu", intra_op_threads=1).search(histories)
    reference = ReferenceBeamEngine(catalog, providers="cpu", intra_op_threads=1).search(histories)
    assert_same_results(fast, reference)
    items, scores = fast
    expected = min(len(semantic_ids), bundle.beam_size)  # -1 only where the catalog runs out
    assert ((items >= 0).sum(axis=1) == expected).all()
    for row_items, row_scores in zip(items, scores):
        real = row_items[row_items >= 0]
        assert len(set(real.tolist())) == len(real)  # distinct items, best first
        assert (np.diff(row_scores[: len(real)]) <= 1e-6).all()


@st.composite
def search_cases(draw: st.DrawFn, shapes: list[str]) -> tuple[str, np.ndarray, list[np.ndarray]]:
    name = draw(st.sampled_from(shapes), label="shape")
    semantic_ids = draw(catalogs(SHAPES[name].codebook_sizes), label="catalog")
    n = len(semantic_ids)
    history = st.lists(st.integers(0, n - 1), min_size=1, max_size=MAX_HISTORY + 3).map(np.asarray)
    histories = draw(st.lists(history, min_size=1, max_size=4), label="histories")
    return name, semantic_ids, histories


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=search_cases(list(SHAPES)))
@example(case=("typical", np.array([[1, 2, 0]]), [np.array([0])]))  # a one-item catalog
@example(case=("deep-narrow", all_code_tuples((2, 2, 3, 2, 2)), [np.arange(9), np.array([47, 0])]))  # full
@example(case=("wide-shallow", np.array([[7, 0], [7, 1], [7, 2], [9, 1]]), [np.array([3, 1])]))  # beam 16 > 4 items
@example(case=("wide-codebooks", np.array([[8191, 8191, 2], [8191, 0, 1], [3, 8191, 0], [3, 8191, 1]]), [np.array([1, 2])]))
def test_graph_and_reference_agree(shape_bundles: dict[str, Bundle], case) -> None:
    name, semantic_ids, histories = case
    check_against_reference(shape_bundles[name], semantic_ids, histories)


@pytest.mark.parametrize("name", list(SHAPES))
def test_one_item_catalog_fills_one_beam(shape_bundles: dict[str, Bundle], name: str) -> None:
    semantic_ids = np.array([[v - 1 for v in SHAPES[name].codebook_sizes]])
    check_against_reference(shape_bundles[name], semantic_ids, [np.array([0]), np.array([0, 0, 0])])


def walk(trie_arrays, depth: int, node: int, prefix: tuple[int, ...], out: dict) -> None:
    """Every (prefix -> children) and (codes -> item) the arrays encode, depth first."""
    if depth == trie_arrays.levels:
        out[prefix] = int(trie_arrays.leaf_items[node])
        return
    row = trie_arrays.codes[depth][node]
    children = [int(c) for c in row if c >= 0]
    assert (row[len(children):] == -1).all() and children == sorted(children)  # codes first, ascending, then pads
    out[prefix] = children
    for slot, code in enumerate(children):
        walk(trie_arrays, depth + 1, int(trie_arrays.offsets[depth][node]) + slot, prefix + (code,), out)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_trie_arrays_encode_exactly_the_catalog(data: st.DataObject) -> None:
    levels = data.draw(st.integers(1, 5), label="levels")
    sizes = tuple(data.draw(st.lists(st.integers(1, 6), min_size=levels, max_size=levels), label="codebooks"))
    semantic_ids = data.draw(catalogs(sizes, max_items=60), label="catalog")
    sizes_used = [semantic_ids[:, d] for d in range(levels)]
    arrays = build_trie(semantic_ids)
    reference = PrefixTrie(semantic_ids)
    encoded: dict = {}
    walk(arrays, 0, 0, (), encoded)
    rows = {tuple(r) for r in semantic_ids.tolist()}
    for prefix, value in encoded.items():
        if len(prefix) == levels:
            assert prefix in rows and value == reference.item_at(prefix)
        else:
            assert value == reference.children(prefix)
    assert sum(len(p) == levels for p in encoded) == len(semantic_ids)  # every item exactly once
    for depth, (codes, offsets) in enumerate(zip(arrays.codes, arrays.offsets)):
        fanout = (codes >= 0).sum(axis=1)
        assert codes.shape[1] == fanout.max()  # the fixed width is the widest node, no wider
        assert codes.dtype == np.int32 and offsets.dtype == np.int32
        assert len(offsets) == len(codes) and (np.diff(offsets) == fanout[:-1]).all()  # CSR
        dense = arrays.dense_slots(depth)  # the same children, indexed by code + 1
        assert dense.dtype == np.int16 and dense.shape == (len(codes), max(sizes_used[depth]) + 2)
        assert (dense[:, 0] == -1).all()
        for row_codes, row_dense in zip(codes, dense):
            children = row_codes[row_codes >= 0]
            np.testing.assert_array_equal(row_dense[children + 1], np.arange(len(children)))
            assert (row_dense >= 0).sum() == len(children)
    assert arrays.leaf_items.dtype == np.int32 and sorted(arrays.leaf_items.tolist()) == list(range(len(semantic_ids)))


def test_build_trie_rejects_duplicates_and_negative_codes() -> None:
    with pytest.raises(ValueError, match="unique"):
        build_trie(np.array([[1, 2], [0, 1], [1, 2]]))
    with pytest.raises(ValueError, match="non-negative"):
        build_trie(np.array([[1, -2]]))


def test_dense_rows_only_where_their_size_is_bounded() -> None:
    """The leading depths whose dense table is at most DENSE_ENTRIES_LIMIT entries for any catalog
    with these code bounds take dense int16 rows; the rest stay int32 CSR."""
    arrays = build_trie(np.array([[0, 40_000], [1, 5]]))  # codes past int16 cannot be dense
    assert arrays.default_dense_levels == 1
    feeds = arrays.as_feeds()
    assert feeds["trie_codes_0"].dtype == np.int16 and feeds["trie_codes_1"].dtype == np.int32
    assert feeds["trie_codes_1"].tolist() == [[40_000], [5]]
    wide = build_trie(np.array([[8191, 8191, 1], [0, 1, 0]]))  # 8192 * 8193 > DENSE_ENTRIES_LIMIT
    assert 8193 <= DENSE_ENTRIES_LIMIT < 8192 * 8193 and wide.default_dense_levels == 1
    assert build_trie(np.array([[255, 255, 255, 15]])).default_dense_levels == 3  # Beauty's 256 x 3 + collision
    assert [a.dtype for a in build_trie(np.array([[1, 2]])).as_feeds(dense_levels=0).values()] == [np.int32] * 5


@pytest.mark.parametrize("start_from_history", [False, True])
def test_kv_cached_decoder_matches_the_full_decoder(start_from_history: bool) -> None:
    """The graph's incremental decoder (one new position per step, cached keys/values) equals
    GenerativeRecommender.decode over the whole prefix, in torch, for every level."""
    from training.model import NEG, GenerativeRecommender, Seq2SeqConfig

    torch.manual_seed(0)
    cfg = Seq2SeqConfig(codebook_sizes=[7, 5, 6, 3], d_model=16, n_heads=2, d_ff=32, encoder_layers=1,
                        decoder_layers=3, dropout=0.0, max_history=MAX_HISTORY,
                        decoder_start_from_history=start_from_history)
    model = GenerativeRecommender(cfg).eval()
    groups, requests = 3, 2
    codes = torch.stack([torch.randint(0, v, (groups * requests,)) for v in cfg.codebook_sizes], dim=1)
    history = torch.stack([torch.randint(0, v, (requests, MAX_HISTORY)) for v in cfg.codebook_sizes], dim=-1)
    mask = torch.ones(requests, MAX_HISTORY, dtype=torch.bool)
    mask[0, :2] = False
    with torch.no_grad():
        memory = model.encode(history, mask)
        cross_kv = model.cross_keys_values(memory)
        cross_bias = torch.zeros(mask.shape).masked_fill(~mask, NEG)[:, None, None, :]
        newest = memory[:, -1].repeat_interleave(groups, dim=0)  # (S, D): each sequence's request
        full = model.decode(codes[:, :-1], newest, cross_kv, cross_bias, groups=groups)  # (S, L, D)
        transposed = [(key.transpose(-1, -2), value) for key, value in cross_kv]
        cache: list = []
        for step in range(cfg.levels):
            x = model.step_input(step, codes[:, step - 1] if step else codes[:, 0], newest)  # (S, D)
            hidden, cache = model.decode_newest(x, cache, transposed, cross_bias, groups=groups)
            torch.testing.assert_close(hidden, full[:, step], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dense_levels", [None, 0])
def test_last_level_runs_the_decoder_only_where_a_node_has_several_children(dense_levels) -> None:
    """ConstrainedBeamSearch skips the last level's decoder for nodes with one child (their
    renormalized log-probability is 0): same items and scores as running it for every beam, and
    the skipped rows are exactly the one-child nodes, on dense-row and CSR tables."""
    from training.beam import ConstrainedBeamSearch, trie_tensors
    from training.model import GenerativeRecommender, Seq2SeqConfig

    torch.manual_seed(1)
    cfg = Seq2SeqConfig(codebook_sizes=[4, 3, 5], d_model=16, n_heads=2, d_ff=32, encoder_layers=1,
                        decoder_layers=2, dropout=0.0, max_history=MAX_HISTORY)
    model = GenerativeRecommender(cfg).eval()
    rng = np.random.default_rng(3)
    # Most two-code prefixes end in one item, a few in several: both kinds of last-level node.
    prefixes = np.unique(np.stack([rng.integers(0, 4, 30), rng.integers(0, 3, 30)], axis=1), axis=0)
    rows = [[*p, 0] for p in prefixes] + [[*p, c] for p in prefixes[::3] for c in (1, 2, 4)]
    catalog = np.asarray(rows, dtype=np.int64)
    feeds = build_trie(catalog).as_feeds() if dense_levels is None else build_trie(catalog).as_feeds(dense_levels=dense_levels)
    trie = trie_tensors(feeds, cfg.levels)
    history = torch.as_tensor(catalog[rng.integers(0, len(catalog), (3, MAX_HISTORY))])
    mask = torch.ones(3, MAX_HISTORY, dtype=torch.bool)

    class EveryBeam(ConstrainedBeamSearch):
        def last_level_log_probs(self, x, self_kv, cross_kv, cross_bias, node, trie_codes):
            self.nodes_seen = node
            hidden, _ = self.model.decode_newest(x, self_kv, cross_kv, cross_bias, groups=node.shape[1])
            return self.model.level_log_probs(hidden, cfg.levels - 1).reshape(*node.shape, cfg.max_codebook)

    with torch.no_grad():
        items, scores = ConstrainedBeamSearch(model, beam_size=6)(history, mask, *trie)
        every = EveryBeam(model, beam_size=6)
        every_items, every_scores = every(history, mask, *trie)
    torch.testing.assert_close(scores, every_scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(items, every_items)
    children = (trie[cfg.levels - 1][every.nodes_seen] >= 0).sum(-1)
    assert (children == 1).any() and (children > 1).any()  # the case mixes both kinds of node
