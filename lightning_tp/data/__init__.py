"""Data: tokenizers, pretraining corpora and fine-tuning data sets as LightningDataModules."""
