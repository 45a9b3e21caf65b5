"""Weight training: SFT examples, LoRA training with peft, adapter folders.

torch, transformers and peft are imported inside the functions that use them,
so importing this package stays cheap.
"""

from tandem.train.adapter import (
    AdapterError, AdapterMismatch, check_adapter_base, load_adapter_meta, merge_adapter, model_identity,
)
from tandem.train.lora import LoRAConfig, NothingToTrain, TrainResult, bf16_supported, train_lora
from tandem.train.sft import SFTExample, TokenizedExample, tokenize_example, tokenize_examples

__all__ = [
    "AdapterError", "AdapterMismatch", "LoRAConfig", "NothingToTrain", "SFTExample", "TokenizedExample",
    "TrainResult", "bf16_supported", "check_adapter_base", "load_adapter_meta", "merge_adapter",
    "model_identity", "tokenize_example", "tokenize_examples", "train_lora",
]
