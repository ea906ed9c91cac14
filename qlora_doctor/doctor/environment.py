"""`qlora-doctor check`: judge a machine + an environment (+ a recipe) and return a Report.

The order of the report: what the machine has, what is installed, whether torch's build can run on
this driver and these GPUs, whether bitsandbytes ships a library for that build, then every rule of
the knowledge base that fires (or cannot be judged), then recipe-aware checks and the smoke test.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Mapping

from packaging.version import Version

from qlora_doctor.knowledge.loading import (Rule, Tables, arch_supported, choose_torch_build, load_rules, load_tables,
                                            torch_variant_for)
from qlora_doctor.core.machine import Machine, machine_option
from qlora_doctor.core.environment import TRAINING_NEEDS, Environment
from qlora_doctor.core.report import Check
from qlora_doctor.knowledge.evaluate import evaluate_rules
from qlora_doctor.knowledge.computed import computed_checks

if TYPE_CHECKING:
    from qlora_doctor.runplan import RunPlan

TORCH_INSTALL = "https://pytorch.org/get-started/locally/"


def environment_checks(machine: Machine, env: Environment, uses: Mapping[str, bool] | None = None) -> list[Check]:
    """`uses`: what the run does (`uses_of` a run plan); None when no recipe says (rules that only bite for
    some uses are then notes)."""
    tables = load_tables()
    checks = [gpu_check(machine), *package_checks(env, machine, tables)]
    checks += torch_build_checks(machine, env, tables)
    rules = rule_checks(machine, env, uses)
    checks = fold_judged_rules(checks, rules)
    checks += computed_checks(env, rules)  # harvested import facts; a firing rule on the same pair wins
    return checks


# --- machine ------------------------------------------------------------------------------------

def gpu_check(machine: Machine) -> Check:
    title = "GPU"
    if machine.gpu_vendor == "nvidia":
        if not machine.gpus:
            return Check("machine.gpu", "unknown", title,
                         f"an NVIDIA driver ({machine.driver_version}) is present but no GPU could be listed: "
                         + "; ".join(machine.notes), fix="run `nvidia-smi` to see whether the driver sees the GPU",
                         found=f"driver {machine.driver_version}")
        names = ", ".join(f"{g.name} (cc {g.compute_capability or '?'}, "
                          f"{_gib(g.memory_total_mib)})" for g in machine.gpus)
        return Check("machine.gpu", "pass", title, f"{len(machine.gpus)} NVIDIA GPU(s): {names}",
                     found=names, expected="an NVIDIA GPU")
    if machine.gpu_vendor == "amd":
        return Check("machine.gpu", "warn", title,
                     "AMD GPU: bitsandbytes' ROCm support is newer and less tested than CUDA; "
                     "the knowledge base covers NVIDIA only",
                     fix="use a ROCm build of torch and bitsandbytes >= 0.48 (see its install docs)",
                     sources=("https://huggingface.co/docs/bitsandbytes/main/en/installation",),
                     found="AMD (ROCm)", expected="an NVIDIA GPU")
    if machine.gpu_vendor == "apple":
        return Check("machine.gpu", "warn", title,
                     "Apple silicon: no CUDA; 4-bit QLoRA runs on the CPU/MPS backends of bitsandbytes, "
                     "much slower than on an NVIDIA GPU", found="Apple (MPS)", expected="an NVIDIA GPU",
                     sources=("https://huggingface.co/docs/bitsandbytes/main/en/installation",))
    detail = "no GPU found: QLoRA will train on the CPU (fine for the demo, far too slow for real models)"
    if machine.notes:
        detail += "; probes said: " + "; ".join(machine.notes)
    return Check("machine.gpu", "warn", title, detail, found="none", expected="an NVIDIA GPU",
                 fix="run on a machine with an NVIDIA GPU for real models")


def _gib(mib: int | None) -> str:
    return f"{mib / 1024:.0f} GiB" if mib else "? GiB"


# --- packages -----------------------------------------------------------------------------------

def install_training_command(machine: Machine | None, tables: Tables | None, missing: list[str]) -> str:
    """How to install the training stack here: torch first, from the index of the build this machine needs
    (its driver and GPU decide the CUDA variant), then the rest; tested pins through `lock`."""
    if "torch" not in missing or machine is None or tables is None:
        return "pip install 'qlora-doctor[train]'" + ("" if "torch" not in missing else
                                                      f"   (torch first: see {TORCH_INSTALL})")
    if machine.nvidia_gpus and machine.driver_version is None:  # the driver decides the build: not the CPU one
        return ("give this machine's NVIDIA driver version (nvidia-smi's \"Driver Version\") and `check` names the "
                f"torch build for it; or follow {TORCH_INSTALL}, then pip install 'qlora-doctor[train]'")
    torch, variant = "torch", torch_variant_for(machine, tables)
    if machine.nvidia_gpus:
        from qlora_doctor.matrix.records import default_results_dir, load_records

        tested = sorted({Version(v).base_version for r in load_records(default_results_dir())
                         for v in [r.freeze.get("torch")] if v and r.works}, key=Version, reverse=True)
        choice = choose_torch_build(machine, tested, tables)
        if choice is not None:  # kernels for this GPU too (a V100 is not in cu128+ builds), not only the driver
            torch, variant = f"torch=={choice.version}", choice.variant
    return (f"pip install {torch} --index-url https://download.pytorch.org/whl/{variant} && "
            f"pip install 'qlora-doctor[train]'   (tested pins instead: `qlora-doctor lock{machine_option(machine)} "
            "-o lock.txt && pip install -r lock.txt`)")


def package_checks(env: Environment, machine: Machine | None = None, tables: Tables | None = None) -> list[Check]:
    checks: list[Check] = []
    missing = [n for n in TRAINING_NEEDS if not env.installed(n) and n not in env.unpinned]
    where = ("installed" if env.source == "installed" else
             f"in the {env.source.split(':', 1)[0]}" if env.source.startswith("pasted ") else "in the proposed pins")
    if missing:
        # Installed: training cannot start. A proposed file: projects install torch from a container or
        # another index, so what the file leaves out is a risk to name, not a failure of the file.
        checks.append(Check("packages.training", "fail" if env.source == "installed" else "warn", "Training packages",
                            f"not {where}: {', '.join(missing)}" + (
                                "" if env.source == "installed" else
                                " (QLoRA could not start there)" if env.source.startswith("pasted ") else
                                " (they must come from elsewhere, and are not judged here)"),
                            fix="pip install " + " ".join(missing) if env.source != "installed"
                            else install_training_command(machine, tables, missing),
                            found=f"missing {', '.join(missing)}", expected=", ".join(TRAINING_NEEDS)))
    else:
        found = ", ".join(f"{n} {env.packages[n].raw_version}" if n in env.packages else f"{n} (version unknown)"
                          for n in TRAINING_NEEDS)
        checks.append(Check("packages.training", "pass", "Training packages", f"{where}: {found}", found=found))
    broken = [p for p in env.packages.values() if p.problem]
    if broken:
        checks.append(Check("packages.broken", "fail", "Broken installs",
                            "; ".join(f"{p.name}: {p.problem}" for p in broken),
                            fix="pip install --force-reinstall --no-deps " + " ".join(p.name for p in broken),
                            found=", ".join(p.name for p in broken), expected="readable metadata"))
    if env.source == "installed":
        if env.conflicts:
            checks.append(Check("packages.requirements", "fail", "Declared requirements",
                                "; ".join(env.conflicts),
                                fix="pip install the versions named (or `qlora-doctor lock --repair`)",
                                found=f"{len(env.conflicts)} conflict(s)", expected="none"))
        else:
            checks.append(Check("packages.requirements", "pass", "Declared requirements",
                                "every watched package's declared requirements are met"))
    return checks


# --- torch build vs driver and GPUs, bitsandbytes binaries --------------------------------------

def torch_build_checks(machine: Machine, env: Environment, tables: Tables) -> list[Check]:
    torch = env.torch
    nvidia = machine.gpu_vendor == "nvidia"
    if not env.installed("torch"):
        return []
    if torch.backend is None:
        return [Check("torch.build", "unknown", "torch build", f"cannot tell which build torch is: {torch.how}",
                      fix="reinstall torch from " + TORCH_INSTALL)]
    checks = []
    build = f"torch {env.packages['torch'].raw_version} ({torch.backend}" + (
        f" {torch.cuda})" if torch.cuda else ")")
    if nvidia and torch.backend != "cuda":
        version = env.packages["torch"].version
        choice = choose_torch_build(machine, [str(version)] if version else [], tables)
        variant = choice.variant if choice else torch_variant_for(machine, tables)
        why = choice.why if choice else f"the newest CUDA variant driver {machine.driver_version} runs"
        fix = (f"pip install torch --index-url https://download.pytorch.org/whl/{variant}  ({why}; "
               f"`qlora-doctor lock{machine_option(machine)}` pins the whole stack for it)"
               if variant != "cpu" else
               "install a CUDA build of torch for this driver (the driver version is unknown: `nvidia-smi` shows "
               "it; with it, `qlora-doctor lock --machine` names the build)" if machine.driver_version is None else
               f"update the NVIDIA driver (driver {machine.driver_version} runs no CUDA build "
               "PyTorch ships), then `qlora-doctor lock`")
        checks.append(Check("torch.build", "fail", "torch build", f"{build} cannot use the NVIDIA GPU", fix=fix,
                            sources=(TORCH_INSTALL,), found=build, expected="a CUDA build"))
        return checks
    if not nvidia or torch.cuda is None:
        checks.append(Check("torch.build", "pass", "torch build", f"{build} (how: {torch.how})", found=build))
        return checks
    checks.append(driver_check(machine, torch.cuda, build, tables, env.packages["torch"].version))
    checks.extend(arch_checks(machine, env, tables, build))
    checks.append(bnb_binary_check(env, tables))
    return checks


def driver_check(machine: Machine, cuda: Version, build: str, tables: Tables,
                 torch_version: Version | None = None) -> Check:
    title = "NVIDIA driver vs torch's CUDA"
    row = tables.driver_for_cuda(cuda)
    expected = ""
    if row is not None:
        minimum = row.minor_compat_driver or row.toolkit_driver
        expected = f">= {minimum}"
    if machine.driver_version is None:
        return Check("cuda.driver", "unknown", title, "the NVIDIA driver version could not be read: "
                     + "; ".join(machine.notes), fix="check `nvidia-smi`", found="unknown", expected=expected)
    if row is None:
        return Check("cuda.driver", "unknown", title, f"no driver table row for CUDA {cuda}",
                     found=machine.driver_version, expected="a known CUDA version")
    driver = machine.driver
    shown = machine.driver_version  # as the driver prints it: Version() would drop the zero in 470.82.01
    minimum = row.minor_compat_driver or row.toolkit_driver
    if driver < minimum:
        return Check("cuda.driver", "fail", title,
                     f"driver {shown} is too old for {build} (CUDA {cuda} needs >= {minimum} on Linux, "
                     f"under minor-version compatibility)",
                     fix=driver_fix(machine, row.toolkit_driver, torch_version, tables),
                     sources=row.sources, found=shown, expected=f">= {minimum}")
    return Check("cuda.driver", "pass", title, f"driver {shown} runs {build}", sources=row.sources,
                 found=shown, expected=f">= {minimum}")


def driver_fix(machine: Machine, toolkit_driver: str, torch_version: Version | None, tables: Tables) -> str:
    """Upgrade the driver, or install the same torch built for a CUDA this driver runs (the exact command, where
    the tables know one that also ships kernels for these GPUs)."""
    upgrade = f"upgrade the NVIDIA driver to >= {toolkit_driver}"
    choice = choose_torch_build(machine, [torch_version.base_version], tables) if torch_version else None
    if choice is None:
        return f"{upgrade}, or pin a torch built for an older CUDA: `qlora-doctor lock` picks one for this driver"
    return (f"{upgrade}, or keep torch {choice.version} built for this driver: `pip install torch=={choice.version} "
            f"--index-url https://download.pytorch.org/whl/{choice.variant}` ({choice.why}); pin torchvision/"
            "torchaudio from the same index if you use them")


def arch_checks(machine: Machine, env: Environment, tables: Tables, build: str) -> list[Check]:
    title = "GPU architecture vs torch's kernels"
    torch_version = env.packages["torch"].version
    assert torch_version is not None and env.torch.cuda is not None
    row = tables.archs_for_torch(torch_version, env.torch.cuda)
    if row is None:
        return [Check("cuda.arch", "unknown", title,
                      f"no record of which GPU architectures {build} ships kernels for",
                      found=build)]
    checks = []
    archs = ", ".join(f"sm_{a.replace('.', '')}" for a in row.archs)
    # one check per kind of GPU: eight of one product are one finding (`NAME (x8)`), not eight
    kinds = collections.Counter((gpu.name, gpu.compute_capability) for gpu in machine.nvidia_gpus)
    for (name, capability), count in kinds.items():
        label = name if count == 1 else f"{name} (x{count})"
        if capability is None:
            checks.append(Check("cuda.arch", "unknown", title, f"{label}: compute capability unknown",
                                found=label, expected=archs))
        elif not arch_supported(capability, row.archs):
            sm = "sm_" + capability.replace(".", "")
            checks.append(Check("cuda.arch", "fail", title,
                                f"{label} is {sm}, but {build} ships kernels only for {archs}: "
                                f"'no kernel image is available for execution on the device'",
                                fix="install a torch build that ships " + sm + " (`qlora-doctor lock` picks one)",
                                sources=row.sources, found=f"{label} ({sm})", expected=archs))
        else:
            checks.append(Check("cuda.arch", "pass", title, f"{label} (cc {capability}) is covered by {build}",
                                sources=row.sources, found=f"cc {capability}", expected=archs))
    return checks


def bnb_binary_check(env: Environment, tables: Tables) -> Check:
    title = "bitsandbytes library for torch's CUDA"
    bnb = env.version("bitsandbytes")
    cuda = env.torch.cuda
    if bnb is None or cuda is None:
        return Check("bnb.cuda", "unknown", title, "bitsandbytes or torch's CUDA version unknown")
    row = tables.bnb_cuda_for(bnb)
    if row is None:
        return Check("bnb.cuda", "unknown", title,
                     f"no record of which CUDA versions bitsandbytes {bnb} ships libraries for",
                     found=f"bitsandbytes {bnb}, CUDA {cuda}")
    shipped = ", ".join(str(v) for v in row.cuda)
    library = row.library_for(cuda)
    if library is None:
        return Check("bnb.cuda", "fail", title,
                     f"bitsandbytes {bnb} ships no native library for CUDA {cuda} (it has {shipped}); "
                     "it will fail to load its CUDA library",
                     fix="pip install -U bitsandbytes   (or set BNB_CUDA_VERSION to a shipped version "
                         "your driver supports)", sources=row.sources,
                     found=f"CUDA {cuda}", expected=shipped)
    how = "" if library == cuda else f" (no {cuda} build: it loads its closest same-major one, CUDA {library})"
    return Check("bnb.cuda", "pass", title, f"bitsandbytes {bnb} ships a library for CUDA {cuda}{how}",
                 sources=row.sources, found=f"CUDA {cuda}", expected=shipped)


# --- knowledge base -----------------------------------------------------------------------------

def fold_judged_rules(table: list[Check], rules: list[Check]) -> list[Check]:
    """One cause, one row: a rule row whose fact a table check already failed (the rule's `judged_by`) is
    dropped, its sources added to that check, so a driver too old for torch's CUDA is said once, with one fix."""
    import dataclasses

    by_id = {r.id: r for r in load_rules()}
    failed = {c.id: i for i, c in enumerate(table) if c.status in ("fail", "unknown")}
    kept: list[Check] = []
    for check in rules:
        rule = by_id.get(check.id.removeprefix("rule:"))
        target = failed.get(rule.judged_by) if rule is not None and rule.judged_by else None
        if target is None or check.status == "pass":
            kept.append(check)
            continue
        merged = table[target]
        table[target] = dataclasses.replace(merged, sources=tuple(dict.fromkeys((*merged.sources, *check.sources))))
    # A rule whose fix another firing rule's fix covers (`judged_by = "rule:<id>"`: two changes of one package
    # that the same upgrade undoes) is said inside that rule's row, not as a second row with a second fix.
    firing = {c.id: i for i, c in enumerate(kept) if c.status in ("fail", "warn")}
    folded: set[int] = set()
    for i, check in enumerate(kept):
        rule = by_id.get(check.id.removeprefix("rule:"))
        target = firing.get(rule.judged_by) if rule is not None and rule.judged_by else None
        if target is None or target == i or check.status not in ("fail", "warn"):
            continue
        into = kept[target]
        kept[target] = dataclasses.replace(into, detail=f"{into.detail} Also: {check.title}: {check.detail}",
                                           sources=tuple(dict.fromkeys((*into.sources, *check.sources))))
        folded.add(i)
    return table + [c for i, c in enumerate(kept) if i not in folded]


def uses_of(run_plan: RunPlan) -> dict[str, bool]:
    """What a planned run does, for the rules' `[rule.when] uses` (knowledge/loading.py USES). `merge` is
    left out: `run` never merges, and a later `merge`/`export` is the user's choice. `bf16` is False here
    because the recipe's own precision check judges bf16 against the GPU (one cause, one row)."""
    levers = run_plan.levers
    return {"fsdp": run_plan.recipe.distributed.strategy == "fsdp", "bf16": False, "tf32": False,
            "int8": False, "triton": levers.liger_kernel.on or levers.torch_compile.on or levers.fp8_base.on}


def _applies(rule: Rule, uses: Mapping[str, bool] | None) -> bool | None:
    """Whether the run does what the rule needs: True/False, None when unknown (no recipe, or not decided)."""
    if rule.when is None or not rule.when.uses:
        return True
    states = [None if uses is None else uses.get(use) for use in rule.when.uses]
    if any(state is True for state in states):
        return True
    return False if all(state is False for state in states) else None


def rule_checks(machine: Machine, env: Environment, uses: Mapping[str, bool] | None = None) -> list[Check]:
    rules = load_rules()
    results = evaluate_rules(rules, machine, env)
    checks: list[Check] = []
    fired = 0
    for result in results:
        rule = result.rule
        applies = _applies(rule, uses)
        if applies is False:
            continue
        if result.outcome == "fires" and applies is None:
            # Bites only if the run does this (FSDP, a merge, bf16...): a note, shown with -v.
            checks.append(Check(f"rule:{rule.id}", "pass", f"note (if the run uses {' or '.join(rule.when.uses)}): "
                                f"{rule.title}", rule.cause, fix=rule.fix, sources=rule.sources, found=result.found))
        elif result.outcome == "fires" and rule.severity == "note":
            # The environment is fine; a script written for older versions would break. Shown with -v.
            checks.append(Check(f"rule:{rule.id}", "pass", f"note: {rule.title}", rule.cause, fix=rule.fix,
                                sources=rule.sources, found=result.found))
        elif result.outcome == "fires":
            fired += 1
            checks.append(Check(f"rule:{rule.id}", rule.severity, rule.title, rule.cause, fix=rule.fix,
                                sources=rule.sources, found=result.found, expected=f"not ({rule.when.describe()})"))
        elif result.outcome == "unknown" and applies:
            checks.append(Check(f"rule:{rule.id}", "unknown", rule.title,
                                f"{result.found}, so this known failure cannot be ruled out: {rule.cause}",
                                fix=rule.fix, sources=rule.sources, found=result.found))
    judged = len(results)
    if not fired:
        checks.append(Check("rules", "pass", "Known failures",
                            f"none of the {judged} rules of the knowledge base fire",
                            found=f"{judged} rules", expected="none firing"))
    return checks
