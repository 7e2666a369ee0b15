"""hubforge: a reviewed YAML recipe in, verified fine-tuned models (adapter, merged, GGUF) and a Space out."""
__version__ = "0.1.0"
