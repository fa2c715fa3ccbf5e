"""The Llama model (Meta's names), its arguments, checkpoint loaders and tokenizers."""
