"""Auxiliary objectives beside the LM loss: what each does to a batch, and its loss.

    L_total = L_lm + lambda_moe * L_balance + sum over enabled objectives of lambda_o * L_o

Each objective is off by default and has its own switch and weight (`objectives:` in the job
config); each loss is logged under its own name (nsp_loss, span_boundary_loss, code_exec_loss).
The heads live in the model (`moray.model.aux_heads`); this module makes their labels:

- nsp: on `fraction` of a rank's sequences (at least one), the sequence is cut at a random point in
  its middle half; for half of those the part after the cut is replaced by the same positions of
  another sequence of the batch (label 0), the rest keep their own continuation (label 1). The LM
  target at the seam of a replaced sequence is ignored: it is no one's next token.
- span_boundary: per sequence, spans of geometric length (p = 0.2, at most `max_span`) are masked
  until `fraction` of its tokens are; a masked input token becomes the pad id (curated tokenizers
  reserve no mask token, and pad never occurs inside packed sequences). LM targets stay the original
  tokens; the head predicts each masked token from the span's boundaries.
- code_exec: labels come with the data (`data_contract.EXEC_LABELS_COLUMN`, made by curation's
  code_exec stage): 1 ran / 0 failed at each labelled code document's closing EOS.

The randomness is drawn from a generator seeded by (train.seed, the batch's first global sample),
so a resumed run corrupts the same sequences the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moray.model.aux_heads import IGNORE, code_exec_loss, nsp_loss, span_boundary_loss
from moray.platform.config import ConfigError


@dataclass
class NSPObjective:
    enabled: bool = False
    weight: float = 0.1
    fraction: float = 0.1  # of a rank's sequences, made into sentence pairs


@dataclass
class SpanBoundaryObjective:
    enabled: bool = False
    weight: float = 0.1
    fraction: float = 0.05  # of each sequence's tokens, masked in spans
    max_span: int = 10


@dataclass
class CodeExecObjective:
    enabled: bool = False
    weight: float = 0.1


@dataclass
class ObjectivesSection:
    nsp: NSPObjective = field(default_factory=NSPObjective)
    span_boundary: SpanBoundaryObjective = field(default_factory=SpanBoundaryObjective)
    code_exec: CodeExecObjective = field(default_factory=CodeExecObjective)

    def __post_init__(self) -> None:
        for name, o in self.items():
            if o.weight < 0:
                raise ConfigError(f"objectives.{name}.weight={o.weight}: must be >= 0")
            if hasattr(o, "fraction") and not 0 < o.fraction <= 1:
                raise ConfigError(f"objectives.{name}.fraction={o.fraction}: must be in (0, 1]")
        if self.span_boundary.max_span < 1:
            raise ConfigError(
                f"objectives.span_boundary.max_span={self.span_boundary.max_span}: must be >= 1"
            )

    def items(self):
        return (("nsp", self.nsp), ("span_boundary", self.span_boundary), ("code_exec", self.code_exec))

    @property
    def enabled(self) -> list[str]:
        """The model's aux_heads."""
        return [name for name, o in self.items() if o.enabled]

    def weight(self, name: str) -> float:
        return dict(self.items())[name].weight


@dataclass
class AuxTargets:
    """A micro-batch's labels for the enabled objectives (None where off)."""

    nsp: torch.Tensor | None = None  # (b,) 1 / 0 / IGNORE
    spans: torch.Tensor | None = None  # (n, 3) row, start, end
    tokens: torch.Tensor | None = None  # (b, T) the inputs before masking
    code_exec: torch.Tensor | None = None  # (b, T) 1 / 0 / IGNORE

    def to(self, device) -> AuxTargets:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return AuxTargets(move(self.nsp), move(self.spans), move(self.tokens), move(self.code_exec))

    def rows(self, lo: int, hi: int) -> AuxTargets:
        """The targets of sequences lo..hi-1 (a micro-batch of the rank's batch)."""
        spans = None
        if self.spans is not None:
            keep = (self.spans[:, 0] >= lo) & (self.spans[:, 0] < hi)
            spans = self.spans[keep] - torch.tensor([lo, 0, 0])
        cut = lambda t: None if t is None else t[lo:hi]  # noqa: E731
        return AuxTargets(cut(self.nsp), spans, cut(self.tokens), cut(self.code_exec))


def prepare(
    cfg: ObjectivesSection,
    seqs: torch.Tensor,  # (b, T + 1) the rank's packed windows
    exec_labels: torch.Tensor | None,  # (b, T + 1) from the data, or None
    pad_id: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, AuxTargets]:
    """(inputs (b, T), targets (b, T), AuxTargets) with the enabled objectives' changes applied."""
    seqs = seqs.clone()
    aux = AuxTargets()
    ignore_seam = torch.zeros_like(seqs, dtype=torch.bool)  # (b, T + 1) targets to drop
    if cfg.nsp.enabled:
        aux.nsp = _sentence_pairs(seqs, ignore_seam, cfg.nsp.fraction, generator)
    inputs, targets = seqs[:, :-1], seqs[:, 1:].masked_fill(ignore_seam[:, 1:], IGNORE)
    if cfg.span_boundary.enabled:
        aux.tokens = inputs.clone()
        aux.spans = _mask_spans(
            inputs, cfg.span_boundary.fraction, cfg.span_boundary.max_span, pad_id, generator
        )
    if cfg.code_exec.enabled:
        if exec_labels is None:
            raise ValueError("objectives.code_exec needs data with code-execution labels")
        # a label sits on a document's closing EOS; the hidden state there is the input position's
        aux.code_exec = exec_labels[:, :-1].long().masked_fill(exec_labels[:, :-1] < 0, IGNORE)
    return inputs.contiguous(), targets.contiguous(), aux


def _sentence_pairs(
    seqs: torch.Tensor, ignore: torch.Tensor, fraction: float, g: torch.Generator
) -> torch.Tensor:
    b, width = seqs.shape
    labels = torch.full((b,), IGNORE, dtype=torch.long)
    n = max(1, round(fraction * b))
    chosen = torch.randperm(b, generator=g)[:n]
    originals = seqs.clone()
    for i in chosen.tolist():
        cut = int(torch.randint(width // 4, 3 * width // 4 + 1, (1,), generator=g))
        real = b == 1 or bool(torch.rand((), generator=g) < 0.5)
        labels[i] = int(real)
        if not real:
            other = (i + 1 + int(torch.randint(b - 1, (1,), generator=g))) % b  # any sequence but i
            seqs[i, cut:] = originals[other, cut:]
            ignore[i, cut] = True  # the target that would predict the foreign token at the seam
    return labels


def _mask_spans(
    inputs: torch.Tensor, fraction: float, max_span: int, pad_id: int, g: torch.Generator
) -> torch.Tensor:
    b, T = inputs.shape
    spans = []
    budget = max(1, round(fraction * T))
    for row in range(b):
        masked = torch.zeros(T, dtype=torch.bool)
        tries = 0
        while int(masked.sum()) < budget and tries < 10 * budget:
            tries += 1
            length = min(max_span, T - 2, int(torch.empty(()).geometric_(0.2, generator=g)))  # >= 1
            start = int(torch.randint(1, T - length, (1,), generator=g))  # boundaries at start-1 and end
            end = start + length
            if masked[start - 1 : end + 1].any():  # disjoint spans, boundaries unmasked
                continue
            masked[start:end] = True
            spans.append((row, start, end))
        inputs[row, masked] = pad_id
    return torch.tensor(spans, dtype=torch.long).reshape(-1, 3)


def losses(cfg: ObjectivesSection, model, out, aux: AuxTargets) -> dict[str, torch.Tensor]:
    """Each enabled objective's unweighted loss, from the model's output (hidden states) and labels."""
    heads, h = model.aux_heads, out.hidden
    got = {}
    if aux.nsp is not None:
        got["nsp_loss"] = nsp_loss(heads, h, aux.nsp)
    if aux.spans is not None:
        got["span_boundary_loss"] = span_boundary_loss(heads, model.lm_head, h, aux.spans, aux.tokens)
    if aux.code_exec is not None:
        got["code_exec_loss"] = code_exec_loss(heads, h, aux.code_exec)
    return got


def weighted(cfg: ObjectivesSection | None, named: dict[str, torch.Tensor]) -> torch.Tensor | float:
    """sum of lambda_o * L_o (0 when no objective is on)."""
    return sum(cfg.weight(name.removesuffix("_loss")) * v for name, v in named.items()) if named else 0.0
