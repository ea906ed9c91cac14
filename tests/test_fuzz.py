"""Fuzzing every input the tool reads: machine files, requirements files, nvidia-smi and /proc output,
torch's version.py, installed metadata, pasted logs and recipes.

What must hold for every generated input: no traceback (the function returns a result, or raises the
one error type its contract names), no hang (hypothesis' `deadline`), and every rejection names the
file and the key or line. Most cases call the library directly (fast); a subset goes through the CLI
(`CliRunner` on `qlora_doctor.cli:cli`) and must exit 2 with the file named.

Derandomized, so CI sees the same cases every run; the counts below are per test.
`pytest tests/test_fuzz.py --hypothesis-show-statistics` prints how many cases each test ran.
"""

from __future__ import annotations

import atexit
import copy
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qlora_doctor.cli import cli
from qlora_doctor.doctor.diagnose import environment_checks
from qlora_doctor.knowledge.explain import explain_text
from qlora_doctor.knowledge.loading import load_rules
from qlora_doctor.sources.machine import (NVIDIA_SMI_FIELDS, NVIDIA_SMI_FIELDS_OLD, parse_nvidia_smi_csv,
    parse_nvidia_smi_header, parse_proc_driver_version)
from qlora_doctor.core.machine import Machine, load_machine_file, machine_from_dict
from qlora_doctor.core.environment import Environment, parse_torch_version_py
from qlora_doctor.sources.requirements import environment_from_pins, parse_requirements
from qlora_doctor.sources.installed import installed_environment
from qlora_doctor.core.errors import InputError

from helpers import CPU_MACHINE, DEFAULT_MACHINE, env, machine

# Library-level fuzzing: many cases, each well under a millisecond to a few milliseconds.
MANY = 1000
# Through files and the CLI: fewer cases, each a few milliseconds more.
SOME = 250
FUZZ = settings(max_examples=MANY, deadline=1000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])
FUZZ_FILES = settings(FUZZ, max_examples=SOME)

SCRATCH = Path(tempfile.mkdtemp(prefix="qlora-doctor-fuzz-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
GOOD_ENV = env(torch="2.5.1+cu124", transformers="4.46.3", peft="0.13.2", bitsandbytes="0.45.0",
               accelerate="1.1.1", datasets="3.1.0")
STATUSES = {"pass", "warn", "fail", "unknown"}

# --- building blocks ------------------------------------------------------------------------------

# Text that real files contain, and text they should never contain.
weird_text = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=60),
    st.sampled_from(["", " ", "\t", "\n", "\x00", "\ufeff", "é", "日本語", "🦙", "\u202e", "NaN", "inf",
                     "-1", "0", "1e400", "9" * 40, "[N/A]", "[Field Not Supported]", "null", "None",
                     "8.0", "12.0", "550.54.15", "3.11.7", "2.5.1+cu124", "x86_64", "linux"]),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**70, max_value=2**70),
                         st.floats(), weird_text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(weird_text, inner, max_size=3), max_leaves=5)


def _maybe(valid: st.SearchStrategy, junk: st.SearchStrategy = json_scalars) -> st.SearchStrategy:
    """Mostly plausible values (to reach the code after validation), sometimes junk."""
    return st.one_of(valid, valid, valid, junk)


gpu_dicts = st.fixed_dictionaries({}, optional={
    "name": _maybe(st.sampled_from(["NVIDIA A100-SXM4-80GB", "Tesla T4", "NVIDIA GeForce RTX 5090",
                                    "NVIDIA H100 80GB HBM3", "Quadro K2200"]) | st.text(min_size=1)),
    "compute_capability": _maybe(st.sampled_from(["3.5", "5.0", "7.0", "7.5", "8.0", "8.6", "8.9", "9.0",
                                                  "10.0", "12.0", "99.99", "0.0"])
                                 | st.builds(lambda a, b: f"{a}.{b}", st.integers(0, 200), st.integers(0, 200))),
    "memory_total_mib": _maybe(st.integers(min_value=1, max_value=2**31 - 1)),
    "memory_free_mib": _maybe(st.integers(min_value=1, max_value=2**31 - 1)),
    "vendor": _maybe(st.sampled_from(["nvidia", "amd", "apple"])),
    "extra": json_scalars,
})
machine_dicts = st.fixed_dictionaries({}, optional={
    "os": _maybe(st.sampled_from(["linux", "Linux", "windows", "darwin"])),
    "arch": _maybe(st.sampled_from(["x86_64", "aarch64", "arm64", "AMD64", "ppc64le"]) | st.text(min_size=1)),
    "python": _maybe(st.sampled_from(["3.8", "3.10.14", "3.11.7", "3.12.1", "3.13.0", "3.99"])
                     | st.builds(lambda a, b: f"{a}.{b}", st.integers(0, 10**6), st.integers(0, 10**6))),
    "libc": _maybe(st.text()),
    "driver_version": _maybe(st.none() | st.sampled_from(["390.157", "470.82.01", "525.60.13", "550.54.15",
                                                          "575.51.03", "580.159.04", "0.0", "99999.99.99"])
                             | st.builds(lambda a, b: f"{a}.{b}", st.integers(0, 10**9), st.integers(0, 99))),
    "cuda_driver_version": _maybe(st.none() | st.sampled_from(["11.4", "12.4", "13.0", "99.9"])),
    "gpus": _maybe(st.lists(gpu_dicts, max_size=4)),
    "gpu_vendor": _maybe(st.sampled_from(["nvidia", "amd", "apple", "none"])),
    "source": st.text(max_size=10),
    "notes": st.lists(st.text(max_size=10), max_size=2),
    "driver_versoin": json_scalars,
})

# The error format: `WHERE: key: ...`, `WHERE: gpus[1].name: ...`, `WHERE: unknown key 'x' ...`,
# `WHERE:LINE: not valid JSON`, or the whole-file complaints that have no key to name.
MACHINE_KEY = re.compile(r"(?:[a-z_]+|gpus\[\d+\](?:\.[^:]+)?): |unknown key |expected a JSON object|"
                         r"no such machine file|cannot read the machine file|nested too deeply")


def assert_machine_errors_named(err: InputError, where: str) -> None:
    assert err.messages
    for message in err.messages:
        assert message.startswith(f"{where}: ") or re.match(rf"{re.escape(where)}:\d+: not valid JSON", message), message
        rest = message[len(where) + 2:]
        assert re.match(MACHINE_KEY, rest) or re.match(r"\d+: not valid JSON", message[len(where) + 1:]), message


def assert_report_sane(machine_: Machine, environment: Environment) -> None:
    checks = environment_checks(machine_, environment)
    assert checks, "a judged environment has at least the GPU and package checks"
    for c in checks:
        assert c.status in STATUSES and c.id and c.title


# --- machine files --------------------------------------------------------------------------------

@FUZZ
@given(data=st.one_of(machine_dicts, json_values))
@example(data={"os": "linux", "arch": "x86_64", "python": "3.11", "gpus": [{"name": "X", "memory_total_mib": True}]})
@example(data={"os": "linux", "arch": "x86_64", "python": "3.11", "gpus": [{"name": "X", "vendor": ["nvidia"]}]})
@example(data={"os": "linux", "arch": "x86_64", "python": "3.11", "gpu_vendor": {"a": 1}})
def test_machine_dicts_validate_or_name_every_problem(data):
    """Any JSON value as a machine description: a Machine that the checks can judge, or an
    InputError whose every message names the file and the key."""
    where = "fuzz/machine.json"
    try:
        m = machine_from_dict(data, where)
    except InputError as err:
        assert_machine_errors_named(err, where)
        return
    assert m.os in ("linux", "windows", "darwin") and m.python
    assert_report_sane(m, GOOD_ENV)


@FUZZ_FILES
@given(content=st.one_of(
    st.binary(max_size=300),
    machine_dicts.map(lambda d: json.dumps(d).encode()),
    machine_dicts.flatmap(lambda d: st.integers(0, len(json.dumps(d))).map(lambda n: json.dumps(d)[:n].encode())),
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
))
@example(content=b"[" * 100_000)
@example(content=b'{"gpus": ' * 50_000)
@example(content=b"\xff\xfe{}")
def test_machine_files_load_or_fail_with_file_named(content):
    """Bytes on disk (binary junk, truncated JSON, any JSON): loaded, or InputError naming the file
    and the key or line."""
    path = SCRATCH / "machine.json"
    path.write_bytes(content)
    try:
        m = load_machine_file(path)
    except InputError as err:
        assert_machine_errors_named(err, str(path))
        return
    assert_report_sane(m, GOOD_ENV)


# --- requirements files ---------------------------------------------------------------------------

req_names = st.sampled_from(["torch", "bitsandbytes", "transformers", "peft", "accelerate", "datasets",
                             "Torch", "huggingface_hub", "numpy", "triton", "x", "a-b.c_d"]) | st.text(
    alphabet="abcxyzAZ019._-", min_size=1, max_size=12)
req_versions = st.one_of(
    st.sampled_from(["2.5.1", "2.5.1+cu124", "2.5.1+cu118", "2.13.0+cpu", "2.4.0+rocm6.1", "2.10.0",
                     "1!2.0", "0", "2.5.1+cu99999", "2.5.1+local.tag", "1.0.*", "1.0.post1.dev3", "99999999999999999999"]),
    st.builds(lambda parts, local: ".".join(map(str, parts)) + local, st.lists(st.integers(0, 9999), min_size=1, max_size=4),
              st.sampled_from(["", "+cu124", "+cu118", "+cpu", "+rocm6.2", "+cu1", "+x"])),
    weird_text,
)
req_lines = st.one_of(
    st.builds(lambda n, op, v: f"{n}{op}{v}", req_names, st.sampled_from(["==", "===", ">=", "~=", "<", "= =", "=="]),
              req_versions),
    st.builds(lambda n, v, h: f"{n}=={v} --hash=sha256:{h}", req_names, req_versions,
              st.sampled_from(["0" * 64, "a" * 64, "not-hex", ""])),
    st.sampled_from(["", "# comment", "--index-url https://download.pytorch.org/whl/cu124", "-e .", "\\",
                     "torch==2.5.1 ; python_version < '3.13'", "torch @ https://example.com/t.whl",
                     "torch[extra]==2.5.1", "torch==2.5.1  # pinned", "torch==2.5.1 \\", "    --hash=sha256:00"]),
    weird_text,
)
requirements_texts = st.one_of(st.lists(req_lines, max_size=8).map("\n".join), st.text())


@FUZZ
@given(text=requirements_texts)
@example(text="torch==2.5.1\ntorch==2.4.0\n")
@example(text="torch===2.5.1\n")
def test_requirements_parse_or_name_every_line(text):
    where = "fuzz/requirements.txt"
    try:
        pins = parse_requirements(text, where)
    except InputError as err:
        assert err.messages
        lines = text.splitlines()
        for message in err.messages:
            match = re.match(rf"{re.escape(where)}:(\d+): \S", message)
            assert match, message
            assert 1 <= int(match.group(1)) <= len(lines), message
        return
    environment = environment_from_pins(pins, where)
    assert_report_sane(machine(), environment)
    assert_report_sane(machine(**CPU_MACHINE), environment)


@FUZZ_FILES
@given(content=st.one_of(st.binary(max_size=200), requirements_texts.map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_requirements_files_through_the_cli_exit_0_1_or_2(content):
    """`check -r FILE` through the CLI: a judgement (0/1, JSON) or exit 2 naming the file; never a traceback."""
    req = SCRATCH / "req.txt"
    req.write_bytes(content)
    result = CliRunner().invoke(cli, ["check", "--json", "--machine", str(MACHINE_FILE), "--no-resolve", "--requirements", str(req)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert f"error: {req}" in result.output, result.output
    else:
        assert result.exit_code in (0, 1), result.output
        data = json.loads(result.stdout)
        assert data["packages"]["source"] == str(req)


MACHINE_FILE = SCRATCH / "good-machine.json"
MACHINE_FILE.write_text(json.dumps(DEFAULT_MACHINE))


@FUZZ_FILES
@given(content=st.one_of(st.binary(max_size=200), machine_dicts.map(lambda d: json.dumps(d).encode())))
def test_machine_files_through_the_cli_exit_0_1_or_2(content):
    path = SCRATCH / "cli-machine.json"
    path.write_bytes(content)
    req = SCRATCH / "good-req.txt"
    req.write_text("torch==2.5.1+cu124\ntransformers==4.46.3\npeft==0.13.2\nbitsandbytes==0.45.0\n"
                   "accelerate==1.1.1\ndatasets==3.1.0\n")
    result = CliRunner().invoke(cli, ["check", "--json", "--machine", str(path), "--no-resolve", "-r", str(req)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    if result.exit_code == 2:
        assert f"error: {path}" in result.output, result.output
    else:
        assert result.exit_code in (0, 1), result.output
        assert json.loads(result.stdout)["machine"]["source"] == str(path)


# --- probe output: nvidia-smi, /proc, torch/version.py --------------------------------------------

smi_fields = st.one_of(
    st.sampled_from(["NVIDIA A100-SXM4-80GB", "Tesla T4", "[N/A]", "[Field Not Supported]", "", "81920",
                     "1e400", "inf", "-inf", "nan", "-1", "8.0", "12.0", "550.54.15", "470.82.01", "9" * 30,
                     "GPU is lost", "No devices were found"]),
    st.text(alphabet=st.characters(blacklist_characters=",\n\r"), max_size=20),
)
smi_rows = st.lists(smi_fields, min_size=3, max_size=6).map(", ".join)
smi_texts = st.one_of(st.lists(smi_rows, max_size=4).map("\n".join), st.text())


@FUZZ
@given(text=smi_texts, old_driver=st.booleans())
@example(text="Tesla T4, inf, 1e400, 7.5, 470.82.01", old_driver=False)
@example(text="Tesla T4, 15360, 15000, 470.82.01", old_driver=True)
def test_nvidia_smi_output_parses_or_is_a_value_error(text, old_driver):
    fields = NVIDIA_SMI_FIELDS_OLD if old_driver else NVIDIA_SMI_FIELDS
    try:
        gpus, driver = parse_nvidia_smi_csv(text, fields)
    except ValueError as err:
        assert "unexpected nvidia-smi line" in str(err)
        return
    for gpu in gpus:
        assert gpu.name
        assert gpu.compute_capability is None or re.fullmatch(r"\d+\.\d+", gpu.compute_capability)
        for mib in (gpu.memory_total_mib, gpu.memory_free_mib):
            assert mib is None or isinstance(mib, int)
    assert (driver is None) == (not gpus)


@FUZZ
@given(text=st.one_of(st.text(), st.builds(lambda a, b: f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {a}  {b}",
                                           weird_text, weird_text)))
def test_proc_and_header_parsers_return_a_version_or_none(text):
    for value in (parse_proc_driver_version(text), *parse_nvidia_smi_header(text)):
        assert value is None or re.fullmatch(r"\d+\.\d+(\.\d+)?", value)


version_py_lines = st.one_of(
    st.builds(lambda key, value: f"{key} = {value}", st.sampled_from(["cuda", "hip", "cuda: Optional[str]", "git_version"]),
              st.one_of(st.sampled_from(["'12.4'", "None", "'.'", "'..'", "'1..2'", "'12.'", "'6.2.41133-dd7f95766'",
                                         "''", "'12'", "'9999999999.1'"]),
                        weird_text.map(repr))),
    weird_text,
)


@FUZZ
@given(text=st.lists(version_py_lines, max_size=5).map("\n".join))
@example(text="cuda = '.'")
@example(text="cuda = '12.'")
def test_torch_version_py_gives_a_build(text):
    """A corrupted torch/version.py is read as a build (or cpu), never a crash of `check`."""
    build = parse_torch_version_py(text)
    assert build.backend in ("cuda", "rocm", "cpu") or (build.backend is None and "not a version" in build.how)
    assert build.backend != "cuda" or build.cuda is not None


# --- installed metadata ---------------------------------------------------------------------------

metadata_texts = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda name, version, reqs: (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                           + "".join(f"Requires-Dist: {r}\n" for r in reqs)).encode("utf-8", "surrogatepass"),
              st.sampled_from(["torch", "peft", "bitsandbytes", "transformers", ""]) | weird_text,
              req_versions, st.lists(req_lines, max_size=3)),
)


@FUZZ_FILES
@given(metadata_bytes=metadata_texts, record=st.binary(max_size=100) | st.just(b"torch/version.py,,\n"),
       version_py=st.binary(max_size=100))
@example(metadata_bytes=b"", record=b"", version_py=b"")
@example(metadata_bytes=b"Name: torch\nVersion: 2.5.1\n", record=b"torch/version.py,,\n", version_py=b"cuda = '.'\n")
def test_corrupt_installed_metadata_is_reported_not_crashed_on(metadata_bytes, record, version_py, monkeypatch_session):
    """A site-packages folder holding one dist-info with fuzzed METADATA, RECORD and torch/version.py:
    the installed-environment probe returns, and a package it cannot read is marked broken."""
    site = SCRATCH / "site"
    dist_info = site / "torch-2.5.1.dist-info"
    (site / "torch").mkdir(parents=True, exist_ok=True)
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_bytes(metadata_bytes)
    (dist_info / "RECORD").write_bytes(record)
    (site / "torch" / "version.py").write_bytes(version_py)
    monkeypatch_session.setattr(sys, "path", [str(site)])
    try:
        environment = installed_environment()
    finally:
        monkeypatch_session.undo()
    assert len(environment.packages) <= 1
    for pkg in environment.packages.values():
        assert pkg.version is not None or pkg.problem
    assert_report_sane(machine(), environment)


@pytest.fixture(scope="module")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


# --- pasted logs ----------------------------------------------------------------------------------

RULE_TEXTS = sorted({e for rule in load_rules() if rule.explain is None for e in rule.errors})
"""Exact error texts that answer on their own: a rule with `[rule.explain]` also asks for context (`requires`: an
ollama adapter rule's "Error: invalid file magic" answers only beside an ADAPTER line), which the corpora test."""
TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
log_texts = st.one_of(
    st.text(),
    st.lists(st.one_of(st.sampled_from(RULE_TEXTS), weird_text, st.just(TOKEN),
                       st.sampled_from(RULE_TEXTS).map(lambda t: t.replace(" ", "\n  "))), max_size=8).map(" ".join),
    st.binary(max_size=400).map(lambda b: b.decode("utf-8", "replace")),
)


@FUZZ
@given(text=log_texts)
def test_explain_matches_known_rules_only_and_never_quotes_a_token(text):
    matches = explain_text(text).matches
    ids = {rule.id for rule in load_rules()}
    assert len({m.id for m in matches}) == len(matches)
    for m in matches:
        assert m.id in ids and m.fix and m.sources
        assert TOKEN not in m.matched
    if any(t in text for t in RULE_TEXTS):
        assert matches, "a rule's exact error text is in the log, so that rule must match"


@FUZZ_FILES
@given(content=st.one_of(st.binary(max_size=300), log_texts.map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_explain_cli_on_any_file_exits_0_or_1(content):
    """Any bytes: judged (0 or 1), or, when there is no text at all, exit 2 naming the file."""
    path = SCRATCH / "pasted.log"
    path.write_bytes(content)
    result = CliRunner().invoke(cli, ["explain", "--json", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    if not content.decode("utf-8", "replace").strip():
        assert result.exit_code == 2 and f"{path}: the text is empty" in result.output, result.output
        return
    assert result.exit_code in (0, 1), result.output
    assert TOKEN not in result.output
    assert isinstance(json.loads(result.stdout)["matches"], list)


def test_a_huge_log_is_explained_within_seconds():
    """2 MB of a training log with the error at its end: the error is found, in bounded time."""
    import time

    text = ("step 1 loss 2.3 lr 1e-4 " * 20 + "\n") * 4200 + RULE_TEXTS[0]
    start = time.perf_counter()
    matches = explain_text(text).matches
    assert time.perf_counter() - start < 10
    assert matches


# --- recipes --------------------------------------------------------------------------------------

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _demo_recipe() -> dict:
    import yaml

    data = yaml.safe_load((RECIPES / "demo.yaml").read_text())
    data["dataset"]["path"] = str(RECIPES / "data/demo/train.jsonl")
    data["dataset"]["eval_path"] = str(RECIPES / "data/demo/eval.jsonl")
    return data


DEMO = _demo_recipe()
SECTIONS = sorted(DEMO)
bad_values = st.one_of(
    json_values, st.integers(min_value=10**9, max_value=10**30), st.integers(max_value=-1),
    st.sampled_from([float("inf"), float("nan"), -0.0, 1e308, "16", "auto", "true", "yes", [], {}, None, True,
                     "builtin:nope", "../../etc/passwd", "a" * 5000, "🦙", "hf://x"]),
)


@st.composite
def mutated_recipes(draw):
    """The demo recipe with a few keys broken: wrong types, huge numbers, unicode, missing or extra keys."""
    data = copy.deepcopy(DEMO)
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(SECTIONS + ["bogus_section"]))
        action = draw(st.sampled_from(["set", "set", "delete", "add", "section"]))
        if action == "section":
            data[section] = draw(bad_values)
        elif not isinstance(data.get(section), dict):
            continue
        elif action == "delete" and data[section]:
            data[section].pop(draw(st.sampled_from(sorted(data[section]))))
        elif action == "add":
            data[section][draw(weird_text)] = draw(bad_values)
        elif data[section]:
            data[section][draw(st.sampled_from(sorted(data[section])))] = draw(bad_values)
    return data


def _key_named(message: str, where: str) -> bool:
    """`WHERE: section.key: ...`, `WHERE: section: ...`, `WHERE:LINE: ...` or a whole-file complaint."""
    if not message.startswith(where):
        return False
    rest = message[len(where):]
    return bool(re.match(r":\d+: \S|: .*\S", rest))


@FUZZ
@given(data=st.one_of(mutated_recipes(), json_values))
def test_recipe_data_validates_or_names_every_key(data):
    from qlora_doctor.recipe.schema import Recipe, recipe_from_dict

    where = "fuzz/recipe.yaml"
    try:
        recipe = recipe_from_dict(data, where=where)
    except InputError as err:
        assert err.messages
        for message in err.messages:
            assert _key_named(message, where), message
        if isinstance(data, dict) and all(isinstance(k, str) and k.isidentifier() for k in data):
            # Each message starts with the dotted key path of the problem (or the section it is in).
            for message in err.messages:
                first = message[len(where) + 2:].split(":", 1)[0]
                assert first.split(".")[0].split("[")[0] in {*SECTIONS, *data} or " " in first, message
        return
    assert isinstance(recipe, Recipe)
    assert recipe.model.trust_remote_code is (data.get("model", {}).get("trust_remote_code", False) is True)


def _yaml_text(data) -> str:
    import yaml

    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


recipe_bytes = st.one_of(
    st.binary(max_size=300),
    mutated_recipes().map(lambda d: _yaml_text(d).encode()),
    mutated_recipes().flatmap(lambda d: st.integers(0, len(_yaml_text(d))).map(lambda n: _yaml_text(d)[:n].encode())),
    st.text().map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"!!python/object/apply:os.system ['echo pwned']\n",
                     b"model: !!python/object/new:os.system [echo pwned]\n",
                     b"a: &a [*a, *a]\n", b"- - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - -\n",
                     b"model:\n  name_or_path: x\nmodel:\n  name_or_path: y\n", b"\xef\xbb\xbfmodel: {}\n",
                     b"[" * 5000, b"{a: " * 3000]),
)


@FUZZ_FILES
@given(content=recipe_bytes)
def test_recipe_files_load_or_name_the_file_and_key(content):
    from qlora_doctor.recipe.schema import load_recipe

    path = SCRATCH / "recipe.yaml"
    path.write_bytes(content)
    try:
        load_recipe(path)
    except InputError as err:
        assert err.messages
        for message in err.messages:
            assert str(path) in message or "recipe.yaml" in message, message


@FUZZ_FILES
@given(content=recipe_bytes)
def test_validate_cli_exits_0_or_2_naming_the_file(content):
    path = SCRATCH / "cli-recipe.yaml"
    path.write_bytes(content)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        assert "cli-recipe.yaml" in result.output, result.output
