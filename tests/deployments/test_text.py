"""The Router's text side without Ray: chat rendering and its errors."""

import pytest

from tiny_models import build_tokenizer

from deployments.app import Limits
from deployments.schemas import RequestError, parse_request
from deployments.text import prompt_ids, render_chat

# a template that refuses two user turns in a row, as many chat models' templates do
STRICT = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]"
          "['role'] %}{{ raise_exception('roles must alternate') }}{% endif %}"
          "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat(*msgs):
    return parse_request({"messages": [{"role": r, "content": c} for r, c in msgs]}, kind="chat", limits=Limits(),
                         served_model="target")


def test_a_template_that_rejects_the_messages_is_a_400_not_a_500():
    tok = build_tokenizer()
    tok.chat_template = STRICT
    ok = chat(("user", "hi"), ("assistant", "yo"), ("user", "more"))
    assert render_chat(tok, ok) == "<|user|>hi\n<|assistant|>yo\n<|user|>more\n<|assistant|>"
    assert prompt_ids(tok, ok) == tok.encode(render_chat(tok, ok), add_special_tokens=False)
    with pytest.raises(RequestError) as e:
        prompt_ids(tok, chat(("user", "hi"), ("user", "again")))
    assert e.value.status == 400 and e.value.param == "messages"
    assert "roles must alternate" in e.value.message
    assert e.value.body()["error"]["type"] == "invalid_request_error"
