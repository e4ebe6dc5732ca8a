"""A Policy maps each quantizable layer to a precision; it is the hand-off from search to lowering."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from mpqc.errors import MpqcError
from mpqc.files import read_text
from mpqc.passes.layers import Layer
from mpqc.precision import PRECISIONS, Precision, precision
from mpqc.targets import Target


@dataclasses.dataclass(frozen=True)
class Policy:
    assignments: tuple[tuple[str, str], ...]  # (layer name, precision name), in layer order
    source: str = ""  # how it was made: "uniform:w8a8", "file:policy.json", a search method...

    @property
    def as_dict(self) -> dict[str, str]:
        return dict(self.assignments)

    def precision_of(self, layer: str) -> Precision:
        return precision(self.as_dict[layer])

    def to_json(self) -> dict:
        return {"format": "mpqc.policy/1", "source": self.source, "layers": self.as_dict}

    def save(self, path: pathlib.Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")

    @staticmethod
    def load(path: str | pathlib.Path) -> dict[str, str]:
        """A policy file's layer -> precision name map, every name a precision mpqc knows."""
        path = pathlib.Path(path)
        layers = _read_policy(path).get("layers")
        if not isinstance(layers, dict):
            raise _not_a_policy(path)
        for layer, name in layers.items():
            if not isinstance(name, str):
                raise MpqcError(f"'{path}': \"layers\" must map layer names to precision names; "
                                f"layer {layer!r} has {json.dumps(name)[:40]}")
            if name not in PRECISIONS:
                raise MpqcError(f"'{path}': \"layers\" gives layer {layer!r} the unknown precision {name!r}; "
                                f"use {', '.join(PRECISIONS)}")
        return layers


def _not_a_policy(path: pathlib.Path) -> MpqcError:
    return MpqcError(f"'{path}' is not an mpqc policy (expected JSON with a \"layers\" object)")


def _read_policy(path: pathlib.Path) -> dict:
    """The file's JSON object; anything unreadable (missing, too long a name, not UTF-8 JSON) is one error."""
    try:
        exists = path.is_file()
    except OSError as exc:  # a name too long for the file system
        raise MpqcError(f"policy file '{path}' cannot be read ({exc.strerror or exc}); check the path") from None
    if not exists:
        raise MpqcError(f"policy file '{path}' does not exist")
    text = read_text(path, "policy file", "an mpqc policy is UTF-8 JSON")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # Python's json recurses once per nesting level
        raise _not_a_policy(path) from None
    if not isinstance(data, dict):
        raise _not_a_policy(path)
    return data


def resolve_policy(
    spec: str, layers: list[Layer], ties: list[tuple[str, ...]], target: Target, *, deployable_only: bool = True
) -> Policy:
    """`uniform:<precision>` or a policy.json path -> a checked Policy over every layer.

    A uniform precision applies where the target can run it and leaves other layers at fp32 (a
    uniform w4a16 keeps convs float, since INT4 weight-only is a MatMul/Gemm format).
    """
    by_name = {layer.name: layer for layer in layers}
    if spec.startswith("uniform:"):
        wanted = precision(spec.split(":", 1)[1])
        chosen = {}
        for layer in layers:
            allowed = target.precisions_for(layer.op_type, deployable_only=deployable_only)
            chosen[layer.name] = wanted.name if wanted in allowed else "fp32"
        if all(name == "fp32" for name in chosen.values()) and not wanted.is_float:
            raise MpqcError(f"target '{target.name}' runs {wanted.name} on none of this model's layers")
        source = spec
    else:
        requested = Policy.load(spec)
        unknown = sorted(set(requested) - set(by_name))
        if unknown:
            raise MpqcError(
                f"policy '{spec}' names layer(s) not in the model: {', '.join(unknown[:5])}; run 'mpqc inspect' to list them"
            )
        chosen = {layer.name: requested.get(layer.name, "fp32") for layer in layers}
        source = f"file:{pathlib.Path(spec).name}"
    for name, value in chosen.items():
        target.check_precision(by_name[name].op_type, precision(value), deployable_only=deployable_only, layer=name)
    _check_ties(chosen, ties)
    return Policy(tuple((layer.name, chosen[layer.name]) for layer in layers), source)


def _check_ties(chosen: dict[str, str], ties: list[tuple[str, ...]]) -> None:
    for group in ties:
        values = {chosen[name] for name in group}
        if len(values) > 1:
            raise MpqcError(
                f"layers {', '.join(group)} share an input or weight and must have one precision, got {', '.join(sorted(values))}"
            )
