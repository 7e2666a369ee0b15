"""hubforge: a reviewed YAML recipe in, verified fine-tuned models (adapter, merged, GGUF) and a Space out."""
import os

# llama.cpp's OpenMP threads spin-wait by default; once torch has started its own OpenMP pool in the same process
# the two fight for the cores and llama.cpp generation gets up to 500x slower (measured, see gguf stage notes).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
