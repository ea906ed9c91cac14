"""What the planner knows about a model: its config, and its parameters counted per module type.

Nothing is downloaded but the config. Where it comes from, in this order:
  1. `builtin:NAME`: the config.json shipped with qlora-doctor (`trainer.builtin.builtin_config`);
  2. a local folder: its `config.json`;
  3. anything else is a hub id, read with `transformers.AutoConfig.from_pretrained` (config only).

Parameters are counted on the meta device (`with torch.device("meta"): AutoModelForCausalLM.from_config`),
so an 8B model costs no memory and about a second. What bitsandbytes quantizes is what transformers'
bnb integration converts: every `nn.Linear` except the output embeddings (`lm_head`), see
`transformers.integrations.bitsandbytes.get_keys_to_not_convert`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_doctor.core.errors import CheckFailed, InputError


@dataclass(frozen=True)
class LinearShape:
    """One linear layer inside a decoder layer (all layers are assumed to have the same shapes)."""

    name: str
    """Its name inside the layer, e.g. `self_attn.q_proj`."""
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts per module type, and the decoder's geometry, of one model config."""

    model_type: str
    """`llama`, `qwen2`, ... as in config.json."""
    num_layers: int
    hidden_size: int
    vocab_size: int
    q_dim: int
    """num_attention_heads * head_dim: the width of the attention queries and output."""
    kv_dim: int
    """num_key_value_heads * head_dim: the width of the keys and of the values."""
    intermediate_size: int
    gated_mlp: bool
    """A gate projection (SwiGLU & co.): the MLP keeps gate, up and activation outputs for backward."""
    tied_embeddings: bool
    """lm_head shares the input embedding's weight (no separate lm_head parameters)."""
    linear: int
    """Parameters in the `nn.Linear` layers bitsandbytes quantizes (all but lm_head)."""
    linear_largest: int
    """The largest single such weight (elements): the biggest dequantization buffer."""
    linear_tensors: int
    """How many weights get quantized (each carries its own quantization state)."""
    embedding: int
    """Input embeddings (and position embeddings, if any)."""
    lm_head: int
    """The output projection's own parameters; 0 when tied to the input embeddings."""
    norms: int
    """LayerNorm/RMSNorm weights and biases."""
    other: int
    """Every other parameter (e.g. linear biases), kept unquantized."""
    layer_linears: tuple[LinearShape, ...]
    """The linear layers of one decoder layer, in module order."""
    linear_names: tuple[str, ...]
    """Full names of every quantized linear layer (for matching LoRA's target_modules)."""

    @property
    def total(self) -> int:
        return self.linear + self.embedding + self.lm_head + self.norms + self.other


def load_model_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                      where: str = "model.name_or_path", allow_network: bool = True) -> dict[str, Any]:
    """The model's config as a dict, in the documented order (module docstring). `where` names the key
    that gave `name_or_path`, for messages. A hub config comes from the local Hugging Face cache, else
    (when `allow_network`) from the hub."""
    from qlora_doctor.recipe.builtin import builtin_config, is_builtin

    if is_builtin(name_or_path):
        return builtin_config(name_or_path)
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise InputError(f"{where}: {folder} has no config.json, so it is not a transformers checkpoint "
                             "folder; point it at the folder that holds config.json and the weights")
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{config_file}: cannot read the model config ({err}); re-download the model")
        if not isinstance(data, dict):
            raise InputError(f"{config_file}: expected a JSON object (a transformers config)")
        return data
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise InputError(f"{where}: no model folder at {folder}; fix the path, or use a hub id like "
                         "`meta-llama/Llama-3.2-1B`")
    try:
        from transformers import AutoConfig
    except Exception as err:
        raise CheckFailed(f"{where}: reading a hub model's config needs transformers, which does not import "
                          f"({type(err).__name__}: {str(err)[:200]}); pip install 'qlora-doctor[train]'") from None
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:  # the local Hugging Face cache first: no network, no waiting for timeouts
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        if not allow_network:
            raise InputError(f"{where}: the config of hub model {name_or_path!r} is not in the local Hugging "
                             "Face cache; run `qlora-doctor plan RECIPE` where the hub is reachable (it caches "
                             "the config), or set model.name_or_path to a local folder") from None
        from qlora_doctor.recipe.preflight import HUB_TIMEOUT_S, hub_unreachable

        # Offline, transformers retries for ~25 s with a line per try: ask once, bounded, and say so.
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        reason = "HF_HUB_OFFLINE is set" if offline else hub_unreachable(name_or_path, revision)
        if reason is not None:
            raise InputError(f"{where}: the config of hub model {name_or_path!r} is not in the local Hugging Face "
                             f"cache and " + ("HF_HUB_OFFLINE is set" if offline else
                                             f"the hub did not answer within {HUB_TIMEOUT_S:g} s ({reason})") + "; run where "
                             "the hub is reachable (it caches the config), log in for a gated model, or set "
                             "model.name_or_path to a local folder") from None
        try:
            config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise InputError(f"{where}: cannot read the config of hub model {name_or_path!r} ({first}); "
                             "run where the Hugging Face hub is reachable (and log in for gated models), or "
                             "download the model and set model.name_or_path to its local folder") from None
    return config.to_dict()


def count_parameters(config: dict[str, Any], where: str = "model config") -> ModelCounts:
    """Count a model's parameters per module type by building it on the meta device (no memory)."""
    return _count_cached(json.dumps(config, sort_keys=True, default=str), where)


@functools.lru_cache(maxsize=16)
def _count_cached(config_json: str, where: str) -> ModelCounts:
    try:
        import torch
        from torch import nn
        from transformers import AutoConfig, AutoModelForCausalLM
    except Exception as err:  # missing or broken: the doctor reports it, the planner cannot count
        raise CheckFailed(f"{where}: counting parameters needs torch and transformers, which do not import "
                          f"({type(err).__name__}: {str(err)[:200]}); pip install 'qlora-doctor[train]' "
                          "(`qlora-doctor check` says which versions fit this machine)") from None

    data = json.loads(config_json)
    model_type = data.get("model_type")
    if not model_type:
        raise InputError(f"{where}: no model_type in the config, so transformers cannot build the model; "
                         "use a transformers checkpoint (its config.json names model_type)")
    try:
        config = AutoConfig.for_model(**data)
    except (ValueError, KeyError) as err:
        raise InputError(f"{where}: transformers {_version('transformers')} does not know model_type "
                         f"{model_type!r} ({str(err).splitlines()[0][:200]}); upgrade transformers") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{where}: cannot build a {model_type} causal LM from this config "
                         f"({str(err).splitlines()[0][:200]}); planning needs a decoder-only model") from None

    output = model.get_output_embeddings()
    input_embeddings = model.get_input_embeddings()
    tied = output is not None and input_embeddings is not None and output.weight is input_embeddings.weight
    linear = largest = tensors = embedding = norms = 0
    seen: set[int] = set()
    linear_names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not output:
            linear += module.weight.numel()
            largest = max(largest, module.weight.numel())
            tensors += 1
            seen.add(id(module.weight))
            linear_names.append(name)
        elif isinstance(module, nn.Embedding):
            embedding += module.weight.numel()
            seen.add(id(module.weight))
        elif "norm" in type(module).__name__.lower():
            for p in module.parameters(recurse=False):
                norms += p.numel()
                seen.add(id(p))
    lm_head = 0
    if output is not None and not tied:
        lm_head = output.weight.numel()
        seen.add(id(output.weight))
    other = sum(p.numel() for p in model.parameters() if id(p) not in seen)

    layers = _decoder_layers(model, config)
    layer_linears = tuple(LinearShape(n, m.in_features, m.out_features) for n, m in layers[0].named_modules()
                          if isinstance(m, nn.Linear))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    return ModelCounts(
        model_type=model_type, num_layers=len(layers), hidden_size=hidden, vocab_size=int(text.vocab_size),
        q_dim=heads * head_dim, kv_dim=kv_heads * head_dim, intermediate_size=intermediate,
        gated_mlp=any("gate" in s.name for s in layer_linears), tied_embeddings=tied,
        linear=linear, linear_largest=largest, linear_tensors=tensors, embedding=embedding,
        lm_head=lm_head, norms=norms, other=other, layer_linears=layer_linears,
        linear_names=tuple(linear_names))


def _decoder_layers(model: Any, config: Any) -> Any:
    """The ModuleList of decoder layers: the longest ModuleList in the model."""
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise InputError(f"{getattr(config, 'model_type', 'model')}: no list of decoder layers found; "
                         "the planner handles decoder-only transformers (Llama, Mistral, Qwen, ...)")
    return max(lists, key=len)


def lora_targets(counts: ModelCounts, target_modules: str | list[str] | tuple[str, ...]) -> tuple[LinearShape, ...]:
    """The linear layers of one decoder layer that LoRA wraps, with peft's matching rules:
    `all-linear` is every linear but the output layer; a list matches names ending in `.NAME`;
    another string is a regular expression matched against the full module name."""
    if target_modules == "all-linear":
        return counts.layer_linears
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        # full names look like `model.layers.0.self_attn.q_proj`; layer_linears hold `self_attn.q_proj`
        return tuple(s for s in counts.layer_linears
                     if any(full.endswith("." + s.name) for full in counts.linear_names if pattern.fullmatch(full)))
    wanted = set(target_modules)
    return tuple(s for s in counts.layer_linears if s.name.split(".")[-1] in wanted or s.name in wanted)


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "(not installed)"
