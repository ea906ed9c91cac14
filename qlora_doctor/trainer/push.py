"""`qlora-doctor push`: a finished run to the Hugging Face Hub.

What goes, decided here and listed by `--dry-run` before anything touches the network:

  * `--what adapter` (default): the adapter (adapter_model.safetensors, adapter_config.json);
  * `--what merged` / `gguf`: the files of an `export` folder of that format (`--export DIR`) instead,
    minus its export.json (which names local things);
  * always: the model card the run wrote (README.md), recipe.yaml and metrics.json.

Never: checkpoints, manifest.json, doctor-report.json, requirements.lock.txt (they describe this machine),
and no text file in which `core.redact` finds a secret (an API key in a recipe, a token in a card): those
are left out and named. The upload is one commit through huggingface_hub's HfApi, or through any object
with its `create_repo` and `create_commit` methods (the `api` seam tests fill).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_doctor.core.errors import CheckFailed, InputError
from qlora_doctor.trainer import outputs

WHAT = ("adapter", "merged", "gguf")
RUN_FILES = (outputs.MODEL_CARD, outputs.RECIPE, outputs.METRICS)
"""Uploaded with every --what (recipe.yaml is required: load_run checks it)."""
NEVER = (outputs.MANIFEST, outputs.REPORT, outputs.LOCKFILE)
TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".md", ".txt", ".jinja", ".py", "")
"""Files read for secrets before upload (Modelfile has no suffix); weights are binary."""


@dataclass(frozen=True)
class PushPlan:
    """Exactly what `push` uploads, and what it left out."""

    repo_id: str
    private: bool
    what: str
    files: tuple[tuple[str, str], ...]
    """(path in the repository, local path), sorted by the former."""
    left_out: tuple[str, ...]
    """`name: why` for files of the run or export that are not uploaded because they hold a secret."""


@dataclass(frozen=True)
class PushResult:
    plan: PushPlan
    url: str
    """The repository's URL."""
    commit: str | None
    """The commit's URL or id, as the Hub returned it."""


def plan_push(output_dir: Path, repo_id: str, what: str = "adapter", private: bool = False,
              export_dir: Path | None = None) -> PushPlan:
    """Decide the files; raises InputError for a folder without a finished run, a bad repo id, a
    --what without its export."""
    from qlora_doctor.trainer.generate import load_run

    output_dir = Path(output_dir)
    _check_repo_id(repo_id)
    if what not in WHAT:
        raise InputError(f"--what: {what!r} is not one of {', '.join(WHAT)}")
    load_run(output_dir)
    candidates: dict[str, Path] = {}
    if what == "adapter":
        if export_dir is not None:
            raise InputError("--export: only with --what merged or gguf; --what adapter uploads the run's adapter")
        candidates.update({name: output_dir / name for name in outputs.ADAPTER_FILES})
    else:
        candidates.update(_export_files(output_dir, what, export_dir))
    for name in RUN_FILES:
        if (output_dir / name).is_file():
            candidates[name] = output_dir / name
    files, left_out = [], []
    for name, path in sorted(candidates.items()):
        secret = _secret_in(path)
        if name in NEVER or name.startswith("checkpoint-"):
            continue
        if secret:
            left_out.append(f"{name}: {secret}")
            continue
        files.append((name, str(path)))
    return PushPlan(repo_id=repo_id, private=private, what=what, files=tuple(files), left_out=tuple(left_out))


def _check_repo_id(repo_id: str) -> None:
    import re

    if not re.fullmatch(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}", repo_id or "") \
            or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise InputError(f"--repo: {repo_id!r} is not a Hugging Face repository id; use USER/NAME, e.g. "
                         "--repo alice/smollm2-korrowen")


def _export_files(output_dir: Path, what: str, export_dir: Path | None) -> dict[str, Path]:
    from qlora_doctor.trainer.export import EXPORT_INFO

    make = "--format gguf --quant q8_0" if what == "gguf" else "--format merged --dtype bf16"
    how = f"make one with `qlora-doctor export {output_dir} {make} --to DIR`, then push with --export DIR"
    if export_dir is None:
        raise InputError(f"--what {what}: uploads an export of the run; {how}")
    export_dir = Path(export_dir)
    try:
        info = json.loads((export_dir / EXPORT_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"--export: {export_dir} is not a folder written by `qlora-doctor export` (no readable "
                         f"{EXPORT_INFO}); {how}")
    if info.get("format") != what:
        raise InputError(f"--export: {export_dir} holds a {info.get('format')} export, not {what}; {how}")
    return {p.name: p for p in export_dir.iterdir() if p.is_file() and p.name != EXPORT_INFO
            and not p.name.startswith(".")}


def _secret_in(path: Path) -> str | None:
    """Why a text file must not leave the machine (it holds what `redact` removes), else None."""
    from qlora_doctor.core.redact import redact

    if path.suffix not in TEXT_SUFFIXES or not path.is_file() or path.stat().st_size > 10 * 2**20:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if redact(text) != text:
        return "holds what looks like a secret (a token or key); remove it from the file to upload it"
    return None


def push(plan: PushPlan, api: Any = None, token: str | None = None) -> PushResult:
    """Create the repository (or reuse it) and upload `plan.files` in one commit. `api` defaults to
    `huggingface_hub.HfApi(token=token)` (which finds a saved login or HF_TOKEN by itself)."""
    if not plan.files:
        raise InputError(f"{plan.repo_id}: nothing to upload")
    from huggingface_hub import CommitOperationAdd

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=local) for name, local in plan.files]
    fix = ("log in with `hf auth login` (or set HF_TOKEN to a token with write access), check that the repository "
           "id is yours or your organization's, and retry")
    try:
        repo = api.create_repo(repo_id=plan.repo_id, private=plan.private, repo_type="model", exist_ok=True)
        commit = api.create_commit(repo_id=plan.repo_id, repo_type="model", operations=operations,
                                   commit_message=f"qlora-doctor push ({plan.what})")
    except (OSError, ValueError) as err:  # huggingface_hub's HTTP and login errors derive from these
        raise CheckFailed(f"push to {plan.repo_id} failed: {err}; {fix}")
    url = str(getattr(repo, "url", repo) or f"https://huggingface.co/{plan.repo_id}")
    commit_ref = getattr(commit, "commit_url", None) or getattr(commit, "oid", None)
    return PushResult(plan=plan, url=url, commit=str(commit_ref) if commit_ref else None)
