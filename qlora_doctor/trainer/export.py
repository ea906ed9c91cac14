"""`qlora-doctor export`: a finished run as a plain merged checkpoint, or as a GGUF file plus an Ollama Modelfile.

Both formats start from the same merge: the run's base model reloaded in float32 on the CPU (not 4-bit:
merging into NF4 would round the update away), the adapter folded in with `merge_and_unload`. The adapter
was trained against the NF4 base, so the merged model differs slightly from what was trained; that is
QLoRA's, not the export's.

`--format merged` saves that model in bf16, fp16 or fp32 (safetensors + tokenizer).

`--format gguf` runs llama.cpp's own converter (`convert_hf_to_gguf.py` with its bundled gguf-py; PyPI's
gguf is too old for it) as a subprocess on the merged checkpoint. The converter comes from the pinned
`llama-cpp-python` source package (LLAMA_CPP_PYTHON), fetched once like a builtin model's wheel
(builtin.py): `<cache>/downloads/` first (offline machines), else `pip download`; sha256 checked; only the
converter's files kept, in `<cache>/tools/`. f16 and q8_0 need nothing else (`--outtype`). q4_k_m needs
llama.cpp's C++ quantizer, looked for in this order: the `llama_cpp` module of the pinned version
(`llama_model_quantize`), then `llama-quantize` on PATH; without either the export stops and names the
install command (it never compiles anything itself).

Beside the .gguf goes an Ollama `Modelfile`: FROM, a TEMPLATE from a known chat family (ChatML,
Llama-3) accepted only when it renders exactly like the tokenizer's chat template on probe conversations,
the default system prompt that template injects (SYSTEM), and stop sequences. A chat template of no known
family gets no TEMPLATE (Ollama then picks one itself), and the result says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_doctor.core.errors import CheckFailed, InputError
from qlora_doctor.core.subprocs import Completed, run_bounded

FORMATS = ("gguf", "merged")
QUANTS = {"f16": 1, "q8_0": 7, "q4_k_m": 15}
"""--quant -> llama_ftype (llama.cpp include/llama.h), which the GGUF records as general.file_type."""
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_QUANT, DEFAULT_DTYPE = "q8_0", "bf16"
MODELFILE = "Modelfile"
EXPORT_INFO = "export.json"


@dataclass(frozen=True)
class LlamaCppPin:
    """The source package llama.cpp's converter is taken from (MIT, like the llama.cpp it vendors)."""

    version: str
    sdist: str
    sha256: str
    llama_cpp_commit: str
    members: tuple[str, ...]
    """What is kept from `<sdist root>/vendor/llama.cpp/`: files, or folders ending in `/`."""

    @property
    def pip_spec(self) -> str:
        return f"llama-cpp-python=={self.version}"


LLAMA_CPP_PYTHON = LlamaCppPin(
    version="0.3.36", sdist="llama_cpp_python-0.3.36.tar.gz",
    sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e", llama_cpp_commit="0c1e57098",
    members=("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE"))
TOOLS_SOURCE = "tools-source.json"
"""Written last into the extracted tools folder: a folder with it is complete."""
PIP_TIMEOUT_S = 900
CONVERT_TIMEOUT_S = 4 * 3600
QUANTIZE_TIMEOUT_S = 2 * 3600

Runner = Callable[..., Completed]
"""run_bounded's signature: the seam through which pip, the converter and the quantizer run."""


@dataclass(frozen=True)
class OllamaModelfile:
    """A Modelfile for one GGUF, and how its chat template was decided."""

    text: str
    family: str | None
    """`chatml` or `llama3`; None when the tokenizer's chat template matched no known family (no TEMPLATE)."""
    system: str | None
    """The default system prompt the chat template injects (SYSTEM), if any."""
    stops: tuple[str, ...]


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote."""

    path: Path
    """The --to folder."""
    format: str
    """`gguf` or `merged`."""
    files: tuple[str, ...]
    """The files written into `path`."""
    base_model: str
    quant: str | None = None
    """gguf: f16, q8_0 or q4_k_m."""
    dtype: str | None = None
    """merged: bf16, fp16 or fp32."""
    gguf_file: str | None = None
    bytes: int = 0
    """Size of all files written."""
    template_family: str | None = None
    quantizer: str | None = None
    """q4_k_m: `llama_cpp <version>` or the llama-quantize binary used."""
    notes: tuple[str, ...] = ()
    """Things the user should know (a quantizer's fallback types, a Modelfile without TEMPLATE)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each step: merge, convert, quantize."""


# --- the merge ---------------------------------------------------------------------------------------

def export(output_dir: Path, to: Path, fmt: str, *, quant: str | None = None, dtype: str | None = None,
           run: Runner = run_bounded) -> ExportResult:
    """Export the finished run in `output_dir` into the new (or empty) folder `to`; see the module doc."""
    output_dir, to = Path(output_dir), Path(to)
    if fmt not in FORMATS:
        raise InputError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "gguf" and dtype is not None:
        raise InputError("--dtype: applies to --format merged; a GGUF's precision is --quant (f16, q8_0, q4_k_m)")
    if fmt == "merged" and quant is not None:
        raise InputError("--quant: applies to --format gguf; a merged checkpoint's precision is --dtype "
                         "(bf16, fp16, fp32)")
    quant = quant or (DEFAULT_QUANT if fmt == "gguf" else None)
    dtype = dtype or (DEFAULT_DTYPE if fmt == "merged" else None)
    if quant is not None and quant not in QUANTS:
        raise InputError(f"--quant: {quant!r} is not one of {', '.join(QUANTS)}")
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise InputError(f"--to: {to} exists and is not an empty folder; choose a new folder")
    from qlora_doctor.trainer.generate import load_run

    recipe = load_run(output_dir)
    quantizer = find_quantizer() if quant == "q4_k_m" else None  # before minutes of merging
    tools = ensure_converter(run) if fmt == "gguf" else None
    if fmt == "merged":
        return _export_merged(output_dir, recipe, to, dtype or DEFAULT_DTYPE)
    return _export_gguf(output_dir, recipe, to, quant or DEFAULT_QUANT, tools, quantizer, run)


def merged_model(output_dir: Path, recipe: Any) -> tuple[Any, Any]:
    """(the base in float32 on the CPU with the adapter merged in, the run's tokenizer): generate.merge's
    path with the precision fixed to full float32, whatever the machine."""
    from peft import PeftModel

    from qlora_doctor.recipe.precision import Precision
    from qlora_doctor.trainer.builtin import resolve_model_path
    from qlora_doctor.trainer.model import load_base, load_tokenizer

    full = Precision(device="cpu", fp16=False, bf16=False, compute_dtype="float32", compute_capability=None,
                     reason="export: the base reloaded in float32 on the CPU to merge the adapter losslessly")
    tokenizer = load_tokenizer(str(output_dir))
    base = load_base(recipe, full, resolve_model_path(recipe.model.name_or_path), quantized=False)
    merged = PeftModel.from_pretrained(base, str(output_dir)).merge_and_unload()
    merged.eval()
    return merged, tokenizer


def _save_merged(merged: Any, tokenizer: Any, folder: Path, dtype: str) -> None:
    from qlora_doctor.trainer.model import torch_dtype

    model = merged.to(torch_dtype(DTYPES[dtype]))
    model.config.dtype = torch_dtype(DTYPES[dtype])
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _export_merged(output_dir: Path, recipe: Any, to: Path, dtype: str) -> ExportResult:
    from qlora_doctor.trainer.generate import _save_new_dir

    start = time.perf_counter()
    merged, tokenizer = merged_model(output_dir, recipe)
    info = _export_info(output_dir, recipe, "merged", dtype=dtype)

    def save(tmp: Path) -> None:
        _save_merged(merged, tokenizer, tmp, dtype)
        _write_json(tmp / EXPORT_INFO, info)

    _save_new_dir(to, save)
    files = _listing(to)
    return ExportResult(path=to, format="merged", files=files, base_model=recipe.model.name_or_path, dtype=dtype,
                        bytes=_size(to, files), seconds={"merge": round(time.perf_counter() - start, 1)})


def _export_info(output_dir: Path, recipe: Any, fmt: str, **details: Any) -> dict[str, Any]:
    """export.json: what this folder is and how to make it again (no local paths but the run's name)."""
    from qlora_doctor import __version__

    how = " ".join(f"--{k} {v}" for k, v in details.items() if v is not None and k in ("quant", "dtype"))
    return {"schema_version": 1, "tool": f"qlora-doctor {__version__}", "format": fmt, **details,
            "run": Path(output_dir).resolve().name, "base_model": recipe.model.name_or_path,
            "command": f"qlora-doctor export RUN --format {fmt} {how} --to OUT"}


# --- gguf --------------------------------------------------------------------------------------------

def _export_gguf(output_dir: Path, recipe: Any, to: Path, quant: str, tools: Path, quantizer: list[str] | None,
                 run: Runner) -> ExportResult:
    from qlora_doctor.trainer.generate import _save_new_dir

    seconds: dict[str, float] = {}
    notes: list[str] = []
    name = _model_name(output_dir)
    gguf_name = f"{name}-{quant}.gguf"
    to.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{to.name}.work.", dir=to.parent) as work_dir:
        work = Path(work_dir)
        start = time.perf_counter()
        merged, tokenizer = merged_model(output_dir, recipe)
        _save_merged(merged, tokenizer, work / "merged", "fp32")
        del merged
        seconds["merge"] = round(time.perf_counter() - start, 1)

        outtype = "q8_0" if quant == "q8_0" else "f16"
        converted = work / f"{name}-{outtype}.gguf"
        start = time.perf_counter()
        env = converter_env(work / "merged", work / "shims")
        argv = [sys.executable, str(tools / "convert_hf_to_gguf.py"), str(work / "merged"), "--outtype", outtype,
                "--outfile", str(converted), "--model-name", name]
        done = run(argv, CONVERT_TIMEOUT_S, env=env, cwd=tools)
        _require_ok(done, converted, f"llama.cpp's convert_hf_to_gguf.py --outtype {outtype}", CONVERT_TIMEOUT_S)
        seconds["convert"] = round(time.perf_counter() - start, 1)

        final = converted
        if quant == "q4_k_m":
            assert quantizer is not None
            final = work / gguf_name
            start = time.perf_counter()
            done = run([*quantizer, str(converted), str(final), "Q4_K_M"], QUANTIZE_TIMEOUT_S)
            _require_ok(done, final, f"{_quantizer_label(quantizer)} Q4_K_M", QUANTIZE_TIMEOUT_S)
            seconds["quantize"] = round(time.perf_counter() - start, 1)
            notes += fallback_notes(done.output)

        add_bos = check_gguf(final, QUANTS[quant])
        modelfile = ollama_modelfile(tokenizer, gguf_name, add_bos=add_bos)
        if modelfile.family is None:
            notes.append("the tokenizer's chat template matches no known family (ChatML, Llama-3), so the Modelfile "
                         "has no TEMPLATE: Ollama will pick a template itself by similarity, or use the raw prompt; "
                         "add a TEMPLATE line for your model's format to be sure")
        info = _export_info(output_dir, recipe, "gguf", quant=quant, gguf_file=gguf_name,
                            converter=f"{LLAMA_CPP_PYTHON.pip_spec} (llama.cpp {LLAMA_CPP_PYTHON.llama_cpp_commit})",
                            quantizer=_quantizer_label(quantizer) if quantizer else None,
                            template_family=modelfile.family)

        def save(tmp: Path) -> None:
            os.replace(final, tmp / gguf_name)
            (tmp / MODELFILE).write_text(modelfile.text, encoding="utf-8")
            _write_json(tmp / EXPORT_INFO, info)

        _save_new_dir(to, save)
    files = _listing(to)
    return ExportResult(path=to, format="gguf", files=files, base_model=recipe.model.name_or_path, quant=quant,
                        gguf_file=gguf_name, bytes=_size(to, files), template_family=modelfile.family,
                        quantizer=_quantizer_label(quantizer) if quantizer else None, notes=tuple(notes),
                        seconds=seconds)


_SENTENCEPIECE_STUB = (
    '"""Stands in for sentencepiece, which is not installed, for a model that has no tokenizer.model: llama.cpp\'s\n'
    'converter imports it before looking for that file, then falls back to the model\'s tokenizer.json."""\n\n\n'
    "class SentencePieceProcessor:\n"
    "    def __init__(self, *args, **kwargs):\n"
    "        raise ImportError('sentencepiece is not installed: pip install sentencepiece')\n")


def converter_env(merged: Path, shims: Path) -> dict[str, str]:
    """The converter's environment: NO_LOCAL_GGUF unset (it must use its own gguf-py, not PyPI's). Its llama
    family imports sentencepiece before it checks for a tokenizer.model; without sentencepiece installed, a model
    without that file (a tokenizer.json one, like SmolLM2 or Llama-3) gets a stub on PYTHONPATH, and one with it
    is refused with the install command."""
    from importlib.util import find_spec

    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    if find_spec("sentencepiece") is not None:
        return env
    if (merged / "tokenizer.model").is_file():
        raise CheckFailed(f"this model's tokenizer is a sentencepiece model (tokenizer.model), which llama.cpp's "
                          f"converter reads with the sentencepiece package; install it: "
                          f"{sys.executable} -m pip install sentencepiece")
    (shims / "sentencepiece").mkdir(parents=True, exist_ok=True)
    (shims / "sentencepiece" / "__init__.py").write_text(_SENTENCEPIECE_STUB, encoding="utf-8")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shims), env.get("PYTHONPATH", "")) if p)
    return env


def _model_name(output_dir: Path) -> str:
    """The GGUF's general.name and file stem: the run folder's name, made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(output_dir).resolve().name).strip("-.") or "model"


def _require_ok(done: Completed, produced: Path, what: str, timeout_s: float) -> None:
    if done.returncode is None:
        raise CheckFailed(f"{what} did not finish within {timeout_s:.0f} s and was stopped")
    if done.returncode != 0 or not produced.is_file():
        tail = "\n".join(done.output.strip().splitlines()[-15:]) or "no output"
        raise CheckFailed([f"{what} failed (exit {done.returncode}); its last lines:", tail,
                           "report this with the lines above and `pip list` output"])


def fallback_notes(quantizer_output: str) -> list[str]:
    """llama.cpp's K-quants need rows of a multiple of 256 values; narrower tensors fall back to another type
    (SmolLM2-135M: hidden size 576, so most tensors become Q5_0). One note summing its warnings up."""
    fallbacks = re.findall(r"falling back to\s+(\w+)", quantizer_output)
    if not fallbacks:
        return []
    counts = {t: fallbacks.count(t) for t in sorted(set(fallbacks))}
    types = ", ".join(f"{t} ({n})" for t, n in counts.items())
    note = (f"{len(fallbacks)} tensors have rows not divisible by 256, which K-quants need, so llama.cpp stored them "
            f"as {types} instead of a K-quant (normal for small models)")
    return [note]


def check_gguf(path: Path, file_type: int) -> bool:
    """Read the written GGUF back: its general.file_type must be the one asked for, and it must have tensors
    and a tokenizer. Returns tokenizer.ggml.add_bos_token (llama.cpp then adds BOS itself)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        found = reader.fields.get(key)
        return found.contents() if found is not None else None

    problems = []
    if value("general.file_type") != file_type:
        problems.append(f"general.file_type is {value('general.file_type')}, not {file_type}")
    if not reader.tensors:
        problems.append("it has no tensors")
    if value("tokenizer.ggml.model") is None:
        problems.append("it has no tokenizer")
    if problems:
        raise CheckFailed(f"{path.name}: the converter wrote a GGUF that is not what was asked for: "
                          f"{'; '.join(problems)}; report this with `pip list` output")
    return bool(value("tokenizer.ggml.add_bos_token"))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _listing(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in folder.iterdir()))


def _size(folder: Path, files: tuple[str, ...]) -> int:
    return sum((folder / f).stat().st_size for f in files if (folder / f).is_file())


# --- the converter, fetched once ---------------------------------------------------------------------

def tools_dir(pin: LlamaCppPin = LLAMA_CPP_PYTHON) -> Path:
    from qlora_doctor.core.fileio import cache_root

    return cache_root() / "tools" / f"llama.cpp-{pin.llama_cpp_commit}"


def ensure_converter(run: Runner = run_bounded, pin: LlamaCppPin = LLAMA_CPP_PYTHON) -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/, fetching it first
    when the cache lacks it. `run` runs pip (tests pass a fake to simulate being offline)."""
    from qlora_doctor.trainer.builtin import downloads_dir

    target = tools_dir(pin)
    if (target / TOOLS_SOURCE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        work = Path(tmp)
        seeded = downloads_dir() / pin.sdist
        sdist = seeded if seeded.is_file() else _download_sdist(pin, work / "download", run, seeded)
        _verify_sha256(sdist, pin)
        build = work / "tools"
        extract_converter(sdist, build, pin)
        _write_json(build / TOOLS_SOURCE, {"package": pin.pip_spec, "sdist": pin.sdist, "sha256": pin.sha256,
                                           "llama_cpp_commit": pin.llama_cpp_commit, "members": list(pin.members),
                                           "license": "MIT (llama.cpp, llama-cpp-python)"})
        try:
            os.rename(build, target)
        except OSError:
            if not (target / TOOLS_SOURCE).is_file():  # another process finished first: theirs is as good
                raise
    return target


def _download_sdist(pin: LlamaCppPin, dest: Path, run: Runner, seeded: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", pin.pip_spec,
            "-d", str(dest)]
    fix = (f"connect this machine to PyPI and retry, or on a machine with network run "
           f"`pip download --no-deps --no-binary :all: {pin.pip_spec} -d DIR` and copy DIR/{pin.sdist} to {seeded}")
    done = run(argv, PIP_TIMEOUT_S)
    if done.returncode is None:
        raise CheckFailed(f"`pip download {pin.pip_spec}` did not finish within {PIP_TIMEOUT_S} s; {fix}")
    sdist = dest / pin.sdist
    if done.returncode != 0 or not sdist.is_file():
        last = done.output.strip().splitlines()[-1:] or ["no output"]
        raise CheckFailed(f"`pip download {pin.pip_spec}` failed (exit {done.returncode}: {last[0][:300]}); {fix}")
    return sdist


def _verify_sha256(path: Path, pin: LlamaCppPin) -> None:
    from qlora_doctor.core.fileio import sha256_of

    digest = sha256_of(path)
    if digest != pin.sha256:
        raise CheckFailed(f"{path}: sha256 {digest} is not the pinned {pin.sha256} of {pin.pip_spec}; "
                          "delete the file and retry so it is downloaded again")


def extract_converter(sdist: Path, dest: Path, pin: LlamaCppPin = LLAMA_CPP_PYTHON) -> list[str]:
    """Copy only `pin.members` of the sdist's vendor/llama.cpp/ into `dest` (regular files and folders,
    no links, nothing outside `dest`). Returns the relative paths written."""
    prefix = f"{pin.sdist[: -len('.tar.gz')]}/vendor/llama.cpp/"
    written: list[str] = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            if not member.name.startswith(prefix):
                continue
            rel = member.name[len(prefix):]
            wanted = any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in pin.members)
            parts = Path(rel).parts
            if not wanted or not member.isfile() or ".." in parts or Path(rel).is_absolute():
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with source, open(out, "wb") as f:
                shutil.copyfileobj(source, f)
            written.append(rel)
    if "convert_hf_to_gguf.py" not in written or not any(w.startswith("gguf-py/") for w in written):
        raise CheckFailed(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py and gguf-py/ in it; delete the "
                          "file and retry")
    return written


# --- q4_k_m: llama.cpp's quantizer ---------------------------------------------------------------------

_QUANTIZE_WITH_LLAMA_CPP = (
    "import sys, llama_cpp\n"
    "params = llama_cpp.llama_model_quantize_default_params()\n"
    "params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M\n"
    "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))\n"
)
"""Run as `python -c` with (src, dst, Q4_K_M), so the C++ quantizer gets a time bound and its log is read."""


def find_quantizer(pin: LlamaCppPin = LLAMA_CPP_PYTHON, which: Callable[[str], str | None] = shutil.which,
                   installed: Callable[[str], str | None] | None = None) -> list[str]:
    """The argv prefix of llama.cpp's quantizer: the pinned `llama_cpp` module (same llama.cpp commit as the
    converter), else `llama-quantize` on PATH. Raises CheckFailed with the install command when neither."""
    installed = installed or _installed_version
    have = installed("llama-cpp-python")
    if have == pin.version:
        return [sys.executable, "-c", _QUANTIZE_WITH_LLAMA_CPP]
    binary = which("llama-quantize")
    if binary:
        return [binary]
    other = f" (llama-cpp-python {have} is installed, not {pin.version})" if have else ""
    raise CheckFailed([(f"--quant q4_k_m needs llama.cpp's quantizer, and none was found{other}: neither the "
                        f"llama_cpp module of {pin.pip_spec} nor `llama-quantize` on PATH."),
                       (f"install it (it compiles llama.cpp, about 5-13 minutes on 2 cores): "
                        f"{sys.executable} -m pip install {pin.pip_spec}"),
                       "or use --quant q8_0 or f16, which need no compiler"])


def _installed_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _quantizer_label(argv: list[str]) -> str:
    return f"llama_cpp {LLAMA_CPP_PYTHON.version}" if "-c" in argv else argv[0]


# --- the Ollama Modelfile ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatFamily:
    """A chat format Ollama can render: its Go TEMPLATE and a Python emulation of what Ollama sends."""

    name: str
    template: str
    turn: str
    """One message, with {role} and {content}."""
    generation: str
    """What opens the assistant's answer."""
    system_turn: str
    """A regex matching a leading system turn, its text as group 1."""
    stops: tuple[str, ...]


# Go templates as in ollama's template/chatml.gotmpl and llama3-instruct.gotmpl (since 413ae39f3, 2024-08-27):
# they loop over .Messages only, because Ollama leaves system messages in .Messages.
CHAT_FAMILIES = (
    ChatFamily("chatml",
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n",
               "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n",
               r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n", ("<|im_start|>", "<|im_end|>")),
    ChatFamily("llama3",
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
               r"^<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
)
PROBES = (
    ({"role": "user", "content": "Hello, how are you?"},),
    ({"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}),
    ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}),
    ({"role": "system", "content": "S"}, {"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
     {"role": "user", "content": "C"}),
)


def ollama_render(family: ChatFamily, system: str | None, messages: tuple[dict[str, str], ...]) -> str:
    """What Ollama's /api/chat sends the model with this TEMPLATE and SYSTEM: the SYSTEM prepended when the
    request has no system message (server/routes.go), consecutive same-role messages joined with a blank
    line (template.go collate())."""
    msgs = list(messages)
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    merged: list[dict[str, str]] = []
    for m in msgs:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append(dict(m))
    return "".join(family.turn.format(role=m["role"], content=m["content"]) for m in merged) + family.generation


def chat_family(tokenizer: Any, add_bos: bool) -> tuple[ChatFamily | None, str | None]:
    """The known family whose rendering equals the tokenizer's chat template on every probe, and the default
    system prompt that template injects; (None, None) when none does or there is no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None, None

    def hf(messages: tuple[dict[str, str], ...]) -> str:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        # With add_bos_token llama.cpp (so Ollama) adds BOS when tokenizing: the TEMPLATE must not have it.
        if add_bos and tokenizer.bos_token and text.startswith(tokenizer.bos_token):
            text = text[len(tokenizer.bos_token):]
        return text

    from jinja2 import TemplateError

    try:
        rendered = [hf(p) for p in PROBES]
    except (TemplateError, ValueError, TypeError, KeyError, IndexError):
        # a template that rejects a probe (raise_exception: no system role, strict alternation) is no family here
        return None, None
    for family in CHAT_FAMILIES:
        match = re.match(family.system_turn, rendered[0], re.DOTALL)
        system = match.group(1) if match else None
        if all(r == ollama_render(family, system, p) for r, p in zip(rendered, PROBES)):
            return family, system
    return None, None


def ollama_modelfile(tokenizer: Any, gguf_name: str, add_bos: bool = False) -> OllamaModelfile:
    """The Modelfile for `gguf_name` (beside it): FROM, TEMPLATE and SYSTEM of the matching family, and the
    family's stop sequences plus the tokenizer's eos token."""
    family, system = chat_family(tokenizer, add_bos)
    stops = list(family.stops) if family else []
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines = [f"# Written by qlora-doctor export. Use: ollama create NAME -f {MODELFILE}", f"FROM ./{gguf_name}"]
    if family is not None:
        lines.insert(1, f"# TEMPLATE: the {family.name} format, checked to render like the tokenizer's chat template")
        lines.append(f'TEMPLATE """{family.template}"""')
        if system and '"""' not in system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.insert(1, "# No TEMPLATE: the tokenizer's chat template matches no known family (ChatML, Llama-3)")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return OllamaModelfile(text="\n".join(lines) + "\n", family=family.name if family else None, system=system,
                           stops=tuple(stops))
