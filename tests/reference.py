"""Slow, obvious reference implementations (loops over images, pixels and classes) written
from docs/method.md's words and the released code's control flow (MKSAQW/MCCL: MCCL.py, prote.py;
UniMatch's util/ohem.py). The tests compare mlcl.losses / mlcl.prototypes against these on
small random inputs. Nothing here is fast or used outside the tests."""
from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F

EPS = 1e-6


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of two vectors, norms clamped at EPS."""
    return (a @ b) / (a.norm().clamp(min=EPS) * b.norm().clamp(min=EPS))


def pixel_ce(logits_px: torch.Tensor, k: int) -> torch.Tensor:
    """-log softmax(logits)[k] of one pixel's logit vector (K,)."""
    return -(logits_px[k] - torch.logsumexp(logits_px, 0))


def ref_ce(logits, target, ignore_index=255):
    total, n = 0.0, 0
    B, K, H, W = logits.shape
    for b in range(B):
        for y in range(H):
            for x in range(W):
                t = int(target[b, y, x])
                if t == ignore_index:
                    continue
                total += float(pixel_ce(logits[b, :, y, x], t))
                n += 1
    return total / max(n, 1)


def ref_pseudo_label_ce(logits, pseudo, conf, ignore, tau, ignore_index=255):
    """Sum of CE over confident, non-ignored pixels / number of non-ignored pixels."""
    total, n_valid = 0.0, 0
    B, K, H, W = logits.shape
    for b in range(B):
        for y in range(H):
            for x in range(W):
                if int(ignore[b, y, x]) == ignore_index:
                    continue
                n_valid += 1
                if float(conf[b, y, x]) >= tau:
                    total += float(pixel_ce(logits[b, :, y, x], int(pseudo[b, y, x])))
    return total / max(n_valid, 1)


def ref_ohem(logits, target, ignore_index, thresh, min_kept):
    """UniMatch's ProbOhemCrossEntropy2d, literally (sort, threshold index, le)."""
    B, K, H, W = logits.shape
    tgt = target.reshape(-1).clone()
    valid = tgt != ignore_index
    tgt = tgt * valid.long()
    num_valid = int(valid.sum())
    prob = logits.softmax(1).transpose(0, 1).reshape(K, -1)
    if min_kept > num_valid:
        pass
    elif num_valid > 0:
        prob = prob.masked_fill(~valid, 1)
        mask_prob = prob[tgt, torch.arange(len(tgt))]
        threshold = thresh
        if min_kept > 0:
            index = mask_prob.argsort()
            threshold_index = index[min(len(index), min_kept) - 1]
            if mask_prob[threshold_index] > thresh:
                threshold = mask_prob[threshold_index]
            kept = mask_prob.le(threshold)
            valid = valid & kept
    flat = logits.permute(0, 2, 3, 1).reshape(-1, K)
    total, n = 0.0, 0
    for i in range(flat.shape[0]):
        if valid[i]:
            total += float(pixel_ce(flat[i], int(tgt[i])))
            n += 1
    return total / max(n, 1)


def ref_p2p(f_w, f_s):
    B, C, h, w = f_w.shape
    vals = [1 - float(cos(f_w[b, :, y, x], f_s[b, :, y, x]))
            for b in range(B) for y in range(h) for x in range(w)]
    return sum(vals) / len(vals)


def ref_similarity(f_w, f_s):
    B, C, h, w = f_w.shape
    return torch.tensor([sum(float(cos(f_w[b, :, y, x], f_s[b, :, y, x]))
                             for y in range(h) for x in range(w)) / (h * w) for b in range(B)])


def ref_sai_mse(prob, target, valid=None):
    B, K, H, W = prob.shape
    total, n = 0.0, 0
    for b in range(B):
        for y in range(H):
            for x in range(W):
                if valid is not None and not bool(valid[b, y, x]):
                    continue
                for k in range(K):
                    total += float((prob[b, k, y, x] - target[b, k, y, x]) ** 2)
                    n += 1
    return total / max(n, 1)


def ref_sai_weight(it, total, beta, k):
    r = math.exp(-k * (1 - min(it, total) / total) ** 2)
    return beta * r ** 2


def _rows(f):
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


def ref_dt(f_w, conf_w, label_w, valid_w, f_s, valid_s, protos, conf_thresh=0.95,
           num_anchors=16, num_candidates=256, pair_by_position=False,
           duplicate_top_anchor=False, normalise_by_candidates=False, keep_uninitialised=False):
    """L_dt with a loop over the classes, in the released code's list structure."""
    fw, fs = _rows(f_w).detach(), _rows(f_s)
    lab, conf = label_w.reshape(-1), conf_w.reshape(-1)
    vw, vs = valid_w.reshape(-1), valid_s.reshape(-1)
    K = protos.shape[0]
    anchor_groups, cand_groups = {}, {}
    for k in range(K):
        if not keep_uninitialised and bool((protos[k] == 0).all()):
            continue  # paper: a class without a prototype yet sits out of this step
        # anchors: confident, valid weak features of class k, most similar to rho_k
        rows = [i for i in range(fw.shape[0]) if lab[i] == k and conf[i] > conf_thresh and vw[i]]
        if rows:
            sims = [float(cos(fw[i], protos[k])) for i in rows]
            order = sorted(range(len(rows)), key=lambda j: -sims[j])
            m = min(num_anchors, len(rows))
            if duplicate_top_anchor:
                picked = [order[0]] + [order[j - 1] for j in range(1, m)]
            else:
                picked = order[:m]
            anchor_groups[k] = [rows[j] for j in picked]
        # candidates: valid strong features with weak label k, least similar to rho_k
        rows = [i for i in range(fs.shape[0]) if lab[i] == k and vs[i]]
        if rows:
            sims = [float(cos(fs[i].detach(), protos[k])) for i in rows]
            order = sorted(range(len(rows)), key=lambda j: sims[j])
            cand_groups[k] = [rows[j] for j in order[:min(num_candidates, len(rows))]]
    a_classes = sorted(anchor_groups)
    c_classes = sorted(cand_groups)
    if pair_by_position:
        pairs = [(a_classes[i], c_classes[i]) for i in range(min(len(a_classes), len(c_classes)))]
    else:
        pairs = [(k, k) for k in a_classes if k in cand_groups]
    total = torch.zeros(())
    n_anchors, n_cands = 0, 0
    for ka, kc in pairs:
        for i in anchor_groups[ka]:
            a = F.normalize(fw[i], dim=0)
            best = max(a @ F.normalize(fs[j], dim=0) for j in cand_groups[kc])
            total = total + best
            n_anchors += 1
        n_cands += len(cand_groups[kc])
    den = n_cands if normalise_by_candidates else n_anchors
    if den == 0:
        return torch.zeros(())
    return 1 - total / den


def ref_bank_update(protos, feats, labels, conf, valid, momentum, conf_thresh, early_stop):
    """prote.py's update_memory on one process: classes in ascending order, a flag per call."""
    protos = protos.clone()
    fr = _rows(feats) if feats.dim() == 4 else feats
    lab, cf, vd = labels.reshape(-1), conf.reshape(-1), valid.reshape(-1)
    need_update = True
    for k in range(protos.shape[0]):
        rows = [i for i in range(fr.shape[0]) if lab[i] == k and cf[i] > conf_thresh and vd[i]]
        if not rows:
            continue
        mean = torch.stack([fr[i] for i in rows]).mean(0)
        if bool((protos[k] == 0).all()):
            protos[k] = mean
            if early_stop:
                need_update = False
            continue
        if not need_update:
            continue
        protos[k] = momentum * protos[k] + (1 - momentum) * mean
    return protos


def ref_resize_ignore_released(ignore, size):
    """prote.py: bilinear (align_corners) with the batch as channels, then .long()."""
    x = F.interpolate(ignore.unsqueeze(0).float(), size=size, mode="bilinear",
                      align_corners=True).squeeze(0).long()
    return x != 255


def ref_resize_ignore_paper(ignore, size, ignore_index=255):
    """Per feature pixel (i, j): the input pixel under it when the model upsamples with
    align_corners=True, round(i (H - 1) / (h - 1)) (halves up), in exact fractions."""
    B, H, W = ignore.shape
    h, w = size

    def src(i, n_in, n_out):
        if n_out == 1:
            return 0
        return math.floor(Fraction(i * (n_in - 1), n_out - 1) + Fraction(1, 2))

    out = torch.zeros(B, h, w, dtype=torch.bool)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                out[b, i, j] = int(ignore[b, src(i, H, h), src(j, W, w)]) != ignore_index
    return out


def ref_bank_processes(protos, shards, momentum, conf_thresh, early_stop, average_banks):
    """The bank after one step on n processes, shard r = (feats, labels, conf, valid) of
    process r. average_banks: each process runs prote.py's loop on its shard, then the banks
    are averaged; else the loop runs once on all shards' features together."""
    if average_banks:
        banks = [ref_bank_update(protos, *shard, momentum, conf_thresh, early_stop)
                 for shard in shards]
        return torch.stack(banks).mean(0)
    rows = [(_rows(f) if f.dim() == 4 else f, lab.reshape(-1), c.reshape(-1), v.reshape(-1))
            for f, lab, c, v in shards]
    joined = [torch.cat([r[i] for r in rows]) for i in range(4)]
    return ref_bank_update(protos, *joined, momentum, conf_thresh, early_stop)
