"""Checkpoints of other code bases (LAVIS, the BLIP and ALBEF repositories) onto transformers modules by an explicit
key map: every key of the file is mapped or ignored for a stated reason; anything else is refused by name, and so
is any weight of the model that the file does not fill.

A rule's pattern is a key with placeholders: ``{i}`` a layer number, ``{rest}`` the rest of the key. Its target
uses the same placeholders (None: the key is ignored, and ``why`` says why). The first rule that matches decides.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from data.errors import PipelineError
from data.torch_files import load_pt

_PLACEHOLDERS = {"i": r"\d+", "rest": r".+"}


def _regex(pattern: str) -> re.Pattern:
    out = re.escape(pattern)
    for name, rx in _PLACEHOLDERS.items():
        out = out.replace(re.escape("{" + name + "}"), f"(?P<{name}>{rx})")
    return re.compile(out)


@dataclass(frozen=True)
class Rule:
    source: str  # the file's key pattern
    target: str | None  # the model's key pattern; None: ignored on purpose
    why: str = ""  # why an ignored key plays no part in the features
    when: Callable[[dict], bool] | None = None  # a further condition on the placeholders (e.g. a layer range)
    _rx: re.Pattern = field(init=False, repr=False, compare=False)
    _target_rx: re.Pattern | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_rx", _regex(self.source))
        object.__setattr__(self, "_target_rx", _regex(self.target) if self.target else None)

    def match(self, key: str) -> dict | None:
        m = self._rx.fullmatch(key)
        if m is None or (self.when is not None and not self.when(m.groupdict())):
            return None
        return m.groupdict()

    def source_of(self, target_key: str) -> str | None:
        """The file's key this rule would map onto ``target_key`` (None if it would not)."""
        m = self._target_rx.fullmatch(target_key) if self._target_rx else None
        if m is None or (self.when is not None and not self.when(m.groupdict())):
            return None
        return self.source.format(**m.groupdict())


def ignore(*sources: str, why: str) -> tuple[Rule, ...]:
    return tuple(Rule(s, None, why) for s in sources)


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth``: ``{"model": state_dict, ...}`` (other entries, e.g. an optimizer, unused) or a bare
    state dict, read with ``weights_only=True``."""
    if not Path(path).is_file():
        raise PipelineError(f"{what} {path}: no such file")
    obj = load_pt(path, what)
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise PipelineError(f"{what} {path}: not a state dict (a dict of tensors, or one under 'model')")
    return state


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def apply_rules(state: dict[str, torch.Tensor], rules: tuple[Rule, ...], what: str
                ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(the model's tensors by its key names, {reason: keys ignored for it}); an unknown key is refused by name."""
    mapped, sources, ignored, unknown = {}, {}, {}, []
    for key, value in state.items():
        for rule in rules:
            groups = rule.match(key)
            if groups is not None:
                break
        else:
            unknown.append(key)
            continue
        if rule.target is None:
            ignored[rule.why] = ignored.get(rule.why, 0) + 1
            continue
        target = rule.target.format(**groups)
        if target in mapped:
            raise PipelineError(f"{what}: keys {sources[target]} and {key} would both fill {target}")
        mapped[target], sources[target] = value, key
    if unknown:
        raise PipelineError(f"{what}: {len(unknown)} keys are neither mapped nor known to be unused: {_names(unknown)}")
    return mapped, ignored


def load_mapped(model: torch.nn.Module, mapped: dict[str, torch.Tensor], rules: tuple[Rule, ...], what: str) -> None:
    """Load ``mapped`` into ``model`` exactly: a weight the file lacks, or one of another shape, is refused by the
    file's key name."""
    def source(target: str) -> str:
        return next((s for s in (r.source_of(target) for r in rules) if s), target)

    expected = model.state_dict()
    missing = [source(k) for k in expected if k not in mapped]
    if missing:
        raise PipelineError(f"{what}: missing {len(missing)} keys: {_names(missing)}")
    extra = [source(k) for k in mapped if k not in expected]
    if extra:
        raise PipelineError(f"{what}: {len(extra)} keys have no place in the model: {_names(extra)}")
    wrong = [f"{source(k)} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
             for k, v in mapped.items() if v.shape != expected[k].shape]
    if wrong:
        raise PipelineError(f"{what}: {len(wrong)} keys of the wrong shape: {_names(wrong)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in mapped.items()}, strict=True)


def tensor(state: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    """``state[key]``, or a refusal naming the key a config is read from."""
    if key not in state:
        raise PipelineError(f"{what}: missing key {key}")
    return state[key]
