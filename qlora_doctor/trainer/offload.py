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
import contextlib
import functools
import weakref
from typing import Any


def _release_prefetch(device: Any, ready: Any) -> None:
    """A prefetch dropped unread (the graph freed without its backward): the compute stream, which allocated the
    block, must not reuse it before the copy into it ends."""
    try:
        if ready is not None:
            import torch

            torch.cuda.current_stream(device).wait_event(ready)
    except Exception:  # noqa: BLE001, S110 - interpreter shutdown
        pass


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
        _release_prefetch(self.device, self.ready)


class _OffloadedCache:
    """The outputs one selectively checkpointed layer's forward kept (torch SAC's cache), while they live in host
    memory: each kept tensor's whole storage copied to pinned host memory, and put back as the same view
    (offset, size, stride) of a restored storage before the layer's replay reads the cache."""

    __slots__ = ("__weakref__", "copied", "device", "entries", "index", "prefetched", "ready", "restored",
                 "sources")

    def __init__(self, device: Any, index: int):
        self.device = device
        self.index = index
        self.entries: list[tuple[Any, int, int]] = []  # (SAC _VersionWrapper, storage number, nbytes)
        self.sources: list[Any] = []  # the GPU storages' uint8 views, alive until their copy is known done
        self.copied: Any = None  # CUDA event on the d2h stream after the copies
        self.prefetched: list[Any] | None = None  # device uint8 buffers, one per storage
        self.ready: Any = None  # CUDA event on the h2d stream after the prefetch
        self.restored = False

    def __del__(self) -> None:
        _release_prefetch(self.device, self.ready)


OFFLOAD_SELECTIVE_CACHE = True
"""Whether offloaded checkpointing also moves selective recompute's kept outputs to host memory (trainer/speed.py
reads it when it builds the layers; bench/train_throughput.py turns it off to measure what it changes)."""

CACHE_MIN_BYTES = 1 << 20
"""Kept tensors smaller than this stay on the GPU (the attention kernel's RNG seed/offset, small masks)."""

STAY_ON_DEVICE = {"qlora_doctor::lora_gemm_4bit": frozenset({1})}
"""Kept op outputs that never move, by op name and output index: the whole-LoRA op's A x (tokens x rank, trainer/
fused_lora.py). With it moved to the host (CACHE_MIN_BYTES at 64 KiB), an H100's 200-step loss curve of the
default fell behind full recompute's from step 10 on; kept on the GPU, it followed it over 120 steps
(bench/results/fastpath_h100_2026-12-06b/NOTES.md). The cause is not found, so A x stays, whatever its size (the
planner counts it on the GPU: memory/estimate.py)."""

CACHE_COPIES_IN_FLIGHT = 2
"""Selective caches whose device->host copy may still run while the forward goes on; past this the compute stream
waits for the oldest copy (the bound on the GPU memory the copies hold)."""


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
        self.caches: list[Any] = []  # weak references to this step's _OffloadedCache records, forward order
        self.backward_started = False
        self.inflight: dict[Any, collections.deque] = {}  # device -> [(gpu tensor, copied event)]
        self.cache_inflight: collections.deque = collections.deque()  # _OffloadedCache with sources alive
        self.d2h: dict[Any, Any] = {}
        self.h2d: dict[Any, Any] = {}
        self.stats = {"offloaded": 0, "offloaded_bytes": 0, "kept": 0, "prefetched": 0, "prefetch_hits": 0,
                      "reloaded": 0, "caches_offloaded": 0, "cache_bytes": 0, "caches_prefetched": 0,
                      "cache_prefetch_hits": 0, "caches_reloaded": 0, "caches_from_device": 0}

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
        self._forward_begins()
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

    def _forward_begins(self) -> None:
        if self.backward_started:  # a new forward (the next micro-batch or step)
            self.backward_started = False
            self.order = []
            self.caches = []

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

    # --- selective recompute's kept outputs ----------------------------------------------------------------

    def cache_contexts(self, storage: Any, keep_on_device: bool = False) -> tuple[Any, Any]:
        """Two context managers for one selectively checkpointed layer call whose SAC cache is `storage` (the
        dict torch's caching dispatch mode fills): the first, entered outside the forward's caching mode, moves
        the kept tensors to host memory when the layer's forward ends; the second, entered before the replay's
        cached mode, puts them back (waiting for their prefetch) and prefetches the previous layer's cache.
        `keep_on_device`: this layer's cache stays on the GPU (the last layer's, replayed right after the
        forward), but its replay still prefetches the cache of the layer before it."""
        holder: dict[str, Any] = {}

        @contextlib.contextmanager
        def forward() -> Any:
            yield
            if keep_on_device:
                self._forward_begins()
                holder["position"] = len(self.caches)
            else:
                record = holder["record"] = self._offload_cache(storage)
                holder["position"] = record.index if record is not None else len(self.caches)

        @contextlib.contextmanager
        def replay() -> Any:
            record = holder.get("record")
            if record is not None:
                self._restore_cache(record)
            if self.prefetch and "position" in holder:
                self._prefetch_cache(holder["position"] - 1)
            yield

        return forward(), replay()

    def _offload_cache(self, storage: Any) -> _OffloadedCache | None:
        import torch

        wrappers = _cache_wrappers(storage)
        self._forward_begins()
        storages: dict[int, tuple[int, Any]] = {}  # storage data_ptr -> (number, device uint8 view)
        entries = []
        for wrapper in wrappers:
            tensor = wrapper.val
            if tensor.device.type == "cpu" and not self.offload_cpu:
                continue
            untyped = tensor.untyped_storage()
            if untyped.nbytes() < CACHE_MIN_BYTES and not self.offload_cpu:
                continue
            number, _ = storages.setdefault(untyped.data_ptr(), (len(storages), _bytes_of(untyped, tensor.device)))
            entries.append((wrapper, number, untyped.nbytes()))
        if not entries:
            return None
        device = entries[0][0].val.device
        record = _OffloadedCache(device, len(self.caches))
        sources = [view for _, view in sorted(storages.values(), key=lambda item: item[0])]
        streams = self._use_streams(device)
        with torch.no_grad():
            if streams:
                self._retire_caches(keep=CACHE_COPIES_IN_FLIGHT - 1)
                side = self._side(self.d2h, device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    hosts = [_host_like(view, pin=self.pin_memory is not False) for view in sources]
                    for host, view in zip(hosts, sources):
                        host.copy_(view, non_blocking=True)
                    record.copied = torch.cuda.Event()
                    record.copied.record(side)
                record.sources = sources
                self.cache_inflight.append(record)
            else:
                hosts = [_host_like(view, pin=bool(self.pin_memory)) for view in sources]
                for host, view in zip(hosts, sources):
                    host.copy_(view)
        for wrapper, number, _ in entries:
            tensor = wrapper.val
            wrapper.val = _HostView(hosts[number], tensor.dtype, tensor.storage_offset(), tuple(tensor.shape),
                                    tuple(tensor.stride()))
        record.entries = entries
        self.caches.append(weakref.ref(record))
        self.stats["caches_offloaded"] += 1
        self.stats["cache_bytes"] += sum(view.numel() for view in sources)
        return record

    def _retire_caches(self, keep: int) -> None:
        """Free the GPU sources of cache copies that ended, and of the oldest beyond `keep` still running (the
        compute stream waits for those)."""
        import torch

        while self.cache_inflight and (len(self.cache_inflight) > keep or self.cache_inflight[0].copied.query()):
            record = self.cache_inflight.popleft()
            torch.cuda.current_stream(record.device).wait_event(record.copied)
            record.sources = []

    def _restore_cache(self, record: _OffloadedCache) -> None:
        import torch

        record.restored = True
        streams = self._use_streams(record.device)
        if record.sources:
            # Its copy to the host may still run (the last layers of the forward): the GPU storages are still
            # here, so use them. The compute stream waits for the copy before they can be freed.
            torch.cuda.current_stream(record.device).wait_event(record.copied)
            buffers = record.sources
            record.sources = []
            if record in self.cache_inflight:
                self.cache_inflight.remove(record)
            self.stats["caches_from_device"] += 1
        elif record.prefetched is not None:
            buffers = record.prefetched
            if record.ready is not None:
                torch.cuda.current_stream(record.device).wait_event(record.ready)
            record.prefetched = record.ready = None
            self.stats["cache_prefetch_hits"] += 1
        else:
            hosts = _hosts_of(record)
            if streams and record.copied is not None:
                torch.cuda.current_stream(record.device).wait_event(record.copied)
            with torch.no_grad():
                buffers = [host.to(record.device, non_blocking=streams, copy=True) for host in hosts]
            self.stats["caches_reloaded"] += 1
        for wrapper, number, _ in record.entries:
            wrapper.val = wrapper.val.on(buffers[number])
            if getattr(wrapper, "version", None) is not None:
                wrapper.version = wrapper.val._version

    def _prefetch_cache(self, index: int) -> None:
        if index < 0 or index >= len(self.caches):
            return
        record = self.caches[index]()
        if record is None or record.restored or record.prefetched is not None or record.sources:
            return
        import torch

        hosts = _hosts_of(record)
        if self._use_streams(record.device):
            compute = torch.cuda.current_stream(record.device)
            try:
                buffers = [torch.empty(host.shape, dtype=host.dtype, device=record.device) for host in hosts]
            except torch.cuda.OutOfMemoryError:
                return  # its restore reloads it on the compute stream instead
            side = self._side(self.h2d, record.device)
            side.wait_stream(compute)
            if record.copied is not None:
                side.wait_event(record.copied)
            with torch.cuda.stream(side), torch.no_grad():
                for buffer, host in zip(buffers, hosts):
                    buffer.copy_(host, non_blocking=True)
                record.ready = torch.cuda.Event()
                record.ready.record(side)
        else:
            buffers = [host.to(record.device, copy=True) for host in hosts]
        record.prefetched = buffers
        self.stats["caches_prefetched"] += 1

    def hooks(self) -> Any:
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def host_records(self) -> list[_Offloaded]:
        """This step's live records (tests: where what the hooks keep lives)."""
        return [r for r in (ref() for ref in self.order) if r is not None]


class _HostView:
    """Where a kept tensor went: its storage's host copy and the view to rebuild on the restored storage."""

    __slots__ = ("dtype", "host", "offset", "size", "stride")

    def __init__(self, host: Any, dtype: Any, offset: int, size: tuple, stride: tuple):
        self.host, self.dtype, self.offset, self.size, self.stride = host, dtype, offset, size, stride

    def on(self, buffer: Any) -> Any:
        import torch

        tensor = torch.empty(0, dtype=self.dtype, device=buffer.device)
        return tensor.set_(buffer.untyped_storage(), self.offset, self.size, self.stride)


def _cache_wrappers(storage: Any) -> list[Any]:
    """The entries of a SAC cache that hold a tensor to move (torch's `_VersionWrapper`s, any container layout),
    less the outputs STAY_ON_DEVICE names."""
    import torch
    from torch.utils._pytree import tree_leaves

    found = []
    for op, per_op in storage.items():
        stay = STAY_ON_DEVICE.get(op.name() if hasattr(op, "name") else str(op), frozenset())
        entries = per_op.values() if isinstance(per_op, dict) else per_op
        for entry in entries:
            for index, leaf in enumerate(tree_leaves(entry)):
                if index not in stay and isinstance(getattr(leaf, "val", None), torch.Tensor) and hasattr(leaf, "get_val"):
                    found.append(leaf)
    return found


def _bytes_of(untyped: Any, device: Any) -> Any:
    """A uint8 tensor over a whole untyped storage."""
    import torch

    return torch.empty(0, dtype=torch.uint8, device=device).set_(untyped)


def _host_like(view: Any, pin: bool) -> Any:
    import torch

    return torch.empty(view.shape, dtype=torch.uint8, device="cpu", pin_memory=pin)


def _hosts_of(record: _OffloadedCache) -> list[Any]:
    hosts: dict[int, Any] = {}
    for wrapper, number, _ in record.entries:
        hosts.setdefault(number, wrapper.val.host)
    return [hosts[n] for n in sorted(hosts)]


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
