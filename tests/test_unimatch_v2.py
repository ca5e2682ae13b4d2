"""UniMatch V2 and MLCL on it: DPT on DINOv2 (shapes, strict loading of the official files),
Complementary Dropout, the EMA teacher, the step's CutMix targets against a slow obvious
computation, and where MLCL's weak side comes from."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from mlcl import methods
from mlcl.config import ConfigError, load_config
from mlcl.methods import STEPS, Teacher, make_teacher
from mlcl.model import DINOV2, build_model, complementary_dropout

from test_methods import setup


def dinov2_cfg(*extra):
    return load_config("synthetic", ["model.backbone=dinov2_s", "data.num_classes=5",
                                     "data.class_names=[]", *extra])


@pytest.fixture(scope="module")
def dpt():
    torch.manual_seed(0)
    return build_model(dinov2_cfg())


def test_dpt_shapes_at_any_size(dpt):
    """Logits at the input size, F at 8x the token grid of the size rounded to 14 (UniMatch V2
    evaluates at the nearest multiple of 14), fp and comp_drop batches as on DeepLabV3+."""
    out = dpt(torch.randn(2, 3, 70, 98), return_features=True)
    assert out.logits.shape == (2, 5, 70, 98) and out.features.shape == (2, 64, 40, 56)
    odd = dpt(torch.randn(1, 3, 75, 100), fp=True, return_features=True)  # 70 x 98 inside
    assert odd.logits.shape == odd.logits_fp.shape == (1, 5, 75, 100)
    assert odd.features.shape == (1, 64, 40, 56)
    assert dpt(torch.randn(4, 3, 42, 42), comp_drop=True).shape == (4, 5, 42, 42)
    assert torch.equal(dpt.decode(out.features), dpt.classifier(out.features))


def test_dpt_parameters_are_unimatch_v2s():
    """DINOv2-S + DPT: 22.1M + 2.7M parameters as UniMatch V2's log reports (24.8M; its
    unused first residual unit of the deepest fusion block is left out here)."""
    net = build_model(dinov2_cfg("data.num_classes=21"))
    encoder = sum(p.numel() for p in net.backbone.parameters())
    head = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("backbone."))
    unused = 2 * (64 * 64 * 9 + 64)  # UniMatch V2's idle residual unit: two 3x3 convs
    assert round(encoder / 1e6, 1) == 22.1 and round((head + unused) / 1e6, 1) == 2.7


def official_dinov2_file(tmp_path, arch="dinov2_s", edit=None):
    """A file with the official DINOv2 checkpoint's keys and shapes (timm's names plus the
    masked-modelling token), random values."""
    state = timm.create_model(DINOV2[arch][0], pretrained=False, num_classes=0).state_dict()
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    if edit:
        edit(state)
    path = tmp_path / "dinov2_small.pth"
    torch.save(state, path)
    return path, state


def test_the_official_dinov2_file_loads_strictly(tmp_path):
    path, state = official_dinov2_file(tmp_path)
    net = build_model(dinov2_cfg(f"model.pretrained={path}"))
    assert torch.equal(net.backbone.state_dict()["blocks.3.attn.qkv.weight"],
                       state["blocks.3.attn.qkv.weight"])


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop("blocks.11.ls2.gamma"), "missing keys: blocks.11.ls2.gamma"),
    (lambda s: s.__setitem__("register_tokens", torch.zeros(1, 4, 384)),
     "unexpected keys: register_tokens"),
])
def test_a_dinov2_file_of_another_model_names_the_key(tmp_path, edit, needle):
    path, _ = official_dinov2_file(tmp_path, edit=edit)
    with pytest.raises(ConfigError, match=needle):
        build_model(dinov2_cfg(f"model.pretrained={path}"))


def test_a_missing_dinov2_file_names_the_official_url_and_the_place(tmp_path, monkeypatch):
    path = tmp_path / "pretrained" / "dinov2_small.pth"
    with pytest.raises(ConfigError) as e:
        build_model(dinov2_cfg(f"model.pretrained={path}"))
    line = str(e.value)
    assert "\n" not in line and str(path) in line
    assert "dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth" in line
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="hub"):
        build_model(dinov2_cfg("model.pretrained=true"))


def test_complementary_dropout_pairs_complementary_channel_masks():
    """Image i of s1 and of s2 keep complementary channels (masks m and 2 - m, m in {0, 2}),
    the same mask on every map of one width; int(B/2) pairs keep all channels."""
    torch.manual_seed(0)
    b, d = 8, 64
    maps = [torch.ones(2 * b, d, 3, 3) for _ in range(3)] + [torch.ones(2 * b, 16, 2, 2)]
    out = complementary_dropout(maps)
    masks = [o[:, :, 0, 0] for o in out]
    assert all(torch.equal(masks[0], m) for m in masks[1:3])
    for m in masks:
        s1, s2 = m[:b], m[b:]
        assert torch.equal(s1 + s2, torch.full_like(s1, 2.0))
        whole = [i for i in range(b) if bool((s1[i] == 1).all())]
        assert len(whole) == b // 2
        for i in set(range(b)) - set(whole):
            assert set(s1[i].tolist()) <= {0.0, 2.0}
    assert not torch.equal(masks[0][:b, :16], masks[3][:b])  # another width: its own mask
    assert all(torch.equal(o, t * m[:, :, None, None]) for o, t, m in zip(out, maps, masks))


def test_the_teacher_is_an_ema_that_starts_as_a_copy():
    """After step t the teacher is r * teacher + (1 - r) * model, r = min(1 - 1/(t+1), max),
    computed here the slow way; integer buffers are copied; it stays in eval mode."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    teacher = Teacher(model, ema_max=0.6)
    teacher.train()
    assert not teacher.net.training and not any(p.requires_grad for p in teacher.parameters())
    expected = {k: v.clone().float() for k, v in teacher.net.state_dict().items()}
    for t in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(5, 3))  # moves the running statistics
        teacher.update(model, t)
        r = min(1 - 1 / (t + 1), 0.6)
        for k, v in model.state_dict().items():
            floating = v.is_floating_point()
            expected[k] = r * expected[k] + (1 - r) * v.float() if floating else v.float()
    for k, v in teacher.net.state_dict().items():
        assert torch.allclose(v.float(), expected[k], atol=1e-6), k
    assert teacher.net.state_dict()["1.num_batches_tracked"] == 4


class Spy(torch.nn.Module):
    """The model, recording each call's input and keyword arguments and its output."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, **kw):
        out = self.net(x, **kw)
        self.calls.append((x, kw, out))
        return out

    def decode(self, features):
        return self.net.decode(features)


def test_the_v2_step_against_a_slow_cutmix_within_the_batch(synth_root):
    """The student sees x, then cat(s1, s2) with the partner's (the reversed batch's) pixels
    inside each box and Complementary Dropout; L_s is CE against the teacher's labels pasted
    the same way, counted where confident and not padding, over the non-padding pixels."""
    cfg, model, _, batch, ctx = setup(synth_root, "unimatch_v2")
    ctx.teacher = make_teacher(cfg, model)
    spy = Spy(model)
    terms = STEPS["unimatch_v2"](spy, batch, ctx)
    u, b = batch["u"], batch["u"]["w"].shape[0]
    (x_in, kw_x, _), (s_in, kw_s, out_s) = spy.calls
    assert torch.equal(x_in, batch["x"]["x"]) and kw_x == {} and kw_s["comp_drop"]
    with torch.no_grad():
        prob = ctx.teacher(u["w"]).softmax(1)
    loss_s = []
    for v, name in enumerate(("s1", "s2")):
        box = u[f"box{v + 1}"]
        num = den = 0.0
        for i in range(b):
            j = b - 1 - i  # flip(0)
            view = torch.where(box[i], u[name][j], u[name][i])
            assert torch.equal(s_in[v * b + i], view)
            label = torch.where(box[i], prob[j].argmax(0), prob[i].argmax(0))
            conf = torch.where(box[i], prob[j].max(0).values, prob[i].max(0).values)
            ignore = torch.where(box[i], u["ignore"][j], u["ignore"][i])
            ce = F.cross_entropy(out_s.logits[v * b + i][None], label[None], reduction="none")[0]
            keep = (conf >= cfg.train.conf_thresh) & (ignore != 255)
            num, den = num + (ce * keep).sum(), den + (ignore != 255).sum()
        loss_s.append(num / den)
    assert torch.allclose(terms["s"], (loss_s[0] + loss_s[1]) / 2, atol=1e-6)
    assert torch.allclose(terms["loss"], (terms["x"] + terms["s"]) / 2, atol=1e-6)


@pytest.mark.parametrize("targets", ["teacher", "student"])
def test_mlcl_on_v2_takes_its_weak_side_from_the_chosen_network(synth_root, monkeypatch,
                                                                 targets):
    """mlcl.targets=teacher: F_w and SAI's targets are the teacher's features and
    probabilities of u_w (no extra pass of the model); student: the model's, in a no_grad pass."""
    cfg, model, _, batch, ctx = setup(synth_root, "mlcl", "mlcl.base=unimatch_v2",
                                      f"mlcl.targets={targets}")
    ctx.teacher = make_teacher(cfg, model)
    with torch.no_grad():  # a teacher unlike the model
        for p in ctx.teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    seen, build = {}, methods.mlcl_inputs
    monkeypatch.setattr(methods, "mlcl_inputs", lambda *a: seen.setdefault("x", build(*a)))
    spy = Spy(model)
    terms = STEPS["mlcl"](spy, batch, ctx)
    assert terms["loss"].requires_grad and terms["p2p"] > 0
    source = ctx.teacher if targets == "teacher" else model
    with torch.no_grad():
        weak = source(batch["u"]["w"], return_features=True)
    assert torch.allclose(seen["x"].f_w, weak.features, atol=1e-5)
    b, k = weak.logits.shape[:2]
    outside = ~batch["u"]["box1"].unsqueeze(1).expand(-1, k, -1, -1)  # s1's target: u_w's own
    assert torch.allclose(seen["x"].sai_target[:b][outside],
                          weak.logits.softmax(1)[outside], atol=1e-5)
    # the model: x, cat(s1, s2); with student targets also u_w and cat(w1, w2), no_grad
    assert len(spy.calls) == (2 if targets == "teacher" else 4)


@pytest.mark.parametrize("extra, needle", [
    (("method=unimatch_v2", "train.mix_partner=loader"), "train.mix_partner"),
    (("method=mlcl", "mlcl.base=unimatch_v2", "mlcl.released_passes=true"),
     "mlcl.released_passes"),
    (("method=unimatch_v2", "train.batch_size=1"), "train.batch_size >= 2"),
])
def test_settings_unimatch_v2_cannot_take_are_refused(extra, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("synthetic", list(extra))


def test_the_v2_presets_are_unimatch_v2s_settings():
    cfg = load_config("pascal_v2", ["split=183"])
    assert (cfg.method, cfg.model.backbone, cfg.model.feature_channels) == (
        "unimatch_v2", "dinov2_s", 64)
    assert (cfg.data.crop_size, cfg.train.epochs, cfg.train.batch_size) == (518, 60, 4)
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.lr_multi, cfg.train.weight_decay) == (
        "adamw", 5e-6, 40.0, 0.01)
    assert cfg.train.mix_partner == "flip" and cfg.output_dir.endswith("dinov2_s-unimatch_v2-s0")
    city = load_config("cityscapes_v2", ["split=1_4", "method=mlcl"])
    assert (city.data.crop_size, city.train.epochs, city.train.batch_size) == (798, 180, 2)
    assert city.train.loss == "ohem" and city.eval.mode == "sliding"
    assert city.mlcl.base == "unimatch_v2" and "mlcl_v2-paper" in city.output_dir
    big = load_config("pascal_v2", ["model.backbone=dinov2_b"])
    assert big.model.feature_channels == 128
