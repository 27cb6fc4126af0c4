"""Answer-only loss with the LM head computed only where a label is.

The cross-entropy of a causal LM needs logits only at positions whose *next* token is a label
(an answer token). The usual path projects every position onto the vocabulary, (B x T x V): on
SmolLM2's 49k vocabulary that is a large share of the step, mostly spent on prompt tokens whose
loss is thrown away. We hand transformers a boolean ``logits_to_keep`` mask (B x T), which makes the
model gather those hidden states *before* its LM head (and apply its final soft-capping, as Gemma
does), and get (N x V) logits for the N labelled positions only.

The module returns the *sum* of the token losses and their count, so that the loop can normalise
by the number of answer tokens in the whole (accumulated, multi-process) batch: every answer token
weighs the same whatever micro-batch or process it lands on.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from forgetless.data.formatting import IGNORE_INDEX


def label_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Where logits are needed and what they must predict.

    Args:
        labels: (B, T) long, ``IGNORE_INDEX`` on prompt and padding.

    Returns:
        ``keep`` (B, T) bool: position t is kept when token t+1 is labelled (the last position never);
        ``targets`` (N,) long: the labels those positions predict, in row-major order.
    """
    next_labels = labels[:, 1:]
    wanted = next_labels != IGNORE_INDEX
    keep = F.pad(wanted, (0, 1), value=False)
    return keep, next_labels[wanted]


def supports_logits_mask(model: nn.Module) -> bool:
    """True when ``model.forward`` takes ``logits_to_keep`` (transformers >= 5 gathers before the head)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def labelled_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, keep: Tensor) -> Tensor:
    """(N, V) logits at the ``keep`` positions (N = keep.sum()).

    Models without ``logits_to_keep`` fall back to full logits and a gather: same numbers, slower.
    """
    if supports_logits_mask(model):
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False
        ).logits
        if logits.dim() == 2:
            return logits
        # a model that ignores the mask's form returns (B, T, V): gather ourselves
        return logits[keep]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits[keep]


class AnswerOnlyLoss(nn.Module):
    """Wraps a causal LM so that one ``forward`` returns ``(loss_sum, token_count)``.

    A module (not a function) so that DDP, which synchronises gradients through the forward of the
    module it wraps, sees the whole computation.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask, labels: (B, T). Returns the summed cross-entropy () and N ()."""
        keep, targets = label_positions(labels)
        logits = labelled_logits(self.model, input_ids, attention_mask, keep)
        loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        return loss_sum, torch.tensor(targets.numel(), device=loss_sum.device)


def answer_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy over the answer tokens of ``batch`` (``collate`` output): a scalar."""
    loss_sum, count = AnswerOnlyLoss(model)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    return loss_sum / count.clamp(min=1)
