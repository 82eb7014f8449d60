"""Build a Hub-ready release folder from a DenseCL-ViT model folder, and push it in one commit.

The folder is exactly what the repository should hold. The Hub's widget and inference service run only stock
transformers architectures from the repository root, so the root holds the stock form wherever one is exact:

- `--format auto` (default): the stock form at the root when a stock transformers class expresses the model exactly
  (encoder -> `Dinov2Model`, UPerNet segmenter -> `UperNetForSemanticSegmentation` over BEiT, DPT depth model ->
  `DepthAnythingForDepthEstimation`; see `stock`), else the remote-code form; the card says why in one line.
- `--format stock`: the stock form at the root (no Python files, no `auto_map`); refused when there is none.
- `--format remote-code`: `model.safetensors` (float32; sharded past `max_shard_size`, with its index),
  `config.json` whose `auto_map` names `AutoConfig`, this model's task class and `AutoModel` (the encoder, so a task
  release also loads as its fine-tuned encoder), the modeling files the model
  imports, `preprocessor_config.json` (its `auto_map` names `AutoImageProcessor`), and, when a stock class expresses
  the model exactly, the same model as that class under `stock/`.

Encoders add `timm_model.safetensors` in every format.
Both add `README.md` (the model card) and the run's artefacts found in the model folder or its parent run folder:
the resolved training config (`config.yaml` / `training_config.yaml`), `eval_results.json` and example PNGs
(`example*.png`). A pre-training folder is released as its encoder (`DenseCLViTModel`).

A segmentation or depth release also holds the model's prediction on a photograph, drawn as scripts/predict.py
draws it (`example_overlay.png` or `example_depth.png`, replacing a run artefact of that name), and its card shows
that picture. The photograph is `ReleaseOptions.example_image`: by default `example_photo.jpg`, shipped with this
package (scikit-image's `astronaut` sample, 256 x 256: the astronaut Eileen Collins, a NASA photograph in the
public domain); `None` adds no example. Encoder releases get none (an encoder predicts no labels or depth).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors.torch import save_file
from transformers import PreTrainedModel
from transformers.utils.hub import convert_file_size_to_int

from densecl_vit.modeling import (
    DenseCLViTForDepthEstimation,
    DenseCLViTForPreTraining,
    DenseCLViTForSemanticSegmentation,
    DenseCLViTImageProcessor,
    DenseCLViTModel,
    modeling_densecl_vit,
)
from densecl_vit.training.evaluation.visualize import PICTURE_SUFFIXES, prediction_picture, save_png
from densecl_vit.training.interop.inference import load_image, model_task

from . import stock
from .cards import CardInputs, load_training_config, render_model_card, training_sources
from .snippets import MODEL_TASKS

MODELING_DIR = Path(modeling_densecl_vit.__file__).resolve().parent
TRAINING_CONFIG_NAMES = ("config.yaml", "training_config.yaml")
EVAL_RESULTS_NAME = "eval_results.json"
EXAMPLE_GLOB = "example*.png"
EXAMPLE_PHOTO = Path(__file__).resolve().parent / "example_photo.jpg"
EXAMPLE_PHOTO_CREDIT = "the astronaut Eileen Collins, NASA, public domain"
EXAMPLE_LEGENDS = {
    "segmentation": "the colours are the predicted classes, listed with their share of the image",
    "depth": "near is bright; the colour bar is in metres",
}
TIMM_FILE = "timm_model.safetensors"
STOCK_SUBFOLDER = "stock"
FORMATS = ("auto", "stock", "remote-code")
MODEL_CLASSES = {
    cls.__name__: cls
    for cls in (
        DenseCLViTModel,
        DenseCLViTForPreTraining,
        DenseCLViTForSemanticSegmentation,
        DenseCLViTForDepthEstimation,
    )
}


def load_release_model(model_dir: str | os.PathLike) -> PreTrainedModel:
    """The model a folder releases, float32 in eval mode; a pre-training folder gives its encoder."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"{model_dir} is not a model folder (no config.json); pass a save_pretrained folder."
        )
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in MODEL_CLASSES:
        raise ValueError(
            f"{config_path} names architectures {architectures}; expected one of {sorted(MODEL_CLASSES)}."
        )
    model, info = MODEL_CLASSES[architectures[0]].from_pretrained(model_dir, output_loading_info=True)
    problems = {
        k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if problems:
        details = "; ".join(f"{k.replace('_', ' ')} {sorted(v)[:3]}" for k, v in problems.items())
        raise ValueError(f"{model_dir} does not hold complete {architectures[0]} weights ({details}).")
    if isinstance(model, DenseCLViTForPreTraining):
        model = model.densecl_vit
    return model.float().eval()


def load_processor(model_dir: Path, config: Any) -> DenseCLViTImageProcessor:
    """The folder's image processor, or one at the model's training size when it has none."""
    if (model_dir / "preprocessor_config.json").is_file():
        return DenseCLViTImageProcessor.from_pretrained(model_dir)
    size = {"height": config.image_size, "width": config.image_size}
    return DenseCLViTImageProcessor(size=size, size_divisor=config.patch_size)


def find_artefacts(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Run artefacts worth publishing, by published name: the model folder first, then its parent run folder."""
    model_dir = Path(model_dir).resolve()
    found: dict[str, Path] = {}
    for folder in (model_dir, model_dir.parent):
        for name in (*TRAINING_CONFIG_NAMES, EVAL_RESULTS_NAME):
            if (folder / name).is_file() and name not in found:
                found[name] = folder / name
        examples = sorted(folder.glob(EXAMPLE_GLOB))
        if examples and not any(name.startswith("example") for name in found):
            found.update({path.name: path for path in examples})
    training = [name for name in TRAINING_CONFIG_NAMES if name in found]
    for name in training[1:]:  # one resolved training config: the first name wins
        del found[name]
    return found


def remote_code_files() -> list[Path]:
    """The modeling/*.py files a release carries: the modeling and image-processing files and what they import."""
    todo = [MODELING_DIR / "modeling_densecl_vit.py", MODELING_DIR / "image_processing_densecl_vit.py"]
    files: list[Path] = []
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.append(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                todo.append(MODELING_DIR / f"{node.module}.py")
    return sorted(files)


def _auto_map(model: PreTrainedModel) -> dict[str, str]:
    """The config's `auto_map`: the model's task class, and `AutoModel` -> the encoder, so that
    `AutoModel.from_pretrained(task_release, trust_remote_code=True)` gives the fine-tuned encoder."""
    name = type(model).__name__
    return {
        "AutoConfig": "configuration_densecl_vit.DenseCLViTConfig",
        "AutoModel": "modeling_densecl_vit.DenseCLViTModel",
        MODEL_TASKS[name].auto_class: f"modeling_densecl_vit.{name}",
    }


def save_remote_code(model: PreTrainedModel, processor: Any, folder: Path, max_shard_size: str) -> None:
    """Weights, config with this model's auto_map only, processor and the remote-code files."""
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    processor.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = _auto_map(model)
    config["architectures"] = [type(model).__name__]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in folder.glob("*.py"):
        path.unlink()
    for path in remote_code_files():
        shutil.copyfile(path, folder / path.name)


def save_stock(stock_model: PreTrainedModel, processor: Any, folder: Path, max_shard_size: str) -> None:
    stock_model.save_pretrained(folder, max_shard_size=max_shard_size)
    stock.stock_image_processor(processor, stock_model).save_pretrained(folder)


@dataclass(frozen=True)
class ReleaseOptions:
    fmt: str = "auto"  # one of FORMATS
    repo_id: str | None = None
    revision: str = "main"
    license: str = "apache-2.0"
    max_shard_size: str = "2GB"
    base_model: str | None = None
    overwrite: bool = False
    # The photograph of the card's example prediction (segmentation and depth models); None: no example.
    example_image: str | os.PathLike | None = EXAMPLE_PHOTO


def _check_options(options: ReleaseOptions) -> None:
    if options.fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {options.fmt!r}.")
    try:
        convert_file_size_to_int(options.max_shard_size)
    except ValueError:
        raise ValueError(
            f"max shard size {options.max_shard_size!r} is not a size such as 2GB or 500MB."
        ) from None


def stock_form(model: PreTrainedModel, processor: Any) -> tuple[PreTrainedModel | None, str | None]:
    """(the stock transformers model equal to `model`, None), or (None, why there is none): the model has no exact
    stock class, or its processor has no stock equivalent."""
    reason = stock.unavailable_reason(model)
    if reason:
        return None, reason
    stock_model = stock.to_stock(model)
    try:
        stock.stock_image_processor(processor, stock_model)
    except ValueError as error:
        return None, str(error).split(";")[0]
    return stock_model, None


def resolved_format(fmt: str, stock_unavailable: str | None) -> str:
    """The format at the repository root: `auto` is `stock` wherever a stock form is exact, else `remote-code`."""
    if fmt == "auto":
        return "remote-code" if stock_unavailable else "stock"
    return fmt


def _prepare_output(output: Path, model_dir: Path, overwrite: bool) -> None:
    resolved, source = output.resolve(), model_dir.resolve()
    if resolved == source or resolved in source.parents:
        raise ValueError(
            f"output {output} would contain the model folder {model_dir}; choose another folder."
        )
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise ValueError(f"{output} exists and is not empty; pass --overwrite or choose another folder.")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def build_release(
    model_dir: str | os.PathLike, output: str | os.PathLike, options: ReleaseOptions
) -> list[Path]:
    """Write the release folder (see the module docstring); returns its files, relative and sorted."""
    model_dir, output = Path(model_dir), Path(output)
    _check_options(options)
    model = load_release_model(model_dir)
    processor = load_processor(model_dir, model.config)
    artefacts = find_artefacts(model_dir)
    training_name = next((name for name in artefacts if name.endswith(".yaml")), None)
    training_config = load_training_config(artefacts[training_name]) if training_name else None
    stock_model, reason = stock_form(model, processor)
    if options.fmt == "stock" and reason:
        raise ValueError(
            f"no stock transformers model for {type(model).__name__}: {reason}; use remote-code."
        )
    fmt = resolved_format(options.fmt, reason)
    encoder = isinstance(model, DenseCLViTModel)
    timm_kwargs = stock.timm_kwargs(model) if encoder else None
    photo = None if encoder else _example_photo(options.example_image)

    _prepare_output(output, model_dir, options.overwrite)
    if fmt == "stock":
        save_stock(stock_model, processor, output, options.max_shard_size)
    else:
        save_remote_code(model, processor, output, options.max_shard_size)
        if stock_model is not None:
            save_stock(stock_model, processor, output / STOCK_SUBFOLDER, options.max_shard_size)
    if timm_kwargs is not None:
        save_file(stock.timm_state_dict(model), output / TIMM_FILE, metadata={"format": "pt"})
    for name, path in artefacts.items():
        shutil.copyfile(path, output / name)
    example = caption = None
    if photo is not None:
        example, caption = _write_example(model, processor, photo, options.example_image, output)

    base_hub, base_local, datasets = training_sources(training_config or {})
    inputs = CardInputs(
        model_class=type(model).__name__,
        config=model.config.to_dict(),
        repo_id=options.repo_id or f"<your-org>/{output.resolve().name}",
        revision=options.revision,
        license=options.license,
        fmt=fmt,
        stock=stock.stock_formats(model, fmt, TIMM_FILE if timm_kwargs else None, reason),
        training_config=training_config,
        training_config_file=training_name,
        base_model=None if encoder else options.base_model or base_hub,
        base_model_local=None if encoder or options.base_model else base_local,
        datasets=tuple(datasets),
        example_image=example or next((name for name in artefacts if name.endswith(".png")), None),
        example_caption=caption,
        num_parameters=model.num_parameters(),
    )
    eval_path = output / "eval_results.json" if "eval_results.json" in artefacts else None
    render_model_card(inputs, eval_results=eval_path).save(output / "README.md")
    return list_files(output)


def _example_photo(path: str | os.PathLike | None) -> PIL.Image.Image | None:
    """The example photograph as RGB, read before anything is written; None when no example is wanted."""
    if path is None:
        return None
    try:
        return load_image(path)
    except Exception as error:  # any decoder failure: say which file, as predict.py does
        raise ValueError(
            f"cannot read the example image {path} ({type(error).__name__}); pass another --example-image "
            "or --no-example."
        ) from None


def _write_example(
    model: PreTrainedModel, processor: Any, photo: PIL.Image.Image, source: str | os.PathLike, output: Path
) -> tuple[str, str]:
    """Save the model's prediction on `photo` (read from `source`), drawn as scripts/predict.py draws it, in
    `output`; returns the picture's name and the card's caption of it."""
    task = model_task(model)
    name = f"example{PICTURE_SUFFIXES[task]}"
    save_png(prediction_picture(model, processor, photo), output / name)
    bundled = Path(source).resolve() == EXAMPLE_PHOTO
    credit = f"a photograph ({EXAMPLE_PHOTO_CREDIT})" if bundled else f"the photograph `{Path(source).name}`"
    caption = (
        f"The {task} this model predicts for {credit}, drawn as `scripts/predict.py` draws it: "
        f"{EXAMPLE_LEGENDS[task]}."
    )
    return name, caption


def list_files(folder: str | os.PathLike) -> list[Path]:
    """Every file under `folder`, relative, sorted."""
    folder = Path(folder)
    return sorted(path.relative_to(folder) for path in folder.rglob("*") if path.is_file())


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str = "main",
    private: bool = False,
    dry_run: bool = False,
    commit_message: str = "Release DenseCL-ViT model",
    api: Any = None,
    echo: Callable[[str], None] = print,
) -> list[tuple[str, int]]:
    """Create the repository if needed and upload every file of `folder` to `revision` in one commit.

    The token comes from the usual Hugging Face login or environment (`HfApi()` reads it); it is never passed,
    printed or written here. `dry_run` prints the operations and touches no network. Returns [(path, size)].
    """
    folder = Path(folder)
    files = [(path.as_posix(), (folder / path).stat().st_size) for path in list_files(folder)]
    if not files:
        raise ValueError(f"{folder} holds no files to push; build the release folder first.")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo id must be ORG/NAME, got {repo_id!r}.")
    visibility = "private" if private else "public"
    total = sum(size for _, size in files)
    header = (
        f"repo {repo_id} ({visibility}), revision {revision}: one commit of {len(files)} files, {total} bytes"
    )
    if dry_run:
        echo(f"dry run, nothing sent: create repo {repo_id} if missing; {header}")
        for path, size in files:
            echo(f"  add {path} ({size} bytes)")
        return files
    api = api if api is not None else HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    operations = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path)) for path, _ in files
    ]
    info = api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message,
        revision=revision,
        repo_type="model",
    )
    echo(f"pushed {header}: {getattr(info, 'commit_url', info)}")
    return files


__all__ = [
    "EXAMPLE_PHOTO",
    "ReleaseOptions",
    "build_release",
    "find_artefacts",
    "list_files",
    "load_release_model",
    "push_folder",
    "remote_code_files",
    "resolved_format",
    "stock_form",
]
