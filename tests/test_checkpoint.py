"""Checkpoints (save/load round trip, atomic writes, clear errors, deploy hash) and
ConvNeXt ImageNet checkpoint loading in the official release and timm key formats."""
import os
import pickle
import re
from collections import OrderedDict

import pytest
import torch

from mean_nav.errors import MeanNavError
from mean_nav.model import MEAN, ModelConfig, build_model
from mean_nav.model.checkpoint import (deploy_hash, load_checkpoint, model_from_checkpoint,
                                       save_checkpoint)
from mean_nav.model.convnext import ConvNeXt, load_convnext_imagenet

torch.set_num_threads(2)


def small_cfg(**kw) -> ModelConfig:
    # Lite0's 320-channel map keeps the whole MEAN small (about 5M parameters)
    base = dict(backbone="efficientnet_lite0", efficientnet_features="blocks", num_classes=6, img_size=64)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model after one optimiser step (so BN stats and Adam state are non-trivial)."""
    torch.manual_seed(0)
    cfg = small_cfg()
    model = MEAN(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(torch.randn(4, 3, 64, 64))
    (out["gap"].pow(2).mean() + sum(lg.mean() for lg in out["logits"])).backward()
    opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, cfg, extra={"optimizer": opt.state_dict(), "epoch": 3, "step": 120,
                                             "loss": {"total": 1.25}})
    return model.eval(), cfg, opt, path


def test_round_trip_restores_identical_embeddings_config_and_training_state(trained):
    model, cfg, opt, path = trained
    loaded, loaded_cfg = model_from_checkpoint(path, expect=cfg)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.embed(x), model.embed(x))
    assert loaded_cfg == cfg
    assert not loaded.training
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 120 and ckpt["loss"] == {"total": 1.25}
    assert ckpt["deploy_hash"] == deploy_hash(model)
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert not path.with_name(path.name + ".tmp").exists()


def test_failed_save_leaves_the_previous_checkpoint_untouched(trained, tmp_path):
    model, cfg, _, _ = trained
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, cfg, extra={"epoch": 1})
    before = path.read_bytes()
    with pytest.raises((AttributeError, pickle.PicklingError), match="pickle"):
        save_checkpoint(path, model, cfg, extra={"epoch": 2, "bad": lambda: 0})  # not picklable
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.pt"]


def test_truncated_missing_and_foreign_files_give_one_clear_error_naming_the_file(trained, tmp_path):
    _, _, _, path = trained
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MeanNavError, match=re.escape(str(truncated)) + ".*truncated"):
        load_checkpoint(truncated)
    with pytest.raises(MeanNavError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.zeros(2)}, bare)
    with pytest.raises(MeanNavError, match="bare.pt: not a mean-nav checkpoint.*model.pretrained"):
        load_checkpoint(bare)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(MeanNavError, match="notes.txt"):
        model_from_checkpoint(text)


def test_expectation_mismatch_names_the_file_and_the_field(trained):
    _, cfg, _, path = trained
    with pytest.raises(MeanNavError, match=r"model\.pt: checkpoint has model\.num_classes = 6 .* 9"):
        model_from_checkpoint(path, expect=small_cfg(num_classes=9))
    with pytest.raises(MeanNavError, match="model.backbone"):
        model_from_checkpoint(path, expect=ModelConfig(backbone="convnext_tiny", num_classes=6))


def test_checkpoint_with_wrong_keys_lists_them(trained, tmp_path):
    model, cfg, _, path = trained
    ckpt = load_checkpoint(path)
    del ckpt["state_dict"]["cea.fat.bias"]
    ckpt["state_dict"]["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pt"
    torch.save(ckpt, broken)
    with pytest.raises(MeanNavError, match=r"broken\.pt.*missing keys \(1\): cea\.fat\.bias.*unexpected keys "
                                           r"\(1\): extra\.weight"):
        model_from_checkpoint(broken)


def test_deploy_hash_tracks_backbone_weights_only():
    torch.manual_seed(1)
    model = MEAN(small_cfg())
    h = deploy_hash(model)
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    twin = MEAN(small_cfg())
    twin.load_state_dict(model.state_dict())
    assert deploy_hash(twin) == h
    with torch.no_grad():
        model.heads[0].classifier.weight.add_(1.0)   # training-only branch
        model.backbone.blocks[0].num_batches_tracked = torch.tensor(99)
    assert deploy_hash(model) == h
    with torch.no_grad():
        model.backbone.norm.weight[0] += 1e-3       # the gap norm is part of the deploy graph
    assert deploy_hash(model) != h


# ---------------------------------------------------------------------------------------
# ConvNeXt ImageNet checkpoints. The test writes its own independent key renaming from our
# (timm-style) names to each release format, then checks the loader inverts it exactly.

TINY = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))


def to_official_keys(state):
    out = OrderedDict()
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "stem":                                   # stem.{0,1}.w
            out[f"downsample_layers.0.{parts[1]}.{parts[2]}"] = value
        elif parts[0] == "stages" and parts[2] == "downsample":  # stages.i.downsample.{0,1}.w
            out[f"downsample_layers.{parts[1]}.{parts[3]}.{parts[4]}"] = value
        elif parts[0] == "stages":                               # stages.i.blocks.j.<...>
            rest = ".".join(parts[4:])
            rest = (rest.replace("conv_dw", "dwconv").replace("mlp.fc1", "pwconv1")
                    .replace("mlp.fc2", "pwconv2"))
            out[f"stages.{parts[1]}.{parts[3]}.{rest}"] = value
        else:                                                    # norm.w
            out[key] = value
    dim = state["norm.weight"].shape[0]
    out["head.weight"] = torch.randn(1000, dim)
    out["head.bias"] = torch.randn(1000)
    return out


def to_timm_keys(state):
    out = OrderedDict((("head.norm." + k[5:]) if k.startswith("norm.") else k, v) for k, v in state.items())
    dim = state["norm.weight"].shape[0]
    out["head.fc.weight"] = torch.randn(1000, dim)
    out["head.fc.bias"] = torch.randn(1000)
    return out


@pytest.fixture()
def source_backbone():
    torch.manual_seed(2)
    model = ConvNeXt(**TINY)
    with torch.no_grad():
        for p in model.parameters():  # make every tensor distinct so a mix-up shows
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("fmt,wrap", [("official", "model"), ("timm", None), ("official", "state_dict")])
def test_imagenet_convnext_checkpoints_load_in_both_key_formats(source_backbone, tmp_path, fmt, wrap):
    state = (to_official_keys if fmt == "official" else to_timm_keys)(source_backbone.state_dict())
    if fmt == "official":
        assert "stages.0.0.dwconv.weight" in state and "downsample_layers.1.1.weight" in state
    payload = {wrap: state} if wrap else state
    path = tmp_path / f"convnext_{fmt}.pth"
    torch.save(payload, path)
    target = ConvNeXt(**TINY).eval()
    report = load_convnext_imagenet(target, path)
    assert report["format"] == fmt
    assert sorted(report["dropped"]) == (["head.bias", "head.weight"] if fmt == "official"
                                         else ["head.fc.bias", "head.fc.weight"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(target(x), source_backbone(x))


def test_imagenet_checkpoint_with_unmatched_keys_fails_loudly_listing_them(source_backbone, tmp_path):
    state = to_official_keys(source_backbone.state_dict())
    del state["stages.2.1.gamma"]
    state["stages.2.1.grn.weight"] = torch.zeros(24)  # e.g. a ConvNeXt-V2 file
    path = tmp_path / "v2.pth"
    torch.save({"model": state}, path)
    with pytest.raises(MeanNavError) as err:
        load_convnext_imagenet(ConvNeXt(**TINY), path)
    message = str(err.value)
    assert "v2.pth" in message
    assert "missing keys (1): stages.2.blocks.1.gamma" in message
    assert "unexpected keys (1): stages.2.1.grn.weight" in message  # named as in the file


def test_imagenet_checkpoint_for_another_width_reports_shape_mismatches(tmp_path):
    wider = ConvNeXt(depths=TINY["depths"], dims=(8, 16, 24, 40))
    path = tmp_path / "wide.pth"
    torch.save(to_timm_keys(wider.state_dict()), path)
    with pytest.raises(MeanNavError, match="wide.pth.*shape mismatches.*norm.weight \\(40,\\) vs \\(32,\\)"):
        load_convnext_imagenet(ConvNeXt(**TINY), path)


def test_build_model_loads_convnext_tiny_official_release_layout(tmp_path):
    """Full-size key set of convnext_tiny_22k_1k_224.pth ("model" wrapper, head included)."""
    torch.manual_seed(3)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ConvNeXt().state_dict().items()}
    source_state = {k: torch.randn(shape) for k, shape in shapes.items()}  # cheaper than a real init
    path = tmp_path / "convnext_tiny_22k_1k_224.pth"
    official = to_official_keys(source_state)
    assert len(official) == 182  # 180 backbone tensors + ImageNet head, as in the release file
    torch.save({"model": official}, path)
    model = build_model(ModelConfig(backbone="convnext_tiny", num_classes=5, pretrained=str(path)))
    loaded = model.backbone.state_dict()
    for name, tensor in source_state.items():
        assert torch.equal(loaded[name], tensor), name
    with pytest.raises(MeanNavError, match="only for efficientnet_lite0"):
        build_model(ModelConfig(backbone="convnext_tiny", pretrained="package"))
    with pytest.raises(MeanNavError, match="model.pretrained: .*nothing.pth: file not found"):
        build_model(ModelConfig(backbone="convnext_tiny", pretrained=str(tmp_path / "nothing.pth")))
    lite_like = tmp_path / "lite.pth"
    torch.save({"_conv_stem.weight": torch.zeros(1)}, lite_like)
    with pytest.raises(MeanNavError, match="lite.pth: not a ConvNeXt checkpoint"):
        load_convnext_imagenet(ConvNeXt(**TINY), lite_like)


def write_safetensors_by_hand(path, state):
    """Minimal writer following the published layout (header length, JSON header, bytes)."""
    import json
    import struct

    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in state.items():
        raw = tensor.contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_timm_safetensors_file_loads_without_the_safetensors_package(source_backbone, tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors_by_hand(path, to_timm_keys(source_backbone.state_dict()))
    target = ConvNeXt(**TINY).eval()
    assert load_convnext_imagenet(target, path)["format"] == "timm"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(target(x), source_backbone(x))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MeanNavError, match="cut.safetensors: not a valid .safetensors file"):
        load_convnext_imagenet(ConvNeXt(**TINY), cut)


def test_model_info_reads_a_checkpoint_config_and_prints_its_deploy_hash(trained, capsys):
    import json

    from mean_nav.cli import main

    model, cfg, _, path = trained
    assert main(["model-info", "--checkpoint", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["deploy_hash"] == deploy_hash(model)
    assert info["embed_dim"] == 320 and info["model_config"]["num_classes"] == cfg.num_classes
