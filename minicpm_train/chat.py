"""A chat session over a loaded model: prompts rendered exactly as training rendered them, output streamed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from minicpm_data.conversation import Conversation, Message
from minicpm_data.errors import MinicpmError


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings; temperature 0 means greedy decoding."""

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise MinicpmError(f"--max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise MinicpmError(f"--temperature must be 0 (greedy) or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MinicpmError(f"--top_p must be in (0, 1], not {self.top_p}")

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens}


def _streamer(tokenizer, on_text: Callable[[str], None]):
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate_reply(model, tokenizer, conversation: Conversation, settings: GenerationSettings, *,
                   template: str | None = None, on_text: Callable[[str], None] | None = None) -> str:
    """The assistant's next message for ``conversation`` (ending with a user turn), streamed to ``on_text``."""
    import torch

    from minicpm_data.render import render_prompt
    from minicpm_data.tokenizer import pad_token_id
    from minicpm_train.inference import stop_token_ids

    prompt = render_prompt(conversation, tokenizer, template=template)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt], device=device)
    pad = pad_token_id(tokenizer)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=pad,
                                streamer=_streamer(tokenizer, on_text) if on_text else None,
                                **settings.generate_kwargs())
    return tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True).strip()


class ChatSession:
    """A multi-turn conversation with an optional system message; ``reset`` starts over."""

    def __init__(self, model, tokenizer, *, system: str | None = None, template: str | None = None,
                 settings: GenerationSettings = GenerationSettings()):
        settings.check()
        self.model, self.tokenizer, self.template, self.settings = model, tokenizer, template, settings
        self.system = system
        self.messages: list[Message] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [Message("system", self.system)] if self.system else []

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add the user's message, generate (streaming) and keep the answer in the history."""
        self.messages.append(Message("user", text))
        try:
            answer = generate_reply(self.model, self.tokenizer, Conversation(list(self.messages)), self.settings,
                                    template=self.template, on_text=on_text)
        except BaseException:
            self.messages.pop()  # an interrupted turn leaves no half-answered question behind
            raise
        self.messages.append(Message("assistant", answer))
        return answer
