"""minicpm-train chat: one-shot --prompt and the interactive loop (through a pseudo-terminal), rendered
with render_prompt and streamed."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from minicpm_data.conversation import Conversation, Message
from minicpm_data.errors import MinicpmError


CLI = [sys.executable, "-m", "minicpm_train.cli", "chat"]
GREEDY = ["--temperature", "0", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    from minicpm_train.inference import load_model

    return load_model(tiny_llama, device="cpu")


def test_session_renders_history_like_training(loaded, monkeypatch):
    """Every turn's prompt is render_prompt over the whole history, and the answer is what streamed."""
    from minicpm_data.render import render_prompt
    from minicpm_train import chat

    seen: list[list[int]] = []
    def spy(conversation, tokenizer, template=None):
        ids = render_prompt(conversation, tokenizer, template=template)
        seen.append(ids)
        return ids

    monkeypatch.setattr("minicpm_data.render.render_prompt", spy)
    session = chat.ChatSession(loaded.model, loaded.tokenizer, system="be brief",
                               settings=chat.GenerationSettings(max_new_tokens=6, temperature=0))
    streamed: list[str] = []
    first = session.ask("hello", on_text=streamed.append)
    assert "".join(streamed).strip() == first
    session.ask("and again")
    assert [m.role for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    expected = render_prompt(Conversation([Message("system", "be brief"), Message("user", "hello"),
                                           Message("assistant", first), Message("user", "and again")]),
                             loaded.tokenizer)
    assert seen[-1] == expected
    session.reset()
    assert [m.role for m in session.messages] == ["system"]


def test_generation_settings_are_checked():
    from minicpm_train.chat import GenerationSettings

    with pytest.raises(MinicpmError, match="--top_p must be in"):
        GenerationSettings(top_p=0).check()
    assert GenerationSettings(temperature=0).generate_kwargs()["do_sample"] is False


def test_one_shot_prompt(tiny_llama, loaded):
    from minicpm_train.chat import GenerationSettings, generate_reply

    done = subprocess.run(CLI + [str(tiny_llama), "--prompt", "hello there", "--system", "be brief", *GREEDY],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = generate_reply(loaded.model, loaded.tokenizer,
                              Conversation([Message("system", "be brief"), Message("user", "hello there")]),
                              GenerationSettings(max_new_tokens=6, temperature=0))
    assert done.stdout.strip() == expected


def test_flags_take_both_spellings(tiny_llama, monkeypatch, capsys):
    from train_helpers import run_cli

    answers = []
    for flags in (["--max-new-tokens", "4", "--top-p", "0.5", "--trust-remote-code"],
                  ["--max_new_tokens", "4", "--top_p", "0.5", "--trust_remote_code"]):
        code, out, err = run_cli(monkeypatch, capsys, "chat", str(tiny_llama), "--prompt", "hi", "--temperature", "0",
                                 *flags)
        assert code == 0, err
        answers.append(out)
    assert answers[0] == answers[1]


def _read_until(fd: int, marker: str, timeout: float = 90) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {marker!r} in output: {seen!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            seen += chunk.decode("utf-8", "replace")
    return seen


def test_interactive_loop_in_a_terminal(tiny_llama):
    master, slave = pty.openpty()
    process = subprocess.Popen(CLI + [str(tiny_llama), *GREEDY], stdin=slave, stdout=slave, stderr=slave,
                               env={**os.environ, "TERM": "dumb"}, close_fds=True)
    os.close(slave)
    try:
        assert "/exit" in _read_until(master, "you>")
        os.write(master, b"hello\n")
        assert "assistant>" in _read_until(master, "you>")
        os.write(master, b"/reset\n")
        assert "new conversation" in _read_until(master, "you>")
        os.write(master, b"/exit\n")
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
