"""The Router's text side: a request's prompt -> token ids (chat messages through the
tokenizer's chat template), and token ids -> the text deltas a stream sends (`TextStream`).
Prompts are tokenized and completions detokenized as `deer-serve generate` does."""

from __future__ import annotations

from typing import Sequence

from deployments.schemas import GenerationRequest, RequestError


def prompt_ids(tokenizer, req: GenerationRequest) -> list[int]:
    """The request's prompt as token ids (`parse_request` made sure it has a prompt or
    messages)."""
    if req.messages is not None:
        return tokenizer.encode(render_chat(tokenizer, req), add_special_tokens=False)
    if isinstance(req.prompt, str):
        return tokenizer.encode(req.prompt, add_special_tokens=False)
    return list(req.prompt or ())


def render_chat(tokenizer, req: GenerationRequest) -> str:
    msgs = [{"role": m.role, "content": m.text} for m in req.messages or ()]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001  the template refused these messages (jinja2's
            # raise_exception, e.g. roles that do not alternate): the client's mistake
            raise RequestError(f"the model's chat template rejected the messages: {e}",
                               param="messages") from None
    # no template (e.g. a base code model): a plain transcript ending in the assistant's turn
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"


class TextStream:
    """Token ids -> text deltas. Holds back an incomplete UTF-8 character and any tail that may
    begin a stop string, so the streamed text always concatenates to the final text."""

    def __init__(self, decode, stops: Sequence[str]):
        self.decode, self.stops = decode, tuple(stops)
        self.ids: list[int] = []
        self.sent = 0

    def full_text(self) -> str:
        text = self.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[:min(cuts)] if cuts else text

    def push(self, ids: Sequence[int], final: bool) -> str:
        self.ids.extend(ids)
        text = self.full_text()
        if not final:
            text = text.rstrip("\ufffd")
            hold = max((n for s in self.stops for n in range(1, len(s))
                        if text.endswith(s[:n])), default=0)
            text = text[:len(text) - hold]
        delta = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return delta
