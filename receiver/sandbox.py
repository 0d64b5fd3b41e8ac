"""The budgeted Jinja2 sandbox that every template runs in: a template can never stop paging.

Each render runs under a budget of :data:`RENDER_BUDGET` seconds of CPU and :data:`MAX_OUTPUT`
characters, enforced by the sandbox itself, cooperatively: every call (macros included),
intercepted operator, filter, captured block and loop iteration ticks the budget (the CPU clock is
read every few ticks and after every filter call; what runs between two ticks is bounded by the
template's length), and the operations that could allocate a huge value in one step (``'x' * n``,
``~``, ``+``, ``**``, ``%``/``format`` widths, ``center``, ``indent``, ``replace``, ``join``,
``range``…) are refused before they run when the result would pass :data:`MAX_STRING` characters
or :data:`MAX_ITEMS` items. Jinja has no hook for loop iteration or ``~``: :class:`_Guard`
rewrites each template's tree so that they go through checking filters. No thread and no
process: a thread cannot be stopped, and a process per render costs more than the render.
"""

from __future__ import annotations

import functools
import re
import string
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import SandboxedEnvironment
from jinja2.visitor import NodeTransformer

RENDER_BUDGET = 0.1  # seconds of CPU one render may take
MAX_OUTPUT = 32_768  # characters a render may produce (35 SMS parts are ~5,400)
MAX_STRING = 262_144  # characters in any one string a template builds
# items in any list a template builds, or that one loop or filter yields: small enough that one
# filter call over such a list (groupby, sort, unique) ends well within the budget
MAX_ITEMS = 10_000
MAX_RANGE = 10_000  # items of range()
MAX_INT_BITS = 65_536  # bits of an integer a template computes
WORDWRAP_MAX = 20_000  # characters wordwrap/urlize accept: they are pure Python, and slow
_CHECK_EVERY = 16  # ticks between reads of the CPU clock (a read costs ~0.6 µs)


class RenderBudgetExceeded(Exception):
    """A render went over its budget (time or size). Not a TypeError/ValueError/LookupError, so
    the filters and lookups that swallow those let it through; the budget also stays exceeded,
    so the next tick raises again should anything swallow it anyway."""


# ---------------------------------------------------------------------------------------------
# The budget


class Budget:
    """One render's allowance of CPU time, read from ``timer``."""

    __slots__ = ("seconds", "_timer", "_deadline", "_left", "exceeded")

    def __init__(self, seconds: float, timer: Callable[[], float]) -> None:
        self.seconds = seconds
        self._timer = timer
        self._deadline = timer() + seconds
        self._left = _CHECK_EVERY
        self.exceeded: str | None = None

    def tick(self) -> None:
        if self.exceeded is not None:
            raise RenderBudgetExceeded(self.exceeded)
        self._left -= 1
        if self._left <= 0:
            self._left = _CHECK_EVERY
            if self._timer() > self._deadline:
                self.fail(f"rendering took longer than {self.seconds * 1000:.0f}ms — a loop too large?")

    def check(self) -> None:
        """Read the clock now: after a filter call, which may have run long in one step."""
        self._left = 1
        self.tick()

    def fail(self, message: str) -> None:
        self.exceeded = message
        raise RenderBudgetExceeded(message)


def _too_big(what: str, limit: int, unit: str = "characters") -> RenderBudgetExceeded:
    return RenderBudgetExceeded(f"{what} would be more than {limit} {unit}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_len(what: str, size: Any, limit: int = MAX_STRING, unit: str = "characters") -> None:
    if _is_int(size) and size > limit:
        raise _too_big(what, limit, unit)


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _str_size(value: Any, limit: int = MAX_STRING) -> int:
    """A lower bound of ``len(str(value))``, counted up to just past ``limit`` at a cost of
    O(limit): a list of 100,000 references to one long string is small, its text is not."""
    size, stack = 0, [value]
    while stack and size <= limit:
        v = stack.pop()
        if isinstance(v, str):
            size += len(v)
        elif isinstance(v, _CONTAINERS):
            size += 2 + 2 * len(v)  # brackets, and ", " between items: each extend is paid for
            stack.extend(v.items() if isinstance(v, dict) else v)
        else:
            size += 1
    return size


def _check_text(what: str, value: Any) -> None:
    """A value about to be turned into text: a container's text must fit MAX_STRING too."""
    if isinstance(value, _CONTAINERS) and _str_size(value) > MAX_STRING:
        raise _too_big(what, MAX_STRING)


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)


def _check_percent(fmt: Any, args: Any) -> None:
    """``fmt % args`` (and the ``format`` filter): the widths it asks for must fit MAX_STRING."""
    if not isinstance(fmt, str):
        return
    values = args if isinstance(args, tuple) else (args,)
    for v in values:
        _check_text("a %-format's argument as text", v)
    width = 0
    for m in _PERCENT_SPEC.finditer(fmt):
        for part in (m[1], m[2]):
            if part == "*":
                width += sum(abs(v) for v in values if _is_int(v))
            elif part:
                width += int(part)
    _check_len("a %-format's width", width)


def _check_format(fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """``fmt.format(...)``: the widths in its specs (nested ones included) must fit MAX_STRING."""
    for v in (*args, *kwargs.values()):
        _check_text("a format's argument as text", v)
    width = 0
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if not spec:
            continue
        if "{" in spec:  # a width from the arguments
            width += sum(abs(v) for v in (*args, *kwargs.values()) if _is_int(v))
        width += sum(int(n) for n in re.findall(r"\d+", spec))
    _check_len("a format's width", width)


def _replaced_len(s: str, old: Any, new: Any, count: Any = -1) -> int:
    if not isinstance(old, str) or not isinstance(new, str):
        return 0
    n = (len(s) + 1) if old == "" else s.count(old)
    if _is_int(count) and count >= 0:
        n = min(n, count)
    return len(s) + n * (len(new) - len(old))


def _joined_len(items: list[Any], sep: Any) -> int:
    size = sum(len(x) if isinstance(x, str) else _str_size(x) for x in items)
    return size + max(0, len(items) - 1) * (len(sep) if isinstance(sep, str) else 0)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        if _is_int(left) and _is_int(right):
            _check_len("a product", left.bit_length() + right.bit_length(), MAX_INT_BITS, "bits")
            return
        seq, n = (left, right) if _is_int(right) else (right, left)
        if isinstance(seq, str) and _is_int(n):
            _check_len("a repeated string", len(seq) * n)
        elif isinstance(seq, (list, tuple)) and _is_int(n):
            _check_len("a repeated list", len(seq) * n, MAX_ITEMS, "items")
    elif operator == "+":
        if isinstance(left, str) and isinstance(right, str):
            _check_len("a sum of strings", len(left) + len(right))
        elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            _check_len("a sum of lists", len(left) + len(right), MAX_ITEMS, "items")
    elif operator == "**":
        if _is_int(left) and _is_int(right) and abs(left) > 1 and right > 0:
            _check_len("a power", right * left.bit_length(), MAX_INT_BITS, "bits")
    elif operator == "%" and isinstance(left, str):
        _check_percent(left, right)


def _check_str_method(owner: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> tuple[Any, ...]:
    """Refuse a str method call whose result would pass MAX_STRING; returns the arguments to
    call it with (``join``'s iterable read into a list, once)."""
    if name in ("center", "ljust", "rjust", "zfill"):
        _check_len(f"str.{name}", args[0] if args else kwargs.get("width"))
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if _is_int(size):
            _check_len("str.expandtabs", len(owner) * max(1, size))
    elif name == "replace" and len(args) >= 2:
        _check_len("str.replace", _replaced_len(owner, *args[:3]))
    elif name == "join" and args:
        items = _bounded_list(args[0])
        _check_len("str.join", _joined_len(items, owner))
        return (items, *args[1:])
    return args


def _bounded_list(iterable: Any) -> list[Any]:
    if isinstance(iterable, list):
        items = iterable
    else:
        items = []
        for item in iterable:
            items.append(item)
            if len(items) > MAX_ITEMS:
                break
    _check_len("a list", len(items), MAX_ITEMS, "items")
    return items


# Filters that could allocate (or spin) a lot in one step: a check of their arguments first.
def _filter_center(value: Any, width: Any = 80, *_: Any, **__: Any) -> None:
    _check_len("center", width)


def _filter_indent(s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    lines = str(s).count("\n") + 1
    per_line = len(width) if isinstance(width, str) else width
    if _is_int(per_line):
        _check_len("indent", len(str(s)) + lines * per_line)


def _filter_format(value: Any, *args: Any, **kwargs: Any) -> None:
    _check_percent(value, args or kwargs)


def _filter_replace(s: Any, old: Any = "", new: Any = "", count: Any = None, *_: Any, **__: Any) -> None:
    _check_len("replace", _replaced_len(str(s), old, new, -1 if count is None else count))


def _filter_join(value: Any, d: Any = "", attribute: Any = None, *_: Any, **__: Any) -> None:
    if isinstance(value, (list, tuple)) and attribute is None:
        _check_len("join", _joined_len(list(value), d))


def _filter_slow(value: Any, *_: Any, **__: Any) -> None:
    _check_len("wordwrap/urlize input", len(str(value)), WORDWRAP_MAX)


def _filter_sum(iterable: Any, attribute: Any = None, start: Any = 0, *_: Any, **__: Any) -> None:
    if not isinstance(start, (int, float)):
        raise RenderBudgetExceeded("sum only adds numbers here (its start must be a number)")


_FILTER_CHECKS: Mapping[str, Callable[..., None]] = {
    "center": _filter_center, "indent": _filter_indent, "format": _filter_format,
    "replace": _filter_replace, "join": _filter_join, "wordwrap": _filter_slow,
    "urlize": _filter_slow, "sum": _filter_sum,
}


# Filters that turn their input into text: a list's text could be huge while the list is small.
_STRINGIFYING = frozenset({
    "string", "tojson", "pprint", "e", "escape", "forceescape", "safe", "upper", "lower", "title",
    "capitalize", "trim", "striptags", "truncate", "wordcount", "urlencode", "urlize", "center",
    "indent", "replace", "format", "wordwrap", "sms_truncate",
})


class _Guard(NodeTransformer):
    """Routes the two things the sandbox has no hook for through one: each ``for`` loop's
    iterable (so that every iteration ticks) and ``~`` (so that its length is checked)."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "_budget_iter", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "_budget_concat", [], [],
                            None, None, lineno=node.lineno)


_DICT_ATTRIBUTES = frozenset(dir(dict))


class Sandbox(SandboxedEnvironment):
    """Jinja's sandbox, with the render budget enforced by its hooks (see the module's doc).

    The budget of the render in progress is kept per thread on the environment (one render at a
    time per thread; renders run on the event loop, the CLI in its main thread). With none in
    progress (compiling, constant folding) the size checks still apply; the time check does not.

    Also, ``a.labels.alertname`` on the context's plain dicts is looked up directly. Jinja tries
    ``getattr`` first and falls back to the item on AttributeError: for a name that is not a dict
    attribute that always ends in the item (or undefined), the same result without raising (an
    exception per dot was most of a 10-alert render)."""

    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._local = threading.local()
        self.finalize = self._finalize
        self.globals["range"] = self._range
        self.globals.pop("lipsum", None)  # lipsum(10**6) took 47 s; an SMS needs no filler text
        for name, func in list(self.filters.items()):
            self.filters[name] = self.guard_filter(name, func)
        self.filters["_budget_iter"] = jinja2.pass_context(lambda _ctx, value: self._iterate(value))
        self.filters["_budget_concat"] = jinja2.pass_context(lambda _ctx, parts: self._concat(parts))

    # -- the budget ---------------------------------------------------------------------------

    def run(self, template: jinja2.Template, context: Mapping[str, Any], budget: Budget) -> str:
        """Render ``template`` under ``budget``; raises RenderBudgetExceeded when it runs out."""
        previous = getattr(self._local, "budget", None)
        self._local.budget = budget
        try:
            out: list[str] = []
            size = 0
            for chunk in template.generate(context):  # each loop iteration and call has ticked
                size += len(chunk)
                if size > MAX_OUTPUT:
                    budget.fail(f"rendering produced more than {MAX_OUTPUT} characters")
                out.append(chunk)
            if budget.exceeded is not None:  # something swallowed the exception: still over
                raise RenderBudgetExceeded(budget.exceeded)
            return "".join(out)
        finally:
            self._local.budget = previous

    def _tick(self) -> None:
        budget = getattr(self._local, "budget", None)
        if budget is not None:
            budget.tick()

    def _checked(self, value: Any) -> Any:
        """A value a template computed: refused when too big; an iterator comes back counted."""
        if isinstance(value, str):
            if len(value) > MAX_STRING:
                raise _too_big("a string", MAX_STRING)
        elif isinstance(value, (list, tuple, dict, set, frozenset)):
            if len(value) > MAX_ITEMS:
                raise _too_big("a list", MAX_ITEMS, "items")
        elif isinstance(value, Iterator):
            return self._iterate(value)
        return value

    def _iterate(self, iterable: Any) -> Iterator[Any]:
        budget = getattr(self._local, "budget", None)
        for count, item in enumerate(iterable, 1):
            if count > MAX_ITEMS:
                raise _too_big("a loop", MAX_ITEMS, "items")
            if budget is not None:
                budget.tick()
            yield item

    def _concat(self, parts: list[Any]) -> str:
        self._tick()
        for p in parts:
            _check_text("a ~ concatenation", p)
        texts = [str(p) for p in parts]
        _check_len("a ~ concatenation", sum(map(len, texts)))
        return "".join(texts)

    def _range(self, *args: Any) -> range:
        self._tick()
        r = range(*args)
        _check_len("range()", len(r), MAX_RANGE, "items")
        return r

    @staticmethod
    def _finalize(value: Any) -> Any:
        """Every ``{{ expression }}`` before it becomes text."""
        if value.__class__ is not str:  # the fast path: most outputs are strings
            _check_text("an output expression as text", value)
        return value

    def concat(self, parts: Iterable[str]) -> str:  # type: ignore[override]
        """Joins the captured output of ``{% set %}…{% endset %}``, macros and ``call`` blocks:
        checked before the join, so output captured in a loop or a macro's fan-out stays bounded
        (the top level's is counted by :meth:`run`)."""
        parts = parts if isinstance(parts, list) else list(parts)
        self._tick()
        _check_len("a captured block", sum(map(len, parts)))
        return "".join(parts)

    def guard_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        check = _FILTER_CHECKS.get(name)
        stringifies = name in _STRINGIFYING
        offset = 1 if hasattr(func, "jinja_pass_arg") else 0  # context/environment comes first

        @functools.wraps(func)  # keeps jinja_pass_arg
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._tick()
            if len(args) > offset:
                if stringifies:
                    _check_text(f"{name}'s input as text", args[offset])
                if check is not None:
                    check(*args[offset:], **kwargs)
            out = self._checked(func(*args, **kwargs))
            budget = getattr(self._local, "budget", None)
            if budget is not None:
                budget.check()
            return out

        return guarded

    # -- the sandbox's hooks --------------------------------------------------------------------

    def _generate(self, source: nodes.Template, name: str | None, filename: str | None,
                  defer_init: bool = False) -> str:
        source = _Guard().visit(source)
        source.set_environment(self)
        return super()._generate(source, name, filename, defer_init)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any,  # noqa: N805
             **kwargs: Any) -> Any:
        __self._tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            args = _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(owner, (list, dict, set)):  # l.extend(l) doubles: stop at the limit
            _check_len("a list", len(owner), MAX_ITEMS, "items")
        return __self._checked(result)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        self._tick()
        _check_binop(operator, left, right)
        return self._checked(self.binop_table[operator](left, right))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        @functools.wraps(wrapped)
        def checked(*args: Any, **kwargs: Any) -> str:
            self._tick()
            if value.__name__ == "format_map":
                _check_format(fmt, (), args[0] if args and isinstance(args[0], Mapping) else {})
            else:
                _check_format(fmt, args, kwargs)
            return self._checked(wrapped(*args, **kwargs))

        return checked

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except (TypeError, KeyError):  # TypeError: an unhashable name cannot be a key
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)
