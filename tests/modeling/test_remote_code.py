"""A saved folder loads through the Auto classes with trust_remote_code, in a process without densecl_vit."""

import json

import numpy as np
import torch

from densecl_vit import DenseCLViTImageProcessor, DenseCLViTModel


def test_folder_loads_as_remote_code_in_fresh_process(tmp_path, tiny, isolated):
    torch.manual_seed(0)
    model = DenseCLViTModel(tiny()).eval()
    processor = DenseCLViTImageProcessor(size={"height": 32, "width": 48}, size_divisor=8)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_densecl_vit.DenseCLViTModel"
    assert (folder / "modeling_densecl_vit.py").exists() and (folder / "model.safetensors").exists()

    image = (np.arange(40 * 60 * 3) % 251).astype(np.uint8).reshape(40, 60, 3)
    np.save(tmp_path / "image.npy", image)
    with torch.no_grad():
        expected = model(**processor(image, return_tensors="pt")).last_hidden_state
    torch.save(expected, tmp_path / "expected.pt")

    result = isolated(
        f"""
        import numpy as np, torch
        from transformers import AutoConfig, AutoImageProcessor, AutoModel
        try:
            import densecl_vit
            raise SystemExit("densecl_vit should not be importable here")
        except ImportError:
            pass
        folder = {str(folder)!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        assert type(config).__name__ == "DenseCLViTConfig", type(config)
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        image = np.load({str(tmp_path / "image.npy")!r})
        with torch.no_grad():
            out = model(**processor(image, return_tensors="pt")).last_hidden_state
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        print("shape", tuple(out.shape), "diff", (out - expected).abs().max().item())
        assert torch.allclose(out, expected, atol=1e-6)
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shape (1, 25, 32)" in result.stdout


def test_auto_classes_load_in_process_without_remote_code(tmp_path, tiny):
    from transformers import AutoConfig, AutoModel

    folder = tmp_path / "model"
    DenseCLViTModel(tiny()).save_pretrained(folder)
    assert type(AutoConfig.from_pretrained(folder)).__name__ == "DenseCLViTConfig"
    assert isinstance(AutoModel.from_pretrained(folder), DenseCLViTModel)


def test_auto_image_processor_loads_in_process_without_a_backend_fallback(tmp_path, caplog):
    import logging

    from transformers import AutoImageProcessor
    from transformers.utils import logging as hf_logging

    DenseCLViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    logging.Logger.warning_once.cache_clear()  # transformers warns once per process and message
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            processor = AutoImageProcessor.from_pretrained(tmp_path)
    finally:
        hf_logging.disable_propagation()
    assert isinstance(processor, DenseCLViTImageProcessor)
    assert not [r for r in caplog.records if "backend" in r.getMessage()], caplog.text


def test_remote_code_files_import_only_torch_and_transformers():
    """What a Hub user executes with trust_remote_code must not reach beyond torch, transformers and the stdlib."""
    import ast
    import sys
    from pathlib import Path

    allowed = {"torch", "transformers"} | set(sys.stdlib_module_names)
    modeling = Path(__file__).resolve().parents[2] / "modeling"
    files = [p for p in modeling.glob("*.py") if p.name != "__init__.py"]
    assert {p.name for p in files} >= {"configuration_densecl_vit.py", "modeling_densecl_vit.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
