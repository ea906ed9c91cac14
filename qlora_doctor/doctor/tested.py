"""Is the environment `check` judges a tested one? Compare it with the committed matrix records.

"tested": a record that works (install, check and smoke passed) was made on a matching platform
(same OS, arch, Python major.minor, accelerator) with the same versions of the training packages.
"untested": no such record; the environment may still break no known rule. Fast by design: reads
small JSON files, no subprocess, no heavy import (check answers in well under half a second).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from packaging.version import Version

from qlora_doctor.core.machine import Machine, machine_option
from qlora_doctor.core.environment import TRAINING_NEEDS, Environment
from qlora_doctor.core.report import Check
from qlora_doctor.core.errors import InputError
from qlora_doctor.matrix.records import Record, accelerator_id, default_results_dir, load_records, platform_id

TITLE = "Tested combination"


def env_platform(machine: Machine, env: Environment) -> str:
    gpus = machine.nvidia_gpus
    accel = accelerator_id(machine.gpu_vendor, env.torch.backend, str(env.torch.cuda) if env.torch.cuda else None,
                           gpus[0].compute_capability if gpus else None)
    return platform_id(machine.os, machine.arch, machine.python, accel)


def differences(record: Record, env: Environment) -> list[str]:
    """Training packages whose version in `env` differs from the record's (a torch pin without a local
    tag in the environment matches the record's local build of the same version)."""
    diffs = []
    for name in TRAINING_NEEDS:
        want = record.version(name)
        have = env.version(name)
        if want is None:
            continue
        if have is None:
            diffs.append(f"{name} missing (tested: {want})")
        elif have != want and not (not have.local and Version(have.public) == Version(want.public)):
            diffs.append(f"{name} {have} (tested: {want})")
    return diffs


def tested_status(machine: Machine, env: Environment, results_dir: Path | None = None) -> tuple[dict[str, Any], Check]:
    folder = Path(results_dir) if results_dir is not None else default_results_dir()
    platform = env_platform(machine, env)
    try:
        records = load_records(folder)
    except InputError as err:
        return ({"status": "unknown", "platform": platform},
                Check("matrix.tested", "unknown", TITLE, f"matrix records unreadable: {err.messages[0]}",
                      fix="rerun `qlora-doctor matrix run` or restore the file from git"))
    working = [r for r in records if r.works]
    if not working:
        return ({"status": "untested", "platform": platform, "records": str(folder)},
                Check("matrix.tested", "pass", TITLE,
                      f"not tested (information, not a risk): no passing matrix records in {folder}",
                      fix="`qlora-doctor lock` writes a tested pin set", found="untested",
                      expected="a tested combination"))
    same_platform = [r for r in working if r.platform == platform]
    for record in same_platform:
        if not differences(record, env):
            info = {"status": "tested", "platform": platform, "combination": record.name,
                    "record": Path(record.path).name, "date": record.date}
            return info, Check("matrix.tested", "pass", TITLE,
                               f"tested: equals combination {record.name} which passed install, check and smoke on "
                               f"{platform} ({record.date[:10]}, record {Path(record.path).name})",
                               found=f"tested ({record.name})", expected="a tested combination")
    # Fewest differences; on a tie the newest stack (what `lock` would pick), not the oldest record.
    candidates = sorted(same_platform or working, reverse=True,
                        key=lambda r: (tuple(r.version(n) or Version("0") for n in ("torch", "transformers", "peft")),
                                       r.date))
    closest = min(candidates, key=lambda r: len(differences(r, env)))
    diffs = differences(closest, env)
    where = "on this platform" if same_platform else f"on {closest.platform} (none on {platform})"
    pins = " ".join(f"{n}=={closest.freeze[n]}" for n in TRAINING_NEEDS
                    if n in closest.freeze and any(d.startswith(n + " ") for d in diffs))
    # torch missing or a CPU build on a GPU machine puts it on the CPU platform, whose records ran torch's CPU
    # build or PyPI's default CUDA build on a CPU: neither is the build this GPU and driver need (lock picks it)
    cpu_torch_for_a_gpu = bool(machine.nvidia_gpus) and closest.platform.endswith("-cpu")
    info = {"status": "untested", "platform": platform, "closest": closest.name,
            "record": Path(closest.path).name, "differences": diffs}
    # Not tested is information, not a risk: the verdict's evidence says `compatible` instead of `tested`.
    return info, Check("matrix.tested", "pass", TITLE,
                       f"not tested: no passing record matches this environment on {platform}; closest tested "
                       f"combination {where} is {closest.name}, which differs in: {'; '.join(diffs)}",
                       fix=(f"pip install {pins}" if pins and same_platform and not cpu_torch_for_a_gpu else
                            f"`qlora-doctor lock{machine_option(machine)}` picks the newest tested combination for "
                            "this machine"),
                       found="untested", expected="a tested combination")
