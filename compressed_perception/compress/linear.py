"""A convolution as the linear map least squares fits: patches, Gram matrices, ridge solves.

Pruning's scan and reconstruction both refit convolutions from their input statistics; the
arithmetic is here once. A conv's weights and bias are one (features + 1, out) matrix that
multiplies a row of its input patch followed by a 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GRAM_ROWS = 16384  # input positions per batch that estimate a layer's input statistics


def patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(samples, cin * kh * kw) rows in the order of `conv.weight.flatten(1)`."""
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1):
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def with_ones(rows: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Rows in `dtype` with the bias's column of ones appended (one pass, no concatenation:
    these are the largest tensors least squares makes)."""
    out = torch.empty(len(rows), rows.shape[1] + 1, dtype=dtype, device=rows.device)
    out[:, :-1] = rows
    out[:, -1] = 1.0
    return out


def gram(conv: nn.Conv2d, x: torch.Tensor, rows: int = GRAM_ROWS) -> torch.Tensor:
    """X^T X of the conv's input patches with a ones column, on at most `rows` positions
    spread over the batch (enough to estimate it; all of them cost minutes)."""
    found = patches(conv, x)
    if len(found) > rows:
        found = found[:: -(-len(found) // rows)]
    found = with_ones(found)
    return found.T @ found


def weight_matrix(conv: nn.Conv2d) -> torch.Tensor:
    """(features + 1, out) float64: the weights, then the bias as the last row."""
    return torch.cat((conv.weight.flatten(1), conv.bias[:, None]), dim=1).T.double()


def set_weight_matrix(conv: nn.Conv2d, matrix: torch.Tensor) -> None:
    with torch.no_grad():
        conv.weight.copy_(matrix[:-1].T.reshape(conv.weight.shape).float())
        conv.bias.copy_(matrix[-1].float())


def ridge_solve(gram_matrix: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W ||XW - Y||^2 + lambda ||W||^2 from X^T X and X^T Y, lambda being `ridge`
    times the mean input variance; the bias (last row) is not shrunk."""
    size = gram_matrix.shape[0]
    scale = ridge * float(gram_matrix.diagonal()[:-1].mean())
    regulariser = torch.eye(size, dtype=gram_matrix.dtype, device=gram_matrix.device) * scale
    regulariser[-1, -1] = 0.0
    return torch.linalg.solve(gram_matrix + regulariser, cross)
