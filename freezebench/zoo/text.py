"""Text classifiers: Hugging Face ``transformers`` models, read offline, and small BERTs built in code.

    freezebench train --config text_demo                                  # bert_tiny on the embedded task
    freezebench train model.name=hf model.hf_path=/models/bert-base-uncased data.name=glue data.task=mrpc \\
        data.root=/data/glue optim.name=adamw optim.lr=2e-5 schedule.name=linear schedule.warmup_fraction=0.1

Registered in :data:`freezebench.registry.TEXT_MODELS` (``model.name`` on text data):

* ``hf``: ``AutoModelForSequenceClassification`` from ``model.hf_path``, a local folder (``save_pretrained``)
  or a name in the local Hugging Face cache, with ``local_files_only=True`` (nothing is downloaded), and the
  task's label count. A checkpoint whose classifier head has another label count is refused unless
  ``model.reinit_head=true`` (then the head is new); a checkpoint without a head (an encoder, e.g.
  ``bert-base-uncased``) gets a new one anyway.
* ``bert_tiny`` / ``bert_mini`` / ``bert_small``: BERTs (Devlin et al., "BERT: Pre-training of Deep
  Bidirectional Transformers for Language Understanding", NAACL 2019) in the sizes of Turc et al., "Well-Read
  Students Learn Better: On the Importance of Pre-training Compact Models", 2019 (L=2/H=128, L=4/H=256,
  L=4/H=512), randomly initialised, with the data's vocabulary: for tests and the embedded demo.

Every model is wrapped in :class:`TextClassifier`, whose forward takes the text batch's input dict
(``input_ids``, ``attention_mask``, optionally ``token_type_ids``) and returns the logits, so the trainer calls
it like an image model. It declares its blocks (``freezebench_blocks``, :mod:`freezebench.units`): the
embeddings, each encoder layer, and the rest (pooler and classifier) as the head.

``transformers`` is imported only here and only when a text model or text data is built; without the extra
installed every text entry point says, in one line, ``pip install -e ".[nlp]"``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, FreezebenchError
from ..registry import TEXT_MODELS

log = logging.getLogger(__name__)

NLP_EXTRA = 'pip install -e ".[nlp]"'

#: (layers, hidden size, attention heads) of the small BERTs (Turc et al. 2019); FFN = 4 x hidden
BERT_SIZES = {"bert_tiny": (2, 128, 2), "bert_mini": (4, 256, 4), "bert_small": (4, 512, 8)}


def require_transformers() -> Any:
    """The ``transformers`` module, or one line saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise FreezebenchError(f"text models and data need Hugging Face transformers (the nlp extra), which is "
                               f"not installed: {NLP_EXTRA}") from None
    transformers.logging.set_verbosity_error()  # its load reports go to the log below instead
    transformers.logging.disable_progress_bar()
    return transformers


class TextClassifier(nn.Module):
    """A sequence classifier of ``transformers`` called with the text batch's input dict; returns logits."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.hf(**inputs).logits

    def freezebench_layer_units(self) -> list[list[str]]:
        """At layer granularity the embeddings are one unit (word, position and segment embeddings and their
        LayerNorm: the position embedding alone is the same for every input)."""
        blocks = self.freezebench_blocks()
        return blocks[:1]

    def freezebench_blocks(self) -> list[list[str]]:
        """Embeddings, each encoder layer, and the head (everything after the encoder: pooler, classifier)."""
        base = self.hf.base_model
        prefix = "hf." + self.hf.base_model_prefix
        layers_name, layers = next(((n, m) for n, m in base.named_modules() if isinstance(m, nn.ModuleList)
                                    and len(m)), (None, None))
        emb = next((n for n, _ in base.named_children() if "embed" in n), None)
        if layers is None or emb is None:
            return []  # not an encoder of the BERT family: the generic block rule applies
        encoder = layers_name.split(".")[0]
        blocks = [[f"{prefix}.{emb}"]] + [[f"{prefix}.{layers_name}.{i}"] for i in range(len(layers))]
        head = [f"{prefix}.{n}" for n, m in base.named_children() if n not in (emb, encoder)
                and any(True for _ in m.parameters())]
        head += [f"hf.{n}" for n, m in self.hf.named_children() if m is not base and any(True for _ in m.parameters())]
        return blocks + [head] if head else blocks


def _bert(name: str, *, num_classes: int, vocab_size: int, max_length: int, **_: Any) -> nn.Module:
    tf = require_transformers()
    layers, hidden, heads = BERT_SIZES[name]
    config = tf.BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=4 * hidden,
                           max_position_embeddings=max(512, max_length), num_labels=num_classes)
    return TextClassifier(tf.BertForSequenceClassification(config))


@TEXT_MODELS.register("bert_tiny")
def bert_tiny(**kw: Any) -> nn.Module:
    """BERT-Tiny (L=2, H=128, 2 heads; Turc et al. 2019), random initialisation."""
    return _bert("bert_tiny", **kw)


@TEXT_MODELS.register("bert_mini")
def bert_mini(**kw: Any) -> nn.Module:
    """BERT-Mini (L=4, H=256, 4 heads; Turc et al. 2019), random initialisation."""
    return _bert("bert_mini", **kw)


@TEXT_MODELS.register("bert_small")
def bert_small(**kw: Any) -> nn.Module:
    """BERT-Small (L=4, H=512, 8 heads; Turc et al. 2019), random initialisation."""
    return _bert("bert_small", **kw)


def _missing_model(path: str, e: Exception) -> FreezebenchError:
    return FreezebenchError(f"model.hf_path={path!r} is neither a model folder (config.json + weights, from "
                            f"save_pretrained) nor a model in the local Hugging Face cache (models are read with "
                            f"local_files_only=True, nothing is downloaded): {str(e).strip().splitlines()[0]}")


@TEXT_MODELS.register("hf")
def hf(*, num_classes: int, hf_path: str | None = None, reinit_head: bool = False, vocab_size: int = 0,
       **_: Any) -> nn.Module:
    """``AutoModelForSequenceClassification`` read offline from ``model.hf_path`` with the task's label count."""
    if not hf_path:
        raise ConfigError("model.name=hf needs model.hf_path=<a local model folder or a name in the local "
                          "Hugging Face cache>")
    tf = require_transformers()
    try:
        config = tf.AutoConfig.from_pretrained(hf_path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise _missing_model(hf_path, e) from None
    try:
        model, info = tf.AutoModelForSequenceClassification.from_pretrained(
            hf_path, num_labels=num_classes, local_files_only=True, ignore_mismatched_sizes=True,
            output_loading_info=True)
    except (OSError, ValueError) as e:
        raise _missing_model(hf_path, e) from None
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]
    if mismatched and not reinit_head:
        raise ConfigError(f"model.hf_path={hf_path!r} has a classifier head of {config.num_labels} labels, the "
                          f"task has {num_classes}: set model.reinit_head=true to fine-tune with a new head")
    if reinit_head and not mismatched:  # asked for a new head although the sizes fit: re-initialise it
        head = getattr(model, "classifier", None)
        if head is not None:
            head.apply(model._init_weights)
    if info.get("missing_keys"):
        log.info("%s: newly initialised: %s", hf_path, ", ".join(info["missing_keys"]))
    if vocab_size and vocab_size > model.get_input_embeddings().num_embeddings:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but model.hf_path={hf_path!r} embeds only "
                          f"{model.get_input_embeddings().num_embeddings}: use the tokenizer saved with the model")
    return TextClassifier(model)


def build_text_model(name: str, *, num_classes: int, vocab_size: int, max_length: int, hf_path: str | None = None,
                     checkpoint: str | None = None, reinit_head: bool = False) -> nn.Module:
    """The text model ``name`` (:data:`~freezebench.registry.TEXT_MODELS`) for a task of ``num_classes`` labels
    over ``vocab_size`` tokens and sequences of up to ``max_length``; ``checkpoint``: freezebench weights."""
    factory = TEXT_MODELS.get(name)
    model = factory(num_classes=num_classes, vocab_size=vocab_size, max_length=max_length, hf_path=hf_path,
                    reinit_head=reinit_head)
    if checkpoint is not None:
        from .models import load_checkpoint

        load_checkpoint(model, name, checkpoint, reinit_head)
    return model


def load_tokenizer(path: str) -> Any:
    """The tokenizer saved in ``path`` (a model folder or a name in the local cache), read offline."""
    import os

    tf = require_transformers()
    files = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in files):
        raise FreezebenchError(f"no tokenizer found in {path!r} (expected tokenizer.json or vocab.txt with "
                               f"tokenizer_config.json, as tokenizer.save_pretrained writes them, beside the model)")
    try:
        tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise FreezebenchError(f"no tokenizer found in {path!r} (expected tokenizer.json or vocab.txt with "
                               f"tokenizer_config.json, as tokenizer.save_pretrained writes them, beside the "
                               f"model; read offline): {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if tok is None or isinstance(tok, bool) or len(tok) <= len(set(tok.all_special_ids)):
        raise FreezebenchError(f"no tokenizer found in {path!r}: save one beside the model (tokenizer.save_pretrained)")
    return tok
