"""What :func:`~lightning_bn.norms.insert_norms` and :func:`~lightning_bn.norms.convert_norms` report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["NormConversion", "NormInsertion", "NormReport"]


@dataclass
class NormInsertion:
    """One inserted norm: after which layer, where, what, and whether the layer's bias went."""

    layer: str
    norm: str
    module: str
    position: str
    shape: tuple[int, ...]
    bias_removed: bool = False


@dataclass
class NormConversion:
    """One converted norm: its name after the change, the classes before and after, and the state carried over."""

    name: str
    before: str
    after: str
    carried: list[str] = field(default_factory=list)


@dataclass
class NormReport:
    """What :func:`insert_norms` / :func:`convert_norms` did, including every ``state_dict`` key renamed or removed.

    ``renamed_keys`` maps old to new keys: ``{renamed_keys.get(k, k): v for k, v in old.items()}`` moves an old
    state dict onto the changed model (drop ``removed_keys`` first).
    """

    insertions: list[NormInsertion] = field(default_factory=list)
    conversions: list[NormConversion] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    renamed_keys: dict[str, str] = field(default_factory=dict)
    removed_keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "insertions": [asdict(i) for i in self.insertions],
            "conversions": [asdict(c) for c in self.conversions],
            "skipped": [{"layer": n, "reason": r} for n, r in self.skipped],
            "renamed_keys": dict(self.renamed_keys),
            "removed_keys": list(self.removed_keys),
        }

    def lines(self) -> list[str]:
        out = [
            f"inserted {i.module} as {i.norm} after {i.layer}"
            + (" (pre-activation)" if i.position == "pre" else " (post-activation)")
            + ("; its bias removed (redundant)" if i.bias_removed else "")
            for i in self.insertions
        ]
        out += [f"converted {c.name}: {c.before} -> {c.after} (carried {', '.join(c.carried) or 'nothing'})"
                for c in self.conversions]  # fmt: skip
        out += [f"skipped {n}: {r}" for n, r in self.skipped]
        out += [f"renamed key {old} -> {new}" for old, new in self.renamed_keys.items()]
        out += [f"removed key {k}" for k in self.removed_keys]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())
