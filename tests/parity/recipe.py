"""Deterministic tiny fixture for GILL parity tests (reference vs gill-hf).

Runs unchanged in the reference venv (numpy 1.26, transformers 4.30) and in ours
(numpy 2, transformers 5): every tensor value comes from a numpy PCG64 stream seeded by a
hash of the parameter name, never from a library's init code. torch is used only to write
the two original-format ``.pth.tar`` pickles (both venvs have torch 2.13.0).

Build it with::

    from tests.parity.recipe import build_fixture
    paths = build_fixture("/tmp/gill_fixture")        # n_layers=2, seed=0

or ``python tests/parity/recipe.py OUT_DIR``. Layout under OUT_DIR::

    facebook/opt-tiny-gill/   OPTForCausalLM (hidden 4096, 2 layers, ffn 64, 4 heads) + GPT2 BPE
                              (the folder name must contain "facebook/opt": the reference checks it)
    clip-vit-tiny/            CLIPVisionModel (32 px, patch 8, hidden 32, 2 layers) + CLIP
                              image processor config (the name must contain "clip")
    sd-tiny/                  StableDiffusionPipeline parts: UNet (cross-attn 768, 8x8 latents),
                              VAE (scale factor 2), CLIP text encoder (hidden 768, 1 layer),
                              CLIPTokenizer (byte alphabet, no merges), PNDM scheduler
    images/img_XX.png         20 seeded 32x32 RGB images (CLIP resize/crop is the identity)
    images/clip_embs/img_XX.png.npy  (77, 768) float16 seeded generation targets (CsvDataset layout)
    train.tsv                 caption<TAB>image for the 4-example training batch
    gill_ckpt/                model_args.json, pretrained_ckpt.pth.tar (bf16, cuda:0 tags),
                              decision_model.pth.tar (4096 input, fp32, cuda:0 tags),
                              decision_model_4097.pth.tar (paper-era 4097 input),
                              cc3m_embeddings_urls.npy (pickle: local paths + 20 seeded
                              32-d float32 numpy embeddings, numpy-1 pickle names)
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import sys
from collections import OrderedDict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(HERE, "tokenizer")

RECIPE_VERSION = 1
LM_HIDDEN = 4096
LM_FFN = 64
LM_HEADS = 4
LM_MAX_POS = 256
EXTRA_EMBED_ROWS = 7  # like OPT: 50272 rows for a 50265-token vocabulary
CLIP_HIDDEN = 32
CLIP_LAYERS = 2
CLIP_FFN = 64
CLIP_HEADS = 4
CLIP_IMAGE = 32
CLIP_PATCH = 8
RET_EMB_DIM = 32
GEN_EMB_DIM = 768
NUM_IMG_TOKENS = 8
NUM_CLIP_TOKENS = 77
N_VISUAL_TOKENS = 4
MAPPER_DIM = 512
MAPPER_FFN = 2048
MAPPER_LAYERS = 4
N_IMAGES = 20
SD_TEXT_FFN = 64
SD_TEXT_HEADS = 4
SD_TEXT_LAYERS = 1
LOGIT_SCALE_INIT = float(np.log(1 / 0.07))

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The fixed training batch (CsvDataset-style: caption + "[IMG0]..[IMG7]", max_len 32).
TRAIN_CAPTIONS = [
    "a red circle",
    "two small dogs playing on the green grass near a house",
    "a photo of a cat, sitting on a mat",
    "a very long caption about a blue square and a yellow triangle sitting next to each "
    "other on a wooden table in a bright kitchen with many windows and green plants",
]
TRAIN_IMAGES = [0, 1, 2, 3]
MAX_LEN = 32

# Generation prompts: ("image", index) or ("text", str).
GEN_PROMPTS = {
    "a_forced_img": dict(
        prompt=[("image", 4), ("text", "A dog runs in the park."), ("image", 5),
                ("text", "Show me a similar picture")],
        num_words=2, min_word_tokens=0, gen_scale_factor=1e5, ret_scale_factor=1.0),
    "b_text_then_img": dict(
        prompt=[("image", 6), ("text", "Q: what should come next?\nA:")],
        num_words=5, min_word_tokens=3, gen_scale_factor=1e5, ret_scale_factor=1.0),
    "c_free": dict(
        prompt=[("text", "Tell me a story about a cat.")],
        num_words=6, min_word_tokens=0, gen_scale_factor=1.0, ret_scale_factor=1.0),
}

TOKENIZER_CORPUS_WORDS = (
    "a an the of on in at to and with near next under over is are was what where who how "
    "red green blue yellow black white orange purple pink brown gray small big large tiny "
    "circle square triangle star cat dog dogs bird horse fish cow tree trees house car "
    "picture photo image draw show me similar story about tell come should playing runs park "
    "grass table kitchen wooden bright many windows plants sitting other each long very "
    "caption two three one Q A man woman child people street city sky water beach mountain"
).split()


# --------------------------------------------------------------------------- streams

def _rng(name: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"gill-parity/{seed}/{name}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little")))


def seeded_normal(name: str, shape, std: float = 1.0, mean: float = 0.0, seed: int = 0) -> np.ndarray:
    """float32 N(mean, std) drawn in float64 from a stream seeded by ``name``."""
    x = _rng(name, seed).standard_normal(size=tuple(shape))
    return (x * std + mean).astype(np.float32)


def _param(name: str, shape, seed: int, fan_in_std: bool = False) -> np.ndarray:
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(t in name for t in ("norm", "layrnorm", "ln_")) and len(shape) == 1
    if is_norm and leaf == "weight":
        return seeded_normal(name, shape, 0.02, 1.0, seed)
    if leaf == "bias" or len(shape) == 1:
        return seeded_normal(name, shape, 0.02, 0.0, seed)
    std = 0.02
    if fan_in_std:
        std = 1.0 / math.sqrt(int(np.prod(shape[1:])))
    return seeded_normal(name, shape, std, 0.0, seed)


def _save_safetensors(tensors: dict, path: str) -> None:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _dump_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------- tokenizer

def train_opt_tokenizer(out_dir: str = TOKENIZER_DIR, vocab_size: int = 448) -> None:
    """One-off: train the byte-level BPE committed in tests/parity/tokenizer (needs `tokenizers`)."""
    from tokenizers import ByteLevelBPETokenizer
    words = TOKENIZER_CORPUS_WORDS
    corpus = []
    for i in range(len(words)):
        for j in range(0, len(words), 7):
            corpus.append(" ".join(words[(i + k * j) % len(words)] for k in range(8)))
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    os.makedirs(out_dir, exist_ok=True)
    tok.save_model(out_dir)


def opt_vocab_size() -> int:
    with open(os.path.join(TOKENIZER_DIR, "vocab.json")) as f:
        return len(json.load(f))


def img_token_ids() -> list:
    """[IMG0..7] ids after the reference adds `<|image|>` (cls) then [IMG0]..[IMG7]."""
    v = opt_vocab_size()
    return list(range(v + 1, v + 1 + NUM_IMG_TOKENS))


def _write_opt_tokenizer(dst: str) -> None:
    for fn in ("vocab.json", "merges.txt"):
        with open(os.path.join(TOKENIZER_DIR, fn), "rb") as f, open(os.path.join(dst, fn), "wb") as g:
            g.write(f.read())
    special = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _dump_json(special, os.path.join(dst, "special_tokens_map.json"))
    cfg = dict(special, tokenizer_class="GPT2Tokenizer", add_bos_token=True, add_prefix_space=False,
               errors="replace", model_max_length=1024)
    _dump_json(cfg, os.path.join(dst, "tokenizer_config.json"))


# --------------------------------------------------------------------------- OPT

def opt_config(n_layers: int = 2) -> dict:
    return {
        "_name_or_path": "opt-tiny-gill",
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "activation_function": "relu",
        "attention_dropout": 0.0,
        "dropout": 0.1,
        "layerdrop": 0.0,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "do_layer_norm_before": True,
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "ffn_dim": LM_FFN,
        "hidden_size": LM_HIDDEN,
        "word_embed_proj_dim": LM_HIDDEN,
        "init_std": 0.02,
        "max_position_embeddings": LM_MAX_POS,
        "num_attention_heads": LM_HEADS,
        "num_hidden_layers": n_layers,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": opt_vocab_size() + EXTRA_EMBED_ROWS,
        "_remove_final_layer_norm": False,
    }


def opt_param_shapes(cfg: dict) -> "OrderedDict[str, tuple]":
    d, f, v = cfg["hidden_size"], cfg["ffn_dim"], cfg["vocab_size"]
    s = OrderedDict()
    s["model.decoder.embed_tokens.weight"] = (v, d)
    s["model.decoder.embed_positions.weight"] = (cfg["max_position_embeddings"] + 2, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.decoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[p + f"self_attn.{proj}.weight"] = (d, d)
            s[p + f"self_attn.{proj}.bias"] = (d,)
        s[p + "self_attn_layer_norm.weight"] = (d,)
        s[p + "self_attn_layer_norm.bias"] = (d,)
        s[p + "fc1.weight"] = (f, d)
        s[p + "fc1.bias"] = (f,)
        s[p + "fc2.weight"] = (d, f)
        s[p + "fc2.bias"] = (d,)
        s[p + "final_layer_norm.weight"] = (d,)
        s[p + "final_layer_norm.bias"] = (d,)
    s["model.decoder.final_layer_norm.weight"] = (d,)
    s["model.decoder.final_layer_norm.bias"] = (d,)
    return s


def _write_opt(dst: str, n_layers: int, seed: int) -> None:
    os.makedirs(dst, exist_ok=True)
    cfg = opt_config(n_layers)
    _dump_json(cfg, os.path.join(dst, "config.json"))
    tensors = {n: _param("opt." + n, shp, seed) for n, shp in opt_param_shapes(cfg).items()}
    _save_safetensors(tensors, os.path.join(dst, "model.safetensors"))
    _write_opt_tokenizer(dst)


# --------------------------------------------------------------------------- CLIP vision

def clip_vision_config() -> dict:
    return {
        "model_type": "clip_vision_model",
        "architectures": ["CLIPVisionModel"],
        "hidden_size": CLIP_HIDDEN,
        "intermediate_size": CLIP_FFN,
        "num_hidden_layers": CLIP_LAYERS,
        "num_attention_heads": CLIP_HEADS,
        "num_channels": 3,
        "image_size": CLIP_IMAGE,
        "patch_size": CLIP_PATCH,
        "projection_dim": RET_EMB_DIM,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
    }


def _clip_encoder_shapes(prefix: str, d: int, f: int, n: int) -> "OrderedDict[str, tuple]":
    s = OrderedDict()
    for i in range(n):
        p = f"{prefix}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[p + f"self_attn.{proj}.weight"] = (d, d)
            s[p + f"self_attn.{proj}.bias"] = (d,)
        s[p + "layer_norm1.weight"] = (d,)
        s[p + "layer_norm1.bias"] = (d,)
        s[p + "mlp.fc1.weight"] = (f, d)
        s[p + "mlp.fc1.bias"] = (f,)
        s[p + "mlp.fc2.weight"] = (d, f)
        s[p + "mlp.fc2.bias"] = (d,)
        s[p + "layer_norm2.weight"] = (d,)
        s[p + "layer_norm2.bias"] = (d,)
    return s


def clip_vision_param_shapes() -> "OrderedDict[str, tuple]":
    d, p = CLIP_HIDDEN, CLIP_PATCH
    n_pos = (CLIP_IMAGE // p) ** 2 + 1
    s = OrderedDict()
    s["vision_model.embeddings.class_embedding"] = (d,)
    s["vision_model.embeddings.patch_embedding.weight"] = (d, 3, p, p)
    s["vision_model.embeddings.position_embedding.weight"] = (n_pos, d)
    s["vision_model.pre_layrnorm.weight"] = (d,)
    s["vision_model.pre_layrnorm.bias"] = (d,)
    s.update(_clip_encoder_shapes("vision_model.", d, CLIP_FFN, CLIP_LAYERS))
    s["vision_model.post_layernorm.weight"] = (d,)
    s["vision_model.post_layernorm.bias"] = (d,)
    return s


def _write_clip_vision(dst: str, seed: int) -> None:
    os.makedirs(dst, exist_ok=True)
    _dump_json(clip_vision_config(), os.path.join(dst, "config.json"))
    tensors = {n: _param("clipv." + n, shp, seed) for n, shp in clip_vision_param_shapes().items()}
    _save_safetensors(tensors, os.path.join(dst, "model.safetensors"))
    _dump_json({
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": CLIP_IMAGE}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": CLIP_IMAGE, "width": CLIP_IMAGE},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "do_convert_rgb": True,
    }, os.path.join(dst, "preprocessor_config.json"))


# --------------------------------------------------------------------------- tiny SD

def _bytes_to_unicode() -> dict:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def sd_text_vocab() -> dict:
    chars = list(_bytes_to_unicode().values())
    toks = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(toks)}


def sd_text_config() -> dict:
    v = len(sd_text_vocab())
    return {
        "model_type": "clip_text_model",
        "architectures": ["CLIPTextModel"],
        "vocab_size": v,
        "hidden_size": GEN_EMB_DIM,
        "intermediate_size": SD_TEXT_FFN,
        "num_hidden_layers": SD_TEXT_LAYERS,
        "num_attention_heads": SD_TEXT_HEADS,
        "max_position_embeddings": NUM_CLIP_TOKENS,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": v - 2,
        "eos_token_id": v - 1,
        "pad_token_id": v - 1,
        "torch_dtype": "float32",
    }


def sd_text_param_shapes() -> "OrderedDict[str, tuple]":
    cfg = sd_text_config()
    d = cfg["hidden_size"]
    s = OrderedDict()
    s["text_model.embeddings.token_embedding.weight"] = (cfg["vocab_size"], d)
    s["text_model.embeddings.position_embedding.weight"] = (NUM_CLIP_TOKENS, d)
    s.update(_clip_encoder_shapes("text_model.", d, SD_TEXT_FFN, SD_TEXT_LAYERS))
    s["text_model.final_layer_norm.weight"] = (d,)
    s["text_model.final_layer_norm.bias"] = (d,)
    return s


UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.17.1",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": GEN_EMB_DIM,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
}

VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.17.1",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 16,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}

SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.17.1",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def _sd_manifest() -> dict:
    with open(os.path.join(HERE, "sd_param_manifest.json")) as f:
        return json.load(f)


def _write_sd(dst: str, seed: int) -> None:
    man = _sd_manifest()
    for sub, cfg in (("unet", UNET_CONFIG), ("vae", VAE_CONFIG)):
        os.makedirs(os.path.join(dst, sub), exist_ok=True)
        _dump_json(cfg, os.path.join(dst, sub, "config.json"))
        tensors = {n: _param(f"sd.{sub}." + n, shp, seed, fan_in_std=True) for n, shp in sorted(man[sub].items())}
        _save_safetensors(tensors, os.path.join(dst, sub, "diffusion_pytorch_model.safetensors"))
    te = os.path.join(dst, "text_encoder")
    os.makedirs(te, exist_ok=True)
    _dump_json(sd_text_config(), os.path.join(te, "config.json"))
    _save_safetensors({n: _param("sd.text." + n, shp, seed) for n, shp in sd_text_param_shapes().items()},
                      os.path.join(te, "model.safetensors"))
    tk = os.path.join(dst, "tokenizer")
    os.makedirs(tk, exist_ok=True)
    _dump_json(sd_text_vocab(), os.path.join(tk, "vocab.json"))
    with open(os.path.join(tk, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    _dump_json(special, os.path.join(tk, "special_tokens_map.json"))
    _dump_json(dict(special, tokenizer_class="CLIPTokenizer", model_max_length=NUM_CLIP_TOKENS,
                    do_lower_case=True, errors="replace"), os.path.join(tk, "tokenizer_config.json"))
    os.makedirs(os.path.join(dst, "scheduler"), exist_ok=True)
    _dump_json(SCHEDULER_CONFIG, os.path.join(dst, "scheduler", "scheduler_config.json"))
    _dump_json({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.17.1",
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, os.path.join(dst, "model_index.json"))


# --------------------------------------------------------------------------- images, targets

def image_array(i: int, seed: int = 0) -> np.ndarray:
    """(32, 32, 3) uint8: a smooth seeded gradient plus noise (not constant, not pure noise)."""
    rng = _rng(f"image/{i}", seed)
    yy, xx = np.meshgrid(np.arange(CLIP_IMAGE), np.arange(CLIP_IMAGE), indexing="ij")
    base = rng.uniform(0, 255, size=3)[None, None, :]
    gx, gy = rng.uniform(-4, 4, size=(2, 3))
    noise = rng.integers(0, 48, size=(CLIP_IMAGE, CLIP_IMAGE, 3))
    img = base + gx * xx[..., None] + gy * yy[..., None] + noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def image_name(i: int) -> str:
    return f"img_{i:02d}.png"


def generation_targets(indices=TRAIN_IMAGES, seed: int = 0) -> np.ndarray:
    """(len(indices), 77, 768) float16 SD-text-encoder stand-ins (as CsvDataset loads them)."""
    return np.stack([seeded_normal(f"clip_emb/{image_name(i)}", (NUM_CLIP_TOKENS, GEN_EMB_DIM), 1.0, 0.0, seed)
                     .astype(np.float16) for i in indices])


def retrieval_embeddings(seed: int = 0) -> np.ndarray:
    """(20, 32) float32 seeded stand-ins for visual_fc(CLIP pooler) of the fixture images."""
    return seeded_normal("cc3m_embeddings", (N_IMAGES, RET_EMB_DIM), 1.0, 0.0, seed)


def _write_images(root: str, seed: int) -> list:
    from PIL import Image
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "images", "clip_embs"), exist_ok=True)
    paths = []
    targets = generation_targets(range(N_IMAGES), seed)
    for i in range(N_IMAGES):
        p = os.path.join(root, "images", image_name(i))
        Image.fromarray(image_array(i, seed), mode="RGB").save(p)
        paths.append(p)
        with open(os.path.join(root, "images", "clip_embs", image_name(i) + ".npy"), "wb") as f:
            np.save(f, targets[i])
    with open(os.path.join(root, "train.tsv"), "w") as f:
        f.write("caption\timage\n")
        for cap, i in zip(TRAIN_CAPTIONS, TRAIN_IMAGES):
            f.write(f"{cap}\t{image_name(i)}\n")
    return paths


# --------------------------------------------------------------------------- GILL checkpoint

def gill_param_shapes() -> "OrderedDict[str, tuple]":
    d, m, f = LM_HIDDEN, MAPPER_DIM, MAPPER_FFN
    s = {}
    s["model.input_embeddings.weight"] = (NUM_IMG_TOKENS, d)
    s["model.logit_scale"] = ()
    s["model.visual_embeddings.weight"] = (d * N_VISUAL_TOKENS, CLIP_HIDDEN)
    s["model.visual_embeddings.bias"] = (d * N_VISUAL_TOKENS,)
    s["model.visual_fc.weight"] = (RET_EMB_DIM, CLIP_HIDDEN)
    s["model.visual_fc.bias"] = (RET_EMB_DIM,)
    s["model.ret_text_hidden_fcs.0.model.weight"] = (RET_EMB_DIM, d)
    s["model.ret_text_hidden_fcs.0.model.bias"] = (RET_EMB_DIM,)
    g = "model.gen_text_hidden_fcs.0."
    s[g + "fc.weight"] = (m, d)
    s[g + "fc.bias"] = (m,)
    s[g + "query_embs"] = (1, NUM_CLIP_TOKENS, m)
    s[g + "model.weight"] = (GEN_EMB_DIM, m)
    s[g + "model.bias"] = (GEN_EMB_DIM,)

    def attn(p):
        s[p + "in_proj_weight"] = (3 * m, m)
        s[p + "in_proj_bias"] = (3 * m,)
        s[p + "out_proj.weight"] = (m, m)
        s[p + "out_proj.bias"] = (m,)

    def ffn_norms(p, n_norms):
        s[p + "linear1.weight"] = (f, m)
        s[p + "linear1.bias"] = (f,)
        s[p + "linear2.weight"] = (m, f)
        s[p + "linear2.bias"] = (m,)
        for k in range(1, n_norms + 1):
            s[p + f"norm{k}.weight"] = (m,)
            s[p + f"norm{k}.bias"] = (m,)

    for i in range(MAPPER_LAYERS):
        p = g + f"tfm.encoder.layers.{i}."
        attn(p + "self_attn.")
        ffn_norms(p, 2)
    s[g + "tfm.encoder.norm.weight"] = (m,)
    s[g + "tfm.encoder.norm.bias"] = (m,)
    for i in range(MAPPER_LAYERS):
        p = g + f"tfm.decoder.layers.{i}."
        attn(p + "self_attn.")
        attn(p + "multihead_attn.")
        ffn_norms(p, 3)
    s[g + "tfm.decoder.norm.weight"] = (m,)
    s[g + "tfm.decoder.norm.bias"] = (m,)
    return OrderedDict(sorted(s.items()))  # main.py sorts the stripped state dict


def gill_params(seed: int = 0) -> "OrderedDict[str, np.ndarray]":
    """float32 values; the .pth.tar stores them as bfloat16 (like the release)."""
    out = OrderedDict()
    for n, shp in gill_param_shapes().items():
        if n.endswith("logit_scale"):
            out[n] = np.array(LOGIT_SCALE_INIT, dtype=np.float32)
        elif n.endswith("query_embs"):
            out[n] = seeded_normal("gill." + n, shp, 1.0, 0.0, seed)
        else:
            out[n] = _param("gill." + n, shp, seed)
    return out


def decision_params(in_dim: int = LM_HIDDEN, seed: int = 0) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict([
        ("1.weight", seeded_normal(f"decision{in_dim}.1.weight", (2, in_dim), 0.02, 0.0, seed)),
        ("1.bias", seeded_normal(f"decision{in_dim}.1.bias", (2,), 0.02, 0.0, seed)),
    ])


def _torch_save_cuda_tagged(obj, path: str) -> None:
    """torch.save with every storage's location tag written as 'cuda:0' (as in the release)."""
    import torch
    import torch.serialization as ser
    orig = ser.location_tag
    ser.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(obj, path)
    finally:
        ser.location_tag = orig


def _torch_state_dict(params, dtype_name: str):
    import torch
    dtype = getattr(torch, dtype_name)
    return OrderedDict((k, torch.from_numpy(np.array(v, dtype=np.float32)).to(dtype)) for k, v in params.items())


class _Numpy1Pickler(pickle._Pickler):
    """Writes numpy arrays under numpy-1 global names, whatever numpy is installed."""

    def save_global(self, obj, name=None):
        mod = getattr(obj, "__module__", "") or ""
        if mod.startswith("numpy") and "multiarray" in mod and getattr(obj, "__name__", "") == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _write_gill_ckpt(dst: str, root: str, image_paths: list, seed: int, n_layers: int) -> None:
    os.makedirs(dst, exist_ok=True)
    ids = img_token_ids()
    _dump_json({
        "opt_version": os.path.join(root, "facebook", "opt-tiny-gill"),
        "freeze_lm": True,
        "visual_encoder": os.path.join(root, "clip-vit-tiny"),
        "freeze_vm": True,
        "n_visual_tokens": N_VISUAL_TOKENS,
        "ret_emb_dim": RET_EMB_DIM,
        "gen_emb_dim": GEN_EMB_DIM,
        "text_emb_layers": [-1],
        "text_fc_mode": "gill_mapper",
        "ret_text_fc_mode": "linear",
        "num_tokens": NUM_IMG_TOKENS,
        "num_clip_tokens": NUM_CLIP_TOKENS,
        "share_ret_gen": True,
        "norm_image_embed": "none",
        "retrieval_token_idx": ids,
        "gen_token_idx": ids,
    }, os.path.join(dst, "model_args.json"))
    _torch_save_cuda_tagged({"state_dict": _torch_state_dict(gill_params(seed), "bfloat16")},
                            os.path.join(dst, "pretrained_ckpt.pth.tar"))
    _torch_save_cuda_tagged({"state_dict": _torch_state_dict(decision_params(LM_HIDDEN, seed), "float32")},
                            os.path.join(dst, "decision_model.pth.tar"))
    _torch_save_cuda_tagged({"state_dict": _torch_state_dict(decision_params(LM_HIDDEN + 1, seed), "float32")},
                            os.path.join(dst, "decision_model_4097.pth.tar"))
    embs = retrieval_embeddings(seed)
    buf = io.BytesIO()
    _Numpy1Pickler(buf, protocol=2).dump({"paths": list(image_paths), "embeddings": [e for e in embs]})
    with open(os.path.join(dst, "cc3m_embeddings_urls.npy"), "wb") as f:
        f.write(buf.getvalue())


# --------------------------------------------------------------------------- entry point

def build_fixture(out_dir: str, n_layers: int = 2, seed: int = 0, with_sd: bool = True) -> dict:
    """Write the whole fixture under ``out_dir`` (idempotent); returns its main paths."""
    root = os.path.abspath(out_dir)
    os.makedirs(root, exist_ok=True)
    paths = {
        "root": root,
        "opt": os.path.join(root, "facebook", "opt-tiny-gill"),
        "clip": os.path.join(root, "clip-vit-tiny"),
        "sd": os.path.join(root, "sd-tiny"),
        "gill_ckpt": os.path.join(root, "gill_ckpt"),
        "images": os.path.join(root, "images"),
        "train_tsv": os.path.join(root, "train.tsv"),
    }
    _write_opt(paths["opt"], n_layers, seed)
    _write_clip_vision(paths["clip"], seed)
    if with_sd:
        _write_sd(paths["sd"], seed)
    image_paths = _write_images(root, seed)
    _write_gill_ckpt(paths["gill_ckpt"], root, image_paths, seed, n_layers)
    _dump_json({"recipe_version": RECIPE_VERSION, "n_layers": n_layers, "seed": seed},
               os.path.join(root, "fixture.json"))
    return paths


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--train-tokenizer":
        train_opt_tokenizer()
    else:
        print(json.dumps(build_fixture(sys.argv[1] if len(sys.argv) > 1 else "fixture"), indent=2))
