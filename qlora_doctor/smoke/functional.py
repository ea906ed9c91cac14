"""`qlora-doctor smoke`: the functional test one environment must pass to count as working for QLoRA.

A tiny Llama-shaped model with random weights is written to a temp folder, loaded back in 4-bit NF4 with
double quantization (the way a real checkpoint is), prepared for k-bit training, given LoRA adapters and
trained for a few optimizer steps on one fixed batch; the loss must go down. The adapter is saved,
reloaded onto a freshly loaded 4-bit base with `PeftModel.from_pretrained` (its logits must equal the
trained model's) and generates a few tokens. Before that, the low-level parts are tested on their own:
torch sees the device, bitsandbytes loads a native library, NF4 quantize/dequantize round-trips within
tolerance, and a `Linear4bit` with LoRA runs forward and backward. Offline, seconds on a CPU.

Runs on the first CUDA device when torch sees one, else on the CPU (float32 compute there).
Every step is timed; the first failing step skips the rest (they depend on it).
"""

from __future__ import annotations

import contextlib
import math
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Literal

StepStatus = Literal["pass", "fail", "skip"]

VERSIONED = ("torch", "bitsandbytes", "transformers", "peft", "accelerate", "safetensors")
# NF4 on a standard-normal tensor, blocksize 64: mean |x - dq(q(x))| is ~0.074 (bitsandbytes 0.4x-0.50).
# A broken kernel gives errors of order 1 (garbage) or 0 (a no-op), so the window is wide but two-sided.
NF4_MEAN_ABS_ERROR_MAX = 0.12
NF4_MEAN_ABS_ERROR_MIN = 0.01
TRAIN_STEPS = 8
NEW_TOKENS = 4
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=128, tie_word_embeddings=False)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class SmokeStep:
    name: str
    """Stable step id, e.g. `bnb.nf4_roundtrip`."""
    status: StepStatus
    detail: str
    """What was measured (pass) or what broke (fail, with the exception's last line)."""
    duration_s: float = 0.0
    error: str = ""
    """Traceback excerpt of a failing step."""


@dataclass(frozen=True)
class SmokeResult:
    status: Literal["pass", "fail"]
    device: str
    """`cuda:0 (NVIDIA H100 80GB HBM3, cc 9.0)` or `cpu`."""
    versions: dict[str, str | None]
    steps: tuple[SmokeStep, ...]
    losses: tuple[float, ...]
    """Training loss before each optimizer step."""
    facts: dict[str, Any] = field(default_factory=dict)
    """Measured values: bnb library path, NF4 round-trip error, trainable parameters..."""
    duration_s: float = 0.0
    python: str = ""

    @property
    def failed_step(self) -> SmokeStep | None:
        return next((s for s in self.steps if s.status == "fail"), None)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["steps"] = [asdict(s) for s in self.steps]
        data["losses"] = list(self.losses)
        return data


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class _Run:
    """Holds the objects steps hand to each other, and the steps' outcomes."""

    def __init__(self) -> None:
        self.steps: list[SmokeStep] = []
        self.facts: dict[str, Any] = {}
        self.losses: list[float] = []
        self.state: dict[str, Any] = {}
        self.failed = False

    def step(self, name: str, fn: Callable[[], str]) -> None:
        if self.failed:
            failed = next(s.name for s in self.steps if s.status == "fail")
            self.steps.append(SmokeStep(name, "skip", f"skipped: {failed} failed"))
            return
        start = time.perf_counter()
        try:
            detail = fn()
            status: StepStatus = "pass"
            error = ""
        except Exception as err:  # each step's failure is the result, never a crash of the smoke
            status, detail = "fail", f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            error = "".join(traceback.format_exception(type(err), err, err.__traceback__))[-3000:]
            self.failed = True
        self.steps.append(SmokeStep(name, status, detail, round(time.perf_counter() - start, 3), error))


class SmokeAssertion(AssertionError):
    """A step ran but its result is wrong (loss did not move, round trip too lossy...)."""


def run_smoke(device: str | None = None) -> SmokeResult:
    """Run every step; never raises for a broken environment (that is the result)."""
    start = time.perf_counter()
    run = _Run()
    # Libraries print to stdout now and then; keep stdout for the caller's JSON.
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory(prefix="qlora-smoke-") as tmp:
        run.step("torch.device", lambda: _torch_device(run, device))
        run.step("bnb.library", lambda: _bnb_library(run))
        run.step("bnb.nf4_roundtrip", lambda: _nf4_roundtrip(run))
        run.step("bnb.linear4bit_lora", lambda: _linear4bit_lora(run))
        run.step("model.load_4bit", lambda: _load_4bit(run, Path(tmp)))
        run.step("peft.prepare_kbit", lambda: _prepare(run))
        run.step("peft.attach_lora", lambda: _attach_lora(run))
        run.step("train.loss_decreases", lambda: _train(run))
        run.step("adapter.save", lambda: _save_adapter(run, Path(tmp)))
        run.step("adapter.reload", lambda: _reload_adapter(run, Path(tmp)))
        run.step("generate", lambda: _generate(run))
        run.state.clear()
    return SmokeResult(status="fail" if run.failed else "pass", device=run.facts.get("device", "unknown"),
                       versions=package_versions(), steps=tuple(run.steps), losses=tuple(run.losses),
                       facts=run.facts, duration_s=round(time.perf_counter() - start, 3),
                       python=platform.python_version())


# --- steps --------------------------------------------------------------------------------------

def _torch_device(run: _Run, wanted: str | None) -> str:
    import torch

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    name = wanted or ("cuda:0" if cuda else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not cuda:
            raise SmokeAssertion(f"asked for {name} but torch.cuda.is_available() is False "
                                 f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        props = torch.cuda.get_device_properties(dev)
        label = f"{name} ({props.name}, cc {props.major}.{props.minor})"
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        torch.ones(8, device=dev).sum().item()  # a kernel actually runs on the card
    else:
        label, dtype = "cpu", torch.float32
    run.state.update(device=dev, dtype=dtype)
    run.facts.update(device=label, compute_dtype=str(dtype).replace("torch.", ""),
                     cuda_available=cuda, torch_cuda=torch.version.cuda)
    return f"torch {torch.__version__} sees {label}; compute dtype {run.facts['compute_dtype']}" + (
        "" if cuda else " (no CUDA device visible)")


def _bnb_library(run: _Run) -> str:
    import bitsandbytes
    from bitsandbytes import cextension

    lib = getattr(cextension, "lib", None)
    handle = getattr(lib, "_lib", None)
    path = getattr(handle, "_name", None)
    backend = getattr(cextension, "BNB_BACKEND", "?")
    run.facts.update(bnb_version=bitsandbytes.__version__, bnb_library=path, bnb_backend=backend)
    if handle is None or type(lib).__name__ == "ErrorHandlerMockBNBNativeLibrary":
        raise SmokeAssertion(f"bitsandbytes {bitsandbytes.__version__} loaded no native library "
                             f"({type(lib).__name__}); run `python -m bitsandbytes` for its diagnosis")
    return f"bitsandbytes {bitsandbytes.__version__} loaded {Path(path).name if path else '?'} (backend {backend})"


def _nf4_roundtrip(run: _Run) -> str:
    import torch
    import bitsandbytes.functional as F

    dev, dtype = run.state["device"], run.state["dtype"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 256, generator=gen).to(device=dev, dtype=dtype)
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    y = F.dequantize_4bit(packed, state, quant_type="nf4")
    if packed.numel() * packed.element_size() * 2 != x.numel():
        raise SmokeAssertion(f"quantize_4bit returned {packed.numel() * packed.element_size()} bytes for "
                             f"{x.numel()} values (expected 2 values per byte)")
    if y.shape != x.shape:
        raise SmokeAssertion(f"dequantize_4bit returned shape {tuple(y.shape)}, expected {tuple(x.shape)}")
    err = (x.float() - y.float()).abs().mean().item()
    run.facts["nf4_mean_abs_error"] = round(err, 5)
    if not NF4_MEAN_ABS_ERROR_MIN <= err <= NF4_MEAN_ABS_ERROR_MAX:
        raise SmokeAssertion(f"NF4 round trip mean |error| {err:.4f} is outside "
                             f"[{NF4_MEAN_ABS_ERROR_MIN}, {NF4_MEAN_ABS_ERROR_MAX}] on N(0,1) values")
    return f"NF4 + double-quant round trip on 256x256 N(0,1): mean |error| {err:.4f} (ok <= {NF4_MEAN_ABS_ERROR_MAX})"


def _linear4bit_lora(run: _Run) -> str:
    import torch
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    dev, dtype = run.state["device"], run.state["dtype"]
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 64, bias=False)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4",
                                          compress_statistics=True)
            self.proj.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)

        def forward(self, x):
            return self.proj(x)

    model = Tiny().to(dev)
    if model.proj.weight.quant_state is None:
        raise SmokeAssertion("Linear4bit weights were not quantized when moved to the device")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0))
    x = torch.randn(4, 64, device=dev, dtype=dtype)
    out = model(x)
    out.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    if not lora_b or lora_b[0] is None or not torch.isfinite(lora_b[0]).all() or lora_b[0].abs().sum() == 0:
        raise SmokeAssertion("backward through Linear4bit + LoRA gave no finite, non-zero gradient for lora_B")
    reference = x.float() @ dense.weight.to(dev).float().t()
    rel = ((out.float() - reference).norm() / reference.norm()).item()
    run.facts["linear4bit_relative_error"] = round(rel, 5)
    if not rel < 0.25:
        raise SmokeAssertion(f"Linear4bit output differs from the dense layer by {rel:.3f} (relative), expected < 0.25")
    return (f"Linear4bit(nf4) + LoRA r=4: forward within {rel:.3f} of the dense layer, "
            f"backward gave finite gradients to {len(grads)} LoRA tensors")


def _bnb_config(dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _load_base(run: _Run, folder: Path):
    from transformers import AutoModelForCausalLM

    dev = run.state["device"]
    device_map = {"": dev.index if dev.type == "cuda" else "cpu"}
    # transformers renamed `torch_dtype` to `dtype` in 4.56; older releases pass unknown kwargs to the config.
    key = "dtype" if _version("transformers") >= (4, 56) else "torch_dtype"
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=_bnb_config(run.state["dtype"]),
                                                device_map=device_map, **{key: run.state["dtype"]})


def _version(name: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(metadata.version(name)).release


def _load_4bit(run: _Run, tmp: Path) -> str:
    import torch
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    folder = tmp / "base"
    config = LlamaConfig(**TINY_LLAMA, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    model = _load_base(run, folder)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if len(linear4) != 7 * TINY_LLAMA["num_hidden_layers"]:
        raise SmokeAssertion(f"expected {7 * TINY_LLAMA['num_hidden_layers']} Linear4bit layers after loading "
                             f"in 4-bit, found {len(linear4)}")
    state = linear4[0].weight.quant_state
    if state is None or not getattr(state, "nested", False):
        raise SmokeAssertion("the 4-bit weights carry no nested (double-quant) state")
    run.state.update(model=model, folder=folder)
    run.facts["linear4bit_layers"] = len(linear4)
    return (f"tiny Llama ({TINY_LLAMA['num_hidden_layers']} layers, hidden {TINY_LLAMA['hidden_size']}) loaded in "
            f"NF4 + double quant: {len(linear4)} Linear4bit layers")


def _prepare(run: _Run) -> str:
    from peft import prepare_model_for_kbit_training

    run.state["model"] = prepare_model_for_kbit_training(
        run.state["model"], use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    return "prepare_model_for_kbit_training (gradient checkpointing on)"


def _attach_lora(run: _Run) -> str:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(run.state["model"], config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise SmokeAssertion("LoRA attached but no parameter is trainable")
    run.state["model"] = model
    run.facts["trainable_params"] = trainable
    return f"LoRA r=8 on {len(LORA_TARGETS)} projection types: {trainable} trainable of {total} parameters"


def _train(run: _Run) -> str:
    import torch

    model, dev = run.state["model"], run.state["device"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (2, 16), generator=gen).to(dev)
    run.state["batch"] = ids
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(TRAIN_STEPS):
        with torch.autocast(dev.type, dtype=run.state["dtype"], enabled=dev.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        run.losses.append(round(loss.item(), 5))
    if not all(math.isfinite(x) for x in run.losses):
        raise SmokeAssertion(f"loss is not finite: {run.losses}")
    if not run.losses[-1] < run.losses[0]:
        raise SmokeAssertion(f"loss did not decrease over {TRAIN_STEPS} steps on one fixed batch: {run.losses}")
    return f"{TRAIN_STEPS} AdamW steps on a fixed batch: loss {run.losses[0]:.4f} -> {run.losses[-1]:.4f}"


def _save_adapter(run: _Run, tmp: Path) -> str:
    folder = tmp / "adapter"
    run.state["model"].save_pretrained(folder)
    files = sorted(p.name for p in folder.iterdir())
    if "adapter_config.json" not in files or not any(f.startswith("adapter_model") for f in files):
        raise SmokeAssertion(f"save_pretrained wrote {files}, missing adapter_config.json or adapter_model.*")
    run.state["adapter"] = folder
    size = sum(p.stat().st_size for p in folder.iterdir())
    return f"adapter saved: {', '.join(files)} ({size / 1024:.0f} KiB)"


def _reload_adapter(run: _Run, tmp: Path) -> str:
    import torch
    from peft import PeftModel

    trained, ids = run.state["model"], run.state["batch"]
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits.float()
    base = _load_base(run, run.state["folder"])
    reloaded = PeftModel.from_pretrained(base, run.state["adapter"])
    reloaded.eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits.float()
    diff = (got - expected).abs().max().item()
    run.facts["reload_max_logit_diff"] = round(diff, 6)
    tolerance = 1e-3 if run.state["dtype"] == torch.float32 else 5e-2
    if not diff <= tolerance:
        raise SmokeAssertion(f"the reloaded adapter's logits differ from the trained model's by {diff:.4g} "
                             f"(tolerance {tolerance}): the adapter did not save what was trained")
    run.state["reloaded"] = reloaded
    return f"PeftModel.from_pretrained on a fresh 4-bit base: logits match the trained model (max diff {diff:.2g})"


def _generate(run: _Run) -> str:
    import torch

    model, ids = run.state["reloaded"], run.state["batch"][:1, :8]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    new = out.shape[1] - ids.shape[1]
    if new != NEW_TOKENS:
        raise SmokeAssertion(f"generate returned {new} new tokens, expected {NEW_TOKENS}")
    return f"generated {new} tokens greedily: {out[0, ids.shape[1]:].tolist()}"
