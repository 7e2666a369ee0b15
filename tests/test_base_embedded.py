"""The embedded Gemma 3 270M: packaged GGUF -> transformers checkpoint with a faithful tokenizer (slow tier).

The probe must tokenize and detokenize identically with llama.cpp reading the original GGUF vocabulary and with
the saved transformers tokenizer, and the rebuilt SentencePiece model must hold the GGUF's pieces exactly.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib import metadata

import pytest

from hubforge.base import fetch_embedded, read_gguf_vocab

pytestmark = pytest.mark.slow

PROBE = [
    "سلام دنیا! این یک آزمایش است.", "می‌خواهم به خانه بروم", "۱۲۳۴ و ١٢٣٤ و 1234", "Merhaba dünya, İstanbul'da ğüşıöç",
    "😀🚀 emoji 👩‍👩‍👧", "rare: ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ \u200b", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "a    b\t\tc\n\n\nd", "  leading spaces", "«نقل‌قول» ، ؛ ؟",
]


@pytest.fixture(scope="module")
def embedded():
    return fetch_embedded()


def test_fetch_is_cached_and_complete(embedded):
    start = time.time()
    assert fetch_embedded() == embedded and time.time() - start < 1
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "chat_template.jinja", "generation_config.json"):
        assert (embedded / name).is_file(), name
    facts = json.loads((embedded / "hubforge-base.json").read_text())
    assert facts["license"] == "gemma" and facts["hub_id"] == "google/gemma-3-270m"


def test_tokenizer_round_trip_matches_the_gguf_vocabulary(embedded):
    import llama_cpp
    from transformers import AutoTokenizer

    gguf = next((embedded / "source").glob("*.gguf"))
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(embedded)
    for text in PROBE:
        ids_gguf = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        ids_hf = hf(text, add_special_tokens=False).input_ids
        assert ids_hf == ids_gguf, text
        assert hf.decode(ids_hf) == text
        assert llm.detokenize(ids_gguf, special=True).decode("utf-8") == text


def test_rebuilt_sentencepiece_model_holds_every_gguf_piece(embedded):
    import sentencepiece as spm

    vocab = read_gguf_vocab(next((embedded / "source").glob("*.gguf")))
    sp = spm.SentencePieceProcessor(model_file=str(embedded / "tokenizer.model"))
    assert sp.get_piece_size() == len(vocab["tokens"]) == 262144
    differences = [i for i, tok in enumerate(vocab["tokens"])
                   if sp.id_to_piece(i) != (tok.replace(" ", "\u2581") if vocab["types"][i] == 4 else tok)]
    assert differences == []
    assert [sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()] == [vocab["bos"], vocab["eos"], vocab["pad"], vocab["unk"]]
    plain = "سلام دنیا 😀 a    b"
    assert sp.decode(sp.encode(plain)) == plain


def test_gguf_distribution_and_llama_cpp_converter_coexist():
    """transformers needs the `gguf` distribution (>=0.10); llama.cpp's converter runs with its own gguf-py."""
    from hubforge.llamacpp import converter_dir

    assert metadata.version("gguf") == "0.19.0"
    script = converter_dir() / "convert_hf_to_gguf.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--outtype" in out.stdout
