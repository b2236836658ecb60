"""cm-SSFT's shared-specific transfer network (SSTN; Lu et al., CVPR 2020, §3.2 and Eq. 22).

Every sample is a graph node. Its padded feature puts the specific feature in its modality's
slot (Eq. 5): Z^R = [P^R; H^R; 0], Z^I = [0; H^I; P^I]. Affinities use the specific features
inside a modality and the shared features across modalities, with
d(a, b) = 1 − ½ ||a/|a| − b/|b||| (Eq. 7), and each (row, modality block) keeps its top k (T(·, k),
Eq. 8). The padded features of all samples are stacked (Eq. 9) and propagated (Eq. 10):
Z̃ = ReLU(D^{-1/2} A D^{-1/2} Z W), D the diagonal of A's row sums; Feat^t (a BNNeck) turns Z̃
into the transferred feature T (Eq. 11).

Table 3's ablations of what is transferred: ``content="shared"`` pads Z = [0; H; 0] (ShT only),
``"specific"`` Z = [P^R; 0; P^I] (SpT only), ``"both"`` is Eq. 5.

The graph is held as neighbour lists — ``index`` (N, K) int64, ``-1`` pads, and ``weight`` (N, K) —
so memory is O(N·k): in a training batch the lists come from the dense B×B block affinities, at
test time from a k-nearest-neighbour search per block (:func:`searched_neighbours`). No N×N
matrix exists at test time.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vireid.models.heads import BNNeck, l2_normalize
from vireid.retrieval.knn import knn_search

_GATHER_ELEMENTS = 1 << 24  # gathered neighbour features per propagation chunk (64 MiB float32)
_EPS = 1e-12


def affinity(a: Tensor, b: Tensor) -> Tensor:
    """cm-SSFT Eq. 7: d(a_i, b_j) = 1 − ½ ||a_i/|a_i| − b_j/|b_j|||, as an (n, m) matrix (1 = identical direction).

    The distance is computed from differences, not from 2 − 2 cos, which loses the small
    distances to rounding."""
    distance = torch.cdist(l2_normalize(a.float()), l2_normalize(b.float()),
                           compute_mode="donot_use_mm_for_euclid_dist")
    return 1.0 - 0.5 * distance


def pair_affinity(a: Tensor, b: Tensor) -> Tensor:
    """cm-SSFT Eq. 7 row by row: d(a_i, b_i) for equally shaped (..., d) tensors."""
    return 1.0 - 0.5 * (F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).norm(dim=-1)


TRANSFER_CONTENTS: tuple[str, ...] = ("both", "shared", "specific")


def padded_features(shared: Tensor, specific: Tensor, modality: Tensor, content: str = "both") -> Tensor:
    """cm-SSFT Eq. 5: Z^R = [P^R; H^R; 0] for visible (modality 0), Z^I = [0; H^I; P^I] for infrared, (N, 3d).

    ``content`` ``"shared"`` zeroes the P segments, ``"specific"`` the H segment (Table 3, ShT / SpT)."""
    if content not in TRANSFER_CONTENTS:
        raise ValueError(f"content must be one of {TRANSFER_CONTENTS}, got {content!r}")
    zeros = torch.zeros_like(specific)
    if content == "shared":
        specific = zeros
    elif content == "specific":
        shared = torch.zeros_like(shared)
    visible = (modality == 0).unsqueeze(1)
    return torch.cat([torch.where(visible, specific, zeros), shared, torch.where(visible, zeros, specific)], dim=1)


def block_affinity(shared: Tensor, specific: Tensor, modality: Tensor) -> Tensor:
    """cm-SSFT Eq. 6–8 (dense, for a training batch): A_ij = d(P_i, P_j) when i, j share a modality,
    d(H_i, H_j) otherwise."""
    same_modality = modality.unsqueeze(0) == modality.unsqueeze(1)
    return torch.where(same_modality, affinity(specific, specific), affinity(shared, shared))


def batch_neighbours(shared: Tensor, specific: Tensor, modality: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """T(·, k) of cm-SSFT Eq. 8 in a batch: each row keeps its ``k`` largest affinities within every
    modality block (all of a block smaller than ``k``). Returns neighbour lists (index, weight);
    the weights keep their gradient."""
    dense = block_affinity(shared, specific, modality)
    indices, weights = [], []
    for m in torch.unique(modality).tolist():
        in_block = (modality == m).unsqueeze(0)
        keep = min(k, int(in_block.sum()))
        values, index = dense.masked_fill(~in_block, float("-inf")).topk(keep, dim=1)
        indices.append(index)
        weights.append(values)
    return torch.cat(indices, dim=1), torch.cat(weights, dim=1)


def searched_neighbours(shared: np.ndarray, specific: np.ndarray, modality: np.ndarray, k: int,
                         knn_method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """T(·, k) of cm-SSFT Eq. 8 from a k-nearest-neighbour search per (row modality, column modality)
    block: specific features inside a modality, shared across (Eq. 7 is monotone in the cosine, so
    the top k by cosine are the top k by d; d is then recomputed from the pairs). Returns
    (index (N, k·M), weight (N, k·M)), ``-1`` padding where a block has fewer than ``k`` members;
    memory O(N·k)."""
    modalities = np.unique(modality)
    index = np.full((len(modality), k * len(modalities)), -1, dtype=np.int64)
    weight = np.zeros(index.shape, dtype=np.float32)
    for slot, col_modality in enumerate(modalities):
        cols = np.flatnonzero(modality == col_modality)
        keep = min(k, len(cols))
        for row_modality in modalities:
            rows = np.flatnonzero(modality == row_modality)
            source = specific if row_modality == col_modality else shared
            found, _ = knn_search(source[rows], source[cols], keep, method=knn_method)
            slots = np.ix_(rows, np.arange(slot * k, slot * k + keep))
            index[slots] = cols[found]
            pairs = torch.from_numpy(np.ascontiguousarray(source[cols[found]], dtype=np.float32))
            weight[slots] = pair_affinity(torch.from_numpy(source[rows]).unsqueeze(1), pairs).numpy()
    return index, weight


def propagate(zw: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """cm-SSFT Eq. 10 on neighbour lists: Z̃ = ReLU(D^{-1/2} A D^{-1/2} (Z W)), D_ii = Σ_j A_ij.

    ``zw`` is Z W (N, d'); row i aggregates its listed neighbours j with A_ij / sqrt(D_ii D_jj).
    Rows are processed in chunks so at most ~16M gathered values exist at once.
    """
    valid = index >= 0
    weight = weight * valid
    safe = index.clamp(min=0)
    inv_sqrt_degree = weight.sum(dim=1).clamp(min=_EPS).rsqrt()
    normalised = weight * inv_sqrt_degree.unsqueeze(1) * inv_sqrt_degree[safe]
    chunk = max(1, _GATHER_ELEMENTS // max(1, index.shape[1] * zw.shape[1]))
    rows = [torch.einsum("nk,nkd->nd", normalised[s:s + chunk], zw[safe[s:s + chunk]])
            for s in range(0, len(index), chunk)]
    return F.relu(torch.cat(rows, dim=0))


class SharedSpecificTransfer(nn.Module):
    """The SSTN's learnable parts: W of Eq. 10 (3d -> ``out_dim``, no bias) and the BNNeck Feat^t (Eq. 11).
    ``content``: what the padded features carry (:func:`padded_features`)."""

    def __init__(self, dim: int, out_dim: int, num_classes: int, content: str = "both") -> None:
        super().__init__()
        self.content = content
        self.projection = nn.Linear(3 * dim, out_dim, bias=False)
        self.neck = BNNeck(out_dim, num_classes)

    def project(self, shared: Tensor, specific: Tensor, modality: Tensor) -> Tensor:
        """Z W with Z the padded features of Eq. 5 (Eq. 9 stacks them row by row)."""
        return self.projection(padded_features(shared, specific, modality, self.content))

    def forward(self, shared: Tensor, specific: Tensor, modality: Tensor,
                k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Transfer within a training batch: (Z̃ (B, d') of Eq. 10, Feat^t BN feature, identity logits,
        neighbour index (B, k·M) of Eq. 8)."""
        index, weight = batch_neighbours(shared, specific, modality, k)
        transferred = propagate(self.project(shared, specific, modality), index, weight)
        bn_feat, logits = self.neck(transferred)
        return transferred, bn_feat, logits, index

    def test_feature(self, transferred: Tensor) -> Tensor:
        """The test-time transferred feature T: the L2-normalised Feat^t BN feature of Z̃ (running statistics)."""
        bn = self.neck.bn
        shape = transferred.shape
        normed = F.batch_norm(transferred.reshape(-1, shape[-1]), bn.running_mean, bn.running_var, bn.weight,
                              bn.bias, training=False, eps=bn.eps)
        return l2_normalize(normed).reshape(shape)

    @torch.no_grad()
    def transfer_all(self, shared: Tensor, specific: Tensor, modality: Tensor, k: int,
                     knn_method: str = "auto") -> Tensor:
        """All-queries mode: the SSTN over every given node at once (query + gallery), T (N, d')."""
        index, weight = searched_neighbours(shared.numpy(), specific.numpy(), modality.numpy(), k, knn_method)
        zw = self.project(shared, specific, modality)
        return self.test_feature(propagate(zw, torch.from_numpy(index), torch.from_numpy(weight)))

    @torch.no_grad()
    def single_query_distance(self, query: tuple[Tensor, Tensor, Tensor], gallery: tuple[Tensor, Tensor, Tensor],
                              k: int, amplify: float, knn_method: str = "auto",
                              batch_size: int | None = None) -> Tensor:
        """cm-SSFT Eq. 22, single-query mode: each query alone with the gallery, distance (Q, G).

        ``query`` / ``gallery`` are (shared, specific, modality). For each query q the graph is
        q ∪ gallery; q forms its own block, so the left block column [A^qq; A^gq] has one entry per
        row and is multiplied by ``amplify`` (the paper's k). The gallery's own top-k lists do not
        depend on q and are searched once; per query only the degrees and q's row and column
        change. Distance: −<T_q, T_g> of the transferred features of that query's graph.
        """
        q_shared, q_specific, q_modality = query
        g_shared, g_specific, g_modality = gallery
        index, weight = searched_neighbours(g_shared.numpy(), g_specific.numpy(), g_modality.numpy(), k, knn_method)
        num_gallery = len(g_modality)
        rows, slots = np.nonzero(index >= 0)
        gallery_graph = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([rows, index[rows, slots]])), torch.from_numpy(weight[rows, slots]),
            (num_gallery, num_gallery), check_invariants=True).coalesce()
        gallery_degree = torch.from_numpy(weight.sum(axis=1))
        g_zw = self.project(g_shared, g_specific, g_modality)
        q_zw = self.project(q_shared, q_specific, q_modality)
        dim = g_zw.shape[1]
        batch_size = batch_size or max(1, _GATHER_ELEMENTS // max(1, num_gallery * dim))
        g_modalities = torch.unique(g_modality).tolist()
        distances = []
        for start in range(0, len(q_modality), batch_size):
            sl = slice(start, start + batch_size)
            same = q_modality[sl].unsqueeze(1) == g_modality.unsqueeze(0)
            to_gallery = torch.where(same, affinity(q_specific[sl], g_specific), affinity(q_shared[sl], g_shared))
            # the query's row: itself (amplified) and its top k in each gallery modality block
            row_weight = [torch.full((to_gallery.shape[0], 1), float(amplify))]
            row_index = [torch.full((to_gallery.shape[0], 1), -1, dtype=torch.long)]
            for m in g_modalities:
                in_block = (g_modality == m).unsqueeze(0)
                keep = min(k, int(in_block.sum()))
                values, found = to_gallery.masked_fill(~in_block, float("-inf")).topk(keep, dim=1)
                row_weight.append(values)
                row_index.append(found)
            q_weight, q_index = torch.cat(row_weight, dim=1), torch.cat(row_index, dim=1)
            column = amplify * to_gallery                                            # A^gq, amplified
            inv_g = (gallery_degree.unsqueeze(0) + column).rsqrt()                   # (b, G)
            inv_q = q_weight.sum(dim=1).rsqrt()                                      # (b,)
            neighbour_inv = torch.where(q_index >= 0, inv_g.gather(1, q_index.clamp(min=0)), inv_q.unsqueeze(1))
            q_out = F.relu(torch.einsum("bk,bkd->bd", q_weight * inv_q.unsqueeze(1) * neighbour_inv,
                                        torch.where((q_index >= 0).unsqueeze(2), g_zw[q_index.clamp(min=0)],
                                                    q_zw[sl].unsqueeze(1))))
            scaled = (inv_g.unsqueeze(2) * g_zw.unsqueeze(0)).permute(1, 0, 2).reshape(num_gallery, -1)
            spread = torch.sparse.mm(gallery_graph, scaled).reshape(num_gallery, -1, dim).permute(1, 0, 2)
            g_out = F.relu(inv_g.unsqueeze(2) * spread
                           + (column * inv_g * inv_q.unsqueeze(1)).unsqueeze(2) * q_zw[sl].unsqueeze(1))
            q_feat, g_feat = self.test_feature(q_out), self.test_feature(g_out)
            distances.append(-torch.einsum("bd,bgd->bg", q_feat, g_feat))
        return torch.cat(distances, dim=0)
