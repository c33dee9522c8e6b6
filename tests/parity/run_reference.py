"""Record reference numbers from the ORIGINAL GILL code (kohjingyu/gill @ 4600b71) on the tiny
seeded fixture of ``recipe.py``. Run it with the reference venv, never with ours::

    /work/ref/venv/bin/python tests/parity/run_reference.py --gill-src /work/ref/gill \
        --fixture /work/ref/fixture --out tests/parity/reference_outputs

(``--out`` is a path stem: it writes reference_outputs.safetensors and reference_outputs.json.)

Only I/O is patched (see ``_patch_io``): ``.cuda()``/``.bfloat16()`` are no-ops during
``load_gill``, ``torch.load`` defaults to ``map_location='cpu'`` (the fixture's pickles carry
cuda:0 location tags like the release), SD is loaded from the local tiny folder in fp32 on CPU
without a safety checker, retrieval images are read from local paths, and a stand-in
``torchvision`` provides the few functions ``gill/utils.py`` and ``gill/data.py`` touch. Every
other number comes from the reference's own code path; tensors are recorded with forward
hooks and pass-through wrappers that only observe. The training-loss combination lives in
``main.py`` (not importable: it parses arguments at import) and is recomputed here from its
formula on the model's outputs.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import platform
import random
import sys
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import recipe  # noqa: E402

N_THREADS = 1


# --------------------------------------------------------------------------- torchvision stand-in

def _install_torchvision_standin() -> None:
    """Only what gill/utils.py and gill/data.py reach at import and in CsvDataset.__getitem__."""

    def _unavailable(name):
        def f(*a, **k):
            raise NotImplementedError(f"torchvision stand-in: {name} is not provided")
        return f

    def pil_to_tensor(img):
        arr = np.array(img, dtype=np.uint8, copy=True)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def convert_image_dtype(t, dtype=torch.float):
        assert t.dtype == torch.uint8 and dtype == torch.float32, (t.dtype, dtype)
        return t.to(dtype) / 255.0

    def mod(name, **attrs):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__getattr__ = lambda attr: _unavailable(f"{name}.{attr}")
        for k, v in attrs.items():
            setattr(m, k, v)
        sys.modules[name] = m
        return m

    F = mod("torchvision.transforms.functional", pil_to_tensor=pil_to_tensor,
            convert_image_dtype=convert_image_dtype)
    T = mod("torchvision.transforms", functional=F)
    D = mod("torchvision.datasets")
    mod("torchvision", transforms=T, datasets=D, __version__="0.0-standin")


# --------------------------------------------------------------------------- I/O patches

class _NoDevice:
    """Makes nn.Module.cuda()/.bfloat16() no-ops inside a with-block (no math changes)."""

    def __enter__(self):
        self._cuda, self._bf16 = torch.nn.Module.cuda, torch.nn.Module.bfloat16
        torch.nn.Module.cuda = lambda self, *a, **k: self
        torch.nn.Module.bfloat16 = lambda self: self

    def __exit__(self, *exc):
        torch.nn.Module.cuda, torch.nn.Module.bfloat16 = self._cuda, self._bf16


def _patch_io(models, utils, sd_dir, fetched):
    real_load = torch.load

    def load_cpu(f, *a, **k):
        k.setdefault("map_location", "cpu")
        return real_load(f, *a, **k)
    torch.load = load_cpu

    from diffusers import StableDiffusionPipeline as RealSD

    class LocalSD:
        @staticmethod
        def from_pretrained(model_id, **kwargs):
            assert model_id == "runwayml/stable-diffusion-v1-5", model_id
            pipe = RealSD.from_pretrained(sd_dir, torch_dtype=torch.float32, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            object.__setattr__(pipe, "to", lambda *a, **k: pipe)  # .to("cuda") -> stay on CPU
            return pipe
    models.StableDiffusionPipeline = LocalSD

    from PIL import Image

    def get_image_from_path(url):
        fetched.append(url)
        img = Image.open(url)
        img = img.resize((224, 224))
        return img.convert("RGB")
    utils.get_image_from_url = get_image_from_path


# --------------------------------------------------------------------------- helpers

class Store:
    def __init__(self):
        self.t = {}
        self.meta = {}

    def f32(self, name, x):
        self.t[name] = x.detach().to(torch.float32).contiguous().clone()

    def i64(self, name, x):
        self.t[name] = x.detach().to(torch.int64).contiguous().clone()


def _probe(n, d=768):
    return torch.from_numpy(recipe.seeded_normal("parity/probe", (d,), 1.0)).to(torch.float32)


def _record_mapper(st, key, out, targets=None):
    """(B, 77, 768) mapper output: exact first 16 rows, and full-coverage per-token summaries."""
    st.f32(f"{key}.rows_0_16", out[:, :16, :])
    st.f32(f"{key}.token_l2", out.norm(dim=-1))
    st.f32(f"{key}.token_dot_probe", out @ _probe(out.shape[-1]))
    st.f32(f"{key}.token_sum", out.sum(dim=-1))
    if targets is not None:
        st.f32(f"{key}.l2_to_targets", ((targets - out) ** 2).sum(dim=-1) ** 0.5)


def _record_hidden(st, key, h):
    """(B, 8, 4096) [IMG] hidden states: [IMG0] row in full, all 8 rows on the first 256 dims, norms."""
    st.f32(f"{key}.img0_full", h[:, 0, :])
    st.f32(f"{key}.all8_dims_0_256", h[:, :, :256])
    st.f32(f"{key}.l2", h.norm(dim=-1))
    st.f32(f"{key}.dot_probe", h @ _probe(h.shape[-1], h.shape[-1]))


def _record_logits(st, key, logits, img_ids):
    st.f32(f"{key}.cols_0_64", logits[..., :64])
    st.f32(f"{key}.cols_img", logits[..., img_ids])
    st.f32(f"{key}.logsumexp", torch.logsumexp(logits, dim=-1))
    st.i64(f"{key}.argmax", logits.argmax(dim=-1))


# --------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gill-src", required=True)
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--out", required=True, help="path stem: writes STEM.safetensors and STEM.json")
    ap.add_argument("--threads", type=int, default=N_THREADS, help="torch threads (the committed numbers: 1)")
    ap.add_argument("--rebuild-fixture", action="store_true", help="(re)build the fixture first")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    fx = os.path.abspath(args.fixture)
    if args.rebuild_fixture or not os.path.exists(os.path.join(fx, "fixture.json")):
        recipe.build_fixture(fx)
    with open(os.path.join(fx, "fixture.json")) as f:
        fixture_meta = json.load(f)

    import transformers
    import diffusers
    _install_torchvision_standin()
    sys.path.insert(0, os.path.abspath(args.gill_src))
    from gill import models, utils, data, losses  # noqa: E402

    fetched = []
    _patch_io(models, utils, os.path.join(fx, "sd-tiny"), fetched)

    ckpt_dir = os.path.join(fx, "gill_ckpt")
    with _NoDevice():
        model = models.load_gill(ckpt_dir, load_ret_embs=True, decision_model_fn="decision_model.pth.tar")
    gm = model.model
    tok = gm.tokenizer
    img_ids = list(gm.retrieval_token_idx)
    assert img_ids == recipe.img_token_ids(), (img_ids, recipe.img_token_ids())

    # ---- every checkpoint tensor landed (load_gill uses strict=False)
    ckpt = torch.load(os.path.join(ckpt_dir, "pretrained_ckpt.pth.tar"))["state_dict"]
    sd = model.state_dict()
    for k, v in ckpt.items():
        if k == "model.input_embeddings.weight":
            got = gm.input_embeddings.weight[-recipe.NUM_IMG_TOKENS:]
            assert gm.lm.get_output_embeddings().weight.data_ptr() == gm.input_embeddings.weight.data_ptr()
        else:
            got = sd[k]
        assert torch.equal(got, v.float()), k
    dec = torch.load(os.path.join(ckpt_dir, "decision_model.pth.tar"))["state_dict"]
    assert torch.equal(model.decision_model[1].weight, dec["1.weight"])
    n_rows = gm.input_embeddings.weight.shape[0]
    assert n_rows == len(tok) == recipe.opt_vocab_size() + 9, (n_rows, len(tok))

    st = Store()
    st.meta["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "diffusers": diffusers.__version__,
                           "numpy": np.__version__, "gill_commit": "4600b71", "torch_threads": args.threads}
    st.meta["fixture"] = fixture_meta
    st.meta["img_token_ids"] = img_ids
    st.meta["cls_token_id"] = tok.cls_token_id
    st.meta["len_tokenizer"] = len(tok)
    st.meta["pad_bos_eos"] = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id]
    st.meta["newline_token_id"] = tok("\n", add_special_tokens=False).input_ids[0]
    st.meta["logit_scale"] = gm.logit_scale.item()

    # ================================================================ (i) training batch
    ds = data.CsvDataset(os.path.join(fx, "train.tsv"), os.path.join(fx, "images"), tok, "image", "caption",
                         gm.args.visual_encoder, train=True, max_len=recipe.MAX_LEN, precision="fp32",
                         image_size=224, retrieval_token_idx=img_ids, gen_token_idx=img_ids,
                         num_tokens=recipe.NUM_IMG_TOKENS, num_clip_tokens=recipe.NUM_CLIP_TOKENS)
    for i in recipe.TRAIN_IMAGES:  # CsvDataset retries random examples forever on a missing file
        for f in (recipe.image_name(i), os.path.join("clip_embs", recipe.image_name(i) + ".npy")):
            assert os.path.exists(os.path.join(fx, "images", f)), f
    items = [ds[i] for i in range(len(recipe.TRAIN_CAPTIONS))]
    for i, it in enumerate(items):  # CsvDataset silently swaps in a random example on any error
        assert it[0].endswith(recipe.image_name(recipe.TRAIN_IMAGES[i])), it[0]
    batch = torch.utils.data.dataloader.default_collate(items)
    _, images, _, ret_tokens, ret_len, gen_tokens, gen_len, clip_emb = batch
    assert torch.equal(clip_emb, torch.from_numpy(recipe.generation_targets()))
    st.f32("train.pixel_values", images)
    st.i64("train.tokens", ret_tokens)
    st.i64("train.caption_len", ret_len)
    st.meta["train"] = {"captions": recipe.TRAIN_CAPTIONS, "image_indices": recipe.TRAIN_IMAGES,
                        "tokens": ret_tokens.tolist(), "caption_len": ret_len.tolist(),
                        "untruncated_caption_ids": [tok(c + "".join(f"[IMG{i}]" for i in range(8))).input_ids
                                                    for c in recipe.TRAIN_CAPTIONS]}

    model.train()  # as in main.py; GILLModel.train keeps the LM and CLIP in eval mode
    ce = {}
    for mode in ["captioning", "retrieval", "generation"]:
        tgt, tlen = (gen_tokens, gen_len) if mode == "generation" else (ret_tokens, ret_len)
        (out, full_labels, last_embedding, last_output_logit, visual_embs, visual_embs_norm,
         input_embs_norm, llm_hidden) = model(images, tgt, tlen, mode=mode, concat_captions=False)
        key = f"train.{mode}"
        ce[mode] = out.loss
        st.f32(f"{key}.ce_loss", out.loss)
        st.i64(f"{key}.full_labels", full_labels)
        if mode == "generation":  # same tokens as retrieval: the LM pass must be bit-identical
            assert torch.equal(out.logits, ret_logits) and torch.equal(llm_hidden[0], ret_hidden)
            st.meta["train"]["generation_lm_pass_identical_to_retrieval"] = True
        _record_logits(st, f"{key}.logits", out.logits, img_ids)
        st.f32(f"{key}.visual_embs_norm", visual_embs_norm)
        st.f32(f"{key}.input_embs_norm", input_embs_norm)
        if mode == "captioning":
            st.f32(f"{key}.visual_prefix_dims_0_256", visual_embs[..., :256])
            st.f32(f"{key}.visual_prefix_l2", visual_embs.norm(dim=-1))
        else:
            _record_hidden(st, f"{key}.img_hidden", llm_hidden[0])
            st.f32(f"{key}.last_output_logit_cols_img", last_output_logit[:, img_ids])
            ret_logits, ret_hidden = out.logits.detach().clone(), llm_hidden[0].detach().clone()
        if mode == "retrieval":
            st.f32(f"{key}.text_emb_normalized", last_embedding)  # (4, 32), unit norm
            st.f32(f"{key}.visual_emb_scaled", visual_embs)        # exp(logit_scale) * unit
            logits_per_image = visual_embs @ last_embedding.t()
            logits_per_text = logits_per_image.t()
            st.f32(f"{key}.logits_per_image", logits_per_image)
            cont = (losses.contrastive_loss(logits_per_text) + losses.contrastive_loss(logits_per_image)) / 2.0
        if mode == "generation":
            _record_mapper(st, f"{key}.mapper_out", last_embedding, clip_emb)
            gen_l2 = losses.l2_loss(clip_emb, last_embedding).mean()
    st.f32("train.loss.ce_cap", ce["captioning"])
    st.f32("train.loss.ce_ret", ce["retrieval"])
    st.f32("train.loss.ce_gen", ce["generation"])
    st.f32("train.loss.contrastive", cont)
    st.f32("train.loss.gen_l2", gen_l2)
    total = ce["captioning"] * 1.0 + ce["retrieval"] * 1.0 * 0.5 + ce["generation"] * 1.0 * 0.5 + 1.0 * cont + 1.0 * gen_l2
    st.f32("train.loss.total", total)
    st.meta["train"]["losses"] = {k: st.t[f"train.loss.{k}"].item() for k in
                                  ["ce_cap", "ce_ret", "ce_gen", "contrastive", "gen_l2", "total"]}
    st.meta["train"]["loss_formula"] = ("recomputed from main.py (scales 1): ce_cap + 0.5 ce_ret + 0.5 ce_gen "
                                        "+ (CE(logits_per_text) + CE(logits_per_image))/2 + mean_{b,t} ||target - mapper||_2")
    model.eval()

    # ================================================================ (ii) generation
    from PIL import Image
    rec = {}

    real_gve = gm.get_visual_embs

    def gve(pixel_values, mode="captioning"):
        o = real_gve(pixel_values, mode)
        rec.setdefault("gve", []).append((mode, pixel_values.detach().clone(), o.detach().clone()))
        return o
    gm.get_visual_embs = gve

    def lm_hook(mod, inp, out):
        rec.setdefault("lm_steps", []).append((out.logits[:, -1, :].detach().clone(),
                                               out.hidden_states[-1].detach().clone()))
    gm.lm.register_forward_hook(lm_hook)

    def fc_hook(name):
        def h(mod, inp, out):
            rec.setdefault(name, []).append(([x.detach().clone() if x is not None else None for x in inp],
                                             out.detach().clone()))
        return h
    gm.ret_text_hidden_fcs[0].register_forward_hook(fc_hook("ret_fc"))
    gm.gen_text_hidden_fcs[0].register_forward_hook(fc_hook("gen_fc"))
    model.decision_model.register_forward_hook(fc_hook("decision"))

    real_generate = gm.generate

    def generate(embeddings, *a, **k):
        rec["prompt_embs"] = embeddings.detach().clone()
        out = real_generate(embeddings, *a, **k)
        rec["generated_ids"] = out[0].detach().clone()
        return out
    gm.generate = generate

    real_pipe = model.sd_pipe

    class PipeSpy:
        def __getattr__(self, name):
            return getattr(real_pipe, name)

        def __call__(self, **kw):
            rec["sd_prompt_embeds"] = kw["prompt_embeds"].detach().clone()
            lat = []
            res = real_pipe(**kw, callback=lambda i, t, x: lat.append(x.detach().clone()), callback_steps=1)
            rec["sd_latents_final"] = lat[-1]
            rec["sd_n_steps"] = len(lat)
            rec["sd_image"] = np.array(res.images[0])
            return res
    model.sd_pipe = PipeSpy()

    w4097 = recipe.decision_params(recipe.LM_HIDDEN + 1)
    W, B = torch.from_numpy(w4097["1.weight"]), torch.from_numpy(w4097["1.bias"])

    st.meta["generation"] = {}
    for name, cfg in recipe.GEN_PROMPTS.items():
        rec.clear()
        fetched.clear()
        prompts, text_ids, add_bos, layout = [], [], True, []
        for kind, val in cfg["prompt"]:
            if kind == "image":
                prompts.append(Image.open(os.path.join(fx, "images", recipe.image_name(val))).convert("RGB"))
                layout.append(["image", val, recipe.N_VISUAL_TOKENS])
            else:
                prompts.append(val)
                ids = tok(val, add_special_tokens=add_bos).input_ids  # same call as the reference
                add_bos = False
                text_ids.append(ids)
                layout.append(["text", val, ids])
        gen = torch.Generator().manual_seed(0)
        outputs = model.generate_for_images_and_texts(
            prompts, num_words=cfg["num_words"], min_word_tokens=cfg["min_word_tokens"],
            ret_scale_factor=cfg["ret_scale_factor"], gen_scale_factor=cfg["gen_scale_factor"],
            temperature=0.0, top_p=1.0, max_num_rets=1, generator=gen, guidance_scale=7.5,
            num_inference_steps=50)
        key = f"gen.{name}"
        L = rec["prompt_embs"].shape[1]
        gids = rec["generated_ids"]
        meta = {"config": {k: v for k, v in cfg.items() if k != "prompt"}, "prompt_layout": layout,
                "prompt_len": L, "generated_ids": gids[0].tolist(), "n_lm_forwards": len(rec["lm_steps"])}
        # visual prefix per image
        cap = [(pv, o) for (m, pv, o) in rec.get("gve", []) if m == "captioning"]
        for j, (pv, o) in enumerate(cap):
            st.f32(f"{key}.image{j}.pixel_values", pv)
            st.f32(f"{key}.image{j}.visual_prefix_dims_0_512", o[..., :512])
            st.f32(f"{key}.image{j}.visual_prefix_l2", o.norm(dim=-1))
            st.f32(f"{key}.image{j}.visual_prefix_dot_probe", o @ _probe(o.shape[-1], o.shape[-1]))
        st.f32(f"{key}.prompt_embs_l2", rec["prompt_embs"].norm(dim=-1))
        st.i64(f"{key}.generated_ids", gids)
        st.f32(f"{key}.step_logits_raw", torch.cat([lg for lg, _ in rec["lm_steps"]], 0))  # before masking/scaling
        # returned structure
        ret_struct = []
        for o in outputs:
            if isinstance(o, str):
                ret_struct.append({"text": o})
            else:
                ret_struct.append({"decision": o["decision"], "ret_scores": [s for (_, _, s) in o["ret"]],
                                   "gen_rank_scores": [s for (_, s) in o["gen"]]})
        meta["returned"] = ret_struct
        meta["decoded_all"] = tok.batch_decode(gids, skip_special_tokens=False)[0]
        if "ret_fc" in rec:
            (raw_emb, _), ret_out = rec["ret_fc"][0]
            _record_hidden(st, f"{key}.img_hidden", raw_emb)
            last_h = rec["lm_steps"][-1][1]
            ridx = gids[0].tolist().index(img_ids[0])
            same = torch.equal(raw_emb, last_h[:, L + ridx:L + ridx + 8])
            meta["img_hidden_source"] = ("hidden_states[-1] of the LAST decoding forward (step %d of %d), "
                                         "positions prompt_len+%d..+8; equal=%s" % (len(rec["lm_steps"]) - 1,
                                                                                     len(rec["lm_steps"]), ridx, same))
            ret_emb = ret_out[:, 0, :]
            ret_emb = ret_emb / ret_emb.norm(dim=-1, keepdim=True)
            scores = (model.emb_matrix @ ret_emb.T)[:, 0]
            st.f32(f"{key}.ret_emb_normalized", ret_emb)
            st.f32(f"{key}.ret_scores_all", scores)
            top_s, top_i = scores.topk(3)
            st.i64(f"{key}.ret_topk_idx", top_i)
            st.f32(f"{key}.ret_topk_scores", top_s)
            meta["ret_topk_idx"] = top_i.tolist()
            meta["ret_fetched_paths"] = [os.path.basename(p) for p in fetched]
            (dec_in,), dec_logits = rec["decision"][0][0], rec["decision"][0][1]
            st.f32(f"{key}.decision4096_logits", dec_logits)
            st.f32(f"{key}.decision4096_probs", dec_logits.softmax(-1))
            x = torch.cat([dec_in[:, :], scores.max().reshape(1, 1)], dim=1)
            l4097 = x @ W.T + B
            st.f32(f"{key}.decision4097_derived_logits", l4097)
            st.f32(f"{key}.decision4097_derived_probs", l4097.softmax(-1))
            meta["decision4097_derived"] = {"probs": l4097.softmax(-1)[0].tolist(),
                                            "argmax": ["gen", "ret"][int(l4097.argmax())],
                                            "note": "DERIVED, not run by the reference: softmax(W @ [h_IMG0 ; max_j score_j] + b), "
                                                    "score = exp(logit_scale) * cos"}
            (mp_in, mp_pref), mp_out = rec["gen_fc"][0]
            st.f32(f"{key}.gen_prefix_embs", mp_pref[..., :256])
            _record_mapper(st, f"{key}.mapper_out", mp_out)
            assert torch.equal(mp_out, rec["sd_prompt_embeds"])
            st.f32(f"{key}.sd_latents_final", rec["sd_latents_final"])
            st.t[f"{key}.sd_image_uint8"] = torch.from_numpy(rec["sd_image"].astype(np.uint8)).contiguous()
            meta["sd_steps"] = rec["sd_n_steps"]
        st.meta["generation"][name] = meta

    # ================================================================ write
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    from safetensors.torch import save_file
    save_file({k: v for k, v in sorted(st.t.items())}, args.out + ".safetensors",
              metadata={"source": "kohjingyu/gill@4600b71 via tests/parity/run_reference.py"})
    st.meta["tensors"] = {k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in sorted(st.t.items())}
    with open(args.out + ".json", "w") as f:
        json.dump(st.meta, f, indent=1, sort_keys=True, default=float)
        f.write("\n")
    size = sum(v.numel() * v.element_size() for v in st.t.values())
    print(f"wrote {len(st.t)} tensors, {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
