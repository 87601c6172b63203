"""label-affinity-scorer, in Python: the same plugin as ../label-affinity-scorer (Rust),
built into a component with componentize-py from the same WIT. It prefers endpoints by the
value of one label, with scores from the config's `parameters`:

    {"label": "gpu", "scores": {"H100": 1.0, "A100": 0.5}, "default": 0.0}

Its manifest asks for the pool (labels) and nothing per request, so the host sends it no
prompt, no headers and no columns, and never calls its hooks.
"""

import json
import math

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import types


class _State:
    label = ""
    scores = {}
    default = 0.0
    by_endpoint = {}


def _check(name, value):
    if not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0) or math.isnan(value):
        raise Err(f"score for `{name}` must be a number in [0, 1], got {value!r}")
    return float(value)


class Plugin(exports.Plugin):
    def configure(self, params_json: str) -> types.Manifest:
        try:
            params = json.loads(params_json or "{}") or {}
        except ValueError as e:
            raise Err(f"invalid parameters: {e}")
        if not isinstance(params, dict):
            raise Err("invalid parameters: expected an object of named parameters")
        unknown = set(params) - {"label", "scores", "default"}
        if unknown:
            raise Err(f"invalid parameters: unknown field `{sorted(unknown)[0]}`")
        label = params.get("label", "")
        if not isinstance(label, str) or not label:
            raise Err("parameter `label` is required")
        scores = params.get("scores", {})
        if not isinstance(scores, dict):
            raise Err("parameter `scores` must be a mapping of label values to scores")
        _State.label = label
        _State.scores = {str(k): _check(k, v) for k, v in scores.items()}
        _State.default = _check("default", params.get("default", 0.0))
        needs = types.Needs(
            model=False, prompt=False, headers=False, pool=True, decided=False, first_chunk=False, finished=False
        )
        return types.Manifest(needs=needs, reads=[], writes=[], stateless=True)

    def pool_changed(self, generation: int, endpoints) -> None:
        by_endpoint = {}
        for e in endpoints:
            value = dict(e.labels).get(_State.label)
            by_endpoint[e.id] = _State.scores.get(value, _State.default)
        _State.by_endpoint = by_endpoint


class Hooks(exports.Hooks):
    # Not called: the manifest asks for none of them.
    def decided(self, cycle: int, endpoint: int):
        return []

    def first_chunk(self, cycle: int, endpoint: int, now_ms: int) -> None:
        pass

    def finished(self, cycle: int, completion) -> None:
        pass


class Scorer(exports.Scorer):
    def score(self, cycle):
        return [_State.by_endpoint.get(i, _State.default) for i in cycle.ids]
