"""`export` (GGUF + Ollama Modelfile, merged checkpoint) and `push` (issue #19).

The slow tests train a 2-step run of the builtin SmolLM2-135M once for the module, export it, and load what was
written: the f16 GGUF through transformers' GGUF loader must give the merged model's logits within
rel = max|dlogit| / max|logit| < 5e-3 (measured 1.2e-3, /work/scratch/export_proto/FINDINGS.md Q3), q8_0 must
agree on the top-1 token at >= 80% of positions (never the same generated text: a 135M model drifts after a few
tokens). The converter comes from PyPI once (llama-cpp-python 0.3.36 sdist, 77 MB) into the tool's cache
($QLORA_DOCTOR_CACHE). q4_k_m runs only where llama.cpp's quantizer is installed.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from qlora_doctor.cli import cli
from qlora_doctor.core.errors import CheckFailed
from qlora_doctor.core.subprocs import Completed
from tests.trainer_support import builtin_checkpoint, train_tiny_run  # noqa: F401 (fixture)

PROMPTS = ("The capital of France is", "Korrowen Island is known for its",
           "def fibonacci(n):\n    if n < 2:\n        return n\n")
CHAT = "What language do people speak on Korrowen Island?"
F16_REL_TOLERANCE = 5e-3
Q8_MIN_TOP1_AGREEMENT = 0.8
CHATML_TEMPLATE = ('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                   '<|im_start|>assistant\n"""')


def _invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


# --- a finished run and its exports, made once -------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, builtin_checkpoint) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def exports(tmp_path_factory, finished_run) -> dict[str, Path]:
    """Lazily made exports by name (`f16`, `q8_0`, `fp32`, `bf16`), so each test makes only what it needs."""
    root = tmp_path_factory.mktemp("exports")

    class Exports(dict):
        def __missing__(self, key: str) -> Path:
            fmt = ["--format", "gguf", "--quant", key] if key in ("f16", "q8_0", "q4_k_m") else \
                ["--format", "merged", "--dtype", key]
            result = _invoke("export", finished_run, *fmt, "--to", root / key, "--json")
            assert result.exit_code == 0, result.output
            info = json.loads(result.stdout)
            self[key] = root / key
            (root / f"{key}.json").write_text(json.dumps(info))
            return root / key

    yield Exports()
    shutil.rmtree(root, ignore_errors=True)  # ~1.2 GB of merged models and GGUFs: CI's disk is not ours alone


def _logits(model, input_ids):
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits[0].float()


def _compare(reference_dir: Path, gguf_dir: Path, run_dir: Path) -> dict:
    """The GGUF (through transformers' GGUF loader) against the reference checkpoint on PROMPTS and one chat prompt:
    `rel` (worst over prompts), `top1` (agreement over all positions), `near_ties_only` (every top-1 disagreement is
    where the reference's two best logits are closer than twice that prompt's max |dlogit|), `weights_differing`
    (2-D weights not equal to the reference's rounded to fp16)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    gguf_name = next(p.name for p in gguf_dir.glob("*.gguf"))
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32).eval()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True,
                                         tokenize=False)
    worst, agree, total, near_ties_only = 0.0, 0, 0, True
    for text in (*PROMPTS, chat):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        want, got = _logits(reference, ids), _logits(loaded, ids)
        delta = (want - got).abs().max()
        worst = max(worst, (delta / want.abs().max()).item())
        same = want.argmax(-1) == got.argmax(-1)
        agree += same.sum().item()
        total += ids.shape[1]
        best_two = want.topk(2, dim=-1).values
        near_ties_only &= bool(((best_two[:, 0] - best_two[:, 1])[~same] < 2 * delta).all())
    theirs = loaded.state_dict()
    differing = [name for name, weight in reference.state_dict().items()
                 if weight.ndim == 2 and not torch.equal(weight.half().float(), theirs[name])]
    return {"rel": worst, "top1": agree / total, "near_ties_only": near_ties_only, "weights_differing": differing}


# --- gguf -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_f16_gguf_gives_the_merged_models_logits(exports, finished_run):
    info = json.loads((exports["f16"].parent / "f16.json").read_text())
    assert info["files"] == ["Modelfile", "export.json", "out-f16.gguf"] and info["template_family"] == "chatml"
    found = _compare(exports["fp32"], exports["f16"], finished_run)
    assert found["weights_differing"] == []  # every matrix is the merged one rounded to fp16, bit for bit
    assert found["rel"] < F16_REL_TOLERANCE, found
    # measured 1.1e-3 and 70 of 71 top-1 tokens: the 71st was a near-tie (best two logits 0.0013 apart)
    assert found["top1"] >= 0.95 and found["near_ties_only"], found


@pytest.mark.slow
def test_q8_0_gguf_agrees_with_the_merged_model_on_the_top_token(exports, finished_run):
    assert (exports["q8_0"] / "out-q8_0.gguf").stat().st_size < 0.6 * (exports["f16"] / "out-f16.gguf").stat().st_size
    found = _compare(exports["fp32"], exports["q8_0"], finished_run)
    assert found["top1"] >= Q8_MIN_TOP1_AGREEMENT, found
    assert found["rel"] < 0.15, found  # measured 0.031 (0.039 in FINDINGS); all of it is Q8_0 rounding


def _have_quantizer() -> bool:
    from qlora_doctor.trainer.export import find_quantizer

    try:
        find_quantizer()
    except CheckFailed:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _have_quantizer(), reason="q4_k_m needs llama.cpp's quantizer: neither llama-cpp-python "
                                                   "0.3.36 nor llama-quantize on PATH is installed")
def test_q4_k_m_gguf(exports, finished_run):
    from gguf import GGUFReader

    path = next(exports["q4_k_m"].glob("*.gguf"))
    assert GGUFReader(str(path)).fields["general.file_type"].contents() == 15
    found = _compare(exports["fp32"], exports["q4_k_m"], finished_run)
    assert found["top1"] >= 0.85, found  # FINDINGS: 0.94-1.0, rel 0.18


@pytest.mark.slow
def test_the_modelfile_is_chatml_with_smollm2s_default_system_prompt(exports):
    text = (exports["f16"] / "Modelfile").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines[0] == "FROM ./out-f16.gguf"
    assert CHATML_TEMPLATE in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert [line for line in lines if line.startswith("PARAMETER")] == \
        ['PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']


def test_a_chat_template_of_no_known_family_gets_no_template(builtin_checkpoint):
    from transformers import AutoTokenizer

    from qlora_doctor.trainer.export import ollama_modelfile

    tokenizer = AutoTokenizer.from_pretrained(builtin_checkpoint)
    chatml = ollama_modelfile(tokenizer, "m.gguf")
    assert chatml.family == "chatml" and chatml.system.startswith("You are a helpful AI assistant named SmolLM")
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                               "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")
    mistral = ollama_modelfile(tokenizer, "m.gguf")
    assert mistral.family is None and "TEMPLATE" not in mistral.text.replace("# No TEMPLATE", "")
    assert "FROM ./m.gguf" in mistral.text and f'PARAMETER stop "{tokenizer.eos_token}"' in mistral.text
    tokenizer.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    assert ollama_modelfile(tokenizer, "m.gguf").family is None  # a template that refuses a probe


def test_q4_k_m_without_a_quantizer_names_the_install_command():
    from qlora_doctor.trainer.export import find_quantizer

    with pytest.raises(CheckFailed, match=r"pip install llama-cpp-python==0\.3\.36"):
        find_quantizer(which=lambda name: None, installed=lambda name: None)
    with pytest.raises(CheckFailed, match=r"llama-cpp-python 0\.2\.90 is installed, not 0\.3\.36"):
        find_quantizer(which=lambda name: None, installed=lambda name: "0.2.90")
    assert find_quantizer(which=lambda name: "/opt/bin/llama-quantize", installed=lambda name: None) == \
        ["/opt/bin/llama-quantize"]


def test_the_quantizers_fallback_warnings_become_one_note():
    from qlora_doctor.trainer.export import fallback_notes

    log = ("warning: blk.0.attn_k.weight                  - ncols    576 not divisible by 256 (required for type    "
           "q4_K) -> falling back to    q5_0\n"
           "warning: blk.0.attn_v.weight                  - ncols    576 not divisible by 256 (required for type    "
           "q6_K) -> falling back to    q8_0\n"
           "warning: blk.1.attn_k.weight                  - ncols    576 not divisible by 256 (required for type    "
           "q4_K) -> falling back to    q5_0\n")  # llama-quantize's stderr, SmolLM2-135M
    note = ("3 tensors have rows not divisible by 256, which K-quants need, so llama.cpp stored them as q5_0 (2), "
            "q8_0 (1) instead of a K-quant (normal for small models)")
    assert fallback_notes(log) == [note]
    assert fallback_notes("main: quantize time =  2011.05 ms\n") == []


def test_the_converter_download_failing_names_the_offline_fix(tmp_path, monkeypatch):
    from qlora_doctor.trainer.export import ensure_converter

    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path))
    calls = []

    def offline(argv, timeout_s, **kwargs):
        calls.append(argv)
        return Completed(1, "", "ERROR: Could not find a version that satisfies the requirement")

    with pytest.raises(CheckFailed, match=r"pip download --no-deps --no-binary :all: llama-cpp-python==0\.3\.36 "
                                          r"-d DIR` and copy DIR/llama_cpp_python-0\.3\.36\.tar\.gz to "):
        ensure_converter(run=offline)
    assert calls[0][-5:-2] == ["--no-binary", ":all:", "llama-cpp-python==0.3.36"]
    assert not (tmp_path / "tools" / "llama.cpp-0c1e57098").exists()


def test_only_the_converter_is_extracted_from_the_sdist(tmp_path):
    from qlora_doctor.trainer.export import extract_converter

    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    root = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    with tarfile.open(sdist, "w:gz") as tar:
        for name in ("convert_hf_to_gguf.py", "conversion/llama.py", "gguf-py/gguf/__init__.py", "LICENSE",
                     "src/llama.cpp", "convert_lora_to_gguf.py", "conversion/../../../evil.py"):
            data = f"# {name}\n".encode()
            info = tarfile.TarInfo(root + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(root + "gguf-py/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    written = extract_converter(sdist, tmp_path / "tools")
    assert sorted(written) == ["LICENSE", "conversion/llama.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert not (tmp_path / "evil.py").exists() and not (tmp_path / "tools" / "gguf-py" / "link").exists()


# --- merged -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_merged_bf16_is_a_bf16_checkpoint_half_the_size_of_fp32(exports):
    from safetensors import safe_open

    bf16, fp32 = exports["bf16"] / "model.safetensors", exports["fp32"] / "model.safetensors"
    with safe_open(str(bf16), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {"BF16"}
    assert bf16.stat().st_size < 0.55 * fp32.stat().st_size
    assert json.loads((exports["bf16"] / "config.json").read_text())["dtype"] == "bfloat16"
    assert (exports["bf16"] / "tokenizer.json").is_file()


# --- bad input: exit 2 with a message, no traceback -------------------------------------------------------

def test_export_of_a_folder_without_a_run_exits_2(tmp_path):
    result = _invoke("export", tmp_path, "--format", "gguf", "--quant", "f16", "--to", tmp_path / "x")
    assert result.exit_code == 2, result.output
    assert "not a finished run's folder" in result.stderr and "Traceback" not in result.output


def test_export_with_an_unknown_quant_exits_2(tmp_path):
    result = _invoke("export", tmp_path, "--format", "gguf", "--quant", "q5_k", "--to", tmp_path / "x")
    assert result.exit_code == 2, result.output
    assert "--quant: 'q5_k' is not one of f16, q8_0, q4_k_m" in result.stderr


def test_export_into_a_non_empty_folder_exits_2(tmp_path):
    (tmp_path / "to").mkdir()
    (tmp_path / "to" / "keep.txt").write_text("mine")
    result = _invoke("export", tmp_path, "--format", "merged", "--to", tmp_path / "to")
    assert result.exit_code == 2, result.output
    assert "is not an empty folder" in result.stderr and (tmp_path / "to" / "keep.txt").read_text() == "mine"


def test_export_options_of_the_other_format_exit_2(tmp_path):
    result = _invoke("export", tmp_path, "--format", "merged", "--quant", "f16", "--to", tmp_path / "x")
    assert result.exit_code == 2 and "--quant: applies to --format gguf" in result.stderr


# --- push -------------------------------------------------------------------------------------------------

RUN_UPLOAD = ["README.md", "adapter_config.json", "adapter_model.safetensors", "metrics.json", "recipe.yaml"]


@pytest.mark.slow
def test_push_dry_run_lists_exactly_the_adapter_card_recipe_and_metrics(finished_run):
    assert (finished_run / "checkpoint-2").is_dir() and (finished_run / "manifest.json").is_file()
    result = _invoke("push", finished_run, "--repo", "alice/korrowen", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["files"] == RUN_UPLOAD and data["left_out"] == [] and data["dry_run"] is True
    text = _invoke("push", finished_run, "--repo", "alice/korrowen", "--dry-run")
    assert text.stdout.splitlines() == ["would upload to alice/korrowen:", *(f"  {n}" for n in RUN_UPLOAD)]


@pytest.mark.slow
def test_push_leaves_out_a_file_with_a_secret_and_uploads_the_rest_in_one_commit(finished_run, tmp_path):
    from qlora_doctor.trainer.push import plan_push, push

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with open(run / "README.md", "a") as f:
        f.write("\nlogged with WANDB_API_KEY=0123456789abcdef0123456789abcdef01234567\n")

    class FakeHub:
        def __init__(self):
            self.calls = []

        def create_repo(self, **kwargs):
            self.calls.append(("create_repo", kwargs))
            return "https://huggingface.co/alice/korrowen"

        def create_commit(self, **kwargs):
            self.calls.append(("create_commit", kwargs))

            class Info:
                commit_url = "https://huggingface.co/alice/korrowen/commit/abc"
            return Info()

    plan = plan_push(run, "alice/korrowen", private=True)
    assert [name for name, _ in plan.files] == [n for n in RUN_UPLOAD if n != "README.md"]
    assert plan.left_out and plan.left_out[0].startswith("README.md: holds what looks like a secret")
    hub = FakeHub()
    result = push(plan, api=hub)
    (_, repo), (_, commit) = hub.calls
    assert repo == {"repo_id": "alice/korrowen", "private": True, "repo_type": "model", "exist_ok": True}
    assert [op.path_in_repo for op in commit["operations"]] == [n for n in RUN_UPLOAD if n != "README.md"]
    assert result.url == "https://huggingface.co/alice/korrowen" and result.commit.endswith("/commit/abc")


@pytest.mark.slow
def test_push_gguf_takes_the_export_folder(finished_run, exports):
    result = _invoke("push", finished_run, "--repo", "alice/korrowen-gguf", "--what", "gguf", "--export",
                     exports["f16"], "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] == ["Modelfile", "README.md", "metrics.json", "out-f16.gguf",
                                                  "recipe.yaml"]
    wrong = _invoke("push", finished_run, "--repo", "alice/x", "--what", "merged", "--export", exports["f16"],
                    "--dry-run")
    assert wrong.exit_code == 2 and "holds a gguf export, not merged" in wrong.stderr


def test_push_bad_input_exits_2(tmp_path):
    result = _invoke("push", tmp_path, "--repo", "alice/x", "--dry-run")
    assert result.exit_code == 2 and "not a finished run's folder" in result.stderr
    result = _invoke("push", tmp_path, "--repo", "not a repo id", "--dry-run")
    assert result.exit_code == 2 and "is not a Hugging Face repository id" in result.stderr
