"""Offloaded checkpoints (`performance.offload_checkpoints: true`): the inputs a checkpointed decoder layer keeps
for its backward live in pinned host memory between the forward and the backward (issue #20, item 1).

With every layer checkpointed (non-reentrant), what stays on the GPU per layer after the forward is its input
hidden state (batch x seq x hidden x 2 bytes: 128 MiB at 8 x 2048 x 4096, 4 GiB for 32 layers). This module
moves it to the host and brings it back just before the layer's backward replays it.

Mechanism: `torch.autograd.graph.saved_tensors_hooks` around each checkpointed layer's
`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` call. Inside the layer the checkpoint's own hooks
(innermost hooks win) turn every saved tensor into a recompute placeholder, so the only tensors our hooks see are
the ones the checkpoint saves for its replay: the layer's inputs (`_NoopSaveInputs.save_for_backward`). Of those,
the ones that require grad (the hidden state) are offloaded; the rest (RoPE's cos/sin, shared by every layer, a
mask) stay where they are, and so does the first layer's input when it is a leaf (the embeddings' output marked
by enable_input_require_grads): autograd's AccumulateGrad node keeps it alive until the backward ends anyway. `recompute: selective` composes: the outputs its policy keeps live in the selective
checkpoint's cache, not in saved tensors, and stay on the GPU; only the layer input moves.

On a GPU (the design of unsloth_zoo's NonReentrantActivationOffloader, unsloth_zoo 2026.10.9
`unsloth_zoo/gradient_checkpointing.py`, `use_gradient_checkpointing="unsloth"`):

  * pack (right after the checkpoint saved the input, before the layer's forward runs): a side "d2h" CUDA stream
    waits for the compute stream, then copies the input into a pinned host buffer (`non_blocking`), and records
    an event. The GPU tensor is kept alive (a keepalive) until the compute stream has waited for that event: at
    the next pack, or when the backward begins. Dropping it earlier would let the caching allocator hand its
    block to the compute stream while the copy still reads it. No `record_stream` on the side stream.
  * unpack (the first saved-tensor access of layer i's backward starts its replay): the compute stream waits
    for the copy of layer i's input (or for its prefetch), then the input of the checkpointed layer before it
    (i-1) is prefetched: allocated on the compute stream, copied host->device on a second side "h2d" stream
    that first waits for the compute stream, with a `ready` event that layer i-1's unpack waits on. So at most
    two layers' inputs are on the GPU in the backward: the one being replayed and the one prefetched (double
    buffering), and the host->device copy overlaps layer i's replay and backward.

Without CUDA (`offloaded_streams=False`, the CPU tests) the same pack/unpack/prefetch bookkeeping runs with
plain copies into separate CPU tensors (`pin_memory=False`), so the whole path, and the fact that the hooks keep
a copy and not the tensor, is tested without a GPU. The lever itself is off without a GPU (recipe/levers.py).

Exactness: the replay reads a bit-identical copy of the input (a copy, no cast), so the gradients are those of
plain non-reentrant checkpointing (tests/test_offload_checkpoints.py).
"""

from __future__ import annotations

import collections
import functools
import weakref
from typing import Any


class _Offloaded:
    """One offloaded saved tensor: its host copy (and the event marking the copy), or a prefetched device copy."""

    __slots__ = ("__weakref__", "copied", "device", "device_tensor", "host", "index", "ready", "unpacked")

    def __init__(self, device: Any, index: int):
        self.device = device
        self.host: Any = None
        self.copied: Any = None  # CUDA event on the d2h stream after the copy
        self.device_tensor: Any = None  # prefetched copy on the device
        self.ready: Any = None  # CUDA event on the h2d stream after the prefetch
        self.index = index
        self.unpacked = False

    def __del__(self) -> None:
        # A prefetch dropped unread (the graph freed without its backward): the compute stream, which allocated
        # the block, must not reuse it before the copy into it ends.
        try:
            if self.ready is not None:
                import torch

                torch.cuda.current_stream(self.device).wait_event(self.ready)
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass


class CheckpointOffloader:
    """The saved-tensor hooks of offloaded checkpointing for one model (module docstring).

    `streams`: None decides by device (CUDA tensors: side streams and pinned memory); False: plain synchronous
    copies (what a CPU test runs). `pin_memory`: None decides likewise. `offload_cpu`: also offload tensors that
    are already on the CPU (copies into separate CPU tensors; for tests). `stats` counts what happened."""

    def __init__(self, streams: bool | None = None, pin_memory: bool | None = None, offload_cpu: bool = False,
                 prefetch: bool = True):
        self.streams = streams
        self.pin_memory = pin_memory
        self.offload_cpu = offload_cpu
        self.prefetch = prefetch
        self.order: list[Any] = []  # weak references to this step's records, forward order
        self.backward_started = False
        self.inflight: dict[Any, collections.deque] = {}  # device -> [(gpu tensor, copied event)]
        self.d2h: dict[Any, Any] = {}
        self.h2d: dict[Any, Any] = {}
        self.stats = {"offloaded": 0, "offloaded_bytes": 0, "kept": 0, "prefetched": 0, "prefetch_hits": 0,
                      "reloaded": 0}

    # --- streams --------------------------------------------------------------------------------------

    def _use_streams(self, device: Any) -> bool:
        return device.type == "cuda" if self.streams is None else bool(self.streams and device.type == "cuda")

    def _side(self, cache: dict, device: Any) -> Any:
        import torch

        stream = cache.get(device)
        if stream is None:
            stream = cache[device] = torch.cuda.Stream(device=device)
        return stream

    def _retire(self, keep: int) -> None:
        """Release the kept-alive GPU sources of finished (or, beyond `keep` per device, any) copies, each after
        the compute stream has waited for its copy."""
        import torch

        for device, inflight in self.inflight.items():
            compute = torch.cuda.current_stream(device)
            while inflight and (len(inflight) > keep or inflight[0][1].query()):
                _, copied = inflight.popleft()
                compute.wait_event(copied)

    # --- hooks ----------------------------------------------------------------------------------------

    def pack(self, x: Any) -> Any:
        # Kept where they are: what needs no gradient (RoPE's cos/sin, masks), CPU tensors, and a leaf that requires
        # grad (the embeddings' output that enable_input_require_grads marks, the first layer's input): autograd's
        # AccumulateGrad node holds a leaf for the whole backward anyway, so a host copy would free nothing.
        if (not x.requires_grad or x.is_leaf) or (x.device.type == "cpu" and not self.offload_cpu):
            self.stats["kept"] += 1
            return x
        if self.backward_started:  # a new forward (the next micro-batch or step)
            self.backward_started = False
            self.order = []
        record = _Offloaded(x.device, len(self.order))
        self.order.append(weakref.ref(record))
        x = x.detach()
        if self._use_streams(x.device):
            import torch

            self._retire(keep=0)  # the previous layer's copy: the compute stream waits, its source is freed
            compute = torch.cuda.current_stream(x.device)
            side = self._side(self.d2h, x.device)
            side.wait_stream(compute)
            with torch.cuda.stream(side):
                host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=self.pin_memory is not False)
                host.copy_(x, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(side)
            self.inflight.setdefault(x.device, collections.deque()).append((x, copied))
            record.host, record.copied = host, copied
        else:
            import torch

            host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=bool(self.pin_memory))
            host.copy_(x)
            record.host = host
        self.stats["offloaded"] += 1
        self.stats["offloaded_bytes"] += x.numel() * x.element_size()
        return record

    def unpack(self, packed: Any) -> Any:
        if not isinstance(packed, _Offloaded):
            return packed
        record = packed
        if not self.backward_started:
            self.backward_started = True
            if self.inflight:
                self._retire(keep=0)
        record.unpacked = True
        streams = self._use_streams(record.device)
        if record.device_tensor is not None:
            x = record.device_tensor
            if record.ready is not None:
                import torch

                torch.cuda.current_stream(record.device).wait_event(record.ready)
            record.device_tensor = record.ready = None  # one shot: a retain_graph rerun reloads from the host
            self.stats["prefetch_hits"] += 1
        else:
            if streams:
                import torch

                if record.copied is not None:
                    torch.cuda.current_stream(record.device).wait_event(record.copied)
                x = record.host.to(record.device, non_blocking=True)
            else:
                x = record.host.to(record.device, copy=True)
            self.stats["reloaded"] += 1
        if self.prefetch:
            self._prefetch(record.index - 1)
        return x

    def _prefetch(self, index: int) -> None:
        """Start copying record `index` (the checkpointed layer whose backward comes next) back to its device."""
        if index < 0 or index >= len(self.order):
            return
        record = self.order[index]()
        if record is None or record.unpacked or record.device_tensor is not None or record.host is None:
            return
        import torch

        if self._use_streams(record.device):
            compute = torch.cuda.current_stream(record.device)
            try:
                x = torch.empty(record.host.shape, dtype=record.host.dtype, device=record.device)
            except torch.cuda.OutOfMemoryError:
                return  # its unpack reloads it on the compute stream instead
            side = self._side(self.h2d, record.device)
            side.wait_stream(compute)  # the block's earlier users on the compute stream
            if record.copied is not None:
                side.wait_event(record.copied)
            with torch.cuda.stream(side):
                x.copy_(record.host, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(side)
            record.ready = ready
        else:
            x = record.host.to(record.device, copy=True)
        record.device_tensor = x
        self.stats["prefetched"] += 1

    def hooks(self) -> Any:
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def host_records(self) -> list[_Offloaded]:
        """This step's live records (tests: where what the hooks keep lives)."""
        return [r for r in (ref() for ref in self.order) if r is not None]


def offloaded(checkpoint_func: Any, offloader: CheckpointOffloader) -> Any:
    """`checkpoint_func` (a layer's `_gradient_checkpointing_func`: torch's non-reentrant checkpoint, or the
    selective one) called inside the offloader's saved-tensor hooks."""

    @functools.wraps(checkpoint_func)
    def call(*args: Any, **kwargs: Any) -> Any:
        with offloader.hooks():
            return checkpoint_func(*args, **kwargs)

    call.offloader = offloader  # type: ignore[attr-defined]
    return call


def offload_layers(layers: list[Any], offloader: CheckpointOffloader | None = None) -> CheckpointOffloader:
    """Offload the saved inputs of these checkpointed layers (transformers GradientCheckpointingLayers with
    checkpointing enabled, non-reentrant) through one shared offloader; returns it."""
    offloader = offloader or CheckpointOffloader()
    for layer in layers:
        func = layer._gradient_checkpointing_func
        if getattr(func, "offloader", None) is not None:
            continue
        layer._gradient_checkpointing_func = offloaded(func, offloader)
    return offloader
