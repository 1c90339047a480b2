"""FLOPs of an ONNX graph counted by running it, and the machine's matmul FLOP/s.

Counting: every MatMul / Gemm input is added as a graph output, the graph runs once on real inputs
with graph optimisations off (so no node is fused away), and each product's FLOPs come from the
shapes that actually flowed: 2 * batch * M * K * N. Data-dependent shapes (trie widths, live beams)
need no symbolic inference this way.
"""
from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort


def matmul_flops(model_path: str, feeds: Mapping[str, np.ndarray]) -> dict[str, float]:
    """{'matmul': FLOPs of MatMul/Gemm, 'nodes': how many} for one run on `feeds`."""
    model = onnx.load(model_path)
    graph = model.graph
    existing = {o.name for o in graph.output}
    products: list[tuple[str, str, str, dict]] = []
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            products.append((node.op_type, node.input[0], node.input[1], attrs))
            for name in node.input[:2]:
                if name not in existing:
                    graph.output.append(onnx.helper.make_empty_tensor_value_info(name))  # type left to ORT
                    existing.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    shapes = {name: np.shape(value) for name, value in zip(names, session.run(names, dict(feeds)))}
    initializers = {init.name: tuple(init.dims) for init in graph.initializer}
    total = 0.0
    for op, a_name, b_name, attrs in products:
        a = shapes.get(a_name, initializers.get(a_name))
        b = shapes.get(b_name, initializers.get(b_name))
        if op == "Gemm":
            m, k = (a[1], a[0]) if attrs.get("transA") else (a[0], a[1])
            n = b[0] if attrs.get("transB") else b[1]
            total += 2.0 * m * k * n
            continue
        a, b = (list(a), list(b))
        if len(a) == 1:
            a = [1] + a
        if len(b) == 1:
            b = b + [1]
        batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
        total += 2.0 * float(np.prod(batch)) * a[-2] * a[-1] * b[-1]
    return {"matmul": total, "nodes": float(len(products))}


def measured_matmul_flops(threads: int = 2, size: int = 1024, seconds: float = 1.5) -> dict[str, float]:
    """fp32 matmul FLOP/s of a big square product on `threads` threads (torch, else numpy):
    the best and the median call, so a noisy shared machine shows as a gap between the two."""
    try:
        import torch
    except ImportError:  # pragma: no cover - the bench venv has torch
        torch = None
    if torch is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            a, b = torch.randn(size, size), torch.randn(size, size)
            run = lambda: torch.mm(a, b)  # noqa: E731
            return _rate(run, 2.0 * size**3, seconds) | {"library": "torch", "threads": threads, "size": size}
        finally:
            torch.set_num_threads(previous)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((size, size), np.float32), rng.standard_normal((size, size), np.float32)
    return _rate(lambda: a @ b, 2.0 * size**3, seconds) | {"library": "numpy", "threads": threads, "size": size}


def onnxruntime_matmul_flops(threads: int = 2, size: int = 1024, seconds: float = 1.5) -> dict[str, float]:
    """The same, through onnxruntime with the engine's session settings (threads that sleep when
    idle): on a shared machine this can beat a library whose threads spin."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((size, size), np.float32), "b": rng.standard_normal((size, size), np.float32)}
    return _rate(lambda: session.run(None, feeds), 2.0 * size**3, seconds) | {
        "library": "onnxruntime", "threads": threads, "size": size}


def machine_matmul_flops(threads: int = 2, seconds: float = 1.5) -> dict[str, float]:
    """torch and onnxruntime, half the time each: the higher median, the fastest call of either
    (the most the hardware gave), and each library's median in GFLOP/s."""
    runs = [measured_matmul_flops(threads, seconds=seconds / 2), onnxruntime_matmul_flops(threads, seconds=seconds / 2)]
    return {
        "flops_per_s_median": max(r["flops_per_s_median"] for r in runs),
        "flops_per_s_best": max(r["flops_per_s_best"] for r in runs),
        "all": {r["library"]: round(r["flops_per_s_median"] / 1e9, 1) for r in runs},
    }


def _rate(run, flops_per_call: float, seconds: float) -> dict[str, float]:
    run()
    rates: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(rates) < 5:
        t0 = time.perf_counter()
        run()
        rates.append(flops_per_call / (time.perf_counter() - t0))
    return {"flops_per_s_best": float(np.max(rates)), "flops_per_s_median": float(np.median(rates))}
