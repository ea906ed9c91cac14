"""Safe by construction: YAML is loaded safely, no shell strings, remote code only when the recipe asks
for it, and then `check --recipe` says whose code will run."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qlora_doctor.cli import cli

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "qlora_doctor"
SOURCES = sorted(PACKAGE.rglob("*.py"))
GOOD_PINS = ("torch==2.5.1+cu124\ntransformers==4.46.3\npeft==0.13.2\nbitsandbytes==0.45.0\n"
             "accelerate==1.1.1\ndatasets==3.1.0\n")


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def demo_recipe_text(**model: str) -> str:
    text = (REPO / "recipes" / "demo.yaml").read_text()
    text = text.replace("path: data/demo/train.jsonl", f"path: {REPO}/recipes/data/demo/train.jsonl")
    text = text.replace("eval_path: data/demo/eval.jsonl", f"eval_path: {REPO}/recipes/data/demo/eval.jsonl")
    for key, value in model.items():
        if key == "name_or_path":
            text = text.replace("name_or_path: builtin:smollm2-135m-instruct", f"name_or_path: {value}")
        else:
            text = text.replace("  trust_remote_code: false", f"  trust_remote_code: false\n  {key}: {value}")
    return text


# --- YAML -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "model: !!python/object/apply:os.system ['touch {marker}']",
    "model:\n  name_or_path: !!python/object/new:subprocess.Popen [['touch', '{marker}']]",
    "model: !!python/name:os.system\n",
])
@pytest.mark.parametrize("command", [("validate",), ("check", "--machine", "{machine}", "--no-resolve", "-r", "{req}", "--recipe"),
                                     ("plan",)])
def test_python_tags_in_a_recipe_are_rejected_not_run(tmp_path, payload, command):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(payload.format(marker=marker) + "\n")
    machine = tmp_path / "m.json"
    machine.write_text(json.dumps({"os": "linux", "arch": "x86_64", "python": "3.11.7", "gpus": []}))
    req = tmp_path / "req.txt"
    req.write_text(GOOD_PINS)
    args = [a.format(machine=machine, req=req) for a in command] + [str(recipe)]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "evil.yaml" in result.output and "not valid YAML" in result.output
    assert "could not determine a constructor for the tag 'tag:yaml.org,2002:python/" in result.output
    assert not marker.exists()


# --- no shell ---------------------------------------------------------------------------------------

def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


SHELL_FUNCTIONS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                   "os.execl", "os.execlp", "os.spawnl", "os.spawnlp"}
SUBPROCESS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call",
              "subprocess.check_output", "run", "Popen"}


def test_the_package_never_runs_a_shell():
    """Subprocesses get argument lists: no `shell=True`, no `os.system`/`os.popen`, no command string."""
    assert len(SOURCES) > 20
    problems = []
    for source in SOURCES:
        text = source.read_text(encoding="utf-8")
        where = source.relative_to(REPO)
        for needle in ("shell=True", "os.system(", "os.popen("):
            if needle in text:
                problems.append(f"{where}: contains {needle}")
        for call in _calls(ast.parse(text, filename=str(source))):
            name = _dotted(call.func)
            if name in SHELL_FUNCTIONS:
                problems.append(f"{where}:{call.lineno}: calls {name}")
            for kw in call.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    problems.append(f"{where}:{call.lineno}: shell={ast.unparse(kw.value)}")
            if name in SUBPROCESS and call.args and isinstance(call.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
                problems.append(f"{where}:{call.lineno}: {name} given a command string, not a list")
    assert not problems, "\n".join(problems)


def test_the_shell_check_would_catch_one(tmp_path):
    """The scan above is not vacuous: the same walk flags each form on a sample."""
    sample = ast.parse("import os, subprocess\nsubprocess.run('ls -l', shell=True)\nos.system('x')\n"
                       "subprocess.Popen(f'nvidia-smi {x}')\n")
    names = [_dotted(c.func) for c in _calls(sample)]
    assert names.count("os.system") == 1
    shell_kw = [kw for c in _calls(sample) for kw in c.keywords if kw.arg == "shell"]
    assert len(shell_kw) == 1
    string_commands = [c for c in _calls(sample) if _dotted(c.func) in SUBPROCESS
                       and isinstance(c.args[0], (ast.Constant, ast.JoinedStr))]
    assert len(string_commands) == 2


# --- trust_remote_code ------------------------------------------------------------------------------

def test_no_code_path_turns_trust_remote_code_on_by_itself():
    """Every `trust_remote_code=` passed to a library comes from the recipe, never a literal True."""
    passed = []
    for source in SOURCES:
        for call in _calls(ast.parse(source.read_text(encoding="utf-8"))):
            for kw in call.keywords:
                if kw.arg == "trust_remote_code":
                    assert not (isinstance(kw.value, ast.Constant) and kw.value.value is True), \
                        f"{source.relative_to(REPO)}:{call.lineno}: trust_remote_code=True"
                    passed.append(ast.unparse(kw.value))
    assert passed, "the loaders should pass trust_remote_code explicitly"
    assert all("trust_remote_code" in p for p in passed), passed


def test_recipes_default_to_no_remote_code(tmp_path):
    from qlora_doctor.recipe.schema import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(demo_recipe_text().replace("  trust_remote_code: false\n", ""))
    assert load_recipe(path).model.trust_remote_code is False
    for shipped in sorted((REPO / "recipes").glob("*.yaml")):
        assert load_recipe(shipped).model.trust_remote_code is False, shipped


@pytest.mark.parametrize("revision, pinned", [(None, "not pinned"), ("a1b2c3d", "pinned to revision 'a1b2c3d'")])
def test_check_recipe_warns_and_names_whose_code_runs(tmp_path, revision, pinned):
    recipe = tmp_path / "remote.yaml"
    extra = {"revision": revision} if revision else {}
    text = demo_recipe_text(name_or_path="some-org/custom-arch-7b", **extra)
    recipe.write_text(text.replace("trust_remote_code: false", "trust_remote_code: true"))
    machine = tmp_path / "m.json"
    machine.write_text(json.dumps({"os": "linux", "arch": "x86_64", "python": "3.11.7", "gpus": []}))
    req = tmp_path / "req.txt"
    req.write_text(GOOD_PINS)
    result = invoke("check", "--json", "--machine", str(machine), "--no-resolve", "-r", str(req), "--recipe", str(recipe))
    assert result.exit_code in (0, 1), result.output
    check = {c["id"]: c for c in json.loads(result.stdout)["checks"]}["recipe.trust_remote_code"]
    assert check["status"] == "warn"
    assert "some-org/custom-arch-7b" in check["detail"] and pinned in check["detail"]
    assert check["fix"] and check["sources"]
