"""`qlora-doctor export` and `push`: a finished run as a GGUF (+ Ollama Modelfile) or merged checkpoint, or on
the Hugging Face Hub."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from qlora_doctor.cli.options import echo_json, json_option


@click.command()
@click.argument("output_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--format", "fmt", required=True, metavar="gguf|merged",
              help="gguf: one llama.cpp/Ollama file plus a Modelfile; merged: a plain transformers checkpoint.")
@click.option("--quant", metavar="f16|q8_0|q4_k_m",
              help="gguf: the weights' type (default q8_0). q4_k_m needs llama.cpp's quantizer installed.")
@click.option("--dtype", metavar="bf16|fp16|fp32", help="merged: the weights' dtype (default bf16).")
@click.option("--to", "to", required=True, type=click.Path(path_type=Path), help="A new (or empty) folder.")
@json_option
def export(output_dir: Path, fmt: str, quant: str | None, dtype: str | None, to: Path, as_json: bool) -> None:
    """Merge RUN's adapter into its base (in float32) and write it as a GGUF file or a merged checkpoint.

    RUN is a finished run's training.output_dir. For gguf, llama.cpp's converter is fetched once from the
    pinned llama-cpp-python source package on PyPI (into the tool's cache), and a Modelfile for
    `ollama create NAME -f OUT/Modelfile` is written beside the .gguf. Exit 0 written, 1 a tool is missing
    or failed, 2 bad input (no finished run, unknown --quant, --to not empty).
    """
    from qlora_doctor.trainer.export import export as export_run

    quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    with quiet:
        result = export_run(output_dir, to, fmt.lower(), quant=quant.lower() if quant else None,
                            dtype=dtype.lower() if dtype else None)
    if as_json:
        echo_json({**result.__dict__, "path": str(result.path), "files": list(result.files),
                   "notes": list(result.notes)})
        return
    what = f"gguf {result.quant}" if result.format == "gguf" else f"merged {result.dtype}"
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    click.echo(f"exported {output_dir} as {what} -> {result.path}/ ({', '.join(result.files)}; "
               f"{result.bytes / 2**20:.1f} MiB; {steps})")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if result.format == "gguf":
        family = f"the {result.template_family} chat format" if result.template_family else "no TEMPLATE"
        click.echo(f"Modelfile: {family}. Try it: ollama create NAME -f {result.path / 'Modelfile'} && "
                   "ollama run NAME")


@click.command()
@click.argument("output_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--repo", "repo_id", required=True, metavar="USER/NAME", help="The Hugging Face model repository.")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one is left as it is).")
@click.option("--what", default="adapter", show_default=True, metavar="adapter|merged|gguf",
              help="The adapter, or an export of the run (merged, gguf) given with --export.")
@click.option("--export", "export_dir", type=click.Path(path_type=Path),
              help="--what merged|gguf: the folder `qlora-doctor export` wrote.")
@click.option("--dry-run", is_flag=True, help="List exactly the files that would be uploaded; no network.")
@json_option
def push(output_dir: Path, repo_id: str, private: bool, what: str, export_dir: Path | None, dry_run: bool,
         as_json: bool) -> None:
    """Upload RUN to the Hugging Face Hub: the adapter (or an export), the model card, recipe.yaml and
    metrics.json; never checkpoints, the manifest, the doctor's report, the lockfile or a file holding a
    secret. Needs `hf auth login` or HF_TOKEN (not for --dry-run). Exit 0, 1 the Hub refused, 2 bad input.
    """
    from qlora_doctor.trainer.push import plan_push
    from qlora_doctor.trainer.push import push as push_run

    plan = plan_push(output_dir, repo_id, what.lower(), private=private, export_dir=export_dir)
    result = None if dry_run else push_run(plan)
    if as_json:
        echo_json({"repo_id": plan.repo_id, "private": plan.private, "what": plan.what, "dry_run": dry_run,
                   "files": [name for name, _ in plan.files], "left_out": list(plan.left_out),
                   **({"url": result.url, "commit": result.commit} if result else {})})
        return
    for name in plan.left_out:
        click.echo(f"left out: {name}", err=True)
    if result is None:
        click.echo(f"would upload to {plan.repo_id}{' (private)' if private else ''}:")
        for name, _ in plan.files:
            click.echo(f"  {name}")
        return
    click.echo(f"uploaded {len(plan.files)} files to {result.url}" + (f" ({result.commit})" if result.commit else ""))
