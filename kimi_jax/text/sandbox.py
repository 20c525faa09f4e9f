"""The chat-template sandbox: jinja2's immutable sandbox with every operation that can build
something large checked *before* it runs.

A checkpoint's (or a stranger's bundle's) chat template is code. jinja2's sandbox stops it from
reaching Python's internals, but not from asking for a number of 10**10 digits, a string of
10**10 characters, or 10**10 loop iterations. Here every such request is refused by name before
any of it is computed:

* operators: ``**`` and ``*`` on integers may not build a number of more than
  :data:`MAX_INT_BITS` bits; ``*`` and ``+`` on strings and lists, and ``%`` formatting, may
  not build more than :data:`MAX_ITEMS` characters or items;
* calls, filters and methods: no integer argument beyond :data:`MAX_ARGUMENT` (a width, a
  count, a range), and string-building ones (``join``, ``replace``, ``indent``, ``format``,
  ``center``...) are sized first;
* ``range`` may hand out at most :data:`MAX_RANGE_ITEMS` numbers in one rendering, so nested
  loops cannot multiply (jinja2 caps only one range, at 100,000); ``lipsum`` at most
  :data:`MAX_LIPSUM_WORDS` words;
* the rendered text is collected piece by piece and may not exceed :data:`MAX_RENDERED_CHARS`.

What no check here can see (a loop over a long string that outputs nothing, ``~`` doubling a
string) is bounded by where this runs: :mod:`kimi_jax.text.worker` renders in a child process
with an address-space limit and a wall-time limit.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any

# One rendering builds at most this much: Kimi K2.5's 262,144-token context is about 1 Mi
# characters of text; four times that leaves room for any template's markup.
MAX_RENDERED_CHARS = 4 << 20
MAX_ITEMS = MAX_RENDERED_CHARS  # characters of one string, or items of one list, built by an operator
MAX_INT_BITS = 1 << 16  # about 19,700 decimal digits: far past any count a template needs
MAX_ARGUMENT = 100_000  # an integer argument of a call or filter (jinja2's own cap on one range)
MAX_RANGE_ITEMS = 10_000_000  # numbers handed out by every range() of one rendering together
MAX_LIPSUM_WORDS = 100_000
MAX_JSON_INDENT = 16
MAX_MESSAGE_CHARS = 200  # of an error a template raises, as quoted in our one-line error


class TemplateLimit(Exception):
    """A template asked for more than a rendering may build (the message says what and how much)."""


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters (a stranger's text quoted in an error line)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _size(x: Any) -> int | None:
    """How many characters or items ``x`` holds, for the sequences an operator can grow."""
    return len(x) if isinstance(x, (str, list, tuple, bytes)) else None


def _check_items(n: int, what: str) -> None:
    if n > MAX_ITEMS:
        raise TemplateLimit(f"{what} would build {n:,} characters or items, more than the {MAX_ITEMS:,} a template "
                            "may build")  # fmt: skip


def check_arguments(what: str, args: tuple, kwargs: dict) -> None:
    for value in (*args, *kwargs.values()):
        if _is_int(value) and abs(value) > MAX_ARGUMENT:
            raise TemplateLimit(f"{what}: argument {clip(str(value), 40)} is larger than the {MAX_ARGUMENT:,} a "
                                "template may pass")  # fmt: skip


# printf-style conversions: '%-10.3f', '%*d', '%(name)s'
_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def check_percent_format(fmt: str, what: str) -> None:
    for m in _PERCENT.finditer(fmt):
        for part in m.groups():
            if part == "*":
                raise TemplateLimit(f"{what}: '*' widths are not supported in a template")
            if part is not None and (len(part) > 6 or int(part) > MAX_ARGUMENT):
                raise TemplateLimit(f"{what}: width or precision {clip(part, 20)} is larger than {MAX_ARGUMENT:,}")


def check_brace_format(fmt: str, what: str) -> None:
    """'{:>1000000000}'.format(x): the widths inside a str.format string."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises the same error itself
    for _, _, spec, _ in fields:
        for digits in re.findall(r"\d+", spec or ""):
            if len(digits) > 6 or int(digits) > MAX_ARGUMENT:
                raise TemplateLimit(f"{what}: width or precision {clip(digits, 20)} is larger than {MAX_ARGUMENT:,}")
        if spec and "{" in spec:
            check_brace_format(spec, what)


def check_binop(op: str, left: Any, right: Any) -> None:
    what = f"the operator {op!r}"
    if op == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
        if right > MAX_INT_BITS or abs(left).bit_length() * right > MAX_INT_BITS:
            raise TemplateLimit(f"{what} on {clip(str(left), 20)} and {clip(str(right), 20)} would build a number of "
                                f"more than {MAX_INT_BITS:,} bits")  # fmt: skip
    elif op == "*":
        if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateLimit(f"{what} would build a number of more than {MAX_INT_BITS:,} bits")
        for seq, count in ((left, right), (right, left)):
            if _size(seq) is not None and _is_int(count):
                _check_items(_size(seq) * max(count, 0), what)
    elif op == "+" and _size(left) is not None and _size(right) is not None:
        _check_items(_size(left) + _size(right), what)
    elif op == "%" and isinstance(left, str):
        check_percent_format(left, what)


def check_method(obj: Any, name: str, args: tuple, kwargs: dict) -> tuple:
    """The string methods whose result can outgrow their inputs, sized before they run; returns
    the arguments to call with (an iterable to join is read into a list once, to be sized)."""
    what = f"{type(obj).__name__}.{name}()"
    if isinstance(obj, str):
        if name in ("format", "format_map"):
            check_brace_format(obj, what)
        elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            matches = len(obj) + 1 if args[0] == "" else obj.count(args[0])
            _check_items(len(obj) + matches * max(0, len(args[1]) - len(args[0])), what)
        elif name == "join" and len(args) == 1:
            items = list(args[0])
            _check_items(sum(len(x) for x in items if isinstance(x, str)) + len(obj) * max(0, len(items) - 1), what)
            args = (items,)
    check_arguments(what, args, kwargs)
    return args


def _checked_filters(filters: dict[str, Any]) -> dict[str, Any]:
    """Every filter wrapped so that its integer arguments are bounded, and the string builders sized."""

    def wrap(name: str, f):
        skip = 1 if hasattr(f, "jinja_pass_arg") else 0  # the context jinja2 passes first to such filters

        def checked(*args, **kwargs):
            value, rest = (args[skip], args[skip + 1 :]) if len(args) > skip else (None, ())
            check_arguments(f"the filter {name!r}", tuple(rest), kwargs)
            if name == "join" and isinstance(value, (list, tuple, dict, type(iter(())), type(x for x in ()))):
                value = list(value)
                sep = rest[0] if rest else kwargs.get("d", "")
                _check_items(sum(len(str(x)) for x in value) + len(str(sep)) * max(0, len(value) - 1),
                             "the filter 'join'")  # fmt: skip
                args = (*args[:skip], value, *rest)
            elif name == "replace" and isinstance(value, str) and len(rest) >= 2:
                check_method(str(value), "replace", (str(rest[0]), str(rest[1])), {})
            elif name == "indent" and isinstance(value, str):
                width = rest[0] if rest else kwargs.get("width", 4)
                _check_items(len(value) + (value.count("\n") + 1) * (len(width) if isinstance(width, str) else
                                                                      int(width or 0)), "the filter 'indent'")  # fmt: skip
            elif name == "format" and isinstance(value, str):
                check_percent_format(value, "the filter 'format'")
            return f(*args, **kwargs)

        checked.__name__ = getattr(f, "__name__", name)
        for marker in ("jinja_pass_arg",):  # jinja2 passes the eval context to filters marked so
            if hasattr(f, marker):
                setattr(checked, marker, getattr(f, marker))
        return checked

    return {name: wrap(name, f) for name, f in filters.items()}


def environment():
    """transformers' chat-template environment (trim_blocks, lstrip_blocks, loopcontrols, tojson
    without HTML escaping, raise_exception) in the bounded sandbox above."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import generate_lorem_ipsum

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["**", "*", "+", "%"])

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.range_items = 0

        def call_binop(self, context, operator, left, right):
            check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
            method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format in a function of its own
            owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
            if owner is not None and not isinstance(owner, type(jinja2)):
                args = check_method(owner, name, args, kwargs)
            else:
                check_arguments(f"{name or type(__obj).__name__}()", args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def bounded_range(*args):
        numbers = range(*args)
        env.range_items += len(numbers)
        if env.range_items > MAX_RANGE_ITEMS:
            raise TemplateLimit(f"range(): the ranges of this rendering would hand out {env.range_items:,} numbers, "
                                f"more than the {MAX_RANGE_ITEMS:,} a template may loop over")  # fmt: skip
        return numbers

    bounded_range.__name__ = "range"

    def lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 - jinja2's parameter names
        if n * max > MAX_LIPSUM_WORDS:
            raise TemplateLimit(f"lipsum(): {n} paragraphs of up to {max} words is more than "
                                f"{MAX_LIPSUM_WORDS:,} words")  # fmt: skip
        return generate_lorem_ipsum(n, html, min, max)

    def raise_exception(message: str):
        raise jinja2.TemplateError(clip(message))

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        width = indent if _is_int(indent) else len(indent) if isinstance(indent, str) else 0
        if width > MAX_JSON_INDENT:
            raise TemplateLimit(f"the filter 'tojson': indent {clip(str(indent), 20)} is more than {MAX_JSON_INDENT}")
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.filters = _checked_filters(env.filters)
    env.globals.update(range=bounded_range, lipsum=lipsum, raise_exception=raise_exception)
    return env


def render(source: str, variables: dict[str, Any]) -> str:
    """Render ``source`` with ``variables`` in the bounded sandbox; the text is collected piece by
    piece and refused past :data:`MAX_RENDERED_CHARS`. Raises jinja2's errors, TemplateLimit,
    and whatever else the template makes Python raise (the caller names them)."""
    template = environment().from_string(source)
    pieces, total = [], 0
    for piece in template.generate(**variables):
        total += len(piece)
        if total > MAX_RENDERED_CHARS:
            raise TemplateLimit(f"the rendered text is longer than the {MAX_RENDERED_CHARS:,} characters a chat "
                                "template may produce")  # fmt: skip
        pieces.append(piece)
    return "".join(pieces)
