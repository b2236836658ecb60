"""Data: image records, dataset adapters, evaluation protocols, samplers and transforms."""
