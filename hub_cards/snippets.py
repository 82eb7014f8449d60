"""Prose and code snippets of the model cards: what each kind of release is and how to load it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from densecl_vit.modeling.configuration_densecl_vit import PRESETS, parse_pretraining_loss

PAPER_URL = "https://arxiv.org/abs/2205.15173"
# Standard sample photos, used only as widget metadata and in snippets (never downloaded here).
COCO_CATS = "http://images.cocodataset.org/val2017/000000039769.jpg"
ADE_SAMPLE = (
    "https://huggingface.co/datasets/hf-internal-testing/fixtures_ade20k/resolve/main/ADE_val_00000001.jpg"
)
SIZE_NAMES = {"vit-tiny": "ViT-Ti/16", "vit-small": "ViT-S/16", "vit-base": "ViT-B/16"}
HEAD_NAMES = {"linear": "linear", "upernet": "UPerNet", "dpt": "DPT"}


@dataclass(frozen=True)
class TaskInfo:
    pipeline_tag: str
    auto_class: str
    eval_task: str | None  # the `task` of the eval reports that describe this kind of model
    widget: str


MODEL_TASKS = {
    "DenseCLViTModel": TaskInfo("image-feature-extraction", "AutoModel", None, COCO_CATS),
    "DenseCLViTForSemanticSegmentation": TaskInfo(
        "image-segmentation", "AutoModelForSemanticSegmentation", "semantic-segmentation", ADE_SAMPLE
    ),
    "DenseCLViTForDepthEstimation": TaskInfo(
        "depth-estimation", "AutoModelForDepthEstimation", "depth-estimation", COCO_CATS
    ),
}


@dataclass(frozen=True)
class StockFormats:
    """Ways to load a release without its custom code."""

    transformers_class: str | None = None  # e.g. "Dinov2Model"; None when no stock class is exact
    subfolder: str | None = None  # where that model lives in the repository; None = the root
    timm_file: str | None = None  # timm VisionTransformer state dict (encoders)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    unavailable: str | None = None  # why no stock transformers class expresses the model


def model_size(config: dict[str, Any]) -> str | None:
    """The paper's preset a config matches (`vit-tiny`, `vit-small`, `vit-base`, patch 16) or None."""
    for name, preset in PRESETS.items():
        if all(config.get(k) == v for k, v in preset.items()) and config.get("patch_size") == 16:
            return name
    return None


def arch_name(config: dict[str, Any]) -> str:
    size = model_size(config)
    if size:
        return SIZE_NAMES[size]
    return (
        f"ViT ({config['hidden_size']}d, {config['num_hidden_layers']} blocks, patch {config['patch_size']})"
    )


def head_of(model_class: str, config: dict[str, Any]) -> str | None:
    """`decode_head` / `depth_head` of a task model, None for the encoder."""
    key = {"semantic-segmentation": "decode_head", "depth-estimation": "depth_head"}
    task = MODEL_TASKS[model_class].eval_task
    return config.get(key[task]) if task else None


def _load_lines(task: TaskInfo, remote: bool, subfolder: str | None, backend: bool) -> str:
    extra = ", trust_remote_code=True" if remote else ""
    extra += f', subfolder="{subfolder}"' if subfolder else ""
    processor_extra = extra + (', backend="pil"' if backend else "")
    return (
        f"processor = AutoImageProcessor.from_pretrained(repo, revision=revision{processor_extra})\n"
        f"model = {task.auto_class}.from_pretrained(repo, revision=revision{extra}).eval()"
    )


_TASK_USE = {
    "image-feature-extraction": (
        "with torch.no_grad():\n"
        '    outputs = model(**processor(image, return_tensors="pt"))\n'
        "tokens = outputs.last_hidden_state  # (1, 1 + N, D): [CLS] first, then the N patches row-major\n"
        "cls_feature = outputs.pooler_output  # (1, D): [CLS] after the final LayerNorm"
    ),
    "image-segmentation": (
        "with torch.no_grad():\n"
        '    outputs = model(**processor(image, return_tensors="pt"))\n'
        "labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]\n"
        "# labels: (H, W) class ids; model.config.id2label names them"
    ),
    "depth-estimation": (
        "with torch.no_grad():\n"
        '    outputs = model(**processor(image, return_tensors="pt"))\n'
        "depth = processor.post_process_depth_estimation(outputs, target_sizes=[image.size[::-1]])[0]\n"
        '# depth["predicted_depth"]: (H, W) metres'
    ),
}


def usage_snippet(
    model_class: str, repo_id: str, revision: str, remote: bool, subfolder: str | None = None
) -> str:
    """Copy-paste Python that loads the release with the Auto classes and runs its pipeline."""
    task = MODEL_TASKS[model_class]
    lines = [
        "import torch\nfrom PIL import Image",
        f"from transformers import AutoImageProcessor, {task.auto_class}, pipeline",
        "",
        f'repo, revision = "{repo_id}", "{revision}"'
        + ("  # custom code runs locally: pin a revision you have read" if remote else ""),
        _load_lines(task, remote, subfolder, backend=not remote),
        'image = Image.open("photo.jpg").convert("RGB")',
        _TASK_USE[task.pipeline_tag],
        "",
    ]
    if subfolder:
        lines.append(f'pipe = pipeline("{task.pipeline_tag}", model=model, image_processor=processor)')
    else:
        extra = ", trust_remote_code=True" if remote else ", image_processor=processor"
        lines.append(f'pipe = pipeline("{task.pipeline_tag}", model=repo, revision=revision{extra})')
    lines.append(f'result = pipe("{task.widget}")')
    return "\n".join(lines)


def timm_snippet(repo_id: str, revision: str, stock: StockFormats) -> str:
    kwargs = ", ".join(f"{key}={value!r}" for key, value in stock.timm_kwargs.items())
    return (
        "```python\n"
        "from huggingface_hub import hf_hub_download\n"
        "from safetensors.torch import load_file\n"
        "from timm.models.vision_transformer import VisionTransformer\n\n"
        f"model = VisionTransformer({kwargs}).eval()\n"
        f'path = hf_hub_download("{repo_id}", "{stock.timm_file}", revision="{revision}")\n'
        "model.load_state_dict(load_file(path))\n"
        "# pixel_values: (B, 3, img_size, img_size), normalised by this repository's image processor\n"
        "tokens = model.forward_features(pixel_values)  # (B, 1 + N, D), equal to last_hidden_state\n"
        "```"
    )


def stock_section(model_class: str, repo_id: str, revision: str, fmt: str, stock: StockFormats) -> str:
    """The 'Loading without custom code' section."""
    parts = []
    name = stock.transformers_class
    if fmt == "stock":
        parts.append(
            f"This repository holds a stock transformers `{name}`: the snippet above needs no custom code. "
            '`backend="pil"` selects the PIL image processing the model was trained with.'
        )
    elif name:
        parts.append(
            f"The same model is stored in the `{stock.subfolder}/` folder as transformers' own `{name}`, "
            "with outputs equal to the custom model's, loadable without `trust_remote_code`:\n\n"
            "```python\n"
            + usage_snippet(model_class, repo_id, revision, remote=False, subfolder=stock.subfolder)
            + "\n```"
        )
    else:
        parts.append(
            f"No stock transformers architecture expresses this model exactly ({stock.unavailable}); it loads "
            "only with `trust_remote_code=True`."
        )
    if stock.timm_file:
        parts.append(
            f"The encoder weights are also published for timm's `VisionTransformer` (`{stock.timm_file}`):\n\n"
            + timm_snippet(repo_id, revision, stock)
        )
    return "\n\n".join(parts)


LOSS_TERM_PHRASES = {
    "local-global": f"the local-to-global contrastive loss of DenseCL-ViT ([Rabarisoa et al., 2022]({PAPER_URL}), "
    "the [CLS] embedding of one view against every patch embedding of another view)",
    "global": "the global InfoNCE loss of SimCLR (the [CLS] embeddings of two views)",
    "local-local": "the dense local-to-local InfoNCE loss (each patch against the patch of the other view that "
    "shows the same place)",
}


def pretraining_phrase(config: dict[str, Any]) -> str:
    """How the encoder was pre-trained, from the `pretraining_loss` (and `cls_stop_gradient`) its config records."""
    spec = config.get("pretraining_loss") or "local-global"
    try:
        terms = parse_pretraining_loss(spec)
    except ValueError:
        return f"pre-trained without labels by the loss `{spec}`"
    parts = [
        ("" if weight == 1 else f"{weight:g} × ") + LOSS_TERM_PHRASES[term]
        + (" with a stop-gradient on the [CLS] side" if term == "local-global" and config.get("cls_stop_gradient") else "")
        for weight, term in terms
    ]  # fmt: skip
    return f"pre-trained without labels (`pretraining_loss: {spec}`) by " + " plus ".join(parts)


def describe(
    model_class: str,
    config: dict[str, Any],
    dataset: str | None,
    base: str | None,
    num_parameters: int | None,
) -> dict[str, str]:
    """Title, one-paragraph summary and description of a release."""
    arch = arch_name(config)
    head = HEAD_NAMES.get(head_of(model_class, config), head_of(model_class, config))
    pretrain = pretraining_phrase(config)
    on = f" on {dataset}" if dataset else ""
    if model_class == "DenseCLViTModel":
        title = f"DenseCL-ViT {arch} encoder"
        summary = f"A {arch} Vision Transformer {pretrain}. It gives dense patch features for segmentation and depth."
        outputs = (
            "`last_hidden_state` (B, 1 + N, D): [CLS] first, then the N patch tokens row-major, after the final "
            "LayerNorm; `pooler_output` (B, D): the [CLS] token after the final LayerNorm."
        )
    elif model_class == "DenseCLViTForSemanticSegmentation":
        title = f"DenseCL-ViT {arch} semantic segmentation ({head} head)"
        summary = f"A {arch} encoder {pretrain}, fine-tuned for semantic segmentation{on} with a {head} head."
        outputs = (
            f"`logits` (B, K, H, W) at the input resolution over K = {len(config.get('id2label') or {})} classes "
            "(`config.id2label`); the pipeline returns one mask per class present."
        )
    else:
        title = f"DenseCL-ViT {arch} monocular depth ({head} head)"
        summary = (
            f"A {arch} encoder {pretrain}, fine-tuned for monocular depth estimation{on} with a {head} head."
        )
        low = 0 if config.get("depth_head") == "dpt" else config.get("min_depth")
        outputs = (
            f"`predicted_depth` (B, H, W) in metres, a sigmoid dilated to [{low}, {config.get('max_depth')}]."
        )
    facts = [
        f"- Architecture: pre-norm ViT, {config['hidden_size']}-d tokens, {config['num_hidden_layers']} blocks, "
        f"{config['num_attention_heads']} heads, patch {config['patch_size']}, position embeddings stored for "
        f"{config['image_size']}×{config['image_size']} and resampled bicubically for other sizes.",
        f"- Outputs: {outputs}",
    ]
    if num_parameters:
        facts.append(f"- Parameters: {num_parameters:,}.")
    if base:
        facts.append(f"- Fine-tuned from: {base}.")
    return {"title": title, "summary": summary, "description": "\n".join(facts)}


def limitations(model_class: str, config: dict[str, Any], fmt: str) -> list[str]:
    """The card's Limitations bullets."""
    items = [
        f"Trained at {config['image_size']}×{config['image_size']} crops; inputs must be multiples "
        f"of {config['patch_size']} pixels, and sizes far from the training size rely on interpolated position "
        "embeddings.",
    ]
    if model_class == "DenseCLViTModel":
        items.append("An encoder only: it needs a head (linear probe, UPerNet, ...) trained for each task.")
    elif model_class == "DenseCLViTForSemanticSegmentation":
        items.append("Predicts only the classes of its training set, single-scale; no instance separation.")
    else:
        items.append(
            "Predicts metric depth only inside its training range and scene type; far or outdoor scenes saturate "
            "at the range limits."
        )
    if fmt == "remote-code":
        items.append(
            "Loading runs the Python files of this repository (`trust_remote_code=True`); pin `revision`."
        )
    return items


__all__ = [
    "MODEL_TASKS",
    "StockFormats",
    "TaskInfo",
    "arch_name",
    "describe",
    "head_of",
    "limitations",
    "model_size",
    "stock_section",
    "usage_snippet",
]
