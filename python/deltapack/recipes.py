"""Recipe strings: `codec:key=value,...`, and per-tensor rules `pattern=recipe;pattern=recipe`.

    parse("sparse:p=0.9,mode=magnitude") -> ("sparse", {"p": 0.9, "mode": "magnitude"})
    Rules("*.mlp.*=lowrank:rank=64;*=sign").recipe_for("model.layers.0.mlp.up_proj.weight")
"""
from __future__ import annotations

import fnmatch

from . import _core


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse(recipe: str) -> tuple[str, dict]:
    """Split a recipe into (codec, params); values become int, float or str."""
    recipe = recipe.strip()
    codec, _, rest = recipe.partition(":")
    codec = codec.strip()
    if codec not in _core.codec_names():
        raise ValueError(f"recipe {recipe!r}: unknown codec {codec!r} (known: {', '.join(_core.codec_names())})")
    params = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"recipe {recipe!r}: expected key=value, got {item!r}")
        params[key.strip()] = parse_value(val.strip())
    return codec, params


def split_rules(text: str, chain: str = "") -> list[tuple[str, str]]:
    """Split 'pattern=body;pattern=body' into (pattern, body) pairs, in order.

    A part whose head (the text before its first ':' and, if given, before the first `chain`
    separator) has no '=' is a bare body that applies to every tensor: pattern '*'.
    """
    pairs = []
    for part in filter(None, (s.strip() for s in text.split(";"))):
        head = part.partition(":")[0]
        if chain:
            head = head.partition(chain)[0]
        if "=" in head:  # "pattern=body" (a bare body has no '=' before its ':')
            pattern, _, body = part.partition("=")
        else:
            pattern, body = "*", part
        pairs.append((pattern.strip(), body))
    return pairs


def first_match(rules, name: str):
    """The value of the first (fnmatch pattern, value) rule matching `name`, else None."""
    for pattern, value in rules:
        if fnmatch.fnmatchcase(name, pattern):
            return value
    return None


class Rules:
    """Ordered `pattern=recipe` rules (fnmatch patterns on tensor names); the first match wins.

    A rule string without '=' before the codec (e.g. just "sign") applies to every tensor.
    """

    def __init__(self, text: str):
        self.rules: list[tuple[str, tuple[str, dict]]] = [(pattern, parse(recipe))
                                                          for pattern, recipe in split_rules(text)]
        if not self.rules:
            raise ValueError("empty recipe")

    def recipe_for(self, name: str) -> tuple[str, dict] | None:
        found = first_match(self.rules, name)
        return None if found is None else (found[0], dict(found[1]))
