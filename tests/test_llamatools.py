"""llama.cpp's command-line tools (hubforge.llamatools) on the tiny Gemma 3: importance matrix made and used,
per-tensor types in the written file, KL divergence parsed from llama-perplexity, split files that load.

    .venv/bin/python -m pytest tests/test_llamatools.py -q -p no:cacheprovider

The tools are built on first use (`make llama-cpp-tools`, ~6 minutes on 2 idle cores) unless already cached.
"""
from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import pytest

from hubforge import llamatools

CTX = 128


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_base, persian_chat_file):
    """F16 GGUF of the tiny model, calibration text (chat-rendered, first 150 conversations) and held-out text."""
    from transformers import AutoTokenizer

    from hubforge import llamacpp

    root = tmp_path_factory.mktemp("llamatools")
    llamacpp.convert_model(llamacpp.converter_input(tiny_base, root / "view"), root / "f16.gguf", "F16")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    rows = [json.loads(line)["messages"] for line in persian_chat_file.read_text("utf-8").splitlines()]
    rendered = [tokenizer.apply_chat_template(m, tokenize=False) for m in rows]
    # llama.cpp adds the BOS itself; the ones inside mark where conversations start, as in training
    (root / "calib.txt").write_text("".join(rendered[:150]).removeprefix(tokenizer.bos_token), "utf-8")
    (root / "heldout.txt").write_text("".join(rendered[150:]), "utf-8")
    llamatools.bin_dir()  # build once here, outside any test's own timing
    return root


def tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    from gguf import GGUFReader

    return {t.name: [int(x) for x in t.shape] for t in GGUFReader(path).tensors}


def tensor_bytes(path: Path) -> dict[str, bytes]:
    from gguf import GGUFReader

    return {t.name: t.data.tobytes() for t in GGUFReader(path).tensors}


@pytest.mark.integration
def test_imatrix_is_written_and_changes_the_quantized_weights(work):
    log = work / "imatrix.log"
    llamatools.imatrix(work / "f16.gguf", work / "calib.txt", work / "imatrix.gguf", log=log, ctx=CTX)
    from gguf import GGUFReader

    names = {t.name for t in GGUFReader(work / "imatrix.gguf").tensors}
    assert "blk.0.attn_q.weight.in_sum2" in names and "blk.1.ffn_down.weight.in_sum2" in names
    llamatools.quantize(work / "f16.gguf", work / "plain.gguf", "Q4_K_M", log=log)
    llamatools.quantize(work / "f16.gguf", work / "imat.gguf", "Q4_K_M", log=log, imatrix=work / "imatrix.gguf")
    assert "importance matrix" in log.read_text()  # llama-quantize says it loaded the entries
    plain, imat = (tensor_bytes(work / n) for n in ("plain.gguf", "imat.gguf"))
    assert plain.keys() == imat.keys()
    assert any(plain[k] != imat[k] for k in plain if ".ffn_down." in k)  # weighted rounding picked other values


@pytest.mark.integration
def test_a_tied_output_head_gets_importance_data_and_it_changes_the_embedding(work):
    """llama-imatrix skips token_embd (the tied head is never named output.weight); gguf_imatrix records it through
    an untied view, and llama-quantize then rounds the embedding differently."""
    from hubforge import gguf_imatrix

    log, f16 = work / "tied.log", work / "f16.gguf"
    assert gguf_imatrix.tensor_names(f16) >= {"token_embd.weight"} and "output.weight" not in gguf_imatrix.tensor_names(f16)
    llamatools.imatrix(f16, work / "calib.txt", work / "plain-imatrix.gguf", log=log, ctx=CTX)
    assert not any(n.startswith("token_embd.") for n in gguf_imatrix.tensor_names(work / "plain-imatrix.gguf"))
    info = gguf_imatrix.compute(f16, work / "calib.txt", work / "tied.imatrix", log=log, ctx=CTX)
    names = gguf_imatrix.tensor_names(work / "tied.imatrix")
    assert info["tied_head"] and {"token_embd.weight.in_sum2", "token_embd.weight.counts"} <= names
    assert not any(n.startswith("output.") for n in names) and not list(work.glob("tied.*.gguf"))  # views removed
    for name, imatrix in (("head-plain", work / "plain-imatrix.gguf"), ("head-tied", work / "tied.imatrix")):
        llamatools.quantize(f16, work / f"{name}.gguf", "Q8_0", log=log, imatrix=imatrix, token_embedding_type="Q5_0")
    plain, tied = (tensor_bytes(work / f"{n}.gguf") for n in ("head-plain", "head-tied"))
    assert tensor_types(work / "head-tied.gguf")["token_embd.weight"] == "Q5_0"
    assert plain["token_embd.weight"] != tied["token_embd.weight"]
    assert all(plain[k] == tied[k] for k in plain if k != "token_embd.weight")  # Q8_0 ignores importance data


@pytest.mark.integration
def test_quantize_reports_type_fallbacks(work):
    report: dict = {}
    llamatools.quantize(work / "f16.gguf", work / "fallback.gguf", "Q4_K_M", log=work / "fallback.log", report=report)
    shapes = {t: s for t, s in tensor_shapes(work / "f16.gguf").items() if t.endswith(".weight") and len(s) == 2}
    narrow = sum(1 for s in shapes.values() if s[0] % 256)
    assert (sum(f["tensors"] for f in report["fallbacks"]) > 0) == (narrow > 0)
    assert all(f["columns"] % f["block"] for f in report["fallbacks"])


@pytest.mark.integration
def test_tensor_type_overrides_land_in_the_file(work):
    out = work / "mixed.gguf"
    llamatools.quantize(work / "f16.gguf", out, "Q4_K_M", log=work / "mixed.log", token_embedding_type="Q4_0",
                        tensor_types={r"\.attn_v\.weight$": "Q8_0", r"^blk\.1\.ffn_down\.weight$": "Q5_0"})
    types = tensor_types(out)
    assert types["token_embd.weight"] == "Q4_0"
    assert types["blk.0.attn_v.weight"] == types["blk.1.attn_v.weight"] == "Q8_0"
    assert types["blk.1.ffn_down.weight"] == "Q5_0" and types["blk.0.ffn_down.weight"] != "Q5_0"
    assert types["blk.0.attn_q.weight"] == "Q4_K"  # untouched tensors keep Q4_K_M's own choice


@pytest.mark.integration
def test_kl_divergence_numbers_are_sane_and_ordered(work):
    log, logits = work / "kld.log", work / "base.kld"
    base = llamatools.kld_base(work / "f16.gguf", work / "heldout.txt", logits, log=log, ctx=CTX)
    assert base["ppl"] > 1
    same = llamatools.kld(work / "f16.gguf", logits, log=log, ctx=CTX)
    assert same["mean_kld"] < 1e-4 and same["same_top"] > 0.999 and same["ppl"] == pytest.approx(base["ppl"], rel=1e-3)
    results = {}
    for qtype in ("Q8_0", "Q2_K"):
        llamatools.quantize(work / "f16.gguf", work / f"{qtype}.gguf", qtype, log=log)
        results[qtype] = llamatools.kld(work / f"{qtype}.gguf", logits, log=log, ctx=CTX)
    q8, q2 = results["Q8_0"], results["Q2_K"]
    assert 0 <= q8["mean_kld"] < q2["mean_kld"] and q8["mean_kld"] <= q8["p99_kld"] <= q8["max_kld"]
    assert 0 <= q2["same_top"] < q8["same_top"] <= 1
    assert q8["ppl_base"] == pytest.approx(base["ppl"], rel=1e-3)


@pytest.mark.integration
def test_split_files_load_and_generate_as_the_whole_file(work):
    from hubforge import llamacpp

    whole = work / "split-me.gguf"
    llamatools.quantize(work / "f16.gguf", whole, "Q8_0", log=work / "split.log")
    parts = llamatools.split(whole, "1M", log=work / "split.log")
    assert len(parts) >= 2 and parts[0].name == "split-me-00001-of-" + f"{len(parts):05d}.gguf"
    assert all(p.stat().st_size <= 1.1 * 2**20 for p in parts)
    prompt = [2, 5, 6, 7]
    with closing(llamacpp.load(whole)) as llm:
        want = llamacpp.greedy(llm, prompt, 12, set())[0]
    with closing(llamacpp.load(parts[0])) as llm:
        assert llamacpp.greedy(llm, prompt, 12, set())[0] == want


@pytest.mark.unit
def test_a_tools_folder_without_the_tools_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBFORGE_LLAMA_TOOLS", str(tmp_path))
    with pytest.raises(llamatools.LlamaToolError, match="lacks llama-quantize.*make llama-cpp-tools"):
        llamatools.bin_dir()


@pytest.mark.unit
def test_a_machine_without_cmake_is_told_what_to_install(monkeypatch):
    monkeypatch.setattr(llamatools.shutil, "which", lambda name: None)
    with pytest.raises(llamatools.LlamaToolError, match=r"apt-get install cmake g\+\+"):
        llamatools.build()


@pytest.mark.unit
def test_split_sizes_read_as_llama_gguf_split_reads_them(tmp_path):
    assert llamatools.size_bytes("500M") == 500_000_000 and llamatools.size_bytes("48G") == 48_000_000_000
    with pytest.raises(llamatools.LlamaToolError, match="e.g. 500M or 48G"):
        llamatools.size_bytes("2GB")
    small = tmp_path / "x-Q8_0.gguf"
    small.write_bytes(b"GGUF" + bytes(100))
    stale = tmp_path / "x-Q8_0-00001-of-00002.gguf"  # a former run's part: must not be published with this file
    stale.write_bytes(b"old")
    assert llamatools.split_if_larger(small, "1M", log=tmp_path / "log") == [] and not stale.exists()
    assert llamatools.split_if_larger(small, None, log=tmp_path / "log") == []


@pytest.mark.integration
def test_logits_at_chosen_positions_equal_llama_cpps_own_every_position_logits(work):
    """llamacpp.logits asks llama.cpp for output only where a target is scored; those rows must be exactly the rows
    llama-cpp-python's own logits_all evaluation returns, and generation from the same context must still work."""
    import llama_cpp
    import numpy as np

    from hubforge import llamacpp

    path = work / "f16.gguf"
    seqs = [[2, *range(100, 100 + n)] for n in (7, 40, 130)]  # the last spans two 64-token batches
    with closing(llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=64, logits_all=True, verbose=False)) as llm:
        want = []
        for ids in seqs:
            llm.reset()
            llm.eval(ids)
            want.append(np.array(llm.scores[: len(ids)]))
    with closing(llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=64, verbose=False)) as llm:
        before = llamacpp.greedy(llm, [2, 5, 6, 7], 8, set())[0]
        for ids, rows in zip(seqs, want):
            masks = [0] * (len(ids) // 2) + [1] * (len(ids) - len(ids) // 2)
            where = llamacpp.scored_positions(ids, masks, 256)
            assert where == [i for i in range(len(ids) - 1) if masks[i + 1]]
            np.testing.assert_allclose(llamacpp.logits(llm, ids, where), rows[where], rtol=0, atol=1e-5)
            np.testing.assert_allclose(llamacpp.logits(llm, ids), rows, rtol=0, atol=1e-5)
            assert llamacpp.logits(llm, ids, []).shape == (0, rows.shape[1])
        assert llamacpp.greedy(llm, [2, 5, 6, 7], 8, set())[0] == before  # the cache was left clean
