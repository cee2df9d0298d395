"""The model families: which handle opens a pipeline folder (by the pipeline class its ``model_index.json``
names), and :func:`load_model`, the one way a recipe, a sampler or a command opens a model.

Built in: SD3 (:class:`dgpo.models.handle.SD3Model`), FLUX.1 (:mod:`dgpo.models.flux`) and Z-Image
(:mod:`dgpo.models.zimage`); :func:`register_model_family` adds another (a plug-in's).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dgpo.errors import UserError
from dgpo.models.handle import FlowModel, load_pipeline


def _sd3():
    from dgpo.models.handle import SD3Model
    return SD3Model


def _flux():
    from dgpo.models.flux import FluxModel
    return FluxModel


def _zimage():
    from dgpo.models.zimage import ZImageModel
    return ZImageModel


#: pipeline class name → the handle class (imported when a folder of that family is opened)
_BUILT_IN = {"StableDiffusion3Pipeline": _sd3, "FluxPipeline": _flux, "ZImagePipeline": _zimage}
_FAMILIES: dict[str, type] = {}


def register_model_family(pipeline_class: str, handle_cls: type) -> type:
    """Make :func:`load_model` open folders whose ``model_index.json`` names ``pipeline_class`` with
    ``handle_cls`` (a :class:`FlowModel`)."""
    _FAMILIES[pipeline_class] = handle_cls
    return handle_cls


WEIGHTS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # model.weights_dtype, teacher.weights_dtype


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, resolution: int = 0) -> FlowModel:
    """The handle of a local pipeline folder, by the pipeline class its ``model_index.json`` names; at
    ``resolution`` pixels when given (a family that cannot change it says so), else the pipeline's own."""
    import json

    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        load_pipeline(model_dir)  # the one clear error for a folder that is not a pipeline
    try:
        name = json.loads(index.read_text()).get("_class_name", "?")
    except (ValueError, AttributeError):
        raise UserError(f"{str(index)!r} is not a pipeline index (not a JSON object): pass a folder written by "
                        f"`save_pretrained`") from None
    if name not in _FAMILIES and name not in _BUILT_IN:
        raise UserError(f"{str(model_dir)!r} holds a {name}; the model families this framework can train are "
                        f"{sorted({*_FAMILIES, *_BUILT_IN})} (add one with dgpo.models.families.register_model_family)")
    handle = _FAMILIES[name] if name in _FAMILIES else _BUILT_IN[name]()
    model = handle.from_pretrained(model_dir, dtype)
    if resolution and resolution != model.image_size:
        if not hasattr(model, "at_resolution"):
            raise UserError(f"model.resolution={resolution}: the {name} handle samples {model.image_size} px only")
        model = model.at_resolution(resolution)
    return model
