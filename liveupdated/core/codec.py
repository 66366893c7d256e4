"""A strict JSON codec for frozen slotted dataclasses: journal records, kexec records,
kernel manifests.

It replaces pydantic, whose import (~0.25 s) sat on the blackout path of a live update.
Decoding is as strict as pydantic's strict mode: an unknown or missing key, a bool or str
for an int, a wrong Literal, a wrong list item are each a `DecodeError` naming the class,
the field and the problem. A class's field checks are built once, on its first use; its
instances are then built without `__init__` (so: slots, no `__post_init__`).
"""

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Check = Callable[[Any], Any]  # a JSON value -> the field's value, or DecodeError
Spec = tuple[type | None, Check | None]  # the JSON type a value needs, then its check


class DecodeError(ValueError):
    """The JSON is not an instance of the class it was decoded as."""


def _got(value: Any) -> str:
    return f"got {type(value).__name__} {value!r}"[:100]


def _full(kind: type | None, check: Check | None) -> Check:
    def full(value: Any) -> Any:
        if kind is not None and type(value) is not kind:  # so an int takes no bool
            raise DecodeError(f"expected {kind.__name__}, {_got(value)}")
        return value if check is None else check(value)

    return full


def _spec(hint: Any) -> Spec:
    """How a field of this annotation is checked: its JSON type, then any further check."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (int, str, bool):
        return hint, None
    if hint is Path:
        return str, Path
    if dataclasses.is_dataclass(hint):
        return dict, _plan(typing.cast(type, hint)).decode
    if origin is typing.Literal and len({type(a) for a in args}) == 1:

        def literal(value: Any) -> Any:
            if value not in args:
                raise DecodeError(f"expected one of {list(args)!r}, {_got(value)}")
            return value

        return type(args[0]), literal
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = _full(*_spec(next(a for a in args if a is not type(None))))
        return None, lambda value: None if value is None else inner(value)
    if origin in (list, tuple):
        fixed = origin is tuple and args[-1:] != (Ellipsis,)
        items = [_full(*_spec(a)) for a in (args if fixed else args[:1])]

        def sequence(value: list[Any]) -> Any:
            if fixed and len(value) != len(items):
                raise DecodeError(f"expected a list of {len(items)} items, {_got(value)}")
            out = []
            for i, item in enumerate(value):
                try:
                    out.append(items[i if fixed else 0](item))
                except DecodeError as exc:
                    raise DecodeError(f"item {i}: {exc}") from None
            return origin(out)

        kind, check = _spec(args[0])
        if fixed or kind is None or check is not None:
            return list, sequence
        plain = {kind}  # items that need no call: checked at once
        return list, lambda value: (
            origin(value) if plain.issuperset(map(type, value)) else sequence(value))
    raise TypeError(f"codec: no check for the type {hint!r}")


def _encode_int(value: Any) -> str:
    if type(value) is not int:  # a bool would be written as True: JSON no replay reads
        raise TypeError(f"codec: expected int, {_got(value)}")
    return int.__repr__(value)


def _encoder(hint: Any) -> Callable[[Any], str]:
    """A field's value -> its JSON text: the common kinds directly, the rest by json."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is str or (origin is typing.Literal and type(args[0]) is str):
        return encode_basestring
    if hint is int:
        return _encode_int
    if dataclasses.is_dataclass(hint):
        return _plan(typing.cast(type, hint)).text
    if origin is list or (origin is tuple and args[-1:] == (Ellipsis,)):
        item = _encoder(args[0])
        return lambda value: "[" + ",".join(map(item, value)) + "]"
    return _JSON.encode


class _Plan(Generic[T]):
    """How one dataclass is decoded (each field's name, spec and slot setter) and encoded
    (a template with each field's encoder)."""

    def __init__(self, cls: type[T]) -> None:
        hints, fields = typing.get_type_hints(cls), dataclasses.fields(cls)  # type: ignore[arg-type]
        if "__slots__" not in vars(cls) or hasattr(cls, "__post_init__"):
            raise TypeError(f"codec: {cls.__name__} needs slots=True and no __post_init__")
        self.cls, self.name = cls, cls.__name__
        self.fields = [(f.name, *_spec(hints[f.name]), getattr(cls, f.name).__set__)
                       for f in fields]
        self.names = frozenset(f.name for f in fields)
        self.defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
        self.template = "{" + ",".join(f'"{f.name}":%s' for f in fields) + "}"
        self.encoders = [(f.name, _encoder(hints[f.name])) for f in fields]

    def decode(self, obj: Any) -> T:
        if type(obj) is not dict:
            raise DecodeError(f"{self.name}: expected a JSON object, {_got(obj)}")
        fields, new = self.fields, object.__new__(self.cls)
        if len(obj) != len(fields):
            fields = self._left_out(obj, new)
        try:
            for name, kind, check, put in fields:
                value = obj[name]
                if type(value) is not kind and kind is not None:
                    raise DecodeError(f"{self.name}.{name}: expected {kind.__name__}, "
                                      f"{_got(value)}")
                if check is not None:
                    try:
                        value = check(value)
                    except DecodeError as exc:
                        raise DecodeError(f"{self.name}.{name}: {exc}") from None
                put(new, value)
        except KeyError:  # as many keys as fields, but not the same ones
            self._left_out(obj, new)  # raises: an unknown key
            raise
        return new

    def _left_out(self, obj: dict[str, Any], new: T) -> list[Any]:
        """Set the defaults of the fields `obj` leaves out; the fields it has. DecodeError
        if it has an unknown key or leaves out a field without a default."""
        if not self.names.issuperset(obj):
            raise DecodeError(f"{self.name}: unknown field(s) {sorted(obj.keys() - self.names)}")
        if missing := self.names - obj.keys() - self.defaults.keys():
            raise DecodeError(f"{self.name}.{min(missing)}: missing")
        for name, _, _, put in self.fields:
            if name not in obj:
                put(new, self.defaults[name])
        return [field for field in self.fields if field[0] in obj]

    def text(self, obj: T) -> str:
        return self.template % tuple([encode(getattr(obj, name)) for name, encode in self.encoders])


_PLANS: dict[type, _Plan[Any]] = {}


def _plan(cls: type[T]) -> _Plan[T]:
    if cls not in _PLANS:
        _PLANS[cls] = _Plan(cls)
    return _PLANS[cls]


def _encodable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"codec: cannot encode a {type(obj).__name__}")
    return {name: getattr(obj, name) for name, _ in _plan(type(obj)).encoders}


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_encodable)


def to_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON of a dataclass: fields in declared order, tuples as lists."""
    return _plan(type(obj)).text(obj).encode()


def loads(data: bytes | str, what: str) -> Any:
    """json.loads of UTF-8 JSON; unreadable JSON is a DecodeError about `what`."""
    try:
        return json.loads(data.decode() if isinstance(data, bytes) else data)
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"{what}: invalid JSON: {exc}") from None


def from_dict(cls: type[T], obj: Any) -> T:
    return _plan(cls).decode(obj)


def from_json(cls: type[T], data: bytes | str) -> T:
    return from_dict(cls, loads(data, cls.__name__))


class Tagged(Generic[T]):
    """A union of dataclasses told apart by a tag field (a Literal with a default)."""

    def __init__(self, name: str, classes: Iterable[type[T]], tag: str = "type") -> None:
        self.name, self.tag = name, tag
        self.plans = {_plan(c).defaults[tag]: _plan(c) for c in classes}

    def from_dict(self, obj: Any) -> T:
        try:
            plan = self.plans[obj[self.tag]]
        except (KeyError, TypeError):  # no tag, an unknown one, or not an object
            problem = (f"unknown {self.tag} {obj.get(self.tag)!r}" if type(obj) is dict
                       else f"expected a JSON object, {_got(obj)}")
            raise DecodeError(f"{self.name}: {problem}") from None
        return plan.decode(obj)

    def from_dicts(self, objs: list[Any]) -> list[T]:
        """Each of `objs` decoded: `from_dict` with its call inlined, for the journal."""
        plans, tag = self.plans, self.tag
        try:
            return [plans[obj[tag]].decode(obj) for obj in objs]
        except (KeyError, TypeError):
            for obj in objs:
                self.from_dict(obj)  # raises, naming the first bad one
            raise

    def from_json(self, data: bytes | str) -> T:
        return self.from_dict(loads(data, self.name))
