"""Render a template once, put each request's values in afterwards.

A plan of a million requests has only a few hundred distinct (audience, style, format)
combinations; what changes from request to request is the topic, its path, the units already
covered and the seed words. When a template uses those only as plain text (`{{ topic }}`), as a
joined list (`{{ path | join(" > ") }}`) or as an `{% if path %}` test, rendering it with
placeholders and replacing the placeholders later gives exactly the text a full render gives
(tested against rendering every combination). Any other use (a filter, a loop, a comparison,
an include) could depend on the values themselves, so such templates are rendered every time.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import nodes

# The per-request variables, and how a spliceable template may use them.
TEXT = frozenset({"topic", "subject"})  # {{ topic }}
LISTS = frozenset({"path", "covered", "seed_words"})  # {{ path | join(", ") }}


@dataclass(frozen=True)
class Splice:
    """A template rendered for one (axes, shape): `fill(values)` is what rendering with those
    values gives. `slots` says what goes in each {n} of the pattern: a text variable (separator
    None) or a list variable joined with the separator."""

    pattern: str
    slots: tuple[tuple[str, str | None], ...]

    def fill(self, values: Mapping[str, Any]) -> str:
        return self.pattern.format(
            *[values[name] if sep is None else sep.join(values[name]) for name, sep in self.slots]
        )


def shape(values: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of the per-request values changes the rendered text beyond the slots: whether each
    is empty (an `if` takes the other branch), and an empty text value itself (None renders as
    "None"). Requests of one shape and the same axes share a Splice."""
    return tuple(
        bool(values[name]) if name in LISTS else (True if values[name] else values[name])
        for name in sorted(TEXT | LISTS)
    )


def splice_blocker(tree: nodes.Template) -> str | None:
    """None when every use of a per-request variable in the template is one the splice
    handles; otherwise the first use that is not, to tell the template's author."""
    if any(tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends))):
        return "it includes, imports or extends another template"
    for node, chain in _with_ancestors(tree):
        if not (isinstance(node, nodes.Name) and node.name in TEXT | LISTS):
            continue
        # (An assignment or a loop variable of that name has no allowed parent either.)
        parent = chain[-1] if chain else None
        if isinstance(parent, nodes.If) and parent.test is node:
            continue
        if node.name in TEXT and isinstance(parent, nodes.Output):
            continue
        joined = (
            node.name in LISTS
            and isinstance(parent, nodes.Filter)
            and parent.name == "join"
            and parent.node is node
            and all(isinstance(a, nodes.Const) for a in parent.args)
            and not parent.kwargs
            and parent.dyn_args is None
            and parent.dyn_kwargs is None
            and len(chain) >= 2
            and isinstance(chain[-2], nodes.Output)
        )
        if not joined:
            if isinstance(parent, nodes.Filter):
                where = f"the `{parent.name}` filter"
            else:
                where = f"a `{type(parent).__name__}` node"
            return f"line {node.lineno}: `{node.name}` is used in {where}"
    return None


def make_splice(render: Callable[..., str], values: Mapping[str, Any]) -> Splice | None:
    """Render once (`render(**variables)`, stripped as PromptLibrary.render does) with
    placeholders for the non-empty per-request values; None where a placeholder lands at either
    end of the text (stripping could then cut into the value)."""
    marker = secrets.token_hex(8)  # a random marker cannot occur in topic text or axis values
    variables = dict(values)
    for name in TEXT | LISTS:
        if values[name]:
            a, b = f"\x00{marker}:{name}:a\x00", f"\x00{marker}:{name}:b\x00"
            # Two items for a list, so that the separator shows between them.
            variables[name] = a if name in TEXT else [a, b]
    slot = re.compile(f"\x00{marker}:(\\w+):a\x00(?:(.*?)\x00{marker}:\\1:b\x00)?", re.S)
    parts = slot.split(render(**variables))
    pieces = parts[0::3]
    if len(pieces) > 1 and (not pieces[0] or not pieces[-1]):
        return None
    slots = tuple(zip(parts[1::3], parts[2::3], strict=True))
    pattern = [_literal(pieces[0])]
    for i, piece in enumerate(pieces[1:]):
        pattern += [f"{{{i}}}", _literal(piece)]
    return Splice("".join(pattern), slots)


def _literal(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _with_ancestors(
    node: nodes.Node, chain: tuple[nodes.Node, ...] = ()
) -> Iterator[tuple[nodes.Node, tuple[nodes.Node, ...]]]:
    yield node, chain
    for child in node.iter_child_nodes():
        yield from _with_ancestors(child, (*chain, node))
