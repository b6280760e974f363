"""Loading and saving a checkpoint's processor, with the token-count settings applied.

Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision and SmolVLM's processors also hold a video processor, which
needs torchvision; transformers 5 then refuses to build, load or save the processor without it,
even for images. This pipeline reads images only, so those processors are built from their image
processor and tokenizer alone (``_image_only``): the same class, the same files on disk, the same
``processor_class`` in ``processor_config.json``, so a folder saved here loads in plain
transformers with ``AutoProcessor`` wherever torchvision is installed.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from forensic_vlm.config import ModelConfig
from forensic_vlm.errors import ConfigError
from forensic_vlm.models.architectures import Architecture, architecture_of, by_processor


@functools.cache
def _image_only(name: str, video_processor_type: str):
    """transformers' processor class ``name``, less its video processor (see the module's docstring).

    The subclass keeps the parent's name, so what it saves names the parent. Its video processor's
    settings are kept as they were read (a real checkpoint's) and saved again, or, for a processor
    built here, those of the image processor under ``video_processor_type``: a folder saved here
    has what ``AutoProcessor`` needs to build the whole processor where torchvision is installed.
    """
    import transformers

    parent = getattr(transformers, name)

    @classmethod
    def get_attributes(cls) -> list[str]:
        return [a for a in parent.get_attributes() if a != "video_processor"]

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return parent.check_argument_for_proper_class(self, argument_name, argument)

    @classmethod
    def from_pretrained(cls, source, **kwargs):
        processor = parent.from_pretrained.__func__(cls, source, **kwargs)
        processor.video_processor_settings = _saved_video_settings(Path(source))
        return processor

    def save_pretrained(self, save_directory, **kwargs):
        files = parent.save_pretrained(self, save_directory, **kwargs)
        path = Path(save_directory) / "processor_config.json"
        saved = json.loads(path.read_text(encoding="utf-8"))
        settings = getattr(self, "video_processor_settings", None)
        if settings is None:
            settings = {k: v for k, v in self.image_processor.to_dict().items() if k != "image_processor_type"}
            settings["video_processor_type"] = video_processor_type
        saved["video_processor"] = settings
        path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return files

    return type(
        name,
        (parent,),
        {
            "get_attributes": get_attributes,
            "check_argument_for_proper_class": check_argument_for_proper_class,
            "from_pretrained": from_pretrained,
            "save_pretrained": save_pretrained,
            "__module__": __name__,
            "__qualname__": name,
        },
    )


def _saved_video_settings(folder: Path) -> dict | None:
    """A checkpoint's video processor settings, from processor_config.json or their own file."""
    combined, alone = folder / "processor_config.json", folder / "video_preprocessor_config.json"
    if combined.is_file():
        settings = json.loads(combined.read_text(encoding="utf-8")).get("video_processor")
        if settings is not None:
            return settings
    return json.loads(alone.read_text(encoding="utf-8")) if alone.is_file() else None


def processor_class(architecture: Architecture):
    import transformers

    if architecture.video_processor:
        return _image_only(architecture.processor, architecture.video_processor)
    return getattr(transformers, architecture.processor)


def load_processor(
    source: str | Path, model_config: ModelConfig | None = None, *, architecture: Architecture | None = None
):
    """The processor in ``source`` (a checkpoint or an adapter folder), left-padding, with
    ``model.max_tiles`` or ``model.min_pixels``/``max_pixels`` applied.

    ``architecture`` defaults to the one ``source``'s config.json names, or for an adapter folder
    (which has none) the one of ``model_config.name_or_path``, its base model."""
    if architecture is None:
        architecture = _architecture_of_source(Path(source), model_config)
    processor = processor_class(architecture).from_pretrained(str(source), trust_remote_code=False)
    processor.tokenizer.padding_side = "left"  # decoder-only: the answer position is the last one
    if model_config is not None:
        apply_resolution(processor.image_processor, model_config, architecture)
    return processor


def _architecture_of_source(source: Path, model_config: ModelConfig | None) -> Architecture:
    """A checkpoint's architecture from its config.json; a processor or adapter folder's from the
    base model's, else from the processor class it was saved with."""
    if (source / "config.json").is_file():
        return architecture_of(source)
    if model_config is not None and (Path(model_config.name_or_path) / "config.json").is_file():
        return architecture_of(model_config.name_or_path)
    saved = source / "processor_config.json"
    name = json.loads(saved.read_text(encoding="utf-8")).get("processor_class") if saved.is_file() else None
    # Neither: architecture_of gives the named error (no config.json to read the architecture from).
    return by_processor(name) or architecture_of(source)


def apply_resolution(image_processor, model_config: ModelConfig, architecture: Architecture) -> None:
    """Cap an image's tokens as the settings say, or stop naming a setting this architecture lacks."""
    tiles = model_config.max_tiles is not None
    pixels = model_config.min_pixels is not None or model_config.max_pixels is not None
    if tiles and architecture.resolution != "anyres":
        raise ConfigError(f"model.max_tiles is for architectures that tile images; {architecture.name} does not")
    if pixels and architecture.resolution != "pixels":
        raise ConfigError(
            f"model.min_pixels and model.max_pixels are for Qwen2.5-VL and Qwen3-VL; {architecture.name} "
            "does not resize images by pixel count"
        )
    if tiles:
        image_processor.image_grid_pinpoints = capped_pinpoints(
            image_processor.image_grid_pinpoints, image_processor.crop_size["height"], model_config.max_tiles
        )
    if pixels:
        size = dict(image_processor.size)
        if model_config.min_pixels is not None:
            size["shortest_edge"] = model_config.min_pixels
        if model_config.max_pixels is not None:
            size["longest_edge"] = model_config.max_pixels
        if size["shortest_edge"] > size["longest_edge"]:
            raise ConfigError(
                f"model.min_pixels/max_pixels give {size['shortest_edge']} > {size['longest_edge']} pixels "
                "with the checkpoint's own setting for the other"
            )
        image_processor.size = (
            type(image_processor.size)(**size) if not isinstance(image_processor.size, dict) else size
        )


def capped_pinpoints(pinpoints: list[list[int]], tile: int, max_tiles: int | None) -> list[list[int]]:
    """The anyres grid shapes of at most ``max_tiles`` tiles (``model.max_tiles``).

    The processor (how an image is cut up and how many tokens it becomes) and the model (how the
    features are put back together) must use the same list, so both are capped from this function.
    The model was pretrained on every shape, so a cap stays within what it has seen.
    """
    if max_tiles is None:
        return [list(p) for p in pinpoints]
    kept = [list(p) for p in pinpoints if (p[0] // tile) * (p[1] // tile) <= max_tiles]
    if not kept:
        smallest = min((p[0] // tile) * (p[1] // tile) for p in pinpoints)
        raise ConfigError(f"model.max_tiles {max_tiles} leaves no anyres grid; the smallest has {smallest} tiles")
    return kept
