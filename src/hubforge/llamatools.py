"""llama.cpp's command-line tools: importance matrix, quantizer with per-tensor types, KL-divergence and splitting.

    make llama-cpp-tools                          # builds them once per machine (also done on first use)
    python -m hubforge.llamatools build | where

`llama-imatrix`, `llama-quantize`, `llama-perplexity` and `llama-gguf-split` are compiled (CPU, cmake) from the
same llama.cpp source as the converters and the runtime (`llamacpp.converter_dir()`, taken from the pinned
llama-cpp-python sdist), because the binding exposes neither the importance matrix nor per-tensor types. The
build is portable (`-DGGML_NATIVE=OFF`: AVX2, no `-march=native`, which dies with SIGILL on a CPU that
advertises AMX inside a VM that does not enable it) and is cached in a folder named after the llama-cpp-python
version and the cmake flags, so a version or flag change builds afresh. Each tool runs as a subprocess whose
whole output is appended to a log file the caller names (llama.cpp prints hundreds of lines); a failure raises
with the tool's last lines.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hubforge.llamacpp import LLAMA_CPP_PYTHON_VERSION, converter_dir

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-gguf-split")
CMAKE_ARGS = "-DGGML_NATIVE=OFF"
# Static binaries (no libllama.so beside them), only the tools: no tests, examples, server, HTTPS or web UI.
FIXED_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TOOLS=ON",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
              "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DGGML_CCACHE=OFF"]
# llama.cpp's logger writes from a background thread and, in this version, drops whatever it has not written when
# main() returns (llama.cpp issue 22142): on busy cores that loses llama-perplexity's closing summary, the very
# numbers kld() reads (measured: 3 of 6 runs). Every tool calls llama_backend_free() after its last output, so the
# tools are linked with this wrapper around it, which drains the log first. The llama.cpp source stays untouched.
FLUSH_SHIM = """struct common_log;
common_log * common_log_main();
void common_log_flush(common_log * log);
extern "C" void __real_llama_backend_free(void);
extern "C" void __wrap_llama_backend_free(void) { common_log_flush(common_log_main()); __real_llama_backend_free(); }
"""
BUILD_MINUTES = 6  # 11.5 CPU-minutes measured; see the Makefile's llama-cpp-tools


class LlamaToolError(RuntimeError):
    """A tool is missing, cannot be built, or failed; the message names the command and shows its last lines."""


def tools_dir(cmake_args: str = CMAKE_ARGS) -> Path:
    """~/.cache/hubforge/llama.cpp-tools-<llama-cpp-python version><flags>, as the Makefile names it."""
    return Path.home() / ".cache" / "hubforge" / f"llama.cpp-tools-{LLAMA_CPP_PYTHON_VERSION}{cmake_args.replace(' ', '')}"


def bin_dir(build_if_missing: bool = True) -> Path:
    """The folder holding the tools: $HUBFORGE_LLAMA_TOOLS, else the cache folder (built there on first use)."""
    if os.environ.get("HUBFORGE_LLAMA_TOOLS"):
        folder = Path(os.environ["HUBFORGE_LLAMA_TOOLS"]).expanduser()
        if missing := [t for t in TOOLS if not (folder / t).is_file()]:
            raise LlamaToolError(f"HUBFORGE_LLAMA_TOOLS={folder} lacks {', '.join(missing)}; unset it to use "
                                 f"(and build) {tools_dir() / 'bin'}, or run `make llama-cpp-tools`")
        return folder
    folder = tools_dir() / "bin"
    if all((folder / t).is_file() for t in TOOLS):
        return folder
    if not build_if_missing:
        raise LlamaToolError(f"llama.cpp's tools are not built in {folder}; run `make llama-cpp-tools`")
    print(f"hubforge: building llama.cpp's tools ({', '.join(TOOLS)}) once into {folder} (about {BUILD_MINUTES} "
          f"minutes on 2 cores; `make llama-cpp-tools` does it ahead of time)", file=sys.stderr, flush=True)
    return build()


def build(cmake_args: str = CMAKE_ARGS, jobs: int | None = None) -> Path:
    """Compile the tools into tools_dir(cmake_args)/bin (idempotent; a lock keeps two processes from racing)."""
    cmake, cxx = shutil.which("cmake"), next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)
    if not cmake or not cxx:
        raise LlamaToolError(f"building llama.cpp's tools needs {'cmake' if not cmake else 'a C++ compiler'}: "
                             "install them with `apt-get install cmake g++` (Debian/Ubuntu) and retry")
    root = tools_dir(cmake_args)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((root / "bin" / t).is_file() for t in TOOLS):
            return root / "bin"
        log, build_dir, shim = root / "build.log", root / "build", root / "flush_log.cpp"
        shim.write_text(FLUSH_SHIM)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        link = f"-DCMAKE_EXE_LINKER_FLAGS=-Wl,--wrap=llama_backend_free {shim.with_suffix('.o')}"
        steps = [[cxx, "-O2", "-c", str(shim), "-o", str(shim.with_suffix(".o"))],
                 [cmake, "-S", str(converter_dir().absolute()), "-B", str(build_dir), *generator, *FIXED_ARGS, link,
                  *cmake_args.split()],
                 [cmake, "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 2), "--target", *TOOLS]]
        for step in steps:
            _run(step, log, what="building llama.cpp's tools")
        staging = Path(tempfile.mkdtemp(dir=root))
        staging.chmod(0o755)  # mkdtemp makes it private
        for tool in TOOLS:
            shutil.copy2(build_dir / "bin" / tool, staging / tool)
        shutil.rmtree(root / "bin", ignore_errors=True)
        staging.rename(root / "bin")  # all four appear at once: a half-copied folder never counts as built
        shutil.rmtree(build_dir, ignore_errors=True)  # ~100 MB of objects nobody reuses
    return root / "bin"


def _run(cmd: list, log: Path, what: str) -> tuple[float, str]:
    """Run `cmd`, append its output to `log`; returns (seconds, output) or raises with its last lines."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True, errors="replace")
    seconds = time.time() - started
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(map(str, cmd))}\n{proc.stdout}\n[exit {proc.returncode} after {seconds:.1f} s]\n\n")
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise LlamaToolError(f"{what} failed (exit {proc.returncode}; full log: {log}):\n{tail}")
    return seconds, proc.stdout


def tool(name: str) -> Path:
    return bin_dir() / name


def _threads(threads: int | None) -> str:
    return str(threads or os.cpu_count() or 2)


def imatrix(f16_gguf: Path, text_file: Path, out: Path, *, log: Path, ctx: int = 512, chunks: int | None = None,
            threads: int | None = None, process_output: bool = False) -> float:
    """Importance matrix (GGUF format) of `f16_gguf` over `text_file`, special tokens parsed (chat markers stay
    control tokens); `chunks` caps the token budget at chunks * ctx; `process_output` also records `output.weight`
    (see hubforge.gguf_imatrix for tied heads). Returns seconds."""
    cmd = [tool("llama-imatrix"), "-m", f16_gguf, "-f", text_file, "-o", out, "-c", ctx, "-t", _threads(threads),
           "--parse-special", "--no-ppl"] + (["--process-output"] if process_output else [])
    seconds, _ = _run(cmd + (["--chunks", chunks] if chunks else []), log, f"llama-imatrix on {Path(text_file).name}")
    if not Path(out).is_file():
        raise LlamaToolError(f"llama-imatrix wrote no {out} (is {text_file} at least {2 * ctx} tokens long?); log: {log}")
    return seconds


def quantize_args(qtype: str, imatrix: Path | None = None, tensor_types: dict[str, str] | None = None,
                  token_embedding_type: str | None = None, output_tensor_type: str | None = None) -> list[str]:
    """llama-quantize's options before the file names, as a user would type them to reproduce a file."""
    args = ["--imatrix", str(imatrix)] if imatrix else []
    for pattern, ttype in (tensor_types or {}).items():  # llama.cpp applies the first pattern that matches
        args += ["--tensor-type", f"{pattern}={ttype.lower()}"]
    if token_embedding_type:
        args += ["--token-embedding-type", token_embedding_type.lower()]
    if output_tensor_type:
        args += ["--output-tensor-type", output_tensor_type.lower()]
    return args


def quantize(src: Path, dst: Path, qtype: str, *, log: Path, imatrix: Path | None = None,
             tensor_types: dict[str, str] | None = None, token_embedding_type: str | None = None,
             output_tensor_type: str | None = None, threads: int | None = None, report: dict | None = None) -> float:
    """`src` (F16/BF16/F32 GGUF) -> `dst` as `qtype` (Q4_K_M, ...), optionally with an importance matrix and
    per-tensor types ({regex on tensor names: type}, e.g. {"attn_v": "Q8_0", r"blk\\.0\\.": "Q8_0"}). Returns seconds;
    `report`, when given, receives {"fallbacks": fallbacks(output)}."""
    cmd = [tool("llama-quantize"), *quantize_args(qtype, imatrix, tensor_types, token_embedding_type, output_tensor_type),
           src, dst, qtype, _threads(threads)]
    seconds, text = _run(cmd, log, f"llama-quantize {Path(src).name} -> {qtype}")
    if report is not None:
        report["fallbacks"] = fallbacks(text)
    return seconds


FALLBACK = re.compile(r"ncols\s+(\d+) not divisible by (\d+) \(required for type\s+(\w+)\) -> falling back to\s+(\w+)")


def fallbacks(text: str) -> list[dict]:
    """llama-quantize's "ncols 640 not divisible by 256 (required for type q6_K) -> falling back to q8_0" warnings,
    counted per (columns, block, wanted, used): the tensors whose rows cannot hold the type asked for."""
    counts: dict[tuple, int] = {}
    for found in FALLBACK.finditer(text):
        key = (int(found[1]), int(found[2]), found[3].upper(), found[4].upper())
        counts[key] = counts.get(key, 0) + 1
    return [{"columns": c, "block": b, "wanted": w, "used": u, "tensors": n} for (c, b, w, u), n in sorted(counts.items())]


def kld_base(f16_gguf: Path, text_file: Path, out_logits: Path, *, log: Path, ctx: int = 512,
             threads: int | None = None) -> dict:
    """Save the reference model's log-probabilities over `text_file` for kld(); returns {ppl, seconds}.
    llama-perplexity scores the second half of each `ctx`-token chunk and needs at least 2 * ctx tokens; the
    file holds ~vocab * 2 bytes per scored token (0.5 MB for a 262k vocabulary)."""
    cmd = [tool("llama-perplexity"), "-m", f16_gguf, "-f", text_file, "-c", ctx, "-b", ctx, "-t", _threads(threads),
           "--kl-divergence-base", out_logits]
    seconds, text = _run(cmd, log, f"llama-perplexity (KL base) on {Path(f16_gguf).name}")
    ppl = re.search(r"Final estimate: PPL = ([\d.]+)", text)
    if not ppl or not Path(out_logits).is_file():
        raise LlamaToolError(f"llama-perplexity measured nothing on {text_file} (at least {2 * ctx} tokens are "
                             f"needed):\n" + "\n".join(text.strip().splitlines()[-5:]))
    return {"ppl": float(ppl.group(1)), "seconds": seconds}


KLD_FIELDS = {"ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)", "ppl_base": r"Mean PPL\(base\)\s*:\s*([\d.]+)",
              "ln_ppl_ratio": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*(-?[\d.]+)",
              "mean_kld": r"Mean\s+KLD:\s*(-?[\d.]+)", "p99_kld": r"99\.0%\s+KLD:\s*(-?[\d.]+)",
              "max_kld": r"Maximum KLD:\s*(-?[\d.]+)", "same_top": r"Same top p:\s*([\d.]+)"}


def parse_kld(text: str) -> dict:
    """llama-perplexity --kl-divergence's summary -> {ppl, ppl_base, ln_ppl_ratio, mean_kld, p99_kld, max_kld,
    same_top} (same_top as a fraction 0..1)."""
    out = {}
    for key, pattern in KLD_FIELDS.items():
        if not (found := re.search(pattern, text)):
            raise LlamaToolError(f"llama-perplexity's output has no {key} ({pattern!r}):\n"
                                 + "\n".join(text.strip().splitlines()[-8:]))
        out[key] = float(found.group(1))
    out["same_top"] /= 100
    return out


def kld(quant_gguf: Path, base_logits: Path, *, log: Path, ctx: int = 512, threads: int | None = None) -> dict:
    """KL divergence of `quant_gguf` from the reference saved by kld_base() on the same tokens: parse_kld's dict
    plus seconds."""
    cmd = [tool("llama-perplexity"), "-m", quant_gguf, "-c", ctx, "-b", ctx, "-t", _threads(threads),
           "--kl-divergence-base", base_logits, "--kl-divergence"]
    seconds, text = _run(cmd, log, f"llama-perplexity --kl-divergence on {Path(quant_gguf).name}")
    return parse_kld(text) | {"seconds": seconds}


def split(gguf: Path, max_size: str, *, log: Path) -> list[Path]:
    """Split `gguf` into `<stem>-0000N-of-0000M.gguf` files of at most `max_size` (e.g. "2G", "500M") beside it;
    returns them in order (llama.cpp loads the set from the first). The original file is left in place."""
    gguf = Path(gguf)
    prefix = gguf.with_suffix("")
    _run([tool("llama-gguf-split"), "--split", "--split-max-size", max_size, gguf, prefix], log,
         f"llama-gguf-split {gguf.name}")
    return sorted(gguf.parent.glob(f"{prefix.name}-*-of-*.gguf"))


def size_bytes(size: str) -> int:
    """llama-gguf-split's size ("500M", "48G") in bytes; it reads M and G as decimal units."""
    if not re.fullmatch(r"[1-9][0-9]*[MG]", size):
        raise LlamaToolError(f"split size {size!r}: write a whole number of megabytes or gigabytes, e.g. 500M or 48G")
    return int(size[:-1]) * 1000 ** {"M": 2, "G": 3}[size[-1]]


def split_if_larger(gguf: Path, max_size: str | None, *, log: Path) -> list[Path]:
    """split() when `gguf` is larger than `max_size`, else [] (also for None); parts a former run left beside it
    are removed first, so the set returned is this file's."""
    gguf = Path(gguf)
    digits = "[0-9]" * 5
    for stale in gguf.parent.glob(f"{gguf.stem}-{digits}-of-{digits}.gguf"):
        stale.unlink()
    if max_size is None or gguf.stat().st_size <= size_bytes(max_size):
        return []
    return split(gguf, max_size, log=log)


def main(argv: list[str]) -> None:
    if argv[:1] == ["build"]:
        print(build(*argv[1:2]))
    elif argv[:1] == ["where"]:
        print(bin_dir(build_if_missing=False))
    else:
        raise SystemExit("usage: python -m hubforge.llamatools build [CMAKE_ARGS] | where")


if __name__ == "__main__":
    main(sys.argv[1:])
