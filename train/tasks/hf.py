"""A Hugging Face `transformers` causal LM trained on a token corpus (train.tasks.tokens).

The model comes from a config (`model: {model_type: gpt2, n_layer: 4, ...}`: random init under
the job's seed, so every rank starts equal) or from a local model directory (`model_dir`:
`from_pretrained` without downloads). Under FSDP2 its decoder blocks (the classes the model names
in `_no_split_modules`, e.g. `GPT2Block`, `LlamaDecoderLayer`) are sharded one by one.

`transformers` is an optional dependency: `pip install -e ".[hf]"`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from train.tasks.gpt import CausalLM
from train.tasks.tokens import TokenWindows

# Config keys that give the longest sequence a model takes, by model family.
_POSITIONS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("train.task=train.tasks.hf:HFCausalLM needs transformers: "
                         "pip install -e \".[hf]\" (or pip install transformers)") from None
    transformers.logging.set_verbosity_error()  # its notices would print on every rank
    return transformers


class HFCausalLM(TokenWindows, CausalLM):
    """task_args: `path` (the corpus, required), `model` (a transformers config as a dict, with
    `model_type`) or `model_dir` (a local model directory), `seq_len`, `lr`, `warmup_steps`,
    `eval_fraction`, `vocab_size` / `dtype` (corpora without a .json), `attn_implementation`
    (default `sdpa`)."""

    def __init__(self, path: str = "", model: Optional[Dict[str, Any]] = None,
                 model_dir: str = "", seq_len: int = 128, lr: float = 3e-4,
                 warmup_steps: int = 20, eval_fraction: float = 0.05,
                 vocab_size: Optional[int] = None, dtype: Optional[str] = None,
                 attn_implementation: str = "sdpa"):
        if bool(model) == bool(model_dir):
            raise ValueError("train.task_args: give one of model (a transformers config, e.g. "
                             "{model_type: gpt2, n_layer: 2}) or model_dir (a local model "
                             "directory)")
        self._open_corpus(path, seq_len, eval_fraction, vocab_size, dtype)
        self.lr, self.warmup_steps = lr, warmup_steps
        self.model_dir, self.attn = model_dir, attn_implementation
        tf = _transformers()
        if model_dir:
            try:
                self.config = tf.AutoConfig.from_pretrained(model_dir, local_files_only=True)
            except (OSError, ValueError) as e:
                raise ValueError(f"train.task_args.model_dir={model_dir!r}: {e}") from None
            if self.config.vocab_size < self.vocab_size:
                raise ValueError(
                    f"train.task_args.model_dir={model_dir!r}: its vocabulary "
                    f"({self.config.vocab_size}) is smaller than the corpus's ({self.vocab_size}):"
                    " tokenize the corpus with the model's own tokenizer")
        else:
            args = dict(model)
            model_type = args.pop("model_type", None)
            if not model_type:
                raise ValueError("train.task_args.model needs a model_type (gpt2, llama, ...)")
            args.setdefault("vocab_size", self.vocab_size)
            try:
                self.config = tf.AutoConfig.for_model(model_type, **args)
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"train.task_args.model: {e}") from None
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                # a family's default ids (gpt2's 50256) outside a small vocabulary
                tid = getattr(self.config, key, None)
                if isinstance(tid, int) and tid >= self.config.vocab_size:
                    setattr(self.config, key, None)
        longest = next((getattr(self.config, k) for k in _POSITIONS
                        if isinstance(getattr(self.config, k, None), int)), None)
        if longest is not None and longest < seq_len:
            raise ValueError(f"train.task_args.seq_len={seq_len} is longer than the model takes "
                             f"({longest}): lower seq_len or raise the model's positions")

    def build_model(self) -> nn.Module:
        tf = _transformers()
        if self.model_dir:
            return tf.AutoModelForCausalLM.from_pretrained(
                self.model_dir, local_files_only=True, attn_implementation=self.attn,
                torch_dtype=torch.float32)
        return tf.AutoModelForCausalLM.from_config(self.config, attn_implementation=self.attn,
                                                   torch_dtype=torch.float32)

    def loss(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = batch["tokens"]
        logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               tokens[:, 1:].reshape(-1))

    def fsdp_units(self, model: nn.Module):
        names = set(getattr(model, "_no_split_modules", None) or ())
        return [m for m in model.modules() if type(m).__name__ in names]
