"""Backbones and heads: every registered one builds, runs and has its documented output size;
weights load only from a local file that fits."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from auxframe.errors import ConfigError
from auxframe.experiment import _dry_forward
from auxframe.registry import registry

torch.set_num_threads(1)

# name, input shape, params, documented feature shape
BACKBONES = [
    ("small_cnn", (1, 8, 8), {"channels": (8, 8)}, (8,)),
    ("mlp", (1, 8, 8), {"hidden": (16, 8)}, (8,)),
    ("resnet18", (3, 32, 32), {}, (512,)),
    ("resnet18", (3, 32, 32), {"global_pool": False}, (512, 1, 1)),
    ("resnet18", (1, 8, 8), {"small_images": True, "global_pool": False}, (512, 1, 1)),
    ("resnet34", (3, 16, 16), {"small_images": True}, (512,)),
    ("resnet50", (3, 16, 16), {}, (2048,)),
    ("wrn28_2", (3, 32, 32), {}, (128,)),
    ("wrn28_2", (3, 16, 16), {"depth": 10, "widen_factor": 1, "global_pool": False}, (64, 4, 4)),
    ("segnet", (3, 16, 12), {"filters": (4, 8, 8)}, (4, 16, 12)),
    ("segnet", (3, 9, 11), {"filters": (4, 8, 8)}, (4, 9, 11)),  # odd sizes unpool back exactly
]


@pytest.mark.parametrize("name,shape,params,features", BACKBONES, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_backbone_builds_and_gives_its_documented_feature_shape(name, shape, params, features):
    net = registry.get("backbones", name)(input_shape=shape, **params)
    assert isinstance(net, nn.Module)
    assert _dry_forward(net, shape) == features
    assert getattr(net, "out_features", features[0]) == features[0]


def test_resnet_small_images_keeps_eight_times_more_resolution():
    factory = registry.get("backbones", "resnet18")
    plain = _dry_forward(factory((3, 64, 64), global_pool=False), (3, 64, 64))
    small = _dry_forward(factory((3, 64, 64), small_images=True, global_pool=False), (3, 64, 64))
    assert plain[1:] == (2, 2) and small[1:] == (8, 8)
    assert factory((3, 32, 32), small_images=True).net.conv1.kernel_size == (3, 3)


def test_wrn28_2_has_the_papers_size_and_settings():
    net = registry.get("backbones", "wrn28_2")(input_shape=(3, 32, 32))
    n_params = sum(p.numel() for p in net.parameters())
    assert 1.4e6 < n_params < 1.6e6  # WRN-28-2: about 1.5 M parameters (Oliver et al., 2018)
    blocks = [m for m in net.modules() if type(m).__name__ == "_WideBlock"]
    assert len(blocks) == 12  # (28 - 4) / 6 = 4 blocks in each of 3 groups
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.momentum == pytest.approx(0.001)


def test_wrn_depth_must_be_6n_plus_4():
    with pytest.raises(ConfigError, match=r"6n \+ 4"):
        registry.get("backbones", "wrn28_2")(input_shape=(3, 32, 32), depth=27)


def test_segnet_too_small_images_are_a_clear_error():
    with pytest.raises(ConfigError, match="at least 8x8"):
        registry.get("backbones", "segnet")(input_shape=(3, 4, 16), filters=(4, 4, 4))


def test_segnet_module_names_match_the_auxilearn_split_segnet():
    net = registry.get("backbones", "segnet")(input_shape=(3, 32, 32), filters=(4, 8, 8, 8, 8))
    keys = set(net.state_dict())
    # as in AuxiLearn's experiments/nyuv2/model.py: level 2+ refinements are two conv blocks
    for key in ("encoder_block.0.0.weight", "conv_block_enc.1.0.weight", "conv_block_enc.2.1.0.weight",
                "decoder_block.4.0.weight", "conv_block_dec.1.0.weight", "conv_block_dec.3.0.0.weight"):
        assert key in keys, key
    assert net.decoder_block[4][0].in_channels == 8 and net.conv_block_dec[1][0].in_channels == 4


# -- weights from a file ------------------------------------------------------------------------------
def test_resnet_weights_load_from_a_torchvision_state_dict_file(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        source.layer1[0].conv1.weight.fill_(0.125)
    path = tmp_path / "resnet18.pt"
    torch.save({"state_dict": source.state_dict()}, path)  # wrapped, with fc.* keys: both accepted
    net = registry.get("backbones", "resnet18")(input_shape=(3, 32, 32), weights_path=str(path))
    assert torch.equal(net.net.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert torch.equal(net.net.bn1.running_mean, source.bn1.running_mean)


def test_dataparallel_prefix_is_accepted(tmp_path):
    source = registry.get("backbones", "wrn28_2")(input_shape=(3, 8, 8), depth=10, widen_factor=1)
    path = tmp_path / "wrn.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    net = registry.get("backbones", "wrn28_2")(input_shape=(3, 8, 8), depth=10, widen_factor=1, weights_path=str(path))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), source.state_dict().values()))


def test_missing_weights_file_names_the_path_and_the_setting(tmp_path):
    with pytest.raises(ConfigError, match=r"backbones.resnet18.weights_path = '.*nope.pt': no such file"):
        registry.get("backbones", "resnet18")(input_shape=(3, 32, 32), weights_path=str(tmp_path / "nope.pt"))


def test_weights_of_another_architecture_are_refused_with_the_mismatch(tmp_path):
    import torchvision

    path = tmp_path / "imagenet.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ConfigError, match=r"wrong shapes: conv1.weight \(64, 3, 7, 7\) \(backbone: \(64, 3, 3, 3\)\)"):
        registry.get("backbones", "resnet18")(input_shape=(3, 32, 32), small_images=True, weights_path=str(path))
    with pytest.raises(ConfigError, match=r"missing keys: layer1.0.conv3.weight.*\(198 in all\); wrong shapes"):
        registry.get("backbones", "resnet50")(input_shape=(3, 32, 32), weights_path=str(path))


def test_a_file_without_a_state_dict_is_refused(tmp_path):
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(ConfigError, match="cannot read"):
        registry.get("backbones", "segnet")(input_shape=(3, 8, 8), filters=(4,), weights_path=str(tmp_path / "text.pt"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="does not hold a state dict"):
        registry.get("backbones", "segnet")(input_shape=(3, 8, 8), filters=(4,), weights_path=str(tmp_path / "list.pt"))


# -- heads --------------------------------------------------------------------------------------------
# name, feature shape, num_outputs, params, output shape for a batch of 2
HEADS = [
    ("classification", (16,), 4, {}, (2, 4)),
    ("multilabel", (16,), 2, {}, (2,)),
    ("multilabel", (16,), 40, {"hidden": 8}, (2, 40)),
    ("embedding", (16,), 32, {}, (2, 32)),
    ("dense_classification", (8, 6, 6), 5, {"hidden": 4}, (2, 5, 6, 6)),
    ("segmentation", (8, 6, 6), 13, {}, (2, 13, 6, 6)),
    ("segmentation", (8, 3, 3), 13, {"output_size": (6, 6)}, (2, 13, 6, 6)),
    ("depth", (8, 6, 6), 1, {}, (2, 1, 6, 6)),
    ("normals", (8, 6, 6), 3, {"hidden": 0}, (2, 3, 6, 6)),
]


@pytest.mark.parametrize("name,features,outputs,params,shape", HEADS, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_head_output_shape(name, features, outputs, params, shape):
    head = registry.get("heads", name)(feature_shape=features, num_outputs=outputs, **params)
    assert head(torch.randn(2, *features)).shape == shape


def test_segmentation_head_is_the_split_segnet_prediction_layer():
    head = registry.get("heads", "segmentation")(feature_shape=(8, 4, 4), num_outputs=13)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(8, 8, (3, 3)), (8, 13, (1, 1))]
    assert not any(isinstance(m, nn.ReLU) for m in head.modules())


def test_normals_head_gives_unit_vectors_and_embedding_head_can_normalise():
    normals = registry.get("heads", "normals")(feature_shape=(8, 5, 5), num_outputs=3)
    out = normals(torch.randn(2, 8, 5, 5))
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 5, 5), atol=1e-5)
    emb = registry.get("heads", "embedding")(feature_shape=(16,), num_outputs=8, normalize=True)
    assert torch.allclose(emb(torch.randn(3, 16)).norm(dim=1), torch.ones(3), atol=1e-5)


def test_dense_heads_refuse_vector_features_and_class_counts():
    with pytest.raises(ValueError, match="heads.depth needs feature maps"):
        registry.get("heads", "depth")(feature_shape=(16,), num_outputs=1)
    with pytest.raises(ValueError, match="heads.normals predicts 3 channel.*13 outputs.*heads.segmentation"):
        registry.get("heads", "normals")(feature_shape=(8, 4, 4), num_outputs=13)


def test_dense_classification_head_keeps_its_state_dict_layout():
    head = registry.get("heads", "dense_classification")(feature_shape=(8, 4, 4), num_outputs=3, hidden=4)
    assert list(head.state_dict()) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert isinstance(head.net[1], nn.ReLU)


# -- heads with their losses and metrics, as a task uses them ----------------------------------------
def test_binary_attribute_task_gets_one_logit_head_with_bce_and_map():
    from auxframe.data.digits import digits
    from auxframe.experiment import build_model, resolve_tasks
    from auxframe.tasks import Task, TaskGraph

    data = digits()
    graph = TaskGraph([
        Task("digit", labels="digit", main=True, metric="accuracy"),
        Task("parity", labels="parity", head="multilabel", loss="binary_cross_entropy", metric="multilabel_map"),
        Task("ge5", labels="ge5", head="multilabel", loss="focal", metric="multilabel_f1"),
    ])
    resolved = resolve_tasks(graph, data)
    model = build_model(registry.get("backbones", "small_cnn"), graph, resolved, data)  # dry-runs loss and metric
    images, labels = data.get_batch(torch.arange(4))
    out = model(images)
    assert out["parity"].shape == (4,) and labels["parity"].shape == (4,)
    assert resolved["parity"].loss(out["parity"], labels["parity"]).shape == (4,)


def test_segnet_with_segmentation_depth_and_normal_heads_trains_a_step():
    torch.manual_seed(0)
    backbone = registry.get("backbones", "segnet")(input_shape=(3, 16, 16), filters=(8, 8, 8))
    from auxframe.models import MultiTaskModel

    feat = (8, 16, 16)
    model = MultiTaskModel(backbone, {
        "seg": registry.get("heads", "segmentation")(feature_shape=feat, num_outputs=13),
        "depth": registry.get("heads", "depth")(feature_shape=feat, num_outputs=1),
        "normals": registry.get("heads", "normals")(feature_shape=feat, num_outputs=3),
    })
    images = torch.randn(2, 3, 16, 16)
    seg = torch.randint(-1, 13, (2, 16, 16))
    depth = torch.rand(2, 1, 16, 16) * (torch.rand(2, 1, 16, 16) > 0.2)
    normals = torch.nn.functional.normalize(torch.randn(2, 3, 16, 16), dim=1) * (torch.rand(2, 1, 16, 16) > 0.2)
    out = model(images)
    per_pixel = [registry.get("losses", "cross_entropy")(out["seg"], seg), registry.get("losses", "l1_depth")(out["depth"], depth),
                 registry.get("losses", "cosine_normal")(out["normals"], normals)]
    assert all(loss.shape == (2, 16, 16) for loss in per_pixel)  # they line up pixel by pixel
    sum(loss.mean() for loss in per_pixel).backward()
    grads = [p.grad for p in model.shared_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    for name, task, target, key in (("miou", "seg", seg, "miou"), ("depth_error", "depth", depth, "abs_err"),
                                    ("normal_angle", "normals", normals, "mean_angle")):
        metric = registry.get("metrics", name)()
        metric.update(out[task].detach(), target)
        assert torch.isfinite(torch.tensor(metric.compute()[key]))
