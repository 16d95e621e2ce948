"""Recipe strings: `codec:key=value,...`, and per-tensor rules `pattern=recipe;pattern=recipe`.

    parse("sparse:p=0.9,mode=magnitude") -> ("sparse", {"p": 0.9, "mode": "magnitude"})
    Rules("*.mlp.*=lowrank:rank=64;*=sign").recipe_for("model.layers.0.mlp.up_proj.weight")
"""
from __future__ import annotations

import fnmatch

from . import _core


def _value(text: str):
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
        params[key.strip()] = _value(val.strip())
    return codec, params


class Rules:
    """Ordered `pattern=recipe` rules (fnmatch patterns on tensor names); the first match wins.

    A rule string without '=' before the codec (e.g. just "sign") applies to every tensor.
    """

    def __init__(self, text: str):
        self.rules: list[tuple[str, str, dict]] = []
        for part in filter(None, (s.strip() for s in text.split(";"))):
            head, _, _ = part.partition(":")
            if "=" in head:  # "pattern=codec:..." (a bare recipe has no '=' before its ':')
                pattern, _, recipe = part.partition("=")
            else:
                pattern, recipe = "*", part
            codec, params = parse(recipe)
            self.rules.append((pattern.strip(), codec, params))
        if not self.rules:
            raise ValueError("empty recipe")

    def recipe_for(self, name: str) -> tuple[str, dict] | None:
        for pattern, codec, params in self.rules:
            if fnmatch.fnmatchcase(name, pattern):
                return codec, dict(params)
        return None
