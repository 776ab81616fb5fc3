"""Insert quantizers: the one generic pass that acts on the annotations.

Contract: every request becomes a TensorQuantizer call on the requested tensor; requests for the same tensor
with the same spec share one quantizer node (so one Q/DQ pair feeds all of them); requests declared as
sharing a scale share one TensorQuantizer module; weighted modules get a weight quantizer. Each inserted
node records its pass and rule (``fxquant.provenance``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import fx

from fxquant.ops.quant_modules import with_weight_quantizer
from fxquant.passes.manager import PassResult
from fxquant.provenance import QuantizerSite, info
from fxquant.quantizer import TensorQuantizer
from fxquant.rules.context import Annotations
from fxquant.spec import QuantSpec

SlotKey = tuple[fx.Node, QuantSpec]


@dataclass
class _Slot:
    """One quantizer call site: a tensor quantized with one spec, for some or all of its users."""

    value: fx.Node
    spec: QuantSpec
    users: list[fx.Node] = field(default_factory=list)
    all_users: bool = False
    rules: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)  # the quantized units (rule matches) that asked for it
    asks: list[tuple[str | None, str | None]] = field(default_factory=list)  # (unit, user node or None = all)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[SlotKey, SlotKey] = {}

    def find(self, k: SlotKey) -> SlotKey:
        self.parent.setdefault(k, k)
        while self.parent[k] != k:
            self.parent[k] = self.parent[self.parent[k]]
            k = self.parent[k]
        return k

    def union(self, a: SlotKey, b: SlotKey) -> None:
        self.parent[self.find(b)] = self.find(a)


def _slots(ann: Annotations) -> tuple[dict[SlotKey, _Slot], list[SlotKey]]:
    slots: dict[SlotKey, _Slot] = {}
    keys: list[SlotKey] = []
    for r in ann.requests:
        key = (r.value, r.spec)
        slot = slots.setdefault(key, _Slot(r.value, r.spec))
        if r.user is None:
            slot.all_users = True
        elif r.user not in slot.users:
            slot.users.append(r.user)
        if r.rule not in slot.rules:
            slot.rules.append(r.rule)
        if r.unit is not None and r.unit not in slot.units:
            slot.units.append(r.unit)
        ask = (r.unit, None if r.user is None else r.user.name)
        if ask not in slot.asks:
            slot.asks.append(ask)
        keys.append(key)
    return slots, keys


def _groups(ann: Annotations, slots: dict[SlotKey, _Slot], keys: list[SlotKey]) -> _UnionFind:
    uf = _UnionFind()
    for a, b in ann.shares:
        uf.union(keys[a], keys[b])
    for values in ann.shared_values:
        members = [k for k in slots if k[0] in values]
        for other in members[1:]:
            uf.union(members[0], other)
    return uf


def _user_map(value: fx.Node, slots: list[_Slot]) -> dict[fx.Node, _Slot]:
    """Which slot feeds each user of ``value``: edge slots first, then the (first) all-users slot."""
    feeds: dict[fx.Node, _Slot] = {}
    for slot in slots:
        for user in slot.users:
            feeds.setdefault(user, slot)
    broad = [s for s in slots if s.all_users]
    if len(broad) > 1:
        warnings.warn(f"`{value.name}` was asked to be quantized with {len(broad)} different specs for all users; "
                      f"using the first ({broad[0].rules})", stacklevel=3)
    if broad:
        for user in value.users:
            feeds.setdefault(user, broad[0])
    return feeds


def insert_quantizers(gm: fx.GraphModule, ann: Annotations) -> PassResult:
    """Insert activation quantizers and attach weight quantizers, as annotated."""
    slots, keys = _slots(ann)
    uf = _groups(ann, slots, keys)
    modules: dict[SlotKey, str] = {}
    graph = gm.graph
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1:]
    by_value: dict[fx.Node, list[_Slot]] = {}
    for slot in slots.values():
        by_value.setdefault(slot.value, []).append(slot)
    for value, value_slots in by_value.items():
        feeds = _user_map(value, value_slots)
        anchor = last_placeholder[0] if value.op == "placeholder" else value
        for slot in value_slots:
            users = [u for u, s in feeds.items() if s is slot]
            if not users:
                continue
            root = uf.find((slot.value, slot.spec))
            if root not in modules:
                rs = slots[root]
                suffix = "" if rs.all_users or len(rs.users) != 1 else f"_to_{rs.users[0].name}"
                name = _free_name(gm, f"{rs.value.name}{suffix}_quantizer")
                gm.add_submodule(name, TensorQuantizer(rs.spec, constant=rs.value.op == "get_attr").train(gm.training))
                modules[root] = name
            with graph.inserting_after(anchor):
                q = graph.call_module(modules[root], (value,))
            q.meta["tensor_meta"] = value.meta.get("tensor_meta")
            record = info(q)
            record.made_by = "insert_quantizers"
            record.quantizer = QuantizerSite(value.name, list(slot.rules), list(slot.units), list(slot.asks))
            for user in users:
                user.replace_input_with(value, q)
    for node, (spec, rule) in ann.weights.items():
        module = gm.get_submodule(node.target)
        if not hasattr(module, "weight_quantizer"):
            quantizer = TensorQuantizer(spec, constant=True).train(module.training)
            gm.set_submodule(node.target, with_weight_quantizer(module, quantizer))
        info(node).weight_rule = rule
    return PassResult(gm, modified=bool(slots or ann.weights))


def _free_name(gm: fx.GraphModule, name: str) -> str:
    candidate, i = name, 1
    while hasattr(gm, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate

