"""Tiny pipelines of every family (Wan, Kandinsky 5, HunyuanVideo, HunyuanVideo 1.5) built fully offline, for tests
and demos.

Every component is a stock diffusers/transformers class, so what works here works on real
checkpoints: e.g. for Wan a WordLevel tokenizer, a small UMT5 text encoder, a small AutoencoderKLWan and a
WanTransformer3DModel of about a million parameters.
"""

from __future__ import annotations

import torch

TINY_WORDS = (
    "a red blue green yellow white black ball cube square circle triangle moves bounces rotates left right up down "
    "over on the sky field water fast slow small big camera pans zooms in of and with"
).split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(TINY_WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(vocab_size: int, d_model: int = 32):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
    )
    return UMT5EncoderModel(config).eval()


def tiny_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def tiny_clip_text_encoder(vocab_size: int):
    """A CLIP text encoder of width 8 (its pooled output is the pooled prompt embedding of K5 and HunyuanVideo)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_size=8,
        max_position_embeddings=77,
        projection_dim=8,
        bos_token_id=0,
        eos_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_hunyuan_vae():
    """A HunyuanVideo VAE with 4 latent channels, 8x spatial and 4x temporal compression (K5 and HunyuanVideo)."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )


def tiny_hunyuan_video15_vae():
    """A HunyuanVideo 1.5 VAE with 4 latent channels, 16x spatial and 4x temporal compression."""
    from diffusers import AutoencoderKLHunyuanVideo15

    return AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8,) * 5, layers_per_block=1)


def tiny_transformer(
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 24,
    text_dim: int = 32,
    in_channels: int = 16,
    image_dim: int | None = None,
    **overrides,
):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=64,
        num_layers=num_layers,
        image_dim=image_dim,
        added_kv_proj_dim=heads * head_dim if image_dim else None,
        rope_max_seq_len=64,
        **overrides,
    )


def tiny_wan_pipeline(seed: int = 0, *, two_transformers: bool = False, expand_timesteps: bool = False):
    """A WanPipeline with random weights: T2V, Wan2.2-A14B style (two transformers) or TI2V style."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(len(tokenizer)),
        vae=tiny_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_transformer(),
        transformer_2=tiny_transformer() if two_transformers else None,
        boundary_ratio=0.5 if two_transformers else None,
        expand_timesteps=expand_timesteps,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_kandinsky5_transformer(
    num_visual_blocks: int = 2, heads: int = 2, axes_dims: tuple[int, int, int] = (4, 6, 6), seed: int = 0, **overrides
):
    """A Kandinsky5Transformer3DModel of a few thousand parameters (head dim = sum(axes_dims), 16 by default).

    Its modulation layers start at zero in diffusers (every block would be an identity); they get
    random weights here so that attention changes the output.
    """
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(seed)
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=4,
        out_visual_dim=4,
        in_text_dim=16,
        in_text_dim2=8,
        time_dim=16,
        model_dim=sum(axes_dims) * heads,
        ff_dim=64,
        num_text_blocks=1,
        num_visual_blocks=num_visual_blocks,
        axes_dims=axes_dims,
        **overrides,
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modulation" in name:
                parameter.normal_(0.0, 0.3)
    return model.eval()


def tiny_qwen_text_config(vocab_size: int, layers: int = 1) -> dict:
    """Qwen2.5-VL text model settings of width 16 (2 query heads of 8, multimodal RoPE sections 2/1/1), for the
    tiny Kandinsky 5 and HunyuanVideo 1.5 text encoders."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )


def tiny_kandinsky5_pipeline(seed: int = 0):
    """A Kandinsky5T2VPipeline with random weights: tiny Qwen2.5-VL and CLIP text encoders on the WordLevel
    tokenizer, a tiny HunyuanVideo VAE (8x spatial, 4x temporal) and `tiny_kandinsky5_transformer` (visual_cond)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    qwen = Qwen2_5_VLConfig(
        text_config=tiny_qwen_text_config(len(tokenizer)),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16),
    )
    pipe = Kandinsky5T2VPipeline(
        transformer=tiny_kandinsky5_transformer(visual_cond=True, seed=seed),
        vae=tiny_hunyuan_vae(),
        text_encoder=Qwen2_5_VLForConditionalGeneration(qwen).eval(),
        tokenizer=tokenizer,
        text_encoder_2=tiny_clip_text_encoder(len(tokenizer)),
        tokenizer_2=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_hunyuan_video_transformer(
    num_layers: int = 1, num_single_layers: int = 2, heads: int = 2, seed: int = 0, **overrides
):
    """A HunyuanVideoTransformer3DModel of a few thousand parameters: head dim 16 (RoPE axes 4/6/6), Llama-like
    text of width 16, pooled CLIP-like text of width 8, one refiner block."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    config = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=heads,
        attention_head_dim=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6),
    )
    return HunyuanVideoTransformer3DModel(**{**config, **overrides}).eval()


def tiny_hunyuan_video15_transformer(num_layers: int = 2, heads: int = 2, seed: int = 0, **overrides):
    """A HunyuanVideo15Transformer3DModel of a few thousand parameters (head dim 16, patch 1, T2V latents of 4
    channels + 4 condition channels + 1 mask channel)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    config = dict(
        in_channels=9,
        out_channels=4,
        num_attention_heads=heads,
        attention_head_dim=16,
        num_layers=num_layers,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=8,
        rope_axes_dim=(4, 6, 6),
        task_type="t2v",
    )
    return HunyuanVideo15Transformer3DModel(**{**config, **overrides}).eval()


def tiny_hunyuan_video_pipeline(seed: int = 0):
    """A HunyuanVideoPipeline with random weights: a tiny Llama and CLIP text encoder on the WordLevel tokenizer, a
    tiny HunyuanVideo VAE (8x spatial, 4x temporal, 4 latent channels) and `tiny_hunyuan_video_transformer`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text = dict(vocab_size=len(tokenizer), intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
    llama = LlamaConfig(
        **text, hidden_size=16, num_key_value_heads=1, pad_token_id=0, bos_token_id=None, eos_token_id=1
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=LlamaModel(llama).eval(),
        tokenizer=tokenizer,
        transformer=tiny_hunyuan_video_transformer(seed=seed),
        vae=tiny_hunyuan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=tiny_clip_text_encoder(len(tokenizer)),
        tokenizer_2=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_hunyuan_video15_pipeline(seed: int = 0):
    """A HunyuanVideo15Pipeline with random weights: a tiny Qwen2.5-VL text model on the WordLevel tokenizer, a tiny
    T5 encoder on the stock ByT5 tokenizer (bytes: no vocabulary file), a tiny HunyuanVideo 1.5 VAE (16x spatial,
    4x temporal, 4 latent channels), `tiny_hunyuan_video15_transformer` and CFG at 6.0.

    The pipeline crops the first `prompt_template_encode_start_idx` (108) tokens of the chat template, which are
    the system message in Qwen's tokenizer; the tiny tokenizer's chat template puts as many placeholder tokens there,
    then the prompt, then the end token."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    # the pipeline reads the hidden states of the third layer from the end
    qwen = Qwen2_5_VLTextConfig(**tiny_qwen_text_config(len(tokenizer), layers=3))
    byt5 = ByT5Tokenizer()
    t5 = T5Config(
        vocab_size=len(byt5), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, relative_attention_num_buckets=8
    )
    pipe = HunyuanVideo15Pipeline(
        text_encoder=Qwen2_5_VLTextModel(qwen).eval(),
        tokenizer=tokenizer,
        transformer=tiny_hunyuan_video15_transformer(seed=seed),
        vae=tiny_hunyuan_video15_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=T5EncoderModel(t5).eval(),
        tokenizer_2=byt5,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    tokenizer.chat_template = (
        "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
        f"{{{{ '<pad> ' * {pipe.prompt_template_encode_start_idx} }}}}"
        "{%- else -%}{{ message['content'] }}{%- endif -%}{%- endfor -%}{%- if add_generation_prompt %} </s>{%- endif -%}"
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
