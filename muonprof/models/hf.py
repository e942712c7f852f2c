"""``hf:PATH``: a Hugging Face causal LM from a local ``config.json`` or model folder, never downloaded.

A config alone (or a folder without weights) gives a randomly initialised model (torch's RNG, so seeding
torch makes it reproducible); a folder with weights loads them. Overrides set config attributes before
the model is built; the common aliases map onto Hugging Face's standard attribute names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .task import LoadedModel, ModelSpecError, TaskInfo

ALIASES = {
    "width": "hidden_size",
    "depth": "num_hidden_layers",
    "heads": "num_attention_heads",
    "vocab": "vocab_size",
    "seq_len": "max_position_embeddings",
}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def load_hf(spec: str, **overrides: Any) -> LoadedModel:
    target = spec.removeprefix("hf:")
    if not target:
        raise ModelSpecError("hf: needs a path: hf:path/to/config.json or hf:path/to/model_folder")
    path = Path(target).expanduser()
    if not path.exists():
        raise ModelSpecError(f"model {spec!r}: no such file or folder {target!r}")
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ModelSpecError(f"model {spec!r}: {target!r} has no config.json")
    try:
        import transformers
    except ImportError:
        raise ModelSpecError(f"{spec} needs the [hf] extra: pip install 'muonprof[hf]'") from None

    try:
        raw = json.loads(config_file.read_text())
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise ModelSpecError(f"model {spec!r}: cannot read {config_file} ({type(err).__name__}: {err})") from None
    if overrides:
        changes = {}
        for key, value in overrides.items():
            attr = ALIASES.get(key, key)
            attr = getattr(config, "attribute_map", {}).get(attr, attr)  # GPT-2 spells hidden_size n_embd
            if not hasattr(config, attr):
                raise ModelSpecError(f"model {spec!r}: {type(config).__name__} has no attribute {key!r}")
            changes[attr] = value
        # rebuild from the file's own dict so derived fields follow the overrides; recent transformers save
        # the derived head_dim, which would pin the old one when width or heads change
        hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
        derived = (
            isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and raw.get("head_dim") == hidden // heads
        )
        if derived and "head_dim" not in changes:
            raw.pop("head_dim")
        config = type(config).from_dict({**raw, **changes})

    weights = path.is_dir() and any((path / name).is_file() for name in _WEIGHTS)
    auto = transformers.AutoModelForCausalLM
    try:
        if weights:
            model = auto.from_pretrained(str(path), config=config, local_files_only=True)
        else:
            model = auto.from_config(config)
    except Exception as err:
        raise ModelSpecError(f"model {spec!r}: cannot build the model ({type(err).__name__}: {err})") from None
    model = model.float()  # recent transformers keep the checkpoint's dtype; muonprof's master weights are fp32
    max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    task = TaskInfo(kind="lm", vocab_size=getattr(config, "vocab_size", None), max_seq_len=max_len)
    model.muonprof_task = task
    return LoadedModel(spec=spec, model=model, task=task, config=config.to_dict(), source="hf")
