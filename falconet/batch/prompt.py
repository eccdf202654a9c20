"""A batch job's prompt: a jinja2 template over each record's fields.

Records are untrusted input, so the template renders in jinja2's immutable sandbox: a
field's value is only ever data (a value of "{{ 7 * 7 }}" renders as those characters),
and a template that reaches for Python internals (`__class__`, `mro`, a method that
mutates) fails for that record with a SecurityError, which rejects the record, not the
job. Fields are the template's variables, and the whole record is `record` (for names
that are not identifiers: `record["unit price"]`); a field the template names but the
record lacks rejects the record rather than rendering as empty text.
"""

from __future__ import annotations

import json
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from falconet.errors import BatchError


class TemplateFailed(Exception):
    """One record the template cannot render; the message is the reject's reason."""


def _tojson(value: Any) -> str:
    # jinja2's own tojson escapes <, > and & for HTML; a prompt wants the JSON as is.
    return json.dumps(value, ensure_ascii=False)


class PromptTemplate:
    def __init__(self, text: str, name: str = "the prompt template") -> None:
        self.text = text
        env = ImmutableSandboxedEnvironment(
            undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
        )
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise BatchError(f"{name}: line {e.lineno}: {e.message}") from e

    def render(self, fields: dict[str, Any]) -> str:
        try:
            return self._template.render({**fields, "record": fields})
        except jinja2.exceptions.SecurityError as e:
            raise TemplateFailed(f"template refused by the sandbox: {e}") from e
        except jinja2.UndefinedError as e:
            raise TemplateFailed(f"template error: {e.message}") from e
        except (jinja2.TemplateError, ArithmeticError, TypeError, ValueError) as e:
            raise TemplateFailed(f"template error: {type(e).__name__}: {e}") from e
        except (RecursionError, MemoryError) as e:
            raise TemplateFailed(f"template error: {type(e).__name__}") from e
