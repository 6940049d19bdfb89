"""Predicted GPU cost of each implementation (no GPU here: these are predictions, not measurements).

For these memory-bound passes the model is bytes / bandwidth:

- ``eager``: every ATen op the released-code-style function runs (forward, and the autograd
  backward) is recorded by a ``TorchDispatchMode`` on meta tensors: one kernel launch per op that
  is not a view, reading its tensor arguments and writing its outputs (ops that use an input only
  for its shape, like ``randn_like``, read nothing; ``empty*`` launches nothing).
- ``compile``: AOTAutograd's partitioned forward and backward graphs (what Inductor compiles), each
  assumed fused into one kernel that reads the graph inputs and writes the graph outputs once
  (a lower bound: Inductor may split a graph into more kernels).
- ``fused`` (our C++/CUDA and Triton kernels): from their I/O contract (docs/DESIGN.md §2): forward reads
  ``h`` and ``stats`` and writes ``z_hat`` and ``kl``; backward reads ``grad_z_hat``, ``grad_kl`` and
  ``stats`` and writes ``grad_h`` and ``grad_stats``; one launch per pass (noise in registers).

Bytes saved for backward are measured with ``saved_tensors_hooks`` (unique storages), split into
the total and the part that is not one of the op's inputs (extra activation memory).
Predicted time = bytes / 3.35 TB/s (H100 SXM HBM3 peak), ignoring launch latency.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.vib_sample_kl_providers import eager_released, make_inputs

H100_BYTES_PER_S = 3.35e12
# Ops whose tensor argument only supplies a shape/dtype (no read on a GPU).
_SHAPE_ONLY_OPS = {"empty_like", "randn_like", "rand_like", "zeros_like", "ones_like", "full_like", "new_empty",
                   "new_zeros", "new_full"}
_NO_KERNEL_OPS = {"empty", "empty_like", "new_empty", "empty_strided"}


@dataclass
class Cost:
    bytes: int = 0
    launches: int = 0
    saved_bytes: int = 0
    saved_extra_bytes: int = 0

    @property
    def h100_us(self) -> float:
        return self.bytes / H100_BYTES_PER_S * 1e6


def _tensor_bytes(tree) -> int:
    return sum(t.nbytes for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class _KernelCounter(TorchDispatchMode):
    """Counts the launches and bytes an eager GPU run of the recorded ops would have."""

    def __init__(self):
        super().__init__()
        self.cost = Cost()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if _is_view(func) or name in _NO_KERNEL_OPS:
            return out
        read = 0 if name in _SHAPE_ONLY_OPS else _tensor_bytes((args, kwargs))
        self.cost.bytes += read + _tensor_bytes(out)
        self.cost.launches += 1
        return out


def _saved_bytes(run, inputs) -> tuple[int, int]:
    """(all, non-input) bytes of the unique storages autograd saves while ``run()`` builds the graph."""
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    input_storages = {t.untyped_storage()._cdata for t in inputs}
    return sum(saved.values()), sum(n for key, n in saved.items() if key not in input_storages)


def eager_cost(n: int, d: int, dtype: torch.dtype, mode: str) -> Cost:
    h, stats, grad_z, grad_kl = make_inputs(n, d, dtype, device="meta", requires_grad=(mode == "fwd+bwd"))
    counter = _KernelCounter()
    if mode == "fwd":
        with counter, torch.no_grad():
            eager_released(h, stats)
        return counter.cost
    outputs = {}

    def forward():
        outputs["z_hat"], outputs["kl"] = eager_released(h, stats)

    with counter:
        counter.cost.saved_bytes, counter.cost.saved_extra_bytes = _saved_bytes(forward, (h, stats))
        torch.autograd.backward((outputs["z_hat"], outputs["kl"]), (grad_z, grad_kl))
    return counter.cost


def compile_cost(n: int, d: int, dtype: torch.dtype, mode: str) -> Cost:
    """I/O of AOTAutograd's forward / backward graphs (min-cut partitioner, as torch.compile uses)."""
    from functorch.compile import aot_function, make_boxed_func, min_cut_rematerialization_partition

    graphs: list[dict] = []

    def record(graph_module, example_inputs):
        nodes = list(graph_module.graph.nodes)
        inputs = [node.meta["val"] for node in nodes if node.op == "placeholder"]
        outputs = [o for o in tree_flatten(nodes[-1].args[0])[0] if isinstance(o, torch.fx.Node)]
        # An output that is a graph input (saved as is) is not written by the kernel.
        written = [o.meta["val"] for o in outputs if o.op != "placeholder"]
        graphs.append({"read": _tensor_bytes(inputs), "written": _tensor_bytes(written), "outputs": outputs})
        return make_boxed_func(graph_module)

    h, stats, grad_z, grad_kl = make_inputs(n, d, dtype, device="meta", requires_grad=True)
    compiled = aot_function(eager_released, fw_compiler=record, bw_compiler=record,
                            partition_fn=min_cut_rematerialization_partition)
    z_hat, kl = compiled(h, stats)
    forward = graphs[0]
    if mode == "fwd":
        return Cost(bytes=_tensor_bytes((h, stats, z_hat, kl)), launches=1)
    torch.autograd.backward((z_hat, kl), (grad_z, grad_kl))
    saved = forward["outputs"][2:]  # after the user outputs (z_hat, kl)
    saved_total = _tensor_bytes([o.meta["val"] for o in saved])
    saved_extra = _tensor_bytes([o.meta["val"] for o in saved if o.op != "placeholder"])
    return Cost(bytes=forward["read"] + forward["written"] + graphs[1]["read"] + graphs[1]["written"], launches=2,
                saved_bytes=saved_total, saved_extra_bytes=saved_extra)


def fused_cost(n: int, d: int, dtype: torch.dtype, mode: str) -> Cost:
    element = torch.empty((), dtype=dtype).element_size()
    forward = (n * d + 2 * n * d + n * d) * element + 4 * n  # h, stats -> z_hat, kl
    if mode == "fwd":
        return Cost(bytes=forward, launches=1)
    backward = (n * d + 2 * n * d + n * d + 2 * n * d) * element + 4 * n  # g, stats, grad_kl -> grad_h, grad_stats
    stats_bytes = 2 * n * d * element  # the op saves stats (an input) and the seed/offset scalars only
    return Cost(bytes=forward + backward, launches=2, saved_bytes=stats_bytes, saved_extra_bytes=0)


PREDICTORS = {"eager": eager_cost, "compile": compile_cost, "cpp": fused_cost}
