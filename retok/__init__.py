"""retok: replace the tokenizer of a pretrained LLM and keep the model good."""

__version__ = "0.1.0"
