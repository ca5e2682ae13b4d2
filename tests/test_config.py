import pytest

from mlcl.config import ConfigError, config_from_dict, load_config


def test_presets_exist_and_load():
    with pytest.raises(ConfigError, match="unknown preset 'nope'") as e:
        load_config("nope")
    names = str(e.value).split("available: ")[1].rstrip(")").split(", ")
    for name in ("synthetic", "pascal", "pascal_blended", "cityscapes"):
        assert name in names
        cfg = load_config(name)
        assert cfg.data.num_classes >= 2


def test_overrides_and_split_cells():
    cfg = load_config("synthetic", ["method=mlcl", "split=1_8", "train.lr=1e-3",
                                    "data.aug.scale_range=[0.5,1.5]", "mlcl.variant=released"])
    assert cfg.method == "mlcl" and cfg.split == "1_8"
    assert cfg.data.labeled_split == "splits/1_8/labeled.txt"
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.aug.scale_range == [0.5, 1.5]
    # the released variant turns every quirk on and alpha off; the paper variant the opposite
    assert cfg.mlcl.alpha == 0.0 and cfg.mlcl.pair_by_position and cfg.mlcl.bilinear_ignore
    paper = load_config("synthetic", ["method=mlcl"])
    assert paper.mlcl.alpha == pytest.approx(0.1) and not paper.mlcl.pair_by_position
    # a single quirk can be switched on its own
    one = load_config("synthetic", ["mlcl.duplicate_top_anchor=true"])
    assert one.mlcl.duplicate_top_anchor and not one.mlcl.bank_early_stop


@pytest.mark.parametrize("override, culprit", [
    ("foo=1", "foo"),
    ("data.crop=3", "data.crop"),
    ("data.crop_size=abc", "data.crop_size"),
    ("train.cpu=1", "train.cpu"),
    ("method=fixmatch", "method"),
    ("split=1_3", "split"),
    ("eval.mode=tiles", "eval.mode"),
])
def test_bad_overrides_name_the_key(override, culprit):
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        load_config("synthetic", [override])


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nosuch"):
        load_config("nosuch")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  num_classes: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("base: synthetic\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(typo)


def test_round_trip_through_dict():
    cfg = load_config("cityscapes", ["split=1_4", "seed=3"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


def test_a_config_saved_with_removed_keys_still_loads():
    """config.yaml files of older runs hold keys since removed (fixed at the values the code
    uses); config_from_dict leaves them out, any other unknown key still fails."""
    cfg = load_config("pascal", ["split=183", "method=mlcl"])
    old = cfg.to_dict()
    old["unimatch"] = {"w_x": 1.0, "w_s1": 0.25, "w_s2": 0.25, "w_fp": 0.5, "scale": 0.5}
    old["mlcl"].update(rampup_k=5.0, sai_ignore_mask=False)
    old["model"]["output_stride"] = 16
    assert config_from_dict(old) == cfg
    assert "unimatch" in old and "rampup_k" in old["mlcl"]  # the caller's dict is untouched
    old["mlcl"]["no_such_key"] = 1
    with pytest.raises(ConfigError, match="mlcl.no_such_key"):
        config_from_dict(old)


def test_roll_partner_needs_two_images():
    with pytest.raises(ConfigError, match="mix_partner"):
        load_config("synthetic", ["method=unimatch", "train.batch_size=1"])
    cfg = load_config("synthetic", ["method=unimatch", "train.batch_size=1",
                                    "train.mix_partner=loader"])
    assert cfg.train.mix_partner == "loader"


@pytest.mark.parametrize("word", ["null", "none", "None", "~"])
def test_a_none_word_on_the_command_line_unsets_an_optional_key(word):
    """`train.mix_partner=null` (or none / ~) gives None, so the variant decides, instead
    of the text being taken as a partner's name."""
    released = load_config("synthetic", ["method=mlcl", "mlcl.variant=released",
                                         f"train.mix_partner={word}"])
    assert released.train.mix_partner == "same"  # the released variant's own
    paper = load_config("synthetic", ["method=mlcl", f"train.mix_partner={word}"])
    assert paper.train.mix_partner == "roll"
    assert load_config("synthetic", [f"mlcl.alpha={word}"]).mlcl.alpha == pytest.approx(0.1)
