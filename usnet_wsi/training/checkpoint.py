"""Resumable training state without pickle: weights and optimizer tensors in safetensors,
scalars and hyper-parameters in JSON."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from usnet_wsi.errors import DataError, WeightsError
from usnet_wsi.model.spec import ModelSpec


def _flatten(opts: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list[Any]]:
    tensors, meta = {}, []
    for k, opt in enumerate(opts):
        sd = opt.state_dict()
        for pid, st in sd["state"].items():
            for name, val in st.items():
                t = val if torch.is_tensor(val) else torch.tensor(val)
                tensors[f"opt{k}.{pid}.{name}"] = t.detach().cpu().contiguous()
        meta.append(sd["param_groups"])
    return tensors, meta


def save_checkpoint(folder: Path, model: torch.nn.Module, opts: list[torch.optim.Optimizer],
                    state: Any, average: torch.nn.Module | None = None) -> None:
    """`average`: the weight average of `--ema`, kept beside the trained weights."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors, groups = _flatten(opts)
    for prefix, module in (("model", model), ("ema", average)):
        if module is not None:
            tensors.update({f"{prefix}.{k}": v.detach().cpu().contiguous()
                            for k, v in module.state_dict().items()})
    tmp = folder / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / "state.safetensors")
    meta = {"state": asdict(state), "param_groups": groups}
    if isinstance(getattr(model, "spec", None), ModelSpec):
        meta["spec"] = model.spec.to_dict()         # resume rebuilds this architecture
    (folder / "state.json.tmp").write_text(json.dumps(meta))
    os.replace(folder / "state.json.tmp", folder / "state.json")


def checkpoint_spec(folder: Path) -> ModelSpec | None:
    """The architecture of the model in a checkpoint (None when it does not say, or there is
    no checkpoint: then the recipe's is assumed)."""
    try:
        spec = json.loads((folder / "state.json").read_text()).get("spec")
    except (OSError, ValueError, AttributeError):
        return None
    try:
        return ModelSpec.from_dict(spec) if spec is not None else None
    except WeightsError as err:
        raise DataError(f"the checkpoint in {folder} has an unreadable model spec: {err}",
                        "drop --resume to start afresh") from None


def load_checkpoint(folder: Path, model: torch.nn.Module, opts: list[torch.optim.Optimizer],
                    average: torch.nn.Module | None = None) -> dict[str, Any]:
    """Restore `model`, `opts` and (when given) the `--ema` weight `average` from `folder`;
    returns the training state. A checkpoint written without --ema starts the average from the
    restored weights."""
    if not (folder / "state.json").is_file():
        raise DataError(f"nothing to resume in {folder}", "drop --resume to start afresh")
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"))
        model.load_state_dict(_prefixed(tensors, "model."))
        if average is not None:
            average.load_state_dict(_prefixed(tensors, "ema.") or model.state_dict())
        _load_optimizers(opts, tensors, meta)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise DataError(f"the checkpoint in {folder} is damaged or does not match this model "
                        f"(--recipe?): {str(err).splitlines()[0]}",
                        "resume with the same --recipe, or drop --resume to start afresh") from None
    return meta["state"]


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_optimizers(opts: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor],
                     meta: dict[str, Any]) -> None:
    for k, opt in enumerate(opts):
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith(f"opt{k}."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"][k]})
