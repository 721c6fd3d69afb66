"""The LLaVA vision-tower export (TABLE VIII): an OpenCLIP ViT written as a transformers CLIPVisionModel
folder reproduces the OpenCLIP tower, and refusals leave the disk as they found it."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("transformers")

from gklcli import vision_export  # noqa: E402
from gklcli.errors import GKLError  # noqa: E402
from gklcli.models.clip import _open_clip, create_clip, image_spec  # noqa: E402
from gklcli.vision_export import (  # noqa: E402
    FILES, convert_vision_state, export_vision_tower, hf_vision_config, verify_vision_tower)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_clip("open_clip:gkl-tiny-clip").eval()


@pytest.fixture(scope="module")
def tiny_quick_gelu():
    torch.manual_seed(1)
    return _open_clip().create_model("gkl-tiny-clip", pretrained=None, force_quick_gelu=True).eval()


def test_the_tiny_tower_exports_loads_back_and_matches_encode_image(tiny, tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionModel, CLIPVisionModelWithProjection

    out = tmp_path / "tower"
    record = export_vision_tower(tiny, image_spec(tiny), out, source="random", arch="open_clip:gkl-tiny-clip")
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tower"]  # no temporary folder left beside it
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["CLIPVisionModel"] and config["model_type"] == "clip_vision_model"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["image_size"], config["patch_size"], config["projection_dim"], config["hidden_act"]) == \
        (64, 256, 2, 2, 32, 8, 32, "gelu")
    saved = json.loads((out / "gkl_export.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["source"] == "random" and saved["arch"] == "open_clip:gkl-tiny-clip" and saved["max_abs_diff"] < 1e-5
    assert saved["llava_flags"] == ["--vision_tower", str(out), "--mm_vision_select_layer", "-2"]
    assert saved["verification"]["hidden_states_max_abs_diff"] < 1e-5

    hf = CLIPVisionModelWithProjection.from_pretrained(out).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = hf(pixel_values=x).image_embeds, tiny.encode_image(x)
        plain = CLIPVisionModel.from_pretrained(out).eval()(pixel_values=x, output_hidden_states=True)
    assert (got - want).abs().max().item() < 1e-5
    assert len(plain.hidden_states) == 3  # embeddings + 2 layers: LLaVA's select layer -2 is the first block
    assert verify_vision_tower(tiny, out, n=2, seed=3) < 1e-5

    processor = CLIPImageProcessor.from_pretrained(out)
    spec = image_spec(tiny)
    assert processor.crop_size["height"] == processor.crop_size["width"] == 32
    assert processor.size["shortest_edge"] == 32 and int(processor.resample) == 3  # PIL bicubic
    assert list(processor.image_mean) == pytest.approx(spec.mean) and list(processor.image_std) == pytest.approx(spec.std)


def test_a_quick_gelu_tower_maps_to_quick_gelu_and_the_activation_matters(tiny_quick_gelu, tmp_path, monkeypatch):
    assert hf_vision_config(tiny_quick_gelu)["hidden_act"] == "quick_gelu"
    record = export_vision_tower(tiny_quick_gelu, image_spec(tiny_quick_gelu), tmp_path / "quick", source="random")
    assert record["max_abs_diff"] < 1e-5
    # the same tower declared as exact GELU must fail the verification
    monkeypatch.setattr(vision_export, "_activation", lambda act: "gelu")
    with pytest.raises(GKLError, match="does not reproduce the OpenCLIP model"):
        export_vision_tower(tiny_quick_gelu, image_spec(tiny_quick_gelu), tmp_path / "wrong", source="random")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quick"]


def test_an_existing_non_empty_folder_is_refused_and_left_untouched(tiny, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GKLError, match=f"{out}: folder exists and is not empty"):
        export_vision_tower(tiny, image_spec(tiny), out, source="random")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    export_vision_tower(tiny, image_spec(tiny), out, source="random", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_corrupted_conversion_is_caught_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    def k_q_v(packed):
        q, k, v = packed.chunk(3, dim=0)
        return k, q, v

    monkeypatch.setattr(vision_export, "_split_qkv", k_q_v)
    out = tmp_path / "bad"
    with pytest.raises(GKLError, match=f"{out}: the exported tower does not reproduce"):
        export_vision_tower(tiny, image_spec(tiny), out, source="random")
    assert list(tmp_path.iterdir()) == []


def test_towers_that_do_not_map_are_refused_naming_why(tiny, monkeypatch):
    torch.manual_seed(0)
    model = create_clip("open_clip:gkl-tiny-clip")
    model.visual.pool_type = "avg"
    with pytest.raises(GKLError, match="global average pooling"):
        hf_vision_config(model)
    model.visual.pool_type = "tok"
    model.visual.transformer.resblocks[1].mlp.gelu = torch.nn.SiLU()
    with pytest.raises(GKLError, match="block 1: activation SiLU"):
        convert_vision_state(model)
    with pytest.raises(GKLError, match="image size 224 does not match the tower's 32"):
        export_vision_tower(tiny, image_spec(tiny)._replace(size=224), "unused", source="random")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(GKLError, match=r"needs transformers: pip install 'gklcli\[llava\]'"):
        convert_vision_state(tiny)
