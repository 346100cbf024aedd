"""Build and train the embedded reference pipeline (nabla_convert/reference/pipeline).

    python scripts/reference/train.py init PIPELINE          # CPU: tokenizer, frozen text encoder, untrained VAE + DiT
    python scripts/reference/train.py vocab PIPELINE         # CPU: add new VOCABULARY words, keep the old ones' rows
    python scripts/reference/train.py prompts                # CPU: rewrite the bundled training/held-out prompt files
    python scripts/reference/train.py vae PIPELINE OUT        # GPU(s): VAE reconstruction, latent statistics
    python scripts/reference/train.py dit PIPELINE OUT        # GPU: transformer flow matching (--resume OUT_OF_LAST)
    python scripts/reference/train.py heldout PIPELINE        # any device: held-out flow-matching loss

Training runs under a wall-clock budget (--minutes) because the GPU is lent in 10-minute calls; every stage writes
what it learned under OUT (a few files, bf16 where large) so the next call or this machine can pick it up.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nabla_convert.convert import load_pipeline
from nabla_convert.eval.metrics import psnr
from nabla_convert.flow import weighted_mean
from nabla_convert.io import atomic_write, atomic_write_text
from nabla_convert.reference import (
    HEIGHT,
    NUM_FRAMES,
    PROMPTS_HELDOUT,
    PROMPTS_TRAIN,
    TRAIN_SEED,
    WIDTH,
    heldout_scenes,
    heldout_videos,
)
from nabla_convert.reference.flow import (
    flow_matching_loss,
    heldout_loss,
    latent_coverage,
    normalise_latents,
    shifted_sigmas,
)
from nabla_convert.reference.scenes import VOCABULARY, Scene, SceneObject, render, sample_scenes

SCHEDULER_SHIFT = 3.0
TEXT_DIM = 64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs are smoke tests of the GPU scripts
POOL_STRIDE = 1_000_000  # clip-index distance between the pools of two processes


def build_tokenizer(vocab: dict[str, int]):
    """A whole-word tokenizer (stock transformers class) over `vocab`, which starts with <pad>, </s>, <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def name_portable_tokenizer_class(pipeline: Path) -> None:
    """transformers 5 saves its fast tokenizer as "TokenizersBackend"; name the class that 4.x also has (an alias
    in 5)."""
    for name in ("model_index.json", "tokenizer/tokenizer_config.json"):
        path = pipeline / name
        path.write_text(path.read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))


def build_pipeline(seed: int = 0):
    """The untrained pipeline: every component a stock class, sized for CPU inference in seconds."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from nabla_convert.models.tiny import tiny_text_encoder

    torch.manual_seed(seed)
    tokenizer = build_tokenizer({"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(VOCABULARY)}})
    vae = AutoencoderKLWan(
        base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=64,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=1024,
        num_layers=6,
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(len(tokenizer), d_model=TEXT_DIM),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT),
        transformer=transformer,
    )


def save_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1))


def device_record() -> dict:
    """Card, versions, date and peak GPU memory of this process, for the training logs."""
    record = {"card": "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        record.update(
            card=torch.cuda.get_device_name(), peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1)
        )
    return record


def out_of_time(accelerator, elapsed: float, budget: float) -> bool:
    """True on every process once any process's clock passed the budget, so all stop at the same step (DDP)."""
    flag = torch.tensor([float(elapsed >= budget)], device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


def cosine_lr(base: float, step: int, warmup: int, progress: float) -> float:
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def cmd_init(args: argparse.Namespace) -> None:
    pipe = build_pipeline()
    pipe.transformer.to(torch.bfloat16)  # the untrained skeleton only has to carry configs and a frozen text encoder
    pipe.save_pretrained(args.pipeline)
    name_portable_tokenizer_class(Path(args.pipeline))
    counts = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("text_encoder", "vae", "transformer")
    }
    print(json.dumps(counts))


def cmd_vocab(args: argparse.Namespace) -> None:
    """Grow a trained pipeline's vocabulary to VOCABULARY: new words get the next ids and fresh random rows of the
    frozen text encoder (drawn at the old rows' scale); old words keep ids and rows, so the transformer keeps what
    it learned and only has to learn the new words."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    pipeline = Path(args.pipeline)
    vocab = AutoTokenizer.from_pretrained(pipeline / "tokenizer").get_vocab()
    new_words = [word for word in VOCABULARY if word not in vocab]
    if not new_words:
        print("vocab: nothing to add")
        return
    vocab |= {word: len(vocab) + i for i, word in enumerate(new_words)}
    encoder = UMT5EncoderModel.from_pretrained(pipeline / "text_encoder")
    old_rows = encoder.get_input_embeddings().weight.detach()
    generator = torch.Generator().manual_seed(args.seed)
    new_rows = torch.randn(len(new_words), old_rows.shape[1], generator=generator) * old_rows.std()
    encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(torch.cat([old_rows, new_rows]), freeze=True))
    encoder.config.vocab_size = len(vocab)
    encoder.save_pretrained(pipeline / "text_encoder")
    build_tokenizer(vocab).save_pretrained(pipeline / "tokenizer")
    name_portable_tokenizer_class(pipeline)
    print(f"vocab: {len(vocab) - 3} words, added {len(new_words)}: {' '.join(new_words)}")


def cmd_prompts(args: argparse.Namespace) -> None:
    """The bundled prompt files: captions of the first training clips and of the held-out scenes."""
    atomic_write_text(PROMPTS_TRAIN, "".join(s.caption() + "\n" for s in sample_scenes(TRAIN_SEED, 0, args.train)))
    atomic_write_text(PROMPTS_HELDOUT, "".join(s.caption() + "\n" for s in heldout_scenes()))


@torch.no_grad()
def colour_errors(vae, colours: tuple[str, ...] = ("red", "green", "blue", "yellow")) -> dict[str, float]:
    """Largest channel error (pixels in [0, 1]) at the decoded centre of a big square of each colour on black: a VAE
    that keeps brightness but not hue passes the MSE and fails here."""
    errors, middle = {}, slice(HEIGHT // 2 - 4, HEIGHT // 2 + 4)
    for colour in colours:
        square = SceneObject(colour, "square", "big", "stays", "", "", (0.5, 0.5), (0.0, 0.0), 0.0)
        video = render([Scene((square,), "black", "", (0.0,) * 6)], 9, HEIGHT, WIDTH, DEVICE)
        recon = vae.decode(vae.encode(video.to(vae.dtype)).latent_dist.mode()).sample.float()
        centre = recon[0, :, 4, middle, middle].mean(dim=(1, 2))
        errors[colour] = round((centre - video[0, :, 4, HEIGHT // 2, WIDTH // 2]).abs().max().item() / 2, 3)
    return errors


class Autoencode(torch.nn.Module):
    """Encode, take a latent (sampled, or the mode when only the decoder learns) and decode in one forward call, so
    DDP sees the whole VAE step and averages its gradients across processes."""

    def __init__(self, vae, sample: bool) -> None:
        super().__init__()
        self.vae, self.sample = vae, sample

    def forward(self, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(videos).latent_dist
        recon = self.vae.decode(posterior.sample() if self.sample else posterior.mode()).sample
        return recon, posterior.mean, posterior.logvar


def cmd_vae(args: argparse.Namespace) -> None:
    """Reconstruction (MSE + small KL) on short clips; the causal VAE then encodes any 1 + 4k frames.

    Runs as one process or one per GPU under `accelerate launch --multi_gpu` (DDP, --batch per process, each process
    its own clips); the main process evaluates and saves.
    """
    from accelerate import Accelerator

    accelerator = Accelerator()
    rank, processes = accelerator.process_index, accelerator.num_processes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.pipeline, device=DEVICE, dtype="float32")
    vae = pipe.vae.train()
    if args.decoder_only:  # the transformer was trained on this encoder's latents: keep them, sharpen the decoder
        for module in (vae.encoder, vae.quant_conv):
            module.requires_grad_(False)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    autoencode = accelerator.prepare_model(Autoencode(vae, sample=not args.decoder_only))
    start, step, log, stop = time.time(), 0, [], False
    bar = tqdm(desc="vae", mininterval=15, disable=not accelerator.is_main_process)
    while not stop:
        elapsed = time.time() - start
        first = args.seed_offset + (step * processes + rank) * args.batch
        videos, coverage = render(sample_scenes(TRAIN_SEED + 1, first, args.batch), args.frames, HEIGHT, WIDTH,
                                  DEVICE, coverage=True)  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(args.lr, step, 100, elapsed / (args.minutes * 60))
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            recon, posterior_mean, logvar = autoencode(videos)
        error = (recon.float() - videos) ** 2
        mse = error.mean()
        weight = 1 + args.object_weight * coverage.unsqueeze(1)  # object pixels count 1 + W (hue and edges)
        kl = 0.5 * (posterior_mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
        loss = weighted_mean(error, weight) + (0.0 if args.decoder_only else args.kl) * kl
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        log.append({"step": step, "time": round(elapsed, 1), "mse": mse.item(), "kl": kl.item()})
        stop = out_of_time(accelerator, elapsed, args.minutes * 60)
        step += 1
        bar.update()
        bar.set_postfix(mse=f"{mse.item():.5f}", refresh=False)
    bar.close()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    vae.eval()
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        videos = render(sample_scenes(TRAIN_SEED + 2, 0, args.eval_clips), NUM_FRAMES, HEIGHT, WIDTH, DEVICE)
        latents = torch.cat([vae.encode(v[None]).latent_dist.mode().float() for v in videos])
        recon = vae.decode(latents[:2]).sample.float()
        pixels_psnr = psnr(videos[:2], recon, data_range=2.0)
        # a causal VAE trained on 17-frame clips breaks past frame 17 (likely where its receptive field stops
        # reaching the padding at the clip start): check those frames on their own
        psnr_late = psnr(videos[:2, :, 17:], recon[:, :, 17:], data_range=2.0)
        hue = colour_errors(vae)
    if not args.decoder_only:
        mean, std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    vae.save_pretrained(out / "vae")
    save_json(out / "vae_log.json", {**device_record(), "steps": step, "batch": args.batch, "processes": processes,
                                     "frames": args.frames, "decoder_only": args.decoder_only,
                                     "object_weight": args.object_weight, "psnr_33_frames": pixels_psnr,
                                     "psnr_frames_17_32": psnr_late, "colour_errors": hue,
                                     "log": log})  # fmt: skip
    print(f"vae: {step} steps x {processes} x {args.batch}, 33-frame PSNR {pixels_psnr:.2f} dB (frames 17-32: "
          f"{psnr_late:.2f} dB), colour errors {hue}")  # fmt: skip


@torch.no_grad()
def build_pool(pipe, start: int, count: int, batch: int, seconds: float) -> dict[str, torch.Tensor]:
    """Normalised latents, padded prompt embeddings and latent-grid object coverage of training clips start,
    start + 1, ... (up to `count`, within `seconds`)."""
    parts, began = {"latents": [], "embeds": [], "coverage": []}, time.time()
    for first in tqdm(range(start, start + count, batch), desc="pool", mininterval=15):
        scenes = sample_scenes(TRAIN_SEED, first, min(batch, start + count - first))
        videos, coverage = render(scenes, NUM_FRAMES, HEIGHT, WIDTH, DEVICE, coverage=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            parts["latents"].append(normalise_latents(pipe.vae, videos).bfloat16())
        parts["coverage"].append(latent_coverage(coverage).bfloat16())
        prompt_embeds, _ = pipe.encode_prompt([s.caption() for s in scenes], do_classifier_free_guidance=False)
        parts["embeds"].append(prompt_embeds.bfloat16())
        if time.time() - began > seconds:
            break
    return {name: torch.cat(values) for name, values in parts.items()}


def cached_pool(pipe, args: argparse.Namespace, rank: int) -> dict[str, torch.Tensor]:
    """This process's latent pool: its own clips (rank r starts at clip --pool-start + r * POOL_STRIDE), kept in
    --pool-cache so a later call on the same machine trains on without rebuilding it."""
    cache = Path(args.pool_cache) / f"pool-{rank}.pt" if args.pool_cache else None
    if cache is not None and cache.is_file():
        return torch.load(cache, map_location=DEVICE)
    pool = build_pool(pipe, args.pool_start + rank * POOL_STRIDE, args.pool, 32, args.pool_seconds)
    if cache is not None:
        atomic_write(cache, lambda tmp: torch.save(pool, tmp))
    return pool


def cmd_dit(args: argparse.Namespace) -> None:
    """Flow matching with logit-normal shifted noise levels, 10% empty prompts for guidance, and an EMA copy.

    One process per GPU under `accelerate launch --multi_gpu` (DDP): each draws its own pool of clips and batches
    (--batch per GPU); the main process evaluates and saves.
    """
    from accelerate import Accelerator
    from safetensors.torch import load_file, save_file

    accelerator = Accelerator()  # explicit bf16 autocast below, as on one GPU
    rank, main = accelerator.process_index, accelerator.is_main_process
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.pipeline, device=DEVICE, dtype="float32")
    if args.resume:
        pipe.transformer.load_state_dict(load_file(Path(args.resume) / "raw_transformer.safetensors"))
    pool = cached_pool(pipe, args, rank)
    pool_latents, pool_embeds, pool_coverage = pool["latents"], pool["embeds"], pool["coverage"]
    print(f"rank {rank}: pool of {len(pool_latents)} clips, latents {tuple(pool_latents.shape[1:])}, "
          f"objects cover {pool_coverage.float().mean().item():.1%} of the latent cells")  # fmt: skip
    model = pipe.transformer.train()
    ema = [p.detach().clone() for p in model.parameters()]
    if args.resume:
        ema_state = load_file(Path(args.resume) / "transformer" / "diffusion_pytorch_model.safetensors")
        ema = [ema_state[name].to(DEVICE, torch.float32) for name, _ in model.named_parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    trained = accelerator.prepare_model(model)
    generator = torch.Generator(DEVICE).manual_seed(args.seed + 1000 * rank)
    budget = args.minutes * 60 - (time.time() - args.t0)
    start, step, log, smooth, stop = time.time(), 0, [], None, False
    bar = tqdm(desc="dit", mininterval=15, disable=not main)
    while not stop:
        elapsed = time.time() - start
        index = torch.randint(len(pool_latents), (args.batch,), device=DEVICE, generator=generator)
        latents, embeds = pool_latents[index].float(), pool_embeds[index]
        keep = torch.rand(args.batch, device=DEVICE, generator=generator) >= args.drop_prompt
        embeds = embeds * keep.view(-1, 1, 1)  # an empty prompt encodes to all zeros in WanPipeline
        uniform = torch.sigmoid(torch.randn(args.batch, device=DEVICE, generator=generator))
        sigmas = shifted_sigmas(uniform, SCHEDULER_SHIFT)
        noise = torch.randn(latents.shape, device=DEVICE, generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(args.lr, step, args.warmup, elapsed / budget)
        weight = 1 + args.object_weight * pool_coverage[index].float() if args.object_weight else None
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = flow_matching_loss(trained, latents, embeds.float(), sigmas, noise, weight).mean()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - decay)
        if step % 25 == 0:
            smooth = loss.item() if smooth is None else 0.6 * smooth + 0.4 * loss.item()
            log.append({"step": step, "time": round(elapsed, 1), "loss": loss.item(), "smooth": smooth})
            bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
            stop = out_of_time(accelerator, elapsed, budget)
        step += 1
        bar.update()
    bar.close()
    accelerator.wait_for_everyone()
    if not main:
        return
    raw = {name: p.detach().bfloat16().contiguous() for name, p in model.named_parameters()}
    save_file(raw, out / "raw_transformer.safetensors")
    with torch.no_grad():
        for p, e in zip(model.parameters(), ema, strict=True):
            p.copy_(e)
    model.eval()
    prompts, videos = heldout_videos(args.eval_clips, DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss_heldout = heldout_loss(pipe, videos, prompts)
        train_scenes = sample_scenes(TRAIN_SEED + 3, 0, args.eval_clips)
        train_videos = render(train_scenes, NUM_FRAMES, HEIGHT, WIDTH, DEVICE)
        loss_train = heldout_loss(pipe, train_videos, [s.caption() for s in train_scenes])
    model.to(torch.bfloat16).save_pretrained(out / "transformer")
    record = {**device_record(), "steps": step, "batch": args.batch, "processes": accelerator.num_processes,
              "object_weight": args.object_weight,
              "pool": len(pool_latents) * accelerator.num_processes, "lr": args.lr, "resumed": bool(args.resume),
              "heldout_loss": loss_heldout, "train_scene_loss": loss_train, "log": log}  # fmt: skip
    save_json(out / "dit_log.json", record)
    print(f"dit: {step} steps x {accelerator.num_processes} x {args.batch}, held-out loss {loss_heldout:.4f}, "
          f"unseen training-distribution loss {loss_train:.4f}")  # fmt: skip


def cmd_heldout(args: argparse.Namespace) -> None:
    pipe = load_pipeline(args.pipeline, device=args.device, dtype="float32")
    prompts, videos = heldout_videos(args.count, args.device)
    print(json.dumps({"heldout_loss": heldout_loss(pipe, videos, prompts), "clips": args.count, **device_record()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init")
    init.add_argument("pipeline")
    grow = sub.add_parser("vocab")
    grow.add_argument("pipeline")
    grow.add_argument("--seed", type=int, default=1)
    prompts = sub.add_parser("prompts")
    prompts.add_argument("--train", type=int, default=64)
    vae = sub.add_parser("vae")
    vae.add_argument("pipeline")
    vae.add_argument("out")
    vae.add_argument("--minutes", type=float, default=3.0)
    vae.add_argument("--batch", type=int, default=8)
    vae.add_argument("--frames", type=int, default=17)
    vae.add_argument("--lr", type=float, default=1e-3)
    vae.add_argument("--kl", type=float, default=1e-4)
    vae.add_argument("--eval-clips", type=int, default=16)
    vae.add_argument("--decoder-only", action="store_true", help="fine-tune the decoder, keep encoder and latents")
    vae.add_argument("--seed-offset", type=int, default=0, help="start of the clip stream (continue, not repeat)")
    vae.add_argument(
        "--object-weight", type=float, default=0.0, help="reconstruction weight 1 + W x object coverage per pixel"
    )
    dit = sub.add_parser("dit")
    dit.add_argument("pipeline")
    dit.add_argument("out")
    dit.add_argument("--minutes", type=float, default=8.5, help="wall-clock budget including the latent pool")
    dit.add_argument("--pool", type=int, default=8192)
    dit.add_argument("--pool-seconds", type=float, default=90)
    dit.add_argument("--pool-start", type=int, default=0, help="first training clip of the pool (new clips: > 0)")
    dit.add_argument("--batch", type=int, default=32)
    dit.add_argument("--lr", type=float, default=3e-4)
    dit.add_argument("--warmup", type=int, default=200)
    dit.add_argument("--ema", type=float, default=0.999)
    dit.add_argument("--drop-prompt", type=float, default=0.1)
    dit.add_argument(
        "--object-weight",
        type=float,
        default=0.0,
        help="loss weight 1 + W x object coverage per latent cell (0: plain mean; objects are a few %% of the cells)",
    )
    dit.add_argument("--seed", type=int, default=0)
    dit.add_argument("--resume", help="OUT folder of an earlier dit run")
    dit.add_argument("--pool-cache", help="folder that keeps each process's latent pool between runs")
    dit.add_argument("--eval-clips", type=int, default=16)
    held = sub.add_parser("heldout")
    held.add_argument("pipeline")
    held.add_argument("--count", type=int, default=16)
    held.add_argument("--device", default="cpu")
    args = parser.parse_args()
    args.t0 = time.time()
    commands = {"init": cmd_init, "vocab": cmd_vocab, "prompts": cmd_prompts}
    commands |= {"vae": cmd_vae, "dit": cmd_dit, "heldout": cmd_heldout}
    commands[args.command](args)


if __name__ == "__main__":
    main()
