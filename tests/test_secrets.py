"""No secret leaves the machine through what qlora-doctor prints or writes (qlora_doctor/core/redact.py).

Secrets are planted where a user has them (HF_TOKEN & co. in the environment, a token in
`$HF_HOME/token` and `~/.cache/huggingface/token`) and where they would flow into output (a machine
file's fields, a requirements line, a pasted log); then every output is searched for them.
The trainer's outputs (manifest, report, lockfile, recipe, metrics, adapter) are searched the same way
in tests/test_interrupt.py, on a real run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qlora_doctor.cli import cli
from qlora_doctor.core.fileio import write_atomic
from qlora_doctor.core.redact import known_secrets, redact, redact_data

HF_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
HUB_TOKEN = "hf_" + "HubTokenHubTokenHubTokenHubToken99"
FILE_TOKEN = "hf_" + "SavedByHuggingfaceCliLogin00000000"
CACHE_TOKEN = "hf_" + "InTheDefaultCacheFolder1111111111"
WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
OPENAI_KEY = "sk-proj-" + "x1Y2z3" * 8
CUSTOM = "s3cr3t-value-of-a-custom-var"
PASTED = "hf_" + "FromSomeoneElsesMachine2222222222"  # not this machine's: caught by its shape
URL_PASSWORD = "pypi-AgEIcHlwaS5vcmcCJGI"
ALL = (HF_TOKEN, HUB_TOKEN, FILE_TOKEN, CACHE_TOKEN, WANDB_KEY, OPENAI_KEY, CUSTOM, PASTED, URL_PASSWORD)
GOOD_PINS = ("torch==2.5.1+cu124\ntransformers==4.46.3\npeft==0.13.2\nbitsandbytes==0.45.0\n"
             "accelerate==1.1.1\ndatasets==3.1.0\n")


@pytest.fixture
def secrets(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text(CACHE_TOKEN + "\n")
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    (hf_home / "token").write_text(FILE_TOKEN)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    for name, value in {"HF_TOKEN": HF_TOKEN, "HUGGING_FACE_HUB_TOKEN": HUB_TOKEN, "WANDB_API_KEY": WANDB_KEY,
                        "OPENAI_API_KEY": OPENAI_KEY, "MY_SERVICE_PASSWORD": CUSTOM}.items():
        monkeypatch.setenv(name, value)
    return tmp_path


def leaky_machine(folder: Path) -> Path:
    """A machine file whose free-text fields carry every secret (as a careless copy-paste would)."""
    path = folder / "machine.json"
    path.write_text(json.dumps({
        "os": "linux", "arch": "x86_64", "python": "3.11.7", "driver_version": "550.54.15",
        "libc": "glibc 2.36 " + " ".join(ALL[:7]),
        "gpus": [{"name": f"NVIDIA A100 {PASTED} https://user:{URL_PASSWORD}@pypi.example.com/simple",
                  "compute_capability": "8.0", "memory_total_mib": 81920}]}))
    return path


def assert_clean(text: str, what: str) -> None:
    for secret in ALL:
        assert secret not in text, f"{what} contains {secret[:8]}..."


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input)


# --- the redactor -------------------------------------------------------------------------------------

def test_known_secrets_come_from_the_environment_and_both_token_files(secrets):
    found = known_secrets()
    assert found[HF_TOKEN] == "HF_TOKEN" and found[HUB_TOKEN] == "HUGGING_FACE_HUB_TOKEN"
    assert found[WANDB_KEY] == "WANDB_API_KEY" and found[OPENAI_KEY] == "OPENAI_API_KEY"
    assert found[CUSTOM] == "MY_SERVICE_PASSWORD"
    assert found[FILE_TOKEN] == found[CACHE_TOKEN] == "huggingface token file"


@pytest.mark.parametrize("text, gone, kept", [
    (f"Authorization: Bearer {PASTED}", PASTED, "Authorization: Bearer"),
    ("OPENAI_API_KEY=sk-ant-api03-abcdefghijklmnopqrstuvwxyz", "sk-ant-api03", "OPENAI_API_KEY="),
    ('{"api_key": "zzzzzzzzzzzz"}', "zzzzzzzzzzzz", '"api_key"'),
    ("use_auth_token=abcdefghijkl", "abcdefghijkl", "use_auth_token="),
    ("export GITHUB_TOKEN=ghp_" + "a" * 36, "ghp_" + "a" * 36, "export GITHUB_TOKEN="),
    ("aws AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE", "aws "),
    (f"--index-url https://__token__:{URL_PASSWORD}@pypi.example.com/simple", URL_PASSWORD, "@pypi.example.com"),
])
def test_token_shapes_are_redacted_wherever_they_appear(text, gone, kept):
    out = redact(text, {})
    assert gone not in out and kept in out and "[redacted" in out


@pytest.mark.parametrize("text", [
    "pad_token: <|endoftext|>", "eos_token: '<|im_end|>'", "max_new_tokens: 12345678",
    "from huggingface_hub import hf_hub_download", "commit 0123456789abcdef0123456789abcdef01234567",
    "torch==2.5.1 --hash=sha256:" + "ab" * 32, "git+https://github.com/org/repo@v1.0",
    "tokenizer: 49152 tokens", "Token indices sequence length is longer than the specified maximum",
])
def test_ordinary_text_survives(text):
    assert redact(text, {}) == text


@settings(max_examples=500, deadline=1000, derandomize=True, database=None)
@given(before=st.text(max_size=40), body=st.text(alphabet="abcXYZ0189", min_size=30, max_size=60),
       after=st.text(max_size=40))
def test_any_hf_token_inside_any_text_is_redacted(before, body, after):
    assume(not (before[-1:].isalnum() or before.endswith("_")))  # `xhf_...` is not a token start
    out = redact(before + "hf_" + body + after, {})
    assert "hf_" + body not in out
    assert redact(out, {}) == out


def test_redact_data_walks_reports_and_json(secrets):
    from qlora_doctor.core.report import Check, Report

    report = Report(checks=(Check("x", "warn", "t", detail=f"token {HF_TOKEN}", sources=(PASTED,)),),
                    machine={"libc": WANDB_KEY, HF_TOKEN: [OPENAI_KEY]}, packages={})
    clean = redact_data(report)
    assert_clean(json.dumps(clean.to_json()), "redacted report")
    assert clean.checks[0].detail == "token [redacted HF_TOKEN]" and clean.checks[0].id == "x"


# --- every writer and every output ----------------------------------------------------------------------

def test_write_atomic_redacts_text_and_keeps_bytes(secrets):
    path = secrets / "report.json"
    write_atomic(path, json.dumps({"env": {"HF_TOKEN": HF_TOKEN}, "log": f"Bearer {PASTED}"}))
    assert_clean(path.read_text(), "a file written by write_atomic")
    blob = bytes(range(256)) + HF_TOKEN.encode()
    write_atomic(secrets / "weights.bin", blob)
    assert (secrets / "weights.bin").read_bytes() == blob, "binary files (weights) must be written unchanged"


def test_check_json_table_and_saved_machine_are_clean(secrets):
    machine = leaky_machine(secrets)
    req = secrets / "req.txt"
    req.write_text(GOOD_PINS)
    saved = secrets / "saved-machine.json"
    result = invoke("check", "--json", "--machine", str(machine), "--no-resolve", "-r", str(req), "--save-machine", str(saved))
    assert result.exit_code in (0, 1), result.output
    data = json.loads(result.stdout)
    assert "[redacted" in data["machine"]["libc"]
    assert_clean(result.output, "check --json")
    assert_clean(saved.read_text(), "--save-machine file")
    result = invoke("check", "-v", "--machine", str(machine), "--no-resolve", "-r", str(req))
    assert result.exit_code in (0, 1), result.output
    assert_clean(result.output, "check table")


def test_error_messages_quoting_a_bad_line_are_clean(secrets):
    req = secrets / "req.txt"
    req.write_text(f"torch @ https://user:{URL_PASSWORD}@pypi.example.com/torch.whl ; {HF_TOKEN}\n")
    result = invoke("check", "--no-resolve", "-r", str(req), "--machine", str(leaky_machine(secrets)))
    assert result.exit_code == 2, result.output
    assert f"{req}:1:" in result.output
    assert_clean(result.output, "error message")


def test_explain_on_a_pasted_log_with_tokens_is_clean(secrets):
    log = (f"HF_TOKEN={HF_TOKEN}\nwandb: W&B API key is configured ({WANDB_KEY})\n"
           f"requests.exceptions.HTTPError: 401 Client Error (Authorization: Bearer {PASTED})\n"
           f"openai key {OPENAI_KEY}\n"
           "ValueError: Your setup doesn't support bf16/gpu.\n")
    for args in (("explain", "-"), ("explain", "--json", "-")):
        result = invoke(*args, input=log)
        assert result.exit_code == 0, result.output  # the bf16 error is still recognised
        assert_clean(result.output, " ".join(args))


def test_validate_json_output_is_clean(secrets):
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"
    text = recipe.read_text().replace("path: data/demo/train.jsonl", f"path: {recipe.parent}/data/demo/train.jsonl")
    text = text.replace("eval_path: data/demo/eval.jsonl", f"eval_path: {recipe.parent}/data/demo/eval.jsonl")
    text = text.replace("trust_remote_code: false", f"trust_remote_code: false\n  revision: {HF_TOKEN}")
    path = secrets / "leaky.yaml"
    path.write_text(text)
    result = invoke("validate", "--json", str(path))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resolved"]["model"]["revision"] == "[redacted HF_TOKEN]"
    assert_clean(result.output, "validate --json")


def test_lockfile_is_clean(secrets, monkeypatch):
    """The lockfile's header repeats the command line; a token-shaped path in it is redacted too."""
    folder = secrets / PASTED
    folder.mkdir()
    machine = folder / "cpu.json"
    machine.write_text(json.dumps({"os": "linux", "arch": "x86_64", "python": "3.11.7", "gpus": []}))
    out = secrets / "requirements.lock.txt"
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    result = invoke("lock", "--machine", str(machine), "-o", str(out))
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "torch==" in text and "[redacted]" in text
    assert_clean(text, "lockfile")
    assert_clean(result.output, "lock output")
