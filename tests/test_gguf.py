"""gguf stage on the tiny Gemma 3: every quant type, the tokenizer probe, LoRA-GGUF, and the refusal paths.

    .venv/bin/python -m pytest tests/test_gguf.py -q -p no:cacheprovider

One LoRA run is merged and exported once (module fixture, ~1 min on 2 cores); the refusal tests stop early or
export only the f16 file.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from contextlib import closing
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "gguf"))
from make_adapters import (fake_run, llama_cpp_faithful, make_lora_adapter, merged_run, set_config,  # noqa: E402
                           stale_tokenizer_model)

pytestmark = pytest.mark.integration

ALL_QUANTS = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q3_K_L", "Q3_K_M",
              "Q3_K_S", "Q2_K", "IQ4_NL", "TQ1_0", "TQ2_0"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base, persian_chat_file):
    root = tmp_path_factory.mktemp("gguf-project")
    shutil.copytree(tiny_base, root / "base")
    llama_cpp_faithful(root / "base")  # no-op once the shared fixture sets query_pre_attn_scalar = head_dim
    (root / "data").mkdir()
    shutil.copy(persian_chat_file, root / "data" / "chat.jsonl")
    return root


def make(root: Path, **gguf):
    from hubforge.recipe import resolve

    raw = {"name": "tiny-gguf", "base": {"model": "./base"}, "data": {"files": ["data/chat.jsonl"], "format": "messages"},
           "method": {"name": "lora"}, "eval": {"max_samples": 4}, "export": {"gguf": gguf}}
    return resolve(raw, root=root, source="<test>")


@pytest.fixture(scope="module")
def exported(project, tmp_path_factory):
    from hubforge.stages import gguf, merge

    recipe = make(project, quants=ALL_QUANTS, lora=True, split_above="2M",  # the F16 file (~3 MB) is split
                  auto={"enabled": True, "min_top1": 0.6, "max_ppl_increase": 0.5})
    work = tmp_path_factory.mktemp("gguf-run")
    adapter = make_lora_adapter(project / "base", work / "adapter")
    run_dir = fake_run(work / "run", adapter, project / "data" / "chat.jsonl")
    run_dir.mark("merge", status="done", result=merge.run(recipe, run_dir))
    return recipe, run_dir, gguf.run(recipe, run_dir)


def test_every_type_is_written_hashed_loads_and_generates(exported):
    import llama_cpp
    from hubforge import llamacpp
    from hubforge.rundir import sha256_file

    recipe, run_dir, result = exported
    files = {row["type"]: row for row in result["files"]}
    assert list(files) == ["F16", *ALL_QUANTS] + (["AUTO"] if result["auto"]["meets"] else [])
    files.pop("AUTO", None)
    for qtype, row in files.items():
        path = run_dir.path / row["file"]
        assert path.name == f"tiny-gguf-{qtype}.gguf"
        assert row["size"] == path.stat().st_size and row["sha256"] == sha256_file(path)
        assert row["tokens_per_s"] > 0 and math.isfinite(row["perplexity"]) and 0 <= row["greedy_agreement"] <= 1
        with closing(llamacpp.load(path, vocab_only=True)) as llm:  # the file really holds that type, no fallback
            want = 1 if qtype == "F16" else getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
            assert int(llm.metadata["general.file_type"]) == want
    # the F16 file picks the HF token at every step that is not a near-tie (it may part from HF only at one)
    assert files["F16"]["decisive_agreement"] == 1.0 and files["F16"]["delta_ppl_vs_f16"] == 0
    assert all(d["tie"] for d in files["F16"]["greedy_divergences"])
    bpw = [files[t]["bits_per_weight"] for t in ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "TQ1_0")]
    assert bpw == sorted(bpw, reverse=True) and len(set(bpw)) == len(bpw)


def test_quality_table_is_written(exported):
    recipe, run_dir, result = exported
    quality = json.loads((run_dir.path / "gguf" / "quality.json").read_text("utf-8"))
    assert quality["files"] == result["files"]
    assert quality["held_out"]["source"] == "data/eval.jsonl" and quality["held_out"]["tokens"] > 50
    assert math.isfinite(quality["reference"]["perplexity"])
    assert quality["held_out"]["tokens_scored"] in ("assistant", "all") and quality["held_out"]["scored_tokens"] > 0
    for row in quality["files"]:
        assert {"size", "bits_per_weight", "perplexity", "delta_ppl_vs_f16", "tokens_per_s", "greedy_agreement",
                "kl_vs_hf", "top1_agreement_vs_hf"} <= set(row)
        bar, full = recipe.export.gguf.auto, quality["files"][0]
        meets = (row["heldout_top1_vs_hf"] >= bar.min_top1 and row["perplexity"] <= full["perplexity"] * (1 + bar.max_ppl_increase))
        assert row["recommended"] is (row is full or meets)
        assert (row["not_recommended_because"] is None) is row["recommended"]
    # The F16 file holds the merged weights: llama.cpp's perplexity over the scored tokens is the HF model's.
    assert abs(quality["files"][0]["perplexity"] / quality["reference"]["perplexity"] - 1) < 0.01


def test_importance_matrix_and_llama_cpp_measurements_are_recorded(exported):
    from gguf import GGUFReader

    from hubforge import products

    recipe, run_dir, result = exported
    quality = json.loads((run_dir.path / "gguf" / "quality.json").read_text("utf-8"))
    imatrix = quality["imatrix"]
    assert imatrix["tied_output_head"] and imatrix["calibration"]["tokens"] > 256
    assert imatrix["calibration"]["source"].startswith("the training split")
    assert (run_dir.path / imatrix["file"]).name == products.imatrix_name(recipe)
    assert {t.name for t in GGUFReader(run_dir.path / imatrix["file"]).tensors} >= {"token_embd.weight.in_sum2"}
    if run_dir.stage("gguf")["status"] != "done":
        run_dir.mark("gguf", status="done", result=result)
    assert products.imatrix_name(recipe) in [name for name, _ in products.repo_contents(recipe, run_dir)["gguf"]]
    f16, *quants = quality["files"]
    assert f16["llama_cpp"]["mean_kld"] < 1e-4 and f16["llama_cpp"]["same_top"] > 0.999 and not f16["imatrix"]
    for row in quants:
        kl = row["llama_cpp"]
        assert 0 <= kl["same_top"] <= 1 and 0 <= kl["mean_kld"] <= kl["p99_kld"] and kl["ppl"] > 1
        assert row["imatrix"] == (row["type"] != "Q8_0")  # Q8_0's rounding takes no importance data
        assert (row["without_imatrix"] is None) == (row["type"] in ("Q8_0", "AUTO"))
    by_type = {row["type"]: row for row in quants}
    assert by_type["Q2_K"]["llama_cpp"]["mean_kld"] > by_type["Q8_0"]["llama_cpp"]["mean_kld"]
    # the matrix helps where rounding is coarse: at 2 bits the weighted rounding loses less than the plain one
    assert by_type["Q2_K"]["llama_cpp"]["mean_kld"] < by_type["Q2_K"]["without_imatrix"]["mean_kld"]


def test_auto_mixture_is_measured_and_its_types_are_the_ones_in_the_file(exported):
    from gguf import GGUFReader

    recipe, run_dir, result = exported
    quality = json.loads((run_dir.path / "gguf" / "quality.json").read_text("utf-8"))
    auto = quality["auto"]
    assert auto["limits"] == {"disagree": 0.4, "ln_ppl_ratio": round(math.log(1.5), 6)}
    assert auto["meets"], auto  # the Q8_0 reference alone meets so loose a budget
    row = next(r for r in quality["files"] if r["type"] == "AUTO")
    assert row["llama_cpp"]["same_top"] >= 0.6 and row["llama_cpp"]["ln_ppl_ratio"] <= math.log(1.5)
    types = {t.name: t.tensor_type.name for t in GGUFReader(run_dir.path / row["file"]).tensors}
    assert types["token_embd.weight"] == auto["types"]["token_embd"] == row["tensor_types"]["token_embd"]
    assert auto["quantize_args"][0] == "llama-quantize" and "--token-embedding-type" in auto["quantize_args"]
    assert row["size"] <= by_size(quality, "Q8_0")


def by_size(quality: dict, qtype: str) -> int:
    return next(r["size"] for r in quality["files"] if r["type"] == qtype)


def test_chat_template_and_special_ids_travel_inside(exported):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    _, run_dir, result = exported
    tokenizer = AutoTokenizer.from_pretrained(run_dir.path / "merge" / "model")
    reader = GGUFReader(str(run_dir.path / result["files"][0]["file"]))

    def scalar(key):
        field = reader.fields[key]
        return bytes(field.parts[field.data[0]]).decode() if key.endswith("template") else int(field.parts[field.data[0]][0])

    assert scalar("tokenizer.chat_template") == tokenizer.chat_template
    assert scalar("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert scalar("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert result["tokenizer_probe"]["ok"] and result["tokenizer_probe"]["chat_template"]


def gguf_text(reader, key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode()


def test_the_chat_template_inside_every_file_renders_the_hf_prompt_in_llama_cpp_python(exported):
    """Read back with gguf-py and rendered as llama-cpp-python's chat completion renders it (Jinja2ChatFormatter
    with the file's own BOS/EOS text), for 3 conversations incl. a system turn."""
    from gguf import GGUFReader
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    from hubforge import ollama

    _, run_dir, result = exported
    tokenizer = AutoTokenizer.from_pretrained(run_dir.path / "merge" / "model")
    want = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in ollama.PROBE_CONVERSATIONS]
    assert "You are a concise assistant." in want[1] and want[0].startswith(tokenizer.bos_token)
    for row in result["files"]:
        reader = GGUFReader(str(run_dir.path / row["file"]))
        tokens = reader.fields["tokenizer.ggml.tokens"]
        text = {name: bytes(tokens.parts[tokens.data[int(reader.fields[f"tokenizer.ggml.{name}_token_id"].parts[-1][0])]]).decode()
                for name in ("bos", "eos")}
        formatter = Jinja2ChatFormatter(template=gguf_text(reader, "tokenizer.chat_template"), bos_token=text["bos"],
                                        eos_token=text["eos"])
        assert [formatter(messages=list(m)).prompt for m in ollama.PROBE_CONVERSATIONS] == want, row["type"]


def test_the_repo_carries_ollama_files_that_go_renders_as_the_hf_prompt(exported, tmp_path):
    from gguf import GGUFReader
    from ollama_render import go_renderer
    from transformers import AutoTokenizer

    from hubforge import ollama, products

    recipe, run_dir, result = exported
    assert result["ollama"] == {"family": "gemma3", "files": ["gguf/template", "gguf/params"],
                                "stop": ["<start_of_turn>", "<end_of_turn>"]}
    assert json.loads((run_dir.path / "gguf" / "params").read_text("utf-8"))["stop"] == result["ollama"]["stop"]
    tokenizer = AutoTokenizer.from_pretrained(run_dir.path / "merge" / "model")
    # Ollama's tokenizer adds BOS because the file says so; the Go template leaves it out of the text
    field = GGUFReader(str(run_dir.path / result["files"][0]["file"])).fields["tokenizer.ggml.add_bos_token"]
    assert bool(field.parts[-1][0])
    want = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True).removeprefix(tokenizer.bos_token)
            for m in ollama.PROBE_CONVERSATIONS]
    template = (run_dir.path / "gguf" / "template").read_text("utf-8")
    assert go_renderer(tmp_path)(template, [list(m) for m in ollama.PROBE_CONVERSATIONS]) == want
    run_dir.mark("gguf", status="done", result=result)
    repo = dict(products.repo_contents(recipe, run_dir)["gguf"])
    assert repo["template"] == run_dir.path / "gguf" / "template" and repo["params"] == run_dir.path / "gguf" / "params"


def test_a_file_over_split_above_is_published_as_parts_that_load(exported):
    import llama_cpp

    from hubforge import llamacpp, products

    recipe, run_dir, result = exported
    rows = {row["type"]: row for row in result["files"]}
    assert rows["F16"]["size"] > 2e6 and rows["Q4_0"]["size"] < 2e6 and "parts" not in rows["Q4_0"]
    parts = rows["F16"]["parts"]
    assert len(parts) >= 2 and all(p["size"] <= 2e6 for p in parts)
    assert [Path(p["file"]).name for p in parts] == [f"tiny-gguf-F16-{i:05d}-of-{len(parts):05d}.gguf" for i in range(1, len(parts) + 1)]
    run_dir.mark("gguf", status="done", result=result)
    repo = [name for name, _ in products.repo_contents(recipe, run_dir)["gguf"]]
    assert "tiny-gguf-F16.gguf" not in repo and "tiny-gguf-Q4_0.gguf" in repo
    assert [n for n in repo if n.startswith("tiny-gguf-F16-")] == [Path(p["file"]).name for p in parts]
    prompt = [2, 5, 6, 7]
    with closing(llamacpp.load(run_dir.path / rows["F16"]["file"])) as llm:
        want = llamacpp.greedy(llm, prompt, 12, set())[0]
    with closing(llama_cpp.Llama(model_path=str(run_dir.path / parts[0]["file"]), n_ctx=512, verbose=False)) as llm:
        assert llamacpp.greedy(llm, prompt, 12, set())[0] == want


def test_lora_gguf_on_base_reproduces_merged_f16(exported):
    _, run_dir, result = exported
    lora = result["lora_gguf"]
    assert (run_dir.path / lora["file"]).name == "tiny-gguf-LoRA-F16.gguf"
    assert lora["exact_prefix_ok"] and lora["kl_vs_merged"] < 1e-4 and lora["adapter_changes_output"]
    assert lora["kl_base_without_adapter_vs_merged"] > 100 * lora["kl_vs_merged"]
    assert lora["size"] < result["files"][0]["size"] / 5


def test_lora_gguf_that_llama_cpp_scales_differently_is_refused(exported, tmp_path, monkeypatch):
    from hubforge import llamacpp
    from hubforge.pipeline import StageError
    from hubforge.stages import gguf

    recipe, run_dir, _ = exported
    convert = llamacpp.convert_lora

    def wrong_alpha(adapter_dir, base_dir, outfile, outtype="F16"):  # what rsLoRA / alpha_pattern would do unnoticed
        copy = shutil.copytree(adapter_dir, tmp_path / "scaled")
        config = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": config["lora_alpha"] * 2}))
        return convert(copy, base_dir, outfile, outtype)

    monkeypatch.setattr(llamacpp, "convert_lora", wrong_alpha)
    rerun = merged_run(tmp_path / "run", run_dir.path / "merge" / "model", recipe.local_path("data/chat.jsonl"),
                       run_dir.path / "train" / "adapter")
    with pytest.raises(StageError, match="LoRA-F16.gguf on the base f16 GGUF does not compute what the merged"):
        gguf.run(make(recipe.root, quants=[], lora=True), rerun)


def test_probe_stops_a_gguf_with_a_stale_tokenizer_model(exported, tmp_path):
    from hubforge.pipeline import StageError
    from hubforge.stages import gguf

    recipe, run_dir, _ = exported
    model = stale_tokenizer_model(shutil.copytree(run_dir.path / "merge" / "model", tmp_path / "model"))
    broken = merged_run(tmp_path / "run", model, recipe.local_path("data/chat.jsonl"))
    with pytest.raises(StageError, match="tokenizer probe failed.*encodes as"):
        gguf.run(make(recipe.root, quants=[]), broken)


def test_checkpoint_with_only_tokenizer_json_is_refused(exported, tmp_path):
    from hubforge.pipeline import StageError
    from hubforge.stages import gguf

    recipe, run_dir, _ = exported
    model = shutil.copytree(run_dir.path / "merge" / "model", tmp_path / "model")
    (model / "tokenizer.model").unlink()  # the converter then guesses a BPE pre-tokenizer by hash
    with pytest.raises(StageError, match="convert_hf_to_gguf.py failed|tokenizer probe failed"):
        gguf.run(make(recipe.root, quants=[]), merged_run(tmp_path / "run", model, recipe.local_path("data/chat.jsonl")))


def test_f16_that_does_not_reproduce_the_hf_model_is_refused(exported, tmp_path):
    from hubforge.pipeline import StageError
    from hubforge.stages import gguf

    recipe, run_dir, _ = exported
    # HF scales attention by query_pre_attn_scalar; the converter drops it, so llama.cpp computes another function.
    model = set_config(shutil.copytree(run_dir.path / "merge" / "model", tmp_path / "model"), query_pre_attn_scalar=1024)
    with pytest.raises(StageError, match="does not reproduce the merged HF model"):
        gguf.run(make(recipe.root, quants=[]), merged_run(tmp_path / "run", model, recipe.local_path("data/chat.jsonl")))


def test_unsupported_architecture_is_named(project, tmp_path):
    from hubforge.pipeline import StageError
    from hubforge.stages import gguf

    model = tmp_path / "toy"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["HubforgeToyForCausalLM"], "model_type": "toy"}))
    run_dir = merged_run(tmp_path / "run", model, project / "data" / "chat.jsonl")
    with pytest.raises(StageError, match="does not support architecture 'HubforgeToyForCausalLM'"):
        gguf.run(make(project), run_dir)


def test_disk_preflight_refuses_before_converting(exported, tmp_path, monkeypatch):
    from hubforge.pipeline import StageError
    from hubforge.stages import gguf

    recipe, run_dir, _ = exported
    small = merged_run(tmp_path / "run", run_dir.path / "merge" / "model", recipe.local_path("data/chat.jsonl"))
    monkeypatch.setattr(gguf, "free_bytes", lambda folder: 2_000_000)  # the tiny model's 6 files need ~9 MB
    with pytest.raises(StageError, match="not enough disk.*GiB needed"):
        gguf.run(make(recipe.root), small)
    assert not list((small.path / "gguf").glob("*.gguf"))


@pytest.mark.parametrize("kind", ["modules_to_save", "lm_head"])
def test_adapter_that_llama_cpp_would_silently_drop_is_refused(exported, tmp_path, kind):
    from hubforge.pipeline import StageError
    from hubforge.stages import gguf

    recipe, run_dir, _ = exported
    extra = {"modules_to_save": ["embed_tokens"]} if kind == "modules_to_save" else {"target_modules": ["q_proj", "lm_head"]}
    adapter = make_lora_adapter(recipe.local_path("base"), tmp_path / "adapter", **extra)
    assert any(kind in problem for problem in gguf.lora_problems(adapter))
    broken = merged_run(tmp_path / "run", run_dir.path / "merge" / "model", recipe.local_path("data/chat.jsonl"), adapter)
    with pytest.raises(StageError, match=f"export.gguf.lora.*{kind}"):
        gguf.run(make(recipe.root, lora=True), broken)
    assert gguf.lora_problems(run_dir.path / "train" / "adapter") == []  # the plain adapter passes


def test_not_applicable_when_nothing_was_merged_or_gguf_is_off(project, tmp_path):
    from hubforge.rundir import RunDir
    from hubforge.stages import gguf

    run_dir = RunDir.open(tmp_path / "run")
    run_dir.mark("merge", status="not_applicable", result={"status": "not_applicable", "reason": "prompt_tuning learns virtual tokens"})
    assert gguf.run(make(project), run_dir)["status"] == "not_applicable"
    assert gguf.run(make(project, enabled=False), run_dir) == {"status": "not_applicable", "reason": "export.gguf.enabled is false"}


def test_converter_registry_is_read_from_the_pinned_llama_cpp():
    from hubforge import llamacpp

    archs = llamacpp.supported_architectures()
    assert {"Gemma3ForCausalLM", "Gemma2ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM"} <= archs
    assert "HubforgeToyForCausalLM" not in archs


def tied_pair(model_dir: Path, out_dir: Path, prompt: list[int], step: int, sign: int) -> tuple[int, int]:
    """Copy the model with a near-tie planted at generated step `step` of `prompt`: HF's greedy token `a` there gets a
    twin `b` whose embedding row (tied with the output head) rounds to the same float16 row, nudged in float32 by a
    fifth of a float16 ulp towards (+1) or away from (-1) that step's hidden state. HF then decides between them by a
    margin far below gguf.TIE_MARGIN; llama.cpp's F16 file holds two identical rows and sees an exact tie."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and model.config.final_logit_softcapping is None
    with torch.inference_mode():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=step + 1, do_sample=False)[0].tolist()
        hidden = model.model(torch.tensor([ids[:-1]])).last_hidden_state[0, -1]
    a = ids[-1]
    b = max(set(range(300, model.config.vocab_size)) - set(ids))  # an ordinary piece that the text does not contain
    table = model.get_input_embeddings().weight
    with torch.no_grad():
        row16 = table[a].half().float()
        ulp = torch.from_numpy(np.spacing(np.abs(row16.numpy()).astype(np.float16)).astype(np.float32))
        table[a] = row16
        table[b] = row16 + sign * 0.2 * ulp * hidden.sign()
    assert torch.equal(table[a].half(), table[b].half())
    model.save_pretrained(out_dir)  # float32, so the nudge survives until the F16 conversion rounds it away
    shutil.copy(model_dir / "tokenizer.model", out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out_dir)
    return a, b


def test_a_near_tie_parts_greedy_decoding_but_passes_the_f16_gate(exported, tmp_path):
    from transformers import AutoTokenizer
    from hubforge.stages import gguf

    recipe, run_dir, _ = exported
    merged = run_dir.path / "merge" / "model"
    prompt = gguf.prompt_ids(AutoTokenizer.from_pretrained(merged), [{"role": "user", "content": gguf.PROMPTS[0]}])
    parted = []
    for sign in (1, -1):  # HF prefers the twin, then the original; llama.cpp picks the same one of the tied pair both times
        model = tmp_path / f"tied{sign}"
        tied_pair(merged, model, prompt, step=0, sign=sign)
        result = gguf.run(make(recipe.root, quants=[]), merged_run(tmp_path / f"run{sign}", model, recipe.local_path("data/chat.jsonl")))
        f16 = result["files"][0]
        assert f16["decisive_agreement"] == 1.0 and f16["kl_vs_hf"] < gguf.MAX_MEAN_KL
        parted += [d for d in f16["greedy_divergences"] if d["prompt"] == 1 and d["position"] == 0]
    # exactly one of the two files decodes differently from HF at the planted step (the first generated token, which
    # an exact-prefix gate would refuse), and the gate let it through because the margin there is a near-tie
    assert len(parted) == 1 and parted[0]["tie"] and 0 < parted[0]["hf_margin"] < gguf.TIE_MARGIN, parted
