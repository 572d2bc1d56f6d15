"""The chat layout a run trained on, as the GGUF's ``tokenizer.chat_template`` and as an Ollama ``Modelfile``.

Training renders a conversation with :mod:`minicpm_data.render`: the layout's text, then the tokenizer, which adds
``<s>`` for MiniCPM-1/2/3/4. Runtimes format a chat with the template in the GGUF and then tokenize without adding
``<s>`` (llama-cpp-python) or add it and drop a leading one the template wrote (llama.cpp's own chat code). So the
template written is the run's template with ``{{ bos_token }}`` in front when the tokenizer is one that adds
``<s>``: both runtimes then see exactly the ids training saw. The ``minicpm2`` layout is MiniCPM-2B's own template.

Ollama formats prompts with a Go template of its own (``TEMPLATE`` in the Modelfile) and adds ``<s>`` as the GGUF
says; its templates have no ``strip``, so the ``minicpm2`` layout's contents are not stripped there.
"""

from __future__ import annotations

from minicpm_data.render import AI_MARKER, IM_END, IM_START, MINICPM_CHATML_TEMPLATE, USER_MARKER, detect_template

# MiniCPM-2B-sft's own chat template, which the minicpm2 layout renders.
MINICPM2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{'" + USER_MARKER
    + "' + message['content'].strip() + '" + AI_MARKER + "'}}{% else %}{{message['content'].strip()}}{% endif %}"
    "{% endfor %}"
)
_OLLAMA_TEMPLATES = {
    "chatml": ("{{- range .Messages }}" + IM_START + "{{ .Role }}\n{{ .Content }}" + IM_END + "\n{{ end }}"
               + IM_START + "assistant\n"),
    "minicpm2": ('{{- range .Messages }}{{- if eq .Role "user" }}' + USER_MARKER + "{{ .Content }}" + AI_MARKER
                 + "{{- else }}{{ .Content }}{{- end }}{{- end }}"),
}


def trained_layout(tokenizer, options: dict) -> str:
    """``chatml`` or ``minicpm2``: the run's ``--template``, else what the tokenizer's template is."""
    return options.get("template") or detect_template(tokenizer)


def gguf_chat_template(tokenizer, layout: str, tokenizer_adds_bos: bool) -> str:
    """The Jinja template for ``tokenizer.chat_template`` (module docstring)."""
    if layout == "minicpm2":
        template = MINICPM2_TEMPLATE
    else:
        template = tokenizer.chat_template or MINICPM_CHATML_TEMPLATE
        if isinstance(template, dict):
            template = template.get("default", MINICPM_CHATML_TEMPLATE)
    if tokenizer_adds_bos and "bos_token" not in template:
        template = "{{ bos_token }}" + template
    return template


def modelfile(tokenizer, layout: str, tokenizer_adds_bos: bool, *, model: str, adapter: str | None = None) -> str:
    """An Ollama Modelfile: FROM the model (and ADAPTER the LoRA), the layout as TEMPLATE, its stop tokens."""
    template = _OLLAMA_TEMPLATES[layout]
    if not tokenizer_adds_bos and tokenizer.bos_token and "bos_token" in str(tokenizer.chat_template or ""):
        template = tokenizer.bos_token + template  # MiniCPM5: the template writes <s>, the tokenizer does not
    stops = [IM_END] if layout == "chatml" else []
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines = [f"FROM {model}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f'TEMPLATE """{template}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"
