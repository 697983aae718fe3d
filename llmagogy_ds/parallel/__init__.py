"""Parallel adapters (DeepSpeed engine; megatron-core tensor parallel), apart from the model's maths."""
