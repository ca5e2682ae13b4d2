"""Unit tests of mlcl.model on tiny widths (CPU, seconds)."""
from __future__ import annotations

import pytest
import torch
import torchvision

from mlcl import model as M
from mlcl.config import Config, ConfigError, ModelConfig, fill_defaults
from mlcl.model import DeepLabV3Plus, SegOutput, build_model

torch.set_num_threads(1)
K = 5


def tiny(backbone="resnet18", width=8, **kw) -> ModelConfig:
    return ModelConfig(backbone=backbone, width=width, feature_channels=16,
                       low_level_channels=8, **kw)


def make(backbone="resnet18", width=8, **kw) -> DeepLabV3Plus:
    torch.manual_seed(0)
    return DeepLabV3Plus(tiny(backbone, width, **kw), K)


def config(**model) -> Config:
    cfg = Config()
    cfg.data.num_classes = K
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return fill_defaults(cfg)


@pytest.mark.parametrize("backbone", list(M.BACKBONES))
def test_shapes_os16(backbone):
    net = make(backbone, width=4).eval()
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        c1, c4 = net.backbone(x)
        feats = net.encode(x)
        logits = net(x)
    assert c1.shape[-2:] == (17, 17) and c4.shape[-2:] == (5, 5)  # 1/4 and 1/16
    assert c1.shape[1] == net.backbone.low_level_channels
    assert c4.shape[1] == net.backbone.out_channels
    assert feats.shape == (2, 16, 17, 17)
    assert logits.shape == (2, K, 65, 65)


def test_output_stride_16_dilates_the_last_stage():
    l4 = make("resnet18").backbone.layer4  # OS16: first block keeps dilation 1, then 2
    assert l4[0].conv1.stride == (1, 1) and l4[0].downsample[0].stride == (1, 1)
    assert l4[0].conv2.dilation == (1, 1) and l4[1].conv1.dilation == (2, 2)
    l3 = make("resnet50").backbone.layer3  # strided, not dilated
    assert l3[0].conv2.stride == (2, 2) and l3[1].conv2.dilation == (1, 1)


def test_full_width_topology_matches_torchvision():
    """At width 64 the parameter names and shapes are torchvision's (minus fc)."""
    for name, ctor in (("resnet18", torchvision.models.resnet18),
                       ("resnet50", torchvision.models.resnet50)):
        ours = M.ResNetBackbone(*M.BACKBONES[name][:2], width=64).state_dict()
        theirs = {k: v.shape for k, v in ctor().state_dict().items() if not k.startswith("fc.")}
        assert {k: v.shape for k, v in ours.items()} == theirs


def test_encode_decode_compose_to_forward():
    net = make().eval()
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        out = net(x, return_features=True)
        manual = M.upsample(net.decode(net.encode(x)), x.shape[-2:])
    assert isinstance(out, SegOutput) and out.logits_fp is None and out.features_fp is None
    torch.testing.assert_close(out.logits, manual)
    torch.testing.assert_close(net.decode(out.features), net.decode(net.encode(x)))


def test_fp_branch():
    net = make().train()
    x = torch.randn(2, 3, 64, 64)
    out = net(x, fp=True, return_features=True)
    assert out.logits.shape == out.logits_fp.shape == (2, K, 64, 64)
    assert out.features.shape == out.features_fp.shape == (2, 16, 16, 16)
    assert not torch.allclose(out.logits, out.logits_fp)
    torch.testing.assert_close(out.feature_logits, net.decode(out.features))
    logits, logits_fp, feats, feats_fp, coarse = net(x, fp=True)
    assert feats is None and feats_fp is None and coarse is None and logits_fp is not None
    (logits.mean() + logits_fp.mean()).backward()
    net.eval()
    with torch.no_grad():
        ev = net(x, fp=True)
    torch.testing.assert_close(ev.logits, ev.logits_fp)  # dropout off in eval mode


def test_param_groups_cover_every_parameter_once():
    net = make()
    groups = net.param_groups(0.01, 10.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    backbone = {id(p) for p in net.backbone.parameters()}
    by_name = {g["name"]: g for g in groups}
    assert {id(p) for p in by_name["backbone"]["params"]} == backbone
    assert by_name["backbone"]["lr"] == 0.01 and by_name["head"]["lr"] == pytest.approx(0.1)
    assert id(net.classifier.weight) in {id(p) for p in by_name["head"]["params"]}
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # accepted as is


def test_deepstem_keys_look_like_unimatch():
    keys = list(make("resnet50_deepstem", width=4).backbone.state_dict())
    for k in ("conv1.0.weight", "conv1.1.weight", "conv1.1.running_var", "conv1.3.weight",
              "conv1.4.bias", "conv1.6.weight", "bn1.weight", "layer1.0.conv1.weight",
              "layer1.0.downsample.0.weight", "layer4.2.bn3.running_mean"):
        assert k in keys
    assert make("resnet50_deepstem", width=64).backbone.bn1.num_features == 128


def _save_backbone(tmp_path, name="resnet18", width=8, wrap=None, edit=None):
    state = dict(make(name, width).backbone.state_dict())
    state["fc.weight"] = torch.zeros(3, 8 * width)  # classification checkpoints have fc
    state["fc.bias"] = torch.zeros(3)
    if edit:
        edit(state)
    path = tmp_path / "backbone.pth"
    torch.save({wrap: state} if wrap else state, path)
    return path, state


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_file_path_loads_strictly(tmp_path, wrap):
    path, state = _save_backbone(tmp_path, wrap=wrap)
    torch.manual_seed(1)
    net = build_model(config(backbone="resnet18", width=8, feature_channels=16,
                             low_level_channels=8, pretrained=str(path)))
    for k, v in net.backbone.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_file_path_without_bn_counters_loads(tmp_path):
    """Old checkpoints (UniMatch's, pre-1.0 torchvision) have no num_batches_tracked."""
    path, _ = _save_backbone(tmp_path, edit=lambda s: [s.pop(k) for k in list(s)
                                                       if k.endswith("num_batches_tracked")])
    build_model(config(width=8, backbone="resnet18", pretrained=str(path)))


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.pop("layer2.0.conv1.weight"), "missing keys: layer2.0.conv1.weight"),
    (lambda s: s.__setitem__("layer9.weight", torch.zeros(1)), "unexpected keys: layer9.weight"),
    (lambda s: s.__setitem__("bn1.weight", torch.zeros(3)), "shape mismatch: bn1.weight"),
])
def test_tampered_checkpoint_raises_naming_key(tmp_path, edit, needle):
    path, _ = _save_backbone(tmp_path, edit=edit)
    with pytest.raises(ConfigError) as err:
        build_model(config(width=8, backbone="resnet18", pretrained=str(path)))
    assert needle in str(err.value) and str(path) in str(err.value)


def test_missing_file_and_empty_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.pth"):
        build_model(config(width=8, backbone="resnet18", pretrained=str(tmp_path / "nope.pth")))
    with pytest.raises(ConfigError, match="empty path"):
        build_model(config(width=8, backbone="resnet18", pretrained=""))


def test_pretrained_true_without_cache_raises(tmp_path, monkeypatch):
    """The core never downloads: it names the file, where it goes and the command."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ConfigError) as err:
        build_model(config(backbone="resnet18", width=64, pretrained=True))
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "checkpoints") in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert "python -m mlcl data pretrained --torchvision resnet18" in msg and "\n" not in msg


def test_pretrained_true_from_hub_cache(tmp_path, monkeypatch):
    """A file already in the hub cache is used (here a width-64 ResNet-18 of our own)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path = M.imagenet_file("resnet18")
    assert path.name == "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, path)
    net = build_model(config(backbone="resnet18", width=64, feature_channels=16,
                             low_level_channels=8, pretrained=True))
    torch.testing.assert_close(net.backbone.conv1.weight, state["conv1.weight"])


def test_pretrained_true_config_errors():
    with pytest.raises(ConfigError, match="width"):
        build_model(config(backbone="resnet18", width=32, pretrained=True))
    with pytest.raises(ConfigError, match="deep-stem"):
        build_model(config(backbone="resnet50_deepstem", pretrained=True))


def test_build_model_random_init_uses_config():
    net = build_model(config(backbone="resnet34", width=4, feature_channels=16,
                             low_level_channels=8, pretrained=False))
    assert net.classifier.out_channels == K and net.classifier.in_channels == 16
