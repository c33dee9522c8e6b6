"""`gill-hf serve`: a Gradio chat over any `GillPipeline` (GILL-tiny by default, offline).

    gill-hf serve [--pipeline FOLDER] [--port 7860] [--host 127.0.0.1] [--queue-size 4]

Type text, attach images, ask for pictures: the whole conversation (earlier images included, shown
or generated) is the prompt, rendered through the LM's chat template with image items exactly as
dialogue training examples are (`processing_gill.render_chat`). Each answer image is labelled
generated or retrieved, with the decision probabilities and the retrieval scores. Settings: steps,
guidance, seed, `image_source`, `force_image`.

The app is a thin layer over the public pipeline: `conversation_messages` turns the chat history into
messages (a tested function), `GillChat.respond` calls the pipeline once per turn. Requests are
answered one at a time in arrival order; past `queue_size` waiting requests a request is answered
at once with a "busy" message. Gradio is an optional dependency (`pip install gill-hf[serve]`),
imported only here; the app runs with analytics off, no share link and no external assets.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
from pathlib import Path

import PIL.Image

MAX_MESSAGE_CHARS = 2000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
BUSY_MESSAGE = "The model is busy with other requests; please try again in a moment."
_SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: nothing is fetched


def _file_path(content) -> str | None:
    """The file path a chat message holds (a Gradio file dict or component value), if any."""
    if isinstance(content, dict):
        return content.get("path") or (content.get("file") or {}).get("path")
    if isinstance(content, (list, tuple)) and content and isinstance(content[0], str) and os.path.isfile(content[0]):
        return content[0]
    return None


def conversation_messages(history: list[dict], text: str = "", files: list[str] = ()) -> list[dict]:
    """A Gradio chat history (messages whose content is text or a file) plus a new user turn (text and
    image files) -> chat messages with text and image items (`render_chat`'s input). Consecutive
    messages of one role merge into one turn; an assistant's shown images stay in the context."""
    messages: list[dict] = []

    def add(role: str, item: dict) -> None:
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].append(item)
        else:
            messages.append({"role": role, "content": [item]})

    for message in history:
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            continue
        path = _file_path(content)
        if path is not None:
            add(role, {"type": "image", "image": PIL.Image.open(path).convert("RGB")})
        elif isinstance(content, str) and content.strip() and not (message.get("metadata") or {}).get("title"):
            add(role, {"type": "text", "text": content})
    for path in files:
        add("user", {"type": "image", "image": PIL.Image.open(path).convert("RGB")})
    if text.strip():
        add("user", {"type": "text", "text": text})
    return messages


class _FifoGate:
    """One request at a time, in arrival order; `None` from `enter` when too many are waiting."""

    def __init__(self, max_waiting: int):
        self.max_waiting, self.condition = max_waiting, threading.Condition()
        self.next_ticket = self.serving = 0

    def enter(self) -> int | None:
        with self.condition:
            if self.next_ticket - self.serving > self.max_waiting:  # one running + max_waiting queued
                return None
            ticket, self.next_ticket = self.next_ticket, self.next_ticket + 1
            self.condition.wait_for(lambda: self.serving == ticket)
            return ticket

    def leave(self) -> None:
        with self.condition:
            self.serving += 1
            self.condition.notify_all()


class GillChat:
    """The chat's behaviour, independent of Gradio's widgets: one pipeline call per turn."""

    def __init__(self, pipe, max_new_tokens: int = 32, queue_size: int = 4, image_dir: str | os.PathLike | None = None):
        self.pipe, self.max_new_tokens = pipe, max_new_tokens
        self.gate = _FifoGate(queue_size)
        self.image_dir = Path(image_dir or tempfile.mkdtemp(prefix="gill-serve-"))
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.answered: list[str] = []  # the user texts answered, in order (tests read it)

    def respond(self, message: dict | None, history: list[dict], steps: int = 25, guidance: float = 4.0, seed: int = 0,
                image_source: str = "auto", force_image: bool = False) -> list[dict]:
        """The new messages of one turn (the user's, then the assistant's); bad input gets a message."""
        text = (message or {}).get("text") or ""
        files = list((message or {}).get("files") or [])
        shown = [{"role": "user", "content": {"path": path}} for path in files] + ([{"role": "user", "content": text}] if text else [])
        problem = self._check(text, files)
        if problem:
            return shown + [{"role": "assistant", "content": problem}]
        ticket = self.gate.enter()
        if ticket is None:
            return shown + [{"role": "assistant", "content": BUSY_MESSAGE}]
        try:
            return shown + self._answer(conversation_messages(history, text, files), steps, guidance, seed, image_source, force_image)
        except ValueError as error:  # a prompt the pipeline refuses (too long for the LM, ...): say why
            return shown + [{"role": "assistant", "content": f"I cannot answer that: {error}"}]
        finally:
            self.answered.append(text)
            self.gate.leave()

    @staticmethod
    def _check(text: str, files: list[str]) -> str | None:
        if not text.strip() and not files:
            return "Please type a message or attach an image."
        if len(text) > MAX_MESSAGE_CHARS:
            return f"That message is {len(text):,} characters long; please keep it under {MAX_MESSAGE_CHARS:,}."
        for path in files:
            if not path.lower().endswith(IMAGE_SUFFIXES):
                return f"{os.path.basename(path)} is not a supported image ({', '.join(IMAGE_SUFFIXES)})."
            try:
                with PIL.Image.open(path) as image:
                    image.verify()
            except Exception:
                return f"{os.path.basename(path)} could not be read as an image."
        return None

    def call_pipeline(self, messages: list[dict], steps: int, guidance: float, seed: int, image_source: str, force_image: bool):
        """The one pipeline call of a turn (what the browser test repeats directly)."""
        import torch

        from .processing_gill import render_chat

        processor = self.pipe.processor
        prompt, images = render_chat(messages, processor.tokenizer, processor.chat_template, add_generation_prompt=True)
        if image_source == "retrieved" and self.pipe.retrieval_index is None:
            image_source = "auto"
        return self.pipe(prompt=prompt, prompt_images=images, max_new_tokens=self.max_new_tokens, force_image=force_image,
                         image_source=image_source, num_inference_steps=int(steps), guidance_scale=float(guidance),
                         generator=torch.Generator().manual_seed(int(seed)), truncation=True)

    def _answer(self, messages, steps, guidance, seed, image_source, force_image) -> list[dict]:
        out = self.call_pipeline(messages, steps, guidance, seed, image_source, force_image)
        replies, pieces = [], out.text[0].split("<image>")
        for k, piece in enumerate(pieces):
            if piece.strip():
                replies.append({"role": "assistant", "content": piece.strip()})
            if k < len(pieces) - 1 and k < len(out.images[0]):
                path = self.image_dir / f"answer-{len(os.listdir(self.image_dir))}.png"
                display_image(out.images[0][k]).save(path)
                replies.append({"role": "assistant", "content": {"path": str(path)}})
                # a note (never part of the next prompt): the source as its title, how it was chosen inside
                source, _, details = image_label(out, k).partition(" | ")
                replies.append({"role": "assistant", "content": details or source, "metadata": {"title": f"{source} image"}})
        return replies or [{"role": "assistant", "content": "(no answer)"}]


def display_image(image: PIL.Image.Image, size: int = 256) -> PIL.Image.Image:
    """Small images (the world's are 32 px) shown enlarged by a whole factor, pixels kept (nearest)."""
    factor = max(1, size // max(image.size))
    return image.resize((image.width * factor, image.height * factor), PIL.Image.NEAREST) if factor > 1 else image


def image_label(out, k: int) -> str:
    """How answer image `k` was chosen: its source, the decision probabilities, the retrieval scores."""
    parts = [out.image_sources[0][k]]
    if out.decision_probs is not None and len(out.decision_probs[0]) > k:
        generate, retrieve = out.decision_probs[0][k].tolist()
        parts.append(f"decision: generate {generate:.2f} / retrieve {retrieve:.2f}")
    if out.retrieval_scores is not None and len(out.retrieval_scores[0]) > k:
        parts.append("top retrieval cosine: " + ", ".join(f"{s:.2f}" for s in out.retrieval_scores[0][k].tolist()[:3]))
    return " | ".join(parts)


def example_files(folder: Path) -> list[dict]:
    """Example messages showing each capability, with world images written to `folder`."""
    from .world.data import sample_example
    from .world.render import render_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(2):
        path = folder / f"example-{i}.png"
        render_scene(sample_example(60_000, "validation", i, num_objects=1)[0]).resize((128, 128), PIL.Image.NEAREST).save(path)
        paths.append(str(path))
    return [
        {"text": "Draw a small red circle in the top left corner.", "files": []},
        {"text": "What is in this picture?", "files": [paths[0]]},
        {"text": "The same shape, but green.", "files": [paths[1]]},
        {"text": "A large blue square sits in the center. Then it turns yellow.", "files": []},
        {"text": "Show me a picture of a large purple triangle in the bottom left corner.", "files": []},
    ]


def build_app(chat: GillChat, title: str = "GILL-tiny"):
    """The Gradio Blocks app over `chat`."""
    import gradio as gr

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}: interleaved images and text in; text, generated and retrieved images out")
        chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="gill-chat")
        box = gr.MultimodalTextbox(file_types=list(IMAGE_SUFFIXES), placeholder="Type a message, attach images...", label="Message",
                                   elem_id="gill-input", max_plain_text_length=MAX_MESSAGE_CHARS * 4)
        with gr.Accordion("Settings", open=False, elem_id="gill-settings"):
            steps = gr.Slider(1, 100, value=chat.pipe.config.default_num_inference_steps, step=1, label="Diffusion steps")
            guidance = gr.Slider(1.0, 15.0, value=chat.pipe.config.default_guidance_scale, step=0.5, label="Guidance scale")
            seed = gr.Number(value=0, precision=0, label="Seed")
            image_source = gr.Radio(["auto", "generated", "retrieved"], value="auto", label="Image source")
            force_image = gr.Checkbox(value=False, label="Always answer with an image (force_image)", elem_id="gill-force-image")
        gr.Examples(examples=example_files(chat.image_dir / "examples"), inputs=[box])

        def submit(message, history, *settings, progress=gr.Progress()):
            progress(0.1, desc="GILL is answering")
            return history + chat.respond(message, history, *settings), gr.MultimodalTextbox(value=None)

        box.submit(submit, [box, chatbot, steps, guidance, seed, image_source, force_image], [chatbot, box],
                   concurrency_limit=None)
    return app


def launch(chat: GillChat, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True):
    """Serves the app locally: no share link, no analytics, no external fonts."""
    import gradio as gr

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    app = build_app(chat)
    app.queue(max_size=None)  # the chat's own gate orders requests and answers "busy" past its bound
    theme = gr.themes.Default(font=_SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=not block,
               theme=theme, allowed_paths=[str(chat.image_dir)], footer_links=[])
    return app


def run_serve(namespace: argparse.Namespace) -> None:
    from .world.gill_tiny import load_gill_tiny_pipeline

    if namespace.pipeline:
        from .pipelines import GillPipeline

        pipe = GillPipeline.from_pretrained(namespace.pipeline)
    else:
        pipe = load_gill_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    launch(GillChat(pipe, max_new_tokens=namespace.max_new_tokens, queue_size=namespace.queue_size),
           host=namespace.host, port=namespace.port)


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="A Gradio chat over a GillPipeline (GILL-tiny by default), offline.")
    parser.add_argument("--pipeline", default=None, help="A saved GillPipeline folder (default: GILL-tiny).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--queue-size", type=int, default=4, help="Requests that may wait; past this, a busy message.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.set_defaults(func=run_serve)


__all__ = ["GillChat", "build_app", "conversation_messages", "display_image", "image_label", "launch", "register"]
