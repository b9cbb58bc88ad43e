"""ds_train: DeepSpeed ZeRO-3 LoRA fine-tuning of Higgs Audio v2."""

__version__ = "0.1.0"
