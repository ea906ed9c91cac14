"""Terminal rendering of a memory plan (rich), returned as text: only the CLI writes it."""

from __future__ import annotations

from qlora_doctor.memory.estimate import GIB
from qlora_doctor.memory.plan import Plan
from qlora_doctor.cli.render import _console, _text, escape


def _gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def render_plan(plan: Plan, width: int | None = None, color: bool = False) -> str:
    from rich.table import Table

    console = _console(width, color)
    s = plan.settings
    console.print(f"[bold]model[/]: {escape(str(plan.model))}  ({plan.parameters / 1e9:.2f}B parameters, "
                  f"{plan.trainable_parameters / 1e6:.1f}M LoRA)", highlight=False)
    console.print(f"[bold]step[/]: micro-batch {s.micro_batch} x {s.seq_len} tokens, gradient accumulation "
                  f"{s.grad_accum}, checkpointing {'on' if s.gradient_checkpointing else 'off'}, {s.optim}, "
                  f"compute {s.compute_dtype}{' (autocast)' if s.mixed_precision else ''}", highlight=False)
    if s.levers:
        on = ", ".join(lever.name for lever in s.levers if lever.on) or "none"
        console.print(f"[bold]performance levers on[/]: {on} ({plan.calibration} path)", highlight=False)
    table = Table(show_lines=False, expand=False)
    table.add_column("part at the peak", overflow="fold")
    table.add_column("memory", justify="right")
    for name, size in plan.breakdown:
        table.add_row(name, _gib(size))
    table.add_row("[bold]total[/]", f"[bold]{_gib(plan.total_bytes)}[/]")
    console.print(table)
    console.print(f"predicted torch peak: {_gib(plan.peak_allocated_bytes)} allocated, "
                  f"{_gib(plan.peak_reserved_bytes)} reserved (peak at the {plan.peak_phase}; "
                  f"{_gib(plan.reserved_at_start_bytes)} reserved when training starts)", highlight=False)
    if plan.gpu_name is None:
        console.print("[yellow]no NVIDIA GPU to compare with[/]")
    elif plan.gpu_bytes is None:
        console.print(f"[magenta]{plan.gpu_name}: memory unknown, cannot tell whether it fits[/]", highlight=False)
    elif plan.fits:
        console.print(f"[green]fits[/] {plan.gpu_name} ({_gib(plan.gpu_bytes)}): "
                      f"{_gib(plan.gpu_bytes - plan.total_bytes)} to spare", highlight=False)
    else:
        console.print(f"[bold red]does not fit[/] {plan.gpu_name} ({_gib(plan.gpu_bytes)}): "
                      f"{_gib(plan.total_bytes - plan.gpu_bytes)} short", highlight=False)
        for suggestion in plan.suggestions:
            mark = "[green]fits[/]" if suggestion.fits else "[yellow]helps[/]"
            console.print(f"  {mark} {escape(suggestion.text)} -> {_gib(suggestion.total_bytes)}", highlight=False)
    for note in plan.notes:
        console.print(f"[dim]note: {escape(note)}[/]", highlight=False)
    return _text(console)
