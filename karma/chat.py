"""Chat-templated text → turns, and the (context, response) a KARMA reward model scores.

RL trainers hand the reward model the policy's text as the policy saw it: rendered with the policy's chat
template and decoded with its special tokens (OpenRLHF decodes `prompt + response` with
`skip_special_tokens=False`). Scored as is, the markup (`<|im_start|>user\\n…<|im_end|>`) is text the
reward model reads. This module takes the markup off again:

    conversation("<|im_start|>user\\nWhy?<|im_end|>\\n<|im_start|>assistant\\nBecause.<|im_end|>")
    → Conversation(context=[{"role": "user", "content": "Why?"}], response="Because.", template="chatml")

Templates read (and auto-detected, in this order, by their turn markers):

* `chatml` (SmolLM2, Qwen, …): `<|im_start|>ROLE\\n…<|im_end|>`
* `llama3` (Llama 3.x): `<|start_header_id|>ROLE<|end_header_id|>\\n\\n…<|eot_id|>`
* `gemma` (Gemma 1–3): `<start_of_turn>ROLE\\n…<end_of_turn>` (role `model` is the assistant)
* `mistral` (Mistral, Llama 2): `<s>[INST] user [/INST] assistant</s>`, system turns as
  `[SYSTEM_PROMPT]…[/SYSTEM_PROMPT]` or Llama 2's `<<SYS>>…<</SYS>>`

The reward model's context is the earlier turns' contents (user, assistant, tool — root first); **system
turns are dropped** (they instruct the policy, they are not part of the thread the RM was trained on). The
response is the last assistant turn's content, without its end-of-turn token or anything after it. Text in
none of these templates is left as it is, except well-known BOS/EOS tokens at its very start or end. A
template may also be named, or taken from a tokenizer folder (`chat_format_from_tokenizer`), instead of
detected; `"none"` turns all of this off.

Pure Python (no tokenizer is loaded): the service runs it on every request.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: a minimal ChatML template, saved into every reward-model folder that has none (see RewardModel.save), so
#: tokenizer-level integrations (vLLM pooling, verl's reward-model path) can render conversations for it;
#: `conversation` reads what it renders back into (context, response).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: what a template setting may say besides a format name or a tokenizer folder
AUTO, NONE = "auto", "none"

#: BOS/EOS spellings stripped from the edges of text that is in no known template
_EDGE_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>",
    "<bos>", "<eos>", "<end_of_turn>", "<s>", "</s>",
)  # fmt: skip


@dataclass(frozen=True)
class ChatTurn:
    """One turn. `role` is None for text before the first turn header (e.g. a response part that starts
    mid-turn); `closed` says whether its end-of-turn token was there (a cut-off generation has none)."""

    role: str | None
    content: str
    closed: bool = True


@dataclass(frozen=True)
class Conversation:
    """What the reward model scores: `context` (turns root first, or the prompt text) and `response`."""

    context: str | list[dict[str, str]]
    response: str
    template: str | None = None  # the template whose markup was read off; None: no markup found
    prompt_matched: bool = True  # the text started with its prompt (only meaningful when a prompt was given)


@dataclass(frozen=True)
class ChatFormat:
    """A chat template family: how to find its turns, and the special tokens to strip from contents."""

    name: str
    markers: tuple[str, ...]  # any of these in a text means it is in this format (auto-detection)
    special_tokens: tuple[str, ...]
    splitter: Callable[[ChatFormat, str], list[ChatTurn]]

    def split(self, text: str) -> list[ChatTurn]:
        return self.splitter(self, text)

    def strip(self, text: str) -> str:
        """`text` without any of this format's special tokens."""
        for tok in sorted(self.special_tokens, key=len, reverse=True):
            text = text.replace(tok, "")
        return text

    def with_tokens(self, tokens: Iterable[str]) -> ChatFormat:
        extra = tuple(t for t in tokens if t and t not in self.special_tokens)
        return ChatFormat(self.name, self.markers, self.special_tokens + extra, self.splitter)


# --------------------------------------------------------------------------------------------- splitting
def _finish(fmt: ChatFormat, role: str | None, body: str, ends: tuple[str, ...]) -> ChatTurn:
    """A turn from the text after its header: content up to the first end token (if any), specials off."""
    cut = [i for i in (body.find(e) for e in ends) if i >= 0]
    closed = bool(cut)
    if cut:
        body = body[: min(cut)]
    if role is not None:
        role = role.strip().lower()
        role = {"model": "assistant", "ipython": "tool"}.get(role, role)
    return ChatTurn(role, fmt.strip(body).strip(), closed)


def _headed(start: str, header_end: str, ends: tuple[str, ...]):
    """Splitter for formats whose turns open with `start ROLE header_end` (ChatML, Llama 3, Gemma)."""

    def split(fmt: ChatFormat, text: str) -> list[ChatTurn]:
        head, *segments = text.split(start)
        turns = []
        if fmt.strip(head).strip():
            turns.append(_finish(fmt, None, head, ends))
        for seg in segments:
            role, sep, body = seg.partition(header_end)
            if not sep:  # cut off inside the header
                role, body = seg, ""
            turns.append(_finish(fmt, role, body, ends))
        return turns

    return split


_MISTRAL_TAGS = re.compile(r"(\[INST\]|\[/INST\]|\[SYSTEM_PROMPT\]|\[/SYSTEM_PROMPT\]|</s>)")


def _llama2_system(body: str) -> tuple[int, int] | None:
    """(start, end) of the first `<<SYS>>…<</SYS>>` in `body` (two `find`s: linear, where a lazy regex rescans
    the text from every `<<SYS>>` that has no closing tag)."""
    start = body.find("<<SYS>>")
    end = body.find("<</SYS>>", start + 7) if start >= 0 else -1
    return (start, end + 8) if end >= 0 else None


def _split_mistral(fmt: ChatFormat, text: str) -> list[ChatTurn]:
    """`[INST] user [/INST] assistant</s>` turns; `[SYSTEM_PROMPT]…[/SYSTEM_PROMPT]` and Llama 2's
    `<<SYS>>…<</SYS>>` (inside the first [INST]) are system turns."""
    turns: list[ChatTurn] = []
    role: str | None = None  # None: outside any turn
    buf: list[str] = []

    def flush(closed: bool) -> None:
        body = "".join(buf)
        buf.clear()
        if role == "user":
            found = _llama2_system(body)
            if found:
                start, end = found
                turns.append(ChatTurn("system", fmt.strip(body[start + 7 : end - 8]).strip()))
                body = body[:start] + body[end:]
        content = fmt.strip(body).strip()
        if role is not None or content:
            turns.append(ChatTurn(role, content, closed))

    for part in _MISTRAL_TAGS.split(text):
        if part == "[INST]":
            if role is not None or "".join(buf).strip():
                flush(closed=False)
            role = "user"
        elif part == "[/INST]":
            flush(closed=True)
            role = "assistant"
        elif part == "[SYSTEM_PROMPT]":
            if role is not None or "".join(buf).strip():
                flush(closed=False)
            role = "system"
        elif part in ("[/SYSTEM_PROMPT]", "</s>"):
            flush(closed=True)
            role = None
        else:
            buf.append(part)
    if role is not None or "".join(buf).strip():
        flush(closed=False)
    return turns


_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
_LLAMA3_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>",
)  # fmt: skip
_GEMMA_TOKENS = ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>")
_MISTRAL_TOKENS = (
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "<<SYS>>",
    "<</SYS>>",
)

FORMATS: dict[str, ChatFormat] = {
    f.name: f
    for f in (
        ChatFormat(
            "chatml",
            ("<|im_start|>",),
            _CHATML_TOKENS,
            _headed("<|im_start|>", "\n", ("<|im_end|>", "<|endoftext|>")),
        ),
        ChatFormat(
            "llama3",
            ("<|start_header_id|>",),
            _LLAMA3_TOKENS,
            _headed(
                "<|start_header_id|>", "<|end_header_id|>", ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
            ),
        ),
        ChatFormat(
            "gemma",
            ("<start_of_turn>",),
            _GEMMA_TOKENS,
            _headed("<start_of_turn>", "\n", ("<end_of_turn>", "<eos>")),
        ),
        ChatFormat("mistral", ("[INST]", "[/INST]"), _MISTRAL_TOKENS, _split_mistral),
    )
}
TEMPLATE_NAMES: tuple[str, ...] = tuple(FORMATS)


def detect(text: str | None) -> ChatFormat | None:
    """The first format whose turn markers occur in `text`, or None."""
    if not text:
        return None
    for fmt in FORMATS.values():
        if any(m in text for m in fmt.markers):
            return fmt
    return None


def split_turns(text: str, template: str | ChatFormat = AUTO) -> list[ChatTurn]:
    """The turns of `text` (see `ChatTurn`); [] when it is in no template (or `template` is "none")."""
    fmt = _format(template, text)
    return fmt.split(text) if fmt is not None else []


def strip_special_tokens(text: str, template: str | ChatFormat = AUTO) -> str:
    """`text` without the special tokens of its template (detected, or as named); in no template: without
    well-known BOS/EOS tokens at its start and end."""
    fmt = _format(template, text)
    return fmt.strip(text) if fmt is not None else _strip_edges(text)


# --------------------------------------------------------------------------------------------- templates
def resolve(template: str | ChatFormat) -> ChatFormat | str:
    """A setting → a ChatFormat, or "auto" / "none". A string that is not a name is a tokenizer folder."""
    if isinstance(template, ChatFormat) or template in (AUTO, NONE):
        return template
    if template in FORMATS:
        return FORMATS[template]
    return chat_format_from_tokenizer(template)


def check_template(template: str) -> str:
    """Validate a template setting (raises ValueError naming the problem); a folder is returned resolved."""
    if template in (AUTO, NONE) or template in FORMATS:
        return template
    path = Path(template).expanduser()
    chat_format_from_tokenizer(str(path))
    return str(path.resolve())


def _format(template: str | ChatFormat, text: str | None, *more: str | None) -> ChatFormat | None:
    fmt = resolve(template)
    if fmt == NONE:
        return None
    if fmt == AUTO:
        for t in (text, *more):
            found = detect(t)
            if found is not None:
                return found
        return None
    return fmt  # type: ignore[return-value]


@functools.lru_cache(maxsize=64)
def chat_format_from_tokenizer(path: str) -> ChatFormat:
    """The format of a tokenizer folder's chat template (`tokenizer_config.json` `chat_template`, or
    `chat_template.jinja`), with that tokenizer's special tokens also stripped. Raises ValueError when the
    folder has no chat template or one in none of the known families."""
    folder = Path(path).expanduser()
    cfg_file = folder / "tokenizer_config.json"
    if not cfg_file.is_file():
        raise ValueError(
            f"chat template {path!r}: not a template name ({', '.join(TEMPLATE_NAMES)}, auto, "
            "none) nor a tokenizer folder (no tokenizer_config.json)"
        )
    cfg = json.loads(cfg_file.read_text())
    template = cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if not template:
        raise ValueError(f"tokenizer {path}: it has no chat template")
    fmt = detect(template)
    if fmt is None:
        raise ValueError(
            f"tokenizer {path}: its chat template is none of {', '.join(TEMPLATE_NAMES)}; name one instead"
        )
    return fmt.with_tokens(_tokenizer_special_tokens(folder, cfg))


def _tokenizer_special_tokens(folder: Path, cfg: Mapping[str, Any]) -> list[str]:
    def text(tok: Any) -> str | None:
        return tok.get("content") if isinstance(tok, Mapping) else tok if isinstance(tok, str) else None

    out = [text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")]
    out += [text(t) for t in (cfg.get("added_tokens_decoder") or {}).values() if t.get("special")]
    tok_file = folder / "tokenizer.json"
    if tok_file.is_file():
        try:
            added = json.loads(tok_file.read_text()).get("added_tokens") or []
        except ValueError:
            added = []
        out += [t.get("content") for t in added if t.get("special")]
    return sorted({t for t in out if t and len(t) > 2 and not t.isalnum()})  # never a plain word


# --------------------------------------------------------------------------------------------- scoring view
def _run_of(tokens: Iterable[str]) -> re.Pattern[str]:
    """A run of `tokens` and whitespace at the start of a text (one pass, linear)."""
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return re.compile(rf"(?:\s*(?:{alternatives}))*\s*")


_LEADING_EDGES = _run_of(_EDGE_TOKENS)
_TRAILING_EDGES = _run_of(t[::-1] for t in _EDGE_TOKENS)  # matched at the start of the reversed text


def _strip_edges(text: str) -> str:
    """`text` without well-known BOS/EOS tokens at its start and end (unchanged if it has none). Linear in
    the text, however many tokens it starts or ends with."""
    start = _LEADING_EDGES.match(text).end()
    end = len(text) - _TRAILING_EDGES.match(text[::-1]).end()
    s = text[start:end] if start < end else ""
    return text if s == text.strip() else s


def split_prefix(query: str, prompt: str | None) -> tuple[str, str, bool]:
    """(prompt, response, matched): the response is the query minus its prompt prefix (OpenRLHF's queries
    are prompt + response). A query that does not start with its prompt is returned whole as the response,
    `matched=False`."""
    if not prompt:
        return "", query, True
    if query.startswith(prompt):
        return prompt, query[len(prompt) :], True
    stripped = prompt.rstrip()  # decoding can differ in whitespace at the seam
    if stripped and query.startswith(stripped):
        return prompt, query[len(stripped) :], True
    return prompt, query, False


def context_turns(turns: Iterable[ChatTurn]) -> list[dict[str, str]]:
    """The reward model's context from turns: non-system turns with content, root first."""
    return [
        {"role": t.role or "user", "content": t.content} for t in turns if t.role != "system" and t.content
    ]


def _last_reply(turns: list[ChatTurn]) -> int:
    """Index of the last assistant turn (else the last turn)."""
    for i in range(len(turns) - 1, -1, -1):
        if turns[i].role == "assistant":
            return i
    return len(turns) - 1


def prompt_context(prompt: str, template: str | ChatFormat = AUTO) -> str | list[dict[str, str]]:
    """A prompt as context: its turns (system dropped) when it is chat-templated, else the text."""
    fmt = _format(template, prompt)
    if fmt is None:
        return prompt if resolve(template) == NONE else _strip_edges(prompt)
    return context_turns(fmt.split(prompt))


def response_text(text: str, template: str | ChatFormat = AUTO) -> str:
    """A generated response as the reward model scores it: the last assistant turn's content if `text` has
    turn headers, else `text` up to its end-of-turn token; special tokens stripped."""
    fmt = _format(template, text)
    if fmt is None:
        return text if resolve(template) == NONE else _strip_edges(text)
    turns = fmt.split(text)
    headed = [t for t in turns if t.role is not None]
    if headed:
        return headed[_last_reply(headed)].content
    return turns[0].content if turns else ""


def conversation(text: str, prompt: str | None = None, template: str | ChatFormat = AUTO) -> Conversation:
    """(context, response) of a decoded, possibly chat-templated text.

    With `prompt` (OpenRLHF's `prompts`) and a text that starts with it: the context is the prompt's turns
    and the response is the rest, cleaned (`response_text`). Otherwise the text is split at its last
    assistant turn: earlier turns are the context. Plain text (no template found, or `template="none"`) is
    split by the prompt only, as before: context = the prompt, response = the rest.
    """
    head, tail, matched = split_prefix(text, prompt)
    fmt = _format(template, text, prompt)
    if fmt is None:
        if resolve(template) == NONE:
            return Conversation(head, tail, None, matched)
        return Conversation(_strip_edges(head), _strip_edges(tail), None, matched)
    found = fmt.name if any(tok in text for tok in fmt.special_tokens) else None  # markup was read off
    if prompt and matched:
        return Conversation(prompt_context(head, fmt), response_text(tail, fmt), found, True)
    turns = fmt.split(text)
    if not turns:
        return Conversation([], "", found, matched)
    k = _last_reply(turns)
    return Conversation(context_turns(turns[:k]), turns[k].content, found, matched)
