"""Command-line options built from the config dataclasses: one flag per field, its help from the field's comment.

    add_config_groups(parser, TrainConfig, exclude=("model_overrides", ...), defaults={"preset": "small"})
    TrainConfig(**config_kwargs(args, TrainConfig, ...))

A field `max_source_len: int = 512  # source tokens kept` becomes `--max-source-len N` (a whole number,
"1e3"/"2_000" accepted) with help "source tokens kept (default 512)". `# -- title ---` lines in the
class body become argument groups. Booleans that default to False are switches; those that default to
True get a `--no-...` switch. Verbs name the fields they take, so two verbs over one config (mu train,
mu distill) cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import typing
from typing import Any, Iterable, Optional

from mu.errors import MuError


def number(kind: type):
    """argparse type: accepts 1e15 / 2_000_000 style numbers for int and float options."""

    def parse(text: str):
        try:
            value = float(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if kind is int:
            if not math.isfinite(value) or value != int(value):
                raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
            return int(value)
        return value

    parse.__name__ = kind.__name__
    return parse


_FIELD = re.compile(r"^    (\w+)\s*:[^#]*?(?:#\s?(.*))?$")
_MORE = re.compile(r"^\s+#\s+(.*)$")  # an indented comment line continues the field above
_SECTION = re.compile(r"^    # -- (.+?) -+\s*$")


def config_layout(cls: type) -> tuple[dict[str, str], list[tuple[str, list[str]]]]:
    """({field: comment}, [(section title, [fields])]) read from the dataclass's source."""
    comments: dict[str, str] = {}
    sections: list[tuple[str, list[str]]] = [("", [])]
    names = {f.name for f in dataclasses.fields(cls)}
    last = None
    for line in inspect.getsource(cls).splitlines():
        section = _SECTION.match(line)
        if section:
            sections.append((section.group(1).strip(), []))
            last = None
            continue
        field = _FIELD.match(line)
        if field and field.group(1) in names:
            last = field.group(1)
            comments[last] = (field.group(2) or "").strip()
            sections[-1][1].append(last)
            continue
        more = _MORE.match(line)
        if more and last is not None:
            comments[last] = f"{comments[last]} {more.group(1).strip()}".strip()
        else:
            last = None
    return comments, [(title, fields) for title, fields in sections if fields]


def _base_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def add_config_arguments(group, cls: type, names: Iterable[str], *, defaults: Optional[dict[str, Any]] = None,
                         helps: Optional[dict[str, str]] = None, choices: Optional[dict[str, Any]] = None,
                         metavars: Optional[dict[str, str]] = None, flags: Optional[dict[str, str]] = None,
                         required: Iterable[str] = ()) -> None:
    """Add `--field-name` for each of `names` to `group` (a parser or an argument group)."""
    comments, _ = config_layout(cls)
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    defaults, helps, choices = defaults or {}, helps or {}, choices or {}
    metavars, flags, required = metavars or {}, flags or {}, set(required)
    for name in names:
        kind = _base_type(hints[name])
        default = defaults.get(name, _default(by_name[name]))
        text = helps.get(name, comments.get(name, ""))
        kw: dict[str, Any] = {"dest": name}
        if kind is bool:  # a switch; a field that is on by default is turned off by --no-NAME (dest no_NAME)
            flag = flags.get(name, f"--{'no-' if default else ''}{name.replace('_', '-')}")
            if default and text and name not in helps:
                text = f"turn off: {text}"
            group.add_argument(flag, action="store_true", help=text or None, dest=f"no_{name}" if default else name)
            continue
        if kind in (int, float):
            kw["type"] = number(kind)
            kw["metavar"] = "N" if kind is int else "X"
        elif kind is not str:
            raise TypeError(f"{cls.__name__}.{name}: a {kind} field has no command-line form")
        if name in choices:
            kw["choices"] = choices[name]
        if name in metavars:
            kw["metavar"] = metavars[name]
        if name in required:
            kw["required"] = True
        elif default is not None and "default" not in text:
            text = f"{text} (default {default})" if text else f"default {default}"
        group.add_argument(flags.get(name, f"--{name.replace('_', '-')}"), default=default, help=text or None, **kw)


def add_config_groups(parser: argparse.ArgumentParser, cls: type, include: Optional[Iterable[str]] = None,
                      exclude: Iterable[str] = (), titles: Optional[dict[str, str]] = None,
                      **options: Any) -> dict[str, Any]:
    """Add the fields of `cls` (those in `include`, else all, minus `exclude`) in its `# -- section` groups;
    returns {section title: argument group} so a verb can add its own options to a group."""
    _, sections = config_layout(cls)
    keep = None if include is None else set(include)
    exclude = set(exclude)
    titles = titles or {}
    groups: dict[str, Any] = {}
    for title, names in sections:
        names = [n for n in names if (keep is None or n in keep) and n not in exclude]
        if names:
            groups[title] = parser.add_argument_group(titles.get(title, title) or None)
            add_config_arguments(groups[title], cls, names, **options)
    return groups


def config_kwargs(args: argparse.Namespace, cls: type, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """{field: value} for every field of `cls` that `args` holds (`no_NAME` switches give NAME=False)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if hasattr(args, f.name):
            out[f.name] = getattr(args, f.name)
        elif hasattr(args, f"no_{f.name}"):
            out[f.name] = not getattr(args, f"no_{f.name}")
    return out


def require_finite(config: Any) -> None:
    """One-line MuError for a float field that is inf or nan (e.g. `--lr inf`), named as its flag."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise MuError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
