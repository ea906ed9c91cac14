"""Shared options and helpers of the command modules, defined once (pip-tools' scripts/options.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import click



def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(f)


def machine_option(f: Callable) -> Callable:
    return click.option(
        "--machine",
        "machine_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Judge a described machine instead of probing this one: a file (JSON, YAML, saved nvidia-smi or "
             "collect_env output), inline JSON, or a preset (t4-550, a100-550, rtx4090-570, h100-580, cpu... or "
             "just t4, a100).",
    )(f)


def verbose_option(f: Callable) -> Callable:
    return click.option("-v", "--verbose", is_flag=True, help="Show passing checks and probe notes.")(f)


def load_machine(machine_file: Path | None):
    """The machine to judge: the `--machine` file, else the QLORA_DOCTOR_MACHINE file, else a probe."""
    from qlora_doctor.sources import machine as machine_mod

    if machine_file is not None:
        return machine_mod.load_described_machine(machine_file)
    return machine_mod.probe_machine()


def load_environment(requirements_file: Path | None):
    """The packages to judge: a requirements file's pins (`-r`), else the installed ones."""
    if requirements_file is not None:
        from qlora_doctor.sources.requirements import load_requirements_file

        return load_requirements_file(requirements_file)
    from qlora_doctor.sources.installed import installed_environment

    return installed_environment()


SCHEMA_VERSION = 1
"""Every `--json` document carries it; it changes when a field changes meaning or goes away."""


def echo_json(data: Any) -> None:
    """Print `data` as the one JSON document on stdout, with secrets redacted (qlora_doctor/core/redact.py)."""
    from qlora_doctor.core.redact import redact_data

    if isinstance(data, dict):
        data = {"schema_version": SCHEMA_VERSION, **data}
    click.echo(json.dumps(redact_data(data), indent=2, sort_keys=False))


def terminal() -> tuple[int, bool]:
    """(columns, colour) for rendering: the terminal's width (COLUMNS, else 80 when not a terminal) and
    colour only on a terminal."""
    import shutil
    import sys

    return shutil.get_terminal_size(fallback=(80, 24)).columns, sys.stdout.isatty()


def echo_rendered(render: Callable[..., str], *args: Any, err: bool = False, **kwargs: Any) -> None:
    """Render with a renderer of qlora_doctor/cli/render.py (which returns text) and write it."""
    width, color = terminal()
    click.echo(render(*args, width=width, color=color and not err, **kwargs), nl=False, err=err)


def combos_option(f: Callable) -> Callable:
    return click.option("--combos", "combos_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="The combinations file (default: matrix.yaml of the checkout).")(f)


def results_option(f: Callable) -> Callable:
    return click.option("--results", "results_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Folder of matrix records (default: matrix-results/ of the checkout).")(f)


def _combos(combos_file: Path | None):
    from qlora_doctor.matrix.combos import load_combinations
    from qlora_doctor.core.shipped import shipped_path

    if combos_file is None:  # a project's own matrix.yaml in the current folder, else the shipped one
        local = Path("matrix.yaml")
        combos_file = local if local.is_file() else shipped_path("matrix.yaml")
    return load_combinations(combos_file)


def _results(results_dir: Path | None) -> Path:
    from qlora_doctor.matrix.records import default_results_dir

    return results_dir or default_results_dir()


def sampling_options(f: Callable) -> Callable:
    """The decoding options of `generate` and `chat` (trainer/generate.py Sampling); greedy by default."""
    options = [
        click.option("--system", default=None, metavar="TEXT", help="A system message before the conversation."),
        click.option("--temperature", type=float, default=0.0, show_default=True,
                     help="0: greedy (deterministic); > 0: sample, e.g. 0.7."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling (with --temperature)."),
        click.option("--top-k", type=int, default=0, show_default=True,
                     help="Sample from the k most likely tokens; 0: no limit (with --temperature)."),
        click.option("--max-new-tokens", type=int, default=128, show_default=True),
        click.option("--seed", type=int, default=None,
                     help="Seed of the sampling: the same seed and input give the same answer (default: random, "
                          "and reported)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def sampling_from_options(temperature: float, top_p: float, top_k: int, max_new_tokens: int, seed: int | None):
    from qlora_doctor.trainer.generate import Sampling

    return Sampling(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed)
