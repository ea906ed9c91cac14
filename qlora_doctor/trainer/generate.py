"""`qlora-doctor generate`, `chat` and `merge`: use the adapter a run wrote.

All read the run's own `recipe.yaml` (the recipe as run, every `auto` resolved) to find the base
model and its quantization, so they need nothing but the output folder. Precision is resolved again
for this machine: an adapter trained on a GPU can be tried on a laptop's CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from qlora_doctor.core.errors import InputError
from qlora_doctor.trainer import outputs

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.recipe.precision import Precision
    from qlora_doctor.recipe.schema import Recipe


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen (transformers' generate arguments). Temperature 0 is greedy decoding, the default:
    deterministic, and what `generate` always did. Otherwise tokens are sampled, reproducibly for a given seed."""

    temperature: float = 0.0
    """0: greedy; > 0: sample from the softmax of logits / temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: all)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: no limit)."""
    max_new_tokens: int = 128
    seed: int | None = None
    """Seeds torch before each answer, so the same seed and input give the same answer; None when sampling:
    a random one, reported in the result so the answer can be reproduced."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def problems(self) -> list[str]:
        """What is wrong with the options, each naming the option and the fix."""
        problems = []
        if not (self.temperature >= 0 and self.temperature <= MAX_TEMPERATURE):
            problems.append(f"--temperature: must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {self.temperature:g}; "
                            "0.7 is a usual value for sampling")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p: must be in (0, 1], got {self.top_p:g}; e.g. 0.9 (1 keeps every token)")
        if self.top_k < 0:
            problems.append(f"--top-k: must be >= 0 (0: no limit), got {self.top_k}")
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens: must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            problems.append(f"--seed: must be between 0 and 2**63 - 1, got {self.seed}")
        if self.greedy and (self.top_p != 1 or self.top_k != 0):
            problems.append("--top-p/--top-k: only apply when sampling; add --temperature (e.g. 0.7), or leave them out "
                            "for greedy decoding")
        return problems

    def seeded(self) -> Sampling:
        """These options with a seed: a fresh random one when sampling without one (greedy needs none)."""
        if self.greedy or self.seed is not None:
            return self
        import secrets

        return replace(self, seed=secrets.randbelow(2**31))

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate`, every sampling knob explicit so that the model's
        generation_config.json (SmolLM2's sets temperature 0.2, top_p 0.9) cannot change the decoding."""
        if self.greedy:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "num_beams": 1,
                    "temperature": None, "top_p": None, "top_k": None}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "num_beams": 1,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


MAX_TEMPERATURE = 100.0
"""Above this the distribution is uniform for every practical purpose: a larger value is a typo."""


@dataclass(frozen=True)
class Generation:
    """One prompt answered by the tuned model (and by the base model with --compare)."""

    prompt: str
    answer: str
    """With the adapter applied."""
    base_answer: str | None
    """The base model alone (same weights, adapter disabled); None without --compare."""
    max_new_tokens: int
    temperature: float
    """0: greedy decoding."""
    top_p: float
    top_k: int
    seed: int | None
    """The seed each answer was sampled with (None for greedy): pass it as --seed to get the same answers."""


@dataclass(frozen=True)
class Reply:
    """One answer, as `answer` produced it."""

    text: str
    """The generated text, special tokens removed, stripped."""
    prompt_tokens: int
    """Tokens of the conversation given to the model (the chat template applied)."""
    new_tokens: int
    """Tokens generated (the end-of-turn token included when the model stopped by itself)."""
    seconds: float
    """Wall time of the generation (measured around model.generate)."""
    stopped: bool
    """True when the model ended its turn itself, False when max_new_tokens cut it."""


@dataclass(frozen=True)
class TunedModel:
    """A finished run's base model with its adapter loaded, ready to answer."""

    output_dir: Path
    recipe: Recipe
    model: Any
    """The peft.PeftModel (eval mode); `model.disable_adapter()` gives the base model."""
    tokenizer: Any
    context_length: int | None
    """The model's max_position_embeddings (None when its config does not say)."""


@dataclass(frozen=True)
class MergeResult:
    """A merged, plain checkpoint: base + adapter folded into the weights."""

    path: Path
    base_model: str
    dtype: str
    """The dtype the merged weights were saved in."""


def load_run(output_dir: Path) -> Recipe:
    """The recipe a finished run wrote, after checking that the folder holds an adapter."""
    from qlora_doctor.recipe.schema import load_recipe

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise InputError(f"{output_dir}: no such output folder; give the training.output_dir of a run "
                         "(`qlora-doctor run RECIPE` makes one)")
    missing = [name for name in (*outputs.ADAPTER_FILES, outputs.RECIPE) if not (output_dir / name).is_file()]
    if missing:
        hint = (" (it has checkpoints: the run did not finish; continue it with `qlora-doctor run RECIPE --resume`)"
                if outputs.last_complete_checkpoint(output_dir) else "")
        raise InputError(f"{output_dir}: not a finished run's folder: {', '.join(missing)} missing{hint}")
    return load_recipe(output_dir / outputs.RECIPE)


def _precision_here(recipe: Recipe, machine: Machine) -> Precision:
    """Precision for this machine, ignoring the fp16/bf16 the run resolved for the machine it ran on."""
    from qlora_doctor.recipe.precision import resolve_precision

    data = recipe.model_copy(update={
        "training": recipe.training.model_copy(update={"fp16": "auto", "bf16": "auto"}),
        "quantization": recipe.quantization.model_copy(update={"bnb_4bit_compute_dtype": "auto"}),
    })
    return resolve_precision(data, machine)


def load_tuned(output_dir: Path, machine: Machine) -> TunedModel:
    """A finished run's base model, loaded as in training (4-bit when the recipe quantizes, in this machine's
    compute dtype: an adapter trained on a GPU answers on a laptop's CPU too), with its adapter."""
    from peft import PeftModel

    from qlora_doctor.trainer.builtin import resolve_model_path
    from qlora_doctor.trainer.model import load_base, load_tokenizer

    output_dir = Path(output_dir)
    recipe = load_run(output_dir)
    precision = _precision_here(recipe, machine)
    tokenizer = load_tokenizer(str(output_dir))
    if not tokenizer.chat_template:
        raise InputError(f"{output_dir}: the tokenizer has no chat template, so a prompt cannot be put in "
                         "the format the model was tuned on; train from a chat (instruct) model")
    base = load_base(recipe, precision, resolve_model_path(recipe.model.name_or_path), quantized=True)
    model = PeftModel.from_pretrained(base, str(output_dir))
    model.eval()
    context = getattr(base.config, "max_position_embeddings", None)
    return TunedModel(output_dir=output_dir, recipe=recipe, model=model, tokenizer=tokenizer,
                      context_length=context if isinstance(context, int) and context > 0 else None)


def chat_inputs(tuned: TunedModel, messages: list[dict[str, str]]) -> Any:
    """The conversation through the model's chat template, ending with the assistant's turn opened."""
    try:
        return tuned.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)
    except Exception as err:  # noqa: BLE001 - jinja2's TemplateError, raised by the template's own checks
        if type(err).__name__ != "TemplateError":
            raise
        system = any(m["role"] == "system" for m in messages)
        fix = "leave out --system (this model's template takes no system message)" if system else \
            "this conversation cannot be put in the model's chat format"
        raise InputError(f"{tuned.output_dir}: the model's chat template refused the conversation ({err}); {fix}") from None


def answer(tuned: TunedModel, messages: list[dict[str, str]], sampling: Sampling, *, base: bool = False,
           on_text: Callable[[str], None] | None = None) -> Reply:
    """The next assistant message of `messages`. `base`: with the adapter disabled. `on_text` receives the
    text as it is decoded (word by word, transformers' TextStreamer rules), for a terminal to show it as it comes.
    With a seed, torch is seeded first, so the same seed and conversation give the same answer."""
    import contextlib
    import time

    import torch

    problems = sampling.problems()
    if problems:
        raise InputError(problems)
    inputs = chat_inputs(tuned, messages).to(tuned.model.device)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    streamer = _callback_streamer(tuned.tokenizer, on_text) if on_text is not None else None
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    adapter = tuned.model.disable_adapter() if base else contextlib.nullcontext()
    started = time.perf_counter()
    with adapter, torch.no_grad():
        out = tuned.model.generate(**inputs, **sampling.generate_kwargs(), streamer=streamer,
                                   pad_token_id=tuned.tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    new = out[0][prompt_tokens:]
    eos = tuned.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | {tuned.tokenizer.eos_token_id}
    stopped = len(new) > 0 and int(new[-1]) in eos_ids
    return Reply(text=tuned.tokenizer.decode(new, skip_special_tokens=True).strip(), prompt_tokens=prompt_tokens,
                 new_tokens=len(new), seconds=seconds, stopped=stopped)


def _callback_streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    """A transformers TextStreamer that hands each decoded piece to `on_text` instead of printing it."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate(output_dir: Path, prompt: str, machine: Machine, *, compare: bool = False,
             sampling: Sampling = Sampling(), system: str | None = None) -> Generation:
    """Answer `prompt` (as a user chat message, with the model's chat template; after `system` as a system
    message when given) with the adapter; with `compare`, also with the adapter disabled, from the same seed.
    Greedy unless `sampling` says otherwise. The base is loaded as in training (4-bit)."""
    if not prompt.strip():
        raise InputError("--prompt: is empty; ask something, e.g. --prompt \"What is LoRA?\"")
    problems = sampling.problems()
    if problems:
        raise InputError(problems)
    sampling = sampling.seeded()
    tuned = load_tuned(output_dir, machine)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    tuned_reply = answer(tuned, messages, sampling)
    base_answer = answer(tuned, messages, sampling, base=True).text if compare else None
    return Generation(prompt=prompt, answer=tuned_reply.text, base_answer=base_answer,
                      max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                      top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed)


def merge(output_dir: Path, to: Path, machine: Machine) -> MergeResult:
    """Reload the base unquantized (16-bit on a GPU, float32 on the CPU), fold the adapter into its
    weights (`merge_and_unload`) and save a plain checkpoint plus the tokenizer to `to`.

    Merging into 4-bit weights would round the update away, hence the 16/32-bit base."""
    from peft import PeftModel

    from qlora_doctor.trainer.builtin import resolve_model_path
    from qlora_doctor.trainer.model import load_base, load_tokenizer

    output_dir, to = Path(output_dir), Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise InputError(f"--to: {to} exists and is not an empty folder; choose a new folder")
    recipe = load_run(output_dir)
    precision = _precision_here(recipe, machine)
    tokenizer = load_tokenizer(str(output_dir))
    base = load_base(recipe, precision, resolve_model_path(recipe.model.name_or_path), quantized=False)
    merged = PeftModel.from_pretrained(base, str(output_dir)).merge_and_unload()

    def save(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _save_new_dir(to, save)
    return MergeResult(path=to, base_model=recipe.model.name_or_path, dtype=precision.compute_dtype)


def _save_new_dir(target: Path, save: Any) -> None:
    """Write a whole folder under a temporary name beside `target`, then rename it into place."""
    import os
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save(tmp)
        if target.exists():
            target.rmdir()  # checked empty above
        from qlora_doctor.core.fileio import apply_umask_modes

        apply_umask_modes(tmp)  # mkdtemp made it 0700
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
