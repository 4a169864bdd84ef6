"""Models and tokenizers for a recipe: a real checkpoint, or the embedded tiny Llama.

Production recipes name a local Hugging Face directory (or a hub id the cluster has cached).
The embedded default builds a small Llama from the recipe's config and trains a byte-level BPE
tokenizer on the run's own (de-identified) corpus; both are saved as ordinary Hugging Face
directories, so every later step loads them the same way it would load Llama-3-70B.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipelines.config import ModelConfig, QuantizationConfig, TinyModelConfig
from pipelines.prompts import BOS, EOS, PAD, SPECIAL_TOKENS, install_chat_format

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train_tokenizer(texts: Iterable[str], vocab_size: int, chat_format: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (Llama-3 style) with the chat roles as special tokens."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        model_max_length=1_000_000)
    install_chat_format(tokenizer, chat_format)
    return tokenizer


def build_tiny_model(cfg: TinyModelConfig, tokenizer) -> LlamaForCausalLM:
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than model.tiny.vocab_size={cfg.vocab_size}")
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        # Packed rows are isolated by restarting position ids, which transformers honours only
        # when no KV cache is built; generation turns the cache back on explicitly.
        use_cache=False,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def build_embedded_base(cfg: ModelConfig, corpus: Iterable[str], out_dir: str | Path) -> Path:
    """Train the tokenizer on `corpus`, build the tiny Llama, save both to `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(corpus, cfg.tiny.vocab_size, cfg.chat_format)
    model = build_tiny_model(cfg.tiny, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    log.info("built the embedded tiny Llama (%.1fM params, %d tokens) at %s",
             model.num_parameters() / 1e6, len(tokenizer), out_dir)
    return out_dir


def load_tokenizer(path: str | Path, chat_format: str):
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    install_chat_format(tokenizer, chat_format)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bnb_config(quant: QuantizationConfig):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype])


def load_model(path: str | Path, model_cfg: ModelConfig, *, quantization: QuantizationConfig | None = None,
               device_map: str | None = None):
    """A causal LM from a Hugging Face directory, 4-bit when `quantization` is given.

    Weights are read from safetensors only and no repository code is ever executed.
    """
    kwargs = dict(dtype=DTYPES[model_cfg.dtype], attn_implementation=model_cfg.attn_implementation,
                  use_safetensors=True, trust_remote_code=False)
    if quantization is not None:
        kwargs["quantization_config"] = bnb_config(quantization)
        kwargs["device_map"] = device_map or ("cuda" if torch.cuda.is_available() else "cpu")
    elif device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.config.use_cache = False
    return model


def load_for_inference(base_path: str | Path, model_cfg: ModelConfig, adapter_path: str | Path | None = None,
                       quantization: QuantizationConfig | None = None):
    """Base model (+ optional PEFT adapter) in eval mode with the KV cache on, for generation.
    With GPUs the weights go onto them, split across several if one cannot hold them."""
    import torch

    model = load_model(base_path, model_cfg, quantization=quantization,
                       device_map="auto" if torch.cuda.is_available() else None)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path))
    model.eval()
    model.config.use_cache = True
    return model


def adapter_base_path(adapter_dir: str | Path) -> str | None:
    """The base model a PEFT adapter directory was trained on (its adapter_config.json)."""
    import json

    config = Path(adapter_dir) / "adapter_config.json"
    return json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None


def tokenizer_fingerprint(model_dir: str | Path) -> str | None:
    """A short hash of a model directory's tokenizer: shards must match the model's tokenizer."""
    import hashlib

    path = Path(model_dir, "tokenizer.json")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
