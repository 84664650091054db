"""Hugging Face DeepSeek-V2 directories in and out: config.json + *.safetensors, and on export
the tokenizer files and generation_config.json that make `transformers` stop at eos.

On disk, routed experts use the published per-expert names
`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`; in memory they are stacked
(E, 2I, H) / (E, H, I) for grouped matmuls. Loading builds the model on the meta device and
assigns tensors file by file, so a checkpoint is never held twice. Only safetensors are read:
no pickle ever runs on a downloaded file.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moray.model.config import ModelConfig
from moray.model.router import contiguous_device_map
from moray.model.transformer import Transformer

_EXPERT_KEY = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_SKIP_KEY = re.compile(r"rotary_emb\.inv_freq$")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")
SHARD_BYTES = 4 * 1024**3

# moray's one default chat template (exports write it to tokenizer_config.json; the serving engine
# uses it for a directory that has none): role-tagged turns, then the assistant's cue.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _our_name(hf_name: str) -> str:
    return hf_name[len("model.") :] if hf_name.startswith("model.") else hf_name


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    routed_experts: bool = True,
    layers: Iterable[int] | None = None,
    ends: bool = True,
) -> Transformer:
    """Load a HF DeepSeek-V2 directory (the original release or transformers 5 format).
    dtype None keeps the checkpoint's dtype; the default float32 suits CPUs. What is not asked for
    stays unread (on the meta device): routed_experts=False, the routed experts (a serving replica
    whose experts live in expert shards, `load_routed_experts`); `layers`, only these decoder
    layers; ends=False, no embedding, final norm or head (a serving pipeline stage's part)."""
    path = Path(path)
    config, files = _config_and_files(path)
    layers = set(range(config.num_hidden_layers) if layers is None else layers)

    def wanted(name: str) -> bool:
        m = _LAYER_KEY.match(name)
        if m is None:
            return ends or name.startswith("rotary.")
        return int(m[1]) in layers and (routed_experts or ".mlp.experts." not in name)

    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = defaultdict(dict)
    E = config.n_routed_experts

    def put(name: str, tensor: torch.Tensor) -> None:
        if name not in expected:
            raise ValueError(f"unexpected weight {name!r} in {path}: does config.json match the weights?")
        want = expected[name].shape
        if tensor.shape != want:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, config implies {tuple(want)}")
        state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for hf_name in f.keys():
                name = _our_name(hf_name)
                if _SKIP_KEY.search(name) or not wanted(name):
                    continue
                m = _EXPERT_KEY.match(name)
                if m:  # per-expert tensor: stack when the layer's set is complete
                    layer, e, proj = int(m[1]), int(m[2]), m[3]
                    experts[(layer, proj)][e] = f.get_tensor(hf_name)
                    group = experts[(layer, "gate")], experts[(layer, "up")], experts[(layer, "down")]
                    if all(len(g) == E for g in group):
                        gate, up, down = (torch.stack([g[i] for i in range(E)]) for g in group)
                        put(f"layers.{layer}.mlp.experts.gate_up_proj", torch.cat([gate, up], dim=1))
                        put(f"layers.{layer}.mlp.experts.down_proj", down)
                        for proj_name in ("gate", "up", "down"):
                            del experts[(layer, proj_name)]
                else:
                    put(name, f.get_tensor(hf_name))
    if experts:
        partial = sorted({layer for layer, _ in experts})
        raise ValueError(f"incomplete expert weights in layers {partial} of {path}")
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing = [
        k for k in expected if k not in state and not (config.tie_word_embeddings and k == "lm_head.weight")
        and wanted(k)
    ]  # fmt: skip
    if missing:
        raise ValueError(f"{path} lacks weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings and ends:
        model.lm_head.weight = model.embed_tokens.weight
    _materialize_buffers(model, device)
    return model.eval()


def _config_and_files(path: Path) -> tuple[ModelConfig, list[Path]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a model directory: no config.json")
    config = ModelConfig.from_hf_dict(json.loads(config_file.read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (pickle checkpoints are not loaded)")
    return config, files


def load_routed_experts(
    path: str | Path, held: dict[int, tuple[int, ...]], dtype: torch.dtype = torch.float32
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Only the routed experts `held` ({layer: expert ids}) of a HF directory, stacked in that
    order: {layer: (gate_up (n, 2I, H), down (n, H, I))}. What an expert shard holds."""
    _, files = _config_and_files(Path(path))
    found: dict[tuple[int, int, str], torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for hf_name in f.keys():
                m = _EXPERT_KEY.match(_our_name(hf_name))
                if m and int(m[2]) in held.get(int(m[1]), ()):
                    found[(int(m[1]), int(m[2]), m[3])] = f.get_tensor(hf_name).to(dtype)
    out = {}
    for layer, experts in held.items():
        lost = [e for e in experts for p in ("gate", "up", "down") if (layer, e, p) not in found]
        if lost:
            raise ValueError(f"{path}: layer {layer} lacks weights of experts {sorted(set(lost))}")
        gate_up = torch.stack(
            [torch.cat([found[(layer, e, "gate")], found[(layer, e, "up")]]) for e in experts]
        )
        down = torch.stack([found[(layer, e, "down")] for e in experts])
        out[layer] = (gate_up, down)
    return out


def _materialize_buffers(model: Transformer, device) -> None:
    """Non-persistent buffers (RoPE tables, expert placement) are computed, not loaded."""
    from moray.model.rope import RotaryEmbedding

    fresh = RotaryEmbedding(model.config)
    for name, buf in fresh.named_buffers():
        setattr(model.rotary, name, buf.to(device))
    for _, moe in model.moe_layers():
        moe.device_of_expert = contiguous_device_map(model.config.n_routed_experts, model.config.ep_size).to(
            device
        )


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under the published HF names (per-expert tensors split out)."""
    out: dict[str, torch.Tensor] = {}
    I = model.config.moe_intermediate_size  # noqa: E741
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        hf = name if name.startswith("lm_head.") else f"model.{name}"
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = hf[: -len("gate_up_proj")]
            for e, w in enumerate(tensor):
                out[f"{prefix}{e}.gate_proj.weight"] = w[:I].contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = w[I:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = hf[: -len("down_proj")]
            for e, w in enumerate(tensor):
                out[f"{prefix}{e}.down_proj.weight"] = w.contiguous()
        else:
            out[hf] = tensor.contiguous()
    return out


def save_pretrained(
    model: Transformer,
    path: str | Path,
    tokenizer: str | Path | None = None,
    chat_template: str = DEFAULT_CHAT_TEMPLATE,
) -> Path:
    """Write a directory that `transformers` loads: config.json, *.safetensors and
    generation_config.json; with `tokenizer` (a tokenizer.json, or a directory holding one) also
    tokenizer.json and tokenizer_config.json. The config's bos/eos/pad ids must name tokens of that
    tokenizer: `AutoTokenizer`, `generate` and the serving engine all read them from here."""
    path = Path(path)
    config = model.config
    token_config = None
    if tokenizer is not None:  # checked before anything is written: a refused export leaves no files
        src = Path(tokenizer)
        src = src / "tokenizer.json" if src.is_dir() else src
        token_config = tokenizer_config(src, config, chat_template)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    (path / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2))
    _save_weights(model, path)
    if token_config is not None:
        if not (path / "tokenizer.json").exists() or not src.samefile(path / "tokenizer.json"):
            shutil.copy(src, path / "tokenizer.json")
        (path / "tokenizer_config.json").write_text(json.dumps(token_config, indent=2))
    return path


def generation_config(config: ModelConfig) -> dict:
    """generation_config.json: `transformers.generate` stops at eos_token_id and pads with
    pad_token_id (it reads these here, not from config.json)."""
    ids = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {k: v for k, v in ids.items() if v is not None}


def tokenizer_config(tokenizer_file: str | Path, config: ModelConfig, chat_template: str) -> dict:
    """tokenizer_config.json for a tokenizer.json: the special tokens as the strings found at the
    model config's ids (transformers looks the ids up from these strings), so a tokenizer whose
    ids disagree with the model's is refused here rather than exported."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise ValueError(
            f"{tokenizer_file} has {size} tokens, more than the model's vocab_size={config.vocab_size}"
        )
    out: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name in ("bos", "eos", "pad"):
        i = getattr(config, f"{name}_token_id")
        if i is None:
            continue
        text = tok.id_to_token(i)
        if text is None:
            raise ValueError(f"{name}_token_id={i} of the model config is no token of {tokenizer_file}")
        out[f"{name}_token"] = text
    # transformers 5 takes bos/eos insertion from tokenizer.json's post-processor and ignores these
    # flags; they state what that post-processor does (a curated tokenizer has none: documents are
    # packed as text + eos, so prompts start without bos, as the serving engine encodes them).
    ids = tok.encode("a", add_special_tokens=True).ids  # "a" itself is no special token
    out["add_bos_token"] = ids[0] == config.bos_token_id
    out["add_eos_token"] = ids[-1] == config.eos_token_id
    out["model_max_length"] = config.max_position_embeddings
    out["clean_up_tokenization_spaces"] = False
    out["chat_template"] = chat_template
    return out


def _save_weights(model: Transformer, path: Path) -> None:
    tensors = {k: v.detach().cpu().clone() for k, v in hf_state_dict(model).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
