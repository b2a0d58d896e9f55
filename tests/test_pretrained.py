"""pretrained_cfg (checked against timm's own) and create_model(pretrained=PATH | True).

pretrained=True is tested without the network: offline mode and an empty download cache for the
failure, a download cache filled with weights made here for the success, and every socket blocked
so that nothing can reach (or hang on) the network whatever huggingface_hub decides to do.
"""

import logging
import socket
import sys

import pytest
import safetensors.torch
import torch

import repblocks
from repblocks.layouts import convert_layout
from repblocks.numerics import max_errors, randomize_bn_
from repblocks.pretrained import load_pretrained

from .official_layout import OfficialRepVGG

X = torch.randn(2, 3, 32, 32)
TIMM_KEYS = ["input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation", "num_classes", "pool_size"]
TIMM_KEYS += ["first_conv", "classifier", "hf_hub_id"]
# timm's module names by family, where they are not the RepVGG/MobileOne layout "timm".
TIMM_LAYOUTS = {"repghostnet_": "timm_repghost", "ghostnetv3_": "timm_ghostnetv3"}


def _trained(name="repvgg_tiny", **kwargs):
    return randomize_bn_(repblocks.create_model(name, **kwargs)).eval()


def _one_line(err) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


# --- pretrained_cfg ---


def test_pretrained_cfg_agrees_with_timms_for_every_variant():
    timm = pytest.importorskip("timm")
    published = {
        name.split(".")[0]: name
        for family in ("repvgg*", "mobileone*", "fastvit_[st]*", "repghostnet*", "ghostnetv3*", "repvit*")
        for name in timm.list_pretrained(family)
        if name.endswith(".apple_in1k") or not name.startswith("fastvit")  # fastvit: ours are the in1k weights
    }
    # RepViT: timm's weights are distilled, two heads; pretrained=PATH loads them, pretrained=True does not fetch
    # them yet (repblocks.models.repvit says why). Any other variant timm publishes must be fetched.
    not_fetched = {name for name in published if name.startswith("repvit_")}
    for name in repblocks.list_models():
        cfg = repblocks.get_pretrained_cfg(name)
        if cfg["hf_hub_id"] is None:
            assert name not in published or name in not_fetched, f"timm has weights for {name}: say so in its table row"
            continue
        assert published.get(name) == f"{name}.{cfg['tag']}", name
        theirs = timm.models.get_pretrained_cfg(published[name]).to_dict()
        # first_conv and classifier name modules: ours, which are timm's once renamed (MobileOne's conv_1x1 is
        # timm's conv_scale, a ghost network's head.fc its classifier).
        layout = next((theirs for prefix, theirs in TIMM_LAYOUTS.items() if name.startswith(prefix)), "timm")
        for key in ("first_conv", "classifier"):
            modules = (cfg[key],) if isinstance(cfg[key], str) else cfg[key]
            renamed = [
                name.removesuffix(".weight") for name in convert_layout({f"{m}.weight": None for m in modules}, layout)
            ]
            cfg[key] = renamed[0] if isinstance(theirs[key], str) else tuple(renamed)
        assert {key: cfg[key] for key in TIMM_KEYS} == {key: theirs[key] for key in TIMM_KEYS}, name


def test_model_carries_its_pretrained_cfg_and_the_registry_hands_out_copies():
    model = repblocks.create_model("repvgg_tiny", num_classes=10)
    assert model.pretrained_cfg == repblocks.get_pretrained_cfg("repvgg_tiny")
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.pretrained_cfg["num_classes"] == 1000
    model.pretrained_cfg["mean"] = (0.0, 0.0, 0.0)
    assert repblocks.get_pretrained_cfg("repvgg_tiny")["mean"] != (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"unknown model 'repvgg_z9'; registered models: .*\brepvgg_a0"):
        repblocks.get_pretrained_cfg("repvgg_z9")


def test_num_classes_defaults_to_the_pretrained_cfgs():
    assert (
        repblocks.create_model("repvgg_tiny").num_classes == repblocks.get_pretrained_cfg("repvgg_tiny")["num_classes"]
    )


# --- pretrained=PATH ---


@torch.no_grad()
def test_a_file_loads_into_the_train_form_and_sets_num_classes(tmp_path):
    source = _trained(num_classes=10)
    path = repblocks.save_weights(source, tmp_path / "tiny.safetensors")
    model = repblocks.create_model("repvgg_tiny", pretrained=path).eval()
    assert model.num_classes == 10, "num_classes comes from the file when not given"
    assert torch.equal(model(X), source(X))


@torch.no_grad()
def test_train_and_deploy_form_files_load_into_a_deploy_model(tmp_path):
    source = _trained("repvgg_tiny_g2se", num_classes=10)
    train_file = tmp_path / "train.pth"
    torch.save(source.state_dict(), train_file)
    train_safetensors = repblocks.save_weights(source, tmp_path / "train.safetensors")
    deploy_file = repblocks.save_weights(repblocks.switch_to_deploy(source), tmp_path / "deploy.safetensors")
    for path in (train_file, train_safetensors, deploy_file):
        model = repblocks.create_model("repvgg_tiny_g2se", deploy=True, pretrained=path).eval()
        assert model.stem.deploy and max_errors(source(X), model(X))[1] < 1e-5, path.name


@torch.no_grad()
def test_deploy_form_files_build_the_deploy_form_unless_told_otherwise(tmp_path):
    """create_model(name, pretrained=PATH) loads either form, as the README says: the model takes the file's form."""
    source = _trained(num_classes=10)
    plain = repblocks.switch_to_deploy(source)
    torch.save(plain.state_dict(), tmp_path / "deploy.pth")
    for path in (repblocks.save_weights(plain, tmp_path / "deploy.safetensors"), tmp_path / "deploy.pth"):
        model = repblocks.create_model("repvgg_tiny", pretrained=path).eval()
        assert model.stem.deploy and max_errors(source(X), model(X))[1] < 1e-5, path.name
    with pytest.raises(ValueError, match="these are deploy-form weights: build the model with deploy=True") as err:
        repblocks.create_model("repvgg_tiny", pretrained=tmp_path / "deploy.pth", deploy=False)  # said outright
    _one_line(err)
    train_file = repblocks.save_weights(source, tmp_path / "train.safetensors")
    assert not repblocks.create_model("repvgg_tiny", pretrained=train_file).stem.deploy


def test_list_models_takes_timms_arguments():
    published = repblocks.list_models(pretrained=True)
    assert "repvgg_a0" in published and "mobileone_s0" in published
    assert "repvgg_tiny" not in published and "qarepvgg_a0" not in published and "repvgg_b1g2" not in published
    assert all(repblocks.get_pretrained_cfg(name).get("hf_hub_id") for name in published)
    assert repblocks.list_models("repvgg_b3*", pretrained=True) == ["repvgg_b3", "repvgg_b3g4"]
    assert repblocks.list_models(["repvgg_a*", "mobileone_s0"], exclude_filters="*a2") == [
        "mobileone_s0",
        "repvgg_a0",
        "repvgg_a1",
    ]


@torch.no_grad()
def test_a_file_of_the_official_layout_loads(tmp_path):
    official = randomize_bn_(OfficialRepVGG(num_blocks=(2, 2, 2, 1), widths=(0.25,) * 4, num_classes=7)).eval()
    torch.save(official.state_dict(), tmp_path / "official.pth")
    model = repblocks.create_model("repvgg_tiny", pretrained=tmp_path / "official.pth").eval()
    assert model.num_classes == 7 and max_errors(official(X), model(X))[1] < 1e-6


@torch.no_grad()
def test_another_num_classes_loads_everything_but_the_classifier(tmp_path, caplog):
    source = _trained(num_classes=10)
    path = repblocks.save_weights(source, tmp_path / "tiny.safetensors")
    with caplog.at_level(logging.INFO, logger="repblocks"):
        model = repblocks.create_model("repvgg_tiny", num_classes=3, pretrained=path).eval()
    assert "10 classes, the model 3 classes" in caplog.text and "head.fc is left fresh" in caplog.text
    assert model.num_classes == 3
    assert torch.equal(model.forward_features(X), source.forward_features(X))
    pooled = repblocks.create_model("repvgg_tiny", num_classes=0, pretrained=path).eval()
    assert torch.equal(pooled(X), source.forward_head(source.forward_features(X), pre_logits=True))


@torch.no_grad()
def test_a_backbone_loads_a_classifier_without_its_head_and_unused_stages(tmp_path, caplog):
    official = randomize_bn_(OfficialRepVGG(num_blocks=(2, 2, 2, 1), widths=(0.25,) * 4, num_classes=7)).eval()
    torch.save(official.state_dict(), tmp_path / "official.pth")
    reference = repblocks.create_model("repvgg_tiny", pretrained=tmp_path / "official.pth").eval()
    with caplog.at_level(logging.INFO, logger="repblocks"):
        backbone = repblocks.create_model(
            "repvgg_tiny", features_only=True, out_indices=(1, 2), pretrained=tmp_path / "official.pth"
        ).eval()
    assert "left out head, stages.2, stages.3" in caplog.text
    expected = reference.forward_intermediates(X, indices=(1, 2), intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(backbone(X), expected, strict=True))


@torch.no_grad()
def test_load_pretrained_fills_a_backbone_built_beforehand(tmp_path):
    """What create_model(pretrained=PATH) does, for a model already built: a classifier's file into a backbone."""
    source = _trained(num_classes=10)
    path = repblocks.save_weights(source, tmp_path / "tiny.safetensors")
    backbone = repblocks.create_model("repvgg_tiny", features_only=True, out_indices=(2,))
    with pytest.raises(ValueError, match="unexpected keys"):
        repblocks.load_weights(backbone, path)  # the strict loader refuses the head and the stages it lacks
    load_pretrained(backbone, path).eval()
    assert torch.equal(backbone(X)[0], source.forward_intermediates(X, indices=(2,), intermediates_only=True)[0])


def test_a_file_without_a_classifier_leaves_the_head_fresh(tmp_path, caplog):
    backbone = _trained(features_only=True)
    path = repblocks.save_weights(backbone, tmp_path / "backbone.safetensors")
    with caplog.at_level(logging.INFO, logger="repblocks"):
        model = repblocks.create_model("repvgg_tiny", num_classes=5, pretrained=path).eval()
    assert "the weights have no classifier, the model 5 classes" in caplog.text
    with torch.no_grad():
        assert torch.equal(model.forward_features(X), backbone(X)[-1])


def test_weights_that_do_not_fit_fail_in_one_line(tmp_path):
    path = repblocks.save_weights(_trained("repvgg_tiny_g2se", num_classes=10), tmp_path / "g2se.safetensors")
    with pytest.raises(ValueError, match="weights do not fit RepVGG") as err:
        repblocks.create_model("repvgg_tiny", pretrained=path)
    _one_line(err)
    with pytest.raises(FileNotFoundError):
        repblocks.create_model("repvgg_tiny", pretrained=tmp_path / "missing.safetensors")


# --- pretrained=True: timm's weights, never from the network here ---


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the network is blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path, no_network):
    """huggingface_hub in offline mode (HF_HUB_OFFLINE=1) with an empty download cache; returns the cache."""
    constants = pytest.importorskip("huggingface_hub.constants")
    pytest.importorskip("timm")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.mark.parametrize("name", ["repvgg_tiny", "repvgg_b1g2"])
def test_variants_timm_has_no_weights_for_say_to_pass_a_path(name, no_network):
    with pytest.raises(
        ValueError, match=rf"timm publishes no weights for {name} \(it has weights for .*mobileone_s0, .*repvgg_a0"
    ) as err:
        repblocks.create_model(name, pretrained=True)
    assert "pass pretrained=PATH" in _one_line(err)


def test_without_timm_pretrained_true_says_what_to_install_or_pass(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ValueError, match=r"needs timm \(pip install timm\)") as err:
        repblocks.create_model("repvgg_a0", pretrained=True)
    assert "https://huggingface.co/timm/repvgg_a0.rvgg_in1k" in _one_line(err) and "pretrained=PATH" in str(err.value)


def test_offline_pretrained_true_fails_in_one_line_saying_where_to_get_the_file(offline_hub):
    with pytest.raises(ValueError, match="timm's weights for repvgg_a0 are not in the download cache") as err:
        repblocks.create_model("repvgg_a0", pretrained=True)
    message = _one_line(err)
    assert "hf download timm/repvgg_a0.rvgg_in1k model.safetensors" in message
    assert "download https://huggingface.co/timm/repvgg_a0.rvgg_in1k (model.safetensors)" in message
    assert message.endswith("and pass pretrained=PATH")


def test_pretrained_true_offline_fails_after_one_connection_attempt(monkeypatch, tmp_path):
    """Not declared offline (HF_HUB_OFFLINE unset), network down: one attempt, no download, so no retry loop."""
    constants = pytest.importorskip("huggingface_hub.constants")
    file_download = pytest.importorskip("huggingface_hub.file_download")
    timm = pytest.importorskip("timm")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    attempts, downloads = [], []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("the network is blocked by the test")

    def download(*args, **kwargs):
        downloads.append(args)
        raise OSError("the network is blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(file_download, "hf_hub_download", download)
    monkeypatch.setattr(timm, "create_model", download)
    with pytest.raises(
        ValueError, match=r"not in the download cache \(.*\) and huggingface.co cannot be reached"
    ) as err:
        repblocks.create_model("repvgg_a0", pretrained=True)
    assert "hf download timm/repvgg_a0.rvgg_in1k model.safetensors" in _one_line(err)
    assert len(attempts) == 1 and downloads == []


def test_pretrained_true_online_without_cached_weights_downloads_through_timm(monkeypatch, tmp_path):
    """The Hub answers: timm is asked for its pretrained weights (it downloads them), with no cached file named."""
    constants = pytest.importorskip("huggingface_hub.constants")
    timm = pytest.importorskip("timm")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    probed, asked = [], []

    class Connection:
        def close(self):
            pass

    def connect(address, timeout=None):
        probed.append(address)
        return Connection()

    create_model = timm.create_model

    def downloading(name, pretrained=False, pretrained_cfg_overlay=None, **kwargs):
        asked.append((name, pretrained, pretrained_cfg_overlay))
        return create_model(name, pretrained=False, **kwargs)  # stands in for the download: timm's own random weights

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(timm, "create_model", downloading)
    model = repblocks.create_model("repvgg_a0", pretrained=True)
    assert probed == [("huggingface.co", 443)]
    assert asked == [("repvgg_a0.rvgg_in1k", True, None)]
    assert model.num_classes == 1000


@pytest.mark.slow  # builds each model four times
@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
@torch.no_grad()
def test_pretrained_true_converts_timms_weights(offline_hub, name):
    """timm's download cache holds (random) weights: both forms of ours compute what timm's model does."""
    import timm

    published = randomize_bn_(timm.create_model(name)).eval()
    revision = "0" * 40
    repo = offline_hub / f"models--{repblocks.get_pretrained_cfg(name)['hf_hub_id'].replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    tensors = {key: value.contiguous() for key, value in published.state_dict().items()}
    safetensors.torch.save_file(tensors, repo / "snapshots" / revision / "model.safetensors")

    expected = published(X)
    model = repblocks.create_model(name, pretrained=True).eval()
    assert model.num_classes == 1000 and max_errors(expected, model(X))[1] < 1e-6  # MobileOne sums in another order
    deployed = repblocks.create_model(name, pretrained=True, deploy=True).eval()
    assert max_errors(expected, deployed(X))[1] < 1e-5
