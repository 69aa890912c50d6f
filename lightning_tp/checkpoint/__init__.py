"""Checkpoints: names and completeness, safe reading, loading weights for fine-tuning (:mod:`.weights`),
consolidation to one file (:mod:`.consolidate`) and Hugging Face import/export (:mod:`.hf`)."""

from lightning_tp.checkpoint.weights import LoadWeights, check_weights_fit, is_hf_checkpoint, load_weights

__all__ = ["LoadWeights", "check_weights_fit", "is_hf_checkpoint", "load_weights"]
