"""Auxiliary training heads on the final hidden states (moray extras, all off by default).

Each reads the last layer's normed hidden states h (B, T, H), the ones the LM head reads, and
adds its own loss beside the next-token loss; none changes the LM's forward, so a model with heads
gives the same logits as one without.

- nsp             next-sentence prediction (BERT): does the sequence's second part continue its
                  first? Read at the last position, which a causal model has seen the whole through.
- span_boundary   span-boundary objective (SpanBERT, Joshi et al. 2020): each token of a masked span
                  predicted from the hidden states just outside the span, h[s-1] and h[e], and its
                  offset in the span, through a 2-layer MLP and the model's own output head. With
                  causal attention h[e] has seen the span only as mask tokens, so nothing leaks.
- code_exec       code-execution correctness: does this code document run? Read at the document's
                  closing EOS, labelled during curation by running it in a sandbox.

Labels use -100 for "no label here", as F.cross_entropy's ignore_index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moray.model.config import ModelConfig

IGNORE = -100


class SpanBoundaryHead(nn.Module):
    """[h(s-1); h(e); p(offset)] (n, 3H) -> (n, H) ready for the output head (SpanBERT's f)."""

    def __init__(self, hidden: int, max_span: int):
        super().__init__()
        self.offset = nn.Embedding(max_span, hidden)
        self.mlp = nn.Sequential(
            nn.Linear(3 * hidden, hidden), nn.GELU(), nn.LayerNorm(hidden),
            nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden),
        )  # fmt: skip

    def forward(self, left: torch.Tensor, right: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([left, right, self.offset(offsets)], dim=-1))


class AuxHeads(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        H, heads = config.hidden_size, set(config.aux_heads or ())
        self.nsp = nn.Linear(H, 2) if "nsp" in heads else None
        self.code_exec = nn.Linear(H, 2) if "code_exec" in heads else None
        self.span_boundary = (
            SpanBoundaryHead(H, config.span_boundary_max_len) if "span_boundary" in heads else None
        )

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
            if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)


def nsp_loss(heads: AuxHeads, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, H), labels (B,): 1 the second part continues the first, 0 it does not."""
    logits = heads.nsp(hidden[:, -1]).float()  # (B, 2)
    return _mean_ce(logits, labels)


def code_exec_loss(heads: AuxHeads, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, H), labels (B, T): 1 ran, 0 failed, at code documents' closing EOS positions."""
    where = labels != IGNORE  # (B, T)
    logits = heads.code_exec(hidden[where]).float()  # (n, 2)
    return _mean_ce(logits, labels[where])


def span_boundary_loss(
    heads: AuxHeads,
    output_head: nn.Module,  # the model's lm_head: (.., H) -> (.., vocab)
    hidden: torch.Tensor,  # (B, T, H)
    spans: torch.Tensor,  # (n, 3) long: row, start, end — the span is start..end-1, 1 <= start < end < T
    tokens: torch.Tensor,  # (B, T) the original (unmasked) input tokens
) -> torch.Tensor:
    if spans.numel() == 0:  # a zero that still reaches the head: data parallelism expects its gradients
        return sum(p.sum() for p in heads.span_boundary.parameters()) * 0.0 + hidden.sum() * 0.0
    lengths = spans[:, 2] - spans[:, 1]  # (n,)
    span_of = torch.repeat_interleave(torch.arange(len(spans), device=spans.device), lengths)  # (m,)
    first = torch.repeat_interleave(spans[:, 1], lengths)
    offsets = torch.arange(len(span_of), device=spans.device) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths
    )  # (m,) position within its span
    rows, starts, ends = spans[span_of].unbind(-1)
    z = heads.span_boundary(hidden[rows, starts - 1], hidden[rows, ends], offsets)  # (m, H)
    logits = output_head(z).float()  # (m, vocab)
    return F.cross_entropy(logits, tokens[rows, first + offsets])


def _mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled rows; 0 (still in the graph) when none is labelled."""
    labels = labels.long()
    if bool((labels != IGNORE).any()):
        return F.cross_entropy(logits, labels, ignore_index=IGNORE)
    return logits.sum() * 0.0
