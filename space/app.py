"""hubforge Space: chat with a fine-tuned model, served from its GGUF (llama-cpp-python) or its merged weights (transformers).

Configured by environment variables, which `hubforge space deploy` sets as Space variables:
    BACKEND         gguf (default) | transformers
    GGUF_REPO       GGUF model repo, with GGUF_FILE the file in it    (or GGUF_PATH: a local .gguf file)
    MODEL_REPO      merged model repo for the transformers backend      (or MODEL_PATH: a local checkpoint folder)
    ADAPTER_REPO    linked from the page only
    SYSTEM_PROMPT, EXAMPLES (JSON list of strings), TITLE, RTL (1 = right-to-left chat), N_CTX (context window, 2048)

    GGUF_PATH=model.gguf RTL=1 python app.py        # then open http://127.0.0.1:7860
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the app must start offline

import gradio as gr  # noqa: E402
from huggingface_hub import hf_hub_download, snapshot_download  # noqa: E402

NOTICE = "> ⚠️ "
TEMPLATE_TOKENS_PER_MESSAGE = 8  # room for the turn markers a chat template wraps around each message
TEMPLATE_TOKENS_FIXED = 16  # BOS and the generation prompt
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")


@dataclass(frozen=True)
class Settings:
    backend: str = "gguf"
    gguf_repo: str = ""
    gguf_file: str = ""
    gguf_path: str = ""
    model_repo: str = ""
    model_path: str = ""
    system_prompt: str = ""
    examples: tuple[str, ...] = ()
    title: str = "hubforge demo"
    rtl: bool = False
    n_ctx: int = 2048
    links: dict = field(default_factory=dict)  # {"Model" | "Adapter" | "GGUF": URL of the repo}

    @classmethod
    def from_env(cls, env) -> "Settings":
        backend = env.get("BACKEND", "gguf").strip().lower() or "gguf"
        if backend not in ("gguf", "transformers"):
            raise SystemExit(f"BACKEND must be 'gguf' or 'transformers', not {backend!r}")
        examples = json.loads(env.get("EXAMPLES") or "[]")
        if not isinstance(examples, list) or not all(isinstance(e, str) for e in examples):
            raise SystemExit("EXAMPLES must be a JSON list of strings")
        endpoint = env.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        repos = {"Model": env.get("MODEL_REPO", ""), "Adapter": env.get("ADAPTER_REPO", ""), "GGUF": env.get("GGUF_REPO", "")}
        return cls(
            backend=backend, gguf_repo=repos["GGUF"], gguf_file=env.get("GGUF_FILE", ""), gguf_path=env.get("GGUF_PATH", ""),
            model_repo=repos["Model"], model_path=env.get("MODEL_PATH", ""),
            system_prompt=env.get("SYSTEM_PROMPT", ""), examples=tuple(e for e in examples if e.strip()),
            title=env.get("TITLE") or "hubforge demo", rtl=env.get("RTL", "0").strip().lower() in ("1", "true", "yes"),
            n_ctx=int(env.get("N_CTX") or 2048),
            links={k: f"{endpoint}/{v}" for k, v in repos.items() if v},
        )


def model_location(s: Settings) -> str:
    """A local path to the weights: the given one, or downloaded from the Hub (HF_ENDPOINT and the cache are honoured)."""
    if s.backend == "gguf":
        if s.gguf_path:
            return s.gguf_path
        if not (s.gguf_repo and s.gguf_file):
            raise SystemExit("the gguf backend needs GGUF_PATH, or GGUF_REPO and GGUF_FILE")
        return hf_hub_download(s.gguf_repo, s.gguf_file)
    if s.model_path:
        return s.model_path
    if not s.model_repo:
        raise SystemExit("the transformers backend needs MODEL_PATH or MODEL_REPO")
    return snapshot_download(s.model_repo)


class LlamaBackend:
    def __init__(self, path: str, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=os.cpu_count(), verbose=False)
        self.n_ctx = self.llm.n_ctx()

    def tokens(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="ignore")

    def stream(self, messages, temperature, top_p, max_new_tokens):
        # The chat template stored inside the GGUF formats the conversation.
        self.generated = 0
        for chunk in self.llm.create_chat_completion(messages, stream=True, temperature=temperature, top_p=top_p,
                                                     max_tokens=max_new_tokens):
            delta = chunk["choices"][0]["delta"]
            self.generated += "content" in delta  # one chunk per sampled token (text of split characters comes later)
            yield delta.get("content") or ""


class TransformersBackend:
    def __init__(self, path: str, n_ctx: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # fp32: fastest on CPU
        self.n_ctx = min(n_ctx, getattr(self.model.config, "max_position_embeddings", n_ctx))
        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
        vocab = self.tokenizer.get_vocab()
        self.eos = eos + [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and vocab[t] not in eos]

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self, messages, temperature, top_p, max_new_tokens):
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop, failure = threading.Event(), []

        class Stop(StoppingCriteria):  # ends generation when the user stops or leaves
            def __call__(self, *args, **kwargs):
                return stop.is_set()

        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        kwargs = dict(inputs, streamer=streamer, max_new_tokens=max_new_tokens, eos_token_id=self.eos,
                      stopping_criteria=StoppingCriteriaList([Stop()]), **sampling)

        def generate():
            try:
                self.generated = 0
                out = self.model.generate(**kwargs)
                self.generated = out.shape[1] - inputs["input_ids"].shape[1]
            except Exception as exc:  # surfaced to the chat below, after the streamer is released
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            stop.set()
            worker.join()
        if failure:
            raise failure[0]


class Model:
    """The backend, loaded in a background thread so the page is up while the weights load."""

    def __init__(self, s: Settings, path: str):
        self.settings, self.path = s, path
        self.backend, self.error, self.started = None, None, time.time()
        self.loaded, self.lock = threading.Event(), threading.Lock()

    def load(self) -> None:
        try:
            cls = LlamaBackend if self.settings.backend == "gguf" else TransformersBackend
            self.backend = cls(self.path, self.settings.n_ctx)
            print(f"model loaded ({self.settings.backend}) from {self.path} in {time.time() - self.started:.1f}s", flush=True)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            self.loaded.set()

    def stream(self, messages, temperature, top_p, max_new_tokens):
        """Reply pieces from a generation that runs in its own thread, one at a time, under a lock.

        Gradio advances a streaming callback on worker threads and, when a browser leaves mid-reply, frees the queue
        slot while the abandoned step may still run; the lock keeps a second generation off the model meanwhile
        (llama.cpp aborts the process on concurrent use), and `stop` ends the orphaned one at its next token.
        """
        pieces, stop = queue.Queue(), threading.Event()

        def work():
            with self.lock:
                try:
                    for piece in self.backend.stream(messages, temperature, top_p, max_new_tokens):
                        if stop.is_set():
                            break
                        pieces.put(piece)
                except Exception as exc:
                    pieces.put(exc)
                finally:
                    pieces.put(None)

        threading.Thread(target=work, daemon=True).start()
        try:
            while (item := pieces.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()

    def status(self) -> dict:
        """Whether the model is ready (for clients and health checks)."""
        return {"ready": self.backend is not None, "error": self.error, "backend": self.settings.backend,
                "n_ctx": self.backend.n_ctx if self.backend else None,
                "last_reply_tokens": getattr(self.backend, "generated", None)}


def strip_notices(text: str) -> str:
    """An assistant turn without the notices this app put in front of it (they are not part of the conversation)."""
    lines = text.split("\n")
    while lines and (lines[0].startswith(NOTICE) or (not lines[0].strip() and len(lines) > 1 and lines[1].startswith(NOTICE))):
        lines.pop(0)
    return "\n".join(lines).lstrip("\n")


def conversation(system: str, history: list, message: str) -> list[dict]:
    turns = [{"role": m["role"], "content": strip_notices(m["content"]) if m["role"] == "assistant" else m["content"]}
             for m in history if m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
             and not (m.get("metadata") or {}).get("title")]
    return ([{"role": "system", "content": system}] if system.strip() else []) + turns + [{"role": "user", "content": message}]


def fit_to_context(messages: list[dict], tokens, detokenize, budget: int) -> tuple[list[dict], list[str]]:
    """Drop the oldest turns, then cut the new message, until the prompt fits `budget` tokens; say what was done."""
    cost = lambda m: len(tokens(m["content"])) + TEMPLATE_TOKENS_PER_MESSAGE  # noqa: E731
    budget -= TEMPLATE_TOKENS_FIXED
    system = [m for m in messages[:1] if m["role"] == "system"]
    history, last = messages[len(system):-1], dict(messages[-1])
    notices, dropped = [], 0
    while history and sum(map(cost, system + history + [last])) > budget:
        history, dropped = history[2:], dropped + 1  # a user turn and its reply, so roles keep alternating
    if dropped:
        notices.append(f"{dropped} earlier exchange(s) were left out to fit the model's context window.")
    room = max(budget - sum(map(cost, system + history)) - TEMPLATE_TOKENS_PER_MESSAGE, 1)
    ids = tokens(last["content"])
    if len(ids) > room:
        keep = room
        while len(tokens(cut := detokenize(ids[:keep]))) > room and keep > 1:  # decoding + encoding can merge differently
            keep -= max(1, len(tokens(cut)) - room)
        last["content"] = cut
        notices.append(f"Your message was {len(ids)} tokens long; only its first {keep} tokens were used, to fit the context window.")
    return system + history + [last], notices


def respond(model: Model, message, history, system_prompt, temperature, top_p, max_new_tokens):
    """ChatInterface callback: streams the reply as it grows; problems are said in the chat, never as a stack trace."""
    text = (message.get("text", "") if isinstance(message, dict) else message or "").strip()
    if not text:
        yield "Please type a message first — an empty message has nothing for the model to answer."
        return
    if model.backend is None:
        yield (f"The model failed to load ({model.error}); the Space needs a restart." if model.error else
               f"The model is still loading ({time.time() - model.started:.0f} s so far); please send your message again in a moment.")
        return
    backend = model.backend
    max_new = max(1, min(int(max_new_tokens), backend.n_ctx // 2))
    messages, notices = fit_to_context(conversation(system_prompt or "", history or [], text), backend.tokens,
                                       backend.detokenize, backend.n_ctx - max_new)
    head = "".join(f"{NOTICE}{n}\n" for n in notices) + ("\n" if notices else "")
    reply = ""
    try:
        for piece in model.stream(messages, float(temperature), float(top_p), max_new):
            if piece:
                reply += piece
                yield head + reply
    except Exception as exc:
        traceback.print_exc()
        yield head + reply + f"\n\n{NOTICE}Generation failed ({type(exc).__name__}). Try a shorter message or other settings."
        return
    if not reply.strip():
        yield head + f"{NOTICE}The model returned an empty reply; try again or raise the temperature."


def header(s: Settings) -> str:
    links = " · ".join(f"[{name}]({url})" for name, url in s.links.items())
    return f"# {s.title}\n" + (links and f"{links}\n")


# Chatbot and Textbox take rtl=True; the examples do not, so CSS turns it (added only when RTL=1).
RTL_CSS = "#examples, #examples .gallery, #examples .gallery-item { direction: rtl; text-align: right; }"


def build_ui(s: Settings, model: Model) -> gr.Blocks:
    controls = [
        gr.Textbox(value=s.system_prompt, label="System prompt", lines=2, rtl=s.rtl, render=False),
        gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)", render=False),
        gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p", render=False),
        gr.Slider(16, 1024, value=256, step=16, label="Max new tokens", render=False),
    ]

    def chat(message, history, system_prompt, temperature, top_p, max_new_tokens):
        yield from respond(model, message, history, system_prompt, temperature, top_p, max_new_tokens)

    textbox = gr.Textbox(rtl=s.rtl, placeholder="پیام خود را بنویسید…" if s.rtl else "Type a message…",
                         show_label=False, submit_btn=True, stop_btn=True, elem_id="msgbox", render=False)
    with gr.Blocks(title=s.title, analytics_enabled=False, fill_height=True) as demo:
        gr.Markdown(header(s), rtl=s.rtl)
        gr.ChatInterface(
            fn=chat, chatbot=gr.Chatbot(rtl=s.rtl, label=s.title, scale=1), textbox=textbox,
            additional_inputs=controls, additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False), api_name="chat",
        )
        if s.examples:  # prompts only: ChatInterface's own examples would be a table of every setting
            gr.Examples([[e] for e in s.examples], inputs=[textbox], label="Examples", elem_id="examples")
        gr.api(model.status, api_name="status", queue=False)
    return demo


def main() -> None:
    s = Settings.from_env(os.environ)
    path = model_location(s)  # before the server starts: a missing repo or file stops the Space with a clear log
    model = Model(s, path)
    threading.Thread(target=model.load, daemon=True).start()
    demo = build_ui(s, model)
    demo.queue(default_concurrency_limit=1).launch(  # one generation at a time: the model is not thread-safe
        prevent_thread_lock=True, ssr_mode=False, show_error=False, css=RTL_CSS if s.rtl else None)
    model.loaded.wait()
    if model.error:  # a Space without a model is broken: exit so the Hub reports the error with this log
        print(f"model failed to load: {model.error}", file=sys.stderr, flush=True)
        demo.close()
        sys.exit(1)
    demo.block_thread()


if __name__ == "__main__":
    main()
