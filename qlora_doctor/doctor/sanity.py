"""Recipe sanity: the knowledge base's recipe rules (knowledge/data/recipe_rules.toml) judged on a recipe
and the facts around it: the model's config, the data's real size and row lengths, the batch and schedule
the run will have. `check --recipe` and `run` show each firing rule as a check (`SANITY_CHECKS`, in
doctor/recipe.py's RECIPE_CHECKS); `validate` shows the same through `sanity_findings(recipe)`.

Facts are read cheaply and offline: the model's config.json (builtin, local folder, or the Hugging Face
cache; never the network), the local data file's line count and its first rows (recipe/preflight.py), the
machine's precision where a run plan has decided it. A fact that cannot be read leaves the rules that
need it unjudged (never "clear").
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from qlora_doctor.core.report import Check
from qlora_doctor.knowledge.recipe_rules import UNKNOWN, RecipeRule, load_recipe_rules, lora_scaling

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.recipe.schema import Recipe
    from qlora_doctor.runplan import RunPlan

LENGTH_ROWS = 1000
"""Rows read for row lengths (the longest row, the share truncated)."""
CHARS_PER_TOKEN = 4
"""Characters per token for the length estimate (English text with BPE tokenizers: about 4)."""
TOKENS_PER_MESSAGE = 4
"""Chat-template tokens around each message (role header, end of turn)."""
MAX_OVERLAP_BYTES = 50_000_000
"""Files compared row by row for shared eval/train rows only up to this size."""
MAX_LINE_SCAN_BYTES = 200_000_000
"""JSON Lines files up to this size are read line by line (blank lines skipped); larger ones in blocks."""
DEFAULT_WARMUP_RATIO = 0.03
"""training_arguments_kwargs' default when neither warmup_ratio nor warmup_steps is set."""


# --- facts -------------------------------------------------------------------------------------------

def recipe_values(recipe: Recipe) -> dict[str, Any]:
    """Every recipe key as `section.key` -> value (None for an unset one)."""
    values: dict[str, Any] = {}
    for section, fields in recipe.model_dump(mode="json").items():
        if isinstance(fields, dict):
            for key, value in fields.items():
                values[f"{section}.{key}"] = value
    return values


def recipe_facts(recipe: Recipe, run: RunPlan | None = None) -> dict[str, Any]:
    """The facts of recipe_rules.toml's [facts] for `recipe` (and its run plan, when there is one); an
    unreadable one is UNKNOWN."""
    t, lora = recipe.training, recipe.lora
    facts: dict[str, Any] = {"lora_scaling": lora_scaling(lora.r, lora.lora_alpha, lora.use_rslora)}
    config = _model_config(recipe)
    facts["model_max_position_embeddings"] = _int(config.get("max_position_embeddings")) if config else UNKNOWN
    dtype = (config.get("torch_dtype") or config.get("dtype")) if config else None
    facts["model_torch_dtype"] = dtype if isinstance(dtype, str) else UNKNOWN
    if run is not None and run.memory is not None:
        facts["model_params_b"] = run.memory.parameters / 1e9
    else:
        params = estimate_parameters(config) if config else None
        facts["model_params_b"] = params / 1e9 if params else UNKNOWN
    facts["tokenizer_has_chat_template"] = _has_chat_template(recipe)

    if run is not None:
        facts["compute_dtype"] = run.precision.compute_dtype
        processes = run.num_processes or 1
    else:  # `validate` judges no machine: only what the recipe states
        q = recipe.quantization
        facts["compute_dtype"] = (q.bnb_4bit_compute_dtype if q.bnb_4bit_compute_dtype != "auto"
                                  else "float16" if t.fp16 is True else "bfloat16" if t.bf16 is True else UNKNOWN)
        processes = 1 if recipe.distributed.strategy == "none" or recipe.distributed.num_processes == "auto" \
            else int(recipe.distributed.num_processes)
    facts["effective_batch"] = t.per_device_train_batch_size * t.gradient_accumulation_steps * processes

    train_rows, eval_rows, shared, lengths = _data_facts(recipe)
    facts["dataset_rows"] = train_rows
    facts["eval_rows"] = eval_rows
    facts["eval_train_shared_rows"] = shared
    facts["longest_row_tokens"] = max(lengths) if lengths else UNKNOWN
    facts["truncated_row_fraction"] = (sum(n > t.max_seq_length for n in lengths) / len(lengths)
                                       if lengths else UNKNOWN)

    if t.max_steps is not None:
        total: Any = t.max_steps
    elif isinstance(train_rows, int) and train_rows > 0:
        batches = math.ceil(train_rows / (t.per_device_train_batch_size * processes))
        total = max(1, math.ceil(batches / t.gradient_accumulation_steps)) * t.epochs
        total = math.ceil(total)
    else:
        total = UNKNOWN
    facts["total_steps"] = total
    if t.warmup_steps is not None:
        facts["warmup_steps_effective"] = t.warmup_steps
    elif total is UNKNOWN:
        facts["warmup_steps_effective"] = UNKNOWN
    else:
        ratio = DEFAULT_WARMUP_RATIO if t.warmup_ratio is None else t.warmup_ratio
        facts["warmup_steps_effective"] = math.ceil(ratio * total)
    return facts


def _data_facts(recipe: Recipe) -> tuple[Any, Any, Any, list[int]]:
    """(training rows, eval rows, eval rows also in the training file, estimated row lengths) summed over the
    recipe's data sections (`datasets:` weights applied as trainer/data.py does); a sum with an unreadable
    part (a hub dataset, a parquet file) is UNKNOWN."""
    totals: list[Any] = [0, 0, 0]
    lengths: list[int] = []
    for d in recipe.data_sections:
        rows = count_rows(d.path) if not d.is_hub else None
        if rows is not None and d.max_samples is not None:
            rows = min(rows, d.max_samples)
        eval_rows: Any = UNKNOWN
        train_rows: Any = UNKNOWN
        if rows is not None:
            held_out = 0
            if d.eval_path is None and d.eval_split > 0 and rows >= 2:
                held_out = min(rows - 1, max(1, round(rows * d.eval_split)))
            whole = math.floor(d.weight)
            train_rows = whole * (rows - held_out) + round((d.weight - whole) * (rows - held_out))
            eval_rows = held_out if d.eval_path is None else UNKNOWN
        if d.eval_path is not None:
            counted = count_rows(d.eval_path)
            eval_rows = counted if counted is not None else UNKNOWN
        shared = shared_rows(d.eval_path, d.path) if d.eval_path and not d.is_hub else UNKNOWN
        totals = [UNKNOWN if total is UNKNOWN or part is UNKNOWN else total + part
                  for total, part in zip(totals, (train_rows, eval_rows, shared))]
        lengths += row_token_estimates(d.path, d.format) if not d.is_hub else []
    return totals[0], totals[1], totals[2], lengths


def _int(value: Any) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else UNKNOWN


def _model_config(recipe: Recipe) -> dict[str, Any] | None:
    """config.json of a builtin or local model, or from the Hugging Face cache; None when not readable offline."""
    from qlora_doctor.recipe.builtin import builtin_config, is_builtin

    name = recipe.model.name_or_path
    try:
        if is_builtin(name):
            return builtin_config(name)
        folder = Path(name)
        if folder.is_dir():
            return json.loads((folder / "config.json").read_text(encoding="utf-8"))
        cached = _hub_cached_file(name, "config.json", recipe.model.revision)
        return json.loads(Path(cached).read_text(encoding="utf-8")) if cached else None
    except (OSError, ValueError):
        return None


def _hub_cached_file(name: str, filename: str, revision: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(name, filename, revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id or cache: the fact is unknown
        return None
    return found if isinstance(found, str) else None


def _has_chat_template(recipe: Recipe) -> Any:
    """Whether the model's tokenizer has a chat template; UNKNOWN when its files cannot be read offline."""
    from qlora_doctor.recipe.builtin import is_builtin

    name = recipe.model.name_or_path
    if recipe.model.chat_template is not None:
        return True  # the recipe sets one (trainer/data.py puts it on the tokenizer)
    if is_builtin(name):
        return True  # the builtin models are instruct models whose GGUF carries the chat template
    folder = Path(name)
    if folder.is_dir():
        if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
            return True
        config_file: str | None = str(folder / "tokenizer_config.json")
    else:
        for extra in ("chat_template.jinja", "chat_template.json"):
            if _hub_cached_file(name, extra, recipe.model.revision):
                return True
        config_file = _hub_cached_file(name, "tokenizer_config.json", recipe.model.revision)
    if config_file is None:
        return UNKNOWN
    try:
        data = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return UNKNOWN
    return bool(data.get("chat_template")) if isinstance(data, dict) else UNKNOWN


def estimate_parameters(config: dict[str, Any]) -> int | None:
    """A decoder-only transformer's parameter count from its config (embeddings, attention, MLP); None
    when the config lacks the sizes. The memory planner counts exactly, but needs torch."""
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        vocab = int(config["vocab_size"])
        heads = int(config.get("num_attention_heads") or 1)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        intermediate = int(config.get("intermediate_size") or 4 * hidden)
    except (KeyError, TypeError, ValueError):
        return None
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return layers * (attention + mlp) + embeddings


def count_rows(path: str) -> int | None:
    """Rows of a local .jsonl (non-empty lines, counted in blocks), .json list or .csv file; None otherwise."""
    file = Path(path)
    if not file.is_file():
        return None
    try:
        if file.suffix == ".jsonl":
            with file.open("rb") as f:
                if file.stat().st_size <= MAX_LINE_SCAN_BYTES:
                    return sum(1 for line in f if line.strip())
                # a large file: count newlines in blocks (blank lines, rare in JSON Lines, count too)
                newlines, last = 0, b"\n"
                for block in iter(lambda: f.read(1 << 20), b""):
                    newlines += block.count(b"\n")
                    last = block[-1:]
                return newlines + (last != b"\n")
        if file.suffix == ".json":
            if file.stat().st_size > MAX_OVERLAP_BYTES:
                return None
            data = json.loads(file.read_text(encoding="utf-8"))
            return len(data) if isinstance(data, list) else None
        if file.suffix == ".csv":
            import csv

            with file.open(encoding="utf-8", newline="") as f:
                return sum(1 for _ in csv.DictReader(f))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return None


def shared_rows(eval_path: str, train_path: str) -> Any:
    """Rows of eval_path that are also rows of train_path (the same file: all of them); UNKNOWN for files
    this cannot compare cheaply."""
    from qlora_doctor.recipe.preflight import first_rows

    if Path(eval_path).resolve() == Path(train_path).resolve():
        return count_rows(eval_path) or UNKNOWN
    for path in (eval_path, train_path):
        if not Path(path).is_file() or Path(path).stat().st_size > MAX_OVERLAP_BYTES:
            return UNKNOWN
    train, evals = first_rows(train_path, limit=10**9), first_rows(eval_path, limit=10**9)
    if train is None or evals is None:
        return UNKNOWN
    seen = {json.dumps(r, sort_keys=True) for r in train}
    return sum(json.dumps(r, sort_keys=True) in seen for r in evals)


def row_token_estimates(path: str, data_format: str) -> list[int]:
    """Estimated tokens of each of the first LENGTH_ROWS rows: characters / CHARS_PER_TOKEN over every
    string in the row, plus TOKENS_PER_MESSAGE per chat message."""
    from qlora_doctor.recipe.preflight import first_rows

    rows = first_rows(path, limit=LENGTH_ROWS) or []
    estimates = []
    for row in rows:
        chars, messages = _text_size(row)
        estimates.append(math.ceil(chars / CHARS_PER_TOKEN) + (TOKENS_PER_MESSAGE * messages
                                                               if data_format == "chat" else 0))
    return estimates


def _text_size(value: Any) -> tuple[int, int]:
    """(characters of every string inside, dicts with a `content` key) of a parsed row."""
    if isinstance(value, str):
        return len(value), 0
    if isinstance(value, dict):
        sizes = [_text_size(v) for v in value.values()]
        return sum(s[0] for s in sizes), sum(s[1] for s in sizes) + ("content" in value)
    if isinstance(value, list):
        sizes = [_text_size(v) for v in value]
        return sum(s[0] for s in sizes), sum(s[1] for s in sizes)
    return 0, 0


# --- judging -----------------------------------------------------------------------------------------

def judge_values(recipe: Recipe, run: RunPlan | None = None) -> dict[str, Any]:
    """Recipe key paths and facts: what the rules' conditions read."""
    return {**recipe_values(recipe), **recipe_facts(recipe, run)}


def rule_check(rule: RecipeRule, values: dict[str, Any]) -> Check | None:
    """The rule as a Check when it fires on `values`; None when it is clear or cannot be judged."""
    if rule.evaluate(values) is not True:
        return None
    shown = [k for k in rule.keys if k in values] or sorted(n for n in rule.names if n in values)
    found = ", ".join(f"{k}: {_show(values[k])}" for k in shown)
    facts = sorted(n for n in rule.names if "." not in n)
    context = ", ".join(f"{n} {_show(values[n])}" for n in facts if values.get(n, UNKNOWN) is not UNKNOWN)
    detail = found + (f" ({context})" if context else "") + f": {rule.cause}"
    return Check(f"recipe.sanity.{rule.id}", "fail" if rule.severity == "fail" else "warn", rule.title,
                 detail, fix=rule.fix, sources=rule.sources, found=found, expected=f"not ({rule.condition})")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return "null" if value is None else str(value)


def sanity_findings(recipe: Recipe, run: RunPlan | None = None) -> list[Check]:
    """Every recipe rule that fires for `recipe` (with `run`'s precision and memory counts when given)."""
    values = judge_values(recipe, run)
    checks = [rule_check(rule, values) for rule in load_recipe_rules().rules]
    return [c for c in checks if c is not None]


# --- as recipe checks (doctor/recipe.py RECIPE_CHECKS) -----------------------------------------------

_cache: list[tuple[Any, dict[str, Any]]] = []


def _values_for(run: RunPlan) -> dict[str, Any]:
    """The values of one run plan, computed once for all the rules' checks."""
    if _cache and _cache[0][0] is run:
        return _cache[0][1]
    values = judge_values(run.recipe, run)
    _cache[:] = [(run, values)]
    return values


def _rule_check_for(rule: RecipeRule) -> Callable[[RunPlan, Machine], Check | None]:
    def check(run: RunPlan, machine: Machine) -> Check | None:
        return rule_check(rule, _values_for(run))

    check.__name__ = f"sanity_{rule.id.replace('-', '_')}"
    check.__doc__ = f"Recipe rule {rule.id}: {rule.title}."
    return check


def sanity_summary_check(run: RunPlan, machine: Machine) -> Check | None:
    """One pass line when no rule fires (each firing rule is its own check)."""
    values = _values_for(run)
    rules = load_recipe_rules().rules
    verdicts = [rule.evaluate(values) for rule in rules]
    if any(v is True for v in verdicts):
        return None
    unjudged = [r.id for r, v in zip(rules, verdicts) if v is None]
    detail = f"{len(rules) - len(unjudged)} of {len(rules)} parameter rules judged, none fires"
    if unjudged:
        detail += f"; not judged (a fact could not be read offline): {', '.join(unjudged)}"
    return Check("recipe.sanity", "pass", "Recipe parameters (learning rate, LoRA, batch, schedule, data)",
                 detail, found="no rule fires", expected="no rule fires")


SANITY_CHECKS: tuple[Callable[[RunPlan, Machine], Check | None], ...] = (
    *(_rule_check_for(rule) for rule in load_recipe_rules().rules), sanity_summary_check)
"""One check per recipe rule (in recipe_rules.toml's order), then the summary."""
