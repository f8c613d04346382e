"""Training chat templates: the model's own template with ``{% generation %}`` markers.

``tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)`` marks the tokens a
template renders between ``{% generation %}`` and ``{% endgeneration %}`` (the mechanism behind
TRL's ``assistant_only_loss``). Released templates (Qwen2.5, SmolLM2, Llama, Mistral) carry no
such markers. TRL keeps a hand-written training twin per known template
(``trl/chat_templates/*_training.jinja``); its Qwen2.5 twin also trains the ``\\n`` after
``<|im_start|>assistant`` (part of the generation prompt, never generated) and the ``\\n`` after
``<|im_end|>`` (never generated: decoding stops at ``<|im_end|>``). We derive the twin from the
template text instead, for any template that emits an assistant turn as one output expression
``... + <content> + <end-of-turn token> + ...``, and mark exactly what the model generates:
the content and the end-of-turn token.

The output statement ``{{ A + message['content'] + '<|im_end|>' + B }}`` becomes::

    {{ A }}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}
    {% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ B }}

(one line in the template; whitespace-control dashes stay on the outermost tags), which renders
the same bytes for every message. :func:`training_chat_template` checks that on a probe
conversation, and the tokenizer of each example checks it again on the example itself
(:func:`evolve.train.data.tokenize_example`). A template that already has markers is used as it is.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from evolve.errors import ConfigError

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_OUTPUT = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.S)
# ``message['content']``, ``message["content"]`` or ``message.content``, optionally with filters.
_CONTENT = re.compile(r"^([A-Za-z_]\w*)\s*(?:\[\s*(['\"])content\2\s*\]|\.content)(\s*\|\s*\w+)*$")

# A conversation covering every role the policy layout uses: system, user, assistant, several turns.
PROBE = [
    {"role": "system", "content": "System instructions."},
    {"role": "user", "content": "Task: open the door.\n\nObservation: a closed door."},
    {"role": "assistant", "content": '{"thought": "open it", "command": "open door"}'},
    {"role": "user", "content": "The door is open."},
    {"role": "assistant", "content": "go east"},
]


class ChatTemplateError(ConfigError):
    """The tokenizer has no chat template, or no training template can be derived from it."""


def model_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def chat_template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template text (the ``default`` one of named variants); one-line error if none."""
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default")
    if not tpl:
        raise ChatTemplateError(
            f"tokenizer of {model_name(tokenizer)!r} has no chat template; set tokenizer.chat_template "
            "(training renders examples through the model's chat template)"
        )
    return str(tpl)


def has_generation_markers(template: str) -> bool:
    return _GENERATION.search(template) is not None


def _split_plus(expr: str) -> list[str]:
    """Split a Jinja expression on its top-level ``+`` (outside strings and brackets)."""
    terms, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "+" and depth == 0:
            terms.append(expr[start:i].strip())
            start = i + 1
        i += 1
    terms.append(expr[start:].strip())
    return terms


def _literal(term: str) -> str | None:
    """The value of a string-literal term (``'<|im_end|>\\n'``), None for anything else."""
    if len(term) < 2 or term[0] not in "'\"" or term[-1] != term[0]:
        return None
    try:
        value = ast.literal_eval(term)
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, str) else None


def _end_of_turn(term: str, tokenizer: Any) -> tuple[str, str] | None:
    """``(end-of-turn term, rest of the literal)`` when ``term`` starts with a special token."""
    if term in ("eos_token", "eot_token"):
        return term, ""
    value = _literal(term)
    if not value:
        return None
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    added |= {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    hits = [t for t in added if t and value.startswith(t)]
    if not hits:
        return None
    tok = max(hits, key=len)
    return json.dumps(tok, ensure_ascii=False), value[len(tok) :]


def _rewrite_statement(match: re.Match[str], tokenizer: Any) -> str | None:
    left, expr, right = match.group(1), match.group(2), match.group(3)
    terms = _split_plus(expr)
    for i, term in enumerate(terms[:-1]):
        m = _CONTENT.match(term)
        if not m or m.group(1) == "messages":
            continue
        eot = _end_of_turn(terms[i + 1], tokenizer)
        if eot is None:
            continue
        var, (eot_term, rest) = m.group(1), eot
        prefix = terms[:i]
        suffix = ([json.dumps(rest, ensure_ascii=False)] if rest else []) + terms[i + 2 :]
        body = f"{term} + {eot_term}"
        parts: list[str] = []
        if prefix:
            parts.append("{{" + left + " " + " + ".join(prefix) + " }}")
            left = ""
        end_dash = "" if suffix else right
        parts.append(
            f"{{%{left} if {var}['role'] == 'assistant' %}}{{% generation %}}{{{{ {body} }}}}"
            f"{{% endgeneration %}}{{% else %}}{{{{ {body} }}}}{{% endif {end_dash}%}}"
        )
        if suffix:
            parts.append("{{ " + " + ".join(suffix) + " " + right + "}}")
        return "".join(parts)
    return None


def derive_training_template(template: str, tokenizer: Any) -> str | None:
    """``template`` with ``{% generation %}`` around each assistant turn's content + end-of-turn token.

    None when no output statement of the form ``... + <message content> + <end-of-turn token> ...``
    exists. Only the rewriting; :func:`training_chat_template` verifies the result.
    """
    out, pos, changed = [], 0, False
    for m in _OUTPUT.finditer(template):
        new = _rewrite_statement(m, tokenizer)
        if new is None:
            continue
        out += [template[pos : m.start()], new]
        pos, changed = m.end(), True
    if not changed:
        return None
    out.append(template[pos:])
    return "".join(out)


def end_of_turn_token(tokenizer: Any, template: str) -> str:
    """The end-of-turn token that closes an assistant turn in ``template`` (rendered on the probe)."""
    text = tokenizer.apply_chat_template(PROBE, tokenize=False, chat_template=template)
    after = text.split(PROBE[-1]["content"], 1)[1]
    added = sorted(
        (t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.content),
        key=len,
        reverse=True,
    )
    for tok in added:
        if after.startswith(tok):
            return tok
    raise ChatTemplateError(
        f"chat template of {model_name(tokenizer)!r}: an assistant turn is not closed by a special token"
    )


def assistant_runs(mask: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` spans of consecutive 1s of an assistant-token mask."""
    runs, start = [], None
    for i, v in enumerate([*mask, 0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    return runs


def check_training_template(
    tokenizer: Any, original: str, training: str, messages: list[dict[str, Any]]
) -> tuple[list[int], list[int]]:
    """Raise unless ``training`` renders ``messages`` byte-identically to ``original`` and marks one
    span per assistant message; returns ``(input_ids, assistant-token mask)``."""
    name = model_name(tokenizer)
    a = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=original)
    b = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=training)
    if a != b:
        raise ChatTemplateError(
            f"training chat template of {name!r} does not render the same text as its chat template"
        )
    enc = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        chat_template=training,
    )
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    n = sum(1 for m in messages if m["role"] == "assistant")
    if len(assistant_runs(mask)) != n:
        raise ChatTemplateError(
            f"training chat template of {name!r} marks {len(assistant_runs(mask))} assistant spans for {n} "
            "assistant messages"
        )
    return ids, mask


_CACHE: dict[tuple[str, str], str] = {}


def training_chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat template with ``{% generation %}`` around assistant content + end-of-turn token.

    Verified on a probe conversation: byte-identical rendering, one marked span per assistant
    message, each span decoding to exactly the message content followed by the end-of-turn token.
    One-line :class:`ChatTemplateError` naming the model when the tokenizer has no template or no
    training template can be derived. Cached per template text.
    """
    original = chat_template_of(tokenizer)
    key = (model_name(tokenizer), original)
    if key in _CACHE:
        return _CACHE[key]
    name = model_name(tokenizer)
    if has_generation_markers(original):
        training = original
    else:
        derived = derive_training_template(original, tokenizer)
        if derived is None:
            raise ChatTemplateError(
                f"cannot derive a training chat template for {name!r}: no output expression "
                "'<message content> + <end-of-turn token>' in its chat template; give it a template with "
                "{% generation %} markers"
            )
        training = derived
    ids, mask = check_training_template(tokenizer, original, training, PROBE)
    eot = end_of_turn_token(tokenizer, original)
    answers = [m["content"] for m in PROBE if m["role"] == "assistant"]
    for (s, e), answer in zip(assistant_runs(mask), answers):
        got = tokenizer.decode(ids[s:e], skip_special_tokens=False)
        if got != answer + eot:
            raise ChatTemplateError(
                f"training chat template of {name!r} marks {got!r}, not the answer and its end-of-turn token"
            )
    _CACHE[key] = training
    return training
